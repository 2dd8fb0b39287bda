"""Each recipe resolves through fairseq's hydra set-up (as fairseq-hydra-train does) to the documented values."""
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from d2v_plugin.testing.recipes import resolve

CONFIG_DIR = os.path.join(REPO, "config")
RECIPES = ["distilled_imagenet", "distilled_imagenet_thesis_code", "d2v2_base_imagenet", "demo", "linear_probe_imagenet",
           "attentive_probe_imagenet"]


def groups(cfg):
    return cfg.optimizer.groups.default, cfg.optimizer.groups.no_decay


def test_distilled_imagenet_has_every_table_1_value():
    cfg = resolve("distilled_imagenet")
    assert cfg.task._name == "image_folder_classification" and cfg.model._name == "data2vec2_image_classifier"
    assert cfg.model.pooling == "mean" and cfg.model.freeze_encoder is False and cfg.model.num_classes == 1000
    assert cfg.model.drop_path_rate == 0.0 and cfg.model.layer_decay == 1.0
    assert cfg.optimization.max_epoch == 15 and cfg.optimization.max_update == 15 * 5005  # fairseq's batching: below
    assert list(cfg.optimization.lr) == [0.001] and cfg.optimization.clip_norm == 2.0
    assert cfg.optimizer._name == "composite" and cfg.lr_scheduler._name == "pass_through"
    for group, wd in zip(groups(cfg), (0.01, 0.0)):
        assert group.lr_float == 0.001
        assert group.optimizer._name == "fused_adamw" and list(group.optimizer.adam_betas) == [0.9, 0.95]
        assert group.optimizer.adam_eps == 1e-6 and group.optimizer.weight_decay == wd
        assert group.lr_scheduler._name == "cosine" and group.lr_scheduler.warmup_updates == 5000
    # global batch 256 on the 8 GPUs the comment gives: 32 x 8 x 1
    assert cfg.dataset.batch_size * 8 * cfg.optimization.update_freq[0] == 256 == cfg.task.global_batch_size
    assert cfg.dataset.required_batch_size_multiple == 2
    assert cfg.criterion._name == "mixup_cross_entropy"
    c = cfg.criterion
    assert (c.mixup_alpha, c.cutmix_alpha, c.cutmix_minmax, c.mixup_prob, c.switch_prob, c.mixup_mode,
            c.label_smoothing) == (0.7, 1.0, None, 0.9, 0.5, "batch", 0.1)
    assert cfg.common.fp16 is True and cfg.common.log_format == "json"
    assert cfg.common.tensorboard_logdir == "checkpoints/distilled_imagenet/tb"  # one folder per run
    assert cfg.dataset.validate_interval == 1 and cfg.checkpoint.best_checkpoint_metric == "accuracy"
    assert cfg.checkpoint.maximize_best_checkpoint_metric is True
    assert list(cfg.task.train_crop_scale) == [0.08, 1.0] and cfg.task.eval_crop_ratio == 0.875
    assert cfg.task.image_size == 224 and cfg.task.auto_augment is None


def test_d2v2_base_imagenet_has_data2vecs_base_values():
    cfg = resolve("d2v2_base_imagenet")
    assert cfg.model.layer_decay == 0.65 and cfg.model.drop_path_rate == 0.1 and cfg.model.depth is None
    assert cfg.model.drop_path_schedule == "data2vec"
    assert cfg.optimization.max_update == 250200 and list(cfg.optimization.lr) == [0.001]
    # data2vec decayed every parameter (fairseq's composite ignores its weight_decay_scale): reproduced
    for group, wd in zip(groups(cfg), (0.05, 0.05)):
        assert group.lr_float == 0.001 and list(group.optimizer.adam_betas) == [0.9, 0.95]
        assert group.optimizer.weight_decay == wd and "adam_eps" not in group.optimizer  # fairseq's 1e-8
        assert group.lr_scheduler.warmup_updates == 16000 and group.lr_scheduler.min_lr == 1e-6
    c = cfg.criterion
    assert (c.mixup_alpha, c.cutmix_alpha, c.mixup_prob, c.switch_prob, c.label_smoothing) == (0.7, 1.0, 0.9, 0.5, 0.1)
    assert cfg.task.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.task.random_erasing == 0.25
    assert cfg.dataset.batch_size * 8 * cfg.optimization.update_freq[0] == 512  # data2vec's 16 x 32
    assert cfg.task.global_batch_size == 512
    assert cfg.common.fp16 is True and cfg.checkpoint.best_checkpoint_metric == "accuracy"


