"""What every cached-feature probe does first: the encoder of a file, its splits, and their features
in the store (extracted where they are not there yet), read back as views of the chosen entries.
Then the probes themselves (``knn``, ``linear``, ``fewshot``), one module each, run on these views."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from d2v_plugin.evaluation.defaults import default_store_dir
from d2v_plugin.evaluation.features import FeatureSpec, FeatureStore, split_features
from d2v_plugin.evaluation.runtime import Runtime

logger = logging.getLogger(__name__)


class View:
    """Rows of a store's features, the entries at ``positions`` concatenated: [N, len(positions) * D],
    read from disk only for the rows asked for (``view[start:stop]``)."""

    def __init__(self, store: FeatureStore, positions: list[int]):
        self.store, self.positions = store, list(positions)
        self._features = store.features()

    def __len__(self) -> int:
        return self.store.n

    @property
    def dim(self) -> int:
        return len(self.positions) * self.store.dim

    def __getitem__(self, rows) -> np.ndarray:
        block = self._features[rows]
        return block[:, self.positions, :].reshape(block.shape[0], -1)


@dataclass
class SplitFeatures:
    split: str
    store: FeatureStore
    labels: np.ndarray
    cost: dict
    index: object = None  # the split's index: its images' identities, for per-image outcomes

    def view(self, positions) -> View:
        return View(self.store, positions)


@dataclass
class CachedFeatures:
    """A checkpoint's features of some splits, and what they are of."""

    checkpoint: str
    spec: FeatureSpec
    classes: list
    splits: dict = field(default_factory=dict)
    depth: int = 0
    temporary: str | None = None
    data_cfg: object = None
    weights: str = "student"

    def describe(self) -> dict:
        return {"checkpoint": self.checkpoint, "weights": self.weights, "features": self.spec.describe(),
                "depth": self.depth, "data": self.data_cfg.describe()}

    def close(self, runtime: Runtime) -> None:
        if self.temporary and runtime.is_main:
            shutil.rmtree(self.temporary, ignore_errors=True)


def cached_features(checkpoint: str, data: str, splits, runtime: Runtime, *, block: str = "last", pool: str = "mean",
                    sweep: bool = False, prefix: str | None = None, trust: bool = False, num_heads=None, norm_eps=None,
                    image_size=None, crop_ratio=None, data_format: str = "auto", index_cache=None, store=None,
                    batch_size: int = 64, workers=None, names=None, chunk: int = 256, data_cfg=None,
                    interpolation=None, weights: str = "student", index=None) -> CachedFeatures:
    """The features of ``splits`` (the first one's classes are the label ids) of a checkpoint's encoder,
    from the store (``store``: its folder; ``"none"``: a temporary one, removed by ``close``). ``data_cfg``:
    the pixels to feed it (a comparison's, the same for every model), else the file's own evaluation
    setting with ``image_size`` / ``crop_ratio`` / ``interpolation`` over it."""
    from d2v_plugin.data.containers import COMMAND_FLAGS, open_split
    from d2v_plugin.inference import load_encoder

    if data_cfg is not None:
        image_size = data_cfg.image_size
    encoder, own, ckpt = load_encoder(checkpoint, trust=trust, prefix=prefix, num_heads=num_heads, norm_eps=norm_eps,
                                      image_size=image_size, crop_ratio=crop_ratio, interpolation=interpolation,
                                      weights=weights)
    if data_cfg is not None and data_cfg != own:
        logger.warning(f"{checkpoint}: fed the comparison's pixels ({data_cfg.describe()}), not its own "
                       f"evaluation setting ({own.describe()})")
    data_cfg = data_cfg or own
    depth = encoder.cfg.depth
    spec = FeatureSpec.all_blocks(pool, depth) if sweep else FeatureSpec.parse(block, pool, depth)
    temporary = None
    if store == "none":
        if runtime.distributed:
            raise ValueError("--cache none keeps the features in a folder of one process: with several ranks give "
                             "a --cache folder they share")
        store = temporary = tempfile.mkdtemp(prefix="d2v_features_")
    store = store or default_store_dir()
    choice = {"prefix": prefix, "num_heads": encoder.cfg.num_heads, "norm_eps": encoder.cfg.norm_eps}
    if weights != "student":  # (the student's stores keep the key they had)
        choice["weights"] = weights
    result = CachedFeatures(checkpoint, spec, [], depth=depth, temporary=temporary, data_cfg=data_cfg,
                            weights=weights)
    given = index  # an index already opened (a Subset of a split), for the one split asked
    for k, split in enumerate(splits):
        index = given if given is not None and len(splits) == 1 else open_split(
            data, split, classes=result.classes or None, cache_dir=index_cache, data_format=data_format,
            names=names or COMMAND_FLAGS)
        if k == 0:
            result.classes = list(index.classes)
        split_store, cost = split_features(encoder, checkpoint, choice, index, data_cfg, spec, runtime, store,
                                           batch_size, workers, desc=f"{split} features", chunk=chunk,
                                           num_classes=len(result.classes))
        result.splits[split] = SplitFeatures(split, split_store, split_store.labels(), cost, index)
    return result


