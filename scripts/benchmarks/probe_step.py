"""Probe step (CPU, fp32): the Trainer step of the probe recipes (a frozen encoder) against the
fine-tuning recipe's, the same model and batch (scripts/benchmarks/trainer_step.py builds them)."""
from benchmarks.common import fmt
from benchmarks.trainer_step import probe_steps


def run(batch: int = 8, steps: int = 3) -> dict:
    return probe_steps(batch, steps)


def report(results: dict) -> list:
    p = results["probe_step"]
    base = p["results"]["distilled_imagenet"]["median"]
    lines = ["## Probe step (CPU, fp32): a frozen encoder against fine-tuning", "",
             f"fairseq's Trainer step, batch {p['batch']}, 224 px, base width, depth {p['depth']}, the same weights: "
             "`distilled_imagenet.yaml` (every weight trained) against the probe recipes, whose encoder is frozen "
             "(eval mode, no gradients, outside the optimizer): `linear_probe_imagenet.yaml` (MAE's BatchNorm + "
             "Linear, LARS) and `attentive_probe_imagenet.yaml` (the attentive head, AdamW).", "",
             "| recipe | updates/s | vs fine-tuning |", "|---|---|---|"]
    for name, r in p["results"].items():
        lines.append(f"| {name} | {fmt(r, digits=3)} | {r['median'] / base:.2f}x |")
    return lines + [""]
