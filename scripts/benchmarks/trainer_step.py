"""The training step users get: fairseq's ``Trainer.train_step`` built from a recipe exactly as
fairseq-hydra-train builds it (model in the recipe's precision, FP16 optimizer, composite optimizer with
the recipe's per-group optimizer, clipping), ours against data2vec's own ``mae_image_classification``
through the same Trainer from data2vec's own recipe, on the same weights. Shared by `make bench` (CPU,
fp32) and scripts/bench_gpu.py (fp16/bf16)."""
import os
import statistics
import tempfile
import time

import torch

from d2v_plugin.testing.recipes import resolve

DATA2VEC_RECIPES = os.path.join("examples", "data2vec", "config", "vision", "finetuning")


def data2vec_checkpoint(work: str, depth: int, width: int = 768, heads: int = 12, image_size: int = 224,
                        patch: int = 16) -> str:
    """A data2vec 2.0 checkpoint of ``depth`` blocks in the released layout (no prenet blocks; data2vec's
    fine-tuning model cannot be built with as few main blocks as prenet blocks), random weights."""
    from d2v_plugin.testing import reference

    torch.manual_seed(0)
    model, cfg = reference.build_data2vec_model(embed_dim=width, num_heads=heads, depth=depth, prenet_depth=0,
                                                image_size=image_size, patch_size=patch)
    path = os.path.join(work, f"d2v_{depth}x{width}.pt")
    reference.save_like_fairseq(model, cfg, path)
    return path


def staged(sample: dict, device: str) -> dict:
    """A batch already on the training device, as both contenders' batches are before their timed
    updates: the host-to-device copy (38 MB of uint8 for ours at batch 256 and 224 px, 154 MB of
    float32 for data2vec's) is not part of the step measured (bench_gpu.py times it on its own)."""
    from d2v_plugin.data.device_batch import to_device

    return to_device(sample, torch.device(device))


def precision_overrides(precision: str, device: str) -> list:
    return [f"common.fp16={precision == 'fp16'}", f"common.bf16={precision == 'bf16'}",
            f"common.cpu={device == 'cpu'}", "common.fp16_no_flatten_grads=true"]


def build_ours(checkpoint: str, batch: int, precision: str, device: str, optimizer: str | None = None,
               image_size: int = 224, recipe: str = "distilled_imagenet"):
    """(trainer, sample) for the plugin: the recipe's task, model, criterion and optimizer (``optimizer``:
    another per-group optimizer for a composite recipe)."""
    import fairseq.trainer
    from d2v_plugin.tasks.image_folder_classification import ImageFolderClassificationTask

    choice = [f"optimizer.groups.default.optimizer._name={optimizer}"] if optimizer else []
    cfg = resolve(recipe, f"model.pretrained_checkpoint={checkpoint}", f"dataset.batch_size={batch}",
                  "distributed_training.distributed_world_size=1", "task.global_batch_size=null",
                  f"task.image_size={image_size}", *choice, *precision_overrides(precision, device))
    task = ImageFolderClassificationTask(cfg.task, [f"class_{i}" for i in range(cfg.model.num_classes)])
    model = task.build_model(cfg.model)
    trainer = fairseq.trainer.Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    g = torch.Generator().manual_seed(0)
    sample = {"id": torch.arange(batch), "target": torch.randint(0, cfg.model.num_classes, (batch,), generator=g),
              "net_input": {"images": torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                                                    generator=g)},
              "nsentences": batch, "ntokens": batch, "bad_images": 0}
    return trainer, staged(sample, device)


def build_data2vec(checkpoint: str, batch: int, precision: str, device: str, image_size: int = 224):
    """(trainer, sample) for data2vec's own path: its task, model and criterion from its recipe
    (mae_imagenet_clean.yaml), its Mixup inside the model, normalised float batches as its loader gives."""
    import fairseq
    import fairseq.trainer
    from fairseq import tasks
    from d2v_plugin.testing import reference

    reference.data2vec()  # registers mae_image_classification (task, model)
    recipes = os.path.join(os.path.dirname(fairseq.__file__), DATA2VEC_RECIPES)
    cfg = resolve("mae_imagenet_clean", f"dataset.batch_size={batch}", "distributed_training.distributed_world_size=1",
                  *precision_overrides(precision, device), config_dir=recipes,
                  placeholders=["task.data=/unused", f"model.model_path={checkpoint}"])
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    trainer = fairseq.trainer.Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    g = torch.Generator().manual_seed(0)
    sample = {"id": torch.arange(batch), "net_input": {
        "imgs": torch.randn(batch, 3, image_size, image_size, generator=g),
        "labels": torch.randint(0, 1000, (batch,), generator=g)}}
    return trainer, staged(sample, device)


