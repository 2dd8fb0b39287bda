"""Start-up decisions about the run as a whole, read from fairseq's config: precision versus the device,
the global batch, and which checkpoint fairseq is about to restore.

The task calls these from ``setup_task`` / ``build_model``; they take fairseq's own config groups
(``common``, ``dataset``, ``checkpoint``, ...) so they can be tested without a run.
"""
from __future__ import annotations

import logging
import os
from dataclasses import fields, is_dataclass, replace

import torch
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

RUN_GROUPS = ("common", "dataset", "optimization", "checkpoint", "distributed_training")


class ConfigError(ValueError):
    """Settings that do not work together; the message names them and the fix."""


def run_config(task_cfg) -> DictConfig | None:
    """The whole fairseq config a task config belongs to, or None (a task config built on its own).

    fairseq hands the task its ``task`` group only, merged with the task's dataclass; the merge keeps
    the link to the full config (``merge_with_parent``), which is also how ``II(...)`` fields resolve."""
    if not OmegaConf.is_config(task_cfg):
        return None
    parent = task_cfg._get_parent()
    if isinstance(parent, DictConfig) and all(group in parent for group in RUN_GROUPS):
        return parent
    return None


def check_precision(common) -> None:
    """fp16/bf16 need a GPU: without one fairseq would train the half-precision model on the CPU."""
    half = [name for name in ("fp16", "bf16", "memory_efficient_fp16", "memory_efficient_bf16")
            if getattr(common, name, False)]
    if half and not common.cpu and not torch.cuda.is_available():
        raise ConfigError(
            f"common.{half[0]}=true but no CUDA device is available (half precision is for GPUs; check "
            f"CUDA_VISIBLE_DEVICES on a GPU node): to train on the CPU set common.cpu=true "
            f"(and common.{half[0]}=false for fp32)")
    if common.cpu and common.fp16 and not common.fp16_no_flatten_grads:
        raise ConfigError("common.fp16=true with common.cpu=true needs common.fp16_no_flatten_grads=true "
                          "(fairseq builds its flat fp32 copy of the weights on a CUDA device)")


# optimizers whose update treats each tensor as a whole (a norm per parameter): a flat fp32 copy of every
# weight (fairseq's half-precision default) is one 1-D tensor to them
PER_TENSOR_OPTIMIZERS = ("lars",)


def _optimizer_names(optimizer) -> list[str]:
    names = [optimizer.get("_name")]
    for group in (optimizer.get("groups") or {}).values():  # composite: one optimizer per group
        names.append((group.get("optimizer") or {}).get("_name"))
    return [n for n in names if n]


def check_flat_params(run) -> None:
    """LARS scales each weight matrix's update by the ratio of its norms and leaves 1-D tensors alone; under
    fp16/bf16 with flattened gradients fairseq hands it one flat 1-D tensor, so no update is scaled (one
    step at the linear probe's lr 6.4 moved the weights 100x too far)."""
    common = run.common
    half = [n for n in ("fp16", "bf16") if getattr(common, n, False)]
    per_tensor = [n for n in _optimizer_names(run.optimizer) if n in PER_TENSOR_OPTIMIZERS]
    if half and per_tensor and not common.fp16_no_flatten_grads:
        raise ConfigError(f"optimizer {per_tensor[0]} with common.{half[0]}=true needs "
                          f"common.fp16_no_flatten_grads=true: it scales each weight matrix's update by its own "
                          f"norms, and fairseq's flattened gradients are one 1-D tensor to it (no update would be "
                          f"scaled)")


def _smaller_batch(global_batch: int, world: int, batch: int) -> int | None:
    """The largest per-GPU batch <= ``batch`` that reaches ``global_batch`` on ``world`` ranks with a
    whole update_freq (even, for mixup's pairs, when one exists)."""
    if global_batch % world:
        return None
    per_rank = global_batch // world
    divisors = [b for b in range(min(batch, per_rank), 0, -1) if per_rank % b == 0]
    even = [b for b in divisors if b % 2 == 0]
    return (even or divisors or [None])[0]


