"""Evaluation: `cli.evaluate`'s loop against a plain torchvision ImageFolder + model loop (same workers, same
model), the feature extraction into the store, the kNN search against scikit-learn's brute-force
KNeighborsClassifier on the same features, each probe's time over cached features per 10k images, and the
scale measurement: 10,000 queries against 1,281,167 x 768 fp16 features in a memory-mapped store, peak
memory measured in a process of its own. Shared by `make bench` (CPU) and scripts/bench_gpu.py."""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import BENCH, REPO, RUNS, fmt, rotated, summary

IMAGENET_TRAIN = 1_281_167


def _setup(root: str, count: int, depth: int, width: int = 768, heads: int = 12):
    """Real photographs as a one-class val split (and train, the same files), and a classifier export of
    an encoder of ``depth`` blocks (the model both loops run)."""
    import torch

    from benchmarks.pipeline import write_photos
    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier
    from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig

    write_photos(root, count=count)
    os.rename(os.path.join(root, "train"), os.path.join(root, "val"))
    os.symlink(os.path.join(root, "val"), os.path.join(root, "train"))
    torch.manual_seed(0)
    model = Data2Vec2ImageClassifier(Data2Vec2ClassifierConfig(num_classes=1000),
                                     Data2Vec2ImageEncoder(EncoderConfig(depth=depth, embed_dim=width, num_heads=heads)))
    path = os.path.join(root, "model.pt")
    torch.save({"cfg": {"model": {"_name": "data2vec2_image_classifier", "num_classes": 1000, "pooling": "mean",
                                  "num_heads": heads, "norm_eps": 1e-6}, "task": {"image_size": 224}},
                "model": model.state_dict()}, path)
    return path


def plain_loop_rate(root: str, model, device, precision: str, batch: int, workers: int) -> float:
    """torchvision's ImageFolder with its eval transform (Resize 256 bicubic, CenterCrop 224, ToTensor,
    Normalize), a DataLoader with the same workers, the same model under the same autocast."""
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    from d2v_plugin.evaluation.runtime import Runtime

    t = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                   T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(os.path.join(root, "val"), transform=t),
                                         batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda")
    runtime = Runtime(device, precision)
    model = model.to(device).eval()
    start, n = time.perf_counter(), 0
    with torch.no_grad(), runtime.autocast():
        for images, target in loader:
            logits = model(images.to(device, non_blocking=True))
            n += int((logits.argmax(-1).cpu() == target).numel())
    return n / (time.perf_counter() - start)


def evaluate_rates(root: str, checkpoint: str, device: str, precision: str, batch: int, workers: int,
                   rounds: int) -> dict:
    """images/s of cli.evaluate's loop, the plain loop, and the feature extraction into a store, interleaved."""
    import torch

    from d2v_plugin.data.containers import open_split
    from d2v_plugin.evaluation.features import FeatureSpec, split_features
    from d2v_plugin.evaluation.loop import evaluate
    from d2v_plugin.evaluation.runtime import Runtime
    from d2v_plugin.inference import load_classifier

    runtime = Runtime(torch.device(device), precision)
    model = load_classifier(checkpoint)
    index = open_split(root, "val", classes=model.classes or None, cache_dir=os.path.join(root, "cache"))
    spec = FeatureSpec.parse("last", "mean", model.encoder.cfg.depth)

    def ours():
        return evaluate(model, index, runtime, batch, workers)["images_per_s"]

    def plain():
        return plain_loop_rate(root, model, runtime.device, precision, batch, workers)

    def extraction():
        store = tempfile.mkdtemp(prefix="bench_store_", dir=root)
        start = time.perf_counter()
        split_features(model.encoder, checkpoint, {}, index, model.data_cfg, spec, runtime, store, batch, workers)
        return len(index) / (time.perf_counter() - start)

    contenders = {"ours (cli.evaluate)": ours, "plain ImageFolder loop": plain, "feature extraction": extraction}
    per = {name: [] for name in contenders}
    for name in contenders:
        contenders[name]()  # warm-up: workers, page cache, kernels
    for r in range(rounds):
        for name in rotated(contenders, r):
            per[name].append(contenders[name]())
            print(f"  evaluate {name}: {per[name][-1]:.1f} images/s", flush=True)
    return {"images": len(index), "batch": batch, "workers": workers, "device": device, "precision": precision,
            "results": {name: summary(v) for name, v in per.items()}}


