"""Splits stored in containers rather than as one file per image: Parquet files (the Hugging Face layout:
``train-*.parquet`` with columns ``image`` = {bytes, path} and ``label``) and WebDataset tar shards
(``train-000000.tar`` holding ``<key>.jpg`` + ``<key>.cls``), read by random access like an image folder
(``FolderIndex``): ``len``, ``labels``, ``classes``, ``read(i)`` -> the image's encoded bytes,
``describe(i)`` -> where it is. fairseq's batching, sharding over GPUs, resume and the per-image seeding
then work unchanged, and image i gets the same pixels whatever holds it.

- Parquet: row groups are read on demand from memory-mapped files (the last one read is kept per file);
  a random read costs a whole row group, so ``cli.pack`` writes small ones (Hugging Face's files have
  large ones: repack them for training speed, docs/data.md).
- Tar shards: an index of every member's offset and size, built once and cached like the folder index
  (keyed on the shards' sizes and modification times); a read is one ``pread``.
- Files are opened lazily in each process (after the data-loading workers fork).
- A record without a label, with a label that is not a class index, or whose bytes do not decode, is a
  bad record (skipped and counted, or an error naming the file and the row or key); a file that does not
  open, or a Parquet column of another type, is an error at start-up naming the file.
- A tar shard is read to its end: a corrupt header or a shard cut short stops the run naming the shard
  and the offset where reading stopped (``on_bad_image=error``), or is skipped with a line naming it and
  the samples lost (``skip``, what can be read after a corrupt header is kept); duplicate keys are
  reported (the first member is used).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile

import numpy as np

from d2v_plugin.atomic import atomic_path
from d2v_plugin.data.decode import UnreadableImage
from d2v_plugin.data.index import (BAD_LABEL, IMAGE_EXTENSIONS, NO_LABEL, DataError, PathList, default_cache_dir,
                                   index_split, shown_path)
from d2v_plugin.limits import LIMITS, env_name

logger = logging.getLogger(__name__)

FORMATS = ("auto", "folder", "parquet", "wds")
# the names a validation split goes by: fairseq's default dataset.valid_subset is "valid", Hugging Face's
# "validation", ImageNet folders' "val"
SPLIT_ALIASES = {name: (name, *(n for n in ("val", "validation", "valid") if n != name))
                 for name in ("val", "validation", "valid")}
CACHE_VERSION = 4  # 2: keys split at the first dot of the member's file name; 3: labels checked, damage kept;
# 4: a damaged Parquet file's rows left out and reported, as a damaged tar shard's
ON_BAD_IMAGE = ("skip", "error")
TASK_SETTINGS = {"data": "task.data", "data_format": "task.data_format"}  # how messages name the settings
COMMAND_FLAGS = {"data": "--data", "data_format": "--data-format"}  # ... when a command was given them


def split_names(split: str) -> tuple:
    return SPLIT_ALIASES.get(split, (split,))


def expand_braces(pattern: str) -> list[str]:
    """webdataset's brace patterns: ``{000000..000146}`` (zero-padded ranges) and ``{a,b}``."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..")
        options = [str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [x for opt in options for x in expand_braces(pattern[:m.start()] + opt + pattern[m.end():])]


def _find(root: str, split: str, suffix: str) -> list[str]:
    """The split's files: ``<root>[/data]/<split>-*<suffix>`` (also ``_`` and a single ``<split><suffix>``)
    or ``<root>/<split>/*<suffix>``, under any of the split's names (val / validation)."""
    if "{" in root:  # a brace pattern of shards; {split} stands for the split's name
        if not root.endswith(suffix):
            return []
        for name in split_names(split):
            files = expand_braces(root.replace("{split}", name))
            if files and any(os.path.exists(f) for f in files):
                return files
        return []
    for name in split_names(split):
        for folder in (root, os.path.join(root, "data")):
            files = sorted({*glob.glob(os.path.join(folder, f"{name}-*{suffix}")),
                            *glob.glob(os.path.join(folder, f"{name}_*{suffix}")),
                            *glob.glob(os.path.join(folder, f"{name}{suffix}"))})
            if files:
                return files
        files = sorted(glob.glob(os.path.join(root, name, f"*{suffix}")))
        if files:
            return files
    return []


def detect_format(root: str, split: str, names: dict = TASK_SETTINGS) -> str:
    """What ``task.data`` holds for this split: an image-folder tree, Parquet files or tar shards."""
    if "{" not in root and any(os.path.isdir(os.path.join(root, n)) and not _find(root, split, ".parquet")
                               and not _find(root, split, ".tar") for n in split_names(split)):
        return "folder"
    if _find(root, split, ".parquet"):
        return "parquet"
    if _find(root, split, ".tar"):
        return "wds"
    raise DataError(f"split folder not found: {os.path.join(root, split)} (expected <{names['data']}>/{split}/<class>/"
                    f"<image>, or Parquet files {split}-*.parquet or tar shards {split}-*.tar in {names['data']})")


def open_split(root: str, split: str, classes: list[str] | None = None, cache_dir: str | None = None,
               data_format: str = "auto", on_bad_image: str = "skip", names: dict = TASK_SETTINGS):
    """The split as a sample source, whatever holds it. ``classes``: the train split's, None for train.
    ``on_bad_image``: what a damaged container does (error: stop naming it; skip: report what is lost).
    ``names``: how messages name the data settings (the task's, or a command's flags)."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise DataError(f"task.on_bad_image={on_bad_image!r}: use skip or error")
    if data_format not in FORMATS:
        raise DataError(f"{names['data_format']}={data_format!r}: use one of {', '.join(FORMATS)}")
    fmt = detect_format(root, split, names) if data_format == "auto" else data_format
    if fmt == "folder":
        name = next((n for n in split_names(split) if os.path.isdir(os.path.join(root, n))), split)
        return index_split(root, name, classes=classes, cache_dir=cache_dir)
    files = _find(root, split, ".parquet" if fmt == "parquet" else ".tar")
    if not files:
        raise DataError(f"{names['data']}={root}: no {'Parquet files' if fmt == 'parquet' else 'tar shards'} for "
                        f"split '{split}' ({names['data_format']}={data_format})")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{missing[0]}: shard not found ({len(missing)} of the {len(files)} the pattern names)")
    source = (ParquetSplit if fmt == "parquet" else ShardSplit)(files, split, cache_dir or default_cache_dir())
    source.report_damage(on_bad_image)
    source.set_classes(classes)
    return source


def member_key(name: str) -> tuple[str, str]:
    """A tar member's sample key and extension, split at the first dot of the file's own name, as
    WebDataset does (``train/n01440764.v2/img.cls.jpg`` -> ``train/n01440764.v2/img``, ``cls.jpg``): dots
    in folder names and the leading ``./`` of ``tar cf shard.tar ./...`` stay in the key."""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext


def _cache_file(cache_dir: str, kind: str, files: list[str]) -> str:
    h = hashlib.sha1(f"{kind}\0{CACHE_VERSION}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"\0{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return os.path.join(cache_dir, f"{kind}-{h.hexdigest()}.npz")


def _cached(cache_dir: str, kind: str, files: list[str], build) -> dict:
    """The index of ``files`` (the result of ``build()``), cached; any change to a file's size or
    modification time makes another key."""
    path = _cache_file(cache_dir, kind, files)
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            logger.warning(f"ignoring unreadable index cache {path}: {err}")
    index = build()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **index)
    except OSError as err:
        logger.warning(f"could not write the index cache {path}: {err}")
    return index


def _classes_txt(files: list[str]) -> list[str] | None:
    path = os.path.join(os.path.dirname(os.path.abspath(files[0])), "classes.txt")
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) > 64 * LIMITS.max_classes:
        raise DataError(f"{path}: larger than {LIMITS.max_classes:,} class names could be")
    with open(path, encoding="utf-8", errors="backslashreplace") as f:
        names = [line.rstrip("\n") for line in f if line.strip()]
    if len(names) > LIMITS.max_classes:
        raise DataError(f"{path}: {len(names):,} class names, over the bound of {LIMITS.max_classes:,} "
                        f"({env_name('max_classes')})")
    return names


def parse_label(text: bytes) -> int:
    """A .cls member's class index (ASCII digits, below the bound), else ``BAD_LABEL``."""
    text = text.strip()
    if not text or len(text) > 9 or not text.isdigit():  # bytes.isdigit: ASCII digits only (not '²')
        return BAD_LABEL
    label = int(text)
    return label if label < LIMITS.max_classes else BAD_LABEL


def labels_of(column, path: str) -> np.ndarray:
    """A Parquet ``label`` column as class indices: integers (floats only where whole), a missing value
    ``NO_LABEL``, a negative, fractional or too large one ``BAD_LABEL``; another type is an error."""
    import pyarrow as pa

    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
        raise DataError(f"{path}: its 'label' column holds {kind}, not class indices (integers)")
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    out = np.full(len(values), BAD_LABEL, dtype=np.int64)
    whole = np.isfinite(values) & (values == np.floor(values)) & (values >= 0) & (values < LIMITS.max_classes)
    out[whole] = values[whole].astype(np.int64)
    out[np.isnan(values)] = NO_LABEL
    return out


class _ContainerSplit:
    """What Parquet files and tar shards share: labels, classes, lazily opened files per process."""

    kind = ""

    def __init__(self, files: list[str], split: str, cache_dir: str):
        self.files, self.split = list(files), split
        self.split_dir = f"{os.path.dirname(os.path.abspath(files[0]))} ({self.kind}: {split})"
        self.ignored = []
        index = _cached(cache_dir, self.kind, self.files, self._build_index)
        self._load_index(index)
        self._opened_in = None  # the process that opened the files: workers open their own

    def report_damage(self, on_bad_image: str) -> None:
        """Damage the index found (a tar shard's corrupt header, a shard cut short, duplicate keys): an
        error naming the file and offset, or one line each naming what was lost."""
        for problem in getattr(self, "damage", []):
            if on_bad_image == "error":
                raise DataError(f"{problem} (task.on_bad_image=skip reads what can be read and reports the rest)")
            logger.warning(f"{problem} (task.on_bad_image=skip)")

    def set_classes(self, train_classes: list[str] | None) -> None:
        known = [str(c) for c in self.stored_classes] if len(self.stored_classes) else _classes_txt(self.files)
        n = int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0
        self.classes = list(train_classes) if train_classes is not None else (known or [str(k) for k in range(n)])
        if n > len(self.classes):
            raise DataError(f"{self.split_dir}: labels go up to {n - 1} but there are {len(self.classes)} classes"
                            + (" (the train split's)" if train_classes is not None else ""))
        if not len(self):
            raise DataError(f"{self.split_dir}: no images found in {len(self.files)} file(s)")

    def __len__(self) -> int:
        return len(self.labels)

    def _handles(self) -> dict:
        if self._opened_in != os.getpid():
            self._opened_in, self._open = os.getpid(), {}
        return self._open

    def __getstate__(self):  # a spawned worker opens its own files
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_opened_in")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._opened_in = None


class ParquetSplit(_ContainerSplit):
    kind = "parquet"

    def _build_index(self) -> dict:
        import pyarrow.parquet as pq

        group_rows, labels, names, damage = [], [], None, []
        for path in self.files:
            try:
                pf = pq.ParquetFile(path)
                columns = pf.schema_arrow.names
                if "image" not in columns or "label" not in columns:
                    raise DataError(f"{path}: a Parquet file without the 'image' and 'label' columns "
                                    f"(it has {', '.join(columns)})")
                _check_image_column(pf.schema_arrow.field("image").type, path)
                label = labels_of(pq.read_table(path, columns=["label"]).column("label"), path)
            except DataError:
                raise
            except Exception as err:  # a damaged file (its footer, its pages): its rows cannot be read
                damage.append(f"{shown_path(path)}: not a readable Parquet file ({type(err).__name__}: "
                              f"{shown_path(str(err).strip().splitlines()[0] if str(err).strip() else '')}); its rows "
                              f"are left out")
                group_rows.append([])
                labels.append(np.zeros(0, np.int64))
                continue
            group_rows.append([pf.metadata.row_group(k).num_rows for k in range(pf.metadata.num_row_groups)])
            labels.append(label)
            names = names or _class_label_names(pf.schema_arrow.metadata)
        counts = np.array([sum(r) for r in group_rows], dtype=np.int64)
        groups = np.array([n for rows in group_rows for n in rows], dtype=np.int64)
        groups_per_file = np.array([len(r) for r in group_rows], dtype=np.int64)
        reports = PathList.from_strings(damage)
        return {"labels": np.concatenate(labels) if labels else np.zeros(0, np.int64), "file_rows": counts,
                "group_rows": groups, "groups_per_file": groups_per_file,
                "classes": np.array(names or [], dtype=str), "damage_blob": reports.blob,
                "damage_offsets": reports.offsets}

    def _load_index(self, index: dict) -> None:
        self.labels, self.stored_classes = index["labels"], index["classes"]
        self.damage = list(PathList(index["damage_blob"], index["damage_offsets"]))
        self.file_start = np.concatenate([[0], np.cumsum(index["file_rows"])])
        group_rows = np.split(index["group_rows"], np.cumsum(index["groups_per_file"])[:-1])
        self.group_start = [np.concatenate([[0], np.cumsum(g)]) for g in group_rows]

    def _where(self, i: int):
        f = int(np.searchsorted(self.file_start, i, side="right") - 1)
        row = i - int(self.file_start[f])
        g = int(np.searchsorted(self.group_start[f], row, side="right") - 1)
        return f, g, row - int(self.group_start[f][g])

    def describe(self, i: int) -> str:
        f, _, _ = self._where(i)
        return f"{self.files[f]} row {i - int(self.file_start[f])}"

    def read(self, i: int) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        f, g, r = self._where(i)
        handles = self._handles()
        try:
            if f not in handles:
                handles[f] = [pq.ParquetFile(self.files[f], memory_map=True), None, None]
            entry = handles[f]
            if entry[1] != g:  # the last row group read stays: sequential reads cost one group per group
                entry[1], entry[2] = g, entry[0].read_row_group(g, columns=["image"]).column("image")
            value = entry[2][r]
        except (OSError, pa.ArrowException) as err:  # damaged since it was indexed: the row is unreadable
            handles.pop(f, None)
            raise UnreadableImage(f"its Parquet file cannot be read ({type(err).__name__}: "
                                  f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
        data = value["bytes"].as_py() if pa.types.is_struct(value.type) else value.as_py()
        if data is None:
            raise UnreadableImage("the record holds no image bytes")
        if len(data) > LIMITS.max_file_bytes:
            raise UnreadableImage(f"{len(data):,} bytes, over the bound of {LIMITS.max_file_bytes:,} "
                                  f"({env_name('max_file_bytes')})")
        return data


def _check_image_column(kind, path: str) -> None:
    """The ``image`` column holds encoded bytes: binary, or Hugging Face's struct of ``bytes`` and ``path``."""
    import pyarrow as pa

    def binary(t):
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    if binary(kind):
        return
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and binary(kind.field("bytes").type):
        return
    raise DataError(f"{path}: its 'image' column holds {kind}, not encoded image bytes (binary, or a struct "
                    f"with a binary 'bytes' field as Hugging Face writes)")


def _class_label_names(metadata) -> list[str] | None:
    """A Hugging Face dataset's ClassLabel names, from the Parquet schema's metadata."""
    if not metadata or b"huggingface" not in metadata:
        return None
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
        return list(features["label"]["names"])
    except (KeyError, TypeError, ValueError):
        return None


def _tail_problem(path: str, end: int, file_size: int) -> str | None:
    """What is wrong with a shard after its last readable member, or None: what follows must be tar's
    end-of-archive marker (zero blocks, at least one) and nothing else."""
    if end >= file_size:
        return (f"the shard ends at byte {file_size:,} without tar's end-of-archive marker: it was cut short, and "
                f"whatever followed is lost")
    with open(path, "rb") as f:
        f.seek(end)
        position = end
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return None
            if chunk.count(0) != len(chunk):
                where = position + next(i for i, b in enumerate(chunk) if b)
                return (f"reading stopped at byte {end:,} of {file_size:,}: the tar header there is corrupt "
                        f"(data follows at byte {where:,})")
            position += len(chunk)


def _read_shard(path: str) -> tuple[dict, list]:
    """key -> {"image": (offset, size), "cls": label} of a tar shard, and the problems met: a shard is
    read to its end (a corrupt header or a cut stops tarfile silently: the rest of the file is checked),
    and what can be read after a corrupt header is recovered."""
    file_size = os.path.getsize(path)
    samples, problems = {}, []

    def add(tar, member) -> bool:
        """Index one member; False when the shard is cut inside it (nothing after it can be read)."""
        if not member.isfile():
            return True
        if member.offset_data + member.size > file_size:
            problems.append(f"member {shown_path(member.name)} at byte {member.offset:,} runs past the shard's end "
                            f"({file_size:,} bytes): it was cut short")
            return False
        key, ext = member_key(member.name)
        entry = samples.setdefault(key, {})
        kind = ext.lower().rpartition(".")[2]  # WebDataset decodes a field by its last suffix
        field = "image" if ("." + kind) in IMAGE_EXTENSIONS else "cls" if kind == "cls" else None
        if field is None:
            return True
        if field in entry:
            problems.append(f"duplicate key {shown_path(key)}: a second {'image' if field == 'image' else 'label'} "
                            f"{shown_path(member.name)} at byte {member.offset:,} (the first one is used)")
        elif field == "image":
            entry["image"] = (member.offset_data, member.size)
        else:
            small = member.size <= LIMITS.max_label_bytes
            entry["cls"] = parse_label(tar.extractfile(member).read()) if small else BAD_LABEL
        return True

    try:
        with tarfile.open(path, "r:") as tar:  # (its first header must read: else it is no tar shard at all)
            stopped = None
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, OSError, UnicodeDecodeError) as err:
                    stopped = f"reading stopped at byte {tar.offset:,} of {file_size:,}: {err}"
                    break
                if member is None or not add(tar, member):
                    break
            end = tar.offset  # where reading stopped: the end-of-archive marker, or what tarfile could not read
    except (tarfile.TarError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{shown_path(path)}: not a readable tar shard ({type(err).__name__}: {err})") from None
    if stopped:
        problems.append(stopped)
    cut = stopped or any("runs past" in p for p in problems)
    tail = None if cut else _tail_problem(path, end, file_size)
    if tail is not None:
        problems.append(tail)
        if "corrupt" in tail:  # tarfile's ignore_zeros skips to the next header that reads: keep what follows
            try:
                with tarfile.open(path, "r:", ignore_zeros=True) as tar:
                    for member in tar:
                        if member.offset > end:
                            add(tar, member)
            except (tarfile.TarError, OSError, UnicodeDecodeError):
                pass  # what could be read before the damage stays
    return samples, problems


class ShardSplit(_ContainerSplit):
    kind = "wds"

    def _build_index(self) -> dict:
        shard, offset, size, label, keys, damage = [], [], [], [], [], []
        for s, path in enumerate(self.files):
            samples, problems = _read_shard(path)
            incomplete = 0
            for key, entry in samples.items():
                if "image" not in entry:
                    incomplete += "cls" in entry
                    continue
                incomplete += "cls" not in entry and bool(problems)
                shard.append(s)
                offset.append(entry["image"][0])
                size.append(entry["image"][1])
                label.append(entry.get("cls", NO_LABEL))
                keys.append(key)
            for problem in problems:
                lost = (f"; {incomplete} samples of the shard lost their image or label"
                        if incomplete and "duplicate" not in problem else "")
                damage.append(f"{shown_path(path)}: {problem}{lost}")
        paths, reports = PathList.from_strings(keys), PathList.from_strings(damage)
        return {"shard": np.array(shard, dtype=np.int64), "offset": np.array(offset, dtype=np.int64),
                "size": np.array(size, dtype=np.int64), "labels": np.array(label, dtype=np.int64),
                "key_blob": paths.blob, "key_offsets": paths.offsets, "classes": np.array([], dtype=str),
                "damage_blob": reports.blob, "damage_offsets": reports.offsets}

    def _load_index(self, index: dict) -> None:
        self.labels, self.stored_classes = index["labels"], index["classes"]
        self.shard, self.offset, self.size = index["shard"], index["offset"], index["size"]
        self.keys = PathList(index["key_blob"], index["key_offsets"])
        self.damage = list(PathList(index["damage_blob"], index["damage_offsets"]))

    def describe(self, i: int) -> str:
        return f"{self.files[int(self.shard[i])]}:{self.keys[i]}"

    def read(self, i: int) -> bytes:
        s = int(self.shard[i])
        if int(self.size[i]) > LIMITS.max_file_bytes:
            raise UnreadableImage(f"{int(self.size[i]):,} bytes, over the bound of {LIMITS.max_file_bytes:,} "
                                  f"({env_name('max_file_bytes')})")
        handles = self._handles()
        if s not in handles:
            handles[s] = os.open(self.files[s], os.O_RDONLY)
        return os.pread(handles[s], int(self.size[i]), int(self.offset[i]))
