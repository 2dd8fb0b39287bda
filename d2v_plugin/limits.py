"""Every bound the plugin puts on what a file from outside may ask of it, in one place: images (decoded
size, aspect ratio, file size), labels, container records, checkpoints (the pickle's size and nesting,
the classes it names, the architecture it claims) and export configs. Each is checked before anything
is allocated for it; past a bound an image is skipped and reported (``task.on_bad_image``), a
checkpoint or an index is refused with a message naming the file and the bound.

The defaults are generous for real data (ImageNet's largest photographs, ViT-22B's architecture).
Each can be raised for a run with an environment variable of the field's name in capitals, prefixed
``D2V_`` (``D2V_MAX_IMAGE_PIXELS=400000000``): data-loading workers and ranks inherit it."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Limits:
    # images and their files
    max_image_pixels: int = 89_478_485  # decoded width x height and any resize of it (PIL's own MAX_IMAGE_PIXELS)
    max_aspect_ratio: float = 100.0  # the longer side over the shorter one
    max_file_bytes: int = 2**30  # one image file, Parquet cell or tar member
    max_label_bytes: int = 32  # a tar shard's .cls member
    max_classes: int = 1_000_000  # a label id, and the classes of a model
    # checkpoints
    max_pickle_bytes: int = 2**28  # a checkpoint's pickle (the tensors' data is not in it)
    max_pickle_depth: int = 1_000  # nesting of the pickled containers
    max_stand_ins: int = 1_000  # classes of code not installed here, read as inert stand-ins
    max_depth: int = 256  # encoder blocks
    max_embed_dim: int = 16_384
    max_heads: int = 512
    max_mlp_ratio: float = 16.0
    max_image_size: int = 4_096
    max_patch_size: int = 64
    max_tokens: int = 65_536  # patches per image: (image size / patch size)^2
    max_json_bytes: int = 2**20  # an export folder's config.json


def _from_environment(base: Limits, environ=os.environ) -> Limits:
    values = {}
    for f in fields(base):
        name = f"D2V_{f.name.upper()}"
        if name in environ:
            try:
                values[f.name] = type(getattr(base, f.name))(float(environ[name]))
            except ValueError:
                raise ValueError(f"{name}={environ[name]!r} is not a number") from None
    return replace(base, **values)


LIMITS = _from_environment(Limits())


def env_name(field: str) -> str:
    """The environment variable that raises a limit, for messages."""
    return f"D2V_{field.upper()}"
