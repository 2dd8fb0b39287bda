"""Linear probe of cached features, a grid of heads trained at once (DINOv2's ``AllClassifiers``): every
head is MAE's linear-probe head, ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (trunc-normal
std 0.01, bias 0), each with its own learning rate and weight decay, trained by SGD with momentum 0.9
(or AdamW) on a cosine schedule over the same shuffled batches.

The schedule is a number of steps, as DINOv2's is (``eval/linear.py``: 10 "epochs" of 1,250 iterations at
batch 1,024, 12,500 iterations whatever the set's size, which ImageNet's 10 epochs happen to be):
``max(epochs x batches per epoch, min_steps)`` with ``min_steps`` 12,500. A schedule in epochs alone
undertrains a small set (the demo's 1,437 images were 20 steps at 10 epochs: a random-init encoder
scored 0.29, against 0.94 for scikit-learn's logistic regression on the same features).

The normalisation has no parameters, so one BatchNorm serves every head (the same statistics it would
keep in each); every head starts from the same initial weights and sees the same batches, so the grid
trains each head exactly as a run of that head alone would. The heads are one tensor [H, C, D] and the
optimizer's update is written for it (torch's SGD and AdamW, per head: tested against them), not one
optimizer group per head. The head is chosen on a held-out 10% of train (a fixed, class-stratified draw),
best top-1 first, ties broken by the lower held-out loss, then reported on val; ``select_on="val"``
chooses on val itself, as DINOv2 does (optimistic), and the result says which. A chosen learning rate at
an edge of the grid is warned about: the best may lie beyond it.

At ImageNet size the rows are read from the memory-mapped store a batch at a time (never the whole train
split in memory, nor a second copy of the rows fitted on), and on several ranks each trains its share of
the grid's heads on the same batches; the scores of every head are summed over the ranks at the end, so
no rank waits in a collective while another trains.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from d2v_plugin.evaluation.defaults import LRS, MIN_STEPS, WEIGHT_DECAYS
from d2v_plugin.evaluation.metrics import fraction, topk_correct
from d2v_plugin.evaluation.runtime import Runtime
from d2v_plugin.evaluation.statistics import interval

logger = logging.getLogger(__name__)

SCORE_BYTES = 64 * 2**20  # one block of logits when scoring (heads x rows x classes, fp32)


@dataclass
class LinearSettings:
    lrs: tuple = LRS
    weight_decays: tuple = WEIGHT_DECAYS
    optimizer: str = "sgd"
    epochs: int = 10
    min_steps: int = MIN_STEPS
    batch_size: int = 1024
    held_out: float = 0.1
    select_on: str = "held-out"  # or "val"
    seed: int = 0
    scale_lr: bool = True  # lr x batch / 256 (DINOv2)

    def describe(self) -> dict:
        return {"optimizer": self.optimizer, "epochs": self.epochs, "min_steps": self.min_steps,
                "batch_size": self.batch_size}


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


def steps_of(n: int, settings: LinearSettings) -> tuple[int, int]:
    """(steps in all, batches per epoch) for ``n`` rows: the epochs' batches, at least ``min_steps``."""
    per_epoch = max(1, math.ceil(n / settings.batch_size))
    return max(settings.epochs * per_epoch, settings.min_steps), per_epoch


def read_rows(x, rows: np.ndarray, device) -> torch.Tensor:
    """Rows of features (a store's view, an array or a tensor) as fp32 on ``device``; ``rows`` sorted, so
    a memory-mapped store is read in file order."""
    block = x[rows]
    if isinstance(block, np.ndarray):
        block = torch.from_numpy(np.asarray(block, dtype=np.float32))
    return block.to(device=device, dtype=torch.float32)


