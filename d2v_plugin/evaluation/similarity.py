"""How close two encoders are, block by block: linear CKA between every block of A and every block of B on the
same images (Kornblith et al., 2019), with the minibatch estimator of Nguyen, Raghu and Kornblith (2021):
the unbiased HSIC (Song et al., 2012) of each minibatch's linear kernels K = X Xᵀ and L = Y Yᵀ, averaged over
the minibatches, CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) · mean HSIC(L, L)). Memory does not grow with
the number of images: the features come from the store a minibatch at a time, and each minibatch's terms
are O(batch²) (tr(K̃L̃) is an elementwise sum, 1ᵀK̃L̃1 a dot product of row sums). On several ranks each
takes its share of the minibatches and the sums are added in float64, so any number of ranks gives one
rank's matrix.

For a distilled student made by keeping its teacher's first N blocks, CKA on those blocks starts at 1.0
against the teacher's: a built-in check of the copy, and where training moves it away."""
from __future__ import annotations

import numpy as np
import torch

BATCH = 256  # images per minibatch (the estimator needs at least 4)


def _centred_terms(k: torch.Tensor):
    """K with its diagonal zeroed, its row sums, its total: what the unbiased HSIC needs of a kernel."""
    k = k.clone()
    k.fill_diagonal_(0)
    rows = k.sum(dim=1)
    return k, rows, rows.sum()


def hsic_unbiased(k, l) -> torch.Tensor:
    """Song et al.'s unbiased HSIC of two kernels (each ``_centred_terms``' triple) over n = len samples:
    [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3))."""
    (kt, kr, ks), (lt, lr, ls) = k, l
    n = kt.shape[0]
    trace = (kt * lt).sum()  # tr(K̃L̃) for symmetric kernels
    return (trace + ks * ls / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (kr @ lr)) / (n * (n - 3))


class MinibatchCKA:
    """Sums of the HSIC terms of every (block of A, block of B) pair over minibatches."""

    def __init__(self, blocks_a: int, blocks_b: int):
        self.xy = torch.zeros(blocks_a, blocks_b, dtype=torch.float64)
        self.xx = torch.zeros(blocks_a, dtype=torch.float64)
        self.yy = torch.zeros(blocks_b, dtype=torch.float64)
        self.batches = 0

    def add(self, xs, ys) -> None:
        """One minibatch: ``xs`` / ``ys`` lists of [b, D] features, one per block of A / of B."""
        ka = [_centred_terms(x.double() @ x.double().T) for x in xs]
        kb = [_centred_terms(y.double() @ y.double().T) for y in ys]
        for i, k in enumerate(ka):
            self.xx[i] += hsic_unbiased(k, k)
            for j, l in enumerate(kb):
                self.xy[i, j] += hsic_unbiased(k, l)
        for j, l in enumerate(kb):
            self.yy[j] += hsic_unbiased(l, l)
        self.batches += 1

    def reduced(self, runtime) -> "MinibatchCKA":
        """The sums over every rank (float64: the same matrix on any number of ranks, to rounding)."""
        if runtime.distributed:
            packed = runtime.reduce_sum(torch.cat([self.xy.flatten(), self.xx, self.yy,
                                                   torch.tensor([float(self.batches)], dtype=torch.float64)]))
            a, b = self.xy.shape
            self.xy = packed[:a * b].view(a, b)
            self.xx, self.yy = packed[a * b:a * b + a], packed[a * b + a:a * b + a + b]
            self.batches = int(packed[-1])
        return self

    def matrix(self) -> np.ndarray:
        """CKA [blocks of A, blocks of B] (the 1/batches of the means cancels in the ratio)."""
        denom = torch.sqrt(torch.clamp(self.xx[:, None] * self.yy[None, :], min=1e-300))
        return (self.xy / denom).numpy()


