"""The checkpoint layouts users bring, one reader each, registered in one list (``READERS``): each says
whether a loaded file is its layout and gives a ``Checkpoint``: the encoder's weights in this plugin's
key names, the architecture, the classifier head beside it if there is one, what its training
evaluated with, and the training step the file was written at. ``read_checkpoint`` detects the layout
once; every command and the task read files through it. Readers never import the model: the encoder
builds itself from what they give (``Data2Vec2ImageEncoder.from_pretrained``).

Layouts: this plugin's trained checkpoints and ``cli.convert``'s encoder files, its export folders,
data2vec 2.0's pretraining checkpoints and its fine-tuned ``mae_image_classification``, the thesis'
PyTorch Lightning classifier and KD students (and their earlier ``KDData2Vec`` layout), and bare state
dicts in data2vec's or this plugin's names. Reading a file safely is models/safe_load.py's job; the
bounds on what a file may claim are d2v_plugin/limits.py's.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field, replace

import torch

from d2v_plugin.models.architecture import EncoderConfig, check_architecture, encoder_config
from d2v_plugin.models.safe_load import CheckpointError, load_file, read_json, shown
from d2v_plugin.names import (COMPACT_FORMAT, DATA2VEC_CLASSIFIER, DATA2VEC_PRETRAINING_MODEL, EXPORT_FORMAT,
                              MODEL_NAME)

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
TEACHERS = "teachers."  # the thesis' KD module saves its teacher(s) beside the student under this prefix
HEAD_NORM_NAMES = ("fc_norm", "head_norm")  # data2vec's mae_image_classification, the thesis' classifier
# how the fine-tuning code of each layout evaluated: data2vec resizes to 256 and crops 224; the
# thesis' code resizes to 224 and crops 224
FOREIGN_CROP_RATIO = {"data2vec": 0.875, "thesis": 1.0}


@dataclass
class Checkpoint:
    """What a layout reader gives: enough to build the encoder (and the classifier, where ``head`` is
    there) and to say where the file came from, without the code that wrote it."""

    path: str
    layout: str  # the reader's name
    encoder: dict  # the encoder's weights, this plugin's key names
    architecture: EncoderConfig
    head: dict | None = None  # the classifier's other weights (fc_norm.*, head.*, ...), or None
    model_cfg: dict = field(default_factory=dict)  # classifier settings: num_classes, pooling (this plugin's: all)
    data: dict = field(default_factory=dict)  # what its training evaluated with: image_size, crop_ratio, ...
    classes: list | None = None
    step: int | None = None  # the training update (fairseq) or global step (Lightning) it was written at
    epoch: int | None = None

    def classifier_state(self) -> dict:
        """The classifier's weights in this plugin's names: ``encoder.*`` and the head's."""
        if self.head is None:
            raise CheckpointError(
                f"{self.path} holds an encoder but no classifier head ({self.layout}): give a fine-tuned "
                f"checkpoint, or use the file as model.pretrained_checkpoint")
        return {**{f"encoder.{k}": v for k, v in self.encoder.items()}, **self.head}


# --- key names ------------------------------------------------------------------------------------

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
        raise CheckpointError(f"{path}: unexpected keys in the data2vec encoder: {_names(unknown)}")
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


def _names(keys, limit: int = 20) -> str:
    keys = sorted(shown(k) for k in keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _block_count(keys, pattern) -> int:
    ids = [int(m.group(1)) for k in keys if (m := pattern.match(k)) is not None]
    return max(ids) + 1 if ids else 0


# --- what the layouts share -----------------------------------------------------------------------

def _tensors(weights: dict, path: str) -> dict:
    if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
        raise CheckpointError(f"{path} is not a checkpoint: its state dict has keys that are not names")
    # the thesis' earlier KD module saved its student's modality encoder as "image", not "IMAGE"
    tensors = {k.replace("modality_encoders.image.", "modality_encoders.IMAGE."): v
               for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} is not a checkpoint: no tensors found under 'model', 'state_dict' or at "
                              f"the top level")
    return tensors


