"""Index of ``<root>/<split>/<class>/<image>`` with a cache, so a 1.28M-image tree is scanned once.

The file system is not trusted either: only regular files within the size bound are indexed (a FIFO
named ``x.jpg`` would hang a reader, a link to ``/dev/zero`` would never end), symlinked folders are not
entered (no loops), names that are not UTF-8 are kept as the file system gives them (surrogate escapes),
and every entry left out is named once with the reason."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from d2v_plugin.atomic import atomic_path
from d2v_plugin.data.decode import UnreadableImage
from d2v_plugin.limits import LIMITS, env_name

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 5  # 4: file names as the file system's bytes; entries left out recorded with their reason;
# 5: a split folder of images without class folders indexed as one class
# labels of records a container could not give a class for (data/containers.py); the dataset reports them
NO_LABEL, BAD_LABEL = -1, -2
LABEL_PROBLEMS = {NO_LABEL: "the record has no label",
                  BAD_LABEL: "its label is not a class index (a non-negative integer below the bound "
                             f"{env_name('max_classes')})"}


class DataError(ValueError):
    """A data problem the user must fix; the message names the path."""


def shown_path(path: str) -> str:
    """A path for messages: names that are not UTF-8 (surrogate escapes) and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")  # a byte that is not UTF-8 shown as \xe9
    return text if text.isprintable() else repr(text)[1:-1]


def read_regular_file(path: str) -> bytes:
    """A file's bytes, if it is a regular file within the size bound (checked on the open file, so a
    file replaced by a FIFO or a device since it was indexed is refused, not waited on or read forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UnreadableImage(f"cannot open it: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableImage("not a regular file")
        if st.st_size > LIMITS.max_file_bytes:
            raise UnreadableImage(f"{st.st_size:,} bytes, over the bound of {LIMITS.max_file_bytes:,} "
                                  f"({env_name('max_file_bytes')})")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as err:
        raise UnreadableImage(f"cannot read it: {err.strerror}") from None
    finally:
        os.close(fd)


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
    left_out: list = field(default_factory=list)  # (path relative to split_dir, reason): not indexed

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        return shown_path(os.path.join(self.split_dir, self.files[i]))

    def read(self, i: int) -> bytes:
        return read_regular_file(os.path.join(self.split_dir, self.files[i]))


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "d2v_plugin", "index")


def _is_dir(entry: os.DirEntry, left_out: list, rel: str) -> bool:
    """Whether an entry is a folder to enter: a real folder, or a link to one (class folders may be
    links); a link loop or a link to nowhere is left out with the reason."""
    try:
        return entry.is_dir()
    except OSError as err:
        reason = "a symbolic link loop" if err.errno == errno.ELOOP else f"cannot be read: {err.strerror}"
        left_out.append((os.path.join(rel, entry.name), reason))
        return False


class _Flat:
    """A split folder of images without class folders (unlabelled images, for the label-free measures): one
    class, the folder itself."""

    name = UNLABELLED = "."


def _class_dirs(split_dir: str, left_out: list) -> list:
    if not os.path.isdir(split_dir):
        raise DataError(f"split folder not found: {split_dir} (expected <task.data>/<split>/<class>/<image>)")
    dirs = sorted((e for e in os.scandir(split_dir) if _is_dir(e, left_out, ".")), key=lambda e: os.fsencode(e.name))
    if not dirs:
        if any(_entry_kind(e)[0] == "image" for e in os.scandir(split_dir)):
            return [_Flat()]  # images without class folders: one class (probe --probes rankme,alphareq needs none)
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
    now = _mtimes(split_dir, _names(scan, "dirs"))
    return now is not None and np.array_equal(now, scan["mtimes"])


class PathList(Sequence):
    """Relative paths stored as one UTF-8 blob plus offsets: 1.28M paths load from the cache in
    milliseconds and cost no per-string Python objects until an item is read."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, paths: list[str]) -> "PathList":
        encoded = [os.fsencode(p) for p in paths]  # names that are not UTF-8 kept as the file system's bytes
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
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())


def _file_problem(entry: os.DirEntry) -> str | None:
    """Why an image file is not indexed, or None: it must be a regular file (a link to one is fine)
    within the size bound."""
    try:
        st = entry.stat()
    except OSError as err:
        return "a symbolic link loop" if err.errno == errno.ELOOP else f"cannot be read: {err.strerror}"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        return f"{kind}, not a regular file"
    if st.st_size > LIMITS.max_file_bytes:
        return f"{st.st_size:,} bytes, over the bound of {LIMITS.max_file_bytes:,} ({env_name('max_file_bytes')})"
    return None