def cka_of_views(views_a, views_b, rows: np.ndarray, runtime, batch: int = BATCH) -> tuple[np.ndarray, int]:
    """CKA between every block of A and B on ``rows``: ``views_a[i][rows]`` gives block i's features of those
    rows (the store's views). Minibatch k (the next ``batch`` rows, in index order; a last one under 4 rows is
    left out) goes to rank k % ranks. Returns (matrix, images used)."""
    acc = MinibatchCKA(len(views_a), len(views_b))
    batches = [rows[s:s + batch] for s in range(0, len(rows), batch) if len(rows[s:s + batch]) >= 4]
    for k, part in enumerate(batches):
        if k % runtime.world != runtime.rank:
            continue
        xs = [torch.from_numpy(np.asarray(v[part], dtype=np.float64)) for v in views_a]
        ys = [torch.from_numpy(np.asarray(v[part], dtype=np.float64)) for v in views_b]
        acc.add(xs, ys)
    acc.reduced(runtime)
    return acc.matrix(), sum(len(p) for p in batches)


def compare_encoders(args, runtime) -> dict:
    """``cli.similarity``'s run: the features of every block of A and B on the same images (B fed A's data
    config), from the store (resumable), and their CKA matrix; the result with its provenance."""
    from d2v_plugin.data.containers import COMMAND_FLAGS, open_split
    from d2v_plugin.data.index import Subset
    from d2v_plugin.evaluation.features import index_identity
    from d2v_plugin.evaluation.probes import cached_features
    from d2v_plugin.evaluation.provenance import provenance

    index = open_split(args.data, args.split, cache_dir=args.cache_dir, data_format=args.data_format,
                       names=COMMAND_FLAGS)
    if args.images and args.images < len(index):  # a fixed draw, in index order: only these are extracted
        keep = np.sort(np.random.default_rng(0).choice(len(index), size=args.images, replace=False))
        index = Subset(index, keep)
    sides, data_cfg = {}, None
    for side, path, weights in (("a", args.a, args.weights_a), ("b", args.b, args.weights_b)):
        feats = cached_features(path, args.data, [args.split], runtime, pool=args.pool, sweep=True,
                                store=args.cache, batch_size=args.batch_size, workers=args.workers,
                                chunk=args.store_chunk, data_cfg=data_cfg, weights=weights, index=index,
                                trust=args.trust_checkpoint, num_heads=args.num_heads, norm_eps=args.norm_eps)
        data_cfg = feats.data_cfg
        sides[side] = feats
    split_a, split_b = sides["a"].splits[args.split], sides["b"].splits[args.split]
    rows = np.flatnonzero((split_a.labels >= 0) & (split_b.labels >= 0))  # images both could read
    views_a = [split_a.view(sides["a"].spec.of_block(b)) for b in sides["a"].spec.blocks]
    views_b = [split_b.view(sides["b"].spec.of_block(b)) for b in sides["b"].spec.blocks]
    matrix, used = cka_of_views(views_a, views_b, rows, runtime, args.minibatch)
    for feats in sides.values():
        feats.close(runtime)
    digest = index_identity(index)

    def model(side, path, weights):
        return {"checkpoint": path, "weights": weights, "blocks": len(sides[side].spec.blocks),
                **provenance(None, path)["provenance"]}

    return {"a": model("a", args.a, args.weights_a), "b": model("b", args.b, args.weights_b), "measure": "linear CKA",
            "estimator": "minibatch unbiased HSIC (Nguyen et al. 2021)", "minibatch": args.minibatch,
            "pool": args.pool, "split": args.split, "images": used, "index_digest": digest,
            "data": data_cfg.describe(), "matrix": matrix.tolist(),
            "diagonal": [float(matrix[i, i]) for i in range(min(matrix.shape))],
            **provenance(runtime, index_digest=digest)}


def plot_heatmap(path: str, matrix: np.ndarray, label_a: str, label_b: str) -> str:
    """The CKA matrix as a heatmap: A's blocks down, B's across, each labelled, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from d2v_plugin.atomic import atomic_path

    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * cols, 1.0 + 0.45 * rows), dpi=100)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", origin="upper")
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    ax.set_xlabel(f"{label_b}: block")
    ax.set_ylabel(f"{label_a}: block")
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if matrix[i, j] > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="linear CKA")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
