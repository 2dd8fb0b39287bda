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
CACHE_VERSION = 3


class DataError(ValueError):
    """A data problem the user must fix; the message names the path."""


@dataclass
class FolderIndex:
    """A split of an image-folder tree, as every sample source is read (data/containers.py has the
    others): ``len``, ``labels``, ``classes``, ``read(i)`` (the sample's encoded bytes) and
    ``describe(i)`` (where it is, for messages)."""

    split_dir: str
    classes: list[str]  # label id -> class folder name (the train split's mapping)
    files: Sequence[str]  # paths relative to split_dir
    labels: np.ndarray  # int64 label id per file
    ignored: list[str]  # files without an image extension, relative to split_dir

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        return os.path.join(self.split_dir, self.files[i])

    def read(self, i: int) -> bytes:
        with open(self.describe(i), "rb") as f:
            return f.read()


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "d2v_plugin", "index")


def _class_dirs(split_dir: str) -> list[os.DirEntry]:
    if not os.path.isdir(split_dir):
        raise DataError(f"split folder not found: {split_dir} (expected <task.data>/<split>/<class>/<image>)")
    dirs = sorted((e for e in os.scandir(split_dir) if e.is_dir()), key=lambda e: e.name)
    if not dirs:
        raise DataError(f"no class folders in {split_dir} (expected <task.data>/<split>/<class>/<image>)")
    return dirs


def _cache_file(cache_dir: str, split_dir: str) -> str:
    name = hashlib.sha1(f"{CACHE_VERSION}\0{os.path.realpath(split_dir)}".encode()).hexdigest()
    return os.path.join(cache_dir, f"{name}.npz")


def _mtimes(split_dir: str, rel_dirs) -> np.ndarray | None:
    """Modification times of the given folders of the tree; None if one is gone."""
    try:
        return np.array([os.stat(os.path.join(split_dir, d)).st_mtime_ns for d in rel_dirs], dtype=np.int64)
    except OSError:
        return None


def _is_fresh(split_dir: str, scan: dict) -> bool:
    """The cache holds every folder the scan walked (the split, the class folders and any folder below
    them) with its modification time: a file or folder added, removed or renamed anywhere in the tree
    changes the time of the folder that holds it."""
    now = _mtimes(split_dir, scan["dirs"])
    return now is not None and np.array_equal(now, scan["mtimes"])


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


def _walk(split_dir: str, rel: str, files: list, ignored: list, walked: list, mtimes: list) -> None:
    """os.walk's order (a folder's files sorted, then its subfolders sorted; symlinked folders not
    entered), each folder's time taken *before* it is listed, so a change made during the scan is
    newer than the time cached and the next start rescans."""
    path = os.path.join(split_dir, rel)
    mtimes.append(os.stat(path).st_mtime_ns)
    walked.append(rel)
    subdirs = []
    for e in sorted(os.scandir(path), key=lambda e: e.name):
        if e.is_dir():
            if not e.is_symlink():
                subdirs.append(e.name)
        else:
            (files if e.name.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(os.path.join(rel, e.name))
    for name in subdirs:
        _walk(split_dir, os.path.join(rel, name), files, ignored, walked, mtimes)


def _scan(split_dir: str) -> dict:
    split_time = os.stat(split_dir).st_mtime_ns if os.path.isdir(split_dir) else None
    dirs = _class_dirs(split_dir)  # stops on a missing split
    walked, mtimes = ["."], [split_time]
    files, counts, ignored = [], [], []
    for d in dirs:
        before = len(files)
        _walk(split_dir, d.name, files, ignored, walked, mtimes)
        counts.append(len(files) - before)
    paths = PathList.from_strings(files)
    return {"blob": paths.blob, "offsets": paths.offsets, "classes": np.array([d.name for d in dirs]),
            "counts": np.array(counts, dtype=np.int64), "ignored": np.array(ignored, dtype=str),
            "dirs": np.array(walked, dtype=str), "mtimes": np.array(mtimes, dtype=np.int64)}


def _read_cache(cache_file: str):
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            return {k: z[k] for k in ("blob", "offsets", "classes", "counts", "ignored", "dirs", "mtimes")}
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
    cache_file = _cache_file(cache_dir or default_cache_dir(), split_dir)
    scan = _read_cache(cache_file) if os.path.isfile(cache_file) else None
    if scan is None or not _is_fresh(split_dir, scan):
        scan = _scan(split_dir)
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
    empty = [c for c, n in zip(found, scan["counts"]) if n == 0]
    if empty:  # as torchvision's ImageFolder: a class without images would be trained on silently
        shown = ", ".join(empty[:10]) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
        raise DataError(f"{split_dir}: empty class folder(s) without image files: {shown}; add images or "
                        f"remove the folder(s) (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    index = FolderIndex(split_dir, list(classes), files, labels, [str(x) for x in scan["ignored"]])
    if index.ignored:
        logger.warning(
            f"{split_dir}: ignored {len(index.ignored)} files without an image extension, e.g. {index.ignored[:3]}"
        )
    return index
