"""Each patch of another library (d2v_plugin/compat.py): what it fixes, and that the upstream behaviour
it changes is still there on the pinned versions (so the patch is removed when that test fails)."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_encoder
from d2v_plugin import compat
from d2v_plugin.data import train_transform


def killed_halfway(src, dst, *a, **k):
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read()[:100])
    raise KeyboardInterrupt  # the job dies in the middle of the copy


def test_every_patch_is_installed():
    from fairseq.file_io import PathManager
    from fairseq.optim.composite import FairseqCompositeOptimizer
    from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin

    assert PathManager.copy is compat.atomic_copy
    assert _FP16OptimizerMixin.state_dict is compat.fp16_state_dict_with_masters
    assert FairseqCompositeOptimizer.__init__ is compat.composite_init_with_own_dicts
    import fairseq.dataclass.utils

    assert fairseq.dataclass.utils.merge_with_parent is compat.merge_with_parent_naming_unknown_keys


def fp16_optimizer(precision):
    """fairseq's FP16Optimizer over a tiny classifier in half precision, built from the demo recipe."""
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from d2v_plugin.testing.recipes import resolve

    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier

    cfg = resolve("demo", f"common.{precision}=true")
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    model = Data2Vec2ImageClassifier(Data2Vec2ClassifierConfig(num_classes=3), tiny_encoder()).to(half)
    model.assign_param_groups()  # as build_model does for training
    return FP16Optimizer.build_optimizer(cfg, list(model.parameters())), model


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fairseqs_fp16_optimizer_state_lacks_the_masters_the_patch_saves_and_restores(precision):

    opt, model = fp16_optimizer(precision)
    # upstream (fairseq-fixed 0.12.3.1): the optimizer state holds no fp32 master weights, so a resume
    # rebuilds them from the half-precision model; when this fails, fairseq saves them and the patch can go
    upstream = compat._original_fp16_state_dict(opt)
    assert not any(torch.is_tensor(v) or isinstance(v, list) for v in upstream.values())
    with torch.no_grad():
        for p in opt.fp32_params:
            p.add_(torch.randn_like(p) * 1e-4)  # updates finer than the half-precision copy keeps
    if opt.scaler is not None:
        opt.scaler._iter, opt.scaler._last_overflow_iter = 37, 30
    saved = opt.state_dict()

    fresh, _ = fp16_optimizer(precision)  # what a resumed run builds: masters from the half weights
    assert not all(torch.equal(a, b) for a, b in zip(fresh.fp32_params, opt.fp32_params))
    fresh.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(fresh.fp32_params, opt.fp32_params))
    if precision == "fp16":
        assert (fresh.scaler._iter, fresh.scaler._last_overflow_iter) == (37, 30)


def test_an_interrupted_checkpoint_copy_leaves_the_previous_file_loadable(tmp_path, monkeypatch):
    from fairseq.file_io import PathManager

    last, new = tmp_path / "checkpoint_last.pt", tmp_path / "checkpoint_3_300.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, last)
    torch.save({"model": {"w": torch.ones(1000)}}, new)

    monkeypatch.setattr(shutil, "copyfile", killed_halfway)
    # upstream (fairseq-fixed 0.12.3.1): PathManager.copy truncates the destination first; when this
    # fails, fairseq copies atomically and the patch can go
    upstream = tmp_path / "upstream" / "checkpoint_last.pt"
    upstream.parent.mkdir()
    upstream.write_bytes(last.read_bytes())
    with pytest.raises(KeyboardInterrupt):
        compat._original_copy(str(new), str(upstream), overwrite=True)
    with pytest.raises(Exception):
        torch.load(upstream, weights_only=True)  # half-written

    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(new), str(last), overwrite=True)  # what fairseq's save_checkpoint calls
    assert torch.equal(torch.load(last, weights_only=True)["model"]["w"], torch.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_3_300.pt", "checkpoint_last.pt", "upstream"]  # no debris
    monkeypatch.undo()
    assert PathManager.copy(str(new), str(last), overwrite=True)
    assert torch.equal(torch.load(last, weights_only=True)["model"]["w"], torch.ones(1000))


def test_fairseqs_composite_optimizers_share_their_groups_unless_patched():
    from fairseq.optim import build_optimizer
    from fairseq.optim.composite import FairseqCompositeOptimizer
    from d2v_plugin.testing.recipes import resolve

    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier

    def build(cfg, layer_decay):
        model = Data2Vec2ImageClassifier(Data2Vec2ClassifierConfig(num_classes=3, layer_decay=layer_decay),
                                         tiny_encoder())
        model.assign_param_groups()
        return build_optimizer(cfg.optimizer, list(model.parameters()))

    cfg = resolve("demo")
    # upstream (fairseq-fixed 0.12.3.1): the groups live in class attributes shared by every instance;
    # when this fails, fairseq keeps them per instance and the patch can go
    assert isinstance(vars(FairseqCompositeOptimizer).get("optimizers"), dict)
    first, second = build(cfg, 0.5), build(cfg, 1.0)  # a layer-decayed model, then a plain one
    assert set(second.optimizers) == {"default", "no_decay"}  # not the first one's hashed groups
    assert len(first.optimizers) > 2 and first.optimizers is not second.optimizers
    assert compat.FairseqCompositeOptimizer.__init__ is compat.composite_init_with_own_dicts


def test_randaugment_posterize_at_full_strength_gives_black_instead_of_crashing():
    # timm's 'inc1' posterize asks for 0 bits at magnitude 10 (data2vec's rand-m9-mstd0.5-inc1 reaches it);
    # Pillow >= 10 raises on 0 bits, which used to mean a black image
    from PIL import ImageOps
    from timm.data.auto_augment import AugmentOp

    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (20, 30, 3), dtype=np.uint8))
    # upstream (Pillow 13): 0 bits is refused; when this fails, Pillow accepts it again and the patch can go
    with pytest.raises(ValueError):
        ImageOps.posterize(img, 0)
    train_transform(32, auto_augment="rand-m9-mstd0.5-inc1")  # installs the fix
    out = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(img)
    assert out.size == img.size and not np.asarray(out).any()
    two_bits = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(img)  # 4 - 2 = 2 bits kept
    assert (np.asarray(two_bits) & 0b00111111 == 0).all() and np.asarray(two_bits).any()


