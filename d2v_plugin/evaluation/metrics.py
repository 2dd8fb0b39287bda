"""Metric definitions, written once: the criterion's validation, ``cli.evaluate``, the probes and
``cli.compare``'s log reader all use these.

Counting is done in integers (summed over ranks, each image once), and every accuracy a command prints
is a fraction of the images counted (``top1`` 0.975 = 97.5 %); fairseq's training log prints the same
counts as percent (``accuracy``, ``top5``), as fairseq's own metrics do. ``UNITS`` names both, so a
result says which it holds.
"""
from __future__ import annotations

import torch

UNITS = {"json": "fraction", "fairseq_log": "percent"}


def topk_correct(scores: torch.Tensor, target: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """How many rows have the target as their top-1 class, and among their top-k (k capped at the
    number of classes): two 0-d integer tensors (no host sync)."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    hits = top == target.unsqueeze(-1)
    return hits[:, 0].sum(), hits.any(dim=-1).sum()


def fraction(correct: int, n: int) -> float:
    """correct / n as a command prints it (0.0 when nothing was counted, which a command reports as an error)."""
    return correct / n if n else 0.0


def percent(correct, n) -> float:
    """The same count as fairseq's log prints it."""
    return round(100.0 * float(correct) / max(float(n), 1.0), 3)