def find_prefix(weights: dict, path: str, prefix: str | None) -> tuple[str, str]:
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
                f"{path}: no encoder under prefix {shown(prefix)!r} (model.checkpoint_prefix, --prefix); encoders "
                f"found under: {_names(found) or 'none'}")
        return prefix, found[prefix]
    if not found:
        raise CheckpointError(
            f"{path}: no Data2Vec2 image encoder found (looked for a key ending in '{D2V_ANCHOR}' or '{OUR_ANCHOR}')")
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: several encoders found, under prefixes {_names(found)}; choose one with "
            f"model.checkpoint_prefix (--prefix)")
    return next(iter(found.items()))


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
    return {"num_heads": model_cfg.get("num_heads"), "norm_eps": model_cfg.get("norm_eps"),
            "image_size": image.get("input_size")}


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _architecture(state: dict, recorded: dict, path: str, given: dict | None = None) -> EncoderConfig:
    """Architecture read off the tensors' shapes, with what shapes cannot tell (heads, eps) from the
    file's config, else from ``given`` (the user's explicit settings), else data2vec's defaults with a
    warning naming the setting that overrides them; bounded (architecture.check_architecture)."""
    given = given or {}
    try:
        weight = state["patch_embed.proj.weight"]
        dim, in_chans, patch, patch_w = weight.shape
    except KeyError as err:
        raise CheckpointError(f"{path}: missing key {shown(err.args[0])} in the encoder") from None
    except ValueError:
        raise CheckpointError(f"{path}: the patch embedding has shape {tuple(weight.shape)}, not 4-D") from None
    if patch != patch_w:
        raise CheckpointError(f"{path}: non-square patches ({patch}x{patch_w}) are not a data2vec 2.0 encoder")
    grid = state["pos_embed"].shape[1] if "pos_embed" in state and state["pos_embed"].ndim == 3 else None
    depth = _block_count(state, MAIN_BLOCK)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    image_size = _number(recorded.get("image_size"))
    if image_size is None:
        image_size = int(round((grid or 196) ** 0.5)) * patch
    values = {k: _number(recorded.get(k)) for k in ("num_heads", "norm_eps")}
    guessed = [k for k, v in values.items() if v is None and given.get(k) is None]
    heads = values["num_heads"] or given.get("num_heads") or max(1, dim // 64)
    eps = values["norm_eps"] or given.get("norm_eps") or 1e-6
    if guessed:
        what = {"num_heads": "the number of attention heads", "norm_eps": "the LayerNorm eps"}
        used = {"num_heads": f"{heads} heads (data2vec's head width of 64)", "norm_eps": f"eps {eps}"}
        logger.warning(f"{path} does not record {' or '.join(what[k] for k in guessed)}: using data2vec's "
                       f"{' and '.join(used[k] for k in guessed)}; if the model differs, set "
                       f"{' / '.join('model.' + k for k in guessed)} (--{guessed[0].replace('_', '-')} on the "
                       f"command line tools)")
    mlp_ratio = float(fc1.shape[0] / dim) if fc1 is not None and fc1.ndim == 2 else \
        float(_number(recorded.get("mlp_ratio")) or 4.0)
    cfg = EncoderConfig(embed_dim=int(dim), depth=depth, num_heads=int(heads), mlp_ratio=mlp_ratio,
                        patch_size=int(patch), image_size=int(image_size), in_chans=int(in_chans), norm_eps=float(eps),
                        prenet_depth=int(_number(recorded.get("prenet_depth")) or 0))
    return check_architecture(cfg, path)


OUR_ENCODER_KEY = re.compile(r"^(patch_embed\.|cls_token$|pos_embed$|norm_pre\.|blocks\.)")
D2V_ENCODER_KEY = re.compile(r"^(" + re.escape(D2V) + r"|blocks\.|" + PRETRAINING_ONLY.pattern[2:-1] + r")")


def _encoder(tensors: dict, recorded: dict, path: str, prefix: str | None, given: dict | None, d2v_cfg=None):
    """(architecture, encoder state in this plugin's names, the tensors beside the encoder)."""
    prefix, naming = find_prefix(tensors, path, prefix)
    is_encoder_key = D2V_ENCODER_KEY if naming == "data2vec" else OUR_ENCODER_KEY
    inner = {k[len(prefix):]: v for k, v in tensors.items()
             if k.startswith(prefix) and is_encoder_key.match(k[len(prefix):])}
    rest = {k: v for k, v in tensors.items() if not (k.startswith(prefix) and k[len(prefix):] in inner)}
    if naming == "data2vec":
        d2v = _check_data2vec_cfg(d2v_cfg, path) if d2v_cfg and d2v_cfg.get("modalities") else {}
        prenet = _block_count(inner, PRENET_BLOCK)
        state = to_plugin_names(inner, prenet, path)
        recorded = {**d2v, "prenet_depth": prenet, **{k: v for k, v in recorded.items() if v is not None}}
    else:
        state = inner
    return _architecture(state, recorded, path, given), state, rest


def _head(rest: dict, path: str) -> dict | None:
    """The classifier head among the tensors beside the encoder (a LayerNorm named fc_norm or head_norm,
    then a Linear named head) in this plugin's names, or None when there is none; other tensors beside
    a head are an error."""
    found = {}
    for key in rest:
        for ours, names in (("fc_norm", HEAD_NORM_NAMES), ("head", ("head",))):
            for name in names:
                for leaf in ("weight", "bias"):
                    if key == f"{name}.{leaf}" or key.endswith(f".{name}.{leaf}"):
                        found[f"{ours}.{leaf}"] = key
    if set(found) != {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}:
        if rest:
            logger.info(f"{path}: ignored {len(rest)} tensors beside the encoder that are not a classifier head: "
                        f"{_names(rest, 6)}")
        return None
    unused = sorted(set(rest) - set(found.values()))
    if unused:
        raise CheckpointError(f"{path}: unexpected tensors beside the encoder and its head: {_names(unused)}")
    return {ours: rest[key] for ours, key in found.items()}


def _fairseq_step(obj: dict):
    history = obj.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        return _number(history[-1].get("num_updates"))
    return None


def _fairseq_epoch(obj: dict):
    """The epoch fairseq was in when it wrote the file, as its log and the file's name say it. The saved
    iterator points at where training resumes: after an epoch's last update that is the next epoch, at
    iteration 0 (``EpochBatchIterator.state_dict``), so the epoch written in is one less."""
    extra = obj.get("extra_state")
    if not isinstance(extra, dict):
        return None
    itr = extra.get("train_iterator")
    if not isinstance(itr, dict):
        return _number(extra.get("epoch"))
    epoch, within = _number(itr.get("epoch")), _number(itr.get("iterations_in_epoch"))
    if epoch is not None and within == 0 and epoch > 1:
        return epoch - 1
    return epoch


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


# --- the readers ----------------------------------------------------------------------------------

class Reader:
    """One layout. ``detect(obj)``: whether a loaded file is this layout; ``read(obj, path, prefix,
    given)``: its Checkpoint."""

    name = ""

    def detect(self, obj) -> bool:
        raise NotImplementedError

    def read(self, obj, path: str, prefix: str | None, given: dict | None) -> Checkpoint:
        raise NotImplementedError


class PluginTrained(Reader):
    """A checkpoint fairseq-hydra-train wrote with this plugin: ``cfg.model`` records the architecture,
    ``model`` holds ``encoder.*`` and the head, ``task_state`` the class names."""

    name = "d2v_plugin fine-tuned"

    def detect(self, obj) -> bool:
        return isinstance(obj, dict) and _dict(_dict(obj.get("cfg")).get("model")).get("_name") == MODEL_NAME

    def read(self, obj, path, prefix, given):
        cfg = obj["cfg"]
        model_cfg, task_cfg = dict(cfg["model"]), _dict(cfg.get("task"))
        tensors = _tensors(obj.get("model"), path)
        recorded = {k: model_cfg.get(k) for k in ("num_heads", "norm_eps", "image_size", "prenet_depth", "mlp_ratio")}
        arch, encoder, head = _encoder(tensors, recorded, path, prefix or "encoder.", given)
        num_classes = _number(model_cfg.get("num_classes"))
        check_architecture(arch, path, num_classes=num_classes)
        data = {"image_size": task_cfg.get("image_size"), "crop_ratio": task_cfg.get("eval_crop_ratio"),
                "interpolation": task_cfg.get("interpolation")}
        classes = _dict(obj.get("task_state")).get("classes")
        return Checkpoint(path, self.name, encoder, arch, head or None, model_cfg, data,
                          list(classes) if isinstance(classes, list) else None, _fairseq_step(obj), _fairseq_epoch(obj))


class CompactEncoder(Reader):
    """``cli.convert``'s encoder file: weights + architecture."""

    name = "d2v_plugin encoder"

    def detect(self, obj) -> bool:
        return isinstance(obj, dict) and obj.get("format") == COMPACT_FORMAT

    def read(self, obj, path, prefix, given):
        arch = encoder_config(_dict(obj.get("arch")), path)
        recorded = {k: getattr(arch, k) for k in ("num_heads", "norm_eps", "image_size", "prenet_depth", "mlp_ratio")}
        arch, encoder, _ = _encoder(_tensors(obj.get("encoder"), path), recorded, path, prefix, given)
        return Checkpoint(path, self.name, encoder, arch, step=_number(obj.get("step")))


class Data2VecFineTuned(Reader):
    """data2vec's ``mae_image_classification`` (fairseq): the pretrained model's config under
    ``cfg.model.pretrained_model_args``, the encoder under ``model.``, then ``fc_norm`` and ``head``."""

    name = "data2vec fine-tuned"

    def detect(self, obj) -> bool:
        return isinstance(obj, dict) and _dict(_dict(obj.get("cfg")).get("model")).get("_name") == DATA2VEC_CLASSIFIER

    def read(self, obj, path, prefix, given):
        model_cfg = obj["cfg"]["model"]
        d2v_cfg = _dict(_dict(model_cfg.get("pretrained_model_args")).get("model"))
        tensors = _tensors(obj.get("model"), path)
        arch, encoder, rest = _encoder(tensors, {}, path, prefix, given, d2v_cfg)
        head = _head(rest, path)
        return Checkpoint(path, self.name, encoder, arch, head, {"pooling": "mean"},
                          {"crop_ratio": FOREIGN_CROP_RATIO["data2vec"]}, None, _fairseq_step(obj), _fairseq_epoch(obj))


class Data2VecPretrained(Reader):
    """A fairseq data2vec 2.0 checkpoint (``data2vec_multi``, pretrained): ``cfg`` + ``model`` (or any
    file holding its weights under ``model``). Its teacher is there too: ``model["_ema"]``, the EMA module's
    fp32 copy of the model without its decoder (data2vec's ``state_dict``; the image configs'
    ``ema_encoder_only: false``), read with ``weights="ema"``. Without ``ema_local_encoder`` the copy has no
    patch embedding: the teacher reads the student's (``forward``: ``extractor_out["local_features"]``), so
    the EMA encoder is the student's patch embedding under the EMA's tokens, positions and blocks."""

    name = "data2vec pretraining"

    def detect(self, obj) -> bool:
        return isinstance(obj, dict) and isinstance(obj.get("model"), dict)

    def read(self, obj, path, prefix, given, weights: str = "student"):
        d2v_cfg = _dict(_dict(obj.get("cfg")).get("model"))
        name = d2v_cfg.get("_name")
        if name not in (None, DATA2VEC_PRETRAINING_MODEL):
            logger.info(f"{path}: a fairseq checkpoint of model {shown(name)!r}: its Data2Vec2 image encoder is read")
        tensors = _tensors(obj["model"], path)
        if weights == "ema":
            tensors = _ema_tensors(obj["model"], tensors, path)
        arch, encoder, rest = _encoder(tensors, {}, path, prefix, given, d2v_cfg)
        head = _head(rest, path)
        layout = self.name if name == DATA2VEC_PRETRAINING_MODEL else "fairseq checkpoint"
        return Checkpoint(path, layout, encoder, arch, head, {"pooling": "mean"} if head else {},
                          step=_fairseq_step(obj), epoch=_fairseq_epoch(obj))


def _ema_tensors(model: dict, student: dict, path: str) -> dict:
    """The EMA teacher's encoder weights of a data2vec pretraining checkpoint, in data2vec's names: its
    ``_ema`` copy, with the student's patch embedding where the copy has none (ema_local_encoder false)."""
    ema = model.get("_ema")
    if not isinstance(ema, dict) or not any(isinstance(v, torch.Tensor) for v in ema.values()):
        raise CheckpointError(f"{path} holds no EMA teacher weights (no '_ema' in its model): it has one encoder, "
                              f"give --weights student (model.pretrained_weights=student)")
    tensors = _tensors(ema, path)
    local = D2V + "local_encoder."
    if not any(k.startswith(local) for k in tensors):
        tensors.update({k: v for k, v in student.items() if k.startswith(local)})
    return tensors


class Lightning(Reader):
    """A PyTorch Lightning checkpoint (``state_dict``, ``global_step``): the thesis' KD students (the
    encoder under ``model.model.``; the earlier ``KDData2Vec`` under ``model.`` with its teacher under
    ``teachers.*``, ignored) and its classifier (encoder under ``model.model.model.``, then
    ``model.head_norm`` and ``model.head``). Its pickled hyper-parameters are never imported."""

    name = "Lightning"

    def detect(self, obj) -> bool:
        return isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)

    def read(self, obj, path, prefix, given):
        tensors = _tensors(obj["state_dict"], path)
        arch, encoder, rest = _encoder(tensors, {}, path, prefix, given)
        head = _head({k: v for k, v in rest.items() if not k.startswith(TEACHERS)}, path)
        return Checkpoint(path, "thesis classifier" if head else "Lightning student", encoder, arch, head,
                          {"pooling": "mean"}, {"crop_ratio": FOREIGN_CROP_RATIO["thesis"]} if head else {}, None,
                          _number(obj.get("global_step")), _number(obj.get("epoch")))


