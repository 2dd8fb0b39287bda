"""How much a number can be trusted, and whether two models differ: pure functions, each checked against scipy.

- ``wilson(k, n)``: the Wilson score interval of a proportion (a top-1 of k right out of n images), the
  interval scipy's ``binomtest(k, n).proportion_ci(method="wilson")`` gives; sound at k = 0 and k = n, where
  the normal interval collapses.
- ``mean_interval(values)``: the mean of a few tries (few-shot's seeds) with its Student-t interval.
- ``mcnemar(b, c)``: the exact McNemar test of two models scored on the same images: b images only A gets
  right, c only B; two-sided, ``binomtest(b, b + c, 0.5).pvalue``; 1 when they never disagree.
- ``paired_bootstrap(a, b)``: the difference in top-1 of two models on the same images with a percentile
  interval from resampling the images (a fixed seed, the number of resamples recorded).
- ``holm(p)``: Holm's step-down correction of several pairs' p-values.
- ``verdict``: "A better", "B better" or "within noise at 95%", from the (corrected) McNemar p-value.

Because both models are scored on the same images, the paired test counts only the images on which they
disagree: far more sensitive than comparing two intervals (two top-1s 0.3 points apart on ImageNet's 50,000
val images overlap in their intervals, and may still differ).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    z, p = _z(confidence), k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(correct: int, n: int, confidence: float = CONFIDENCE) -> dict:
    """What a result records beside an accuracy: its Wilson interval and what it is."""
    lo, hi = wilson(correct, n, confidence)
    return {"low": lo, "high": hi, "confidence": confidence, "method": "wilson", "n": n}


def mean_interval(values, confidence: float = CONFIDENCE) -> dict:
    """The mean of a few tries and its Student-t interval (the tries' spread, over sqrt(tries)); one try: no
    interval."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "confidence": confidence, "method": "t over tries",
                "tries": len(values)}
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = t.ppf(1 - (1 - confidence) / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "confidence": confidence, "method": "t over tries",
            "tries": len(values)}


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: with b + c discordant images, how likely a split at least as uneven
    as b : c is when each is as likely to go either way (binomial, p = 1/2); computed in log space, so
    exact for any count."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail) if 2 * k != n else 1.0


def paired_bootstrap(a, b, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> dict:
    """top-1(A) - top-1(B) on the same images (``a``, ``b``: per-image correctness, in the same order) and its
    percentile interval over ``resamples`` resamplings of the images: resample r draws n image indices with
    ``numpy.random.default_rng(seed).integers(0, n, n)`` (one call per resample, in order)."""
    d = np.asarray(a, dtype=np.int8) - np.asarray(b, dtype=np.int8)
    n = len(d)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        stats[r] = d[rng.integers(0, n, n)].mean()
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return {"difference": float(d.mean()) if n else 0.0, "low": float(lo), "high": float(hi), "resamples": resamples,
            "seed": seed, "confidence": confidence}


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(b: int, c: int, p: float, alpha: float = 1 - CONFIDENCE) -> str:
    """A better (it alone gets more images right, significantly), B better, or within noise."""
    if p < alpha and b != c:
        return "A better" if b > c else "B better"
    return f"within noise at {round(100 * (1 - alpha))}%"
