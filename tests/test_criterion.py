"""mixup_cross_entropy against independent computations: torch's CE, timm's targets, hand-counted top-k."""
import pytest
import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.data import data_utils
from timm.data import Mixup

from d2v_plugin.criterions.mixup_cross_entropy import MixupCrossEntropyConfig, MixupCrossEntropyCriterion

NUM_CLASSES = 10


class Recorder(torch.nn.Module):
    """A linear 'model' that remembers the images it was given."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3 * 4 * 4, NUM_CLASSES)

    def forward(self, images):
        self.seen = images.clone()
        return self.lin(images.flatten(1))


def criterion(**kw):
    cfg = MixupCrossEntropyConfig(num_classes=NUM_CLASSES, seed=3, **kw)
    crit = MixupCrossEntropyCriterion(cfg, task=None)
    crit.set_update(7, 0)  # as the task's train_step does: update 7, the global batch's first micro-batch
    return crit


def sample(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"net_input": {"images": torch.randn(n, 3, 4, 4, generator=g)},
            "target": torch.randint(0, NUM_CLASSES, (n,), generator=g)}


def test_mixup_off_equals_torch_cross_entropy_with_label_smoothing():
    model, s = Recorder().train(), sample()
    loss, n, log = criterion(mixup_alpha=0.0, cutmix_alpha=0.0)(model, s)
    expected = F.cross_entropy(model.lin(s["net_input"]["images"].flatten(1)), s["target"], label_smoothing=0.1,
                               reduction="sum")
    assert n == 8 and torch.allclose(loss, expected)


def test_mixup_on_equals_soft_ce_against_timms_targets_for_that_batch():
    model, s = Recorder().train(), sample()
    crit = criterion(mixup_alpha=0.7, cutmix_alpha=1.0, mixup_prob=1.0, switch_prob=0.5)
    crit.set_update(7, 1)  # (place 0 draws a cutmix box too small to cover a pixel of a 4x4 image)
    loss, _, _ = crit(model, s)
    # independent: timm's Mixup with Table 1's settings, drawing from the same numpy seed
    mixup = Mixup(mixup_alpha=0.7, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=NUM_CLASSES)
    with data_utils.numpy_seed(3, 7, 1):
        mixed, soft = mixup(s["net_input"]["images"].clone(), s["target"])
    assert torch.equal(model.seen, mixed)
    assert not torch.equal(mixed, s["net_input"]["images"])
    expected = torch.sum(-soft * F.log_softmax(model.lin(mixed.flatten(1)), dim=-1))
    assert torch.allclose(loss, expected)


def test_each_micro_batch_of_an_update_draws_its_own_mix():
    # the micro-batches of one update (other GPUs, other accumulation steps) mix with their own draws, as
    # each GPU of data2vec's runs does; the same place in the same update always mixes alike
    crit, images = criterion(mixup_alpha=0.7, cutmix_alpha=1.0, mixup_prob=1.0), sample()
    mixes = []
    for place in (0, 1, 2, 0):
        crit.set_update(7, place)
        model = Recorder().train()
        crit(model, images)
        mixes.append(model.seen)
    assert torch.equal(mixes[0], mixes[3])
    assert not torch.equal(mixes[0], mixes[1]) and not torch.equal(mixes[1], mixes[2])


def test_label_smoothing_is_applied_once_when_mixup_does_not_fire():
    model, s = Recorder().train(), sample()
    loss, _, _ = criterion(mixup_prob=0.0)(model, s)  # Mixup on, but never mixes: only its smoothing acts
    expected = F.cross_entropy(model.lin(s["net_input"]["images"].flatten(1)), s["target"], label_smoothing=0.1,
                               reduction="sum")
    assert torch.allclose(loss, expected, atol=1e-5)


def test_odd_batch_mixes_the_even_part_and_keeps_the_last_sample():
    model, s = Recorder().train(), sample(n=7)
    loss, n, _ = criterion(mixup_prob=1.0)(model, s)
    assert n == 7 and torch.isfinite(loss)
    assert torch.equal(model.seen[6], s["net_input"]["images"][6])


def test_validation_counts_top1_and_top5_on_a_hand_built_batch():
    class Fixed(torch.nn.Module):
        def forward(self, images):
            return logits

    logits = torch.full((4, NUM_CLASSES), -10.0)
    for row, order in enumerate([[3, 1, 2, 4, 5], [0, 9, 8, 7, 6], [5, 4, 3, 2, 1], [1, 2, 3, 4, 6]]):
        for rank, cls in enumerate(order):
            logits[row, cls] = 10.0 - rank
    target = torch.tensor([3, 6, 0, 5])  # row 0: top-1; row 1: 5th; row 2: miss; row 3: miss (5 not in top-5)
    model = Fixed().eval()
    loss, n, log = criterion()(model, {"net_input": {"images": torch.zeros(4, 3, 4, 4)}, "target": target})
    assert int(log["correct"]) == 1 and int(log["correct5"]) == 2
    assert torch.allclose(loss, F.cross_entropy(logits, target, reduction="sum"))


def test_metrics_reduce_over_workers():
    logs = [{"loss": torch.tensor(6.0), "sample_size": 4, "correct": torch.tensor(3), "correct5": torch.tensor(4)},
            {"loss": torch.tensor(2.0), "sample_size": 4, "correct": torch.tensor(1), "correct5": torch.tensor(3)}]
    with metrics.aggregate() as agg:
        MixupCrossEntropyCriterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(1.0)
    assert values["accuracy"] == pytest.approx(50.0) and values["top5"] == pytest.approx(87.5)


def test_class_mean_is_the_thesis_codes_mean_over_batch_and_classes():
    model, s = Recorder().train(), sample()
    crit = criterion(mixup_alpha=0.7, cutmix_alpha=1.0, mixup_prob=1.0, class_mean=True)
    loss, n, _ = crit(model, s)
    mixup = Mixup(mixup_alpha=0.7, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=NUM_CLASSES)
    with data_utils.numpy_seed(3, 7, 0):
        mixed, soft = mixup(s["net_input"]["images"].clone(), s["target"])
    thesis = torch.mean(-soft * F.log_softmax(model.lin(mixed.flatten(1)), dim=-1))  # over batch x classes
    assert torch.allclose(loss / n, thesis)  # fairseq divides the summed loss by the sample size
