"""The encoder's architecture as data (no torch.nn): what checkpoint readers give and the encoder builds
from, and the bounds a file's claims are checked against before anything is built (d2v_plugin/limits.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from d2v_plugin.limits import LIMITS, env_name
from d2v_plugin.models.safe_load import CheckpointError


@dataclass
class EncoderConfig:
    """Architecture of the encoder; the defaults are data2vec 2.0 base (ViT-B/16)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224
    in_chans: int = 3
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    # how many of the first blocks sat in data2vec's prenet (its image context encoder) in the
    # checkpoint: the same computation either way, but data2vec's drop-path schedule treats them apart
    prenet_depth: int = 0
    drop_path_schedule: str = "linear"  # see encoder.drop_path_rates

    def to_dict(self) -> dict:
        return asdict(self)


FIELD_TYPES = {f.name: (float if f.type in ("float", float) else str if f.type in ("str", str) else int)
               for f in fields(EncoderConfig)}


def encoder_config(values: dict, source: str) -> EncoderConfig:
    """An EncoderConfig from a mapping a file gave (an export's config.json, a compact file's ``arch``):
    unknown keys and values of the wrong type are errors naming the key."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: the architecture is a {type(values).__name__}, not a mapping")
    out = {}
    for key, value in values.items():
        kind = FIELD_TYPES.get(key)
        if kind is None:
            raise CheckpointError(f"{source}: unknown architecture key {str(key)[:80]!r} (known: {', '.join(FIELD_TYPES)})")
        ok = isinstance(value, str) if kind is str else isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or (kind is int and float(value) != int(value)):
            raise CheckpointError(f"{source}: architecture key {key!r} = {str(value)[:80]!r} is not a{'n' if kind is int else ''} "
                             f"{kind.__name__}")
        out[key] = kind(value)
    return EncoderConfig(**out)


def check_architecture(cfg: EncoderConfig, source: str, num_classes: int | None = None) -> EncoderConfig:
    """The architecture a file claims, within the bounds (before anything is built for it); an error
    names the file, the field and the environment variable that raises the bound."""
    problems = []

    def bound(name, value, low, high, limit=None):
        if not low <= value <= high:
            raise_with = f" (raise {env_name(limit)} if that is real)" if limit and value > high else ""
            problems.append(f"{name}={value} outside {low}..{high}{raise_with}")

    bound("depth", cfg.depth, 1, LIMITS.max_depth, "max_depth")
    bound("embed_dim", cfg.embed_dim, 1, LIMITS.max_embed_dim, "max_embed_dim")
    bound("num_heads", cfg.num_heads, 1, LIMITS.max_heads, "max_heads")
    if not 0 < cfg.mlp_ratio <= LIMITS.max_mlp_ratio:
        problems.append(f"mlp_ratio={cfg.mlp_ratio} outside (0, {LIMITS.max_mlp_ratio}] (raise "
                        f"{env_name('max_mlp_ratio')} if that is real)")
    bound("patch_size", cfg.patch_size, 1, LIMITS.max_patch_size, "max_patch_size")
    bound("image_size", cfg.image_size, 1, LIMITS.max_image_size, "max_image_size")
    bound("in_chans", cfg.in_chans, 1, 4)
    bound("prenet_depth", cfg.prenet_depth, 0, max(cfg.depth, 0))
    if not 0 < cfg.norm_eps < 1:
        problems.append(f"norm_eps={cfg.norm_eps} outside (0, 1)")
    if not 0 <= cfg.drop_path_rate < 1:
        problems.append(f"drop_path_rate={cfg.drop_path_rate} outside [0, 1)")
    if num_classes is not None:
        bound("num_classes", num_classes, 1, LIMITS.max_classes, "max_classes")
    if not problems:
        if cfg.embed_dim % cfg.num_heads:
            problems.append(f"embed_dim={cfg.embed_dim} is not divisible by num_heads={cfg.num_heads}")
        if cfg.image_size % cfg.patch_size:
            problems.append(f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")
        elif (cfg.image_size // cfg.patch_size) ** 2 > LIMITS.max_tokens:
            problems.append(f"{(cfg.image_size // cfg.patch_size) ** 2:,} patches per image, over "
                            f"{LIMITS.max_tokens:,} (raise {env_name('max_tokens')} if that is real)")
    if problems:
        raise CheckpointError(f"{source}: an architecture this plugin will not build: {'; '.join(problems)}")
    return cfg
