"""Checkpoints written the way their clients write them, built with data2vec's own code (REFERENCE.md
section 7): the thesis' PyTorch Lightning students and classifier, data2vec's fine-tuned classifier.

The thesis' files pickle an omegaconf config typed by a dataclass of the thesis' own source tree
(``models.image_kd.ImageKDConfig``). Here that module is written into a folder of its own and the file
is saved by a separate Python process that has it on its path: the test process, like a user's, never
has a ``models`` module to import.
"""
import os
import subprocess
import sys
import textwrap

import torch

THESIS_MODULE = '''
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ImageKDConfig:
    model_path: str = "/checkpoints/base_imagenet.pt"
    depth: int = 6
    lr: float = 5e-4
    warmup_steps: int = 5000
    teacher: Optional[Any] = None
    layers: list = field(default_factory=lambda: [0, 1])
'''

SAVE_AS_LIGHTNING = '''
import sys
import torch
from omegaconf import OmegaConf
from models.image_kd import ImageKDConfig

state_dict = torch.load(sys.argv[1], weights_only=True)
cfg = OmegaConf.structured(ImageKDConfig(depth=int(sys.argv[3])))
first = next(iter(state_dict.values()))
torch.save({
    "epoch": 9, "global_step": 12345, "pytorch-lightning_version": "2.2.0",
    "state_dict": state_dict,
    "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10, "completed": 9}}}},
    "callbacks": {"ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {
        "best_model_score": torch.tensor(0.25), "best_model_path": "/runs/kd/best.ckpt", "dirpath": "/runs/kd"}},
    "optimizer_states": [{"state": {0: {"step": torch.tensor(12345.0), "exp_avg": torch.zeros_like(first)}},
                          "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98), "weight_decay": 0.01, "params": [0]}]}],
    "lr_schedulers": [{"base_lrs": [5e-4], "last_epoch": 12345}],
    "MixedPrecision": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
    "hparams_name": "kwargs",
    "hyper_parameters": {"cfg": cfg},
}, sys.argv[2])
'''


def save_like_the_thesis(state_dict: dict, path, workdir, depth: int = 6) -> None:
    """A Lightning 2.2 checkpoint of the thesis' code: ``state_dict`` plus loops, callbacks, optimizer
    and scaler state, and ``hyper_parameters['cfg']`` a DictConfig typed by ``models.image_kd``."""
    src = os.path.join(workdir, "thesis_src")
    os.makedirs(os.path.join(src, "models"), exist_ok=True)
    open(os.path.join(src, "models", "__init__.py"), "w").close()
    with open(os.path.join(src, "models", "image_kd.py"), "w") as f:
        f.write(textwrap.dedent(THESIS_MODULE))
    tensors = os.path.join(workdir, "tensors.pt")
    torch.save(state_dict, tensors)
    env = {**os.environ, "PYTHONPATH": src}
    result = subprocess.run([sys.executable, "-c", SAVE_AS_LIGHTNING, tensors, str(path), str(depth)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def encoder_keys(d2v_model) -> dict:
    """The encoder part of a data2vec 2.0 model's state, as the thesis' student keeps it (pretraining
    modules removed)."""
    d2v_model.remove_pretraining_modules(modality="image")
    return {k: v.clone() for k, v in d2v_model.state_dict().items()}


def kd_student(d2v_model) -> dict:
    """The thesis' ImageKDModel inside its Lightning module: the student under ``model.model.``."""
    return {f"model.model.{k}": v for k, v in encoder_keys(d2v_model).items()}


def earlier_kd_student(d2v_model, teacher) -> dict:
    """The earlier KDData2Vec: the student under ``model.`` with its modality encoder named ``image``,
    and the teacher saved alongside under ``teachers.image.``."""
    def lower(state):
        return {k.replace("modality_encoders.IMAGE.", "modality_encoders.image."): v for k, v in state.items()}

    return {**{f"model.{k}": v for k, v in lower(encoder_keys(d2v_model)).items()},
            **{f"teachers.image.{k}": v for k, v in lower(encoder_keys(teacher)).items()}}


def thesis_classifier(d2v_model, head_norm, head) -> dict:
    """The thesis' fine-tuned classifier: encoder under ``model.model.model.``, then ``model.head_norm``
    and ``model.head``."""
    return {**{f"model.model.model.{k}": v for k, v in encoder_keys(d2v_model).items()},
            **{f"model.head_norm.{k}": v.clone() for k, v in head_norm.state_dict().items()},
            **{f"model.head.{k}": v.clone() for k, v in head.state_dict().items()}}


def save_data2vec_finetuned(mae_model, path) -> None:
    """data2vec's mae_image_classification as fairseq's trainer saves it: ``cfg.model`` with
    ``_name`` and ``pretrained_model_args``, weights ``model.*``, ``fc_norm.*``, ``head.*``."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(mae_model.cfg, resolve=True, enum_to_str=True)
    model_cfg["_name"] = "mae_image_classification"
    state = {
        "args": None,
        "cfg": {"model": model_cfg, "task": {"_name": "mae_image_classification", "data": "/imagenet"},
                "common": {"seed": 1}},
        "model": mae_model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqCompositeOptimizer",
                               "lr_scheduler_state": {}, "num_updates": 250200}],
        "task_state": {}, "extra_state": {"epoch": 100}, "last_optimizer_state": None,
    }
    checkpoint_utils.torch_persistent_save(state, str(path))
