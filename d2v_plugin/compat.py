"""Every change this plugin makes to another library's behaviour, in one place. Each is installed
explicitly (``install()``, called when the plugin registers with fairseq; the timm one by the
RandAugment transform), only on the versions it was written for, and has a test showing that the
upstream behaviour it changes is still there (tests/test_compat.py), so it can go when that fails.

1. Atomic checkpoint copies. fairseq writes each checkpoint once, atomically (``torch_persistent_save``:
   write ``.tmp``, rename), then *copies* it to the other names it is saved under
   (``checkpoint_last.pt``, ``checkpoint_best.pt``) with ``PathManager.copy`` -> ``shutil.copyfile``,
   which truncates the destination first. A job killed during that copy (a 350 MB base checkpoint
   takes a while) leaves a half-written ``checkpoint_last.pt`` and the restart cannot resume. The
   patch copies to a temporary file beside the destination, then ``os.replace``.

2. Exact fp16/bf16 resumes. fairseq's ``FP16Optimizer`` keeps fp32 master weights and steps those,
   but its state dict holds neither the masters nor the loss scaler's counters: a resumed run rebuilds
   its masters from the half-precision weights saved in the checkpoint (the low bits of every weight,
   where small updates accumulate, are lost) and restarts the scaler's growth window. The patch saves
   both in the optimizer state (``last_optimizer_state``) and restores them on load.

3. Composite optimizers of their own. fairseq's ``FairseqCompositeOptimizer`` keeps its per-group
   optimizers and lr schedulers in class attributes (``optimizers: Dict = {}``), so every instance
   writes into the same two dicts: a second composite in a process (the trainer rebuilds its
   optimizer when it resumes; a comparison builds two) sees the first one's groups, and fairseq's own
   check that each group has a scheduler then fails. The patch gives each instance its own dicts.

4. Save on a signal (installed by the task when a training run starts: cluster.py). fairseq's training
   loop asks ``validate_and_save`` after every update whether to stop, and knows no stop that is not
   the end of training. The wrapper adds one: when the ranks agreed on a stop request, it first runs
   fairseq's own ``validate_and_save`` (which validates and saves if this update has that due, so the
   run's validations and checkpoints are those of an uninterrupted run), saves ``checkpoint_last.pt``
   if that did not, and exits to be resumed (``StopRequest.finish``). Whether fairseq saved is counted
   on the way from ``fairseq_cli.train`` to ``save_checkpoint``, never by replacing fairseq's function:
   it keeps the best score as an attribute of itself, and a replacement would lose it (a stop at an
   epoch end would then take that epoch's validation for the best and overwrite checkpoint_best.pt).

5. Nothing past the end of a finished run (installed by the task when a training run starts). fairseq's
   loop checks ``max_update`` only after an update: a run restarted once it has reached ``max_update``
   (a requeued job, the same command run again) trains one update more and saves it over the finished
   checkpoints, a step further each time; one that reached ``max_epoch`` prints "done training in 0.0
   seconds". The patch says that the run in ``checkpoint.save_dir`` is complete and how to start
   another, and does not step it again: ``fairseq_cli.train.train`` is wrapped, and ``load_checkpoint``
   is seen through ``fairseq_cli.train``'s view of ``checkpoint_utils`` (as in 4).

6. Unknown keys named, missing ones refused. An override whose key is a typo (``+task.dta=...``) ends in omegaconf's
   ``ConfigKeyError: Key 'dta' not in 'ImageFolderClassificationConfig'`` from fairseq's
   ``merge_with_parent``; the patch says ``unknown key task.dta; did you mean task.data?`` (the keys
   of that section nearest the typo). The error stays a ``ConfigKeyError``. (Without the ``+`` Hydra
   refuses the override before fairseq has imported the plugin: that message is Hydra's.)

7. fairseq's own checkpoint loading checked first. ``checkpoint_utils.load_checkpoint_to_cpu`` (a resume,
   ``checkpoint.restore_file``, ``finetune_from_model``, fairseq-validate) calls ``torch.load``, which
   hands a TorchScript archive to ``torch.jit.load``: the archive's code runs (with weights_only=False,
   which users of data2vec's checkpoints set through TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), or torch refuses
   it with a message about weights_only that does not name the file. The patch runs the plugin's checks
   of a file from outside (models/safe_load.py ``check_file``: a regular file, torch.save's format, not
   TorchScript) before fairseq's function opens a local path.

8. timm's posterize at 0 bits. RandAugment's increasing posterize ('inc1' policies, which data2vec's
   fine-tuning uses) asks Pillow for 0 bits at full magnitude; Pillow >= 10 refuses (ValueError) where
   it used to return black. The patch keeps timm's meaning: 0 bits kept is a black image.
"""
import difflib
import logging
import os
import shutil