class BareStateDict(Reader):
    """``torch.save(model.state_dict())``: data2vec's or this plugin's key names, at the top level or
    under one prefix."""

    name = "state dict"

    def detect(self, obj) -> bool:
        return isinstance(obj, dict)

    def read(self, obj, path, prefix, given):
        tensors = _tensors(obj, path)
        arch, encoder, rest = _encoder(tensors, {}, path, prefix, given)
        head = _head(rest, path)
        return Checkpoint(path, self.name, encoder, arch, head, {"pooling": "mean"} if head else {})


READERS = [PluginTrained(), CompactEncoder(), Data2VecFineTuned(), Data2VecPretrained(), Lightning(), BareStateDict()]


class ExportFolder:
    """A folder ``cli.export`` wrote: ``model.safetensors`` + ``config.json`` (no pickle involved)."""

    name = "d2v_plugin export"

    def read(self, folder: str, prefix=None, given=None) -> Checkpoint:
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        config_path, weights_path = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
        for p in (config_path, weights_path):
            if not os.path.isfile(p):
                raise CheckpointError(f"{folder} is not an exported model: {os.path.basename(p)} is missing")
        meta = read_json(config_path)
        if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{config_path} is not a d2v_plugin export (format={shown(got)!r})")
        arch = check_architecture(encoder_config(meta.get("architecture"), config_path), config_path,
                                  num_classes=_number(meta.get("num_classes")) or 0)
        try:
            state = load_safetensors(weights_path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{weights_path} is not a readable safetensors file: {err}") from None
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        head = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        model_cfg = {k: meta[k] for k in ("num_classes", "pooling", "head") if k in meta}
        data = {k: meta.get(m) for k, m in (("image_size", "image_size"), ("crop_ratio", "eval_crop_ratio"),
                                            ("mean", "mean"), ("std", "std"), ("interpolation", "interpolation"))}
        classes = meta.get("classes")
        return Checkpoint(weights_path, self.name, encoder, arch, head, model_cfg, data,
                          list(classes) if isinstance(classes, list) else None, _number(meta.get("step")))


WEIGHTS = ("student", "ema")


def read_checkpoint(path: str, trust: bool = False, prefix: str | None = None, given: dict | None = None,
                    mmap: bool = False, weights: str = "student") -> Checkpoint:
    """Any checkpoint layout users have, read safely and detected once (``READERS``); an export folder
    too. ``given``: the architecture values the user set (``num_heads``, ``norm_eps``), used where the
    file does not record them. ``weights``: ``student`` (the model trained), or ``ema`` (a data2vec
    pretraining checkpoint's EMA teacher). Non-finite weights are named in a warning."""
    path = os.fspath(path)
    if weights not in WEIGHTS:
        raise CheckpointError(f"--weights {weights!r} (model.pretrained_weights): use student or ema")
    if os.path.isdir(path):
        ckpt = ExportFolder().read(path, prefix, given)
    else:
        obj = load_file(path, trust=trust, mmap=mmap)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
        reader = next(r for r in READERS if r.detect(obj))
        if weights == "ema" and not isinstance(reader, Data2VecPretrained):
            raise CheckpointError(f"{path} holds no EMA teacher weights (a {reader.name} checkpoint: only data2vec "
                                  f"2.0's pretraining checkpoints carry '_ema'): give --weights student")
        ckpt = reader.read(obj, path, prefix, given, weights) if weights == "ema" else reader.read(obj, path, prefix,
                                                                                                   given)
        if weights == "ema":
            ckpt = replace(ckpt, layout=f"{ckpt.layout} (EMA teacher)")
    bad = non_finite({**ckpt.encoder, **(ckpt.head or {})})
    if bad:
        logger.warning(f"{path}: {len(bad)} tensors hold NaN or inf values: {_names(bad, 8)}; its outputs will "
                       f"not be numbers")
    return ckpt


def non_finite(state: dict) -> list[str]:
    """The floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


# --- the encoder's part: depth, image size ---------------------------------------------------------

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


def encoder_part(ckpt: Checkpoint, depth: int | None = None, image_size: int | None = None,
                 depth_setting: str = "model.depth") -> tuple[EncoderConfig, dict]:
    """(architecture, encoder state) of a checkpoint, its first ``depth`` blocks kept (prenet blocks first:
    how a distilled student is initialised from its teacher) and its positions resampled to ``image_size``.
    ``depth_setting``: the setting's name in messages (``--depth`` on the command line)."""
    cfg, state = ckpt.architecture, ckpt.encoder
    if depth is not None:
        if not 1 <= depth <= cfg.depth:
            raise CheckpointError(f"{ckpt.path}: {depth_setting}={depth} but the checkpoint has {cfg.depth} blocks "
                                  f"(choose 1..{cfg.depth})")
        state = {k: v for k, v in state.items() if not (m := MAIN_BLOCK.match(k)) or int(m.group(1)) < depth}
        cfg = replace(cfg, depth=depth, prenet_depth=min(cfg.prenet_depth, depth))
    if image_size and image_size != cfg.image_size:
        cfg = check_architecture(replace(cfg, image_size=image_size), f"{ckpt.path} at image size {image_size}")
        state = {**state, "pos_embed": resample_positions(state["pos_embed"], image_size // cfg.patch_size)}
    return cfg, state


def read_encoder_checkpoint(path: str, depth: int | None = None, trust: bool = False, prefix: str | None = None,
                            given: dict | None = None, image_size: int | None = None,
                            depth_setting: str = "model.depth", weights: str = "student") -> tuple[EncoderConfig, dict]:
    """(architecture, encoder state dict in this plugin's key names) of a checkpoint in any layout."""
    return encoder_part(read_checkpoint(path, trust=trust, prefix=prefix, given=given, weights=weights), depth,
                        image_size, depth_setting)


# --- loading into a module ------------------------------------------------------------------------

def state_problems(expected: dict, state: dict) -> list[str]:
    """What keeps ``state`` from loading strictly into a module whose state has ``expected``'s keys
    and shapes: each offending key named."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{shown(k)} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {', '.join(mismatched[:20])}")
    return problems


def build_and_load(build, state: dict, source: str, what: str = "the model") -> torch.nn.Module:
    """``build()``'s module with ``state`` loaded strictly, every bad key named in one error. The module
    is first built on the meta device (no memory) and checked against the file's tensors, so a file
    claiming a model it does not hold the weights of is refused before anything is allocated."""
    with torch.device("meta"):
        problems = state_problems(build().state_dict(), state)
    if problems:
        raise CheckpointError(f"{source}: cannot load {what}: {'; '.join(problems)}")
    module = build()
    module.load_state_dict(state, strict=True)
    return module


def strict_load(module: torch.nn.Module, state: dict, source: str, what: str = "the model") -> None:
    """load_state_dict(strict=True) into a module already built, every offending key named in one error."""
    problems = state_problems(module.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source}: cannot load {what}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)
