"""The fairseq model ``data2vec2_image_classifier``: Data2Vec2 encoder, then a head -> raw logits.

Heads (``model.head``): ``layernorm_linear`` (Table 1: the pooled tokens, LayerNorm, Linear),
``batchnorm_linear`` (MAE's linear probe: BatchNorm without affine, Linear) and ``attentive`` (one learned
query cross-attends the patch tokens, then LayerNorm and Linear). With ``model.freeze_encoder`` the encoder
runs as a frozen one: in eval mode (no drop path), without gradients (no activations kept for a backward
pass), outside the optimizer; the checkpoints still hold it."""

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import OmegaConf, open_dict

from d2v_plugin.models.architecture import check_architecture
from d2v_plugin.models.encoder import POOLING_MODES, Data2Vec2ImageEncoder, EncoderConfig, pool
from d2v_plugin.models.param_groups import param_groups_lrd, tag_for_composite
from d2v_plugin.models.safe_load import CheckpointError
from d2v_plugin.names import MODEL_NAME

logger = logging.getLogger(__name__)

ARCH_FIELDS = ("embed_dim", "num_heads", "mlp_ratio", "patch_size", "norm_eps")
GIVEN_WHERE_UNRECORDED = ("num_heads", "norm_eps")  # what a bare or Lightning state dict cannot tell
RESOLVED_FIELDS = (*ARCH_FIELDS, "depth", "image_size", "prenet_depth")  # written back into the config after building


@dataclass
class Data2Vec2ClassifierConfig(FairseqDataclass):
    pretrained_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "data2vec 2.0 checkpoint, distilled student (Lightning), bare state dict or converted "
                          "encoder to start from; null = random init from the architecture fields"},
    )
    checkpoint_prefix: Optional[str] = field(
        default=None, metadata={"help": "key prefix of the encoder inside the checkpoint; null = find it"}
    )
    pretrained_weights: str = field(
        default="student",
        metadata={"help": "which encoder of pretrained_checkpoint: student (the model trained) or ema (a data2vec "
                          "2.0 pretraining checkpoint's EMA teacher, its '_ema')"},
    )
    trust_checkpoint: bool = field(
        default=False,
        metadata={"help": "allow full unpickling of pretrained_checkpoint (runs code from the file: trusted files only)"},
    )
    depth: Optional[int] = field(
        default=None, metadata={"help": "keep the first N blocks (prenet blocks first); null = all blocks"}
    )
    num_classes: int = field(default=1000, metadata={"help": "number of classes of the linear head"})
    pooling: str = field(
        default="mean", metadata={"help": "token aggregation: mean (all tokens but CLS, as data2vec) or cls"}
    )
    head: str = field(
        default="layernorm_linear",
        metadata={"help": "layernorm_linear (Table 1's: LayerNorm + Linear on the pooled tokens), batchnorm_linear "
                          "(MAE's linear probe: BatchNorm without affine + Linear) or attentive (a learned query "
                          "cross-attends the patch tokens, then LayerNorm + Linear)"},
    )
    freeze_encoder: bool = field(
        default=False,
        metadata={"help": "train the head only (a probe): the encoder runs in eval mode without gradients and "
                          "stays out of the optimizer"},
    )
    layer_decay: float = field(
        default=1.0,
        metadata={"help": "layer-wise lr decay: block i of N gets lr * layer_decay^(N-i), as data2vec's "
                          "fine-tuning; 1.0 = off. Needs the composite optimizer (see the recipes)"},
    )
    layer_decay_embeddings: str = field(
        default="full",
        metadata={"help": "lr of the patch embedding, CLS token and embedding norm under layer decay: full "
                          "(1.0, as data2vec's mae_image_classification) or decayed (layer_decay^(N+1), as "
                          "MAE/BEiT and the thesis' code: one layer below the first block)"},
    )
    drop_path_rate: float = field(
        default=0.0, metadata={"help": "stochastic depth, rising to this rate at the last block"}
    )
    drop_path_schedule: str = field(
        default="linear",
        metadata={"help": "linear: from 0 at the first block to drop_path_rate at the last; data2vec: "
                          "data2vec's fine-tuning schedule (spaced over the main blocks, the prenet blocks "
                          "taking its first steps; the same as linear without prenet blocks)"},
    )
    prenet_depth: Optional[int] = field(
        default=None,
        metadata={"help": "how many of the first blocks were data2vec prenet blocks (only the data2vec "
                          "drop-path schedule uses it); null = the checkpoint's"},
    )
    embed_dim: Optional[int] = field(default=None, metadata={"help": "width; null = checkpoint's (768 at random init)"})
    num_heads: Optional[int] = field(default=None, metadata={"help": "attention heads; null = checkpoint's (12)"})
    mlp_ratio: Optional[float] = field(default=None, metadata={"help": "MLP hidden / width; null = checkpoint's (4)"})
    patch_size: Optional[int] = field(default=None, metadata={"help": "patch size; null = checkpoint's (16)"})
    norm_eps: Optional[float] = field(default=None, metadata={"help": "LayerNorm eps; null = checkpoint's (1e-6)"})
    image_size: Optional[int] = field(
        default=None,
        metadata={"help": "input size; null = task.image_size, else the checkpoint's; positions are resampled"},
    )
    compile_encoder: bool = field(
        default=False,
        metadata={"help": "torch.compile the encoder in place (weights and state-dict keys unchanged); off by "
                          "default: compiling costs minutes and pays off on GPUs, rarely on CPUs"},
    )