def test_thesis_code_recipe_differs_from_table_1_exactly_where_the_thesis_code_does():
    table1, thesis = resolve("distilled_imagenet"), resolve("distilled_imagenet_thesis_code")
    t = thesis
    assert t.criterion.mixup_alpha == 0.8 and t.criterion.class_mean is True
    for group in groups(t):
        assert list(group.optimizer.adam_betas) == [0.9, 0.999] and group.optimizer.adam_eps == 1e-8
        assert group.lr_scheduler.warmup_updates == 7506 and group.lr_float == 1e-3
    assert t.optimization.clip_norm == 0.0
    assert t.model.layer_decay == 0.81 and t.model.layer_decay_embeddings == "decayed"
    assert t.task.auto_augment == "rand-m9-mstd0.5-inc1" and t.task.random_erasing == 0.25
    assert t.task.eval_crop_ratio == 1.0
    # and nothing else: every other setting is Table 1's
    differ = {("criterion", "mixup_alpha"), ("criterion", "class_mean"), ("optimization", "clip_norm"),
              ("model", "layer_decay"), ("model", "layer_decay_embeddings"), ("task", "auto_augment"),
              ("task", "random_erasing"), ("task", "eval_crop_ratio"), ("checkpoint", "save_dir"),
              ("common", "tensorboard_logdir")}  # the last two: each run its own folder
    for section in ("task", "model", "criterion", "optimization", "dataset", "checkpoint", "common"):
        a, b = OmegaConf.to_container(table1[section]), OmegaConf.to_container(thesis[section])
        assert {k for k in a if a[k] != b[k]} == {k for s, k in differ if s == section}, section
    assert [g.optimizer.weight_decay for g in groups(t)] == [0.01, 0.0]


def test_linear_probe_imagenet_has_maes_linear_probing_values():
    cfg = resolve("linear_probe_imagenet")
    m = cfg.model
    assert (m.head, m.freeze_encoder, m.pooling, m.num_classes) == ("batchnorm_linear", True, "cls", 1000)
    assert cfg.optimizer._name == "lars" and cfg.optimizer.weight_decay == 0.0
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.trust_coefficient == 0.001
    assert cfg.task.global_batch_size == 16384 and list(cfg.optimization.lr) == [0.1 * 16384 / 256]  # blr 0.1
    assert cfg.lr_scheduler._name == "cosine" and cfg.lr_scheduler.min_lr == 0.0
    assert cfg.optimization.max_epoch == 90 and cfg.optimization.max_update == 90 * 79
    assert cfg.lr_scheduler.warmup_updates == 10 * 79 and cfg.optimization.clip_norm == 0.0
    c = cfg.criterion
    assert (c.mixup_alpha, c.cutmix_alpha, c.label_smoothing) == (0.0, 0.0, 0.0)
    assert list(cfg.task.train_crop_scale) == [0.08, 1.0] and cfg.task.auto_augment is None
    assert cfg.task.random_erasing == 0.0 and cfg.task.eval_crop_ratio == 0.875 and cfg.task.interpolation == "bicubic"


