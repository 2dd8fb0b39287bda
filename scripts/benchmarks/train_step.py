"""Train step: ours vs data2vec's own model, same weights, forward + soft-target CE + backward + AdamW."""
import os
import resource
import statistics
import tempfile
import time

from benchmarks.common import RUNS, fmt, reference_module, rotated, run_worker, summary


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


def run(batch: int, steps: int):
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


def report(results: dict) -> list:
    b = results["train_step_batch"]
    lines = ["## Train step (CPU, fp32)", "",
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
    return lines
