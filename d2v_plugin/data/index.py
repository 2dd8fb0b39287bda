"""Index of ``<root>/<split>/<class>/<image>`` with a cache, so a 1.28M-image tree is scanned once."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 1


class DataError(ValueError):
    """A data problem the user must fix; the message names the path."""


@dataclass
class FolderIndex:
    split_dir: str
    classes: list[str]  # label id -> class folder name (the train split's mapping)
    files: list[str]  # paths relative to split_dir
    labels: list[int]
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


def _scan(split_dir: str, dirs: list[os.DirEntry]) -> dict:
    per_class, ignored = {}, []
    for d in dirs:
        names = []
        for root, subdirs, files in os.walk(d.path):
            subdirs.sort()
            rel_root = os.path.relpath(root, split_dir)
            for f in sorted(files):
                (names if f.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(os.path.join(rel_root, f))
        per_class[d.name] = names
    return {"per_class": per_class, "ignored": ignored}


def index_split(root: str, split: str, classes: list[str] | None = None, cache_dir: str | None = None) -> FolderIndex:
    """Index one split. ``classes`` is the train split's mapping; None means this is the train split."""
    split_dir = os.path.join(root, split)
    dirs = _class_dirs(split_dir)
    cache_dir = cache_dir or default_cache_dir()
    key = _cache_key(split_dir, dirs)
    cache_file = os.path.join(cache_dir, f"{key}.json.gz")
    scan = None
    if os.path.isfile(cache_file):
        try:
            with gzip.open(cache_file, "rt") as f:
                scan = json.load(f)
        except (OSError, ValueError) as err:
            logger.warning(f"ignoring unreadable index cache {cache_file}: {err}")
    if scan is None:
        scan = _scan(split_dir, dirs)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_file}.{os.getpid()}.tmp"
            with gzip.open(tmp, "wt", compresslevel=1) as f:
                json.dump(scan, f)
            os.replace(tmp, cache_file)  # never leaves a half-written cache behind
        except OSError as err:
            logger.warning(f"could not write the index cache to {cache_dir}: {err}")

    per_class = scan["per_class"]
    if classes is None:
        classes = sorted(per_class)
    else:
        unknown = sorted(set(per_class) - set(classes))
        if unknown:
            raise DataError(f"{split_dir}: class folders not in the train split: {', '.join(unknown)}")
    label_of = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for name in sorted(per_class):
        files.extend(per_class[name])
        labels.extend([label_of[name]] * len(per_class[name]))
    if not files:
        raise DataError(f"{split_dir}: no image files found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    index = FolderIndex(split_dir, list(classes), files, labels, scan["ignored"])
    if index.ignored:
        logger.warning(
            f"{split_dir}: ignored {len(index.ignored)} files without an image extension, e.g. {index.ignored[:3]}"
        )
    return index
