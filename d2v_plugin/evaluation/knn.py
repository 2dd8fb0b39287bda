"""Weighted k-nearest-neighbour classification of cached features (DINO's and DINOv2's kNN evaluation):
L2-normalised features, every query votes with its k most cosine-similar training images, each weighted
exp(similarity / T). Several k are answered by one search (the k largest of them, cut).

Similarities are computed in fp32 on every device, as DINO's ``knn_classifier`` does, whatever the
precision of the forward pass or of the store: an fp16 product rounds cosine similarities near 1 to steps
of 4.9e-4, and the near-ties that makes break by row order, toward low class ids (a random-init encoder
lost 25 points of top-1 to it). TF32 is kept off for the product (full fp32 mantissas on Ampere and
later), whatever ``torch.set_float32_matmul_precision`` was set to. A 50,000 x 1.28M x 768 product is a
few seconds in fp32 on one H100-class GPU.

At ImageNet size: similarities and the running top-k are computed on the device in chunks (a chunk of
training rows read from the memory-mapped store, against a chunk of queries), so memory is bounded by
the chunk sizes (a block of similarities is at most ``SIMILARITY_BYTES``) and never N_val x N_train;
the training rows are split over the ranks in chunks (chunk c to rank c % ranks, DINOv2's scheme),
each rank's best candidates are gathered and merged. Chunks and ties are fixed by the rows' global
order, so any number of ranks gives exactly one rank's answer.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from d2v_plugin.evaluation.metrics import fraction
from d2v_plugin.evaluation.runtime import Runtime

TRAIN_CHUNK = 65_536
SIMILARITY_BYTES = 256 * 2**20  # one block of similarities (queries x training rows, fp32)


def _merge(sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each row, ordered by similarity, ties by the training row's index
    (so the answer does not depend on the order candidates arrive in)."""
    order = idx.argsort(dim=1, stable=True)
    sims, idx = sims.gather(1, order), idx.gather(1, order)
    order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
    return sims.gather(1, order), idx.gather(1, order)


def similarity_dtype(device: torch.device) -> torch.dtype:
    """The dtype similarities are computed in on ``device``: fp32 on every device (see the module's
    docstring; this plugin once chose fp16 on GPUs, here)."""
    return torch.float32


def _rows(features, rows: slice, device, dtype) -> torch.Tensor:
    """Training rows of a view (a memory-mapped array or a tensor), L2-normalised on the device."""
    block = features[rows]
    # one copy, straight to fp32 (a read-only memory-mapped block cannot be a tensor as it is)
    block = torch.from_numpy(np.array(block, dtype=np.float32)) if isinstance(block, np.ndarray) else block
    return F.normalize(block.to(device=device, dtype=torch.float32), dim=-1).to(dtype)


