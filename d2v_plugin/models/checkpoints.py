"""Read Data2Vec2 image-encoder weights from the checkpoint formats users have, safely and strictly.

Accepted: (a) a fairseq data2vec 2.0 checkpoint (``cfg`` + ``model``), (b) a bare state dict, in
data2vec's or this plugin's key names, (c) a PyTorch Lightning checkpoint (``state_dict``, encoder
under a prefix such as ``model.model.``), (d) this plugin's own files: ``convert`` output and the
trainer's fine-tuned checkpoints. Files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import replace

import torch

from d2v_plugin.atomic import atomic_path
from d2v_plugin.models.encoder import EncoderConfig

D2V_ANCHOR = "modality_encoders.IMAGE.local_encoder.proj.weight"
OUR_ANCHOR = "patch_embed.proj.weight"
COMPACT_FORMAT = "d2v_plugin_encoder"

# data2vec 2.0 entries that only pretraining uses: the EMA teacher, decoders, masks, other
# modalities' encoders. Dropped by rule; anything else unknown is an error.
PRETRAINING_ONLY = re.compile(
    r"^(_ema|ema\.|shared_decoder\.|recon_proj\.|modality_encoders\.(?!IMAGE\.)|"
    r"modality_encoders\.IMAGE\.(decoder\.|encoder_mask|alibi_scale|alibi_bias))"
)

_D2V_TO_OURS = [
    (re.compile(r"^modality_encoders\.IMAGE\.local_encoder\.proj\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^modality_encoders\.IMAGE\.extra_tokens$"), "cls_token"),
    (re.compile(r"^modality_encoders\.IMAGE\.fixed_positional_encoder\.positions$"), "pos_embed"),
    (re.compile(r"^modality_encoders\.IMAGE\.context_encoder\.norm\.(weight|bias)$"), r"norm_pre.\1"),
]
_PRENET_BLOCK = re.compile(r"^modality_encoders\.IMAGE\.context_encoder\.blocks\.(\d+)\.(.+)$")
_MAIN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _enum_value(value):
    # Older fairseq configs pickle data2vec's Modality enum; its value is all we need, and this
    # stand-in keeps the load from importing (and running) anything.
    return value


_HARMLESS_GLOBALS = [
    (_enum_value, "examples.data2vec.data.modality.Modality"),
    argparse.Namespace,
]


def load_file(path: str, trust: bool = False, mmap: bool = False) -> object:
    """torch.load with weights_only=True; arbitrary unpickling only when the user trusts the file.
    ``mmap``: tensors stay in the file until used (reading a checkpoint's config costs no memory)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        try:
            needed = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or str(err)
        except Exception:  # not a zip checkpoint: report what the unpickler said
            needed = _first_line(err)
        raise CheckpointError(
            f"{path}: refusing to unpickle objects the file asks for ({needed}); loading them can run "
            f"code from the file. If you trust it, set model.trust_checkpoint=true (--trust-checkpoint "
            f"on the command line tools)."
        ) from None
    except Exception as err:  # truncated, text, broken zip: the unpickler fails in many ways
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _find_prefix(weights: dict, path: str, prefix: str | None) -> tuple[str, str]:
    """Locate the encoder inside a flat state dict: returns (prefix, naming)."""
    found = {}
    for key in weights:
        for anchor, naming in ((D2V_ANCHOR, "data2vec"), (OUR_ANCHOR, "plugin")):
            if key.endswith(anchor):
                found[key[: -len(anchor)]] = naming
    if prefix is not None:
        if prefix not in found:
            raise CheckpointError(
                f"{path}: no encoder under prefix '{prefix}' (model.checkpoint_prefix); encoders found under: "
                f"{sorted(found) or 'none'}"
            )
        return prefix, found[prefix]
    if not found:
        raise CheckpointError(
            f"{path}: no Data2Vec2 image encoder found (looked for a key ending in '{D2V_ANCHOR}' or '{OUR_ANCHOR}')"
        )
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: several encoders found, under prefixes {sorted(found)}; choose one with model.checkpoint_prefix"
        )
    return next(iter(found.items()))


def _to_plugin_names(weights: dict, prenet_depth: int, path: str) -> dict:
    out, unknown = {}, []
    for key, value in weights.items():
        if PRETRAINING_ONLY.match(key):
            continue
        new = None
        for pattern, repl in _D2V_TO_OURS:
            if pattern.match(key):
                new = pattern.sub(repl, key)
        if (m := _PRENET_BLOCK.match(key)) is not None:
            new = f"blocks.{int(m.group(1))}.{m.group(2)}"
        elif (m := _MAIN_BLOCK.match(key)) is not None:
            new = f"blocks.{prenet_depth + int(m.group(1))}.{m.group(2)}"
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys in the data2vec encoder: {', '.join(sorted(unknown))}")
    return out


