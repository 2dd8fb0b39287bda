"""One data config (input size, eval crop, normalisation, interpolation) that training, validation,
evaluation, kNN and export all read, as timm's ``resolve_data_config`` is the one source there."""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 224
    crop_ratio: float = 0.875  # eval: resize the shorter side to image_size / crop_ratio, centre-crop image_size
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bicubic"  # every resize: the training crop, the eval resize, timm's transform


def _get(cfg, key):
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) or hasattr(cfg, "keys") else getattr(cfg, key, None)


def resolve_data_config(task=None, model=None, export=None, **overrides) -> DataConfig:
    """The data config of a run or a model, most specific source first: ``overrides`` (a user's
    command-line choice), ``export`` (an export's config.json), ``model`` (its recorded image_size),
    ``task`` (the task's image_size, eval_crop_ratio and interpolation); DataConfig's defaults for the rest."""
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
            found[key] = tuple(float(x) for x in found[key])
    return DataConfig(**found)
