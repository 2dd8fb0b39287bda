"""Data2Vec2 image-encoder weights from the checkpoint layouts users have, as pure functions on a loaded
checkpoint (reading one safely is models/safe_load.py's job).

Layouts: (a) a fairseq data2vec 2.0 checkpoint (``cfg`` + ``model``, pretrained or data2vec's fine-tuned
``mae_image_classification``), (b) a bare state dict in data2vec's or this plugin's key names, (c) a
PyTorch Lightning checkpoint (``state_dict``, the encoder under a prefix such as ``model.model.``; the
thesis' students and classifier), (d) this plugin's own files: ``cli.convert`` output and the trainer's
fine-tuned checkpoints. ``checkpoint_filter_fn`` finds the encoder, maps its keys to this plugin's
(one table, ``KEY_MAP``, read both ways), infers the architecture and resamples the positions to the
image size asked for, as timm's ``checkpoint_filter_fn`` does for its models.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import replace

import torch

from d2v_plugin.models.encoder import EncoderConfig
from d2v_plugin.models.safe_load import CheckpointError, load_file  # noqa: F401  (the module's public errors and reader)
from d2v_plugin.names import COMPACT_FORMAT, DATA2VEC_CLASSIFIER, MODEL_NAME

logger = logging.getLogger(__name__)

D2V = "modality_encoders.IMAGE."
# data2vec 2.0 key (or key prefix) -> this plugin's; read one way to load data2vec's files, the
# other way to write them (d2v_plugin/testing/checkpoints.py)
KEY_MAP = [
    (D2V + "local_encoder.proj.", "patch_embed.proj."),
    (D2V + "extra_tokens", "cls_token"),
    (D2V + "fixed_positional_encoder.positions", "pos_embed"),
    (D2V + "context_encoder.norm.", "norm_pre."),
]
# blocks: data2vec's prenet block i is this plugin's block i, its main block j is block prenet_depth + j
PRENET_BLOCK = re.compile(r"^" + re.escape(D2V) + r"context_encoder\.blocks\.(\d+)\.(.+)$")
MAIN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
D2V_ANCHOR = D2V + "local_encoder.proj.weight"
OUR_ANCHOR = "patch_embed.proj.weight"

# data2vec 2.0 entries that only pretraining uses: the EMA teacher, decoders, masks, other
# modalities' encoders. Dropped by rule; anything else unknown is an error.
PRETRAINING_ONLY = re.compile(
    r"^(_ema|ema\.|shared_decoder\.|recon_proj\.|modality_encoders\.(?!IMAGE\.)|"
    r"modality_encoders\.IMAGE\.(decoder\.|encoder_mask|alibi_scale|alibi_bias))"
)


def _rename(key: str, pairs) -> str | None:
    for old, new in pairs:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def to_plugin_names(weights: dict, prenet_depth: int, path: str) -> dict:
    """data2vec 2.0 encoder keys -> this plugin's (pretraining-only entries dropped, others an error)."""
    out, unknown = {}, []
    for key, value in weights.items():
        if PRETRAINING_ONLY.match(key):
            continue
        new = _rename(key, KEY_MAP)
        if (m := PRENET_BLOCK.match(key)) is not None:
            new = f"blocks.{int(m.group(1))}.{m.group(2)}"
        elif (m := MAIN_BLOCK.match(key)) is not None:
            new = f"blocks.{prenet_depth + int(m.group(1))}.{m.group(2)}"
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys in the data2vec encoder: {', '.join(sorted(unknown))}")
    return out


def to_data2vec_names(state: dict, prenet_depth: int) -> dict:
    """This plugin's encoder keys -> data2vec 2.0's (``modality_encoders.IMAGE.*`` + main ``blocks.*``)."""
    out = {}
    for key, value in state.items():
        new = _rename(key, [(ours, theirs) for theirs, ours in KEY_MAP])
        if (m := MAIN_BLOCK.match(key)) is not None:
            i = int(m.group(1))
            new = (f"{D2V}context_encoder.blocks.{i}.{m.group(2)}" if i < prenet_depth
                   else f"blocks.{i - prenet_depth}.{m.group(2)}")
        if new is None:
            raise KeyError(f"not an encoder key: {key}")
        out[new] = value
    return out


def _block_count(keys, pattern) -> int:
    ids = [int(m.group(1)) for k in keys if (m := pattern.match(k)) is not None]
    return max(ids) + 1 if ids else 0


TEACHERS = "teachers."  # the thesis' KD module saves its teacher(s) beside the student under this prefix