def _block_count(keys, pattern) -> int:
    ids = [int(m.group(1)) for k in keys if (m := pattern.match(k)) is not None]
    return max(ids) + 1 if ids else 0


def _architecture(state: dict, model_cfg: dict, arch: dict, path: str) -> EncoderConfig:
    """Architecture read off the tensors' shapes, with what shapes cannot tell (heads, eps) from cfg."""
    try:
        dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        grid = state["pos_embed"].shape[1] if "pos_embed" in state else None
    except KeyError as err:
        raise CheckpointError(f"{path}: missing key {err} in the encoder") from None
    depth = _block_count(state, re.compile(r"^blocks\.(\d+)\."))
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    image_size = arch.get("image_size") or model_cfg.get("input_size")
    if image_size is None:
        side = int(round((grid or 196) ** 0.5))
        image_size = side * patch
    heads = arch.get("num_heads") or model_cfg.get("num_heads") or max(1, dim // 64)
    return EncoderConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=int(heads),
        mlp_ratio=float(fc1.shape[0] / dim) if fc1 is not None else float(arch.get("mlp_ratio", 4.0)),
        patch_size=patch,
        image_size=int(image_size),
        in_chans=in_chans,
        norm_eps=float(arch.get("norm_eps") or model_cfg.get("norm_eps") or 1e-6),
    )


def _check_data2vec_cfg(model_cfg: dict, path: str) -> dict:
    """The parts of a data2vec_multi config this encoder reproduces; other settings are errors."""
    image = (model_cfg.get("modalities") or {}).get("image") or {}
    problems = []
    if model_cfg.get("layer_norm_first"):
        problems.append("model.layer_norm_first=true (pre-norm blocks)")
    if image.get("use_alibi_encoder"):
        problems.append("model.modalities.image.use_alibi_encoder=true")
    if image.get("num_extra_tokens", 1) != 1:
        problems.append(f"model.modalities.image.num_extra_tokens={image.get('num_extra_tokens')} (expected 1)")
    if image.get("embed_dim", model_cfg.get("embed_dim")) != model_cfg.get("embed_dim"):
        problems.append("a patch embedding width different from the model width")
    if problems:
        raise CheckpointError(f"{path}: unsupported data2vec 2.0 architecture: {'; '.join(problems)}")
    return {
        "num_heads": model_cfg.get("num_heads"),
        "norm_eps": model_cfg.get("norm_eps"),
        "input_size": image.get("input_size"),
    }


def read_encoder_checkpoint(
    path: str,
    depth: int | None = None,
    trust: bool = False,
    prefix: str | None = None,
) -> tuple[EncoderConfig, dict]:
    """Return (architecture, encoder state dict in this plugin's key names) from any accepted format.

    ``depth=N`` keeps the first N blocks (prenet blocks first), as a distilled student is initialised.
    """
    return encoder_from_object(load_file(path, trust=trust), path, depth=depth, prefix=prefix)