import fairseq
import fairseq.checkpoint_utils
import fairseq.dataclass.utils
import torch
from hydra.errors import CompactHydraException
from omegaconf.errors import ConfigKeyError
from fairseq.file_io import PathManager
from fairseq.optim.composite import FairseqCompositeOptimizer
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin

from d2v_plugin.atomic import atomic_path

logger = logging.getLogger(__name__)

_original_copy = PathManager.copy
_original_fp16_state_dict = _FP16OptimizerMixin.state_dict
_original_fp16_load_state_dict = _FP16OptimizerMixin.load_state_dict
_original_composite_init = FairseqCompositeOptimizer.__init__
_original_merge_with_parent = fairseq.dataclass.utils.merge_with_parent
_original_load_checkpoint_to_cpu = fairseq.checkpoint_utils.load_checkpoint_to_cpu

MASTERS_KEY, SCALER_KEY = "d2v_fp32_masters", "d2v_loss_scaler"
SCALER_COUNTERS = ("_iter", "_last_overflow_iter", "_last_rescale_iter", "_overflows_since_rescale")


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    if "://" in str(dst_path) or "://" in str(src_path):  # remote storage: leave it to iopath
        return _original_copy(src_path, dst_path, overwrite=overwrite)
    if os.path.exists(dst_path) and not overwrite:
        return False
    with atomic_path(dst_path) as tmp:
        shutil.copyfile(src_path, tmp)
    return True


def _masters(optimizer) -> list:
    params = optimizer.fp32_params
    if isinstance(params, dict):  # flattened: one flat tensor per device
        return list(params.values())
    return [params] if torch.is_tensor(params) else list(params)


def fp16_state_dict_with_masters(self) -> dict:
    state = _original_fp16_state_dict(self)
    state[MASTERS_KEY] = [p.data for p in _masters(self)]
    if self.scaler is not None:
        state[SCALER_KEY] = {k: getattr(self.scaler, k) for k in SCALER_COUNTERS}
    return state


def fp16_load_state_dict_with_masters(self, state_dict, optimizer_overrides=None) -> None:
    state_dict = dict(state_dict)
    saved, counters = state_dict.pop(MASTERS_KEY, None), state_dict.pop(SCALER_KEY, None)
    _original_fp16_load_state_dict(self, state_dict, optimizer_overrides)
    masters = _masters(self)
    if saved is None:
        logger.warning("the checkpoint holds no fp32 master weights: they are rebuilt from its "
                       "half-precision weights (the resume is not exact)")
    elif [p.shape for p in saved] != [p.shape for p in masters]:
        logger.warning("the checkpoint's fp32 master weights do not match the model's parameters: they are "
                       "rebuilt from its half-precision weights (the resume is not exact)")
    else:
        with torch.no_grad():
            for p, value in zip(masters, saved):
                p.data.copy_(value)
    if counters is not None and self.scaler is not None:
        for k, v in counters.items():
            setattr(self.scaler, k, v)


def load_checkpoint_to_cpu_checked(path, arg_overrides=None, load_on_all_ranks=False):
    """fairseq's ``load_checkpoint_to_cpu``, after the plugin's checks of a local file (patch 7)."""
    if "://" not in str(path):
        from d2v_plugin.models.safe_load import check_file

        check_file(path)
    return _original_load_checkpoint_to_cpu(path, arg_overrides, load_on_all_ranks)


def composite_init_with_own_dicts(self, cfg, params):
    self.optimizers, self.lr_schedulers = {}, {}  # instance attributes, shadowing fairseq's shared class dicts
    _original_composite_init(self, cfg, params)


FAIRSEQ_WRITTEN_FOR = "0.12."  # fairseq-fixed 0.12.3.1, the pinned version


def install() -> None:
    """Install the fairseq patches (1-3, 6, 7); on another fairseq than they were written for, none."""
    if not fairseq.__version__.startswith(FAIRSEQ_WRITTEN_FOR):
        logger.warning(f"d2v_plugin's fairseq patches were written for fairseq {FAIRSEQ_WRITTEN_FOR}x, this is "
                       f"{fairseq.__version__}: not installed (atomic checkpoint copies, exact half-precision "
                       f"resumes, per-instance composite optimizer groups, unknown keys named, checkpoints checked before "
                       f"fairseq loads them)")
        return
    if PathManager.copy is not atomic_copy:
        PathManager.copy = staticmethod(atomic_copy)
    if _FP16OptimizerMixin.state_dict is not fp16_state_dict_with_masters:
        _FP16OptimizerMixin.state_dict = fp16_state_dict_with_masters
        _FP16OptimizerMixin.load_state_dict = fp16_load_state_dict_with_masters
    if FairseqCompositeOptimizer.__init__ is not composite_init_with_own_dicts:
        FairseqCompositeOptimizer.__init__ = composite_init_with_own_dicts
    if fairseq.dataclass.utils.merge_with_parent is not merge_with_parent_naming_unknown_keys:
        fairseq.dataclass.utils.merge_with_parent = merge_with_parent_naming_unknown_keys
    if fairseq.checkpoint_utils.load_checkpoint_to_cpu is not load_checkpoint_to_cpu_checked:
        fairseq.checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu_checked


