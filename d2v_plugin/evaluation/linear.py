"""Linear probe of cached features, a grid of heads trained at once (DINOv2's ``AllClassifiers``): every
head is MAE's linear-probe head, ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (trunc-normal
std 0.01, bias 0), each with its own learning rate and weight decay, trained by SGD with momentum 0.9
(or AdamW) on a cosine schedule for a fixed number of epochs over the same shuffled batches.

The normalisation has no parameters, so one BatchNorm serves every head (the same statistics it would
keep in each); every head starts from the same initial weights and sees the same batches, so the grid
trains each head exactly as a run of that head alone would. The head is chosen on a held-out 10% of
train (a fixed, class-stratified draw), then reported on val; ``select_on="val"`` chooses on val itself,
as DINOv2 does (optimistic), and the result says which.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from d2v_plugin.evaluation.metrics import fraction, topk_correct
from d2v_plugin.evaluation.runtime import Runtime

# DINOv2's learning rates (eval/linear.py), scaled by batch / 256 as it scales them
LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
WEIGHT_DECAYS = (0.0, 1e-4)


@dataclass
class LinearSettings:
    lrs: tuple = LRS
    weight_decays: tuple = WEIGHT_DECAYS
    optimizer: str = "sgd"
    epochs: int = 10
    batch_size: int = 1024
    held_out: float = 0.1
    select_on: str = "held-out"  # or "val"
    seed: int = 0
    scale_lr: bool = True  # lr x batch / 256 (DINOv2)


def held_out_split(labels: np.ndarray, fraction_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): ``fraction_out`` of each class's images, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    keep, out = [], []
    for c in np.unique(labels[labels >= 0]):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_out = int(round(len(rows) * fraction_out)) if len(rows) > 1 else 0
        out.append(rows[:n_out])
        keep.append(rows[n_out:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def _grid(settings: LinearSettings) -> list[tuple[float, float]]:
    return [(lr, wd) for lr in settings.lrs for wd in settings.weight_decays]


def train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, settings: LinearSettings, runtime: Runtime,
                grid=None):
    """Heads trained on (x, y) (on the runtime's device), one per (lr, weight decay) of the grid: returns
    (norm, weights [H, C, D], biases [H, C]) after ``settings.epochs`` epochs of the same batches."""
    grid = grid or _grid(settings)
    device = runtime.device
    g = torch.Generator().manual_seed(settings.seed)
    dim, count = x.shape[1], len(grid)
    norm = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device)
    init = torch.nn.init.trunc_normal_(torch.empty(num_classes, dim), std=0.01, generator=g)
    scale = settings.batch_size / 256 if settings.scale_lr else 1.0
    weights = [torch.nn.Parameter(init.clone().to(device)) for _ in grid]
    biases = [torch.nn.Parameter(torch.zeros(num_classes, device=device)) for _ in grid]
    groups = [{"params": [w, b], "lr": lr * scale, "weight_decay": wd} for (lr, wd), w, b in zip(grid, weights, biases)]
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9)
    elif settings.optimizer == "adamw":
        opt = torch.optim.AdamW(groups)
    else:
        raise ValueError(f"--optimizer {settings.optimizer!r}: use sgd or adamw")
    base_lrs = [group["lr"] for group in opt.param_groups]
    n = len(y)
    steps_per_epoch = max(1, math.ceil(n / settings.batch_size))
    total = settings.epochs * steps_per_epoch
    step = 0
    x, y = x.to(device), y.to(device)
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, settings.batch_size):
            rows = order[start:start + settings.batch_size]
            if len(rows) < 2:
                continue  # BatchNorm needs two rows to normalise
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / total))
            feats = norm(x[rows].float())
            w, b = torch.stack(weights), torch.stack(biases)
            logits = torch.einsum("bd,hcd->hbc", feats, w) + b[:, None, :]
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y[rows].repeat(count), reduction="none")
            loss = loss.view(count, -1).mean(dim=1).sum()  # each head's mean loss: its own gradient only
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    norm.eval()
    return norm, torch.stack([w.detach() for w in weights]), torch.stack([b.detach() for b in biases])


@torch.no_grad()
def score_heads(norm, weights, biases, x: torch.Tensor, y: torch.Tensor, runtime: Runtime, batch: int = 8192):
    """(top-1 counts [H], top-5 counts [H]) of every head on (x, y)."""
    count = weights.shape[0]
    c1, c5 = torch.zeros(count, dtype=torch.int64), torch.zeros(count, dtype=torch.int64)
    for start in range(0, len(y), batch):
        feats = norm(x[start:start + batch].to(runtime.device).float())
        logits = torch.einsum("bd,hcd->hbc", feats, weights) + biases[:, None, :]
        target = y[start:start + batch].to(runtime.device)
        for h in range(count):
            a, b = topk_correct(logits[h], target)
            c1[h] += int(a)
            c5[h] += int(b)
    return c1, c5


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, val_x: torch.Tensor, val_y: np.ndarray, num_classes: int,
                 settings: LinearSettings, runtime: Runtime) -> dict:
    """The grid trained, a head chosen (on held-out train rows, or on val), and its val top-1 / top-5."""
    start = time.perf_counter()
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    train_rows = np.flatnonzero(train_y >= 0)
    val_rows = np.flatnonzero(val_y >= 0)
    if settings.select_on == "held-out":
        fit, held = held_out_split(train_y, settings.held_out, settings.seed)
    elif settings.select_on == "val":
        fit, held = train_rows, None
    else:
        raise ValueError(f"--select-on {settings.select_on!r}: use held-out or val")
    grid = _grid(settings)
    norm, w, b = train_heads(train_x[fit], torch.from_numpy(train_y[fit]), num_classes, settings, runtime, grid)
    vx, vy = val_x[val_rows], torch.from_numpy(val_y[val_rows])
    v1, v5 = score_heads(norm, w, b, vx, vy, runtime)
    if held is None:
        choose, chosen_on = v1, "val"
    else:
        choose, _ = score_heads(norm, w, b, train_x[held], torch.from_numpy(train_y[held]), runtime)
        chosen_on = f"held-out {len(held)} train images"
    best = int(torch.argmax(choose))  # the first of equals: the smallest lr, then the smallest decay
    lr, wd = grid[best]
    return {"probe": "linear", "top1": fraction(int(v1[best]), len(vy)), "top5": fraction(int(v5[best]), len(vy)),
            "n": len(vy), "lr": lr, "lr_scaled": lr * (settings.batch_size / 256 if settings.scale_lr else 1),
            "weight_decay": wd, "selected_on": chosen_on,
            "selection_top1": fraction(int(choose[best]), len(held) if held is not None else len(vy)),
            "optimizer": settings.optimizer, "epochs": settings.epochs, "batch_size": settings.batch_size,
            "heads": len(grid), "n_fit": len(fit), "probe_s": round(time.perf_counter() - start, 3)}
