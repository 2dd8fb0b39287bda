"""Packing a dataset into a few large files, Parquet (the Hugging Face layout) or WebDataset tar shards, in the
source's order; each shard written to a temporary name and renamed when complete, so a rerun writes only the
shards that are missing. The command: ``python -m d2v_plugin.cli.pack``."""
import io
import json
import os
import re
import sys
import tarfile

from d2v_plugin.atomic import atomic_path

PARQUET_ROW_GROUP = 8
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).upper() not in UNITS:
        raise ValueError(f"--shard-size {text!r}: give a size such as 1GB, 500MB or 2GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def shard_bounds(sizes: list, shard_size: int) -> list:
    """[start, end) of each shard: consecutive samples until the shard reaches ``shard_size`` bytes.
    Decided from the sizes alone, so a rerun cuts the same shards."""
    bounds, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if total and total + n > shard_size:
            bounds.append((start, i))
            start, total = i, 0
        total += n
    if start < len(sizes):
        bounds.append((start, len(sizes)))
    return bounds


def _key(source, i: int) -> tuple[str, str]:
    """A tar member's key and extension for sample i: its path in a folder tree, its key in tar shards,
    else its position (the decoders read images by content, not by extension)."""
    from d2v_plugin.data.containers import ShardSplit
    from d2v_plugin.data.index import FolderIndex

    if isinstance(source, FolderIndex):
        stem, ext = os.path.splitext(source.files[i])
        return stem.replace(".", "_"), ext.lstrip(".").lower() or "jpg"
    if isinstance(source, ShardSplit):
        return source.keys[i], "jpg"
    return f"{i:09d}", "jpg"


def _sizes(source) -> list:
    """Bytes of each sample, to cut shards by size: from the file system, the shard index, or read."""
    from d2v_plugin.data.containers import ShardSplit
    from d2v_plugin.data.index import FolderIndex

    if isinstance(source, FolderIndex):
        return [os.path.getsize(source.describe(i)) for i in range(len(source))]
    if isinstance(source, ShardSplit):
        return [int(n) for n in source.size]
    return [len(source.read(i)) for i in range(len(source))]


def _write_parquet(path, source, start, end, classes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(source.read(i), source.describe(i), int(source.labels[i])) for i in range(start, end)]
    table = pa.table({
        "image": pa.array([{"bytes": data, "path": os.path.basename(where)} for data, where, _ in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array([label for _, _, label in rows], pa.int64()),
    })
    features = {"image": {"_type": "Image"}, "label": {"names": list(classes), "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=PARQUET_ROW_GROUP, compression="NONE")


def _write_tar(path, source, start, end):
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for i in range(start, end):
            key, ext = _key(source, i)
            for name, payload in ((f"{key}.{ext}", source.read(i)), (f"{key}.cls", str(int(source.labels[i])).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = 0  # the same bytes on every pack
                tar.addfile(info, io.BytesIO(payload))


def pack(src: str, out: str, fmt: str, shard_size: int = 10**9, splits=("train", "val"), cache_dir=None) -> dict:
    from tqdm import tqdm

    from d2v_plugin.data.containers import open_split

    if fmt not in ("parquet", "wds"):
        raise ValueError(f"--format {fmt!r}: use parquet or wds")
    train = open_split(src, splits[0], cache_dir=cache_dir)
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, "classes.txt")) as tmp, open(tmp, "w") as f:
        f.write("".join(f"{c}\n" for c in train.classes))
    written = {}
    for split in splits:
        source = train if split == splits[0] else open_split(src, split, classes=train.classes, cache_dir=cache_dir)
        bounds = shard_bounds(_sizes(source), shard_size)
        done = 0
        for k, (start, end) in enumerate(tqdm(bounds, desc=f"pack {split}", file=sys.stderr, unit="shard")):
            path = os.path.join(out, f"{split}-{k:06d}.{'parquet' if fmt == 'parquet' else 'tar'}")
            if os.path.exists(path):
                continue  # written by an earlier run (complete: shards appear only when renamed)
            if fmt == "parquet":
                _write_parquet(path, source, start, end, train.classes)
            else:
                _write_tar(path, source, start, end)
            done += 1
        written[split] = {"images": len(source), "shards": len(bounds), "written_now": done}
    return written