def time_updates(trainer, sample, steps: int, warmup: int = 1) -> dict:
    """Updates/s of ``trainer.train_step([sample])`` and the share of each update its optimizer step
    takes (timed around ``optimizer.step``, the device synchronised on both sides)."""
    cuda = torch.cuda.is_available() and not trainer.cfg.common.cpu
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    optimizer = trainer.optimizer
    inner_step, optimizer_times = optimizer.step, []

    def timed_step(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = inner_step(*args, **kwargs)
        sync()
        optimizer_times.append(time.perf_counter() - start)
        return out

    optimizer.step = timed_step
    update_times = []
    try:
        for i in range(warmup + steps):
            sync()
            start = time.perf_counter()
            trainer.train_step([dict(sample, net_input=dict(sample["net_input"]))])
            sync()
            if i >= warmup:
                update_times.append(time.perf_counter() - start)
    finally:
        optimizer.step = inner_step
    update = statistics.median(update_times)
    opt = statistics.median(optimizer_times[-steps:]) if optimizer_times else 0.0
    return {"updates_per_s": 1.0 / update, "optimizer_share": opt / update, "optimizer_s": opt}


def compare(depth: int, batch: int, precision: str, device: str, steps: int, width: int = 768, heads: int = 12,
            image_size: int = 224, work: str | None = None) -> dict:
    """Ours and data2vec's, interleaved step by step, from the same checkpoint."""
    work = work or tempfile.mkdtemp(prefix="bench_trainer_")
    checkpoint = data2vec_checkpoint(work, depth, width, heads, image_size, patch=16 if image_size >= 64 else 8)
    recipe = "distilled_imagenet" if depth < 12 else "d2v2_base_imagenet"
    built = {"ours": build_ours(checkpoint, batch, precision, device, image_size=image_size, recipe=recipe),
             "data2vec": build_data2vec(checkpoint, batch, precision, device, image_size=image_size)}
    return {name: time_updates(trainer, sample, steps) for name, (trainer, sample) in built.items()}


PROBE_RECIPES = ("distilled_imagenet", "linear_probe_imagenet", "attentive_probe_imagenet")


def probe_steps(batch: int, steps: int, device: str = "cpu", precision: str = "fp32", depth: int = 4,
                rounds: int | None = None, **sizes) -> dict:
    """Updates/s of each probe recipe's Trainer step against the fine-tuning recipe's, the same model
    (a depth-``depth`` encoder) and batch, interleaved: what a frozen encoder saves."""
    from benchmarks.common import RUNS, rotated, summary

    work = tempfile.mkdtemp(prefix="bench_probe_")
    width, heads, size = sizes.get("width", 768), sizes.get("heads", 12), sizes.get("image_size", 224)
    checkpoint = data2vec_checkpoint(work, depth, width, heads, size, patch=16 if size >= 64 else 8)
    built = {recipe: build_ours(checkpoint, batch, precision, device, image_size=size, recipe=recipe)
             for recipe in PROBE_RECIPES}
    per = {name: [] for name in built}
    for r in range(rounds or RUNS):
        for name in rotated(built, r):
            per[name].append(time_updates(*built[name], steps=steps)["updates_per_s"])
            print(f"  probe step {name}: {per[name][-1]:.3f} updates/s", flush=True)
    return {"batch": batch, "depth": depth, "results": {name: summary(v) for name, v in per.items()}}


def run(batch: int = 8, steps: int = 3) -> dict:
    """`make bench` on the CPU: fp32, base width, depth 4 (the distilled recipe) and 12 (data2vec's)."""
    from benchmarks.common import RUNS, rotated, summary

    out = {}
    for depth in (4, 12):
        work = tempfile.mkdtemp(prefix="bench_trainer_")
        checkpoint = data2vec_checkpoint(work, depth)
        recipe = "distilled_imagenet" if depth < 12 else "d2v2_base_imagenet"
        built = {"ours": build_ours(checkpoint, batch, "fp32", "cpu", recipe=recipe),
                 "data2vec": build_data2vec(checkpoint, batch, "fp32", "cpu")}
        per = {name: [] for name in built}
        for r in range(RUNS):
            for name in rotated(built, r):
                per[name].append(time_updates(*built[name], steps=steps))
                print(f"  trainer step depth {depth} {name}: {per[name][-1]}", flush=True)
        out[depth] = {name: {k: summary([m[k] for m in ms]) for k in ("updates_per_s", "optimizer_share")}
                      for name, ms in per.items()}
    return {"batch": batch, "results": out}


def report(results: dict) -> list:
    from benchmarks.common import fmt

    t = results["trainer_step"]
    lines = ["## Trainer step (CPU, fp32): the step fairseq-hydra-train runs", "",
             f"fairseq's `Trainer.train_step` built as fairseq-hydra-train builds it, batch {t['batch']}, 224 px, "
             "base width, the same data2vec 2.0-format weights (no prenet blocks, the released layout): ours "
             "from `distilled_imagenet.yaml` (depth 4) and `d2v2_base_imagenet.yaml` (depth 12), each group's "
             "optimizer `fused_adamw`; data2vec's `mae_image_classification` from its own `mae_imagenet_clean.yaml` "
             "(fairseq's `adam`, its Mixup inside the model). Both contenders' batches are staged alike: "
             "in memory on the training device before the timed updates (ours uint8 pixels, data2vec's "
             "normalised float32, as each one's loader gives them), so no host-to-device copy is timed. "
             "Updates/s, and the share of each update the optimizer step takes.", "",
             "| depth | data2vec updates/s | ours updates/s | ours / data2vec | data2vec optimizer share | "
             "ours optimizer share |", "|---|---|---|---|---|---|"]
    for depth, r in t["results"].items():
        ratio = r["ours"]["updates_per_s"]["median"] / r["data2vec"]["updates_per_s"]["median"]
        lines.append(f"| {depth} | {fmt(r['data2vec']['updates_per_s'], digits=3)} | "
                     f"{fmt(r['ours']['updates_per_s'], digits=3)} | {ratio:.2f} | "
                     f"{fmt(r['data2vec']['optimizer_share'], digits=3)} | {fmt(r['ours']['optimizer_share'], digits=3)} |")
    lines.append("")
    return lines