class FakeTrainer:
    """What fairseq's validate_and_save asks of the trainer."""

    def __init__(self, updates):
        self.updates = updates

    def get_num_updates(self):
        return self.updates

    def cumulative_training_time(self):
        return 60.0


class FakeEpochIterator:
    epoch = 1


@pytest.mark.parametrize("case", ["mid-epoch", "end of epoch", "last update"])
def test_fairseq_knows_no_stop_on_a_signal_the_patch_saves_and_exits(monkeypatch, case):
    import fairseq_cli.train
    from fairseq import checkpoint_utils
    from d2v_plugin import cluster
    from d2v_plugin.testing.recipes import resolve

    assert compat.install_save_on_signal()
    assert fairseq_cli.train.validate_and_save is compat.validate_and_save_or_stop
    cfg = resolve("demo", "optimization.max_update=90", "checkpoint.save_interval_updates=0")
    saves, validations = [], []
    monkeypatch.setattr(checkpoint_utils, "save_checkpoint", lambda c, t, itr, val_loss: saves.append(val_loss))
    monkeypatch.setattr(fairseq_cli.train, "validate", lambda *a: validations.append(1) or [0.25])
    updates, end_of_epoch = {"mid-epoch": (20, False), "end of epoch": (45, True), "last update": (90, True)}[case]
    trainer, task = FakeTrainer(updates), type("Task", (), {})()
    args = (cfg, trainer, task, FakeEpochIterator(), ["val"], end_of_epoch)

    # upstream (fairseq-fixed 0.12.3.1): fairseq stops only at max_update, a time limit or patience; when it
    # learns to stop on a signal, the patch can go
    assert compat._original_validate_and_save(*args)[1] == (case == "last update")
    if case == "mid-epoch":
        assert saves == [] and validations == []  # nothing due in the middle of an epoch
    saves.clear(), validations.clear()

    task.stop_request = cluster.StopRequest((), requeue=False)
    task.stop_request.agreed = True  # the ranks agreed on a stop in this update
    if case == "last update":  # the run is complete anyway: it ends as usual, exit status 0
        assert compat.validate_and_save_or_stop(*args) == ([0.25], True)
        assert saves == [0.25] and validations == [1]
        return
    with pytest.raises(SystemExit) as stopped:
        compat.validate_and_save_or_stop(*args)
    assert stopped.value.code == cluster.EXIT_STOPPED
    if case == "mid-epoch":  # checkpoint_last.pt, without a validation the run would not have made
        assert saves == [None] and validations == []
    else:  # fairseq's own end-of-epoch validation and checkpoint, once
        assert saves == [0.25] and validations == [1]


def test_fairseq_says_only_that_a_key_is_not_in_its_dataclass_the_patch_names_it_and_the_nearest():
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError

    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig
    from d2v_plugin.tasks.image_folder_classification import ImageFolderClassificationConfig

    whole = OmegaConf.create({"task": {"_name": "image_folder_classification", "dta": "/data"},
                              "model": {"_name": "data2vec2_image_classifier", "dept": 4, "num_clases": 3},
                              "criterion": {"_name": "x", "zzzz": 1}})
    # upstream: omegaconf's words, the key without its section and no suggestion; when this fails the patch can go
    with pytest.raises(ConfigKeyError) as upstream:
        compat._original_merge_with_parent(ImageFolderClassificationConfig(), whole.task)
    assert str(upstream.value).startswith("Key 'dta' not in 'ImageFolderClassificationConfig'")
    with pytest.raises(ConfigKeyError, match=r"^unknown key task\.dta; did you mean task\.data\?$"):
        compat.merge_with_parent_naming_unknown_keys(ImageFolderClassificationConfig(), whole.task)
    with pytest.raises(ConfigKeyError, match=r"^unknown key model\.(dept|num_clases); did you mean model\."):
        compat.merge_with_parent_naming_unknown_keys(Data2Vec2ClassifierConfig(), whole.model)
    far = DictConfig({"zzzz": 1})  # nothing near it: the keys there are listed
    with pytest.raises(ConfigKeyError, match=r"^unknown key zzzz; ImageFolderClassificationConfig has: data, "):
        compat.merge_with_parent_naming_unknown_keys(ImageFolderClassificationConfig(), far)
    merged = compat.merge_with_parent_naming_unknown_keys(ImageFolderClassificationConfig(), DictConfig({"data": "/d"}))
    assert merged.data == "/d" and merged.image_size == 224  # a good config merges as fairseq's does
