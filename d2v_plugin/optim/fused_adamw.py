"""The fairseq optimizer ``fused_adamw``: fairseq's ``adam`` (decoupled weight decay, its eps placement)
computed by torch's fused AdamW kernel, one launch per group instead of ~8 per parameter tensor.

fairseq's ``adam`` uses a fused kernel only with apex installed; otherwise each step runs its Python
Adam, several kernels per tensor (about 2,000 launches per update at depth 12 under the composite
optimizer), which on a GPU costs as much as a distilled student's forward and backward. torch's
``AdamW(fused=True)`` (CUDA and CPU) updates every tensor of a group in one kernel.

The arithmetic is fairseq's: fairseq adds eps to sqrt(v) before the bias correction, torch after
(``sqrt(v / bc2) + eps``); giving torch ``eps / sqrt(bc2)`` each step makes the two the same update
(bc2 = 1 - beta2^t), so swapping optimizers changes the speed, not the training (tested within 1e-6
of fairseq's ``adam`` over several updates). It works inside fairseq's machinery as ``adam`` does: as
the composite optimizer's per-group optimizer, under the FP16 optimizer (fp32 master weights,
non-flat), with bf16, loss scaling, clipping, lr scales and checkpoint save/load.

``final_weight_decay`` schedules the weight decay as V-JEPA's ``CosineWDSchedule`` does (its attentive
probe, ``evals/image_classification_frozen``): at a parameter's step t, ``final + (wd - final) x 0.5 x
(1 + cos(pi t / max_update))``, from the configured decay to ``final_weight_decay``; a group whose decay is
0 (the no-decay group) stays at 0, as V-JEPA's ``WD_exclude`` groups do. The step counts are the
parameters' own, saved with their state, so a resumed run continues the schedule where it was.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

logger = logging.getLogger(__name__)


@dataclass
class FusedAdamWConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas, as fairseq's adam"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon, added as fairseq's adam adds it"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (AdamW), as fairseq's adam"})
    fused: Optional[bool] = field(
        default=None,
        metadata={"help": "torch's fused kernel (true) or its foreach one (false); null = fused where torch has "
                          "it for the parameters' device and dtype"},
    )
    final_weight_decay: Optional[float] = field(
        default=None,
        metadata={"help": "the weight decay at optimization.max_update, reached on a cosine from weight_decay (V-JEPA's "
                          "CosineWDSchedule, final_wd); null = constant"},
    )
    lr: List[float] = II("optimization.lr")
    max_update: int = II("optimization.max_update")


def cosine_weight_decay(start: float, final: float, step: int, total: int) -> float:
    """V-JEPA's CosineWDSchedule at 1-based ``step`` of ``total``: a cosine from ``start`` to ``final``, held at
    ``final`` after ``total`` (never past it)."""
    progress = min(step / total, 1.0)
    value = final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(final, value) if final <= start else min(final, value)


class FairseqEpsAdamW(torch.optim.AdamW):
    """torch's AdamW with fairseq's eps placement: each step, ``eps = base_eps / sqrt(1 - beta2^t)`` with
    ``t`` the parameter's own step count, as fairseq's adam counts them (a parameter without a gradient
    in an update does not step, and is a step behind from then on). The counts are kept on the host
    (``fairseq_step`` in each parameter's state, saved with it) so that reading them costs no device
    synchronisation; the parameters of a group that share a count step in one fused launch (all of
    them, in training, where every trainable parameter has a gradient every update)."""

    def __init__(self, params, eps: float = 1e-8, final_weight_decay: float | None = None, decay_steps: int = 0,
                 **kwargs):
        super().__init__(params, eps=eps, **kwargs)
        self.final_weight_decay, self.decay_steps = final_weight_decay, decay_steps
        for group in self.param_groups:
            group.setdefault("base_eps", group["eps"])

    def _weight_decay(self, group, t: int) -> float:
        if self.final_weight_decay is None or group["weight_decay"] == 0:
            return group["weight_decay"]
        return cosine_weight_decay(group["weight_decay"], self.final_weight_decay, t, self.decay_steps)

    def _step_count(self, p) -> int:
        state = self.state[p]  # (written only by torch's step first: it initialises an empty state)
        if "fairseq_step" in state:
            return state["fairseq_step"]
        return int(state["step"]) if "step" in state else 0  # a state saved before the counts were kept here

    @torch.no_grad()
    def step(self, closure=None):
        groups, split, steps = self.param_groups, [], []
        for group in groups:
            by_step: dict = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_step.setdefault(self._step_count(p) + 1, []).append(p)
            beta2 = group["betas"][1]
            for t, params in by_step.items():
                split.append({**group, "params": params, "eps": group["base_eps"] / math.sqrt(1.0 - beta2 ** t),
                              "weight_decay": self._weight_decay(group, t)})
                steps.append(t)
        self.param_groups = split  # what torch's step iterates over; the groups themselves are untouched
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        for part, t in zip(split, steps):
            for p in part["params"]:
                self.state[p]["fairseq_step"] = t
        return loss


def _fused_available(params) -> bool:
    devices = {(p.device.type, p.dtype) for p in params}
    return all(dtype in (torch.float32, torch.float16, torch.bfloat16) and kind in ("cuda", "cpu")
               for kind, dtype in devices)


@register_optimizer("fused_adamw", dataclass=FusedAdamWConfig)
class FusedAdamW(FairseqOptimizer):
    def __init__(self, cfg: FusedAdamWConfig, params):
        super().__init__(cfg)
        params = list(params)
        flat = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        fused = _fused_available(flat) if cfg.fused is None else cfg.fused
        final = cfg.final_weight_decay
        if final is not None and not (cfg.max_update or 0) > 0:
            raise ValueError(f"fused_adamw final_weight_decay={final} schedules the weight decay over "
                             f"optimization.max_update, which is not set: set optimization.max_update")
        self._optimizer = FairseqEpsAdamW(params, **self.optimizer_config, fused=fused, foreach=None if fused else True,
                                          final_weight_decay=final, decay_steps=int(cfg.max_update or 0))

    @property
    def optimizer_config(self) -> dict:
        """The settings a checkpoint's optimizer state may be overridden with (fairseq's convention)."""
        betas = self.cfg.adam_betas
        return {
            "lr": self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr,
            "betas": tuple(eval(betas) if isinstance(betas, str) else OmegaConf.to_container(betas)
                           if OmegaConf.is_config(betas) else betas),
            "eps": self.cfg.adam_eps,
            "weight_decay": self.cfg.weight_decay,
        }

    @property
    def supports_flat_params(self) -> bool:
        return True

    @property
    def supports_memory_efficient_fp16(self) -> bool:
        return False  # torch's AdamW steps the parameters' own dtype: fp16 weights need fp32 masters