def test_attentive_probe_imagenet_has_v_jepas_values():
    cfg = resolve("attentive_probe_imagenet")
    assert (cfg.model.head, cfg.model.freeze_encoder) == ("attentive", True)
    assert cfg.optimization.max_epoch == 20 and cfg.optimization.max_update == 20 * 1252
    assert cfg.task.global_batch_size == 1024 and cfg.optimization.clip_norm == 1.0  # clip_grad_norm_(..., 1.0)
    for group, wd, final in zip(groups(cfg), (0.001, 0.0), (1e-6, None)):  # no decay on biases and 1-D parameters
        assert group.lr_float == 0.001 and group.optimizer._name == "fused_adamw"
        assert list(group.optimizer.adam_betas) == [0.9, 0.999] and group.optimizer.adam_eps == 1e-8
        assert group.optimizer.weight_decay == wd and group.optimizer.get("final_weight_decay") == final
        assert group.lr_scheduler._name == "cosine" and group.lr_scheduler.warmup_updates == 0
    assert cfg.task.auto_augment == "original" and cfg.task.random_erasing == 0.25
    c = cfg.criterion
    assert (c.mixup_alpha, c.cutmix_alpha, c.label_smoothing) == (0.0, 0.0, 0.0)
    assert cfg.task.eval_crop_ratio == 0.875 and cfg.common.fp16 is True
    # the query is a weight V-JEPA decays (its (1, 1, D) query is not 1-D); the head's norm and biases are not
    from conftest import tiny_encoder
    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier

    model = Data2Vec2ImageClassifier(Data2Vec2ClassifierConfig(num_classes=3, head="attentive", freeze_encoder=True),
                                     tiny_encoder())
    rules = model.param_group_rules()
    assert {n for n, (g, _) in rules.items() if g == "default"} == {"attn_pool.query", "attn_pool.kv.weight",
                                                                   "head.weight"}


def v_jepa_weight_decays(ref_wd, final_wd, t_max, steps):
    """V-JEPA's CosineWDSchedule (src/utils/schedulers.py) written out: the decay in force at each step."""
    out = []
    for step in range(1, steps + 1):
        new = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * step / t_max))
        out.append(max(final_wd, new) if final_wd <= ref_wd else min(final_wd, new))
    return out


def test_fused_adamws_final_weight_decay_follows_v_jepas_cosine_schedule_and_resumes_on_it():
    """With zero gradients AdamW's update is the decoupled decay alone: p <- p (1 - lr wd_t) at every step."""
    from d2v_plugin.optim.fused_adamw import FairseqEpsAdamW

    t_max, lr = 10, 0.5
    decays = v_jepa_weight_decays(0.1, 1e-3, t_max, t_max)
    assert abs(decays[-1] - 1e-3) < 1e-12 and decays[0] < 0.1
    p = torch.nn.Parameter(torch.ones(3, 2))
    none = torch.nn.Parameter(torch.ones(2))
    opt = FairseqEpsAdamW([{"params": [p], "weight_decay": 0.1}, {"params": [none], "weight_decay": 0.0}], lr=lr,
                          final_weight_decay=1e-3, decay_steps=t_max)
    for step in range(t_max):
        if step == 6:  # a resume: a new optimizer from the saved state continues the schedule
            state = opt.state_dict()
            opt = FairseqEpsAdamW([{"params": [p], "weight_decay": 0.1}, {"params": [none], "weight_decay": 0.0}],
                                  lr=lr, final_weight_decay=1e-3, decay_steps=t_max)
            opt.load_state_dict(state)
        p.grad, none.grad = torch.zeros_like(p), torch.zeros_like(none)
        opt.step()
    expected = math.prod(1 - lr * wd for wd in decays)
    assert torch.allclose(p.detach(), torch.full((3, 2), expected), rtol=1e-5)
    assert torch.equal(none.detach(), torch.ones(2))  # the no-decay group: 0 throughout, as V-JEPA's WD_exclude
    assert abs(expected - (1 - lr * 0.1) ** t_max) > 0.05  # (a constant decay would be far off)


@pytest.mark.parametrize("name,world,batch,update_freq,expected", [
    ("linear_probe_imagenet", 8, 256, 8, 79), ("linear_probe_imagenet", 16, 256, 4, 79),
    ("linear_probe_imagenet", 1, 256, 64, 79), ("attentive_probe_imagenet", 8, 128, 1, 1252),
    ("attentive_probe_imagenet", 4, 128, 2, 1252)])
def test_updates_per_epoch_of_the_probe_recipes_from_fairseqs_own_batching(name, world, batch, update_freq, expected):
    from fairseq.data.iterators import GroupedIterator

    task, cfg = imagenet_sized_task(), resolve(name)
    assert batch * world * update_freq == cfg.task.global_batch_size
    counts = set()
    for rank in (0, world - 1):
        itr = task.get_batch_iterator(task.datasets["train"], max_sentences=batch, seed=1, num_shards=world,
                                      shard_id=rank, required_batch_size_multiple=1, disable_iterator_cache=True)
        counts.add(len(GroupedIterator(itr.next_epoch_itr(shuffle=True), update_freq)))
    assert counts == {expected} and cfg.optimization.max_update == cfg.optimization.max_epoch * expected


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_keep_relative_paths_working(name):
    cfg = resolve(name)
    assert cfg.common.user_dir == "d2v_plugin"
    with open(os.path.join(CONFIG_DIR, f"{name}.yaml")) as f:
        assert "chdir: false" in f.read()


