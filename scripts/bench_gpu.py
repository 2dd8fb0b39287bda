"""GPU benchmark of the step users run, prepared for a lent GPU (under 8 minutes on one H100/H200).

    python scripts/bench_gpu.py --out DIR            # on a GPU
    python scripts/bench_gpu.py --dry-run --out DIR  # the same code on the CPU, tiny sizes (the test suite)

fairseq's Trainer.train_step built as fairseq-hydra-train builds it (scripts/benchmarks/trainer_step.py):
ours from distilled_imagenet.yaml (depth 4) and d2v2_base_imagenet.yaml (depth 12) against data2vec's own
mae_image_classification from its recipe, in fp16 and bf16, at batch 32 and 256 per GPU, the same weights.
One line per figure: images/s, the optimizer step's share of the update, model FLOP utilisation against
the GPU's dense fp16/bf16 peak (training FLOPs = 3 x forward; forward = 2 x multiply-adds of every matmul
and the attention). Then: fairseq's adam against fused_adamw in ours (depth 4, bf16, batch 32, where the
step is short and kernel launches count), host synchronisations in our step beyond fairseq's own
(torch.cuda.set_sync_debug_mode), and task.device_decode on real encoded JPEG batches: the training step
with no decode, with the decode prefetched one batch ahead (what training runs) and decoded inline, and
the share of the decode's cost the prefetching hides. Then the probe recipes' step (a frozen encoder)
against fine-tuning, cli.evaluate's loop and the feature extraction in bf16 at batch 256, and kNN of 50,000
queries over 1.28M x 768 synthetic fp16 features, and kNN on the GPU against the CPU on one store of a
random-init base-width encoder (equal top-1: the similarities are fp32 on both). Writes DIR/bench_gpu.json; paste the figures into
BENCHMARKS.md with the hardware named.
"""
import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

# dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity), by the name torch reports
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.1), ("A10", 125.0)]


def peak_tflops(name: str):
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