class _Heads:
    """H heads [H, C, D] + [H, C], each with its own lr and weight decay, updated as torch's SGD (momentum,
    no dampening) or AdamW updates a parameter group."""

    def __init__(self, init: torch.Tensor, count: int, num_classes: int, lrs, wds, optimizer: str, device):
        self.w = init.to(device).expand(count, *init.shape).clone().requires_grad_(True)
        self.b = torch.zeros(count, num_classes, device=device, requires_grad=True)
        self.lrs = torch.tensor(lrs, dtype=torch.float32, device=device)
        self.wds = torch.tensor(wds, dtype=torch.float32, device=device)
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"--optimizer {optimizer!r}: use sgd or adamw")
        self.optimizer, self.t = optimizer, 0
        self.state = [dict() for _ in (self.w, self.b)]

    @torch.no_grad()
    def step(self, scale: float) -> None:
        """One update at ``scale`` x each head's lr (the cosine schedule's factor)."""
        self.t += 1
        for p, state in zip((self.w, self.b), self.state):
            shape = (-1,) + (1,) * (p.ndim - 1)
            lr, wd, g = (self.lrs * scale).view(shape), self.wds.view(shape), p.grad
            if self.optimizer == "sgd":  # torch.optim.SGD: d = g + wd p; buf = 0.9 buf + d; p -= lr buf
                d = g + wd * p
                state["buf"] = d.clone() if "buf" not in state else state["buf"].mul_(0.9).add_(d)
                p.sub_(lr * state["buf"])
            else:  # torch.optim.AdamW: p *= 1 - lr wd; then the Adam step, betas (0.9, 0.999), eps 1e-8
                p.mul_(1 - lr * wd)
                m = state.setdefault("m", torch.zeros_like(p)).mul_(0.9).add_(g, alpha=0.1)
                v = state.setdefault("v", torch.zeros_like(p)).mul_(0.999).addcmul_(g, g, value=0.001)
                denom = (v / (1 - 0.999 ** self.t)).sqrt_().add_(1e-8)
                p.sub_(lr / (1 - 0.9 ** self.t) * m / denom)
            p.grad = None


def train_heads(x, y: np.ndarray, rows: np.ndarray, num_classes: int, settings: LinearSettings, runtime: Runtime,
                grid=None, heads=None):
    """Heads trained on ``x[rows]`` with labels ``y[rows]`` (``x``: anything rows can be read from, a store's
    view at ImageNet size), one per (lr, weight decay) of the grid, or the grid's ``heads`` (indices) only:
    returns (norm, weights [h, C, D], biases [h, C], steps) after ``steps_of`` steps of the same batches."""
    grid = grid or _grid(settings)
    heads = list(range(len(grid))) if heads is None else list(heads)
    device = runtime.device
    g = torch.Generator().manual_seed(settings.seed)
    y = np.asarray(y)
    first = read_rows(x, rows[:1], "cpu")
    dim = first.shape[1]
    norm = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device)
    init = torch.nn.init.trunc_normal_(torch.empty(num_classes, dim), std=0.01, generator=g)
    scale = settings.batch_size / 256 if settings.scale_lr else 1.0
    state = _Heads(init, len(heads), num_classes, [grid[h][0] * scale for h in heads], [grid[h][1] for h in heads],
                   settings.optimizer, device)
    total, per_epoch = steps_of(len(rows), settings)
    step = 0
    while step < total:
        order = rows[torch.randperm(len(rows), generator=g).numpy()]
        for start in range(0, len(order), settings.batch_size):
            if step == total:
                break
            batch = np.sort(order[start:start + settings.batch_size])  # file order; a mean loss ignores order
            if len(batch) < 2:
                continue  # BatchNorm needs two rows to normalise
            feats = norm(read_rows(x, batch, device))
            target = torch.from_numpy(y[batch]).to(device)
            # logits [B, C, H]: the classes in dim 1, where cross_entropy takes them (twice the speed of [H * B, C]
            # on a CPU); each head's mean loss, summed: each head gets its own gradient only
            logits = torch.einsum("bd,hcd->bch", feats, state.w) + state.b.T[None]
            loss = F.cross_entropy(logits, target[:, None].expand(-1, len(heads)), reduction="none")
            loss.mean(dim=0).sum().backward()
            state.step(0.5 * (1 + math.cos(math.pi * step / total)))
            step += 1
    norm.eval()
    return norm, state.w.detach(), state.b.detach(), total


