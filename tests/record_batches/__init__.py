"""A test-only fairseq user dir: the plugin plus a criterion that records which images each training
step saw, to show that a resumed run continues its epoch without repeating or skipping an image.

Each process appends ``{"update", "rank", "ids"}`` lines to ``$D2V_RECORD_DIR/<pid>.jsonl``.
"""
import json
import os

from fairseq.criterions import register_criterion

import d2v_plugin  # noqa: F401  (registers the task, model and criterion)
from d2v_plugin.cluster import data_parallel_rank_and_size
from d2v_plugin.criterions.mixup_cross_entropy import MixupCrossEntropyConfig, MixupCrossEntropyCriterion


@register_criterion("recording_cross_entropy", dataclass=MixupCrossEntropyConfig)
class RecordingCrossEntropy(MixupCrossEntropyCriterion):
    def forward(self, model, sample, reduce=True):
        if model.training and sample:
            record = {"update": self.update, "rank": data_parallel_rank_and_size()[0],
                      "ids": sample["id"].tolist()}
            with open(os.path.join(os.environ["D2V_RECORD_DIR"], f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        return super().forward(model, sample, reduce)
