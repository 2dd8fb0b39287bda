"""Use a fine-tuned model outside fairseq: ``load_classifier(path)`` -> eval-mode module, images -> logits."""
from __future__ import annotations

import os
from dataclasses import fields

import torch

from d2v_plugin.data.transforms import eval_transform
from d2v_plugin.models.checkpoints import CheckpointError, encoder_from_object, load_file, strict_load
from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder

MODEL_NAME = "data2vec2_image_classifier"


def classifier_config(model_cfg: dict) -> Data2Vec2ClassifierConfig:
    known = {f.name for f in fields(Data2Vec2ClassifierConfig)}
    cfg = Data2Vec2ClassifierConfig(**{k: v for k, v in model_cfg.items() if k in known})
    cfg.pretrained_checkpoint = None  # the weights come from the fine-tuned file itself
    return cfg


def load_classifier(path: str, trust: bool = False) -> Data2Vec2ImageClassifier:
    """Load a checkpoint the trainer wrote; returns an eval-mode model mapping normalised images to logits.

    The returned module carries ``classes`` (class names in label order, when the checkpoint has them)
    and ``preprocess`` (the eval transform: PIL image -> normalised tensor).
    """
    path = os.fspath(path)
    obj = load_file(path, trust=trust)
    cfg = obj.get("cfg") if isinstance(obj, dict) else None
    model_cfg = (cfg or {}).get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict) or model_cfg.get("_name") != MODEL_NAME:
        raise CheckpointError(f"{path} is not a {MODEL_NAME} checkpoint written by fairseq-hydra-train (no classifier head)")
    enc_cfg, _ = encoder_from_object(obj, path, prefix="encoder.")
    task_cfg = cfg.get("task") or {}
    image_size = model_cfg.get("image_size") or task_cfg.get("image_size") or enc_cfg.image_size
    enc_cfg.image_size = image_size
    model = Data2Vec2ImageClassifier(classifier_config(model_cfg), Data2Vec2ImageEncoder(enc_cfg))
    strict_load(model, obj["model"], path)
    model.eval()
    model.classes = list((obj.get("task_state") or {}).get("classes") or [])
    model.preprocess = eval_transform(image_size, task_cfg.get("eval_crop_ratio", 0.875))
    return model