def forward_flops_per_image(depth, dim=768, image_size=224, patch=16, mlp=4, classes=1000):
    tokens = (image_size // patch) ** 2 + 1
    per_block = 2 * tokens * (3 * dim * dim + dim * dim + 2 * mlp * dim * dim) + 2 * 2 * tokens * tokens * dim
    return 2 * (tokens - 1) * (3 * patch * patch) * dim + depth * per_block + 2 * dim * classes


def host_syncs_in_our_code(trainer, sample) -> dict:
    """Host synchronisations during one of our train steps, by where they come from: torch warns on each
    (set_sync_debug_mode), attributed to the Python line that asked for it (the plugin's, or fairseq's).
    ``sample`` is a batch as the training step receives it with task.device_decode: prefetched, already
    on the device. TorchCodec's own waits (its CUDA decode synchronises before it returns) happen in the
    prefetch thread and are invisible to this count either way: the overlap below measures them."""
    counts = {"d2v_plugin": 0, "other": 0}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step([dict(sample, net_input=dict(sample["net_input"]))])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            counts["d2v_plugin" if "d2v_plugin" in (w.filename or "") else "other"] += 1
    return counts


def encoded_batches(batch: int, count: int, image_size: int):
    """``count`` training batches of real photographs (make bench's 500x375 q90 JPEGs) as the
    data-loading workers hand them over with task.device_decode: JPEG bytes, crop boxes and flips."""
    from benchmarks.pipeline import write_photos
    from d2v_plugin.data import ImageFolderDataset, index_split
    from d2v_plugin.data.transforms import RandomResizedCropFlip

    root = tempfile.mkdtemp(prefix="gpu_photos_")
    write_photos(root, count=batch * count)
    index = index_split(root, "train", cache_dir=os.path.join(root, "cache"))
    ds = ImageFolderDataset(index, RandomResizedCropFlip(image_size), device_decode=True, seed=1)
    samples = [ds[i] for i in range(len(ds))]
    return [ds.collater(samples[k:k + batch]) for k in range(0, len(samples), batch)]


def pinned(sample):
    return {k: pinned(v) if isinstance(v, dict) else v.pin_memory() if torch.is_tensor(v) and torch.cuda.is_available()
            else v for k, v in sample.items()}


def measure_device_decode(trainer, task, batches, device, rounds: int) -> dict:
    """The training step with task.device_decode, per update, against the same step on batches already
    decoded on the device (the cost without any decode): through the DevicePrefetcher (batch k + 1
    decoded while batch k trains, what training runs) and decoded inline at the start of the step (no
    overlap). overlap = the share of the inline decode's cost the prefetcher hides. Also the decode
    alone (decode_crops) in images/s."""
    import copy

    from d2v_plugin.data.device_batch import DevicePrefetcher, decode_crops, to_device

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dev = torch.device(device)

    def fresh():
        return [pinned(copy.deepcopy(b)) for b in batches]

    decoded = [task.decode_on_device(to_device(b, dev)) for b in fresh()]

    def timed(samples) -> float:
        sync()
        start = time.perf_counter()
        n = 0
        for sample in samples:
            trainer.train_step([sample])
            n += 1
        sync()
        return (time.perf_counter() - start) / n

    def inline(samples):
        for b in samples:
            yield to_device(b, dev)  # decoded by the training step itself (task.model_input)

    timed([dict(b, net_input=dict(b["net_input"])) for b in decoded[:1]])  # warm-up, nvJPEG handles
    per = {"no decode": [], "prefetched decode": [], "inline decode": []}
    for _ in range(rounds):
        per["no decode"].append(timed([dict(b, net_input=dict(b["net_input"])) for b in decoded]))
        per["prefetched decode"].append(timed(DevicePrefetcher(iter(fresh()), task.decode_on_device, dev)))
        per["inline decode"].append(timed(inline(fresh())))
    step = {k: statistics.median(v) for k, v in per.items()}
    hidden = step["inline decode"] - step["prefetched decode"]
    cost = step["inline decode"] - step["no decode"]
    first = batches[0]["encoded"]
    rates = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        out = decode_crops(first["jpegs"], first["boxes"], first["flips"], task.cfg.image_size, device)
        sync()
        rates.append(len(out) / (time.perf_counter() - start))
    return {"step_s": step, "decode_cost_s": cost, "overlap": hidden / cost if cost > 0 else None,
            "decode_images_per_s": statistics.median(rates), "batch": len(first["jpegs"]),
            "prefetched_sample": decoded[0]}


def host_to_device_copy(batch: int, image_size: int, device: str, repeats: int) -> dict:
    """Seconds to copy one batch to the device from pinned memory: ours as uint8 pixels (normalised on
    the device), data2vec's as float32 (normalised in its workers): the saving of staging uint8."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for name, dtype in (("uint8 (ours)", torch.uint8), ("float32 (data2vec)", torch.float32)):
        host = torch.zeros(batch, 3, image_size, image_size, dtype=dtype)
        host = host.pin_memory() if device == "cuda" else host
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            host.to(device, non_blocking=True)
            sync()
            times.append(time.perf_counter() - start)
        out[name] = {"s": statistics.median(times), "mb": host.numel() * host.element_size() / 1e6}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for bench_gpu.json")
    parser.add_argument("--steps", type=int, default=8, help="timed updates per figure (after one warm-up)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32/bf16, tiny model: checks the script runs")
    args = parser.parse_args(argv)

    import d2v_plugin

    d2v_plugin.register()
    from benchmarks import trainer_step

    if args.dry_run:
        device, name, sizes = "cpu", "cpu (dry run)", dict(width=64, heads=4, image_size=32)
        grid = [("bf16", 2, 4)]  # the half-precision path: FP16 optimizer, fp32 masters
        steps = 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --dry-run")
        device, name, sizes = "cuda", torch.cuda.get_device_name(), {}
        grid = [(p, d, b) for p in ("bf16", "fp16") for d in (4, 12) for b in (32, 256)]
        steps = args.steps
    peak = peak_tflops(name) if device == "cuda" else None
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for precision, depth, batch in grid:
        result = trainer_step.compare(depth, batch, precision, device, steps, **sizes)
        flops_per_image = 3 * forward_flops_per_image(depth, sizes.get("width", 768), sizes.get("image_size", 224),
                                                      patch=16 if sizes.get("image_size", 224) >= 64 else 8)
        for impl, r in result.items():
            ips = r["updates_per_s"] * batch
            tflops = flops_per_image * ips / 1e12
            rows.append({"precision": precision, "depth": depth, "batch": batch, "impl": impl, "images_per_s": ips,
                         "optimizer_share": r["optimizer_share"], "tflops": tflops,
                         "mfu": tflops / peak if peak else None})
            print(json.dumps(rows[-1]), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()

    # fairseq's adam against fused_adamw, in ours, where the step is shortest
    work = tempfile.mkdtemp(prefix="bench_gpu_")
    depth, batch, precision = (2, 4, "bf16") if args.dry_run else (4, 32, "bf16")
    checkpoint = trainer_step.data2vec_checkpoint(work, depth, sizes.get("width", 768), sizes.get("heads", 12),
                                                  sizes.get("image_size", 224),
                                                  patch=16 if sizes.get("image_size", 224) >= 64 else 8)
    optimizers = {}
    for optimizer in ("adam", "fused_adamw"):
        trainer, sample = trainer_step.build_ours(checkpoint, batch, precision, device, optimizer=optimizer,
                                                  image_size=sizes.get("image_size", 224))
        optimizers[optimizer] = trainer_step.time_updates(trainer, sample, steps)
        print(json.dumps({"optimizer": optimizer, "depth": depth, "batch": batch, "precision": precision,
                          **optimizers[optimizer]}), flush=True)
    copies = host_to_device_copy(4 if args.dry_run else 256, sizes.get("image_size", 224), device,
                               1 if args.dry_run else 5)
    print(json.dumps({"host_to_device_copy": copies}), flush=True)
    # task.device_decode on real encoded JPEG batches, through the prefetching path training uses
    batch = 4 if args.dry_run else 256
    trainer, _ = trainer_step.build_ours(checkpoint, batch, precision, device, image_size=sizes.get("image_size", 224))
    batches = encoded_batches(batch, 2 if args.dry_run else 4, sizes.get("image_size", 224))
    decode = measure_device_decode(trainer, trainer.task, batches, device, 1 if args.dry_run else 3)
    prefetched = decode.pop("prefetched_sample")
    print(json.dumps({"device_decode": decode}), flush=True)
    syncs = host_syncs_in_our_code(trainer, prefetched) if device == "cuda" else None
    print(json.dumps({"host_syncs": syncs}), flush=True)
    # probes: the Trainer step of the probe recipes (a frozen encoder) against fine-tuning, same model and batch
    probes = trainer_step.probe_steps(4 if args.dry_run else 256, steps, device, precision,
                                      depth=2 if args.dry_run else 12, rounds=1 if args.dry_run else 3, **sizes)
    print(json.dumps({"probe_step": probes}), flush=True)
    # evaluation: cli.evaluate's loop and the feature extraction in bf16 at batch 256 (16 data-loading
    # workers), and kNN over ImageNet-sized synthetic features on the GPU
    from benchmarks import evaluation

    eval_root = os.path.join(work, "photos")
    model = evaluation._setup(eval_root, count=8 if args.dry_run else 2048, depth=2 if args.dry_run else 12,
                              width=sizes.get("width", 768), heads=sizes.get("heads", 12))
    evaluate = evaluation.evaluate_rates(eval_root, model, device, "bf16", batch=4 if args.dry_run else 256,
                                         workers=1 if args.dry_run else 16, rounds=1 if args.dry_run else 3)
    print(json.dumps({"evaluate": evaluate}), flush=True)
    knn = evaluation.knn_scale(os.path.join(work, "knn"), n=5000 if args.dry_run else evaluation.IMAGENET_TRAIN,
                               dim=32 if args.dry_run else 768, queries=100 if args.dry_run else 50_000,
                               device=device, sklearn_subset=2000 if args.dry_run else 100_000,
                               sklearn_queries=50 if args.dry_run else 2_000)
    print(json.dumps({"knn_scale": knn}), flush=True)
    # kNN's similarities in fp32 on the GPU: the CPU's top-1 exactly, on a random-init base-width encoder's store
    knn_fp32 = evaluation.knn_precision(os.path.join(work, "knn_precision"), device,
                                        **(dict(width=64, depth=2, image_size=32, heads=4) if args.dry_run else {}))
    print(json.dumps({"knn_precision": knn_fp32}), flush=True)
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "peak_tflops": peak, "rows": rows,
                   "optimizers": optimizers, "host_syncs": syncs, "device_decode": decode,
                   "host_to_device_copy": copies, "probe_step": probes, "evaluate": evaluate, "knn_scale": knn,
                   "knn_precision": knn_fp32},
                  f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
