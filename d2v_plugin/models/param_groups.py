"""Parameter-group policy: which parameters are decayed and at what lr scale, as one pure function (MAE's
``param_groups_lrd``), and the small adapter that hands it to fairseq's composite optimizer."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

EMBEDDING_RULES = ("full", "decayed")


def param_groups_lrd(named_params, no_weight_decay: set, layer_id, num_layers: int, layer_decay: float = 1.0,
                     embeddings: str = "full", decayed: set = frozenset()) -> dict[str, tuple[str, float]]:
    """name -> (group, lr_scale) for every trainable parameter.

    group: ``no_decay`` for 1-D parameters (norms, biases) and the names in ``no_weight_decay``,
    ``default`` otherwise and for the names in ``decayed`` (a 1-D parameter that is a weight: the attentive
    head's query, which V-JEPA decays). lr_scale: ``layer_decay ** (num_layers + 1 - layer_id(name))``, so block i of N
    (layer i + 1) gets layer_decay^(N - i) and the head (layer N + 1) the full lr; the embedding (layer 0)
    gets layer_decay^(N + 1) with ``embeddings="decayed"`` (MAE's rule, the thesis' code) or the full lr
    with ``"full"`` (data2vec's ``mae_image_classification`` only scales its blocks)."""
    if embeddings not in EMBEDDING_RULES:
        raise ValueError(f"model.layer_decay_embeddings={embeddings!r}: use one of {', '.join(EMBEDDING_RULES)}")
    rules = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        group = "no_decay" if (p.ndim == 1 and name not in decayed) or name in no_weight_decay else "default"
        layer = layer_id(name)
        if layer == 0 and embeddings == "full":
            layer = num_layers + 1
        rules[name] = (group, layer_decay ** (num_layers + 1 - layer))
    return rules


def tag_for_composite(named_params, rules: dict) -> None:
    """Tag parameters so fairseq's ``composite`` optimizer (``dynamic_groups``) builds the groups:
    ``param_group`` picks the recipe's optimizer group, ``optim_overrides`` carries the lr scale.
    (fairseq's composite optimizer ignores ``weight_decay_scale`` overrides, so no decay goes through
    the group instead.) Logs what goes where, by group name."""
    summary = {}
    for name, p in named_params:
        if name not in rules:
            continue
        group, scale = rules[name]
        p.param_group = group
        if scale != 1.0:
            p.optim_overrides = {"optimizer": {"lr_scale": scale}}
        elif hasattr(p, "optim_overrides"):
            del p.optim_overrides
        label = f"{group} lr_scale={scale:.4g}"
        count, names = summary.get(label, (0, []))
        summary[label] = (count + p.numel(), names + [name])
    for label, (count, names) in summary.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} tensors)" if len(names) > 4 else "")
        logger.info(f"param group {label}: {count:,} params: {shown}")