def synthetic_store(folder: str, n: int, dim: int, classes: int = 1000, seed: int = 0, chunk: int = 65_536):
    """A feature store's arrays of ``n`` x ``dim`` fp16 random features and labels, written chunk by chunk."""
    features = np.memmap(os.path.join(folder, "features.bin"), dtype=np.float16, mode="w+", shape=(n, 1, dim))
    labels = np.memmap(os.path.join(folder, "labels.bin"), dtype=np.int64, mode="w+", shape=(n,))
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        features[start:start + rows, 0] = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
        labels[start:start + rows] = rng.integers(0, classes, rows)
    features.flush(), labels.flush()
    return features, labels


class PeakMemory:
    """The peak parts of this process's memory while the block runs, sampled every 20 ms where /proc tells them:
    allocated memory (RssAnon) and file pages (RssFile: a memory-mapped store's pages read so far, which the
    kernel can drop, and the libraries'); ``max_rss`` the process's max RSS, both together."""

    def __enter__(self):
        import threading

        self.parts, self._done = {"RssAnon": 0, "RssFile": 0}, threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _read(self):
        if os.path.exists("/proc/self/status"):
            for line in open("/proc/self/status"):
                name, _, value = line.partition(":")
                if name in self.parts:
                    self.parts[name] = max(self.parts[name], int(value.split()[0]) / 1024)

    def _sample(self):
        while not self._done.wait(0.02):
            self._read()

    def __exit__(self, *exc):
        self._done.set()
        self._sampler.join()
        self._read()  # a block shorter than one sampling interval

    def figures(self) -> dict:
        """The peaks; the max RSS from /proc's VmHWM where there is one (ru_maxrss keeps, across exec, the peak
        of the process that started this one)."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if os.path.exists("/proc/self/status"):
            with open("/proc/self/status") as f:
                peak = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM")), peak)
        return {"peak_rss_mib": peak,
                "peak_allocated_mib": self.parts["RssAnon"] or None, "peak_file_pages_mib": self.parts["RssFile"] or None}


def knn_scale_worker(folder: str, n: int, dim: int, queries: int, device: str) -> dict:
    """In a process of its own: kNN of ``queries`` against the store's ``n`` rows (memory-mapped), time and
    peak memory (PeakMemory)."""
    import torch

    from d2v_plugin.evaluation.knn import nearest
    from d2v_plugin.evaluation.runtime import Runtime

    features = np.memmap(os.path.join(folder, "features.bin"), dtype=np.float16, mode="r", shape=(n, 1, dim))
    labels = np.array(np.memmap(os.path.join(folder, "labels.bin"), dtype=np.int64, mode="r", shape=(n,)))
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((queries, dim), dtype=np.float32))
    runtime = Runtime(torch.device(device), "fp32")
    view = _Flat(features)
    with PeakMemory() as memory:
        start = time.perf_counter()
        found = nearest(view, labels, q, 20, runtime)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "queries_per_s": queries / seconds, "k": found.k, **memory.figures(),
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


class _Flat:
    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, rows):
        return self.features[rows][:, 0, :]


def sklearn_rate(features, labels, queries: int, subset: int) -> dict:
    """scikit-learn's brute-force cosine KNeighborsClassifier on the first ``subset`` rows (fp32)."""
    from sklearn.neighbors import KNeighborsClassifier

    train = np.asarray(features[:subset, 0], dtype=np.float32)
    q = np.random.default_rng(1).standard_normal((queries, train.shape[1]), dtype=np.float32)
    clf = KNeighborsClassifier(n_neighbors=20, algorithm="brute", metric="cosine", n_jobs=-1)
    clf.fit(train, np.asarray(labels[:subset]))
    start = time.perf_counter()
    clf.kneighbors(q, n_neighbors=20)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "queries_per_s": queries / seconds, "train_rows": subset}


