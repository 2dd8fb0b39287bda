"""The tables and plots ``cli.compare`` writes: report.md (the models against cost, their probes and other sets,
each number with its interval and the checkpoint it measured, rankings within noise marked), PNG plots of the
fine-tuning runs, the paired comparison's table, and the leaderboard (Markdown and CSV, one row per model,
probe and set, with its provenance; a row whose checkpoint or split no longer hashes the same is stale)."""
from __future__ import annotations

import csv
import os

from d2v_plugin.atomic import atomic_path
from d2v_plugin.evaluation import statistics as st


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def _ratio(value, reference, spec=".2f"):
    return "n/a" if value is None or not reference else format(value / reference, spec)


def _speed(s) -> str:
    if s.get("infer_images_per_s") is None:
        return "n/a"
    return f"{s['infer_images_per_s']:.1f} ({s['infer_min']:.1f}–{s['infer_max']:.1f})"


def _write(path: str, text: str) -> str:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def _short(sha) -> str:
    return sha[:8] if isinstance(sha, str) else "no hash"


def _interval(record: dict, key: str = "top1_interval"):
    """(low, high) of a result's interval: the one it records, else Wilson's from its top1 and n."""
    got = record.get(key)
    if isinstance(got, dict) and isinstance(got.get("low"), float) and isinstance(got.get("high"), float):
        return got["low"], got["high"]
    if isinstance(record.get("n"), int) and record["n"] > 0 and isinstance(record.get("top1"), float):
        return st.wilson(round(record["top1"] * record["n"]), record["n"])
    return None


def reference(summaries: list[dict], labels: list[str]):
    """(the reference row's index, the sentence saying which): the largest model by encoder parameters; models
    tied at that size are named as tied (the first of them is the reference)."""
    sized = [(s.get("encoder_params"), i) for i, s in enumerate(summaries) if s.get("encoder_params")]
    if not sized:
        return None, "No row has a model to size: relative columns are n/a."
    top = max(p for p, _ in sized)
    tied = [i for p, i in sized if p == top]
    if len(tied) > 1:
        names = ", ".join(f"**{labels[i]}**" for i in tied)
        return tied[0], (f"{names} tie as the largest ({top:,} encoder parameters each): relative columns are "
                         f"against **{labels[tied[0]]}**.")
    return tied[0], f"Relative columns are against the largest model, **{labels[tied[0]]}** ({top:,} encoder parameters)."


