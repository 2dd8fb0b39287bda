"""What ``cli.compare`` compares, read from the files other commands and fairseq wrote: models, each a row.

A row is a model: a fine-tuning run's folder (fairseq's log: its best validation top-1, when and how fast it
was reached; its checkpoint_best.pt), a checkpoint file (an init, a released data2vec file, a student), or
the models a results folder holds results of (``evaluate/knn/probe --out``, ``track.jsonl``, one row per
checkpoint measured that no run folder or checkpoint file given is). Results written anywhere given are
attached to every row whose checkpoint they measured (by its SHA-256), so an init and its fine-tuned run, or a
student and the base model, are rows of one report.
Every number keeps the checkpoint it measured (its file name and hash) and its 95% interval.

Everything is read as a file from outside (evaluation/records.py): regular files of bounded size only, each
record's values checked; a file that cannot be read, or a record that is not a result, is skipped with its
name and the reason, and the report goes on.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
from dataclasses import dataclass, field

from d2v_plugin.evaluation.records import Unreadable, count, finite, fraction, lines, read_jsonl

LINE = re.compile(r"\]\[(?P<tag>[^\]]+)\]\[INFO\] - (?P<body>.*)$")
PARAMS = re.compile(r"num\. shared model params: ([\d,]{1,20}) \(num\. trained: ([\d,]{1,20})\)")
SIMPLE_INNER = re.compile(r"^epoch (\d+):\s+(\d+) / (\d+) (.*)$")
CHECKPOINTS = ("checkpoint_best.pt", "checkpoint_last.pt")
# what a log record's fields may hold: name -> checker (a value that fails leaves the field out)
LOG_FIELDS = {"accuracy": lambda v: finite(v, 0, 100), "top5": lambda v: finite(v, 0, 100), "loss": finite,
              "num_updates": count, "epoch": count, "wall": lambda v: finite(v, 0), "wps": lambda v: finite(v, 0),
              "n": count, "lr": lambda v: finite(v, 0)}


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return value


def _parse_body(tag: str, body: str):
    """One fairseq progress record as a flat dict of checked numbers, or None if the line is not one."""
    if body.startswith("{"):
        try:
            record = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(record, dict):
            return None
    elif (m := SIMPLE_INNER.match(body)) is not None:  # simple train_inner: k=v, k=v
        record = {"epoch": m.group(1)}
        for part in m.group(4).split(", "):
            if "=" in part:
                key, value = part.split("=", 1)
                record[key.strip()] = value
    elif body.startswith("epoch ") and " | " in body:  # simple epoch summary: k v | k v
        parts = body.split(" | ")
        record = {"epoch": parts[0].split()[1] if len(parts[0].split()) > 1 else None}
        for part in parts[1:]:
            bits = part.rsplit(" ", 1)
            if len(bits) == 2 and not part.startswith("valid on"):
                record[bits[0]] = bits[1]
    else:
        return None
    prefix = f"{tag}_"
    out = {}
    for key, value in record.items():
        key = key[len(prefix):] if isinstance(key, str) and key.startswith(prefix) else key
        value = _number(value)
        check = LOG_FIELDS.get(key)
        if check is None:
            if isinstance(key, str) and key.startswith("lr_"):  # composite optimizer: lr_<group>
                check = LOG_FIELDS["lr"]
            else:
                continue
        checked = check(value)
        if checked is not None:
            out[key] = float(checked) if key not in ("num_updates", "epoch", "n") else int(checked)
    return out if "epoch" in out else None


def read_run(run_dir: str, skipped: list | None = None) -> dict:
    """A run's fairseq log(s) (*.log under the folder, fairseq's json or simple format): training records per
    update, per epoch, validations, the trained parameter count. Unreadable files are named in ``skipped``."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    skipped = [] if skipped is None else skipped
    logs = sorted(glob.glob(os.path.join(run_dir, "**", "*.log"), recursive=True))
    inner, epochs, valid, params = {}, {}, {}, None
    for path in logs:
        try:
            for _, text, _ in lines(path, "fairseq log"):
                if text is None:
                    continue
                if (m := PARAMS.search(text)) is not None:
                    params = count(int(m.group(2).replace(",", "") or 0))
                    continue
                if (m := LINE.search(text)) is None:
                    continue
                tag = m.group("tag")
                record = _parse_body(tag, m.group("body"))
                if record is None:
                    continue
                # a resumed run logs some updates again: the later record wins
                if tag == "train_inner" and "num_updates" in record:
                    inner[record["num_updates"]] = record
                elif tag == "train":
                    epochs[record["epoch"]] = record
                elif "accuracy" in record:  # validation: end of epoch, or mid-epoch at a save
                    valid[record.get("num_updates", record["epoch"])] = record
        except Unreadable as err:
            skipped.append(str(err))
    if not (inner or epochs or valid):
        raise ValueError(f"{run_dir}: no fairseq training log found (looked for progress records in "
                         f"{len(logs)} *.log file(s) under it)")
    return {"dir": run_dir, "params": params, "inner": [inner[k] for k in sorted(inner)],
            "epochs": [epochs[k] for k in sorted(epochs)], "valid": [valid[k] for k in sorted(valid)]}


