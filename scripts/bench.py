"""`make bench`: measure the plugin against data2vec's own fine-tuning path and rewrite BENCHMARKS.md.

Every figure is the median (with min and max) over at least 5 runs, the contenders interleaved
(A, B, A, B, ...), each train-step run in a fresh process so peak memory is that run's alone.
Sections: train step (ours vs data2vec's model, depth 12 and 4), input pipeline (per worker, real
photographs), start-up (indexing 100k files), end to end (fairseq-hydra-train updates/s).
"""
import argparse
import importlib.util
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = 5


def reference_module():
    """data2vec's own code with its two shims (d2v_plugin/testing/reference.py)."""
    from d2v_plugin.testing import reference

    return reference


def rotated(items, r):
    """Run r's order: each candidate takes each position in turn (no one always runs first)."""
    items = list(items)
    return items[r % len(items):] + items[:r % len(items)]


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s, unit="", digits=1):
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


# --- train step -------------------------------------------------------------------------------

def train_step_models(impls, depth: int) -> dict:
    """The classifiers to time, from the same random base-width weights: ours (loaded from a
    fairseq-format save of data2vec's model) and data2vec's own."""
    import torch

    torch.manual_seed(0)
    ref = reference_module()
    d2v, cfg = ref.build_data2vec_model(depth=depth - 2, prenet_depth=2)  # base width, random weights
    models = {}
    if "ours" in impls:
        import d2v_plugin

        d2v_plugin.register()
        from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier

        path = os.path.join(tempfile.mkdtemp(), "d2v.pt")
        ref.save_like_fairseq(d2v, cfg, path)
        models["ours"] = Data2Vec2ImageClassifier.build_model(
            Data2Vec2ClassifierConfig(pretrained_checkpoint=path, num_classes=1000))
    if "reference" in impls:
        models["reference"] = ref.reference_classifier(d2v, num_classes=1000)
    del d2v
    return models


