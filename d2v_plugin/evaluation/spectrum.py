"""Label-free measures of a feature matrix: is a pretraining run still learning, or collapsing? They need no
labels (a folder of unlabelled images will do) and cost next to nothing on features the store holds.

- RankMe (Garrido et al., ICML 2023), as the paper defines it: σ the singular values of the [N, D] feature
  matrix as it is (not centred), p_k = σ_k / Σσ + ε (ε = 1e-7), RankMe = exp(−Σ p_k log p_k): an effective
  rank between 1 (collapse) and min(N, D). On up to 25,600 images, the paper's count (a fixed draw of the
  split's images). (arnab39/reptrix computes it from the centred covariance's eigenvalues instead: another
  number; this follows the paper.)
- α-ReQ (Agrawal et al., NeurIPS 2022), as arnab39/reptrix computes it (``alpha.get_alpha``): the
  eigenspectrum of the centred features' covariance, normalised to sum 1 (PCA's explained-variance ratios),
  and a least-squares fit of log λ_i against −log i, weighted 1/i, over the ranks i = 11 ... 100 (reptrix's
  ``fit_range = np.arange(10, 100)``, counted from 0); α is the fit's slope: the decay of the spectrum
  (around 1 for well-spread features, larger as they concentrate in fewer directions). Fewer than 110
  eigenvalues: the range ends 10 before the last; fewer than 20: no value.
"""
from __future__ import annotations

import math

import numpy as np
import torch

RANKME_IMAGES = 25_600
EPS = 1e-7
FIT_FIRST, FIT_LAST, TAIL = 10, 100, 10  # reptrix's fit_range np.arange(10, 100); its 10 kept off the end


def rankme(features, eps: float = EPS) -> float:
    """RankMe of an [N, D] feature matrix (float64 singular values)."""
    s = torch.linalg.svdvals(torch.as_tensor(np.asarray(features), dtype=torch.float64))
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def eigenspectrum(features) -> np.ndarray:
    """The centred features' covariance eigenvalues, largest first, normalised to sum 1."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    variance = (s * s).numpy()
    return variance / variance.sum()


def alpha_req(features) -> dict:
    """α-ReQ of an [N, D] feature matrix: {alpha, fit_first, fit_last (1-based ranks fitted), r2}."""
    eigen = eigenspectrum(features)
    last = min(FIT_LAST, len(eigen) - TAIL)
    if last - FIT_FIRST < TAIL:
        return {"alpha": None, "fit_first": None, "fit_last": None, "r2": None}
    ranks = np.arange(FIT_FIRST, last)  # 0-based, as reptrix's trange
    y = np.log(np.abs(eigen[ranks]))
    i = ranks + 1.0
    x = np.stack([-np.log(i), np.ones_like(i)], axis=1)
    w = 1.0 / i
    b = np.linalg.solve(x.T @ (x * w[:, None]), (w[:, None] * x).T @ y)
    fitted = x @ b
    r2 = 1 - ((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return {"alpha": float(b[0]), "fit_first": FIT_FIRST + 1, "fit_last": int(last), "r2": float(r2)}


def draw(rows: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` of ``rows``, a fixed draw, in index order."""
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))


LABEL_FREE = ("rankme", "alphareq")


def label_free_probe(view, labels: np.ndarray, measures, limit: int = RANKME_IMAGES) -> list[dict]:
    """One result per measure on the split's readable images (up to ``limit`` of them, a fixed draw), read
    from the store: {"probe", "value", "n", ...}."""
    import time

    start = time.perf_counter()
    rows = draw(np.flatnonzero(np.asarray(labels) >= 0), limit)
    x = np.asarray(view[rows], dtype=np.float64)
    out = []
    for name in measures:
        if name == "rankme":
            value = {"value": rankme(x), "max_possible": int(min(x.shape))}
        else:
            fit = alpha_req(x)
            value = {"value": fit["alpha"], **{k: v for k, v in fit.items() if k != "alpha"}}
        out.append({"probe": name, **value, "n": len(rows), "probe_s": round(time.perf_counter() - start, 3)})
    if not all(math.isfinite(r["value"]) for r in out if r["value"] is not None):
        raise ValueError("the features hold values that are not numbers: no spectrum")
    return out