def test_bf16_is_one_override_of_the_table_1_recipe():
    fp16 = resolve("distilled_imagenet")
    bf16 = resolve("distilled_imagenet", "common.fp16=false", "common.bf16=true")
    assert bf16.common.bf16 is True and bf16.common.fp16 is False
    for section in ("task", "model", "criterion", "optimization", "optimizer", "dataset", "checkpoint"):
        assert OmegaConf.to_container(bf16[section]) == OmegaConf.to_container(fp16[section]), section


@pytest.mark.parametrize("name", RECIPES)
def test_every_setting_is_in_the_recipe_so_a_plain_override_works(name):
    # hydra refuses `task.x=...` for a key the recipe's section lacks (it would need `+task.x=...`):
    # every setting of the plugin's task, model and criterion is listed, bar the interpolated ones
    import dataclasses

    import yaml
    from d2v_plugin.criterions.mixup_cross_entropy import MixupCrossEntropyConfig
    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig
    from d2v_plugin.tasks.image_folder_classification import ImageFolderClassificationConfig

    with open(os.path.join(CONFIG_DIR, f"{name}.yaml")) as f:
        recipe = yaml.safe_load(f)
    for section, schema in (("task", ImageFolderClassificationConfig), ("model", Data2Vec2ClassifierConfig),
                            ("criterion", MixupCrossEntropyConfig)):
        settings = {f.name for f in dataclasses.fields(schema)
                    if f.name != "_name" and not str(f.default).startswith("${")}
        assert settings <= set(recipe[section]), (section, settings - set(recipe[section]))
    cfg = resolve(name, "task.fast_decode=true", "model.compile_encoder=true", "model.trust_checkpoint=true",
                  "criterion.cutmix_minmax=[0.2,0.8]")
    assert cfg.task.fast_decode and cfg.model.compile_encoder and cfg.model.trust_checkpoint
    assert list(cfg.criterion.cutmix_minmax) == [0.2, 0.8]


# --- the global batch and the updates per epoch, as fairseq computes them -------------------------

IMAGENET_TRAIN = 1_281_167


@pytest.mark.parametrize("name,target", [("distilled_imagenet", 256), ("d2v2_base_imagenet", 512)])
def test_recipe_trains_at_its_global_batch_on_any_number_of_gpus_or_refuses(name, target):
    from d2v_plugin.training import ConfigError, resolve_update_freq

    import copy

    outcomes, recipe = {}, resolve(name)  # the recipe resolved once; each layout set on a copy of it
    for world in (1, 2, 3, 4, 6, 8, 16):
        for batch in (16, 24, 32, 48, 64):
            cfg = copy.deepcopy(recipe)
            cfg.distributed_training.distributed_world_size, cfg.dataset.batch_size = world, batch
            try:
                resolve_update_freq(cfg.task.global_batch_size, cfg)
            except ConfigError as err:
                assert f"task.global_batch_size={target} is not reachable" in str(err)
                outcomes[world, batch] = None
                continue
            assert len(cfg.optimization.update_freq) == 1
            outcomes[world, batch] = cfg.optimization.update_freq[0]
            assert batch * world * cfg.optimization.update_freq[0] == target  # never anything else
    # the documented layouts start, with update_freq set for the GPUs at hand
    assert outcomes[8, 32] == target // 256 and outcomes[4, 64] == target // 256 and outcomes[1, 64] == target // 64
    assert outcomes[4, 32] == target // 128
    assert outcomes[3, 32] is None and outcomes[8, 24] is None