def features_from_args(args, runtime: Runtime, checkpoint: str, sweep: bool = False, data_cfg=None,
                       splits=None) -> CachedFeatures:
    """The train and val features a probe command's flags ask for (cli.knn, cli.probe, cli.track), of one of
    its checkpoints (``splits``: only these); ``data_cfg``: the comparison's pixels (the first model's, or the
    flags')."""
    return cached_features(checkpoint, args.data, splits or [args.train_split, args.val_split], runtime,
                           block=args.block, pool=args.pool, sweep=sweep, prefix=args.prefix,
                           trust=getattr(args, "trust_checkpoint", False), num_heads=getattr(args, "num_heads", None),
                           norm_eps=getattr(args, "norm_eps", None), image_size=args.image_size,
                           crop_ratio=args.crop_ratio, interpolation=args.interpolation, data_format=args.data_format,
                           index_cache=args.cache_dir, store=args.cache, batch_size=args.batch_size,
                           workers=args.workers, chunk=args.store_chunk, data_cfg=data_cfg,
                           weights=getattr(args, "weights", "student"))


def check_splits(args, probes=("knn",)) -> None:
    """Every split a command reads, opened (indexed, or its index read from the cache) before any work: a
    missing or empty split, or one whose labels do not fit train's classes, is named now, not after the
    other split's features were extracted; and the probes' settings against the splits (a held-out part of
    train with no image in it)."""
    from d2v_plugin.data.containers import COMMAND_FLAGS, open_split
    from d2v_plugin.evaluation.linear import held_out_split

    opened = {"data_format": args.data_format, "cache_dir": args.cache_dir, "names": COMMAND_FLAGS}
    if not needs_train(probes):  # label-free measures: the val split alone, labelled or not
        open_split(args.data, args.val_split, **opened)
        return
    train = open_split(args.data, args.train_split, **opened)
    open_split(args.data, args.val_split, classes=list(train.classes), **opened)
    if "linear" in probes and getattr(args, "select_on", "held-out") == "held-out":
        _, held = held_out_split(np.asarray(train.labels), args.held_out, 0)
        if not len(held):
            raise ValueError(f"--held-out {args.held_out:g}: of the {len(train):,} train images no class gives a "
                             f"held-out image to choose the linear head on; raise it, or --select-on val")


def each_model(args, runtime: Runtime, sweep: bool = False, probes=("knn",)):
    """(features) of each of a command's checkpoints in turn, all fed the same pixels: the flags' data config
    over the first model's own, then that one for every other (a comparison of models on different pixels
    would compare the pixels). Each one's features are closed after its probes. Every split is checked
    before the first model is loaded."""
    check_splits(args, probes)
    data_cfg = None
    splits = [args.train_split, args.val_split] if needs_train(probes) else [args.val_split]
    for checkpoint in args.checkpoints:
        feats = features_from_args(args, runtime, checkpoint, sweep=sweep, data_cfg=data_cfg, splits=splits)
        data_cfg = feats.data_cfg
        try:
            yield feats
        finally:
            feats.close(runtime)


def described(results, feats: CachedFeatures, runtime: Runtime, train_split: str = "train", val_split: str = "val"):
    """Each result with what it is of: the checkpoint, the features, the device, the extraction's cost, and its
    provenance (the checkpoint's SHA-256, the val split's index digest, versions, the command, the date)."""
    from d2v_plugin.evaluation.provenance import provenance

    train = feats.splits.get(train_split)
    n_train = int((train.labels >= 0).sum()) if train is not None else None
    extract = round(sum(s.cost["extract_s"] for s in feats.splits.values()), 3)
    stores = None if feats.temporary else [s.cost["store"] for s in feats.splits.values()]  # None: removed after
    origin = provenance(runtime, feats.checkpoint, feats.splits[val_split].store.key["index"])
    for r in results:  # (a block's own features, under --sweep-blocks, are the result's)
        yield {**feats.describe(), **r, "n_train": n_train, **runtime.describe(), "extract_s": extract,
               "features_in": stores, "split": val_split, **origin}


