"""The probes at ImageNet's size on this machine: the linear probe over 1,281,167 x 768 fp16 synthetic
features in a memory-mapped store (the grid of 26 heads at batch 1,024 and 1,000 classes), its peak memory
in a process of its own and its time: a few of its steps timed and the schedule's 12,520 steps reckoned
from them, the held-out and val scoring timed whole. (kNN at that size: the evaluation section.)"""
import os
import time

import numpy as np

from benchmarks.common import run_worker
from benchmarks.evaluation import IMAGENET_TRAIN, PeakMemory, synthetic_store

IMAGENET_VAL = 50_000


def linear_scale_worker(folder: str, n: int, dim: int, steps: int, device: str) -> dict:
    """In a process of its own: the linear probe's path (rows read from the store a batch at a time, the
    held-out 10% and val scored in blocks) with ``steps`` training steps; time per part and peak memory."""
    import torch

    from d2v_plugin.evaluation import linear
    from d2v_plugin.evaluation.runtime import Runtime

    features = np.memmap(os.path.join(folder, "features.bin"), dtype=np.float16, mode="r", shape=(n, 1, dim))
    labels = np.array(np.memmap(os.path.join(folder, "labels.bin"), dtype=np.int64, mode="r", shape=(n,)))

    class View:  # the store's view: rows read on demand
        def __getitem__(self, rows):
            return features[rows][:, 0, :]

    runtime = Runtime(torch.device(device), "fp32")
    settings = linear.LinearSettings()
    full_steps = linear.steps_of(int(n * (1 - settings.held_out)), settings)[0]
    fit, held = linear.held_out_split(labels, settings.held_out, settings.seed)
    with PeakMemory() as memory:
        start = time.perf_counter()
        norm, w, b, _ = linear.train_heads(View(), labels, fit, 1000, linear.LinearSettings(epochs=0, min_steps=steps),
                                           runtime)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        linear.score_heads(norm, w, b, View(), labels, held, runtime)
        held_s = time.perf_counter() - start
        val = np.arange(min(IMAGENET_VAL, n))  # (the first rows stand in for val: the same cost)
        start = time.perf_counter()
        linear.score_heads(norm, w, b, View(), labels, val, runtime)
        val_s = time.perf_counter() - start
    return {"train_rows": n, "dim": dim, "heads": len(settings.lrs) * len(settings.weight_decays),
            "steps_timed": steps, "step_s": train_s / steps, "schedule_steps": full_steps,
            "schedule_s": train_s / steps * full_steps, "held_out_rows": len(held), "held_out_s": held_s,
            "val_rows": len(val), "val_s": val_s, **memory.figures(), "store_mib": n * dim * 2 / 2**20}


def hash_worker(path: str) -> dict:
    """In a process of its own (its memory cache empty): the checkpoint's SHA-256 as every result records it."""
    from d2v_plugin.evaluation.provenance import sha256

    start = time.perf_counter()
    digest = sha256(path)
    return {"seconds": time.perf_counter() - start, "sha256": digest}


def hash_timing(work: str, megabytes: int = 330) -> dict:
    """A result's checkpoint hash for a file of ``megabytes`` (a base checkpoint's size): the first command that
    meets it hashes it; a rerun on the unchanged file reads the hash cache (path, size, modification time)."""
    path = os.path.join(work, "checkpoint.pt")
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(2**20))
    cache = os.path.join(work, "cache")
    os.environ["XDG_CACHE_HOME"] = cache  # the workers' (inherited), not the user's
    first, rerun = run_worker("hash", path), run_worker("hash", path)
    assert first["sha256"] == rerun["sha256"]
    return {"megabytes": megabytes, "first_s": first["seconds"], "rerun_s": rerun["seconds"]}


def inside_costs(images: int = 10_000, dim: int = 768, blocks: int = 12) -> dict:
    """Seconds of RankMe and alpha-ReQ on one block's cached features, and of a blocks x blocks linear CKA
    (minibatches of 256), over ``images`` cached images (random features: the cost, not the values)."""
    import torch

    from d2v_plugin.evaluation import spectrum
    from d2v_plugin.evaluation.runtime import Runtime
    from d2v_plugin.evaluation.similarity import cka_of_views

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((images, dim), dtype=np.float32).astype(np.float16) for _ in range(blocks)]
    out = {"images": images, "dim": dim, "blocks": blocks}
    start = time.perf_counter()
    spectrum.rankme(np.asarray(feats[-1], dtype=np.float64))
    out["rankme_s"] = time.perf_counter() - start
    start = time.perf_counter()
    spectrum.alpha_req(np.asarray(feats[-1], dtype=np.float64))
    out["alphareq_s"] = time.perf_counter() - start
    start = time.perf_counter()
    cka_of_views(feats, feats, np.arange(images), Runtime(torch.device("cpu"), "fp32"))
    out["cka_s"] = time.perf_counter() - start
    return out


