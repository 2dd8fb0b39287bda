"""GPU train-step benchmark, prepared for a lent GPU (under 8 minutes on an H100/H200):
ours vs data2vec's own model at batch 256, bf16 and fp16 autocast, depth 12 and 4, 224 px; and
``task.device_decode``'s batch decode + crop resize (TorchCodec nvJPEG) of 500x375 photos on the GPU.

    python scripts/bench_gpu.py [--out bench_gpu.json] [--steps 20]

Prints and writes images/s, peak memory and model FLOP utilisation (training FLOPs = 3 x forward,
forward FLOPs counted from the architecture: 2 x multiply-adds of every matmul and the attention).
Paste the table into BENCHMARKS.md with the hardware named.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks


def reference_module():
    """data2vec's own code with its two shims (d2v_plugin/testing/reference.py)."""
    from d2v_plugin.testing import reference

    return reference


def forward_flops_per_image(depth, dim=768, tokens=197, patches=196, patch=16, mlp=4, classes=1000):
    per_block = 2 * tokens * (3 * dim * dim + dim * dim + 2 * mlp * dim * dim) + 2 * 2 * tokens * tokens * dim
    return 2 * patches * (3 * patch * patch) * dim + depth * per_block + 2 * dim * classes


def build(impl, depth, ref):
    torch.manual_seed(0)
    d2v, cfg = ref.build_data2vec_model(depth=depth - 2, prenet_depth=2)
    if impl == "reference":
        return ref.reference_classifier(d2v, num_classes=1000)
    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier

    path = os.path.join(tempfile.mkdtemp(), "d2v.pt")
    ref.save_like_fairseq(d2v, cfg, path)
    return Data2Vec2ImageClassifier.build_model(Data2Vec2ClassifierConfig(pretrained_checkpoint=path, num_classes=1000))


def measure(model, dtype, batch, steps, warmup=3):
    model = model.cuda().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    soft = torch.softmax(torch.randn(batch, 1000, device="cuda"), -1)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            logits = model(images)
        loss = torch.sum(-soft * F.log_softmax(logits.float(), -1)) / batch
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def measure_device_decode(batch, repeats, device="cuda"):
    """Images/s of decode_crops on the GPU: a batch of 500x375 q90 JPEGs (bench.py's real photographs),
    the crops drawn as the workers draw them."""
    import io
    import sys

    from PIL import Image

    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from benchmarks.pipeline import write_photos
    from d2v_plugin.data.device_batch import decode_crops
    from d2v_plugin.data.transforms import sample_crop

    paths, _ = write_photos(tempfile.mkdtemp(prefix="gpu_photos_"), count=batch)
    jpegs = [open(p, "rb").read() for p in paths]
    g = torch.Generator().manual_seed(0)
    boxes = [sample_crop(*Image.open(io.BytesIO(d)).size, generator=g) for d in jpegs]
    flips = [i % 2 == 0 for i in range(len(jpegs))]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    decode_crops(jpegs, boxes, flips, 224, device)  # warm-up: nvJPEG handles, kernels
    rates = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(5):
            out = decode_crops(jpegs, boxes, flips, 224, device)
        sync()
        rates.append(5 * len(out) / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "batch": len(jpegs)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_gpu.json")
    args = parser.parse_args()
    ref = reference_module()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = []
    for depth in (12, 4):
        for dtype in (torch.bfloat16, torch.float16):
            per = {"reference": [], "ours": []}
            for _ in range(args.repeats):
                for impl in ("reference", "ours"):
                    model = build(impl, depth, ref)
                    per[impl].append(measure(model, dtype, args.batch, args.steps))
                    del model
                    torch.cuda.empty_cache()
            for impl, runs in per.items():
                ips = statistics.median(r[0] for r in runs)
                flops = 3 * forward_flops_per_image(depth) * ips / 1e12
                rows.append({"depth": depth, "dtype": str(dtype).split(".")[-1], "impl": impl, "images_per_s": ips,
                             "min": min(r[0] for r in runs), "max": max(r[0] for r in runs),
                             "peak_gib": max(r[1] for r in runs), "tflops": flops,
                             "mfu": flops / peak if peak else None})
                print(json.dumps(rows[-1]), flush=True)
    decode = measure_device_decode(args.batch, args.repeats)
    print(json.dumps({"device_decode": decode}), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "batch": args.batch, "rows": rows,
                   "device_decode": decode}, f, indent=1)


if __name__ == "__main__":
    main()
