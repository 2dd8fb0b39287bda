"""data2vec's own code (fairseq ``examples/data2vec``) importable in tests, with the two shims it needs on 3.11.

For tests and benchmarks only (never imported by training). REFERENCE.md section 3:
(a) dataclass fields whose default is a dataclass instance become ``default_factory``
    (Python 3.11 rejects such mutable defaults), (b) ``numpy.float`` must exist.
The reference imports itself as the top-level package ``examples``; that name is aliased to
``fairseq.examples`` rather than editing sys.path.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import sys

import numpy as np


@contextlib.contextmanager
def _mutable_dataclass_defaults_allowed():
    original = dataclasses._get_field

    def get_field(cls, name, type_, *args):
        default = cls.__dict__.get(name, dataclasses.MISSING)
        if dataclasses.is_dataclass(default) and not isinstance(default, type) and type(default).__hash__ is None:
            setattr(cls, name, dataclasses.field(default_factory=functools.partial(copy.deepcopy, default)))
        return original(cls, name, type_, *args)

    dataclasses._get_field = get_field
    try:
        yield
    finally:
        dataclasses._get_field = original


@functools.cache
def data2vec():
    """Import the reference modules once: returns a namespace with the pieces the tests use."""
    if not hasattr(np, "float"):
        np.float = float  # removed in numpy 1.24; the reference still uses it
    import fairseq  # noqa: F401

    sys.modules.setdefault("examples", importlib.import_module("fairseq.examples"))
    with _mutable_dataclass_defaults_allowed():
        d2v2 = importlib.import_module("examples.data2vec.models.data2vec2")
        mae_cls = importlib.import_module("examples.data2vec.models.mae_image_classification")
        importlib.import_module("examples.data2vec.tasks.mae_image_classification")
        importlib.import_module("examples.data2vec.tasks.mae_image_pretraining")
        mae = importlib.import_module("examples.data2vec.models.mae")
    modality = importlib.import_module("examples.data2vec.data.modality")
    return type("Data2Vec", (), {"d2v2": d2v2, "mae_cls": mae_cls, "mae": mae, "Modality": modality.Modality})


def build_data2vec_model(embed_dim=768, num_heads=12, depth=10, prenet_depth=2, image_size=224, patch_size=16,
                         mlp_ratio=4.0, seed=0):
    """A data2vec 2.0 image model as base_images_only_task.yaml configures it, with random weights
    everywhere (norm weights and biases too), in eval mode."""
    import torch

    ref = data2vec()
    cfg = ref.d2v2.Data2VecMultiConfig(
        depth=depth, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=1e-6,
        encoder_dropout=0, post_mlp_drop=0, attention_dropout=0, activation_dropout=0,
        supported_modality=ref.Modality.IMAGE, skip_ema=True, clone_batch=1, layer_norm_first=False,
    )
    img = cfg.modalities.image
    img.prenet_depth, img.num_extra_tokens, img.init_extra_token_zero = prenet_depth, 1, False
    img.input_size, img.patch_size, img.embed_dim = image_size, patch_size, embed_dim
    img.use_alibi_encoder, img.num_alibi_heads, img.model_depth = False, num_heads, depth
    img.decoder.decoder_dim = 32
    img.decoder.decoder_layers = 1
    torch.manual_seed(seed)
    model = ref.d2v2.Data2VecMultiModel(cfg, [ref.Modality.IMAGE], skip_ema=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.3 if name.endswith("weight") and p.ndim == 1 else 0.0, 0.05).add_(
                    1.0 if name.endswith("weight") and p.ndim == 1 else 0.0)
    model.eval()
    return model, cfg


def save_like_fairseq(model, cfg, path):
    """Write a checkpoint the way fairseq's trainer does (cfg as a plain dict, enums as strings)."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    full = OmegaConf.create({"model": OmegaConf.structured(cfg), "task": {"_name": "mae_image_pretraining"},
                             "optimization": {"max_update": 375300}, "common": {"seed": 1}})
    OmegaConf.set_struct(full, False)
    full.model._name = "data2vec_multi"
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(full, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 10}],
        "task_state": {},
        "extra_state": {"epoch": 1, "previous_training_time": 1.5},
        "last_optimizer_state": None,
    }
    checkpoint_utils.torch_persistent_save(state, str(path))


class ComposedReference:
    """Fallback where ``mae_image_classification`` cannot be built (see reference_classifier)."""


def reference_classifier(d2v_model, num_classes=1000, drop_path_rate=0.0):
    """data2vec's own fine-tuning model, ``mae_image_classification``, around the given data2vec 2.0
    model's weights (built from its config, as fairseq does from a checkpoint's ``cfg``).

    data2vec's constructor spaces drop-path rates over the *main* blocks and indexes them with the
    prenet depth, so it raises IndexError when there are no more main than prenet blocks (a 2 + 2
    student). Then the same computation is composed from data2vec's model: its
    ``extract_features(mode="IMAGE", mask=False)`` (CLS removed), mean, fc_norm, head, as
    ``MaeImageClassificationModel.forward`` does.
    """
    import torch

    try:
        return _mae_image_classification(d2v_model, num_classes, drop_path_rate)
    except IndexError:
        pass

    class Composed(torch.nn.Module, ComposedReference):
        def __init__(self):
            super().__init__()
            self.model = d2v_model
            self.model.remove_pretraining_modules(modality="image")
            dim = d2v_model.cfg.embed_dim
            self.fc_norm = torch.nn.LayerNorm(dim, eps=1e-6)
            self.head = torch.nn.Linear(dim, num_classes)
            torch.nn.init.trunc_normal_(self.head.weight, std=0.02)
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, images):
            x = self.model.extract_features(images, mode="IMAGE", mask=False, remove_extra_tokens=True)["x"]
            return self.head(self.fc_norm(x.mean(dim=1)))

    return Composed()


def _mae_image_classification(d2v_model, num_classes, drop_path_rate):
    from omegaconf import OmegaConf

    ref = data2vec()
    model_cfg = OmegaConf.structured(d2v_model.cfg)
    OmegaConf.set_struct(model_cfg, False)
    model_cfg._name = "data2vec_multi"
    root = OmegaConf.create({"task": {"_name": "mae_image_pretraining", "data": "/unused"}, "model": model_cfg,
                             "optimization": {"max_update": 1}, "common": {"seed": 1}})
    pretrained = OmegaConf.create(OmegaConf.to_container(root, resolve=True))  # as saved in a checkpoint's cfg
    OmegaConf.set_struct(pretrained, False)
    cfg = ref.mae_cls.MaeImageClassificationConfig(
        model_path="", num_classes=num_classes, drop_path_rate=drop_path_rate, pretrained_model_args=pretrained,
        mixup=0.0, cutmix=0.0, layer_decay=0.65,
    )
    cfg = OmegaConf.structured(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.data = "/unused"
    model = ref.mae_cls.MaeImageClassificationModel(cfg)
    state = {k: v for k, v in d2v_model.state_dict().items() if ".decoder." not in k and not k.startswith("_ema")}
    missing, unexpected = model.model.load_state_dict(state, strict=False)
    assert not unexpected and all("decoder" in k for k in missing), (missing, unexpected)
    return model