class UnknownSetting(ConfigKeyError, CompactHydraException):
    """A key of an override that its section does not have, named with the nearest keys it has. A compact
    Hydra exception: Hydra prints its message alone, one line, without the traceback to it."""


class MissingSetting(CompactHydraException, ValueError):
    """A setting the recipe leaves to the user (``???``) that the command line did not give."""


ALLOW_MISSING = {"on": False}  # cli.recipe prints a recipe with what it leaves to the user still unset


def _section(cfg) -> str | None:
    try:
        return cfg._get_full_key(None) or None  # "task", "model": where add_defaults took cfg from
    except Exception:
        return None


def merge_with_parent_naming_unknown_keys(dc, cfg, remove_missing=False):
    """fairseq's ``merge_with_parent``; a key the dataclass does not have is named with its section, and a
    setting the recipe leaves to the user (``???``) that was not given is an error naming it: the merge
    would put the dataclass's default in its place (a model.pretrained_checkpoint left out trained a
    randomly initialised encoder, without a word)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg) and not ALLOW_MISSING["on"]:
        missing = [k for k in cfg if isinstance(k, str) and OmegaConf.is_missing(cfg, k)]
        if missing:
            section = _section(cfg)
            full = f"{section}.{missing[0]}" if section else missing[0]
            extra = "; null trains from a random initialisation" if missing[0] == "pretrained_checkpoint" else ""
            raise MissingSetting(f"{full} is not set: pass {full}=... (the recipe leaves it to you{extra})")
    try:
        return _original_merge_with_parent(dc, cfg, remove_missing)
    except ConfigKeyError as err:
        if isinstance(err, UnknownSetting) or err.key is None:
            raise
        raise UnknownSetting(unknown_key_message(dc, cfg, err)) from None


def unknown_key_message(dc, cfg, err) -> str:
    """``unknown key task.dta; did you mean task.data?`` for the key omegaconf could not place."""
    section = _section(cfg)
    inner = (err.full_key or str(err.key)).split(".")
    where = ".".join(p for p in ([section] if section else []) + inner[:-1])
    owner = err.object_type if hasattr(err.object_type, "__dataclass_fields__") else dc
    keys = [k for k in getattr(owner, "__dataclass_fields__", {}) if not k.startswith("_")]
    full = f"{where}.{err.key}" if where else str(err.key)
    close = difflib.get_close_matches(str(err.key), keys, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(f"{where}.{k}" if where else k for k in close) + "?"
    else:
        hint = f"{owner.__name__ if isinstance(owner, type) else type(owner).__name__} has: {', '.join(keys)}"
    return f"unknown key {full}; {hint}"


class _CountedSaves:
    """fairseq's ``save_checkpoint``, its calls counted: what ``fairseq_cli.train`` calls (and reads
    ``.best`` from) while its ``validate_and_save`` runs. fairseq's function itself stays in its module:
    it keeps the best score so far as an attribute of itself (``save_checkpoint.best``, read and written
    through its module's name), so a substitute there would lose it."""

    def __init__(self, save_checkpoint):
        self.save_checkpoint, self.calls = save_checkpoint, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.save_checkpoint(*args, **kwargs)

    def __getattr__(self, name):  # .best, as fairseq_cli.train's get_valid_stats reads it
        return getattr(self.save_checkpoint, name)


class _ModuleView:
    """A module as another module sees it, with some of its names given other values."""

    def __init__(self, module, **names):
        self._module = module
        self.__dict__.update(names)

    def __getattr__(self, name):
        return getattr(self._module, name)


def validate_and_save_or_stop(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch):
    """fairseq_cli.train.validate_and_save, then, if the ranks agreed to stop on a signal, save and exit."""
    import fairseq_cli.train

    stop = getattr(task, "stop_request", None)
    if stop is None or not stop.agreed:
        return _original_validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch)
    # whether fairseq saves at this update anyway (the same answer on every rank: each calls save_checkpoint)
    real = fairseq_cli.train.checkpoint_utils
    counted = _CountedSaves(real.save_checkpoint)
    fairseq_cli.train.checkpoint_utils = _ModuleView(real, save_checkpoint=counted)
    try:
        valid_losses, should_stop = _original_validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets,
                                                                end_of_epoch)
    finally:
        fairseq_cli.train.checkpoint_utils = real
    if should_stop:  # the run is complete (max_update, ...) at this update: it ends as usual
        return valid_losses, should_stop
    if not counted.calls:
        # checkpoint_last.pt; no validation is due at this update
        real.save_checkpoint(cfg.checkpoint, trainer, epoch_itr, None)
    stop.finish(trainer, cfg)