def _find_prefix(weights: dict, path: str, prefix: str | None) -> tuple[str, str]:
    """Locate the encoder inside a flat state dict: returns (prefix, naming). A teacher saved beside
    a distilled student (``teachers.*``) is left out and logged."""
    found = {}
    for key in weights:
        for anchor, naming in ((D2V_ANCHOR, "data2vec"), (OUR_ANCHOR, "plugin")):
            if key.endswith(anchor):
                found[key[: -len(anchor)]] = naming
    teacher_keys = [k for k in weights if k.startswith(TEACHERS)]
    if prefix is None and teacher_keys and any(not p.startswith(TEACHERS) for p in found):
        found = {p: n for p, n in found.items() if not p.startswith(TEACHERS)}
        logger.info(f"{path}: ignored the teacher saved beside the student ({len(teacher_keys)} tensors under "
                    f"'{TEACHERS}')")
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


def _architecture(state: dict, model_cfg: dict, arch: dict, path: str, given: dict | None = None) -> EncoderConfig:
    """Architecture read off the tensors' shapes, with what shapes cannot tell (heads, eps) from the
    file's config, else from ``given`` (the user's explicit settings), else data2vec's defaults with a
    warning naming the setting that overrides them."""
    given = given or {}
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
    recorded = {k: arch.get(k) or model_cfg.get(k) for k in ("num_heads", "norm_eps")}
    guessed = [k for k, v in recorded.items() if v is None and given.get(k) is None]
    heads = recorded["num_heads"] or given.get("num_heads") or max(1, dim // 64)
    eps = recorded["norm_eps"] or given.get("norm_eps") or 1e-6
    if guessed:
        what = {"num_heads": "the number of attention heads", "norm_eps": "the LayerNorm eps"}
        used = {"num_heads": f"{heads} heads (data2vec's head width of 64)", "norm_eps": f"eps {eps}"}
        logger.warning(f"{path} does not record {' or '.join(what[k] for k in guessed)}: using data2vec's "
                       f"{' and '.join(used[k] for k in guessed)}; if the model differs, set "
                       f"{' / '.join('model.' + k for k in guessed)} (--{guessed[0].replace('_', '-')} on the "
                       f"command line tools)")
    return EncoderConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=int(heads),
        mlp_ratio=float(fc1.shape[0] / dim) if fc1 is not None else float(arch.get("mlp_ratio", 4.0)),
        patch_size=patch,
        image_size=int(image_size),
        in_chans=in_chans,
        norm_eps=float(eps),
        prenet_depth=int(arch.get("prenet_depth") or 0),
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


def read_encoder_checkpoint(path: str, depth: int | None = None, trust: bool = False, prefix: str | None = None,
                            given: dict | None = None, image_size: int | None = None) -> tuple[EncoderConfig, dict]:
    """(architecture, encoder state dict in this plugin's key names) of a checkpoint file in any
    accepted layout: ``load_file`` then ``checkpoint_filter_fn``."""
    return checkpoint_filter_fn(load_file(path, trust=trust), path, depth=depth, prefix=prefix, given=given,
                                image_size=image_size)


def _weights_and_config(obj: object, path: str) -> tuple[dict, dict, dict]:
    """(flat state dict, data2vec model config, recorded architecture) of any accepted layout."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    model_cfg, arch = {}, {}
    if obj.get("format") == COMPACT_FORMAT:
        weights, arch = obj["encoder"], dict(obj.get("arch") or {})
    elif isinstance(obj.get("model"), dict):  # fairseq: data2vec 2.0 (pretrained or fine-tuned) or this plugin
        weights = obj["model"]
        cfg = obj.get("cfg") or {}
        model_cfg = dict((cfg.get("model") or {}) if isinstance(cfg, dict) else {})
        if model_cfg.get("_name") == MODEL_NAME:
            arch = {k: model_cfg.get(k) for k in ("num_heads", "norm_eps", "image_size", "prenet_depth")}
            model_cfg = {}
        elif model_cfg.get("_name") == DATA2VEC_CLASSIFIER:  # the pretrained model's config travels with it
            pretrained = model_cfg.get("pretrained_model_args") or {}
            model_cfg = dict(pretrained.get("model") or {}) if isinstance(pretrained, dict) else {}
    elif isinstance(obj.get("state_dict"), dict):  # PyTorch Lightning
        weights = obj["state_dict"]
    else:
        weights = obj
    if not all(isinstance(k, str) for k in weights):
        raise CheckpointError(f"{path} is not a checkpoint: its state dict has keys that are not names")
    # the thesis' earlier KD module saved its student's modality encoder as "image", not "IMAGE"
    tensors = {k.replace("modality_encoders.image.", "modality_encoders.IMAGE."): v
               for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} is not a checkpoint: no tensors found under 'model', 'state_dict' or at the top level")
    return tensors, model_cfg, arch


def _encoder(tensors: dict, model_cfg: dict, arch: dict, path: str, prefix: str | None, given: dict | None):
    """(architecture, encoder state in this plugin's names, the prefix it was found under)."""
    prefix, naming = _find_prefix(tensors, path, prefix)
    inner = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if naming == "data2vec":
        d2v = _check_data2vec_cfg(model_cfg, path) if model_cfg.get("modalities") else {}
        prenet = _block_count(inner, PRENET_BLOCK)
        state = to_plugin_names(inner, prenet, path)
        arch = {"num_heads": d2v.get("num_heads"), "norm_eps": d2v.get("norm_eps"), "prenet_depth": prenet, **arch}
        model_cfg = {"input_size": d2v.get("input_size")}
    else:
        state = inner
        model_cfg = {}
    return _architecture(state, model_cfg, arch, path, given), state, prefix


def resample_positions(positions: torch.Tensor, grid: int) -> torch.Tensor:
    """Fixed positions saved for another square grid -> ``grid`` x ``grid``, bicubic (timm's
    ``resample_abs_pos_embed``, as MAE and timm do when fine-tuning at another resolution)."""
    from timm.layers import resample_abs_pos_embed

    old = math.isqrt(positions.shape[1])
    if old * old != positions.shape[1]:
        raise CheckpointError(f"positions for {positions.shape[1]} patches are not a square grid")
    if old == grid:
        return positions
    return resample_abs_pos_embed(positions, new_size=[grid, grid], old_size=[old, old], num_prefix_tokens=0)


def checkpoint_filter_fn(obj: object, path: str, depth: int | None = None, prefix: str | None = None,
                         given: dict | None = None, image_size: int | None = None) -> tuple[EncoderConfig, dict]:
    """A loaded checkpoint -> (architecture, encoder state in this plugin's key names). ``depth=N`` keeps
    the first N blocks (prenet blocks first), as a distilled student is initialised; ``given``: the
    architecture values the user set (``num_heads``, ``norm_eps``), used where the file does not record
    them; ``image_size``: the positions are resampled to its grid."""
    tensors, model_cfg, arch = _weights_and_config(obj, path)
    enc_cfg, state, _ = _encoder(tensors, model_cfg, arch, path, prefix, given)
    if depth is not None:
        if depth < 1 or depth > enc_cfg.depth:
            raise CheckpointError(
                f"{path}: model.depth={depth} but the checkpoint has {enc_cfg.depth} blocks (choose 1..{enc_cfg.depth})"
            )
        state = {k: v for k, v in state.items() if not (m := re.match(r"^blocks\.(\d+)\.", k)) or int(m.group(1)) < depth}
        enc_cfg = replace(enc_cfg, depth=depth, prenet_depth=min(enc_cfg.prenet_depth, depth))
    if image_size and image_size != enc_cfg.image_size:
        if image_size % enc_cfg.patch_size:
            raise CheckpointError(f"image size {image_size} is not a multiple of the patch size {enc_cfg.patch_size}")
        state = {**state, "pos_embed": resample_positions(state["pos_embed"], image_size // enc_cfg.patch_size)}
        enc_cfg = replace(enc_cfg, image_size=image_size)
    return enc_cfg, state


HEAD_NORM_NAMES = ("fc_norm", "head_norm")  # data2vec's mae_image_classification, the thesis' classifier


def classifier_from_object(obj: object, path: str, given: dict | None = None) -> tuple[EncoderConfig, dict]:
    """A fine-tuned classifier another code wrote, as (architecture, state dict in this plugin's
    classifier names: ``encoder.*``, ``fc_norm.*``, ``head.*``): data2vec's ``mae_image_classification``
    (fairseq; encoder under ``model.``, then ``fc_norm``, ``head``) or the thesis' Lightning classifier
    (encoder under ``model.model.model.``, then ``model.head_norm``, ``model.head``). Both pool the
    mean of all tokens but CLS, as this plugin's model does. Tensors of neither part are an error."""
    tensors, model_cfg, arch = _weights_and_config(obj, path)
    enc_cfg, enc_state, prefix = _encoder(tensors, model_cfg, arch, path, None, given)
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    found = {}
    for key in rest:
        for ours, names in (("fc_norm", HEAD_NORM_NAMES), ("head", ("head",))):
            for name in names:
                for leaf in ("weight", "bias"):
                    if key == f"{name}.{leaf}" or key.endswith(f".{name}.{leaf}"):
                        found[f"{ours}.{leaf}"] = key
    if set(found) != {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}:
        raise CheckpointError(
            f"{path} holds an encoder but no classifier head (looked for {' or '.join(HEAD_NORM_NAMES)} and head "
            f"beside it): give a fine-tuned checkpoint, or use the file as model.pretrained_checkpoint")
    unused = sorted(set(rest) - set(found.values()))
    if unused:
        raise CheckpointError(f"{path}: unexpected tensors beside the encoder and its head: {', '.join(unused)}")
    state = {f"encoder.{k}": v for k, v in enc_state.items()}
    state.update({ours: rest[key] for ours, key in found.items()})
    return enc_cfg, state


def strict_load(module: torch.nn.Module, state: dict, source: str, what: str = "the model") -> None:
    """load_state_dict(strict=True), but every offending key is named in one error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
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
