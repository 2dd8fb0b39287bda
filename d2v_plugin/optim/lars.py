"""The fairseq optimizer ``lars``: LARS as MAE's linear probing runs it (``util/lars.py``, from MoCo v3):
SGD with momentum, where each parameter of more than one dimension has its update (gradient plus weight
decay) scaled by ``trust_coefficient * ||p|| / ||update||`` (1 when either norm is 0); parameters of one
dimension (norms, biases) get neither weight decay nor the scaling. timm's ``Lars`` computes another
update (it divides by ``||g|| + wd ||p||``, and adapts nothing when the weight decay is 0, MAE's setting),
so this is the plugin's, on torch's foreach ops (a few kernels per group, not per tensor)."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import List

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II


class MAELars(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            matrices = [i for i, p in enumerate(params) if p.ndim > 1]
            grads = [p.grad for p in params]
            if matrices:
                mp = [params[i] for i in matrices]
                dp = torch._foreach_add([grads[i] for i in matrices], mp, alpha=g["weight_decay"])
                param_norm = torch._foreach_norm(mp)
                update_norm = torch._foreach_norm(dp)
                scale = [torch.where(pn > 0, torch.where(un > 0, g["trust_coefficient"] * pn / un, 1.0), 1.0)
                         for pn, un in zip(param_norm, update_norm)]
                torch._foreach_mul_(dp, scale)
                scaled = dict(zip(matrices, dp))
            else:
                scaled = {}
            updates = [scaled.get(i, grads[i]) for i in range(len(params))]
            mu = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu.append(state["mu"])
            torch._foreach_mul_(mu, g["momentum"])
            torch._foreach_add_(mu, updates)
            torch._foreach_add_(params, mu, alpha=-g["lr"])
        return loss


@dataclass
class LarsConfig(FairseqDataclass):
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the >1-D parameters (MAE: 0)"})
    momentum: float = field(default=0.9, metadata={"help": "momentum (MAE: 0.9)"})
    trust_coefficient: float = field(default=0.001, metadata={"help": "LARS trust coefficient (MAE: 0.001)"})
    lr: List[float] = II("optimization.lr")


@register_optimizer("lars", dataclass=LarsConfig)
class Lars(FairseqOptimizer):
    def __init__(self, cfg: LarsConfig, params):
        super().__init__(cfg)
        self._optimizer = MAELars(params, **self.optimizer_config)

    @property
    def optimizer_config(self) -> dict:
        return {"lr": self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr,
                "weight_decay": self.cfg.weight_decay, "momentum": self.cfg.momentum,
                "trust_coefficient": self.cfg.trust_coefficient}

    @property
    def supports_flat_params(self) -> bool:
        # one flat tensor of every weight is 1-D: LARS would scale no update (fairseq then asks for
        # common.fp16_no_flatten_grads=true; the task says so first, training.check_flat_params)
        return False
