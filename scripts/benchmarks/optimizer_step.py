"""Optimizer step: fairseq's adam against the plugin's fused_adamw, the same parameters (the distilled
student's, base width, 4 blocks) and the same gradients, under the distilled recipe's composite groups."""
import time

import torch

from benchmarks.common import RUNS, fmt, rotated, summary

NAMES = ("adam", "fused_adamw")


def step_seconds(name: str, params, steps: int = 5, warmup: int = 2) -> float:
    import statistics

    from fairseq.optim import build_optimizer

    from d2v_plugin.testing.recipes import resolve

    cfg = resolve("distilled_imagenet", f"optimizer.groups.default.optimizer._name={name}")
    optimizer = build_optimizer(cfg.optimizer, params)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def run(depth: int = 4) -> dict:
    from d2v_plugin.models.classifier import Data2Vec2ClassifierConfig, Data2Vec2ImageClassifier

    torch.manual_seed(0)
    model = Data2Vec2ImageClassifier.build_model(Data2Vec2ClassifierConfig(num_classes=1000, depth=depth))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    per = {name: [] for name in NAMES}
    for r in range(RUNS):
        for name in rotated(NAMES, r):
            per[name].append(step_seconds(name, params) * 1000)
    return {"parameters": sum(p.numel() for p in params), **{k: summary(v) for k, v in per.items()}}


def report(results: dict) -> list:
    o = results["optimizer_step"]
    speedup = o["adam"]["median"] / o["fused_adamw"]["median"]
    return ["## Optimizer step (CPU)", "",
            f"One step of fairseq's composite optimizer over the distilled student's {o['parameters']:,} trainable "
            "parameters (base width, 4 blocks, 1000 classes), the recipe's two groups, the same gradients: each "
            "group's optimizer fairseq's `adam` (its Python Adam: several kernels per tensor; apex is not "
            "installed) or the plugin's `fused_adamw` (the same update, torch's fused kernel, tested within 1e-6 "
            "of fairseq's after several updates).", "",
            "| optimizer | ms per step | vs adam |", "|---|---|---|",
            f"| adam | {fmt(o['adam'])} | 1.00x |",
            f"| fused_adamw | {fmt(o['fused_adamw'])} | {speedup:.2f}x faster |", ""]