def resolve_update_freq(global_batch: int | None, run) -> int:
    """Make ``dataset.batch_size x world size x optimization.update_freq`` equal the recipe's global
    batch: set update_freq when that divides out, else stop naming the three and the fix. Logs the
    global batch either way and returns it."""
    batch = run.dataset.batch_size
    world = int(run.distributed_training.distributed_world_size)
    freq = list(run.optimization.update_freq)
    if global_batch is None or batch is None:
        if global_batch is not None:
            raise ConfigError(f"task.global_batch_size={global_batch} needs dataset.batch_size (images per GPU)")
        if batch is not None:
            logger.info(f"global batch {batch * world * freq[0]} = dataset.batch_size {batch} x {world} ranks x "
                        f"optimization.update_freq {freq[0]} (task.global_batch_size not set: not checked)")
        return batch * world * freq[0] if batch is not None else 0
    if len(set(freq)) > 1:
        raise ConfigError(f"optimization.update_freq={freq} changes per epoch, which task.global_batch_size="
                          f"{global_batch} cannot hold: give one value or set task.global_batch_size=null")
    per_update = batch * world
    if per_update * freq[0] != global_batch:
        if global_batch % per_update:
            better = _smaller_batch(global_batch, world, batch)
            fix = (f"set dataset.batch_size={better} (update_freq follows)" if better
                   else f"it cannot be split over {world} ranks")
            raise ConfigError(
                f"task.global_batch_size={global_batch} is not reachable: dataset.batch_size={batch} x {world} "
                f"ranks x optimization.update_freq={freq[0]} = {per_update * freq[0]}, and {per_update} does not "
                f"divide {global_batch}: {fix}, or set task.global_batch_size=null to train at another global batch")
        new = global_batch // per_update
        logger.info(f"optimization.update_freq set to [{new}] (was {freq}) to keep task.global_batch_size="
                    f"{global_batch} on {world} ranks")
        run.optimization.update_freq = [new]
        freq = [new]
    logger.info(f"global batch {global_batch} = dataset.batch_size {batch} x {world} ranks x "
                f"optimization.update_freq {freq[0]}")
    return global_batch


def checkpoint_fairseq_restores(checkpoint) -> str | None:
    """The file fairseq's ``checkpoint_utils.load_checkpoint`` will load over the freshly built model
    (the same decision, from the ``checkpoint`` group), or None when training starts from the model
    as built. Sharded checkpoints (a checkpoint suffix) are not looked for."""
    restore = checkpoint.restore_file
    if restore == "checkpoint_last.pt":
        last = os.path.join(checkpoint.save_dir, restore)
        if os.path.isfile(last):
            return last
        for first_launch in (getattr(checkpoint, "continue_once", None), checkpoint.finetune_from_model):
            if first_launch is not None:
                return first_launch if os.path.isfile(first_launch) else None
        return None
    return restore if os.path.isfile(restore) else None


def _with(cfg, **values):
    if OmegaConf.is_config(cfg):
        return OmegaConf.merge(cfg, values)  # a detached copy: the run's own config stays as the user set it
    if is_dataclass(cfg):
        return replace(cfg, **{k: v for k, v in values.items() if k in {f.name for f in fields(cfg)}})
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def build_config_for_resume(cfg, checkpoint_path: str | None, saved: dict | None = None):
    """A copy of the model config that builds the architecture a fine-tuned checkpoint recorded,
    without reading ``pretrained_checkpoint`` (fairseq loads the checkpoint's weights next).

    ``checkpoint_path=None``: ``cfg`` itself is a saved config (fairseq rebuilding a saved model).
    ``saved``: the checkpoint already read (else it is read here). Settings given explicitly that
    differ from the checkpoint's are an error naming the folder."""
    from d2v_plugin.models.checkpoints import CheckpointError, PluginTrained, load_file
    from d2v_plugin.models.classifier import MODEL_NAME, RESOLVED_FIELDS

    if checkpoint_path is None:
        if any(getattr(cfg, k, None) is None for k in RESOLVED_FIELDS if k != "prenet_depth"):
            return cfg  # not a config this plugin recorded: build it as given
        return _with(cfg, pretrained_checkpoint=None)
    saved = load_file(checkpoint_path, mmap=True) if saved is None else saved
    reader = PluginTrained()
    if not reader.detect(saved):
        model = (saved.get("cfg") or {}).get("model") if isinstance(saved.get("cfg"), dict) else None
        name = model.get("_name") if isinstance(model, dict) else None
        raise CheckpointError(
            f"{checkpoint_path} is not a {MODEL_NAME} run (model {name!r}): fairseq would resume from it; "
            f"train into another checkpoint.save_dir")
    # the architecture as the file's tensors have it (bounded, checked against its config below)
    arch = reader.read(saved, checkpoint_path, None, None).architecture
    model = saved["cfg"]["model"]
    recorded = {k: getattr(arch, k) for k in RESOLVED_FIELDS}
    claimed = [f"model.{k}={model.get(k)} in its config, {v} in its weights" for k, v in recorded.items()
               if model.get(k) is not None and model.get(k) != v]
    if claimed:
        raise CheckpointError(f"{checkpoint_path}: its config and its weights disagree ({'; '.join(claimed)})")
    wrong = [f"model.{k}={getattr(cfg, k)} here, {model.get(k)} there"
             for k in (*RESOLVED_FIELDS, "num_classes", "pooling")
             if getattr(cfg, k, None) is not None and model.get(k) is not None and getattr(cfg, k) != model.get(k)]
    if wrong:
        raise CheckpointError(
            f"{checkpoint_path} holds a run of another model ({'; '.join(wrong)}), and fairseq resumes from it: "
            f"train into another checkpoint.save_dir, or move that run away")
    return _with(cfg, pretrained_checkpoint=None, **recorded)


