"""Few-shot classification of cached features, MSN's protocol (facebookresearch/msn ``logistic_eval.py``, with
cyanure's objective): 1, 2, 5 and 10 training images per class, drawn with 3 fixed seeds; each row of
features centred on the mean of its own components and L2-normalised (cyanure's ``preprocess(centering=True,
normalize=True, columns=False)``), train and val alike; an L2-regularised multinomial logistic regression
without an intercept, ``mean cross-entropy + (lambda / n) / 2 * ||W||^2`` over the n drawn images (MSN's
``lambd /= len(embs)``, lambda 0.00025), which is scikit-learn's ``LogisticRegression(C=1/lambda,
fit_intercept=False)``; fitted by full-batch L-BFGS on the device (MSN: cyanure's solver), stopped as MSN stops cyanure (a relative
duality gap of 1e-3, at most 300 iterations); top-1 on val.
It reports each shot count's mean and spread over the seeds. The draws are the plugin's (MSN's own are
fixed subset files of ImageNet): each class's images permuted by the seed, the first ``shots`` kept."""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from d2v_plugin.evaluation.defaults import LAMBDA, MAX_ITERATIONS, SEEDS, SHOTS, TOL
from d2v_plugin.evaluation.metrics import fraction, topk_correct
from d2v_plugin.evaluation.runtime import Runtime
from d2v_plugin.evaluation.statistics import interval, mean_interval



def draw(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` rows of each class (all of a class that has fewer), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels[labels >= 0])]
    return np.sort(np.concatenate(rows))


def prepare(x: torch.Tensor) -> torch.Tensor:
    """MSN's features: each row centred on the mean of its own components, then L2-normalised (in float64:
    a large mean shared by every image leaves the class signal in the low bits of fp32)."""
    x = x.double()
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=-1)


def relative_duality_gap(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lam: float) -> float:
    """(P(W) - D(A)) / P(W) for P(W) = mean cross-entropy(x W^T, y) + lam / 2 ||W||^2 and the dual point A made
    from W's probabilities p (A_i = onehot(y_i) - p_i): D = mean entropy(p_i) - lam / 2 ||X^T A / (lam n)||^2,
    a lower bound on the optimum, so the gap bounds how far P(W) is from it (cyanure's stopping rule)."""
    z = x @ w.T
    primal = F.cross_entropy(z, y) + 0.5 * lam * (w * w).sum()
    p = z.softmax(dim=1)
    dual_w = (F.one_hot(y, w.shape[0]).to(x.dtype) - p).T @ x / (lam * len(x))
    dual = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=1).mean() - 0.5 * lam * (dual_w * dual_w).sum()
    return float((primal - dual) / primal)


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float = LAMBDA, tol: float = TOL,
        max_iterations: int = MAX_ITERATIONS, check_every: int = 5) -> tuple[torch.Tensor, float]:
    """(W [C, D], its relative duality gap) minimising mean cross-entropy(x W^T, y) + (lam / n) / 2 ||W||^2 over
    the n rows of x (MSN divides lambda by the number of training images). L-BFGS with a strong Wolfe line
    search, stopped as MSN stops cyanure (``tol=1e-3``, ``max_epochs=300``): at a relative duality gap of
    ``tol``, checked every ``check_every`` iterations, or after ``max_iterations``."""
    lam = lam / len(x)
    w = torch.zeros(num_classes, x.shape[1], device=x.device, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=check_every, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    gap = float("inf")
    for _ in range(0, max_iterations, check_every):
        opt.step(closure)
        with torch.no_grad():
            gap = relative_duality_gap(x, y, w, lam)
        if gap <= tol:
            break
    return w.detach(), gap


def fewshot_probe(train_x, train_y: np.ndarray, val_x, val_y: np.ndarray, num_classes: int, runtime: Runtime,
                  shots=SHOTS, seeds=SEEDS, lam: float = LAMBDA) -> list[dict]:
    """One result per shot count: val top-1 mean, standard deviation, min and max over the seeds. ``train_x``
    / ``val_x``: row-indexable features (a store's view): only the drawn rows are read. On several ranks
    each fits its share of the (shots, seed) draws; the results are summed over the ranks."""
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    keep = np.flatnonzero(val_y >= 0)
    vx = prepare(torch.as_tensor(np.asarray(val_x[keep], dtype=np.float32)).to(runtime.device))
    vy = torch.from_numpy(val_y[keep]).to(runtime.device)
    draws = [(k, seed) for k in shots for seed in seeds]
    correct, seconds, gaps = (torch.zeros(len(draws), dtype=torch.float64) for _ in range(3))
    for i, (k, seed) in enumerate(draws):
        if i % runtime.world != runtime.rank:
            continue
        start = time.perf_counter()
        rows = draw(train_y, k, seed)
        x = prepare(torch.as_tensor(np.asarray(train_x[rows], dtype=np.float32)).to(runtime.device))
        w, gaps[i] = fit(x, torch.from_numpy(train_y[rows]).to(runtime.device), num_classes, lam)
        correct[i] = int(topk_correct(vx @ w.T, vy)[0])
        seconds[i] = time.perf_counter() - start
    correct, seconds, gaps = runtime.reduce_sum(correct), runtime.reduce_sum(seconds), runtime.reduce_sum(gaps)
    out = []
    for k in shots:
        mine = [i for i, (kk, _) in enumerate(draws) if kk == k]
        top1 = [fraction(int(correct[i]), len(vy)) for i in mine]
        out.append({"probe": "fewshot", "shots": k, "top1": statistics.mean(top1),
                    "top1_interval": {**mean_interval(top1), "per_seed": [interval(int(correct[i]), len(vy))
                                                                           for i in mine]},
                    "top1_std": statistics.pstdev(top1), "top1_min": min(top1), "top1_max": max(top1),
                    "top1_per_seed": top1, "seeds": list(seeds), "lambda": lam,
                    "lambda_divided_by": "the drawn images (MSN)", "relative_duality_gap_max": float(gaps[mine].max()),
                    "stopping": f"relative duality gap {TOL} or {MAX_ITERATIONS} L-BFGS iterations (MSN: cyanure's "
                                f"tol=1e-3, max_epochs=300)", "features": "row-centred, L2-normalised (MSN)",
                    "n": len(vy), "probe_s": round(float(seconds[mine].sum()), 3)})
    return out
