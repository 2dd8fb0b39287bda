"""Frozen features of any block, and the store that keeps them: one forward pass over a split serves
every probe (kNN, linear, few-shot), and a killed extraction resumes where it stopped.

Which features (``FeatureSpec``): a list of entries (block, token), block 1..depth (1 = the first
block), token ``mean`` (the mean of the patch tokens, the pooling the head uses) or ``cls``. ``--block
N|last|last4`` and ``--pool mean|cls|mean+cls`` name them; ``last4`` is DINOv2's ``n_last_blocks=4``: the
CLS tokens of the last 4 blocks, then the mean of the last block's patch tokens. ``all_blocks`` gives
every block's entries (``--sweep-blocks``), from the same single pass.

The store (``FeatureStore``) is a folder of memory-mapped arrays on disk, ``features`` [N, entries, D]
in float16 (or float32) and ``labels`` [N], written in chunks of rows as they are computed; a chunk is
marked done (a file in ``done/``) only once its rows are on disk, so a killed extraction redoes at most
the chunks in flight. Its key covers everything that changes the features: the checkpoint's identity
(path, size, modification time) and the encoder chosen in it (prefix, heads, eps, depth), the entries,
the image size, crop ratio and interpolation, the split's index (its files and labels) and the
precision. A store that is corrupt, incomplete in a way its markers do not explain, or of another
version is rebuilt, with one line saying why. Ranks write disjoint chunks of the same store.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass

import numpy as np
import torch

from d2v_plugin.atomic import atomic_path
from d2v_plugin.evaluation.loop import eval_batches
from d2v_plugin.evaluation.runtime import Runtime
from d2v_plugin.models.safe_load import shown

logger = logging.getLogger(__name__)

STORE_VERSION = 1
TOKENS = ("mean", "cls")
POOLS = {"mean": ("mean",), "cls": ("cls",), "mean+cls": ("mean", "cls")}


@dataclass(frozen=True)
class FeatureSpec:
    """The features a probe reads: (block, token) entries, concatenated in this order."""

    entries: tuple

    @classmethod
    def parse(cls, block: str, pool: str, depth: int) -> "FeatureSpec":
        """``block``: N (1..depth), ``last`` or ``last4``; ``pool``: mean, cls or mean+cls (not with last4,
        which has its own layout)."""
        if pool not in POOLS:
            raise ValueError(f"--pool {pool!r}: use one of {', '.join(POOLS)}")
        if block == "last4":
            if depth < 4:
                raise ValueError(f"--block last4 needs 4 blocks; the encoder has {depth}")
            return cls(tuple((b, "cls") for b in range(depth - 3, depth + 1)) + ((depth, "mean"),))
        number = depth if block == "last" else _block_number(block, depth)
        return cls(tuple((number, token) for token in POOLS[pool]))

    @classmethod
    def all_blocks(cls, pool: str, depth: int) -> "FeatureSpec":
        if pool not in POOLS:
            raise ValueError(f"--pool {pool!r}: use one of {', '.join(POOLS)}")
        return cls(tuple((b, token) for b in range(1, depth + 1) for token in POOLS[pool]))

    @property
    def blocks(self) -> list[int]:
        return sorted({b for b, _ in self.entries})

    def of_block(self, block: int) -> list[int]:
        """The positions of one block's entries."""
        return [i for i, (b, _) in enumerate(self.entries) if b == block]

    def describe(self) -> str:
        return "+".join(f"{t}@{b}" for b, t in self.entries)


def _block_number(text: str, depth: int) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"--block {text!r}: use a block number 1..{depth}, last or last4") from None
    if not 1 <= number <= depth:
        raise ValueError(f"--block {number}: the encoder has blocks 1..{depth}")
    return number


