"""Use a fine-tuned model outside fairseq: ``load_classifier(path)`` -> eval-mode module, images -> logits.

``path`` is a checkpoint the trainer wrote or a folder written by ``python -m d2v_plugin.cli.export``
(``model.safetensors`` + ``config.json``).
"""
import json
import os
from dataclasses import fields

from d2v_plugin.data.config import DataConfig, resolve_data_config
from d2v_plugin.data.device_batch import Normalized
from d2v_plugin.data.transforms import data_eval_transform
from d2v_plugin.models.checkpoints import CheckpointError, checkpoint_filter_fn, classifier_from_object, strict_load
from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig
from d2v_plugin.models.safe_load import load_file
from d2v_plugin.names import EXPORT_FORMAT, MODEL_NAME


def _build(model_cfg: dict, enc_cfg: EncoderConfig, state: dict, source: str, classes,
           data_cfg: DataConfig) -> Data2Vec2ImageClassifier:
    known = {f.name for f in fields(Data2Vec2ClassifierConfig)}
    cfg = Data2Vec2ClassifierConfig(**{k: v for k, v in model_cfg.items() if k in known})
    cfg.pretrained_checkpoint = None  # the weights come from the fine-tuned file itself
    model = Data2Vec2ImageClassifier(cfg, Data2Vec2ImageEncoder(enc_cfg))
    strict_load(model, state, source)
    model.eval()
    model.classes = list(classes or [])
    model.data_cfg = data_cfg  # what evaluate, knn and export read
    model.preprocess = Normalized(data_eval_transform(data_cfg), data_cfg)  # PIL image -> normalised float tensor
    return model


def _load_export(folder: str) -> Data2Vec2ImageClassifier:
    from safetensors.torch import load_file as load_safetensors

    config_path, weights_path = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"{folder} is not an exported model: {os.path.basename(p)} is missing")
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{config_path} is not a d2v_plugin export (format={meta.get('format')!r})")
    enc_cfg = EncoderConfig(**meta["architecture"])
    model_cfg = {"num_classes": meta["num_classes"], "pooling": meta["pooling"]}
    return _build(model_cfg, enc_cfg, load_safetensors(weights_path), weights_path, meta.get("classes"),
                  resolve_data_config(export=meta))


# how the fine-tuning code of each layout evaluated: data2vec resizes to 256 and crops 224; the
# thesis' code resizes to 224 and crops 224
FOREIGN_CROP_RATIO = {"data2vec": 0.875, "thesis": 1.0}


def load_classifier(path: str, trust: bool = False, num_heads: int | None = None, norm_eps: float | None = None,
                    crop_ratio: float | None = None) -> Data2Vec2ImageClassifier:
    """An eval-mode model mapping normalised images to logits.

    ``path``: a checkpoint fairseq-hydra-train wrote, a folder ``cli.export`` wrote, or a classifier
    another code fine-tuned: data2vec's ``mae_image_classification`` (fairseq) or the thesis' Lightning
    classifier. ``num_heads`` / ``norm_eps``: for files that do not record them (Lightning state dicts;
    data2vec's defaults are used with a warning otherwise). ``crop_ratio``: the eval crop (resize the
    shorter side to size / ratio, centre-crop size); None = the one the file's training used.

    It carries ``classes`` (class names in label order, when known), ``data_cfg`` (image size, eval crop,
    normalisation, interpolation) and ``preprocess`` (the eval transform: PIL image -> normalised tensor).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_export(path)
    obj = load_file(path, trust=trust)
    given = {k: v for k, v in (("num_heads", num_heads), ("norm_eps", norm_eps)) if v is not None}
    cfg = obj.get("cfg") if isinstance(obj, dict) else None
    model_cfg = (cfg or {}).get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict) or model_cfg.get("_name") != MODEL_NAME:
        return _load_foreign(obj, path, given, crop_ratio)
    task_cfg = cfg.get("task") or {}
    data_cfg = resolve_data_config(task=task_cfg, model=model_cfg, crop_ratio=crop_ratio)
    enc_cfg, _ = checkpoint_filter_fn(obj, path, prefix="encoder.", given=given)
    enc_cfg.image_size = data_cfg.image_size
    classes = (obj.get("task_state") or {}).get("classes")
    return _build(model_cfg, enc_cfg, obj["model"], path, classes, data_cfg)


def _load_foreign(obj, path: str, given: dict, crop_ratio) -> Data2Vec2ImageClassifier:
    """data2vec's or the thesis' fine-tuned classifier (``checkpoints.classifier_from_object``)."""
    if not isinstance(obj, dict) or not (isinstance(obj.get("model"), dict) or isinstance(obj.get("state_dict"), dict)):
        raise CheckpointError(
            f"{path} is not a fine-tuned classifier checkpoint: give a checkpoint written by fairseq-hydra-train "
            f"(this plugin's or data2vec's mae_image_classification), a thesis classifier or a folder written by "
            f"d2v_plugin.cli.export")
    enc_cfg, state = classifier_from_object(obj, path, given)
    source = "thesis" if "state_dict" in obj else "data2vec"
    model_cfg = {"num_classes": state["head.weight"].shape[0], "pooling": "mean"}
    data_cfg = resolve_data_config(image_size=enc_cfg.image_size, crop_ratio=crop_ratio or FOREIGN_CROP_RATIO[source])
    return _build(model_cfg, enc_cfg, state, path, None, data_cfg)
