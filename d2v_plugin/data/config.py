"""One data config (input size, eval crop, normalisation, interpolation) that training, validation,
evaluation, kNN and export all read, as timm's ``resolve_data_config`` is the one source there."""
from __future__ import annotations

import math
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # data/transforms.py maps each to PIL's and torch's


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 224
    crop_ratio: float = 0.875  # eval: resize the shorter side to image_size / crop_ratio, centre-crop image_size
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bicubic"  # every resize: the training crop, the eval resize, timm's transform

    def describe(self) -> dict:
        """What a result records of the pixels its model saw."""
        return {"image_size": self.image_size, "crop_ratio": self.crop_ratio, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    def __post_init__(self):
        # the values may come from a file (an export's config.json, a checkpoint's task config)
        from d2v_plugin.limits import LIMITS

        if not isinstance(self.image_size, int) or not 1 <= self.image_size <= LIMITS.max_image_size:
            raise ValueError(f"image size {self.image_size!r} is not an integer in 1..{LIMITS.max_image_size}")
        if not isinstance(self.crop_ratio, (int, float)) or not 0 < self.crop_ratio <= 1:
            raise ValueError(f"crop ratio {self.crop_ratio!r} is not in (0, 1]")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, float) and math.isfinite(v) for v in value):
                raise ValueError(f"{name} {value!r} is not 3 finite numbers")
        if min(self.std) <= 0:
            raise ValueError(f"std {self.std!r} is not positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")


def _get(cfg, key):
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) or hasattr(cfg, "keys") else getattr(cfg, key, None)


def resolve_data_config(task=None, model=None, export=None, **overrides) -> DataConfig:
    """The data config of a run or a model, most specific source first: ``overrides`` (a user's
    command-line choice, or what a checkpoint's reader found), ``export`` (an export's config.json),
    ``model`` (its recorded image_size), ``task`` (the task's image_size, eval_crop_ratio and
    interpolation); DataConfig's defaults for the rest. A value that cannot be right is a ValueError."""
    found = {}
    for source, names in ((task, {"image_size": "image_size", "crop_ratio": "eval_crop_ratio",
                                  "interpolation": "interpolation"}),
                          (model, {"image_size": "image_size"}),
                          (export, {"image_size": "image_size", "crop_ratio": "eval_crop_ratio", "mean": "mean",
                                    "std": "std", "interpolation": "interpolation"})):
        for field_name, key in names.items():
            value = _get(source, key)
            if value is not None:
                found[field_name] = value
    found.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("mean", "std"):
        if key in found:
            try:
                found[key] = tuple(float(x) for x in found[key])
            except (TypeError, ValueError):
                raise ValueError(f"{key} {found[key]!r} is not 3 numbers") from None
    if isinstance(found.get("crop_ratio"), int):
        found["crop_ratio"] = float(found["crop_ratio"])
    return DataConfig(**found)