def knn_from_args(args, runtime: Runtime) -> tuple[list[dict], dict]:
    """``cli.knn``'s run: for each checkpoint, features of the train and val splits, then one result per k (with
    its per-image rows when --out is given); (results, the val split's index)."""
    out, indexes = [], {}
    for feats in each_model(args, runtime):
        n_train = int((feats.splits[args.train_split].labels >= 0).sum())
        if max(args.k) > n_train and runtime.is_main:
            logger.warning(f"--k {max(args.k)} is more than the {n_train} train images: k = {n_train} is used")
        results = run_probes(feats, ["knn"], runtime, train_split=args.train_split, val_split=args.val_split,
                             ks=args.k, temperature=args.temperature, outcomes=bool(args.out))
        out += list(described(results, feats, runtime, args.train_split, args.val_split))
        indexes[args.val_split] = feats.splits[args.val_split].index
    return out, indexes


PROBES = ("knn", "linear", "fewshot", "rankme", "alphareq")
LABEL_FREE = ("rankme", "alphareq")  # need no labels and no train split (evaluation/spectrum.py)


def needs_train(probes) -> bool:
    return any(p not in LABEL_FREE for p in probes)


def best_blocks(records) -> list[dict]:
    """After a sweep over the blocks: the best block of each probe (and k, shot count), by top-1, ties to the
    earlier block; one record each, as the sweep's summary."""
    best = {}
    for r in records:
        if r.get("block") is None or r.get("top1") is None:
            continue
        key = (r["probe"], r.get("k"), r.get("shots"))
        if key not in best or r["top1"] > best[key]["top1"]:
            best[key] = r
    return [{"summary": "best block", "probe": probe, **({"k": k} if k is not None else {}),
             **({"shots": shots} if shots is not None else {}), "block": r["block"], "top1": r["top1"],
             "checkpoint": r.get("checkpoint")} for (probe, k, shots), r in best.items()]


def parse_probes(text: str) -> list[str]:
    names = [p for p in text.replace(" ", "").split(",") if p]
    unknown = [p for p in names if p not in PROBES]
    if unknown or not names:
        raise ValueError(f"--probes {text!r}: choose from {', '.join(PROBES)} (comma-separated)")
    return names


def run_probes(feats: CachedFeatures, probes, runtime: Runtime, *, train_split: str = "train", val_split: str = "val",
               ks=(20,), temperature: float = 0.07, linear=None, shots=None, seeds=None, lam=None,
               sweep: bool = False, outcomes: bool = False):
    """Each probe on the cached features (every block's, with ``sweep``): yields one result per probe and k /
    shot count (and block), with the probe's time in it. Every probe runs on every rank: kNN with the train
    rows split over them, the linear probe with the grid's heads split, few-shot with the draws split; rank
    0's results are the ones printed. ``outcomes``: kNN's and the linear probe's results carry their per-image
    rows (``_outcomes``: evaluation/outcomes.py's, of the val split). The label-free measures (rankme,
    alphareq) run on the val split alone."""
    import torch

    from d2v_plugin.evaluation import fewshot, knn
    from d2v_plugin.evaluation.linear import LinearSettings, linear_probe
    from d2v_plugin.evaluation.spectrum import label_free_probe

    train, val = feats.splits.get(train_split), feats.splits[val_split]
    classes = len(feats.classes)
    blocks = feats.spec.blocks if sweep else [None]
    for block in blocks:
        positions = feats.spec.of_block(block) if block is not None else list(range(len(feats.spec.entries)))
        where = {}
        if block is not None:  # the block's own entries, not the whole sweep's
            where = {"block": block, "features": "+".join(f"{t}@{b}" for b, t in (feats.spec.entries[i]
                                                                                 for i in positions))}
        train_view, val_view = train.view(positions) if train is not None else None, val.view(positions)
        free = [p for p in probes if p in LABEL_FREE]
        if free:  # on the val split's images, no labels read
            for r in label_free_probe(val_view, val.labels, free):
                yield {**r, **where}
        if "knn" in probes:
            queries = torch.from_numpy(np.ascontiguousarray(val_view[:]))
            for r in knn.knn_probe(train_view, train.labels, queries, val.labels, classes, ks, temperature, runtime,
                                   outcomes):
                yield {**r, "probe": "knn", "temperature": temperature, **where}
        # the linear and few-shot probes read the rows they use from the store (never all of train in memory);
        # every rank trains its share of the heads / draws, and the scores are summed over the ranks
        if "linear" in probes:
            yield {**linear_probe(train_view, train.labels, val_view, val.labels, classes, linear or LinearSettings(),
                                  runtime, outcomes), **where}
        if "fewshot" in probes:
            for r in fewshot.fewshot_probe(train_view, train.labels, val_view, val.labels, classes, runtime,
                                           shots or fewshot.SHOTS, seeds or fewshot.SEEDS, lam or fewshot.LAMBDA):
                yield {**r, **where}