def summarise(run: dict) -> dict:
    """The run's best validation top-1 / top-5 (percent, as fairseq logs them; with n when logged), when they
    were reached, its updates, wall-clock and images/s."""
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
        "top1": best1["accuracy"] if best1 else None, "top1_n": at(best1, "n"), "top1_epoch": at(best1, "epoch"),
        "top1_update": at(best1, "num_updates"),
        "top5": best5["top5"] if best5 else None, "top5_epoch": at(best5, "epoch"),
        "top5_update": at(best5, "num_updates"),
        "updates": int(updates), "wall_s": wall, "images_per_s": sum(speeds) / len(speeds) if speeds else None,
    }


def run_checkpoint(run_dir: str):
    for name in CHECKPOINTS:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return path
    return None


# --- results written by the commands ----------------------------------------------------------------

KINDS = ("evaluate", "knn", "linear", "fewshot")


def result_problem(record: dict) -> str | None:
    """Why a line of a results file is not a result compare can show (None when it is one)."""
    if "summary" in record:
        return "a sweep's summary line"
    if record.get("probe") in ("rankme", "alphareq"):
        return "a label-free measure"
    probe = record.get("probe") or ("evaluate" if record.get("command") == "evaluate" else None)
    if probe not in KINDS:
        return "neither an evaluation nor a probe's result"
    if fraction(record.get("top1")) is None:
        return f"its top1 {str(record.get('top1'))[:40]!r} is not an accuracy in [0, 1]"
    if probe == "knn" and count(record.get("k")) is None:
        return "a kNN result without its k"
    if probe == "fewshot" and count(record.get("shots")) is None:
        return "a few-shot result without its shot count"
    if record.get("n") is not None and count(record.get("n")) is None:
        return f"its n {str(record.get('n'))[:40]!r} is not a count"
    if not isinstance(record.get("checkpoint", ""), str) or len(record.get("checkpoint", "")) > 4096:
        return "its checkpoint is not a path"
    if record.get("update") is not None and count(record.get("update")) is None:
        return f"its update {str(record.get('update'))[:40]!r} is not a count"
    return None


