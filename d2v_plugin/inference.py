"""Use a fine-tuned model outside fairseq: ``load_classifier(path)`` -> eval-mode module, images -> logits.

``path`` is any classifier a reader of models/checkpoints.py knows: a checkpoint the trainer wrote, a
folder written by ``python -m d2v_plugin.cli.export`` (``model.safetensors`` + ``config.json``),
data2vec's fine-tuned ``mae_image_classification`` or the thesis' Lightning classifier.
"""
import os

from d2v_plugin.data.config import resolve_data_config
from d2v_plugin.data.device_batch import Normalized
from d2v_plugin.data.transforms import data_eval_transform
from d2v_plugin.models.architecture import check_architecture
from d2v_plugin.models.checkpoints import Checkpoint, CheckpointError, build_and_load, encoder_part, read_checkpoint
from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier, head_config
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder


def classifier_from_checkpoint(ckpt: Checkpoint, crop_ratio: float | None = None) -> Data2Vec2ImageClassifier:
    """The eval-mode classifier a checkpoint holds (its encoder and head), with the data config its
    training evaluated with (``crop_ratio`` overrides the eval crop)."""
    state = ckpt.classifier_state()
    num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else ckpt.model_cfg.get("num_classes")
    check_architecture(ckpt.architecture, ckpt.path, num_classes=num_classes)
    if ckpt.classes and len(ckpt.classes) != num_classes:  # (none recorded: the commands name them by index)
        raise CheckpointError(f"{ckpt.path} records {len(ckpt.classes):,} class names but its head has {num_classes:,} "
                              f"outputs: the names cannot be the head's classes")
    cfg = Data2Vec2ClassifierConfig(num_classes=num_classes, **head_config(ckpt.model_cfg, ckpt.path))
    try:
        data_cfg = resolve_data_config(**{"image_size": ckpt.architecture.image_size, **{
            k: v for k, v in ckpt.data.items() if v is not None}, "crop_ratio": crop_ratio or ckpt.data.get("crop_ratio")})
    except ValueError as err:
        raise CheckpointError(f"{ckpt.path}: its data config cannot be used: {err}") from None
    model = build_and_load(lambda: Data2Vec2ImageClassifier(cfg, Data2Vec2ImageEncoder(ckpt.architecture)), state,
                           ckpt.path)
    model.eval()
    model.classes = list(ckpt.classes or [])
    model.data_cfg = data_cfg  # what evaluate, knn and export read
    model.preprocess = Normalized(data_eval_transform(data_cfg), data_cfg)  # PIL image -> normalised float tensor
    return model


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
    given = {k: v for k, v in (("num_heads", num_heads), ("norm_eps", norm_eps)) if v is not None}
    return classifier_from_checkpoint(read_checkpoint(os.fspath(path), trust=trust, given=given), crop_ratio)


def load_encoder(path: str, trust: bool = False, prefix: str | None = None, num_heads: int | None = None,
                 norm_eps: float | None = None, image_size: int | None = None, crop_ratio: float | None = None,
                 interpolation: str | None = None, weights: str = "student"):
    """(eval-mode encoder, data config, the Checkpoint) of any file a reader knows: a pretrained encoder,
    a student, a classifier (its encoder) or an export folder. The data config is the one its training
    evaluated with where the file says (size, crop, interpolation), else data2vec's (resize to 256 for 224,
    bicubic); ``image_size`` resamples the positions, ``crop_ratio`` and ``interpolation`` override the file's."""
    from d2v_plugin.models.encoder import Data2Vec2ImageEncoder

    given = {k: v for k, v in (("num_heads", num_heads), ("norm_eps", norm_eps)) if v is not None}
    ckpt = read_checkpoint(os.fspath(path), trust=trust, prefix=prefix, given=given, weights=weights)
    cfg, state = encoder_part(ckpt, image_size=image_size, depth_setting="--depth")
    try:
        data_cfg = resolve_data_config(**{**{k: v for k, v in ckpt.data.items() if v is not None},
                                          "image_size": cfg.image_size, "crop_ratio": crop_ratio or ckpt.data.get("crop_ratio"),
                                          "interpolation": interpolation or ckpt.data.get("interpolation")})
    except ValueError as err:
        raise CheckpointError(f"{ckpt.path}: its data config cannot be used: {err}") from None
    encoder = build_and_load(lambda: Data2Vec2ImageEncoder(cfg), state, ckpt.path, what="the encoder").eval()
    return encoder, data_cfg, ckpt