def knn_scale(work: str, n: int = IMAGENET_TRAIN, dim: int = 768, queries: int = 10_000, device: str = "cpu",
              sklearn_subset: int = 100_000, sklearn_queries: int = 2_000) -> dict:
    os.makedirs(work, exist_ok=True)
    features, labels = synthetic_store(work, n, dim)
    out = subprocess.run([sys.executable, BENCH, "--worker", "knn_scale", work, *map(str, (n, dim, queries)), device],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    theirs = sklearn_rate(features, labels, sklearn_queries, min(sklearn_subset, n))
    return {"train_rows": n, "dim": dim, "queries": queries, "ours": ours, "sklearn": theirs}


def knn_vs_sklearn(features, labels, queries: int = 2_000) -> dict:
    """The same search (k = 20, cosine) on the same features, ours and scikit-learn's, in queries/s."""
    import torch

    from d2v_plugin.evaluation.knn import nearest
    from d2v_plugin.evaluation.runtime import Runtime

    q = torch.from_numpy(np.random.default_rng(1).standard_normal((queries, features.shape[2]), dtype=np.float32))
    runtime = Runtime(torch.device("cpu"), "fp32")
    per = {"ours": [], "sklearn": []}
    for r in range(RUNS):
        for name in rotated(per, r):
            if name == "ours":
                start = time.perf_counter()
                nearest(_Flat(features), np.asarray(labels), q, 20, runtime)
                per[name].append(queries / (time.perf_counter() - start))
            else:
                per[name].append(sklearn_rate(features, labels, queries, len(labels))["queries_per_s"])
    return {"train_rows": len(labels), "queries": queries, **{k: summary(v) for k, v in per.items()}}


def probe_costs(n_train: int = 10_000, n_val: int = 2_000, dim: int = 768, classes: int = 100,
                linear_steps_timed: int = 100) -> dict:
    """Seconds of each probe over cached features of 10k train images (random features: the cost, not the
    accuracy). The linear probe's schedule is a number of steps (DINOv2's 12,500 whatever the set's size):
    ``linear_steps_timed`` of them are timed with the whole probe (the grid, held-out choice, val) and its
    seconds at the default schedule projected from them."""
    import torch

    from d2v_plugin.evaluation import fewshot, knn, linear
    from d2v_plugin.evaluation.runtime import Runtime

    rng = np.random.default_rng(0)
    tx = torch.from_numpy(rng.standard_normal((n_train, dim), dtype=np.float32))
    ty = rng.integers(0, classes, n_train)
    vx = torch.from_numpy(rng.standard_normal((n_val, dim), dtype=np.float32))
    vy = rng.integers(0, classes, n_val)
    runtime = Runtime(torch.device("cpu"), "fp32")
    out = {}
    start = time.perf_counter()
    knn.knn_probe(tx, ty, vx, vy, classes, [10, 20, 100, 200], 0.07, runtime)
    out["knn (k 10, 20, 100, 200)"] = time.perf_counter() - start
    timed = linear.LinearSettings(epochs=0, min_steps=linear_steps_timed)
    start = time.perf_counter()
    result = linear.linear_probe(tx, ty, vx, vy, classes, timed, runtime)
    seconds = time.perf_counter() - start
    default = linear.steps_of(int(n_train * (1 - timed.held_out)), linear.LinearSettings())[0]
    out[f"linear ({result['heads']} heads, {default:,} steps at batch {timed.batch_size:,}: "
        f"{result['steps']:,} timed, x {default / result['steps']:g})"] = seconds * default / result["steps"]
    start = time.perf_counter()
    fewshot.fewshot_probe(tx, ty, vx, vy, classes, runtime)
    out["few-shot (1/2/5/10 x 3 seeds)"] = time.perf_counter() - start
    return {"train": n_train, "val": n_val, "dim": dim, "classes": classes, "seconds": out}


def run() -> dict:
    """`make bench`'s evaluation section on the CPU."""
    work = tempfile.mkdtemp(prefix="bench_eval_")
    checkpoint = _setup(os.path.join(work, "photos"), count=96, depth=4)
    rates = evaluate_rates(os.path.join(work, "photos"), checkpoint, "cpu", "fp32", batch=32, workers=2, rounds=RUNS)
    features, labels = synthetic_store(work, 100_000, 768)
    search = knn_vs_sklearn(features, labels)
    scale = knn_scale(os.path.join(work, "scale"))
    return {"evaluate": rates, "knn_vs_sklearn": search, "knn_scale": scale, "probes": probe_costs()}


def report(results: dict) -> list:
    from d2v_plugin.evaluation.knn import SIMILARITY_BYTES

    e = results["evaluation"]
    r = e["evaluate"]
    ref = r["results"]["plain ImageFolder loop"]["median"]
    lines = ["## Evaluation (CPU, fp32)", "",
             f"`cli.evaluate`'s loop (evaluation/loop.py: the eval transform in {r['workers']} data-loading workers, "
             "batches prefetched to the device) against a plain torchvision `ImageFolder` + eval transform + the "
             f"same model loop with the same workers: {r['images']} real photographs (500x375 JPEGs), batch "
             f"{r['batch']}, a 4-block base-width encoder at 224 px; and the feature extraction into the store "
             "(the same forward pass, written to memory-mapped fp16 chunks).", "",
             "| loop | images/s | vs plain loop |", "|---|---|---|"]
    for name, s in r["results"].items():
        lines.append(f"| {name} | {fmt(s)} | {s['median'] / ref:.2f}x |")
    k = e["knn_vs_sklearn"]
    lines += ["", f"kNN search (k = 20, cosine) of {k['queries']:,} queries against {k['train_rows']:,} x 768 features, "
              "the same features: ours (evaluation/knn.py: chunked, fp32 on the CPU) against scikit-learn's "
              "`KNeighborsClassifier(algorithm='brute', metric='cosine')`.", "",
              "| search | queries/s |", "|---|---|",
              f"| ours | {fmt(k['ours'])} |", f"| scikit-learn | {fmt(k['sklearn'])} |"]
    s = e["knn_scale"]
    lines += ["", f"At ImageNet's size: {s['queries']:,} queries against {s['train_rows']:,} x {s['dim']} fp16 features "
              "held in a memory-mapped store on disk (2 GB), on this machine, in a process of its own: "
              f"{s['ours']['seconds']:.0f} s ({s['ours']['queries_per_s']:.0f} queries/s), peak memory "
              f"{s['ours']['peak_rss_mib']:.0f} MiB (the process's max RSS, torch's libraries included"
              + (f"; at its peak {s['ours']['peak_allocated_mib']:.0f} MiB allocated and "
                 f"{s['ours']['peak_file_pages_mib']:.0f} MiB of file pages, most of them the store's pages read "
                 "so far, which the kernel can drop" if s["ours"].get("peak_allocated_mib") else "")
              + f": a block of similarities is at most {SIMILARITY_BYTES // 2**20} MiB; the N_val x N_train matrix, "
              f"never built, would be {s['queries'] * s['train_rows'] * 4 / 1e9:.0f} GB in fp32). "
              "scikit-learn's brute-force search on a "
              f"{s['sklearn']['train_rows']:,}-row subset: {s['sklearn']['queries_per_s']:.0f} queries/s (it holds "
              "the rows in memory as fp32).", ""]
    p = e["probes"]
    lines += [f"Each probe over cached features of {p['train']:,} train and {p['val']:,} val images ({p['dim']} "
              f"dims, {p['classes']} classes), seconds: what it costs next to the extraction it reuses (above: "
              f"{r['results']['feature extraction']['median']:.1f} images/s, so "
              f"{p['train'] / r['results']['feature extraction']['median']:.0f} s for the {p['train']:,} images).", "",
              "| probe | seconds |", "|---|---|"]
    for name, seconds in p["seconds"].items():
        lines.append(f"| {name} | {seconds:.1f} |")
    return lines + [""]


def knn_precision(work: str, device: str, width: int = 768, depth: int = 12, image_size: int = 224,
                  heads: int = 12) -> dict:
    """kNN on ``device`` against the CPU on the same store: a random-init encoder of base width (its features
    nearly tie, the case where fp16 similarities changed a quarter of the answers) on the digits, extracted
    in bf16 on ``device`` and stored in fp16; top-1 at k = 10 and 20 on ``device`` (fp32 similarities), on the
    CPU, and with the fp16 similarities this plugin once computed on GPUs, for contrast."""
    import torch

    from d2v_plugin.demo_data import write_digits
    from d2v_plugin.evaluation import knn
    from d2v_plugin.evaluation.probes import cached_features
    from d2v_plugin.evaluation.runtime import Runtime
    from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig
    from d2v_plugin.testing.checkpoints import save_data2vec_checkpoint

    data, checkpoint = os.path.join(work, "digits"), os.path.join(work, "random_init.pt")
    write_digits(data, image_size=image_size)
    torch.manual_seed(0)
    encoder = Data2Vec2ImageEncoder(EncoderConfig(embed_dim=width, depth=depth, num_heads=heads,
                                                  patch_size=16 if image_size >= 64 else 8, image_size=image_size))
    save_data2vec_checkpoint(encoder, checkpoint, prenet_depth=0)
    here = Runtime(torch.device(device), "bf16" if device == "cuda" else "fp32")
    feats = cached_features(checkpoint, data, ["train", "val"], here, store=os.path.join(work, "store"))
    train, val = feats.splits["train"], feats.splits["val"]
    queries = torch.from_numpy(np.array(val.view([0])[:]))
    classes = len(feats.classes)

    def top1(runtime):
        return {r["k"]: r["top1"] for r in knn.knn_probe(train.view([0]), train.labels, queries, val.labels, classes,
                                                         [10, 20], 0.07, runtime)}

    out = {"device": top1(here), "cpu": top1(Runtime(torch.device("cpu"), "fp32"))}
    chosen = knn.similarity_dtype
    knn.similarity_dtype = lambda _device: torch.float16 if here.device.type == "cuda" else torch.float32
    try:
        out["device_fp16_similarities"] = top1(here)
    finally:
        knn.similarity_dtype = chosen
    out["equal"] = out["device"] == out["cpu"]
    return {"width": width, "depth": depth, "train": len(train.labels), "val": len(val.labels), **out}
