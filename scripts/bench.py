"""`make bench`: measure the plugin against data2vec's own fine-tuning path and rewrite BENCHMARKS.md.

Every figure is the median (with min and max) over at least 5 runs, the contenders interleaved
(A, B, A, B, ...), each train-step run in a fresh process so peak memory is that run's alone. The
sections live in scripts/benchmarks/: train step (ours vs data2vec's model, depth 12 and 4), input
pipeline (per worker, real photographs), start-up (indexing 100k files), end to end
(fairseq-hydra-train updates/s).
"""
import argparse
import json
import os
import time

from benchmarks import (end_to_end, evaluation, optimizer_step, pipeline, probe_step, scale, startup, train_step,
                        trainer_step)
from benchmarks.common import REPO, RUNS, machine

SECTIONS = {"startup": startup, "pipeline": pipeline, "train_step": train_step, "optimizer_step": optimizer_step,
            "trainer_step": trainer_step, "probe_step": probe_step, "evaluation": evaluation, "scale": scale,
            "end_to_end": end_to_end}


def write_markdown(results: dict, path: str):
    measured = results.get("measured", {})  # section -> when and where it was last run (a partial rerun)
    lines = ["# Benchmarks", "", f"Measured by `make bench` ({results['date']}) on: {results['machine']}.",
             f"Each figure: median (min–max) over {RUNS} runs, contenders interleaved, the order rotated each run.", ""]
    others = {name: m for name, m in measured.items() if (m["date"], m["machine"]) != (results["date"], results["machine"])}
    if others:
        lines += ["Sections rerun on another day or machine say so under their heading.", ""]
    for name in ("train_step", "trainer_step", "probe_step", "optimizer_step", "pipeline", "startup", "evaluation",
                 "scale", "end_to_end"):
        if name in results:
            section = SECTIONS[name].report(results)
            if name in others:
                section[1:1] = ["", f"*(This section: {others[name]['date']}, on {others[name]['machine']}.)*"]
            lines += section
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
    parser.add_argument("--only", nargs="*", default=list(SECTIONS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.worker and args.worker[0] == "knn_scale":
        _, folder, n, dim, queries, device = args.worker
        print(json.dumps(evaluation.knn_scale_worker(folder, int(n), int(dim), int(queries), device)))
        return
    if args.worker and args.worker[0] == "linear_scale":
        _, folder, n, dim, steps, device = args.worker
        print(json.dumps(scale.linear_scale_worker(folder, int(n), int(dim), int(steps), device)))
        return
    if args.worker and args.worker[0] == "hash":
        print(json.dumps(scale.hash_worker(args.worker[1])))
        return
    if args.worker and args.worker[0] == "train_step_pair":
        _, depth, batch, steps = args.worker
        print(json.dumps(train_step.train_step_pair_worker(int(depth), int(batch), int(steps), warmup=1)))
        return
    if args.worker:
        _, impl, depth, batch, steps = args.worker
        print(json.dumps(train_step.train_step_worker(impl, int(depth), int(batch), int(steps), warmup=1)))
        return
    raw = os.path.join(REPO, "bench_results.json")
    results = {}
    if set(args.only) != set(SECTIONS) and os.path.exists(raw):
        with open(raw) as f:  # a partial rerun keeps the other sections' figures
            results = json.load(f)
    here = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if set(args.only) == set(SECTIONS) or "date" not in results:
        results.update(here)  # the header's: a full run's (a partial one keeps it, and marks its own sections)
    results.setdefault("measured", {})
    measure = {"startup": startup.run, "pipeline": pipeline.run,
               "train_step": lambda: train_step.run(args.batch, args.steps),
               "optimizer_step": optimizer_step.run, "trainer_step": trainer_step.run,
               "probe_step": lambda: probe_step.run(args.batch, args.steps), "evaluation": evaluation.run,
               "scale": scale.run,
               "end_to_end": lambda: end_to_end.run(updates=120)}
    for name in SECTIONS:  # in this order: the slow sections last
        if name in args.only:
            print(f"{name.replace('_', ' ')} ...", flush=True)
            results[name] = measure[name]()
            results["measured"][name] = here
    if "train_step" in args.only:
        results["train_step_batch"] = args.batch
    with open(raw, "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_markdown(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
