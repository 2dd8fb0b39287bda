"""A test-only fairseq user dir: the plugin plus a criterion that turns the loss into NaN at one update.

Used to show what fairseq does with a non-finite loss in a real run (tests/test_reliability.py).
"""
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion

import d2v_plugin  # noqa: F401  (registers the task, model and criterion)
from d2v_plugin.criterions.mixup_cross_entropy import MixupCrossEntropyConfig, MixupCrossEntropyCriterion


@dataclass
class NanAtUpdateConfig(MixupCrossEntropyConfig):
    nan_at_update: int = field(default=3, metadata={"help": "update whose loss becomes NaN"})


@register_criterion("nan_at_update_cross_entropy", dataclass=NanAtUpdateConfig)
class NanAtUpdate(MixupCrossEntropyCriterion):
    def forward(self, model, sample, reduce=True):
        loss, n, log = super().forward(model, sample, reduce)
        if model.training and self.update + 1 == self.cfg.nan_at_update:
            loss = loss * torch.tensor(float("nan"))
        return loss, n, log