def run(work: str | None = None, n: int = IMAGENET_TRAIN, dim: int = 768, steps: int = 10, hash_mb: int = 330,
        inside_images: int = 10_000) -> dict:
    import tempfile

    work = work or tempfile.mkdtemp(prefix="bench_scale_")
    synthetic_store(work, n, dim)
    return {"linear": run_worker("linear_scale", work, n, dim, steps, "cpu"), "hash": hash_timing(work, hash_mb),
            "inside": inside_costs(inside_images, dim)}


def report(results: dict) -> list:
    s = results["scale"]["linear"]
    hours = (s["schedule_s"] + s["held_out_s"] + s["val_s"]) / 3600
    return ["## The linear probe at ImageNet's size (CPU, fp32)", "",
            f"`probe --probes linear` with its defaults over {s['train_rows']:,} x {s['dim']} fp16 synthetic features "
            f"in a memory-mapped store ({s['store_mib'] / 1024:.1f} GiB on disk), 1,000 classes, the grid's "
            f"{s['heads']} heads trained at once at batch 1,024, in a process of its own on this machine. Peak "
            f"memory {s['peak_rss_mib']:.0f} MiB (the process's max RSS)"
            + (f": at its peak {s['peak_allocated_mib']:.0f} MiB allocated and {s['peak_file_pages_mib']:.0f} MiB "
               "of file pages, most of them the store's pages read so far, which the kernel can drop"
               if s.get("peak_allocated_mib") else "")
            + ". The rows are read a batch at a time and scored in blocks of bounded logits, never the split whole, "
            "and no second copy of the rows fitted on is made (the probe held both: about 3.8 GB of allocated "
            "memory at this size, 19 GB with `last4`).", "",
            "| part | seconds |", "|---|---|",
            f"| one training step (26 heads x 1,024 rows x 1,000 classes), the mean of {s['steps_timed']} | "
            f"{s['step_s']:.2f} |",
            f"| the schedule's {s['schedule_steps']:,} steps, reckoned | {s['schedule_s']:,.0f} |",
            f"| scoring the {s['held_out_rows']:,} held-out rows (every head) | {s['held_out_s']:.0f} |",
            f"| scoring {s['val_rows']:,} val rows (every head) | {s['val_s']:.0f} |", "",
            f"In all about {hours:.1f} hours on this 2-core CPU: a GPU's job (one H100-class GPU does the "
            "schedule's ~1.5 PFLOP in minutes); on several ranks each trains its share of the heads.", ""] + (
            hash_report(results["scale"]["hash"]) if "hash" in results["scale"] else []) + (
            inside_report(results["scale"]["inside"], results) if "inside" in results["scale"] else [])


def inside_report(c: dict, results: dict) -> list:
    extraction = ((results.get("evaluation") or {}).get("evaluate") or {}).get("results", {}).get("feature extraction")
    reuse = (f" The extraction they reuse runs at {extraction['median']:.1f} images/s here (the evaluation section: a "
             f"4-block base-width encoder at 224 px), {c['images'] / extraction['median']:.0f} s for these images."
             if extraction else "")
    return ["### Looking inside a student", "",
            f"Over {c['images']:,} cached images of {c['dim']} dims (the store's fp16 rows), on this CPU: RankMe of one "
            f"block {c['rankme_s']:.2f} s, alpha-ReQ {c['alphareq_s']:.2f} s, and a {c['blocks']} x {c['blocks']} "
            f"linear CKA (minibatches of 256, every pair of blocks) {c['cka_s']:.1f} s." + reuse, ""]


def hash_report(h: dict) -> list:
    return ["### The checkpoint's hash in every result", "",
            f"Every result records its checkpoint's SHA-256 (evaluation/provenance.py). For a {h['megabytes']} MB "
            f"file (a base checkpoint's size, in the page cache): the first command that meets it hashes it in "
            f"{h['first_s']:.2f} s; a "
            f"rerun on the unchanged file reads the hash cache (keyed by path, size and modification time) in "
            f"{h['rerun_s'] * 1000:.1f} ms. Each in a process of its own.", ""]