def build_encoder(cfg, image_size: Optional[int] = None) -> Data2Vec2ImageEncoder:
    """Encoder from a checkpoint (``Data2Vec2ImageEncoder.from_pretrained``: architecture read from it)
    or random init from the config fields."""
    explicit = {k: getattr(cfg, k) for k in ARCH_FIELDS if getattr(cfg, k, None) is not None}
    image_size = image_size or cfg.image_size
    training = dict(drop_path_rate=cfg.drop_path_rate, drop_path_schedule=getattr(cfg, "drop_path_schedule", "linear"),
                    prenet_depth=getattr(cfg, "prenet_depth", None))
    if cfg.pretrained_checkpoint:
        encoder = Data2Vec2ImageEncoder.from_pretrained(
            cfg.pretrained_checkpoint, depth=cfg.depth, image_size=image_size, trust=cfg.trust_checkpoint,
            prefix=cfg.checkpoint_prefix, given={k: explicit[k] for k in GIVEN_WHERE_UNRECORDED if k in explicit},
            weights=getattr(cfg, "pretrained_weights", "student"), **training)
        wrong = [f"model.{k}={v} but the checkpoint has {getattr(encoder.cfg, k)}"
                 for k, v in explicit.items() if v != getattr(encoder.cfg, k)]
        if wrong:
            raise CheckpointError(
                f"{cfg.pretrained_checkpoint}: architecture mismatch: {'; '.join(wrong)} (leave these null to use the checkpoint's)"
            )
        logger.info(f"loaded {encoder.cfg.depth} encoder blocks from {cfg.pretrained_checkpoint}: {encoder.cfg}")
        return encoder
    training["prenet_depth"] = training["prenet_depth"] or 0
    enc_cfg = EncoderConfig(**explicit, depth=cfg.depth or EncoderConfig.depth,
                            image_size=image_size or EncoderConfig.image_size, **training)
    check_architecture(enc_cfg, "the model config")
    logger.info(f"randomly initialised encoder: {enc_cfg}")
    return Data2Vec2ImageEncoder(enc_cfg)


def head_config(model_cfg: dict, source: str) -> dict:
    """The classifier's settings besides its size that a file records (``pooling``, ``head``), checked:
    they come from outside."""
    pooling = model_cfg.get("pooling") or "mean"
    if pooling not in POOLING_MODES:
        raise CheckpointError(f"{source}: pooling {str(pooling)[:40]!r} is not one of {', '.join(POOLING_MODES)}")
    head = model_cfg.get("head") or "layernorm_linear"
    if head not in HEADS:
        raise CheckpointError(f"{source}: head {str(head)[:40]!r} is not one of {', '.join(HEADS)}")
    return {"pooling": pooling, "head": head}


def record_architecture(cfg, enc_cfg: EncoderConfig) -> None:
    """Write the architecture actually built (much of it read from the checkpoint) into a model config,
    so the config fairseq saves with every checkpoint rebuilds the model without the pretrained file."""
    with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
        for key in RESOLVED_FIELDS:
            setattr(cfg, key, getattr(enc_cfg, key))


HEADS = ("layernorm_linear", "batchnorm_linear", "attentive")


class ParameterFreeBatchNorm(nn.BatchNorm1d):
    """MAE's ``BatchNorm1d(affine=False, eps=1e-6)``, without the two ``None`` parameter slots torch keeps
    for its missing affine (fairseq takes two ``None`` parameters for one shared parameter)."""

    def __init__(self, dim: int):
        super().__init__(dim, affine=False, eps=1e-6)
        for name in ("weight", "bias"):
            del self._parameters[name]
            object.__setattr__(self, name, None)