def _entry_kind(entry: os.DirEntry) -> tuple[str, str | None]:
    """("folder" | "image" | "other" | "left out", reason) of an entry below a class folder: folders are
    entered, symbolic links to folders are not (they could loop); an image file must be a regular
    file (or a link to one) within the size bound."""
    if entry.is_dir(follow_symlinks=False):
        return "folder", None
    if entry.is_symlink():
        try:
            if entry.is_dir():
                return "left out", "a symbolic link to a folder, not entered (links below the class folders could loop)"
        except OSError as err:
            return "left out", "a symbolic link loop" if err.errno == errno.ELOOP else f"cannot be read: {err.strerror}"
    if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
        return "other", None
    problem = _file_problem(entry)
    return ("image", None) if problem is None else ("left out", problem)


def _walk(split_dir: str, rel: str, found: dict) -> None:
    """os.walk's order (a folder's files sorted, then its subfolders sorted; symlinked folders below the
    class folders not entered), each folder's time taken *before* it is listed, so a change made during
    the scan is newer than the time cached and the next start rescans."""
    path = os.path.join(split_dir, rel)
    found["mtimes"].append(os.stat(path).st_mtime_ns)
    found["walked"].append(rel)
    subdirs = []
    for e in sorted(os.scandir(path), key=lambda e: os.fsencode(e.name)):
        kind, reason = _entry_kind(e)
        where = os.path.join(rel, e.name)
        if kind == "folder":
            subdirs.append(e.name)
        elif kind == "image":
            found["files"].append(where)
        elif kind == "other":
            found["ignored"].append(where)
        else:
            found["left_out"].append((where, reason))
    for name in subdirs:
        _walk(split_dir, os.path.join(rel, name), found)


def _strings(values) -> dict:
    """A list of names as a PathList's arrays (file-system bytes, so any name survives the cache)."""
    paths = PathList.from_strings(list(values))
    return {"blob": paths.blob, "offsets": paths.offsets}


def _scan(split_dir: str) -> dict:
    split_time = os.stat(split_dir).st_mtime_ns if os.path.isdir(split_dir) else None
    found = {"files": [], "ignored": [], "left_out": [], "walked": ["."], "mtimes": [split_time]}
    dirs = _class_dirs(split_dir, found["left_out"])  # stops on a missing split
    counts = []
    for d in dirs:
        before = len(found["files"])
        _walk(split_dir, d.name, found)
        counts.append(len(found["files"]) - before)
    out = {"counts": np.array(counts, dtype=np.int64), "mtimes": np.array(found["mtimes"], dtype=np.int64)}
    for key, values in (("", found["files"]), ("classes_", [d.name for d in dirs]), ("ignored_", found["ignored"]),
                        ("dirs_", found["walked"]), ("left_", [p for p, _ in found["left_out"]]),
                        ("why_", [r for _, r in found["left_out"]])):
        out.update({f"{key}{k}": v for k, v in _strings(values).items()})
    return out


CACHE_KEYS = ("blob", "offsets", "counts", "mtimes", *(f"{k}_{a}" for k in ("classes", "ignored", "dirs", "left", "why")
                                                       for a in ("blob", "offsets")))


def _names(scan: dict, key: str) -> list[str]:
    return list(PathList(scan[f"{key}_blob"], scan[f"{key}_offsets"]))


def _read_cache(cache_file: str):
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            return {k: z[k] for k in CACHE_KEYS}
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

    found = _names(scan, "classes")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{split_dir}: class folders not in the train split: "
                            f"{', '.join(shown_path(c) for c in unknown)}")
    label_of = {c: i for i, c in enumerate(classes)}
    labels = np.repeat(np.array([label_of[c] for c in found], dtype=np.int64), scan["counts"])
    files = PathList(scan["blob"], scan["offsets"])
    if not len(files):
        raise DataError(f"{split_dir}: no image files found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    empty = [c for c, n in zip(found, scan["counts"]) if n == 0]
    if empty:  # as torchvision's ImageFolder: a class without images would be trained on silently
        shown = ", ".join(shown_path(c) for c in empty[:10]) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
        raise DataError(f"{split_dir}: empty class folder(s) without image files: {shown}; add images or "
                        f"remove the folder(s) (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    left_out = list(zip(_names(scan, "left"), _names(scan, "why")))
    index = FolderIndex(split_dir, list(classes), files, labels, _names(scan, "ignored"), left_out)
    if index.ignored:
        logger.warning(f"{split_dir}: ignored {len(index.ignored)} files without an image extension, e.g. "
                       f"{', '.join(shown_path(p) for p in index.ignored[:3])}")
    for path, reason in left_out:  # each named once, with the reason
        logger.warning(f"{split_dir}: left out {shown_path(path)}: {reason}")
    return index


class Subset:
    """Some images of a split (its ``rows``, in index order): what a command measures on part of a split
    (cli.similarity --images N). It reads, describes and labels them as the split does."""

    def __init__(self, index, rows):
        self.parent, self.rows = index, np.asarray(rows, dtype=np.int64)
        self.split_dir, self.classes = index.split_dir, index.classes
        self.labels = np.asarray(index.labels)[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, i: int) -> str:
        return self.parent.describe(int(self.rows[i]))

    def read(self, i: int) -> bytes:
        return self.parent.read(int(self.rows[i]))
