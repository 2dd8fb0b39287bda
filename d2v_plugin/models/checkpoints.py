"""Read Data2Vec2 image-encoder weights from the checkpoint formats users have, safely and strictly.

Accepted: (a) a fairseq data2vec 2.0 checkpoint (``cfg`` + ``model``), (b) a bare state dict, in
data2vec's or this plugin's key names, (c) a PyTorch Lightning checkpoint (``state_dict``, encoder
under a prefix such as ``model.model.``), (d) this plugin's own files: ``convert`` output and the
trainer's fine-tuned checkpoints. Files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import logging
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
PLUGIN_MODEL = "data2vec2_image_classifier"  # the fairseq model this plugin registers (models/classifier.py)
DATA2VEC_CLASSIFIER = "mae_image_classification"  # data2vec's own fine-tuning model

logger = logging.getLogger(__name__)

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


def _plain_dict(*_args):
    # collections.defaultdict(factory): its items follow; the factory (maybe a stand-in) is never needed
    return {}


_HARMLESS_GLOBALS = [
    (_enum_value, "examples.data2vec.data.modality.Modality"),
    (_plain_dict, "collections.defaultdict"),
    argparse.Namespace,
]

# Plain data types that configs pickle as type references (omegaconf records a node's element and
# reference types): given as themselves, since naming or building one runs nothing.
_DATA_TYPES = [(t, f"builtins.{t.__name__}") for t in (dict, list, tuple, set, frozenset, int, float, str, bytes,
                                                      bool, complex, object)]

# Modules whose names a checkpoint written by training code has no reason to pickle: a file that
# asks for one is refused outright (nothing of it would run either way: see ``Stored``).
REFUSED_MODULES = {"builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "runpy", "pickle",
                   "_pickle", "marshal", "socket", "ctypes", "code", "codeop", "pty", "types", "webbrowser",
                   "multiprocessing", "asyncio", "functools", "operator"}


class Stored:
    """Stands in for a class a checkpoint names that is not imported here (a Lightning run's config
    dataclass, omegaconf's containers, ...): it keeps what the file stored for the object (``args``,
    ``state``) and runs none of the class's code. torch's ``weights_only`` unpickler still does all
    the reading; these stand-ins are the only names it is given beyond its own allow-list."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}: stored, not imported>"


def _python3_name(qualname: str) -> str:
    """The name a pickled global refers to in Python 3: pickle protocol 2 writes some under their
    Python 2 names (``commands.Popen`` is ``subprocess.Popen``), and loading maps them back."""
    import _compat_pickle

    module, _, name = qualname.rpartition(".")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _stand_in(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (Stored,), {"qualname": qualname, "__module__": __name__})


def _refusal(path: str, needed: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to unpickle objects the file asks for ({needed}); loading them can run "
        f"code from the file. If you trust it, set model.trust_checkpoint=true (--trust-checkpoint "
        f"on the command line tools).")


def load_file(path: str, trust: bool = False, mmap: bool = False) -> object:
    """Read a checkpoint without running code from it.

    torch.load(weights_only=True) first; a file that names classes outside torch's allow-list (a
    Lightning checkpoint's hyper-parameters, typed by the training code's own dataclasses) is read
    again by the same unpickler with those names bound to inert ``Stored`` stand-ins, so its tensors
    come out and nothing of the file's is imported or called. A file naming modules that run code
    (os, subprocess, builtins, ...) is refused. ``trust=True`` unpickles fully (runs the file's code).
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
        return _load_with_stand_ins(path, err, mmap)
    except Exception as err:  # truncated, text, broken zip: the unpickler fails in many ways
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {_first_line(err)}") from None


def _load_with_stand_ins(path: str, err: Exception, mmap: bool) -> object:
    try:
        unknown = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: report what the unpickler said
        raise _refusal(path, _first_line(err)) from None
    data_types = {name: t for t, name in _DATA_TYPES}
    refused = [_python3_name(n) for n in unknown
               if n not in data_types and ("." not in n or _python3_name(n).split(".")[0] in REFUSED_MODULES)]
    if refused or not unknown:
        raise _refusal(path, ", ".join(refused) or _first_line(err))
    given = [(data_types[n], n) if n in data_types else (_stand_in(n), n) for n in unknown]
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS + given):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err2:
        raise _refusal(path, f"{', '.join(unknown)}: {_first_line(err2)}") from None
    stood_in = [n for n in unknown if n not in data_types]
    shown = ", ".join(stood_in[:4]) + (", ..." if len(stood_in) > 4 else "")
    logger.info(f"{path}: read without importing the {len(stood_in)} classes it names ({shown}); "
                f"their objects are kept as stored data")
    return obj


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


def read_encoder_checkpoint(
    path: str,
    depth: int | None = None,
    trust: bool = False,
    prefix: str | None = None,
    given: dict | None = None,
) -> tuple[EncoderConfig, dict]:
    """Return (architecture, encoder state dict in this plugin's key names) from any accepted format.

    ``depth=N`` keeps the first N blocks (prenet blocks first), as a distilled student is initialised.
    ``given``: architecture values the user set (``num_heads``, ``norm_eps``), used where the file
    does not record them.
    """
    return encoder_from_object(load_file(path, trust=trust), path, depth=depth, prefix=prefix, given=given)


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
        if model_cfg.get("_name") == PLUGIN_MODEL:
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
        prenet = _block_count(inner, _PRENET_BLOCK)
        state = _to_plugin_names(inner, prenet, path)
        arch = {"num_heads": d2v.get("num_heads"), "norm_eps": d2v.get("norm_eps"), "prenet_depth": prenet, **arch}
        model_cfg = {"input_size": d2v.get("input_size")}
    else:
        state = inner
        model_cfg = {}
    return _architecture(state, model_cfg, arch, path, given), state, prefix


def encoder_from_object(obj: object, path: str, depth: int | None = None, prefix: str | None = None,
                        given: dict | None = None):
    """``read_encoder_checkpoint`` on an already loaded checkpoint object."""
    tensors, model_cfg, arch = _weights_and_config(obj, path)
    enc_cfg, state, _ = _encoder(tensors, model_cfg, arch, path, prefix, given)
    if depth is not None:
        if depth < 1 or depth > enc_cfg.depth:
            raise CheckpointError(
                f"{path}: model.depth={depth} but the checkpoint has {enc_cfg.depth} blocks (choose 1..{enc_cfg.depth})"
            )
        state = {k: v for k, v in state.items() if not (m := re.match(r"^blocks\.(\d+)\.", k)) or int(m.group(1)) < depth}
        enc_cfg = replace(enc_cfg, depth=depth, prenet_depth=min(enc_cfg.prenet_depth, depth))
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
