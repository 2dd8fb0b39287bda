"""A test-only fairseq user dir: the plugin plus a criterion whose validation top-1 per epoch is set by the
test, and which sends its own process SIGUSR1 during a chosen update, as SLURM's ``--signal`` would at
that moment. Training itself is the plugin's (fairseq's save_checkpoint, the plugin's stop on a signal)."""
import os
import signal
from dataclasses import dataclass, field
from typing import List

import torch
from fairseq.criterions import register_criterion

import d2v_plugin  # noqa: F401  (registers the task, model and criterion)
from d2v_plugin.criterions.mixup_cross_entropy import MixupCrossEntropyConfig, MixupCrossEntropyCriterion


@dataclass
class ScriptedConfig(MixupCrossEntropyConfig):
    valid_top1: List[float] = field(default_factory=list, metadata={"help": "validation top-1 of epoch 1, 2, ..."})
    signal_in_update: int = field(default=0, metadata={"help": "SIGUSR1 to this process during this update"})


@register_criterion("scripted_cross_entropy", dataclass=ScriptedConfig)
class Scripted(MixupCrossEntropyCriterion):
    def forward(self, model, sample, reduce=True):
        if model.training and self.update + 1 == self.cfg.signal_in_update and self.place == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        loss, n, log = super().forward(model, sample, reduce)
        if not model.training and self.cfg.valid_top1:
            epoch = self.task.datasets[self.task.cfg.train_split].epoch
            log["correct"] = torch.tensor(round(self.cfg.valid_top1[epoch - 1] * n))
        return loss, n, log
