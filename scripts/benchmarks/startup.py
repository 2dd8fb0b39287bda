"""Start-up: indexing 100k samples, first and cached: a tree of image files (against torchvision's
ImageFolder), the same as Parquet files and as tar shards."""
import os
import shutil
import tempfile
import time

from benchmarks.common import RUNS, fmt, summary


def run(n_classes: int = 1000, per_class: int = 100):
    from torchvision.datasets import ImageFolder

    from d2v_plugin.data.packing import pack
    from d2v_plugin.data import index_split
    from d2v_plugin.data.containers import open_split

    root = tempfile.mkdtemp(prefix="bench_tree_")
    for c in range(n_classes):
        d = os.path.join(root, "train", f"n{c:08d}")
        os.makedirs(d)
        for j in range(per_class):
            with open(os.path.join(d, f"n{c:08d}_{j}.JPEG"), "wb") as f:
                f.write(b"\xff\xd8" + bytes(62))  # 64 bytes standing in for a JPEG: indexing never decodes
    containers = {}
    for kind in ("parquet", "wds"):
        pack(root, os.path.join(root, kind), kind, shard_size=64 * 1000, splits=("train",),
             cache_dir=os.path.join(root, "cache_pack"))
        containers[kind] = os.path.join(root, kind)
    per = {"imagefolder": [], "first scan": [], "cached": [], "parquet first": [], "parquet cached": [],
           "tar shards first": [], "tar shards cached": []}
    for r in range(RUNS):
        cache = os.path.join(root, f"cache{r}")
        t = time.perf_counter()
        ImageFolder(os.path.join(root, "train"))
        per["imagefolder"].append(time.perf_counter() - t)
        t = time.perf_counter()
        index_split(root, "train", cache_dir=cache)
        per["first scan"].append(time.perf_counter() - t)
        t = time.perf_counter()
        n = len(index_split(root, "train", cache_dir=cache))
        per["cached"].append(time.perf_counter() - t)
        for kind, label in (("parquet", "parquet"), ("wds", "tar shards")):
            for when in ("first", "cached"):
                t = time.perf_counter()
                assert len(open_split(containers[kind], "train", cache_dir=cache)) == n
                per[f"{label} {when}"].append(time.perf_counter() - t)
    shutil.rmtree(root)
    return {"files": n, **{k: summary(v) for k, v in per.items()}}


def report(results: dict) -> list:
    s = results["startup"]
    lines = ["## Start-up: indexing 100k samples", "",
             f"{s['files']:,} files in 1,000 class folders (page cache warm), and the same packed by `cli.pack` as "
             "Parquet files (row groups of 8) and as tar shards: the index built the first time, then read "
             "from its cache.", "",
             "| index | seconds | vs ImageFolder |", "|---|---|---|"]
    for k in ("imagefolder", "first scan", "cached", "parquet first", "parquet cached", "tar shards first",
              "tar shards cached"):
        if k in s:
            lines.append(f"| {k} | {fmt(s[k], digits=3)} | {relative(s['imagefolder']['median'] / s[k]['median'])} |")
    lines += ["", "A container's first index reads every file's metadata (Parquet footers, tar headers) once; "
              "later starts read the cache.", ""]
    return lines


def relative(speedup: float) -> str:
    if round(speedup, 1) == 1.0:
        return "1.0x"
    if speedup > 1:
        return f"{speedup:.1f}x faster"
    return f"{1 / speedup:.1f}x slower"