def models_table(summaries: list[dict], labels: list[str]) -> list[str]:
    """One row per model: what it is, the checkpoint measured, its cost, the fine-tuning run's best top-1 with
    its interval."""
    ref_i, sentence = reference(summaries, labels)
    ref = summaries[ref_i] if ref_i is not None else {}
    devices = sorted({s["device"] for s in summaries if s.get("device")})
    lines = [sentence + " GFLOPs per image count 2 per multiply-add (torch.utils.flop_counter); inference images/s "
             f"measured at batch {summaries[0].get('batch_size', 64)} on {', '.join(devices) or 'n/a'}: the median "
             "(min–max) of rounds in which every model ran, the order rotated; training time and images/s from "
             "fairseq's logs. Top-1 in percent, with its 95% Wilson interval over the n images validated.", "",
             "| model | kind | checkpoint measured | encoder params | x params | GFLOPs/image | x GFLOPs | "
             "inference images/s | x speed | best top-1 (%) | 95% interval | top-1 vs reference | at update | epoch | "
             "best top-5 (%) | updates | training time (h) | training images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in zip(labels, summaries):
        gap = None if s.get("top1") is None or ref.get("top1") is None else s["top1"] - ref["top1"]
        band = "n/a"
        if s.get("top1") is not None and s.get("top1_n"):
            lo, hi = st.wilson(round(s["top1"] / 100 * s["top1_n"]), s["top1_n"])
            band = f"{100 * lo:.2f}–{100 * hi:.2f} (n {s['top1_n']:,})"
        measured = (f"{os.path.basename(s['checkpoint'])} {_short(s.get('sha256'))}" if s.get("checkpoint")
                    else "none")
        lines.append(
            f"| {label} | {s.get('kind') or 'n/a'} | {measured} | {_fmt(s.get('encoder_params'), ',')} | "
            f"{_ratio(s.get('encoder_params'), ref.get('encoder_params'))} | {_fmt(s.get('gflops'), '.4g')} | "
            f"{_ratio(s.get('gflops'), ref.get('gflops'))} | {_speed(s)} | "
            f"{_ratio(s.get('infer_images_per_s'), ref.get('infer_images_per_s'))} | {_fmt(s.get('top1'), '.3f')} | "
            f"{band} | {_fmt(gap, '+.3f')} | {_fmt(s.get('top1_update'), ',')} | {_fmt(s.get('top1_epoch'), 'd')} | "
            f"{_fmt(s.get('top5'), '.3f')} | {_fmt(s.get('updates'), ',')} | "
            f"{_fmt(s['wall_s'] / 3600.0 if s.get('wall_s') else None, '.3f')} | {_fmt(s.get('images_per_s'), '.1f')} |")
    return lines + [""]


def results_table(rows) -> list[str]:
    """The probes and other sets of every model: columns in their numbers' order (k, shots), each cell the top-1
    with its interval and a note number naming the checkpoint it measured; a cell whose interval overlaps the
    column's best is marked ≈ (its ranking against the best is within noise)."""
    columns = {label: row.columns() for label, row in rows}
    names = {}
    for found in columns.values():
        for name, (key, _) in found.items():
            names[name] = key
    if not names:
        return []
    ordered = sorted(names, key=lambda n: names[n])
    notes, lines = {}, []
    best = {}
    for name in ordered:
        cells = [found[name][1] for found in columns.values() if name in found]
        top = max(cells, key=lambda r: r["top1"])
        best[name] = _interval(top)
    header = ["## Probes and other sets", "",
              "What `evaluate`, `knn` and `probe` wrote (`--out`) for each model: top-1 as a fraction of the n images "
              "counted, its 95% interval, and [k] the checkpoint measured (below). The newest result of each kind "
              "(by its date); ≈: its interval overlaps the column's best (the two are within noise of each other; "
              "`cli.compare --paired` on their outcome files tells for sure).", "",
              "| model | " + " | ".join(ordered) + " |", "|---|" + "---|" * len(ordered)]
    for label, found in columns.items():
        cells = []
        for name in ordered:
            if name not in found:
                cells.append("n/a")
                continue
            r = found[name][1]
            measured = (os.path.basename(str(r.get("checkpoint"))), _short((r.get("provenance") or {}).get("checkpoint_sha256")))
            note = notes.setdefault(measured, len(notes) + 1)
            band = _interval(r)
            text = f"{r['top1']:.4f}"
            if band:
                text += f" ({band[0]:.4f}–{band[1]:.4f})"
                if best[name] and band != best[name] and band[1] >= best[name][0]:
                    text += " ≈"  # not the best, but within its interval's reach
            cells.append(f"{text} [{note}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    key = [f"[{n}] {name} {sha}" for (name, sha), n in notes.items()]
    return header + lines + ["", "Checkpoints measured: " + "; ".join(key), ""]


def paired_table(pairs: list[dict]) -> list[str]:
    lines = ["| A | B | top-1 A | top-1 B | A − B (95% bootstrap) | only A right | only B right | McNemar p | "
             "Holm p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in pairs:
        d = r["difference"]
        lines.append(f"| {r['a']} | {r['b']} | {r['top1_a']:.4f} | {r['top1_b']:.4f} | {d['difference']:+.4f} "
                     f"({d['low']:+.4f} to {d['high']:+.4f}) | {r['only_a_right']:,} | {r['only_b_right']:,} | "
                     f"{r['mcnemar_p']:.3g} | {r['holm_p']:.3g} | {r['verdict']} |")
    n = pairs[0]["n"] if pairs else 0
    resamples = pairs[0]["difference"]["resamples"] if pairs else 0
    return (["# Paired comparison", "",
             f"The same {n:,} images scored by each model. The difference in top-1 with a paired bootstrap "
             f"interval ({resamples:,} resamples of the images, seed {pairs[0]['difference']['seed'] if pairs else 0}); "
             "the exact McNemar test on the images only one model gets right; Holm's correction over the "
             f"{len(pairs)} pair(s); the verdict from the corrected p-value at 95%.", ""] + lines + [""])


def plot_runs(runs, labels, out_dir):
    """PNGs of the fine-tuning runs: validation top-1 against training time (with its 95% interval as a band) and
    per epoch, the training loss and the learning rate per update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "top1_vs_time.png": ("validation top-1 (%)", "training time (hours)", _top1_over_time),
        "val_top1.png": ("validation top-1 (%)", "epoch", _epoch_axis),
        "train_loss.png": ("training loss (nats)", "update",
                           lambda r: [(v["num_updates"], v["loss"], None) for v in r["inner"] if "loss" in v]),
        "lr.png": ("learning rate", "update",
                   lambda r: [(v["num_updates"], _lr(v), None) for v in r["inner"] if _lr(v) is not None]),
    }
    written = []
    for name, (ylabel, xlabel, points) in figures.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for run, label in zip(runs, labels):
            pts = points(run)
            if pts:
                xs, ys, bands = zip(*pts)
                ax.plot(xs, ys, marker="o" if "top1" in name else None, markersize=3, label=label)
                if all(b is not None for b in bands):
                    ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a pretraining run has no validation top-1 to draw)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(path)
    return written


def _band(v):
    """A validation record's 95% interval in percent, when it logged its n."""
    if v.get("n"):
        lo, hi = st.wilson(round(v["accuracy"] / 100 * v["n"]), v["n"])
        return 100 * lo, 100 * hi
    return None


def _top1_over_time(run):
    """(training hours, validation top-1, band) per validation: the time of the last logged update at or before it."""
    clock = sorted((r["num_updates"], r["wall"]) for r in run["inner"] + run["epochs"]
                   if "num_updates" in r and "wall" in r)
    ends = {int(r["epoch"]): r.get("num_updates") for r in run["epochs"]}
    points = []
    for v in run["valid"]:
        upd = v.get("num_updates", ends.get(int(v["epoch"])))
        walls = [w for u, w in clock if upd is not None and u <= upd]
        if walls:
            points.append((walls[-1] / 3600.0, v["accuracy"], _band(v)))
    return points


def _lr(record):
    if "lr" in record:
        return record["lr"]
    group = next((k for k in record if k.startswith("lr_")), None)  # composite optimizer: lr_<group>
    return record.get("lr_default", record.get(group)) if group else None


def _epoch_axis(run):
    """Validation points at fractional epochs: mid-epoch validations fall between the epoch ends."""
    ends = {int(r["epoch"]): r["num_updates"] for r in run["epochs"] if "num_updates" in r}
    points = []
    for v in run["valid"]:
        epoch, upd = int(v["epoch"]), v.get("num_updates")
        start, end = ends.get(epoch - 1, 0 if epoch == 1 else None), ends.get(epoch)
        if upd is not None and start is not None and end and end > start:
            points.append((epoch - 1 + (upd - start) / (end - start), v["accuracy"], _band(v)))
        else:
            points.append((epoch, v["accuracy"], _band(v)))
    return points


def plot_tracks(rows, out_dir: str) -> str | None:
    """Tracked pretraining runs side by side: top-1 against the update, one line per model and probe, with bands."""
    series = {}
    for label, row in rows:
        for r in row.results:
            if r.get("source") != "track.jsonl" or r.get("update") is None or r.get("block") is not None:
                continue
            probe = r["probe"] + (f" k={r['k']}" if r.get("k") else "")
            band = _interval(r)
            series.setdefault(f"{label}: {probe}", []).append(
                (r["update"], 100 * r["top1"], (100 * band[0], 100 * band[1]) if band else None))
    if not series:
        return None
    from d2v_plugin.evaluation.tracking import plot_top1_vs_update

    return plot_top1_vs_update(os.path.join(out_dir, "tracks_top1_vs_update.png"), series, legend_size=7)


def leaderboard(rows, out: str) -> tuple[str, str]:
    """OUT.md and OUT.csv: one row per model, probe and set, with top-1, its interval, n and provenance; a row
    whose checkpoint no longer hashes as it did, or whose split's index changed, is marked stale."""
    from d2v_plugin.evaluation.provenance import sha256

    entries = []
    for label, row in rows:
        for name, (_, r) in sorted(row.columns().items(), key=lambda item: item[1][0]):
            origin = r.get("provenance") or {}
            stale = []
            path, recorded = r.get("checkpoint"), origin.get("checkpoint_sha256")
            try:
                if path and recorded and sha256(path) != recorded:
                    stale.append("the checkpoint changed")
            except OSError:
                stale.append("the checkpoint is gone")
            digest = _split_digest(r)
            if digest is not None and origin.get("index_digest") and digest != origin["index_digest"]:
                stale.append("the split changed")
            band = _interval(r) or (None, None)
            versions = origin.get("versions") or {}
            entries.append({"model": label, "measure": name, "top1": r["top1"], "low": band[0], "high": band[1],
                            "n": r.get("n"), "checkpoint": os.path.basename(str(path)), "sha256": recorded,
                            "index_digest": origin.get("index_digest"), "date": origin.get("date"),
                            "code": f"d2v_plugin {versions.get('d2v_plugin')} {versions.get('git_commit') or ''}".strip(),
                            "command": origin.get("command_line"), "stale": "; ".join(stale)})
    md = ["# Leaderboard", "", "One row per model, probe and set: top-1 (fraction) with its 95% interval, n, and where it "
          "came from. **stale**: the checkpoint or the split no longer hashes as when it was measured.", "",
          "| model | measure | top-1 | 95% interval | n | checkpoint | sha256 | split digest | date | code | stale |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        band = f"{e['low']:.4f}–{e['high']:.4f}" if e["low"] is not None else "n/a"
        md.append(f"| {e['model']} | {e['measure']} | {e['top1']:.4f} | {band} | {_fmt(e['n'], ',')} | {e['checkpoint']} | "
                  f"{_short(e['sha256'])} | {str(e['index_digest'])[:12]} | {e['date']} | {e['code']} | "
                  f"{'**stale**: ' + e['stale'] if e['stale'] else ''} |")
    md_path = _write(out + ".md", "\n".join(md) + "\n")
    csv_path = out + ".csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(entries[0]) if entries else ["model"])
        writer.writeheader()
        writer.writerows(entries)
    return md_path, csv_path


def _split_digest(record: dict):
    """The index digest of the split a result measured, computed now (None when its data is not here)."""
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    data, split = settings.get("data"), record.get("split")
    if not isinstance(data, str) or not isinstance(split, str) or not os.path.isdir(data):
        return None
    try:
        from d2v_plugin.data.containers import COMMAND_FLAGS, open_split
        from d2v_plugin.evaluation.features import index_identity

        return index_identity(open_split(data, split, cache_dir=settings.get("cache_dir"), names=COMMAND_FLAGS))
    except (ValueError, OSError):
        return None


def write_compare(paths, out_dir: str, labels=None, batch_size: int = 64, speed: bool = True, runtime=None,
                  rounds: int = 5, leaderboard_out: str | None = None) -> dict:
    """cli.compare's report: the rows (evaluation/runs.py), their costs (evaluation/costs.py), report.md, the
    plots, the leaderboard; what could not be read is listed in the report, not fatal."""
    from d2v_plugin.evaluation.costs import inference_speeds, model_costs
    from d2v_plugin.evaluation.runs import rows_of

    rows, skipped = rows_of(paths, labels)
    os.makedirs(out_dir, exist_ok=True)
    labels = [r.label for r in rows]
    costs = {r.label: model_costs(r.checkpoint) for r in rows}
    speeds = {}
    if speed and runtime is not None:
        speeds = inference_speeds({label: m for label, (_, m) in costs.items() if m is not None}, runtime, batch_size,
                                  rounds)
    summaries = []
    for row in rows:
        s = speeds.get(row.label)
        held = costs[row.label][0]["kind"]  # what the checkpoint holds: fine-tune, encoder, a probe
        kind = held if row.kind == "fine-tuning run" else f"{row.kind}" + (f" ({held})" if held else "")
        summaries.append({**(row.run or {}), **costs[row.label][0], "kind": kind, "checkpoint": row.checkpoint,
                          "sha256": row.sha256,
                          "batch_size": batch_size, "infer_images_per_s": s["median"] if s else None,
                          "infer_min": s["min"] if s else None, "infer_max": s["max"] if s else None,
                          "device": f"{runtime.device} {runtime.precision}" if s else None})
    runs = [r.records for r in rows if r.records is not None]
    plots = plot_runs(runs, [r.label for r in rows if r.records is not None], out_dir) if runs else []
    tracks = plot_tracks([(r.label, r) for r in rows], out_dir)
    plots += [tracks] if tracks else []
    lines = ["# Models compared: accuracy against cost", ""] + models_table(summaries, labels)
    lines += results_table([(r.label, r) for r in rows])
    if tracks:
        lines += ["![pretraining runs tracked: probe top-1 against the update](tracks_top1_vs_update.png)", ""]
    if runs:
        lines += ["![validation top-1 against training time](top1_vs_time.png)", "",
                  "![validation top-1 per epoch](val_top1.png)", "", "![training loss](train_loss.png)", "",
                  "![learning rate](lr.png)", ""]
    if skipped:
        lines += ["## Not read", ""] + [f"- {s}" for s in skipped] + [""]
    report = _write(os.path.join(out_dir, "report.md"), "\n".join(lines))
    board = leaderboard([(r.label, r) for r in rows], leaderboard_out) if leaderboard_out else None
    return {"report": report, "plots": plots, "rows": dict(zip(labels, summaries)), "skipped": skipped,
            "leaderboard": board, "results": {r.label: {n: c[1]["top1"] for n, c in r.columns().items()} for r in rows}}


def write_paired(pairs: list[dict], out_dir: str) -> tuple[str, str]:
    """paired.md (the table) and paired.jsonl (the records) in ``out_dir``."""
    import json

    md = _write(os.path.join(out_dir, "paired.md"), "\n".join(paired_table(pairs)))
    jsonl = _write(os.path.join(out_dir, "paired.jsonl"), "".join(json.dumps(p) + "\n" for p in pairs))
    return md, jsonl