class AttentivePooling(nn.Module):
    """One learned query cross-attends the tokens (multi-head, head width 64; one head below width 64):
    [B, N, D] -> [B, D]. As CAPI's ``AttnPoolClassifier``: the query itself attends (no query projection),
    keys and values from one Linear, no output projection; initialised as CAPI's: the query and the
    Linear trunc-normal with std 0.02, biases 0."""

    def __init__(self, dim: int, head_width: int = 64):
        super().__init__()
        self.num_heads = max(1, dim // head_width)
        if dim % self.num_heads:
            raise ValueError(f"the attentive head needs a width divisible into heads of {head_width}, not {dim}")
        self.query = nn.Parameter(torch.empty(dim))
        self.kv = nn.Linear(dim, 2 * dim)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.kv.weight, std=0.02)
        nn.init.zeros_(self.kv.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        h = self.num_heads
        q = self.query.to(tokens.dtype).expand(B, 1, D).reshape(B, 1, h, D // h).transpose(1, 2)
        k, v = self.kv(tokens).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).reshape(B, D)


@register_model(MODEL_NAME, dataclass=Data2Vec2ClassifierConfig)
class Data2Vec2ImageClassifier(BaseFairseqModel):
    # what d2v_plugin.load_classifier gives a model it loads (d2v_plugin/inference.py): the class names in
    # label order, the data config it was trained with, its eval transform (PIL image -> normalised input)
    classes: list = []
    data_cfg = None
    preprocess = None

    def __init__(self, cfg: Data2Vec2ClassifierConfig, encoder: Data2Vec2ImageEncoder):
        super().__init__()
        if cfg.pooling not in POOLING_MODES:
            raise ValueError(f"model.pooling={cfg.pooling!r} is not a pooling mode; use one of {', '.join(POOLING_MODES)}")
        head = getattr(cfg, "head", "layernorm_linear")
        if head not in HEADS:
            raise ValueError(f"model.head={head!r}: use one of {', '.join(HEADS)}")
        self.cfg = cfg
        self.head_kind = head
        self.encoder = encoder
        dim = encoder.cfg.embed_dim
        if head == "attentive":
            self.attn_pool = AttentivePooling(dim)
        self.fc_norm = ParameterFreeBatchNorm(dim) if head == "batchnorm_linear" else nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, cfg.num_classes)
        self.init_head()
        self.frozen = bool(cfg.freeze_encoder)
        if self.frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def init_head(self) -> None:
        """Table 1: LayerNorm weight 1, bias 0; Linear weight trunc_normal(std=0.02), bias 0. MAE's linear
        probe: trunc_normal(std=0.01) after its BatchNorm."""
        if isinstance(self.fc_norm, nn.LayerNorm):
            nn.init.ones_(self.fc_norm.weight)
            nn.init.zeros_(self.fc_norm.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.01 if self.head_kind == "batchnorm_linear" else 0.02)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        """A frozen encoder stays in eval mode (no drop path) while the head trains."""
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    @classmethod
    def build_model(cls, cfg: Data2Vec2ClassifierConfig, task=None):
        task_size = getattr(getattr(task, "cfg", None), "image_size", None)
        encoder = build_encoder(cfg, image_size=cfg.image_size or task_size)
        record_architecture(cfg, encoder.cfg)
        if cfg.compile_encoder:
            encoder.compile()
        model = cls(cfg, encoder)
        model.assign_param_groups()  # for training: a model built for inference needs no optimizer groups
        return model

    def param_group_rules(self) -> dict[str, tuple[str, float]]:
        """name -> (group, lr_scale) for every trainable parameter (models/param_groups.py): no weight
        decay on norms, biases and the CLS token (the attentive head's query is decayed, as V-JEPA's); block i of N at layer_decay^(N - i); the head at the
        full lr; the embedding at the full lr or decayed (``model.layer_decay_embeddings``)."""
        no_decay = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

        def layer_id(name):
            return self.encoder.layer_id(name[len("encoder."):]) if name.startswith("encoder.") else len(self.encoder.blocks) + 1

        decayed = {"attn_pool.query"} if self.head_kind == "attentive" else set()  # a weight, as V-JEPA decays it
        return param_groups_lrd(self.named_parameters(), no_decay, layer_id, len(self.encoder.blocks),
                                self.cfg.layer_decay, self.cfg.layer_decay_embeddings, decayed)

    def assign_param_groups(self) -> None:
        """Tag the parameters for fairseq's composite optimizer (models/param_groups.tag_for_composite);
        build_model does this for training."""
        if self.frozen:
            kept = sum(p.numel() for p in self.encoder.parameters())
            logger.info(f"encoder frozen (model.freeze_encoder): its {kept:,} parameters stay out of the optimizer; "
                        f"it runs in eval mode without gradients")
        tag_for_composite(self.named_parameters(), self.param_group_rules())

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen:  # no activations kept for a backward pass that never reaches the encoder
            with torch.no_grad():
                return self.encoder(images)
        return self.encoder(images)  # through __call__: hooks and a compiled encoder apply

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "attentive":
            return self.attn_pool(tokens[:, 1:])  # the patch tokens
        return pool(tokens, self.cfg.pooling)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.pool(self.extract_features(images))))
