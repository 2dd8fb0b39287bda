"""Start-up: indexing a tree of 100k image files, first and cached, against torchvision's ImageFolder."""
import os
import shutil
import tempfile
import time

from benchmarks.common import RUNS, fmt, summary


def run(n_classes: int = 1000, per_class: int = 100):
    from torchvision.datasets import ImageFolder

    from d2v_plugin.data import index_split

    root = tempfile.mkdtemp(prefix="bench_tree_")
    for c in range(n_classes):
        d = os.path.join(root, "train", f"n{c:08d}")
        os.makedirs(d)
        for j in range(per_class):
            open(os.path.join(d, f"n{c:08d}_{j}.JPEG"), "wb").close()
    per = {"imagefolder": [], "first scan": [], "cached": []}
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
    shutil.rmtree(root)
    return {"files": n, **{k: summary(v) for k, v in per.items()}}


def report(results: dict) -> list:
    s = results["startup"]
    lines = ["## Start-up: indexing a tree of image files", "",
             f"{s['files']:,} files in 1,000 class folders (page cache warm).", "",
             "| index | seconds | vs ImageFolder |", "|---|---|---|"]
    for k in ("imagefolder", "first scan", "cached"):
        lines.append(f"| {k} | {fmt(s[k], digits=3)} | {s['imagefolder']['median'] / s[k]['median']:.1f}x faster |")
    lines.append("")
    return lines