@torch.no_grad()
def score_heads(norm, weights, biases, x, y: np.ndarray, rows: np.ndarray, runtime: Runtime):
    """(top-1 counts [H], top-5 counts [H], summed cross-entropy [H]) of every head on ``x[rows]``."""
    count = weights.shape[0]
    c1, c5 = torch.zeros(count, dtype=torch.int64), torch.zeros(count, dtype=torch.int64)
    loss = torch.zeros(count, dtype=torch.float64)
    block = max(1, SCORE_BYTES // (4 * count * weights.shape[1]))  # rows whose logits fit the bound
    for start in range(0, len(rows), block):
        part = rows[start:start + block]
        feats = norm(read_rows(x, part, runtime.device))
        logits = torch.einsum("bd,hcd->hbc", feats, weights) + biases[:, None, :]
        target = torch.from_numpy(np.asarray(y)[part]).to(runtime.device)
        for h in range(count):
            a, b = topk_correct(logits[h], target)
            c1[h] += int(a)
            c5[h] += int(b)
            loss[h] += float(F.cross_entropy(logits[h].float(), target, reduction="sum"))
    return c1, c5, loss


def _summed(runtime: Runtime, mine: list[int], values: torch.Tensor, count: int) -> torch.Tensor:
    """Every head's value from the ranks that trained it (each head on one rank): one vector over the grid."""
    full = torch.zeros(count, dtype=torch.float64)
    full[mine] = values.to(torch.float64)
    if runtime.distributed:
        full = runtime.reduce_sum(full)
    return full


def linear_probe(train_x, train_y: np.ndarray, val_x, val_y: np.ndarray, num_classes: int, settings: LinearSettings,
                 runtime: Runtime, outcomes: bool = False) -> dict:
    """The grid trained (each rank its share of the heads), a head chosen (on held-out train rows, or on
    val), and its val top-1 / top-5. ``train_x`` / ``val_x``: row-indexable features (a store's view)."""
    start = time.perf_counter()
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    val_rows = np.flatnonzero(val_y >= 0)
    if settings.select_on == "held-out":
        fit, held = held_out_split(train_y, settings.held_out, settings.seed)
    elif settings.select_on == "val":
        fit, held = np.flatnonzero(train_y >= 0), None
    else:
        raise ValueError(f"--select-on {settings.select_on!r}: use held-out or val")
    grid = _grid(settings)
    mine = [h for h in range(len(grid)) if h % runtime.world == runtime.rank]
    norm, w, b, steps = train_heads(train_x, train_y, fit, num_classes, settings, runtime, grid, mine)
    v1, v5, v_loss = (_summed(runtime, mine, v, len(grid)) for v in score_heads(norm, w, b, val_x, val_y, val_rows,
                                                                              runtime))
    if held is None:
        choose, loss, chosen_on, n_choose = v1, v_loss, "val", len(val_rows)
    else:
        h1, _, h_loss = score_heads(norm, w, b, train_x, train_y, held, runtime)
        choose, loss = _summed(runtime, mine, h1, len(grid)), _summed(runtime, mine, h_loss, len(grid))
        chosen_on, n_choose = f"held-out {len(held)} train images", len(held)
    # the best top-1; among equals the lower loss; then the grid's order (the smaller lr, the smaller decay); a
    # head whose loss is not finite (an lr its weights overflowed at) only when every head is one
    finite = torch.isfinite(loss)
    best = min(range(len(grid)), key=lambda h: (not finite[h], -choose[h].item(),
                                                loss[h].item() if finite[h] else 0.0, h))
    if not finite[best] and runtime.is_main:
        logger.warning("linear probe: every head's loss overflowed (lower --lrs)")
    lr, wd = grid[best]
    lrs = sorted(set(settings.lrs))
    edge = len(lrs) > 1 and lr in (lrs[0], lrs[-1])
    if edge and runtime.is_main:
        logger.warning(f"linear probe: the chosen lr {lr:g} is the {'largest' if lr == lrs[-1] else 'smallest'} "
                       f"of the grid (--lrs): the best may lie beyond it")
    tied = int(sum(1 for h in range(len(grid)) if choose[h] == choose[best]))
    rows = None
    if outcomes:  # the chosen head's per-image outcomes on val, from the rank that trained it
        mine_rows = None
        if best in mine:
            from d2v_plugin.evaluation.knn import outcome_rows

            h = mine.index(best)
            with torch.no_grad():
                logits = norm(read_rows(val_x, val_rows, runtime.device)) @ w[h].T + b[h]
            mine_rows = outcome_rows(logits, torch.from_numpy(val_y[val_rows]).to(runtime.device), val_rows)
        rows = next(r for r in runtime.gather_objects(mine_rows) if r is not None)
    return {"probe": "linear", "top1": fraction(int(v1[best]), len(val_rows)),
            "top1_interval": interval(int(v1[best]), len(val_rows)), "top5": fraction(int(v5[best]), len(val_rows)),
            "top5_interval": interval(int(v5[best]), len(val_rows)), **({"_outcomes": rows} if outcomes else {}),
            "n": len(val_rows), "lr": lr,
            "lr_scaled": lr * (settings.batch_size / 256 if settings.scale_lr else 1), "weight_decay": wd,
            "selected_on": chosen_on, "selection_top1": fraction(int(choose[best]), n_choose),
            "selection_loss": loss[best].item() / n_choose if held is not None else None,
            "heads_tied_on_top1": tied, "lr_at_grid_edge": edge, **settings.describe(), "steps": steps,
            "heads": len(grid), "n_fit": len(fit), "probe_s": round(time.perf_counter() - start, 3)}