def similarities(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [Q, N] of normalised queries and rows, in their dtype; fp32 in full precision
    (no TF32), returned as fp32."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return (queries @ rows.T).float()
    finally:
        torch.set_float32_matmul_precision(precision)


class Neighbours(NamedTuple):
    sims: torch.Tensor  # [Q, k] cosine similarities, best first
    labels: torch.Tensor  # [Q, k] their training labels
    index: torch.Tensor  # [Q, k] their rows in the training split
    k: int  # the k used (at most the training images there are)


def nearest(train, train_labels: np.ndarray, queries: torch.Tensor, k: int, runtime: Runtime,
            train_chunk: int = TRAIN_CHUNK, query_chunk: int | None = None) -> Neighbours:
    """Each query's k nearest training rows (rows labelled -1, unreadable images, left out), over every
    rank's chunks of ``train`` (array-like [N, D])."""
    device = runtime.device
    dtype = similarity_dtype(device)
    labels_all = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    q = F.normalize(queries.to(device=device, dtype=torch.float32), dim=-1).to(dtype)
    n_q, k = len(q), min(k, int((labels_all >= 0).sum()))
    best_s = torch.full((n_q, k), -float("inf"), device=device)
    best_i = torch.full((n_q, k), -1, dtype=torch.int64, device=device)
    chunks = range(0, len(labels_all), train_chunk)
    query_chunk = query_chunk or max(1, SIMILARITY_BYTES // (4 * train_chunk))
    for c, start in enumerate(chunks):
        if c % runtime.world != runtime.rank:
            continue
        stop = min(start + train_chunk, len(labels_all))
        rows = _rows(train, slice(start, stop), device, dtype)
        valid = (labels_all[start:stop] >= 0).to(device)
        ids = torch.arange(start, stop, device=device)
        for qs in range(0, n_q, query_chunk):
            sims = similarities(q[qs:qs + query_chunk], rows)
            sims[:, ~valid] = -float("inf")
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            cand_s = torch.cat([best_s[qs:qs + query_chunk], top.values], dim=1)
            cand_i = torch.cat([best_i[qs:qs + query_chunk], ids[top.indices]], dim=1)
            best_s[qs:qs + query_chunk], best_i[qs:qs + query_chunk] = _merge(cand_s, cand_i, k)
            del sims, top  # freed before the next block is computed, not after: one block at a time
    if runtime.distributed:
        best_s, best_i = _merge(torch.cat(runtime.gather(best_s), 1).to(device),
                                torch.cat(runtime.gather(best_i), 1).to(device), k)
    found = best_i >= 0
    return Neighbours(best_s, torch.where(found, labels_all.to(device)[best_i.clamp(min=0)], -1), best_i, k)


def vote(sims: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores [Q, C] of the k nearest: the sum of exp(similarity / T) per class, each query's divided by
    exp(its best similarity / T) (the same ranking of classes as DINO's sums, which overflow for small T:
    T = 1e-300 gave every class inf, and a top-1 of chance; here small T tends to the nearest neighbour's class)."""
    s, valid = sims[:, :k], labels[:, :k] >= 0
    scaled = torch.where(valid, (s - s[:, :1]) / temperature, torch.full_like(s, -float("inf")))
    votes = torch.zeros(len(sims), num_classes, device=sims.device)
    return votes.scatter_add_(1, labels[:, :k].clamp(min=0), scaled.exp())


def outcome_rows(scores: torch.Tensor, target: torch.Tensor, positions: np.ndarray) -> dict:
    """Each query's outcome (evaluation/outcomes.py's rows): its place in the split, label, top-5, right or not."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    if k < 5:
        top = torch.cat([top, top.new_full((len(top), 5 - k), -1)], dim=1)
    hits = top == target.unsqueeze(1)
    return {"position": np.asarray(positions, dtype=np.int64), "label": target.cpu().numpy().astype(np.int64),
            "top5": top.cpu().numpy().astype(np.int32), "correct_top1": hits[:, 0].cpu().numpy(),
            "correct_top5": hits.any(1).cpu().numpy(), "counted": np.ones(len(target), dtype=bool)}


def knn_probe(train, train_labels, queries: torch.Tensor, query_labels: np.ndarray, num_classes: int, ks,
              temperature: float, runtime: Runtime, outcomes: bool = False) -> list[dict]:
    """One result per k: top-1 / top-5 of the queries (those with a label >= 0) as fractions, with their 95%
    intervals; ``outcomes``: each with its per-image rows (``_outcomes``, on every rank: the search's answer is
    the same on each)."""
    from d2v_plugin.evaluation.metrics import topk_correct
    from d2v_plugin.evaluation.statistics import interval

    start = time.perf_counter()
    keep = np.asarray(query_labels) >= 0
    queries, target = queries[torch.from_numpy(keep)], torch.from_numpy(np.asarray(query_labels)[keep])
    sims, labels, _, k_max = nearest(train, train_labels, queries, max(ks), runtime)
    target = target.to(sims.device)
    out = []
    for k in ks:
        used = min(k, k_max)
        scores = vote(sims, labels, used, num_classes, temperature)
        top1, top5 = (int(c) for c in topk_correct(scores, target))
        result = {"k": used, "k_asked": k, "top1": fraction(top1, len(target)),
                  "top1_interval": interval(top1, len(target)), "top5": fraction(top5, len(target)),
                  "top5_interval": interval(top5, len(target)), "n": len(target)}
        if outcomes:
            result["_outcomes"] = outcome_rows(scores, target, np.flatnonzero(keep))
        out.append(result)
    search_s = round(time.perf_counter() - start, 3)
    return [{**r, "search_s": search_s} for r in out]