def check_workers(dataset, available: int) -> None:
    """One warning when ``dataset.num_workers`` asks for more data-loading processes per rank than this
    rank has cores (the recipes' 10 on a small machine); torch's own warning, which it gives once per
    loader (train and valid), is then not repeated."""
    import warnings

    if dataset.num_workers <= available:
        return
    logger.warning(f"dataset.num_workers={dataset.num_workers} data-loading processes per loader, on {available} "
                   f"cores for this rank: they share the cores (set dataset.num_workers={available} here; the "
                   f"recipes' value is for GPU nodes)")
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)


class UpdatePace:
    """The training's measured pace, said once at start-up: after ``measure`` updates (the first, which
    warms up the loaders and kernels, not counted) the rate, when the first progress line comes
    (``common.log_interval``) and how long the run's remaining updates take at that rate.

    ``seen(update_num)`` is called with each micro-batch's update number (the task's train_step)."""

    def __init__(self, log_interval: int, max_update: int, updates_per_epoch: int | None, max_epoch: int,
                 measure: int = 2, clock=None):
        import time

        self.log_interval, self.max_update, self.measure = log_interval, max_update, measure
        self.updates_per_epoch, self.max_epoch = updates_per_epoch, max_epoch
        self.clock = clock or time.perf_counter
        self.first = self.start = None  # the update numbers at which it started and started measuring
        self.started_at = None
        self.said = None  # the message, once said

    def seen(self, update_num: int) -> None:
        if self.said is not None:
            return
        if self.first is None:
            self.first = update_num
            if self.log_interval > 1:
                logger.info(f"a progress line every common.log_interval={self.log_interval} updates; the pace "
                            f"is measured over updates {update_num + 2}-{update_num + 1 + self.measure}")
            return
        if self.start is None:
            if update_num > self.first:  # the first update has ended: measure from here
                self.start, self.started_at = update_num, self.clock()
            return
        done = update_num - self.start
        if done >= self.measure:
            self.said = self.message(done / max(self.clock() - self.started_at, 1e-9), update_num)
            logger.info(self.said)

    def end(self) -> int | None:
        """The update the run stops at (max_update, or max_epoch epochs), if one is set."""
        ends = [self.max_update] if self.max_update else []
        if self.max_epoch and self.updates_per_epoch:
            ends.append(self.max_epoch * self.updates_per_epoch)
        return min(ends) if ends else None

    def message(self, rate: float, at: int) -> str:
        text = f"training at {_rate(rate)} (measured over updates {self.start + 1}-{at})"
        end = self.end()
        next_log = (at // self.log_interval + 1) * self.log_interval if self.log_interval else None
        if next_log is not None and (end is None or next_log <= end):
            text += f"; the next progress line (common.log_interval={self.log_interval}) in " \
                    f"{_duration((next_log - at) / rate)}"
        if self.updates_per_epoch:
            text += f"; an epoch (about {self.updates_per_epoch} updates) takes {_duration(self.updates_per_epoch / rate)}"
        if end is not None and end > at:
            text += f"; the remaining {end - at} updates to update {end}, {_duration((end - at) / rate)}"
        return text


def _rate(per_s: float) -> str:
    return f"{per_s:.2f} updates/s" if per_s >= 1 else f"{1 / per_s:.1f} s/update"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