_original_validate_and_save = None
_original_train = None
_original_load_checkpoint = None


def finished_because(cfg, trainer, epoch_itr) -> str | None:
    """The setting a run has already reached (so fairseq has nothing left to train), or None."""
    opt = cfg.optimization
    if opt.max_update and trainer.get_num_updates() >= opt.max_update:
        return f"optimization.max_update={opt.max_update} (it is at update {trainer.get_num_updates()})"
    if opt.max_epoch and epoch_itr is not None and epoch_itr.next_epoch_idx > opt.max_epoch:
        return f"optimization.max_epoch={opt.max_epoch} (it has trained {epoch_itr.next_epoch_idx - 1} epochs)"
    return None


def finished_message(cfg, reason: str) -> str:
    return (f"the run in checkpoint.save_dir={cfg.checkpoint.save_dir} has already reached {reason}: there is "
            f"nothing left to train. To train it further, raise that setting (it resumes from "
            f"{cfg.checkpoint.restore_file}); to start another run, give another checkpoint.save_dir")


def load_checkpoint_saying_if_finished(cfg, trainer, **kwargs):
    """fairseq's ``load_checkpoint`` (``cfg``: the checkpoint config), then a warning if the run is complete."""
    extra_state, epoch_itr = _original_load_checkpoint(cfg, trainer, **kwargs)
    reason = finished_because(trainer.cfg, trainer, epoch_itr)
    if reason is not None and trainer.data_parallel_rank == 0:
        logger.warning(finished_message(trainer.cfg, reason))
    return extra_state, epoch_itr


def train_unless_finished(cfg, trainer, task, epoch_itr):
    """fairseq_cli.train.train, unless the run has reached max_update already (then: stop, no update)."""
    if finished_because(cfg, trainer, None) is not None:
        return [None], True
    return _original_train(cfg, trainer, task, epoch_itr)


def install_finished_run_check() -> bool:
    """Patch 5, in the process that trains (from the task's setup, before fairseq loads the checkpoint)."""
    global _original_train, _original_load_checkpoint
    import fairseq_cli.train

    if not fairseq.__version__.startswith(FAIRSEQ_WRITTEN_FOR):
        return False
    if fairseq_cli.train.train is not train_unless_finished:
        _original_train = fairseq_cli.train.train
        fairseq_cli.train.train = train_unless_finished
    seen = fairseq_cli.train.checkpoint_utils
    if getattr(seen, "load_checkpoint", None) is not load_checkpoint_saying_if_finished:
        _original_load_checkpoint = seen.load_checkpoint
        fairseq_cli.train.checkpoint_utils = _ModuleView(seen, load_checkpoint=load_checkpoint_saying_if_finished)
    return True


def install_save_on_signal() -> bool:
    """Patch 4, in the process that trains (fairseq_cli.train runs it); False where it is not installed."""
    global _original_validate_and_save
    import fairseq_cli.train

    if not fairseq.__version__.startswith(FAIRSEQ_WRITTEN_FOR):
        logger.warning(f"d2v_plugin's save-on-signal was written for fairseq {FAIRSEQ_WRITTEN_FOR}x, this is "
                       f"{fairseq.__version__}: signals are left to fairseq (task.save_on_signal has no effect)")
        return False
    if fairseq_cli.train.validate_and_save is not validate_and_save_or_stop:
        _original_validate_and_save = fairseq_cli.train.validate_and_save
        fairseq_cli.train.validate_and_save = validate_and_save_or_stop
    return True


def _posterize(img, bits_to_keep: int, **_):
    """timm's posterize, keeping timm's meaning at 0 bits: 0 bits kept is black, what Pillow computed
    before it refused ``bits=0``."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def install_timm_posterize_fix() -> None:
    """Patch 8, for Pillow >= 10 (which refuses 0 bits)."""
    import PIL
    from timm.data import auto_augment

    if int(PIL.__version__.split(".")[0]) < 10:
        return
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize
