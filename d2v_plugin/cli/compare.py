"""Compare fine-tuning runs side by side, accuracy against cost: PNG plots and a markdown report.

    python -m d2v_plugin.cli.compare RUN_DIR [RUN_DIR ...] --out REPORT_DIR [--labels A B ...]
        [--batch-size 64] [--device auto] [--precision bf16] [--no-speed]

RUN_DIR is a run's checkpoint.save_dir (the recipes keep hydra's log, hydra/hydra_train.log, there) or
any folder holding fairseq log files (*.log), in fairseq's json or simple format. From the logs: best
top-1 / top-5 and the update they were reached at, training wall-clock and images/s. From the run's
checkpoint (checkpoint_best.pt, else checkpoint_last.pt): encoder parameters, GFLOPs per image
(torch.utils.flop_counter: 2 x multiply-adds; papers quoting 17.6 for ViT-B/16 count multiply-adds)
and inference images/s at --batch-size on --device in --precision, measured as `make bench` measures
(a warm-up, then rounds in which every model runs, the order rotated; the median and the spread are
shown; --no-speed skips it). Writes top1_vs_time.png (validation top-1 against training time: the
accuracy/cost picture), val_top1.png (per epoch), train_loss.png and lr.png (per update), and
report.md, whose table puts every run beside the largest one.
"""
import glob
import json
import os
import re
import sys
import time

from d2v_plugin.cli.common import (add_runtime_arguments, fail_cleanly, load_heavy, make_parser, positive_int, preflight,
                                   start_runtime)

LINE = re.compile(r"\]\[(?P<tag>[^\]]+)\]\[INFO\] - (?P<body>.*)$")
PARAMS = re.compile(r"num\. shared model params: ([\d,]+) \(num\. trained: ([\d,]+)\)")
SIMPLE_INNER = re.compile(r"^epoch (\d+):\s+(\d+) / (\d+) (.*)$")


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _parse_body(tag: str, body: str):
    """One fairseq progress record as a flat dict of numbers, or None if the line is not one."""
    if body.startswith("{"):
        try:
            record = json.loads(body)
        except ValueError:
            return None
    elif (m := SIMPLE_INNER.match(body)) is not None:  # simple train_inner: k=v, k=v
        record = {"epoch": m.group(1)}
        for part in m.group(4).split(", "):
            if "=" in part:
                key, value = part.split("=", 1)
                record[key.strip()] = value
    elif body.startswith("epoch ") and " | " in body:  # simple epoch summary: k v | k v
        parts = body.split(" | ")
        record = {"epoch": parts[0].split()[1]}
        for part in parts[1:]:
            bits = part.rsplit(" ", 1)
            if len(bits) == 2 and not part.startswith("valid on"):
                record[bits[0]] = bits[1]
    else:
        return None
    prefix = f"{tag}_"
    return {(k[len(prefix):] if k.startswith(prefix) else k): _number(v) for k, v in record.items()}


def read_run(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    logs = sorted(glob.glob(os.path.join(run_dir, "**", "*.log"), recursive=True))
    inner, epochs, valid, params = {}, {}, {}, None
    for path in logs:
        with open(path, errors="replace") as f:
            for line in f:
                if (m := PARAMS.search(line)) is not None:
                    params = int(m.group(2).replace(",", ""))
                    continue
                if (m := LINE.search(line.rstrip("\n"))) is None:
                    continue
                tag = m.group("tag")
                record = _parse_body(tag, m.group("body"))
                if record is None or "epoch" not in record:
                    continue
                # a resumed run logs some updates again: the later record wins
                if tag == "train_inner" and "num_updates" in record:
                    inner[record["num_updates"]] = record
                elif tag == "train":
                    epochs[record["epoch"]] = record
                elif "accuracy" in record:  # validation: end of epoch, or mid-epoch at a save
                    valid[record.get("num_updates", record["epoch"])] = record
    if not (inner or epochs or valid):
        raise ValueError(f"{run_dir}: no fairseq training log found (looked for progress records in "
                         f"{len(logs)} *.log file(s) under it)")
    return {"dir": run_dir, "params": params, "inner": [inner[k] for k in sorted(inner)],
            "epochs": [epochs[k] for k in sorted(epochs)], "valid": [valid[k] for k in sorted(valid)]}


def summarise(run: dict) -> dict:
    valid, epochs, inner = run["valid"], run["epochs"], run["inner"]
    best1 = max(valid, key=lambda r: r["accuracy"]) if valid else None
    best5 = max((r for r in valid if "top5" in r), key=lambda r: r["top5"], default=None)
    updates = max([r.get("num_updates", 0) for r in epochs + inner + valid] or [0])
    wall = max([r.get("wall", 0) for r in epochs + inner] or [0])
    speeds = [r["wps"] for r in epochs if isinstance(r.get("wps"), float)]

    def at(record, key):
        return None if record is None or record.get(key) is None else int(record[key])

    return {
        "params": run["params"],
        "top1": best1["accuracy"] if best1 else None, "top1_epoch": at(best1, "epoch"),
        "top1_update": at(best1, "num_updates"),
        "top5": best5["top5"] if best5 else None, "top5_epoch": at(best5, "epoch"),
        "top5_update": at(best5, "num_updates"),
        "updates": int(updates), "wall_s": wall, "images_per_s": sum(speeds) / len(speeds) if speeds else None,
    }


def run_checkpoint(run_dir: str):
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return path
    return None


def flops_per_image(model) -> int:
    """FLOPs of one forward pass of one image (2 per multiply-add), torch's own flop counter. Attention
    is counted through its math kernel: the counter has no formula for the CPU's fused kernel, and
    would leave attention out on the CPU only."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = model.data_cfg.image_size
    images = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def inference_speeds(models: dict, runtime, batch_size: int = 64, rounds: int = 5, batches: int = 3) -> dict:
    """Images/s of each model's forward pass at ``batch_size`` on the runtime's device and precision,
    measured as ``make bench`` measures: one warm-up batch each, then ``rounds`` rounds in which every model
    runs ``batches`` batches, the order rotated each round (so drift hits all alike); label -> {median,
    min, max} over the rounds."""
    import statistics

    import torch

    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    inputs = {}
    for label, model in models.items():
        size = model.data_cfg.image_size
        inputs[label] = torch.randn(batch_size, 3, size, size, device=runtime.device)
        models[label] = model.to(runtime.device).eval()
    rates = {label: [] for label in models}
    labels = list(models)
    with torch.no_grad(), runtime.autocast():
        for label in labels:
            models[label](inputs[label])  # warm-up
        for r in range(rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                sync()
                start = time.perf_counter()
                for _ in range(batches):
                    models[label](inputs[label])
                sync()
                rates[label].append(batch_size * batches / (time.perf_counter() - start))
    return {label: {"median": statistics.median(v), "min": min(v), "max": max(v)} for label, v in rates.items()}


def run_kind(ckpt) -> str:
    """What a run trained: a fine-tuned classifier, a probe of a frozen encoder (linear / attentive), or
    no classifier at all (a pretraining run)."""
    if ckpt.head is None:
        return "pretraining"
    if not ckpt.model_cfg.get("freeze_encoder"):
        return "fine-tune"
    return "attentive probe" if ckpt.model_cfg.get("head") == "attentive" else "linear probe"


def model_costs(run_dir: str) -> tuple[dict, object]:
    """(the run's kind, encoder parameters and GFLOPs per image of its model (the encoder alone for a
    pretraining run), the model) or Nones."""
    from d2v_plugin.inference import classifier_from_checkpoint, load_encoder
    from d2v_plugin.models.checkpoints import read_checkpoint

    path = run_checkpoint(run_dir)
    if path is None:
        return {"checkpoint": None, "encoder_params": None, "gflops": None, "kind": None}, None
    ckpt = read_checkpoint(path)
    kind = run_kind(ckpt)
    if ckpt.head is None:
        model, data_cfg, _ = load_encoder(path)
        model.data_cfg = data_cfg
        encoder = model
    else:
        model = classifier_from_checkpoint(ckpt)
        encoder = model.encoder
    return {"checkpoint": path, "kind": kind, "encoder_params": sum(p.numel() for p in encoder.parameters()),
            "gflops": flops_per_image(model) / 1e9}, model


def _top1_over_time(run):
    """(training hours, validation top-1) per validation: the time of the last logged update at or
    before it (fairseq's train / train_inner records carry the wall-clock)."""
    clock = sorted((r["num_updates"], r["wall"]) for r in run["inner"] + run["epochs"]
                   if "num_updates" in r and "wall" in r)
    ends = {int(r["epoch"]): r.get("num_updates") for r in run["epochs"]}
    points = []
    for v in run["valid"]:
        upd = v.get("num_updates", ends.get(int(v["epoch"])))
        walls = [w for u, w in clock if upd is not None and u <= upd]
        if walls:
            points.append((walls[-1] / 3600.0, v["accuracy"]))
    return points


def _lr(record):
    if "lr" in record:
        return record["lr"]
    group = next((k for k in record if k.startswith("lr_")), None)  # composite optimizer: lr_<group>
    return record.get("lr_default", record.get(group)) if group else None


def _epoch_axis(run):
    """Validation points at fractional epochs: mid-epoch validations (fairseq validates when it saves
    every N updates) fall between the epoch ends."""
    ends = {int(r["epoch"]): r["num_updates"] for r in run["epochs"] if "num_updates" in r}
    points = []
    for v in run["valid"]:
        epoch, upd = int(v["epoch"]), v.get("num_updates")
        start, end = ends.get(epoch - 1, 0 if epoch == 1 else None), ends.get(epoch)
        if upd is not None and start is not None and end and end > start:
            points.append((epoch - 1 + (upd - start) / (end - start), v["accuracy"]))
        else:
            points.append((epoch, v["accuracy"]))
    return points


def plot(runs, labels, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "top1_vs_time.png": ("validation top-1 (%)", "training time (hours)", _top1_over_time),
        "val_top1.png": ("validation top-1 (%)", "epoch", _epoch_axis),
        "train_loss.png": ("training loss (nats)", "update",
                           lambda r: [(v["num_updates"], v["loss"]) for v in r["inner"] if "loss" in v]),
        "lr.png": ("learning rate", "update",
                   lambda r: [(v["num_updates"], _lr(v)) for v in r["inner"] if _lr(v) is not None]),
    }
    written = []
    for name, (ylabel, xlabel, points) in figures.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for run, label in zip(runs, labels):
            pts = points(run)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if name.endswith("top1.png") or "time" in name else None, markersize=3,
                        label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a pretraining run has no validation top-1 to draw)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def read_results(run_dir: str) -> list[dict]:
    """The results the commands wrote beside a run (``evaluate --out``, ``knn --out``, ``probe --out``:
    JSON Lines in the run's folder), and its tracked pretraining probes (``track.jsonl``)."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "*.jsonl"))):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and ("command" in record or os.path.basename(path) == "track.jsonl"):
                    out.append({**record, "source": os.path.basename(path)})
    return out


def result_columns(results: list[dict]) -> dict:
    """column name -> top-1 (fraction) of a run's results, the newest of each kind: evaluations per
    split and benchmark, kNN per k, the linear probe, few-shot per shot count (block sweeps left out)."""
    columns = {}
    for r in results:
        if r.get("source") == "track.jsonl" or r.get("block") is not None or r.get("top1") is None:
            continue
        if r.get("command") == "evaluate":
            name = f"{r.get('benchmark') or r.get('split', 'val')} top-1"
        elif r.get("probe") == "knn":
            name = f"kNN k={r['k']} top-1"
        elif r.get("probe") == "linear":
            name = "linear probe top-1"
        elif r.get("probe") == "fewshot":
            name = f"{r['shots']}-shot top-1"
        else:
            continue
        columns[name] = r["top1"]
    return columns


def write_results_table(results_by_run: dict) -> list[str]:
    """The cheap measures and other sets beside each run's fine-tuned top-1 (as fractions, as the commands
    print them)."""
    columns = {label: result_columns(r) for label, r in results_by_run.items()}
    names = sorted({n for c in columns.values() for n in c}, key=lambda n: (not n.startswith("val"), n))
    if not names:
        return []
    lines = ["## Probes and other sets", "",
             "What `evaluate --out`, `knn --out` and `probe --out` wrote beside each run (top-1 as fractions of "
             "the images counted; the newest result of each kind).", "",
             "| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, c in columns.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(c.get(n), ".4f") for n in names) + " |")
    return lines + [""]


def plot_tracks(results_by_run: dict, out_dir: str) -> str | None:
    """Tracked pretraining runs side by side: top-1 against the update, one line per run and probe."""
    series = {}
    for label, results in results_by_run.items():
        for r in results:
            if r.get("source") != "track.jsonl" or r.get("update") is None or r.get("top1") is None:
                continue
            probe = r["probe"] + (f" k={r['k']}" if r.get("k") else "")
            series.setdefault(f"{label}: {probe}", []).append((r["update"], 100 * r["top1"]))
    if not series:
        return None
    from d2v_plugin.evaluation.tracking import plot_top1_vs_update

    return plot_top1_vs_update(os.path.join(out_dir, "tracks_top1_vs_update.png"), series, legend_size=7)


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def _ratio(value, reference, spec=".2f"):
    return "n/a" if value is None or not reference else format(value / reference, spec)


def _speed(s) -> str:
    if s.get("infer_images_per_s") is None:
        return "n/a"
    return f"{s['infer_images_per_s']:.1f} ({s['infer_min']:.1f}–{s['infer_max']:.1f})"


def write_report(summaries, labels, out_dir, results_by_run=None, tracks=None):
    """report.md: one row per run, every run beside the largest model (the reference row)."""
    sized = [s for s in summaries if s.get("encoder_params")]
    ref = max(sized, key=lambda s: s["encoder_params"]) if sized else {}
    ref_label = labels[summaries.index(ref)] if ref else "n/a"
    devices = sorted({s["device"] for s in summaries if s.get("device")})
    lines = ["# Fine-tuning runs compared: accuracy against cost", "",
             f"Relative columns are against the largest model, **{ref_label}**. GFLOPs per image count 2 per "
             f"multiply-add (torch.utils.flop_counter); inference images/s measured at batch "
             f"{summaries[0].get('batch_size', 64)} on {', '.join(devices) or 'n/a'}: the median (min–max) of "
             f"rounds in which every model ran, the order rotated; training time and images/s from fairseq's "
             "logs.", "",
             "| run | kind | encoder params | x params | GFLOPs/image | x GFLOPs | inference images/s | x speed | "
             "best top-1 (%) | top-1 vs largest | at update | epoch | best top-5 (%) | at update | updates | "
             "training time (h) | training images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in zip(labels, summaries):
        gap = None if s["top1"] is None or ref.get("top1") is None else s["top1"] - ref["top1"]
        lines.append(
            f"| {label} | {s.get('kind') or 'n/a'} | {_fmt(s.get('encoder_params'), ',')} | {_ratio(s.get('encoder_params'), ref.get('encoder_params'))} | "
            f"{_fmt(s.get('gflops'), '.4g')} | {_ratio(s.get('gflops'), ref.get('gflops'))} | "
            f"{_speed(s)} | {_ratio(s.get('infer_images_per_s'), ref.get('infer_images_per_s'))} | "
            f"{_fmt(s['top1'], '.3f')} | {_fmt(gap, '+.3f')} | {_fmt(s['top1_update'], ',')} | {_fmt(s['top1_epoch'], 'd')} | "
            f"{_fmt(s['top5'], '.3f')} | {_fmt(s['top5_update'], ',')} | {s['updates']:,} | "
            f"{_fmt(s['wall_s'] / 3600.0 if s['wall_s'] else None, '.3f')} | {_fmt(s['images_per_s'], '.1f')} |")
    lines += [""] + write_results_table(results_by_run or {})
    if tracks:
        lines += ["![pretraining runs tracked: probe top-1 against the update](tracks_top1_vs_update.png)", ""]
    lines += ["![validation top-1 against training time](top1_vs_time.png)", "",
              "![validation top-1 per epoch](val_top1.png)", "", "![training loss](train_loss.png)", "",
              "![learning rate](lr.png)", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def compare(run_dirs, out_dir, labels=None, batch_size: int = 64, speed: bool = True, runtime=None,
            rounds: int = 5) -> dict:
    runs = [read_run(d) for d in run_dirs]
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(runs):
        raise ValueError(f"--labels has {len(labels)} names for {len(runs)} runs")
    if len(set(labels)) != len(labels):
        raise ValueError(f"two runs have the same label ({', '.join(labels)}): give --labels")
    os.makedirs(out_dir, exist_ok=True)
    costs = {label: model_costs(d) for label, d in zip(labels, run_dirs)}
    speeds = {}
    if speed and runtime is not None:
        speeds = inference_speeds({label: m for label, (_, m) in costs.items() if m is not None}, runtime, batch_size,
                                  rounds)
    summaries = []
    for run, label in zip(runs, labels):
        s = speeds.get(label)
        summaries.append({**summarise(run), **costs[label][0], "batch_size": batch_size,
                          "infer_images_per_s": s["median"] if s else None, "infer_min": s["min"] if s else None,
                          "infer_max": s["max"] if s else None,
                          "device": f"{runtime.device} {runtime.precision}" if s else None})
    plots = plot(runs, labels, out_dir)
    results = {label: read_results(d) for label, d in zip(labels, run_dirs)}
    tracks = plot_tracks(results, out_dir)
    plots += [tracks] if tracks else []
    return {"report": write_report(summaries, labels, out_dir, results, tracks), "plots": plots,
            "runs": dict(zip(labels, summaries)), "results": {k: result_columns(v) for k, v in results.items()}}


def main(argv=None) -> int:
    parser = make_parser(__doc__, "compare", trust_flag=False)
    parser.add_argument("runs", nargs="+", help="run folders (checkpoint.save_dir of each run)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per run (default: folder names)")
    parser.add_argument("--no-speed", action="store_true", help="do not measure inference speed")
    parser.add_argument("--speed-rounds", type=positive_int, default=5,
                        help="rounds of the speed measurement (every model each round, the order rotated)")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    from d2v_plugin import inputs

    with fail_cleanly():
        for run in args.runs:
            if not os.path.lexists(run):
                raise inputs.InputError(f"run folder not found: {run}")
            inputs.folder(run, "run folder")
    preflight(args, folders=[(args.out, "--out")])
    load_heavy()
    with fail_cleanly():
        runtime = None if args.no_speed else start_runtime(args)
        result = compare(args.runs, args.out, args.labels, args.batch_size, not args.no_speed, runtime,
                         args.speed_rounds)
    print(f"wrote {result['report']} and {len(result['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