def test_an_unreachable_global_batch_names_a_batch_size_that_reaches_it():
    from d2v_plugin.training import ConfigError, resolve_update_freq

    cfg = resolve("distilled_imagenet", "distributed_training.distributed_world_size=8", "dataset.batch_size=24")
    with pytest.raises(ConfigError, match=r"dataset.batch_size=24 x 8 ranks x optimization.update_freq=1 = 192.*"
                                          r"set dataset.batch_size=16 \(update_freq follows\)"):
        resolve_update_freq(256, cfg)
    cfg = resolve("distilled_imagenet", "distributed_training.distributed_world_size=3")
    with pytest.raises(ConfigError, match="cannot be split over 3 ranks"):
        resolve_update_freq(256, cfg)


def imagenet_sized_task():
    """The task with a training split of ImageNet's size (an index only: batching never reads a file)."""
    import numpy as np
    from d2v_plugin.data import ImageFolderDataset
    from d2v_plugin.data.index import FolderIndex
    from d2v_plugin.data.transforms import RandomResizedCropFlip
    from d2v_plugin.tasks.image_folder_classification import (ImageFolderClassificationConfig,
                                                               ImageFolderClassificationTask)

    index = FolderIndex("/nowhere/train", ["c"], range(IMAGENET_TRAIN), np.zeros(IMAGENET_TRAIN, np.int64), [])
    task = ImageFolderClassificationTask(ImageFolderClassificationConfig(data="/nowhere", seed=1), ["c"])
    task.datasets["train"] = ImageFolderDataset(index, RandomResizedCropFlip(), seed=1)
    return task


@pytest.mark.parametrize("world,batch,update_freq", [(8, 32, 1), (4, 64, 1), (1, 64, 4), (4, 32, 2)])
def test_updates_per_epoch_of_the_distilled_recipe_from_fairseqs_own_batching(world, batch, update_freq):
    from fairseq.data.iterators import GroupedIterator

    task, cfg = imagenet_sized_task(), resolve("distilled_imagenet")
    updates = set()
    for rank in (0, world - 1):  # fairseq pads the short last round: every rank makes as many updates
        itr = task.get_batch_iterator(task.datasets["train"], max_sentences=batch, seed=1, num_shards=world,
                                      shard_id=rank, required_batch_size_multiple=2, disable_iterator_cache=True)
        updates.add(len(GroupedIterator(itr.next_epoch_itr(shuffle=True), update_freq)))
    assert updates == {5005}  # not 1,281,167 // 256 = 5,004: the last, short batch is trained on
    assert cfg.optimization.max_update == 15 * 5005 and cfg.optimization.max_epoch == 15


def test_the_distilled_recipes_cosine_schedule_ends_with_epoch_15():
    from fairseq.optim import FairseqOptimizer
    from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRSchedule, CosineLRScheduleConfig

    class Optimizer(FairseqOptimizer):  # what a fairseq lr scheduler needs of its optimizer
        lr = None

        def __init__(self):
            pass

        def set_lr(self, lr):
            self.lr = lr

        def get_lr(self):
            return self.lr

    cfg = resolve("distilled_imagenet")
    group = cfg.optimizer.groups.default
    sched_cfg = CosineLRScheduleConfig(warmup_updates=group.lr_scheduler.warmup_updates, lr=[group.lr_float],
                                       max_update=cfg.optimization.max_update)  # the composite's II("optimization.max_update")
    schedule = CosineLRSchedule(sched_cfg, Optimizer())
    lrs = {n: schedule.step_update(n) for n in (5000, 14 * 5005, 15 * 5005 - 1)}
    assert lrs[5000] == pytest.approx(1e-3)  # peak after warmup
    assert lrs[14 * 5005] > 1e-5  # epoch 15 still trains at a real lr
    assert lrs[15 * 5005 - 1] < 1e-9  # the last update of epoch 15 is the end of the period


# --- d2v2_base_imagenet trains as data2vec's own run did -----------------------------------------

def applied_lr_and_weight_decay(optimizer, model) -> dict:
    """name -> (lr, weight decay) that fairseq's composite optimizer really applies to the parameter.
    (Read right after building it: fairseq keeps ``optimizers`` in a dict shared by all instances.)"""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group, cfg in optimizer.optimizers_config.items():
        for param_group in optimizer.optimizers[group].param_groups:
            for p in param_group["params"]:
                out[names[id(p)]] = (cfg.lr[0], cfg.weight_decay)
    return out