def encoder_from_object(obj: object, path: str, depth: int | None = None, prefix: str | None = None):
    """``read_encoder_checkpoint`` on an already loaded checkpoint object."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")

    model_cfg, arch = {}, {}
    if obj.get("format") == COMPACT_FORMAT:
        weights, arch = obj["encoder"], dict(obj.get("arch") or {})
    elif isinstance(obj.get("model"), dict):  # fairseq: data2vec 2.0 or this plugin's trainer
        weights = obj["model"]
        cfg = obj.get("cfg") or {}
        model_cfg = dict((cfg.get("model") or {}) if isinstance(cfg, dict) else {})
        if model_cfg.get("_name") == "data2vec2_image_classifier":
            arch = {k: model_cfg.get(k) for k in ("num_heads", "norm_eps", "image_size")}
            model_cfg = {}
    elif isinstance(obj.get("state_dict"), dict):  # PyTorch Lightning
        weights = obj["state_dict"]
    else:
        weights = obj
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not tensors or not all(isinstance(k, str) for k in weights):
        raise CheckpointError(f"{path} is not a checkpoint: no tensors found under 'model', 'state_dict' or at the top level")

    prefix, naming = _find_prefix(tensors, path, prefix)
    inner = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if naming == "data2vec":
        d2v = _check_data2vec_cfg(model_cfg, path) if model_cfg.get("modalities") else {}
        prenet = _block_count(inner, _PRENET_BLOCK)
        state = _to_plugin_names(inner, prenet, path)
        arch = {"num_heads": d2v.get("num_heads"), "norm_eps": d2v.get("norm_eps"), **arch}
        model_cfg = {"input_size": d2v.get("input_size")}
    else:
        state = inner
        model_cfg = {}
    enc_cfg = _architecture(state, model_cfg, arch, path)

    if depth is not None:
        if depth < 1 or depth > enc_cfg.depth:
            raise CheckpointError(
                f"{path}: model.depth={depth} but the checkpoint has {enc_cfg.depth} blocks (choose 1..{enc_cfg.depth})"
            )
        state = {k: v for k, v in state.items() if not (m := re.match(r"^blocks\.(\d+)\.", k)) or int(m.group(1)) < depth}
        enc_cfg = replace(enc_cfg, depth=depth)
    return enc_cfg, state


def load_encoder_state(encoder: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load that names every missing, unexpected and mis-shaped key at once."""
    strict_load(encoder, state, source, what="the encoder", resampled=("pos_embed",))


def strict_load(module: torch.nn.Module, state: dict, source: str, what: str = "the model",
                resampled: tuple = ("pos_embed", "encoder.pos_embed")) -> None:
    """load_state_dict(strict=True), but every offending key is named in one error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    # positions saved for another grid are resampled on load; only their width must match
    mismatched = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if (state[k].shape[-1:] if k in resampled else state[k].shape)
        != (expected[k].shape[-1:] if k in resampled else expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {', '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: cannot load {what}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def to_data2vec_names(state: dict, prenet_depth: int) -> dict:
    """This plugin's encoder keys -> data2vec 2.0's (``modality_encoders.IMAGE.*`` + main ``blocks.*``)."""
    top = {"cls_token": "modality_encoders.IMAGE.extra_tokens",
           "pos_embed": "modality_encoders.IMAGE.fixed_positional_encoder.positions"}
    out = {}
    for key, value in state.items():
        if key in top:
            new = top[key]
        elif key.startswith("patch_embed.proj."):
            new = "modality_encoders.IMAGE.local_encoder.proj." + key.rsplit(".", 1)[1]
        elif key.startswith("norm_pre."):
            new = "modality_encoders.IMAGE.context_encoder.norm." + key.rsplit(".", 1)[1]
        elif (m := re.match(r"^blocks\.(\d+)\.(.+)$", key)) is not None:
            i = int(m.group(1))
            new = (f"modality_encoders.IMAGE.context_encoder.blocks.{i}.{m.group(2)}" if i < prenet_depth
                   else f"blocks.{i - prenet_depth}.{m.group(2)}")
        else:
            raise KeyError(f"not an encoder key: {key}")
        out[new] = value
    return out


def save_data2vec_checkpoint(encoder, path: str, prenet_depth: int = 2) -> None:
    """Write an encoder as a fairseq data2vec 2.0 checkpoint (``cfg`` + ``model``), the layout real
    data2vec checkpoints have, so demos and tests run the real loading path."""
    c = encoder.cfg
    if not 0 <= prenet_depth <= c.depth:
        raise ValueError(f"prenet_depth={prenet_depth} must be within 0..{c.depth}")
    model_cfg = {
        "_name": "data2vec_multi", "depth": c.depth - prenet_depth, "embed_dim": c.embed_dim,
        "num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio, "norm_eps": c.norm_eps, "layer_norm_first": False,
        "supported_modality": "IMAGE",
        "modalities": {"image": {
            "type": "IMAGE", "prenet_depth": prenet_depth, "input_size": c.image_size, "patch_size": c.patch_size,
            "in_chans": c.in_chans, "embed_dim": c.embed_dim, "num_extra_tokens": 1, "use_alibi_encoder": False,
        }},
    }
    state = {
        "args": None,
        "cfg": {"model": model_cfg, "task": {"_name": "mae_image_pretraining"}},
        "model": to_data2vec_names({k: v.detach().clone() for k, v in encoder.state_dict().items()}, prenet_depth),
        "criterion": None, "optimizer_history": [], "task_state": {}, "extra_state": {}, "last_optimizer_state": None,
    }
    atomic_torch_save(state, path)


def atomic_torch_save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
