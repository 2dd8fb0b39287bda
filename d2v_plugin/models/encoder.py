"""The data2vec 2.0 image encoder in plain PyTorch (no fairseq), state-dict compatible after key mapping.

data2vec 2.0 (fairseq ``data2vec_multi``, modality IMAGE, ``layer_norm_first=False``) computes:
patch embedding -> + fixed 2-D sin-cos positions -> prepend CLS (no position) -> the prenet's
LayerNorm (in post-norm mode ``BlockEncoder`` applies its norm *before* its blocks) -> prenet
blocks -> main blocks, every block post-norm, no final norm. Because the prenet norm sits in
front of all blocks, the prenet/main split does not change the computation: here all blocks
live in one list, prenet blocks first, and ``depth=N`` keeps the first N.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

from d2v_plugin.models.architecture import EncoderConfig  # noqa: F401  (the encoder's config, importable from here)
from d2v_plugin.models.checkpoints import build_and_load, encoder_part, read_checkpoint


DROP_PATH_SCHEDULES = ("linear", "data2vec")


def drop_path_rates(rate: float, depth: int, prenet_depth: int = 0, schedule: str = "linear") -> list[float]:
    """Stochastic-depth rate of each block.

    ``linear``: from 0 at the first block to ``rate`` at the last (timm, MAE).
    ``data2vec``: what data2vec's ``mae_image_classification`` builds: ``dpr = linspace(0, rate, M)``
    over the M main blocks only, then the P prenet blocks get ``linspace(dpr[0], dpr[P-1], P)`` and
    the main blocks ``linspace(dpr[P], dpr[-1], M)`` (so at 2 + 10 blocks the prenet's rates are the
    first steps of a 10-step ramp and the main blocks start at its third). Equal to ``linear`` when
    there is no prenet (data2vec's released checkpoints); undefined, as in data2vec, when M <= P.
    """
    if schedule not in DROP_PATH_SCHEDULES:
        raise ValueError(f"model.drop_path_schedule={schedule!r}: use one of {', '.join(DROP_PATH_SCHEDULES)}")
    if schedule == "linear":
        return torch.linspace(0, rate, depth, device="cpu").tolist() if depth else []  # (also under a meta device)
    main = depth - prenet_depth
    if prenet_depth == 0:
        return np.linspace(0, rate, main).tolist()
    if main <= prenet_depth:
        raise ValueError(f"model.drop_path_schedule=data2vec needs more main blocks than prenet blocks "
                         f"({main} main, {prenet_depth} prenet: data2vec itself cannot build it); use linear")
    dpr = np.linspace(0, rate, main)
    return (np.linspace(dpr[0], max(0, dpr[prenet_depth - 1]), prenet_depth).tolist()
            + np.linspace(dpr[prenet_depth], dpr[-1], main).tolist())


def sincos_2d_positions(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions, [1, grid_h * grid_w, embed_dim], row-major patch order.

    The first half of the channels encodes the column, the second half the row; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)) (MAE's layout, which
    data2vec 2.0 uses). Computed in float64, returned as float32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos positions, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # SDPA picks the flash / memory-efficient kernel on GPU; softmax scale is head_dim^-0.5.
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Post-norm transformer block: x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, drop_path: float):
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop_path(self.attn(x)))
        return self.norm2(x + self.drop_path(self.mlp(x)))


class Data2Vec2ImageEncoder(nn.Module):
    """data2vec 2.0 image encoder; ``extract_features(images) -> [B, 1 + num_patches, D]``, CLS first."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed, never trained: a buffer, saved with the weights so a checkpoint's own positions are used.
        self.register_buffer("pos_embed", sincos_2d_positions(cfg.embed_dim, self.grid, self.grid))
        self.norm_pre = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth, cfg.prenet_depth, cfg.drop_path_schedule)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, rate) for rate in rates
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Random init for training from scratch (BERT-style, as data2vec's ``init_bert_params``)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=1.0)

    @classmethod
    def from_pretrained(cls, path: str, depth: int | None = None, image_size: int | None = None,
                        trust: bool = False, prefix: str | None = None, given: dict | None = None,
                        depth_setting: str = "model.depth", weights: str = "student",
                        **overrides) -> "Data2Vec2ImageEncoder":
        """The encoder of any checkpoint layout users have (models/checkpoints.py), its architecture
        read from the file: ``depth=N`` keeps the first N blocks (how a student is initialised from
        its teacher), ``image_size`` resamples the positions, ``given`` fills what the file does not
        record (``num_heads``, ``norm_eps``), ``weights`` picks a data2vec pretraining checkpoint's student or
        EMA teacher; ``overrides`` set the training-only fields
        (``drop_path_rate``, ``drop_path_schedule``, ``prenet_depth``). Checked against the file's
        tensors before it is built, loaded strictly, every bad key named."""
        ckpt = read_checkpoint(path, trust=trust, prefix=prefix, given=given, weights=weights)
        cfg, state = encoder_part(ckpt, depth, image_size, depth_setting)
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        return build_and_load(lambda: cls(cfg), state, path, what="the encoder")

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides the 1-D ones (norms, biases), as timm declares it."""
        return {"cls_token"}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay (MAE's / BEiT's rule): the embedding (patch
        embedding, CLS, embedding norm) 0, block i i + 1, anything after the blocks depth + 1."""
        if name.startswith(("patch_embed.", "norm_pre.")) or name in ("cls_token", "pos_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed.to(images.dtype)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.norm_pre(x)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return x

    def block_outputs(self, images: torch.Tensor, blocks) -> dict[int, torch.Tensor]:
        """Tokens [B, 1 + num_patches, D] after each of ``blocks`` (numbered 1..depth: block ``depth``'s
        output is what ``extract_features`` gives), from one pass that stops after the last one asked for."""
        wanted = sorted(set(int(b) for b in blocks))
        if not wanted or wanted[0] < 1 or wanted[-1] > len(self.blocks):
            raise ValueError(f"blocks {wanted}: the encoder has blocks 1..{len(self.blocks)}")
        x, out = self.embed(images), {}
        for number, block in enumerate(self.blocks[:wanted[-1]], start=1):
            x = block(x)
            if number in wanted:
                out[number] = x
        return out

    forward = extract_features


POOLING_MODES = ("mean", "cls")


def pool(tokens: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """[B, 1 + N, D] -> [B, D]: the mean of all tokens but CLS (data2vec's), or the CLS token."""
    return tokens[:, 1:].mean(dim=1) if mode == "mean" else tokens[:, 0]