def test_d2v2_base_recipe_applies_data2vecs_lr_scales_weight_decay_and_drop_path(tmp_path):
    from fairseq.optim import build_optimizer
    from d2v_plugin.testing.reference import build_data2vec_model, data2vec, reference_classifier, save_like_fairseq

    from d2v_plugin.models.checkpoints import to_data2vec_names
    from d2v_plugin.models.classifier import Data2Vec2ImageClassifier

    # data2vec's model and fairseq's optimizer from data2vec's own fine-tuning recipe
    d2v, d2v_cfg = build_data2vec_model(embed_dim=32, num_heads=2, depth=10, prenet_depth=2, image_size=16,
                                        patch_size=8)
    save_like_fairseq(d2v, d2v_cfg, tmp_path / "base.pt")
    theirs = reference_classifier(d2v, num_classes=10, drop_path_rate=0.1)
    assert type(theirs).__name__ == "MaeImageClassificationModel"
    recipe = OmegaConf.load(os.path.join(os.path.dirname(data2vec().d2v2.__file__), "..", "config", "vision",
                                         "finetuning", "mae_imagenet_clean.yaml"))
    cfg = resolve("d2v2_base_imagenet", f"model.pretrained_checkpoint={tmp_path / 'base.pt'}", "model.num_classes=10",
                  "task.image_size=16")
    their_root = OmegaConf.create(OmegaConf.to_container(cfg))  # fairseq's other groups, data2vec's optimizer
    their_root.optimizer = recipe.optimizer
    their_root.optimization.max_update = recipe.optimization.max_update
    their_opt = build_optimizer(their_root.optimizer, [p for p in theirs.parameters() if p.requires_grad])
    applied_theirs = applied_lr_and_weight_decay(their_opt, theirs)

    # ours from d2v2_base_imagenet, starting from the same checkpoint
    ours = Data2Vec2ImageClassifier.build_model(cfg.model)
    our_opt = build_optimizer(cfg.optimizer, [p for p in ours.parameters() if p.requires_grad])

    to_theirs = {f"encoder.{k}": f"model.{v}" for k, v in zip(
        ours.encoder.state_dict(), to_data2vec_names(dict.fromkeys(ours.encoder.state_dict()), prenet_depth=2))}
    applied_ours = applied_lr_and_weight_decay(our_opt, ours)
    assert set(applied_theirs) == {to_theirs.get(n, n) for n in applied_ours}
    for name, value in applied_ours.items():
        assert applied_theirs[to_theirs.get(name, name)] == value, name
    # norms, biases and CLS decayed as in data2vec's run; the deepest block at the full lr, the first at 0.65^12
    assert applied_ours["encoder.blocks.0.norm1.bias"][1] == 0.05 and applied_ours["encoder.cls_token"][1] == 0.05
    assert applied_ours["encoder.blocks.11.attn.qkv.weight"][0] == pytest.approx(1e-3 * 0.65)
    assert applied_ours["encoder.blocks.0.attn.qkv.weight"][0] == pytest.approx(1e-3 * 0.65 ** 12)

    def rates(blocks):
        return [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]

    their_blocks = [*theirs.model.modality_encoders["IMAGE"].context_encoder.blocks, *theirs.model.blocks]
    assert rates(ours.encoder.blocks) == rates(their_blocks)  # per block, exactly
    assert rates(their_blocks)[:3] == pytest.approx([0.0, 0.1 / 9, 0.2 / 9])


@pytest.mark.parametrize("world,update_freq", [(1, 8), (8, 1)])
def test_cli_recipe_prints_what_a_run_will_really_use(capsys, world, update_freq):
    """fairseq-hydra-train --cfg job shows update_freq: [1] where a run on one GPU sets 8."""
    import yaml

    from d2v_plugin.cli import recipe

    assert recipe.main(["distilled_imagenet", "task.data=/data/imagenet", "--world-size", str(world)]) == 0
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("#")]
    assert f"global batch 256 = dataset.batch_size 32 x {world} ranks x optimization.update_freq {update_freq}" in out
    assert any("precision: fp16" in line for line in header)
    cfg = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    assert cfg["optimization"]["update_freq"] == [update_freq] and cfg["task"]["data"] == "/data/imagenet"
    assert cfg["distributed_training"]["distributed_world_size"] == world and cfg["model"]["pretrained_checkpoint"] == "???"
