"""Input pipeline, one worker process on one core: the plugin's training dataset against torchvision's
ImageFolder + the reference transform, on real photographs."""
import os
import shutil
import tempfile
import time

from benchmarks.common import RUNS, fmt, rotated, summary

KINDS = ("reference", "ours", "ours (fast_decode)", "ours (preresize 256)", "ours (parquet)", "ours (tar shards)")
ROOTS = {"ours (preresize 256)": "small", "ours (parquet)": "parquet", "ours (tar shards)": "wds"}


def write_photos(folder: str, count: int = 48, size=(500, 375)) -> list:
    """Real photographs shipped with scikit-image, re-encoded as JPEGs (ImageNet-like 500x375, q90), as
    ``folder``/train/photos/*.jpg. Returns (paths, number of source photographs)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    sources = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "hubble_deep_field",
                 "immunohistochemistry", "motorcycle_left"):
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # some samples need a download; use those on disk
            continue
        sources.append(Image.fromarray(np.asarray(arr)).convert("RGB"))
    folder = os.path.join(folder, "train", "photos")  # an image-folder split with one class
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        img = sources[i % len(sources)]
        w, h = img.size
        # different crops and orientations of each photo, resized to an ImageNet-typical 500x375 / 375x500
        box = (i * 7 % max(1, w // 8), i * 5 % max(1, h // 8), w - i * 3 % max(1, w // 8), h - i * 11 % max(1, h // 8))
        size = tuple(size) if i % 4 else tuple(size)[::-1]
        path = os.path.join(folder, f"photo_{i:03d}.jpg")
        img.crop(box).resize(size, Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths, len(sources)


def pipeline_rate(kind: str, root: str, rounds: int = 3) -> float:
    """Images/s of one worker's work on the split ``root``/train: reading each image through the dataset
    and collating the batch. Ours: the plugin's ``ImageFolderDataset`` with the training transform, as
    the task builds it (uint8 batches, normalised later on the training device). Reference:
    torchvision's ``ImageFolder`` with RandomResizedCrop + flip + ToTensor + Normalize."""
    import torch

    if kind == "reference":
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        t = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), T.ToTensor(),
                       T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        dataset = ImageFolder(os.path.join(root, "train"), transform=t)
        start = time.perf_counter()
        for _ in range(rounds):
            torch.stack([dataset[i][0] for i in range(len(dataset))])
        return rounds * len(dataset) / (time.perf_counter() - start)
    from d2v_plugin.data import ImageFolderDataset, train_transform
    from d2v_plugin.data.containers import open_split

    index = open_split(root, "train", cache_dir=tempfile.mkdtemp(prefix="bench_index_"))  # folder, parquet or tar
    dataset = ImageFolderDataset(index, train_transform(224, fast_decode=(kind == "ours (fast_decode)")))
    start = time.perf_counter()
    for epoch in range(1, rounds + 1):
        dataset.set_epoch(epoch)
        dataset.collater([dataset[i] for i in range(len(dataset))])
    return rounds * len(dataset) / (time.perf_counter() - start)


def run():
    import torch

    torch.set_num_threads(1)  # one worker process = one core
    from d2v_plugin.data.packing import pack
    from d2v_plugin.cli.preresize import preresize

    out = {}
    for label, size in (("500x375", (500, 375)), ("1024x768", (1024, 768))):
        folder = tempfile.mkdtemp(prefix="bench_photos_")
        paths, n_sources = write_photos(os.path.join(folder, "photos"), size=size)
        preresize(os.path.join(folder, "photos"), os.path.join(folder, "small"), short_side=256, workers=1)
        for kind in ("parquet", "wds"):  # the same JPEGs, packed (cli.pack's defaults)
            pack(os.path.join(folder, "photos"), os.path.join(folder, kind), kind, splits=("train",),
                 cache_dir=os.path.join(folder, "cache"))
        per = {k: [] for k in KINDS}
        for r in range(RUNS):
            for k in rotated(KINDS, r):
                per[k].append(pipeline_rate(k, os.path.join(folder, ROOTS.get(k, "photos"))))
        shutil.rmtree(folder)
        out[label] = {"photos": len(paths), "sources": n_sources, **{k: summary(v) for k, v in per.items()}}
    return out


def report(results: dict) -> list:
    first = next(iter(results["pipeline"].values()))
    lines = ["## Input pipeline (one worker process, one core)", "",
             f"Train transform on {first['photos']} JPEGs made from {first['sources']} real photographs shipped "
             "with scikit-image, re-encoded at the size given (and its portrait twin), quality 90: decode, "
             "RandomResizedCrop(224, scale=(0.08, 1), bicubic), flip, batch, each read through the dataset as a "
             "data-loading worker reads it. Reference: torchvision "
             "`ImageFolder`'s loader + `Compose([RandomResizedCrop, RandomHorizontalFlip, ToTensor, "
             "Normalize])`, normalised in the worker (PIL decode, PIL crop + bicubic resize). Ours: the task's "
             "worker output (TorchCodec's libjpeg-turbo decode straight into a tensor, torch's uint8 "
             "antialiased bicubic resize of the crop, same pixels within rounding), uint8 batches that the "
             "task normalises on the training device; `fast_decode` = `task.fast_decode=true` (DCT-scaled "
             "decoding of crops >= 2x the output: at 500x375 no crop is, so that row runs the same code as "
             "`ours` and the gap between them is the measurement's noise); `preresize 256` = "
             "the same photos after `python -m d2v_plugin.cli.preresize --short-side 256` (a trade-off: less "
             "detail in large crops); `parquet` and `tar shards`: the same JPEGs packed by `python -m "
             "d2v_plugin.cli.pack` (Parquet row groups of 8, memory-mapped; tar members read by offset), read by "
             "random access in the same order.", "",
             "| photos | pipeline | images/s | vs reference |", "|---|---|---|---|"]
    for label, p in results["pipeline"].items():
        ref = p["reference"]["median"]
        for k in KINDS:
            lines.append(f"| {label} | {k} | {fmt(p[k])} | {p[k]['median'] / ref:.2f}x |")
    lines.append("")
    return lines
