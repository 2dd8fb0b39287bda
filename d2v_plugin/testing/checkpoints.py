"""Write an encoder as a fairseq data2vec 2.0 checkpoint, so demos and tests run the real loading path."""
from d2v_plugin.atomic import atomic_torch_save
from d2v_plugin.models.checkpoints import to_data2vec_names
from d2v_plugin.names import DATA2VEC_PRETRAINING_MODEL


def save_data2vec_checkpoint(encoder, path: str, prenet_depth: int = 2) -> None:
    """The layout real data2vec 2.0 checkpoints have: ``cfg`` (a plain dict, the model under
    ``cfg["model"]``) + ``model`` (data2vec's key names), ``prenet_depth`` of the blocks in its prenet."""
    c = encoder.cfg
    if not 0 <= prenet_depth <= c.depth:
        raise ValueError(f"prenet_depth={prenet_depth} must be within 0..{c.depth}")
    model_cfg = {
        "_name": DATA2VEC_PRETRAINING_MODEL, "depth": c.depth - prenet_depth, "embed_dim": c.embed_dim,
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
