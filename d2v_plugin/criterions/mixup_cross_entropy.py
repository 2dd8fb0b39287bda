"""The fairseq criterion ``mixup_cross_entropy``: timm Mixup/CutMix with soft targets, top-1/top-5.

The only place that mixes labels. Training with mixup: timm's ``Mixup`` in batch mode (label
smoothing applied there, once) and soft-target cross-entropy ``sum(-y * log_softmax(logits))``;
training without: hard-label cross-entropy with label smoothing; validation: plain cross-entropy
plus top-1/top-5 correct counts. Losses are summed over the batch and reported in nats.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.data import data_utils
from fairseq.dataclass import FairseqDataclass
from omegaconf import II
from timm.data import Mixup
from timm.data.mixup import mixup_target

from d2v_plugin.evaluation.metrics import percent, topk_correct
from d2v_plugin.names import CRITERION_NAME


@dataclass
class MixupCrossEntropyConfig(FairseqDataclass):
    mixup_alpha: float = field(default=0.7, metadata={"help": "mixup Beta(alpha, alpha); 0 = off"})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "cutmix Beta(alpha, alpha); 0 = off"})
    cutmix_minmax: Optional[List[float]] = field(
        default=None, metadata={"help": "cutmix box area range [min, max] (overrides cutmix_alpha); null = off"}
    )
    mixup_prob: float = field(default=0.9, metadata={"help": "probability of mixing a batch at all"})
    switch_prob: float = field(default=0.5, metadata={"help": "probability of cutmix instead of mixup"})
    mixup_mode: str = field(default="batch", metadata={"help": "timm Mixup mode: batch, pair or elem"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing (inside Mixup when mixing)"})
    class_mean: bool = field(
        default=False,
        metadata={"help": "divide the loss by the number of classes (a mean over batch x classes, as the thesis' "
                          "code computes it); with Adam this mostly changes how much eps weighs"},
    )
    # null where the config has no model group (fairseq-validate's own): the task fills in its classes
    num_classes: Optional[int] = II("oc.select:model.num_classes,null")
    seed: int = II("common.seed")
    batch_size: Optional[int] = II("dataset.batch_size")


@register_criterion(CRITERION_NAME, dataclass=MixupCrossEntropyConfig)
class MixupCrossEntropyCriterion(FairseqCriterion):
    def __init__(self, cfg: MixupCrossEntropyConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.update, self.place = 0, 0  # the update and micro-batch being trained: set by the task (set_update)
        self.mixup = None
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.cutmix_minmax is not None:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                cutmix_minmax=list(cfg.cutmix_minmax) if cfg.cutmix_minmax is not None else None,
                prob=cfg.mixup_prob, switch_prob=cfg.switch_prob, mode=cfg.mixup_mode,
                label_smoothing=cfg.label_smoothing, num_classes=cfg.num_classes,
            )
            if isinstance(cfg.batch_size, int) and cfg.batch_size % 2:
                raise ValueError(
                    f"dataset.batch_size={cfg.batch_size} is odd, but mixup/cutmix pairs the samples of a batch: "
                    f"use an even dataset.batch_size (with dataset.required_batch_size_multiple=2)")

    def set_update(self, update: int, place: int = 0) -> None:
        """The update number of the batch about to be trained and its place in the update's global batch
        (accumulation step x ranks + rank): mixup is seeded with both."""
        self.update, self.place = update, place

    def mix(self, images: torch.Tensor, target: torch.Tensor, update: int = 0, place: int = 0):
        """timm's Mixup on the batch; returns (images, soft targets).

        Mixup pairs sample i with sample B-1-i and needs an even batch: an odd last sample is left
        unmixed with a label-smoothed target. Mixing draws from numpy, seeded by (seed, update, place):
        a resumed run mixes exactly as an uninterrupted one, each micro-batch of an update draws its own
        mix (as each GPU of data2vec's runs does), and the same images mix alike however the global batch
        is split over ranks and accumulation steps.
        """
        even = images.shape[0] - images.shape[0] % 2
        with data_utils.numpy_seed(self.cfg.seed, update, place):
            if even:
                mixed, soft = self.mixup(images[:even].clone(), target[:even])
            else:
                mixed, soft = images[:0], images.new_zeros(0, self.cfg.num_classes)
        if even < images.shape[0]:
            rest = mixup_target(target[even:], self.cfg.num_classes, lam=1.0, smoothing=self.cfg.label_smoothing)
            mixed, soft = torch.cat([mixed, images[even:]]), torch.cat([soft, rest.to(soft.dtype)])
        return mixed, soft

    def forward(self, model, sample, reduce=True):
        images, target = sample["net_input"]["images"], sample["target"]
        # a batch whose images were all unreadable runs as a placeholder that counts nothing (data/dataset.py)
        empty = bool(sample.get("no_image_left"))
        n = 0 if empty else images.shape[0]
        log = {"ntokens": n, "nsentences": n, "sample_size": n}
        if model.training:  # a training statistic: images the batch left out (validation reports them too, once)
            log["bad_images"] = sample.get("bad_images", 0)
        if model.training and self.mixup is not None:
            images, soft = self.mix(images, target, self.update, self.place)
            logits = model(images)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1))
        elif model.training:
            logits = model(images)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.label_smoothing, reduction="sum")
        else:
            logits = model(images)
            loss = F.cross_entropy(logits.float(), target, reduction="sum")
            log["correct"], log["correct5"] = (c.detach() * (not empty) for c in topk_correct(logits, target))
        if empty:
            loss = loss * 0.0
        if self.cfg.class_mean:
            loss = loss / self.cfg.num_classes
        log["loss"] = loss.detach()
        return loss, n, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        n = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(n, 1), n, round=4)
        bad = total("bad_images")
        if bad:
            metrics.log_scalar_sum("bad_images", bad)
        if any("correct" in log for log in logging_outputs):
            metrics.log_scalar_sum("_correct", total("correct"))
            metrics.log_scalar_sum("_correct5", total("correct5"))
            metrics.log_scalar_sum("n", n)  # images validated, summed over workers
            metrics.log_derived("accuracy", lambda m: percent(m["_correct"].sum, m["n"].sum))
            metrics.log_derived("top5", lambda m: percent(m["_correct5"].sum, m["n"].sum))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
