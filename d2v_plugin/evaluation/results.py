"""Where a command's results go (``--out``): a results folder, or a JSON Lines file. Each result line records
the command, its settings, its interval and provenance; a result with per-image outcomes (evaluate, kNN, the
linear probe's chosen head) has them written beside it as Parquet (evaluation/outcomes.py), the line naming
the file. In a folder each command's file is named after what it measured (``evaluate-val-checkpoint_best-
1a2b3c4d.jsonl``): the same command on the same checkpoint and split replaces its earlier result, others stay."""
from __future__ import annotations

import json
import os
import re

from d2v_plugin.atomic import atomic_path


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", str(text))[:80] or "x"


def _stem_of(record: dict) -> str:
    """checkpoint_best-1a2b3c4d: a checkpoint's file name and the start of its hash."""
    checkpoint = record.get("checkpoint") or "model"
    sha = ((record.get("provenance") or {}).get("checkpoint_sha256") or "")[:8]
    name = os.path.splitext(os.path.basename(os.path.normpath(str(checkpoint))))[0]
    return _name(f"{name}-{sha}" if sha else name)


def _tag_of(record: dict) -> str:
    probe = record.get("probe") or "evaluate"
    tag = probe + (f"-k{record['k']}" if record.get("k") is not None else "")
    return _name(tag + (f"-block{record['block']}" if record.get("block") is not None else ""))


def destination(out: str, command: str, records: list) -> str:
    """The results file: ``out`` itself when it names a .jsonl file, else a file in the folder ``out`` named after
    the command, the split (or benchmark) and the checkpoint measured (a count of models when several)."""
    if out.endswith(".jsonl"):
        return out
    first = records[0] if records else {}
    what = first.get("benchmark") or first.get("split") or "val"
    models = {_stem_of(r) for r in records if "checkpoint" in r}
    who = next(iter(models)) if len(models) == 1 else f"{len(models)}-models"
    return os.path.join(out, f"{command}-{_name(what)}-{who}.jsonl")


def save(out: str | None, command: str, records: list, args, indexes: dict | None = None) -> str | None:
    """The records (rank 0's) as JSON Lines with the command and its settings; each record's ``_outcomes`` rows
    (popped here, so nothing prints them) written beside it for the split's index in ``indexes`` (split ->
    index), the record naming the file. Without ``out`` the outcomes are dropped."""
    from d2v_plugin.evaluation import outcomes

    if not out:
        for r in records:
            r.pop("_outcomes", None)
        return None
    path = os.path.abspath(destination(out, command, records))
    stem = path[:-len(".jsonl")]
    for r in records:
        rows = r.pop("_outcomes", None)
        index = (indexes or {}).get(r.get("split"))
        if rows is None or index is None:
            continue
        many = len({_stem_of(x) for x in records}) > 1
        target = f"{stem}.{(_stem_of(r) + '.') if many else ''}{_tag_of(r)}.outcomes.parquet"
        meta = {"command": command, "split": r.get("split"), "benchmark": r.get("benchmark"),
                "checkpoint": r.get("checkpoint"), **(r.get("provenance") or {}), "probe": r.get("probe"),
                "k": r.get("k"), "block": r.get("block")}
        outcomes.write(target, index, rows, meta)
        r["outcomes"] = os.path.basename(target)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps({"command": command, **record, "settings": settings}, default=str) + "\n")
    return path
