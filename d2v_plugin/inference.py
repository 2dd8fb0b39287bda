"""Use a fine-tuned model outside fairseq: ``load_classifier(path)`` -> eval-mode module, images -> logits.

``path`` is a checkpoint the trainer wrote or a folder written by ``python -m d2v_plugin.cli.export``
(``model.safetensors`` + ``config.json``).
"""
import json
import os
from dataclasses import fields

from d2v_plugin.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalized, eval_transform
from d2v_plugin.models.checkpoints import (CheckpointError, classifier_from_object, encoder_from_object, load_file,
                                           strict_load)
from d2v_plugin.models.classifier import MODEL_NAME, Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig

EXPORT_FORMAT = "d2v_plugin_classifier"


def _build(model_cfg: dict, enc_cfg: EncoderConfig, state: dict, source: str, classes, crop_ratio,
           mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Data2Vec2ImageClassifier:
    known = {f.name for f in fields(Data2Vec2ClassifierConfig)}
    cfg = Data2Vec2ClassifierConfig(**{k: v for k, v in model_cfg.items() if k in known})
    cfg.pretrained_checkpoint = None  # the weights come from the fine-tuned file itself
    model = Data2Vec2ImageClassifier(cfg, Data2Vec2ImageEncoder(enc_cfg))
    strict_load(model, state, source)
    model.eval()
    model.classes = list(classes or [])
    model.image_size, model.crop_ratio, model.mean, model.std = enc_cfg.image_size, crop_ratio, tuple(mean), tuple(std)
    model.transform = eval_transform(enc_cfg.image_size, crop_ratio, mean=mean, std=std)  # uint8, for datasets
    model.preprocess = Normalized(model.transform)  # PIL image -> normalised float tensor
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
                  meta["eval_crop_ratio"], meta["mean"], meta["std"])


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

    It carries ``classes`` (class names in label order, when known) and ``preprocess`` (the eval
    transform: PIL image -> normalised tensor), plus ``transform`` (the same without normalisation, as
    ``ImageFolderDataset`` takes it), ``image_size``, ``crop_ratio``, ``mean``, ``std``.
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
    enc_cfg, _ = encoder_from_object(obj, path, prefix="encoder.", given=given)
    task_cfg = cfg.get("task") or {}
    enc_cfg.image_size = model_cfg.get("image_size") or task_cfg.get("image_size") or enc_cfg.image_size
    classes = (obj.get("task_state") or {}).get("classes")
    return _build(model_cfg, enc_cfg, obj["model"], path, classes,
                  crop_ratio or task_cfg.get("eval_crop_ratio", 0.875))


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
    return _build(model_cfg, enc_cfg, state, path, None, crop_ratio or FOREIGN_CROP_RATIO[source])
