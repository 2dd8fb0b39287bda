"""Index of ``<root>/<split>/<class>/<image>`` with a cache, so a 1.28M-image tree is scanned once."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from d2v_plugin.atomic import atomic_path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 2


class DataError(ValueError):
    """A data problem the user must fix; the message names the path."""


@dataclass
class FolderIndex:
    split_dir: str
    classes: list[str]  # label id -> class folder name (the train split's mapping)
    files: Sequence[str]  # paths relative to split_dir
    labels: np.ndarray  # int64 label id per file
    ignored: list[str]  # files without an image extension, relative to split_dir

    def __len__(self) -> int:
        return len(self.files)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "d2v_plugin", "index")


def _class_dirs(split_dir: str) -> list[os.DirEntry]:
    if not os.path.isdir(split_dir):
        raise DataError(f"split folder not found: {split_dir} (expected <task.data>/<split>/<class>/<image>)")
    dirs = sorted((e for e in os.scandir(split_dir) if e.is_dir()), key=lambda e: e.name)
    if not dirs:
        raise DataError(f"no class folders in {split_dir} (expected <task.data>/<split>/<class>/<image>)")
    return dirs


def _cache_key(split_dir: str, dirs: list[os.DirEntry]) -> str:
    # A file added or removed changes its class folder's mtime; a folder added changes the split's.
    h = hashlib.sha1(f"{CACHE_VERSION}\0{os.path.realpath(split_dir)}\0{os.stat(split_dir).st_mtime_ns}".encode())
    for e in dirs:
        h.update(f"\0{e.name}\0{e.stat().st_mtime_ns}".encode())
    return h.hexdigest()


class PathList(Sequence):
    """Relative paths stored as one UTF-8 blob plus offsets: 1.28M paths load from the cache in
    milliseconds and cost no per-string Python objects until an item is read."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, paths: list[str]) -> "PathList":
        encoded = [p.encode("utf-8") for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


def _scan(split_dir: str, dirs: list[os.DirEntry]) -> dict:
    files, counts, ignored = [], [], []
    for d in dirs:
        before = len(files)
        for root, subdirs, names in os.walk(d.path):
            subdirs.sort()
            rel_root = os.path.relpath(root, split_dir)
            for f in sorted(names):
                (files if f.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(os.path.join(rel_root, f))
        counts.append(len(files) - before)
    paths = PathList.from_strings(files)
    return {"blob": paths.blob, "offsets": paths.offsets, "classes": np.array([d.name for d in dirs]),
            "counts": np.array(counts, dtype=np.int64), "ignored": np.array(ignored, dtype=str)}


def _read_cache(cache_file: str):
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            return {k: z[k] for k in ("blob", "offsets", "classes", "counts", "ignored")}
    except (OSError, ValueError, KeyError) as err:
        logger.warning(f"ignoring unreadable index cache {cache_file}: {err}")
        return None


def _write_cache(cache_file: str, scan: dict) -> None:
    try:
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, **scan)
    except OSError as err:
        logger.warning(f"could not write the index cache {cache_file}: {err}")


def index_split(root: str, split: str, classes: list[str] | None = None, cache_dir: str | None = None) -> FolderIndex:
    """Index one split. ``classes`` is the train split's mapping; None means this is the train split."""
    split_dir = os.path.join(root, split)
    dirs = _class_dirs(split_dir)
    cache_file = os.path.join(cache_dir or default_cache_dir(), f"{_cache_key(split_dir, dirs)}.npz")
    scan = _read_cache(cache_file) if os.path.isfile(cache_file) else None
    if scan is None:
        scan = _scan(split_dir, dirs)
        _write_cache(cache_file, scan)

    found = [str(c) for c in scan["classes"]]
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{split_dir}: class folders not in the train split: {', '.join(unknown)}")
    label_of = {c: i for i, c in enumerate(classes)}
    labels = np.repeat(np.array([label_of[c] for c in found], dtype=np.int64), scan["counts"])
    files = PathList(scan["blob"], scan["offsets"])
    if not len(files):
        raise DataError(f"{split_dir}: no image files found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    index = FolderIndex(split_dir, list(classes), files, labels, [str(x) for x in scan["ignored"]])
    if index.ignored:
        logger.warning(
            f"{split_dir}: ignored {len(index.ignored)} files without an image extension, e.g. {index.ignored[:3]}"
        )
    return index