def compute_entries(encoder, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """[B, entries, D] of a batch: each block's output pooled as the spec says, from one forward pass
    that stops after the last block asked for."""
    outputs = encoder.block_outputs(images, spec.blocks)
    pooled = [outputs[b][:, 1:].mean(dim=1) if token == "mean" else outputs[b][:, 0] for b, token in spec.entries]
    return torch.stack(pooled, dim=1)


# --- the store ------------------------------------------------------------------------------------

def file_identity(path: str) -> dict:
    """A file (or an export folder's weights) by path, size and modification time."""
    target = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    st = os.stat(target)
    return {"path": os.path.realpath(target), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def index_identity(index) -> str:
    """A digest of a split's index: where it is, its items and their labels."""
    if hasattr(index, "parent") and hasattr(index, "rows"):  # a Subset: its split's digest and the rows taken
        h = hashlib.sha1(f"{index_identity(index.parent)}\0subset\0".encode())
        h.update(np.asarray(index.rows, dtype=np.int64).tobytes())
        return h.hexdigest()
    h = hashlib.sha1(f"{index.split_dir}\0{len(index)}\0".encode())
    files = getattr(index, "files", None)
    if hasattr(files, "blob"):  # a folder index: its paths as stored
        h.update(files.blob.tobytes())
    elif hasattr(index, "keys") and hasattr(index.keys, "blob"):  # tar shards: member keys
        h.update(index.keys.blob.tobytes())
    else:  # Parquet: files and row counts
        h.update("\0".join(map(str, getattr(index, "files", []))).encode())
    h.update(np.asarray(index.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


META_BYTES = 2**16  # meta.json: a key and a shape
MARKER = re.compile(r"[0-9]{1,12}")  # a done/ marker's name: its chunk, in ASCII digits
MARKER_BYTES = 64  # a marker's content: the chunk's checksum


def _regular(path: str) -> os.stat_result | None:
    """The file's status if it is a regular file (not a link, a FIFO, a device), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


class FeatureStore:
    """A split's features on disk (see the module's docstring). ``open`` it with its key; rank 0 creates
    or validates it, every rank then writes its chunks; ``features`` / ``labels`` read it back.

    Everything in the folder is read as a file from outside: only regular files (never through a link,
    never a FIFO or a device) of the size the store's shape gives, meta.json within its bound; a chunk
    counts as done only by a marker named after it whose content is the checksum of the chunk's rows
    (features and labels), checked before the store is used: a stray marker, flipped bytes or labels out
    of range make the chunk computed again, with a line saying which."""

    def __init__(self, folder: str, key: dict, n: int, entries: int, dim: int, dtype: str = "float16",
                 chunk: int = 256, num_classes: int | None = None):
        self.key = key
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = os.path.join(folder, digest)
        self.n, self.entries, self.dim, self.dtype, self.chunk = n, entries, dim, dtype, chunk
        self.num_classes = num_classes
        self.meta = {"version": STORE_VERSION, "key": key, "n": n, "entries": entries, "dim": dim, "dtype": dtype,
                     "chunk": chunk}

    @property
    def chunks(self) -> int:
        return (self.n + self.chunk - 1) // self.chunk

    def rows(self, c: int) -> range:
        return range(c * self.chunk, min((c + 1) * self.chunk, self.n))

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def sizes(self) -> dict:
        itemsize = np.dtype(self.dtype).itemsize
        return {"features.bin": self.n * self.entries * self.dim * itemsize, "labels.bin": self.n * 8}

    def problem(self) -> str | None:
        """Why the folder cannot be used as this store (None when it can)."""
        if os.path.islink(self.folder) or not os.path.isdir(self.folder):
            return "it is not a folder (a link?)"
        meta_path = self._path("meta.json")
        st = _regular(meta_path)
        if st is None:
            return "meta.json is missing" if not os.path.lexists(meta_path) else "meta.json is not a regular file"
        if st.st_size > META_BYTES:
            return f"meta.json has {st.st_size:,} bytes, more than a store's {META_BYTES:,}"
        try:
            with open(meta_path, "rb") as f:
                meta = json.loads(f.read(META_BYTES + 1))
        except (OSError, ValueError, RecursionError) as err:
            return f"meta.json is unreadable ({type(err).__name__})"
        if not isinstance(meta, dict) or meta.get("version") != STORE_VERSION:
            version = meta.get("version") if isinstance(meta, dict) else None
            return f"it was written by another version ({shown(version)!r}, this is {STORE_VERSION})"
        if meta != self.meta:
            return "its settings differ from these"
        for name, size in self.sizes().items():
            st = _regular(self._path(name))
            if st is None:
                return f"{name} is not a regular file (missing, or a link)"
            if st.st_size != size:
                return f"{name} does not have the {size:,} bytes its shape needs"
        done = self._path("done")
        if os.path.islink(done) or not os.path.isdir(done):
            return "done/ is not a folder"
        return None

    def open(self, runtime: Runtime) -> "FeatureStore":
        """Use the folder as it is when it is this store; else (rank 0) rebuild it, saying why once."""
        if runtime.is_main:
            exists = os.path.lexists(self.folder)
            problem = self.problem() if exists else None
            if problem is not None or not exists:
                if problem is not None:
                    logger.warning(f"rebuilding the feature store {self.folder}: {problem}")
                self._create()
        runtime.barrier()
        return self

    def _create(self) -> None:
        if os.path.islink(self.folder) or os.path.isfile(self.folder):
            os.unlink(self.folder)  # the link itself, never what it points to
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(os.path.join(self.folder, "done"), exist_ok=True)
        for name, size in self.sizes().items():
            with open(self._path(name), "xb") as f:  # a fresh folder: a new file, never an existing one
                f.truncate(size)  # sparse until written
        with atomic_path(self._path("meta.json")) as tmp, open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1)

    def markers(self) -> dict[int, str]:
        """chunk -> the checksum its marker records, for every well-formed marker of a chunk of this store
        (anything else in done/ is not a marker: ignored)."""
        out = {}
        try:
            entries = list(os.scandir(self._path("done")))
        except OSError:
            return out
        for entry in entries:
            if not MARKER.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            c = int(entry.name)
            if c >= self.chunks:
                continue
            try:
                if entry.stat(follow_symlinks=False).st_size > MARKER_BYTES:
                    continue
                with open(entry.path, "rb") as f:
                    text = f.read(MARKER_BYTES).decode("ascii")
            except (OSError, UnicodeError):
                continue
            if re.fullmatch(r"[0-9a-f]{32}", text):
                out[c] = text
        return out

    def done(self) -> set[int]:
        return set(self.markers())

    def complete(self) -> bool:
        return len(self.done()) == self.chunks

    def _arrays(self, mode: str):
        shape = (self.n, self.entries, self.dim)
        return (np.memmap(self._path("features.bin"), dtype=self.dtype, mode=mode, shape=shape),
                np.memmap(self._path("labels.bin"), dtype=np.int64, mode=mode, shape=(self.n,)))

    def features(self) -> np.ndarray:
        """[N, entries, D], memory-mapped (read on demand)."""
        return self._arrays("r")[0]

    def labels(self) -> np.ndarray:
        return np.array(self._arrays("r")[1])  # (small: a copy, writable)

    def _checksum(self, c: int, features, labels) -> str:
        rows = self.rows(c)
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(features[rows.start:rows.stop]).tobytes())
        h.update(np.ascontiguousarray(labels[rows.start:rows.stop]).tobytes())
        return h.hexdigest()

    def verify(self, runtime: Runtime) -> int:
        """Check every marked chunk against its checksum and its labels against the classes (rank 0); a chunk
        that fails is unmarked, to be computed again, with one line naming it. Returns how many failed."""
        bad = []
        if runtime.is_main:
            marked = self.markers()
            if marked:
                features, labels = self._arrays("r")
                for c, recorded in sorted(marked.items()):
                    rows = self.rows(c)
                    part = labels[rows.start:rows.stop]
                    top = self.num_classes if self.num_classes is not None else np.iinfo(np.int64).max
                    if self._checksum(c, features, labels) != recorded:
                        bad.append((c, "its bytes do not match its checksum"))
                    elif len(part) and (part.min() < -1 or part.max() >= top):
                        bad.append((c, f"labels outside -1..{top - 1}"))
                del features, labels
            for c, why in bad:
                os.remove(self._path(os.path.join("done", str(c))))
            if bad:
                listed = ", ".join(f"{c} ({why})" for c, why in bad[:5]) + (", ..." if len(bad) > 5 else "")
                logger.warning(f"feature store {self.folder}: {len(bad)} chunk(s) computed again: {listed}")
        runtime.barrier()
        return len(bad)

    def fill(self, encoder, index, data_cfg, spec: FeatureSpec, runtime: Runtime, batch_size: int, workers: int,
             desc: str) -> dict:
        """Compute the chunks not done yet that fall to this rank (chunk c to rank c % ranks), each in
        batches that never cross a chunk's edge (a resumed extraction computes the same batches); returns
        its timing. Every rank returns once the whole store is complete."""
        done = self.done()  # listed once, not once per chunk
        todo = [c for c in range(self.chunks) if c % runtime.world == runtime.rank and c not in done]
        start = time.perf_counter()
        computed = 0
        if todo:
            features, labels = self._arrays("r+")
            for c in todo:  # an image that turns out unreadable keeps the label -1: the probes leave it out
                labels[self.rows(c).start:self.rows(c).stop] = -1
            plan = [(c, rows) for c in todo for rows in _batches(self.rows(c), batch_size)]
            left = collections.Counter(c for c, _ in plan)  # batches per chunk, counted in one pass
            encoder = encoder.to(runtime.device).eval()
            it = iter(plan)
            with torch.no_grad(), runtime.autocast():
                for images, target, ids in eval_batches(index, data_cfg, runtime, [rows for _, rows in plan],
                                                        workers, desc=desc):
                    c, rows = next(it)
                    while not set(ids.tolist()) <= set(rows):  # batches with no readable image were left out
                        c, rows = self._close(c, left, features, labels, it)
                    out = compute_entries(encoder, images, spec).float().cpu().numpy()
                    where = ids.cpu().numpy()
                    features[where] = out.astype(self.dtype)
                    labels[where] = target.cpu().numpy()
                    computed += len(where)
                    left[c] -= 1
                    if left[c] == 0:
                        self._mark(c, features, labels)
                for c in [c for c, n in left.items() if n > 0]:  # chunks whose last batches had nothing readable
                    self._mark(c, features, labels)
            del features, labels
        runtime.barrier()
        if not self.complete():
            missing = sorted(set(range(self.chunks)) - self.done())
            raise RuntimeError(f"the feature store {self.folder} is missing chunks {missing[:5]} after extraction")
        return {"extract_s": round(time.perf_counter() - start, 3), "extracted": computed}

    def _close(self, c, left, features, labels, it):
        left[c] -= 1
        if left[c] == 0:
            self._mark(c, features, labels)
        return next(it)

    def _mark(self, c: int, features, labels) -> None:
        """The chunk is on disk: its marker, written after its rows, records their checksum."""
        features.flush()
        labels.flush()
        with atomic_path(self._path(os.path.join("done", str(c)))) as tmp, open(tmp, "w") as f:
            f.write(self._checksum(c, features, labels))


def _batches(rows: range, batch_size: int) -> list[list[int]]:
    return [list(rows[k:k + batch_size]) for k in range(0, len(rows), batch_size)]


def store_key(checkpoint: str, choice: dict, arch, spec: FeatureSpec, data_cfg, index, precision: str) -> dict:
    """Everything that changes a split's features (the store's key)."""
    return {"checkpoint": file_identity(checkpoint), "encoder": choice, "depth": arch.depth,
            "entries": [list(e) for e in spec.entries], "image_size": data_cfg.image_size,
            "crop_ratio": data_cfg.crop_ratio, "interpolation": data_cfg.interpolation,
            "mean": list(data_cfg.mean), "std": list(data_cfg.std), "index": index_identity(index),
            "precision": precision}


def split_features(encoder, checkpoint: str, choice: dict, index, data_cfg, spec: FeatureSpec, runtime: Runtime,
                   cache_dir: str, batch_size: int = 64, workers: int | None = None, dtype: str = "float16",
                   desc: str = "features", chunk: int = 256, num_classes: int | None = None) -> tuple[FeatureStore, dict]:
    """A split's features in its store (computed where they are not there yet, each chunk it holds checked
    first); (store, cost). ``num_classes``: the label ids a chunk may hold."""
    workers = runtime.default_workers() if workers is None else workers
    key = store_key(checkpoint, choice, encoder.cfg, spec, data_cfg, index, runtime.precision)
    store = FeatureStore(cache_dir, key, len(index), len(spec.entries), encoder.cfg.embed_dim, dtype,
                         chunk, num_classes).open(runtime)
    store.verify(runtime)
    if store.complete():
        if runtime.is_main:
            logger.warning(f"{desc}: reusing the features in {store.folder}")
        return store, {"extract_s": 0.0, "extracted": 0, "store": store.folder}
    if runtime.is_main:
        logger.warning(f"{desc}: {len(index):,} images -> features in {store.folder} ({len(store.done())} of "
                       f"{store.chunks} chunks there already)")
    cost = store.fill(encoder, index, data_cfg, spec, runtime, batch_size, workers, desc)
    return store, {**cost, "store": store.folder}