def train_stepper(model, batch: int):
    """A function running one forward + soft-target CE + backward + AdamW step, returning its seconds."""
    import torch
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.randn(batch, 3, 224, 224)
    soft = torch.softmax(torch.randn(batch, 1000), -1)

    def step():
        t = time.perf_counter()
        logits = model(images)
        loss = torch.sum(-soft * F.log_softmax(logits.float(), -1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def train_step_worker(impl: str, depth: int, batch: int, steps: int, warmup: int) -> dict:
    """One measurement in this process: images/s of one model's train step and the process's peak RSS."""
    step = train_stepper(train_step_models([impl], depth)[impl], batch)
    times = [step() for _ in range(warmup + steps)][warmup:]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": batch * len(times) / sum(times), "peak_rss_mib": peak_mib}


def train_step_pair_worker(depth: int, batch: int, steps: int, warmup: int) -> dict:
    """Both models in one process, their steps alternated (ABBA): the speed ratio with the machine's
    drift shared by both, which separate processes cannot give."""
    steppers = {k: train_stepper(m, batch) for k, m in train_step_models(["ours", "reference"], depth).items()}
    times = {k: [] for k in steppers}
    for i in range(warmup + steps):
        for k in (("ours", "reference") if i % 2 else ("reference", "ours")):
            t = steppers[k]()
            if i >= warmup:
                times[k].append(t)
    return {"ratio": statistics.median(times["reference"]) / statistics.median(times["ours"])}


def run_worker(*args) -> dict:
    """This script's --worker mode in a fresh process: its last stdout line, as JSON."""
    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train_step(batch: int, steps: int):
    results = {}
    pair_steps = {12: 4, 4: 8}  # per model, after one warm-up step each
    for depth in (12, 4):
        per = {"ours": [], "reference": [], "paired": []}
        for r in range(RUNS):
            for impl in rotated(("reference", "ours"), r):
                per[impl].append(run_worker("train_step", impl, depth, batch, steps))
                print(f"  train step depth {depth} {impl}: {per[impl][-1]}", flush=True)
            per["paired"].append(run_worker("train_step_pair", depth, batch, pair_steps[depth])["ratio"])
            print(f"  train step depth {depth} paired ratio: {per['paired'][-1]:.3f}", flush=True)
        paired = per.pop("paired")
        results[depth] = {impl: {"images_per_s": summary([r["images_per_s"] for r in rs]),
                                 "peak_rss_mib": summary([r["peak_rss_mib"] for r in rs])}
                          for impl, rs in per.items()}
        results[depth]["paired_ratio"] = summary(paired)
    return results


# --- input pipeline ---------------------------------------------------------------------------

def write_photos(folder: str, count: int = 48, size=(500, 375)) -> list:
    """Real photographs shipped with scikit-image, re-encoded as JPEGs (ImageNet-like 500x375, q90)."""
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


def pipeline_rate(kind: str, paths: list, rounds: int = 3) -> float:
    import torch
    from PIL import Image

    if kind == "reference":  # torchvision ImageFolder's loader + the reference transform
        from torchvision import transforms as T
        from torchvision.datasets.folder import pil_loader

        t = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), T.ToTensor(),
                       T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        start = time.perf_counter()
        for _ in range(rounds):
            batch = torch.stack([t(pil_loader(p)) for p in paths])
        return rounds * len(paths) / (time.perf_counter() - start)
    from d2v_plugin.data.transforms import RandomResizedCropFlip

    # what a worker of the training task produces: uint8 batches (normalised later, on the GPU)
    t = RandomResizedCropFlip(224, fast_decode=(kind == "ours (fast_decode)"))
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(rounds):
        imgs = []
        for p in paths:  # as ImageFolderDataset.__getitem__ does it
            with open(p, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as img:
                imgs.append(t(img, g, data))
        batch = torch.stack(imgs)
    del batch
    return rounds * len(paths) / (time.perf_counter() - start)


def bench_pipeline():
    import torch

    torch.set_num_threads(1)  # one worker process = one core
    from d2v_plugin.cli.preresize import preresize

    out = {}
    for label, size in (("500x375", (500, 375)), ("1024x768", (1024, 768))):
        folder = tempfile.mkdtemp(prefix="bench_photos_")
        paths, n_sources = write_photos(os.path.join(folder, "photos"), size=size)
        preresize(os.path.join(folder, "photos"), os.path.join(folder, "small"), short_side=256, workers=1)
        small = sorted(os.path.join(folder, "small", os.path.basename(p)) for p in paths)
        kinds = ("reference", "ours", "ours (fast_decode)", "ours (preresize 256)")
        per = {k: [] for k in kinds}
        for r in range(RUNS):
            for k in rotated(kinds, r):
                per[k].append(pipeline_rate(k, small) if k == "ours (preresize 256)" else pipeline_rate(k, paths))
        shutil.rmtree(folder)
        out[label] = {"photos": len(paths), "sources": n_sources, **{k: summary(v) for k, v in per.items()}}
    return out


# --- start-up ---------------------------------------------------------------------------------

def bench_startup(n_classes: int = 1000, per_class: int = 100):
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


# --- end to end -------------------------------------------------------------------------------

def bench_end_to_end(updates: int):
    """fairseq-hydra-train updates/s, ours (config/demo.yaml) vs data2vec's own path
    (scripts/reference_train.py + scripts/reference_demo.yaml), same data and the same 2 + 3-block,
    128-wide checkpoint (data2vec's model cannot be built with 2 + 2), interleaved."""
    work = tempfile.mkdtemp(prefix="bench_e2e_")
    from d2v_plugin.demo_data import write_digits

    write_digits(os.path.join(work, "data"))
    ref = reference_module()
    d2v, cfg = ref.build_data2vec_model(embed_dim=128, num_heads=4, depth=3, prenet_depth=2, image_size=32,
                                        patch_size=4)
    ref.save_like_fairseq(d2v, cfg, os.path.join(work, "init.pt"))
    bin_dir = os.path.dirname(sys.executable)
    common = [f"optimization.max_update={updates}", "optimization.max_epoch=0", "dataset.disable_validation=true",
              "checkpoint.no_save=true", "common.log_format=json", f"common.log_interval={updates // 2}",
              f"task.data={work}/data", "dataset.num_workers=2"]  # the demo recipe's loader, for both
    commands = {
        "ours": [os.path.join(bin_dir, "fairseq-hydra-train"), "--config-dir", "config", "--config-name", "demo",
                 "common.user_dir=d2v_plugin", f"model.pretrained_checkpoint={work}/init.pt", *common],
        "reference": [sys.executable, "scripts/reference_train.py", "--config-dir", "scripts", "--config-name",
                      "reference_demo", f"model.model_path={work}/init.pt", *common],
    }
    per = {"ours": [], "reference": []}
    for r in range(RUNS):
        for name, cmd in rotated(list(commands.items()), r):
            extra = [f"checkpoint.save_dir={work}/{name}{r}"]
            out = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            ups = [float(json.loads(line.split(" - ", 1)[1])["ups"]) for line in (out.stdout + out.stderr).splitlines()
                   if "[train_inner][INFO] - {" in line]
            per[name].append(ups[-1])  # the second half: start-up excluded
            print(f"  end to end {name} run {r}: {ups[-1]:.2f} updates/s", flush=True)
    shutil.rmtree(work)
    return {"updates": updates, **{k: summary(v) for k, v in per.items()}}


# --- report -----------------------------------------------------------------------------------

def machine():
    import torch
    import torchvision
    import timm
    import fairseq

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, timm {timm.__version__}, fairseq {fairseq.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def write_markdown(results: dict, path: str):
    lines = ["# Benchmarks", "", f"Measured by `make bench` ({results['date']}) on: {results['machine']}.",
             f"Each figure: median (min–max) over {RUNS} runs, contenders interleaved, the order rotated each run.", ""]
    if "train_step" in results:
        b = results["train_step_batch"]
        lines += ["## Train step (CPU, fp32)", "",
                  f"Forward + soft-target cross-entropy + backward + AdamW step, batch {b}, 224 px, base width 768, "
                  "same weights; the reference is data2vec's own model (`Data2VecMultiModel` via `examples/data2vec`, "
                  "mean pooling + fc_norm + head as `mae_image_classification`). Images/s and peak memory (the "
                  "process's max RSS): each model alone in a fresh process. Paired ratio: both models in one "
                  "process, steps alternated ABBA, reference step time / ours (the precise speed comparison: the "
                  "machine's drift hits both alike).", "",
                  "| depth | reference images/s | ours images/s | ratio ours/ref | paired ratio | reference peak MiB "
                  "| ours peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for depth, r in results["train_step"].items():
            ratio = r["ours"]["images_per_s"]["median"] / r["reference"]["images_per_s"]["median"]
            paired = fmt(r["paired_ratio"], digits=3) if "paired_ratio" in r else "–"
            lines.append(f"| {depth} | {fmt(r['reference']['images_per_s'], digits=2)} | {fmt(r['ours']['images_per_s'], digits=2)} | "
                         f"{ratio:.2f} | {paired} | {fmt(r['reference']['peak_rss_mib'], digits=0)} | "
                         f"{fmt(r['ours']['peak_rss_mib'], digits=0)} |")
        lines.append("")
    if "pipeline" in results:
        first = next(iter(results["pipeline"].values()))
        lines += ["## Input pipeline (one worker process, one core)", "",
                  f"Train transform on {first['photos']} JPEGs made from {first['sources']} real photographs shipped "
                  "with scikit-image, re-encoded at the size given (and its portrait twin), quality 90: decode, "
                  "RandomResizedCrop(224, scale=(0.08, 1), bicubic), flip, batch. Reference: torchvision "
                  "`ImageFolder`'s loader + `Compose([RandomResizedCrop, RandomHorizontalFlip, ToTensor, "
                  "Normalize])`, normalised in the worker (PIL decode, PIL crop + bicubic resize). Ours: the task's "
                  "worker output (TorchCodec's libjpeg-turbo decode straight into a tensor, torch's uint8 "
                  "antialiased bicubic resize of the crop, same pixels within rounding), uint8 batches that the "
                  "task normalises on the training device; `fast_decode` = `task.fast_decode=true` (DCT-scaled "
                  "decoding of crops >= 2x the output: at 500x375 no crop is, so that row runs the same code as "
                  "`ours` and the gap between them is the measurement's noise); `preresize 256` = "
                  "the same photos after `python -m d2v_plugin.cli.preresize --short-side 256` (a trade-off: less "
                  "detail in large crops).", "",
                  "| photos | pipeline | images/s | vs reference |", "|---|---|---|---|"]
        for label, p in results["pipeline"].items():
            ref = p["reference"]["median"]
            for k in ("reference", "ours", "ours (fast_decode)", "ours (preresize 256)"):
                lines.append(f"| {label} | {k} | {fmt(p[k])} | {p[k]['median'] / ref:.2f}x |")
        lines.append("")
    if "startup" in results:
        s = results["startup"]
        lines += ["## Start-up: indexing a tree of image files", "",
                  f"{s['files']:,} files in 1,000 class folders (page cache warm).", "",
                  "| index | seconds | vs ImageFolder |", "|---|---|---|"]
        for k in ("imagefolder", "first scan", "cached"):
            lines.append(f"| {k} | {fmt(s[k], digits=3)} | {s['imagefolder']['median'] / s[k]['median']:.1f}x faster |")
        lines.append("")
    if "end_to_end" in results:
        e = results["end_to_end"]
        lines += ["## End to end: fairseq-hydra-train on the demo data", "",
                  f"Updates/s over the second half of {e['updates']} updates, batch 32, 32 px digits, the same "
                  "data2vec 2.0-format checkpoint (2 prenet + 3 main blocks, 128 wide: data2vec's model cannot be "
                  "built with 2 + 2), no validation, no checkpoint writes, 0 data-loading workers. Ours: "
                  "`config/demo.yaml` (pretraining augmentation). Reference: data2vec's own task, model and "
                  "criterion (`mae_image_classification`, `model`) with its own transform (timm RandAugment + "
                  "random erasing), run by `scripts/reference_train.py` (the test-only shims, and the plugin's "
                  "timm posterize fix without which that transform crashes on Pillow >= 10).", "",
                  "| path | updates/s | vs reference |", "|---|---|---|"]
        if "reference" in e:
            for k in ("reference", "ours"):
                lines.append(f"| {k} | {fmt(e[k], digits=2)} | {e[k]['median'] / e['reference']['median']:.2f}x |")
        lines.append("")
    lines += ["## GPU", "", results.get("gpu_note", "No GPU was lent to the task that wrote this file; "
              "`scripts/bench_gpu.py` is the prepared GPU measurement (batch 256, bf16 and fp16, depth 12 and 4, "
              "and `task.device_decode`'s batched nvJPEG decode + crop resize)."), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    import logging

    import d2v_plugin

    d2v_plugin.register()  # imports fairseq without the DEBUG root logger its import sets
    logging.getLogger().setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", default=["train_step", "pipeline", "startup", "end_to_end"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.worker and args.worker[0] == "train_step_pair":
        _, depth, batch, steps = args.worker
        print(json.dumps(train_step_pair_worker(int(depth), int(batch), int(steps), warmup=1)))
        return
    if args.worker:
        _, impl, depth, batch, steps = args.worker
        print(json.dumps(train_step_worker(impl, int(depth), int(batch), int(steps), warmup=1)))
        return
    raw = os.path.join(REPO, "bench_results.json")
    results = {}
    if set(args.only) != {"train_step", "pipeline", "startup", "end_to_end"} and os.path.exists(raw):
        with open(raw) as f:  # a partial rerun keeps the other sections' figures
            results = json.load(f)
    results.update({"machine": machine(), "date": time.strftime("%Y-%m-%d")})
    if "startup" in args.only:
        print("start-up ...", flush=True)
        results["startup"] = bench_startup()
    if "pipeline" in args.only:
        print("input pipeline ...", flush=True)
        results["pipeline"] = bench_pipeline()
    if "train_step" in args.only:
        print("train step ...", flush=True)
        results["train_step"], results["train_step_batch"] = bench_train_step(args.batch, args.steps), args.batch
    if "end_to_end" in args.only:
        print("end to end ...", flush=True)
        results["end_to_end"] = bench_end_to_end(updates=120)
    with open(raw, "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_markdown(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