def read_results(folder: str, skipped: list) -> list[dict]:
    """The results in a folder's *.jsonl files (``--out`` files, ``track.jsonl``), each with its source file;
    a file or line that is not a result is named in ``skipped``."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        try:
            records, _, problems = read_jsonl(path, result_problem)
        except Unreadable as err:
            skipped.append(str(err))
            continue
        skipped += [p for p in problems if not p.endswith(("a sweep's summary line", "a label-free measure"))]
        for record in records:
            out.append({**record, "source": os.path.basename(path)})
    return out


def column_of(record: dict) -> tuple | None:
    """(sort key, column name) of a result in the report's table; None for what the table leaves out (block
    sweeps and tracked checkpoints: their own plots)."""
    if record.get("block") is not None or record.get("source") == "track.jsonl":
        return None
    probe = record.get("probe")
    if probe is None:
        name = record.get("benchmark") or record.get("split") or "val"
        return (0, name, 0), f"{name} top-1"
    if probe == "knn":
        return (1, "", int(record["k"])), f"kNN k={int(record['k'])} top-1"
    if probe == "linear":
        return (2, "", 0), "linear probe top-1"
    return (3, "", int(record["shots"])), f"{int(record['shots'])}-shot top-1"


def _sha(record: dict) -> str | None:
    sha = (record.get("provenance") or {}).get("checkpoint_sha256")
    return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None


def _when(record: dict) -> str:
    date = (record.get("provenance") or {}).get("date")
    return date if isinstance(date, str) else ""


@dataclass
class Row:
    """A model, as the report shows it."""

    label: str
    kind: str  # fine-tuning run, checkpoint, results
    checkpoint: str | None = None  # the file whose costs the row shows
    sha256: str | None = None
    run: dict | None = None  # summarise() of a fine-tuning run
    results: list = field(default_factory=list)
    records: dict | None = None  # read_run() of a fine-tuning run: its log's records, for the plots

    def columns(self) -> dict:
        """column name -> the newest result of that kind (by its date), with its sort key."""
        best = {}
        for r in self.results:
            found = column_of(r)
            if found is None:
                continue
            key, name = found
            if name not in best or _when(r) >= _when(best[name][1]):
                best[name] = (key, r)
        return best


def _hash(path: str) -> str | None:
    from d2v_plugin.evaluation.provenance import sha256

    try:
        return sha256(path)
    except OSError:
        return None


def rows_of(paths, labels=None, skipped: list | None = None) -> tuple[list[Row], list[str]]:
    """The rows of the report: one per run folder, checkpoint file, and checkpoint a results folder has results
    of; every result found anywhere attached to each row whose checkpoint it measured (by hash). Returns
    (rows, skipped)."""
    skipped = [] if skipped is None else skipped
    rows, loose = [], []
    for path in paths:
        name = os.path.basename(os.path.normpath(path))
        if os.path.isdir(path) and glob.glob(os.path.join(path, "**", "*.log"), recursive=True):
            run = read_run(path, skipped)
            checkpoint = run_checkpoint(path)
            rows.append(Row(name, "fine-tuning run", checkpoint, _hash(checkpoint) if checkpoint else None,
                            summarise(run), read_results(path, skipped), run))
        elif os.path.isdir(path):
            results = read_results(path, skipped)
            if not results:
                raise ValueError(f"{path}: no fairseq training log found, and no results (*.jsonl) either")
            loose += results
            by_model = {}
            for r in results:
                key = _sha(r) or r.get("checkpoint") or "?"
                by_model.setdefault(key, []).append(r)
            for key, found in by_model.items():
                checkpoint = found[0].get("checkpoint")
                rows.append(Row(name, "results", checkpoint, _sha(found[0]), None, found))
        else:
            from d2v_plugin import inputs

            inputs.checkpoint(path)
            rows.append(Row(name, "checkpoint", path, _hash(path)))
    # results measured on a checkpoint that is another row's are shown there: a results folder adds rows only for
    # the checkpoints no run folder or checkpoint file given is
    named = {r.sha256 for r in rows if r.kind != "results" and r.sha256}
    rows = [r for r in rows if not (r.kind == "results" and r.sha256 in named)]
    folders = collections.Counter(r.label for r in rows if r.kind == "results")
    for row in rows:  # a folder with results of several other checkpoints: a row each, named by the file
        if row.kind == "results" and folders[row.label] > 1:
            row.label = f"{row.label}: {os.path.basename(str(row.checkpoint))}"
    named_twice = collections.Counter(r.label for r in rows)
    for row in rows:  # two files of one name (checkpoint_best.pt of two runs): their hashes tell them apart
        if row.kind == "results" and named_twice[row.label] > 1:
            row.label = f"{row.label} {(row.sha256 or 'no hash')[:8]}"
    for row in rows:
        if row.sha256:
            extra = [r for r in loose if _sha(r) == row.sha256 and r not in row.results]
            row.results += extra
    if labels:
        if len(labels) != len(rows):
            raise ValueError(f"--labels has {len(labels)} names for {len(rows)} rows (models: {', '.join(r.label for r in rows)})")
        for row, label in zip(rows, labels):
            row.label = label
    if len({r.label for r in rows}) != len(rows):
        raise ValueError(f"two rows have the same label ({', '.join(r.label for r in rows)}): give --labels")
    return rows, skipped
