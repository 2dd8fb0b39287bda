"""Per-image outcomes: one row per image of a split, what a paired comparison of two models needs. Written
beside a result (``--out``) by evaluate, knn, probe (kNN per k and the chosen linear head) and evaluate
--benchmark, as Parquet, gathered over the ranks and in the split's index order, so one rank's file and eight
ranks' are the same row for row. Each row: the image's place in the index (``position``) and identity
(its path in the split, or its file and row, or its shard and key), its label, the top-5 predicted classes,
whether top-1 and top-5 are right, and for ReaL whether the top-1 is in the image's label set. The file's
metadata records the split's index digest (the feature store's), the checkpoint and its SHA-256, and what
measured it: two files of one split can only be compared when their digests and image lists agree."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from d2v_plugin.atomic import atomic_path

META_KEY = b"d2v_plugin_outcomes"
FORMAT = "d2v_plugin outcomes 1"
FILE_BYTES = 2**30


def image_identity(index, i: int) -> str:
    """An image's identity in its split: its path under the split folder, its Parquet file and row, or its tar
    shard and key (file-system bytes that are not UTF-8 escaped, as the index stores them)."""
    files = getattr(index, "files", None)
    if hasattr(index, "keys") and hasattr(index, "shard"):  # tar shards
        return f"{os.path.basename(index.files[int(index.shard[i])])}:{index.keys[i]}"
    if hasattr(index, "file_start"):  # Parquet
        f = int(np.searchsorted(index.file_start, i, side="right") - 1)
        return f"{os.path.basename(index.files[f])}#{i - int(index.file_start[f])}"
    name = files[i]
    return os.fsencode(name).decode("utf-8", "backslashreplace") if isinstance(name, (str, bytes)) else str(name)


class Collector:
    """One rank's outcomes, batch by batch (``Scorer.outcome``'s dict and the batch's index positions)."""

    def __init__(self):
        self.parts = []

    def add(self, ids: torch.Tensor, target: torch.Tensor, outcome: dict) -> None:
        in_set = outcome.get("in_set")
        self.parts.append({"position": ids.cpu().numpy().astype(np.int64),
                           "label": target.cpu().numpy().astype(np.int64),
                           "top5": outcome["top5"].cpu().numpy().astype(np.int32),
                           "correct_top1": outcome["top1"].cpu().numpy().astype(bool),
                           "correct_top5": outcome["top5_ok"].cpu().numpy().astype(bool),
                           "counted": outcome["counted"].cpu().numpy().astype(bool),
                           "in_label_set": None if in_set is None else in_set.cpu().numpy().astype(bool)})

    def gathered(self, runtime) -> dict | None:
        """Every rank's rows, in index order, on rank 0 (None elsewhere)."""
        mine = self._joined()
        parts = runtime.gather_objects(mine)
        if not runtime.is_main:
            return None
        parts = [p for p in parts if p is not None and len(p["position"])]
        if not parts:
            return None
        keys = [k for k in parts[0] if parts[0][k] is not None]
        rows = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        order = np.argsort(rows["position"], kind="stable")
        return {k: v[order] for k, v in rows.items()}

    def _joined(self) -> dict | None:
        if not self.parts:
            return None
        keys = [k for k in self.parts[0] if self.parts[0][k] is not None]
        return {k: np.concatenate([p[k] for p in self.parts]) for k in keys}


def write(path: str, index, rows: dict, meta: dict) -> str:
    """The rows (``Collector.gathered``) as a Parquet file, the images named, ``meta`` in its metadata;
    atomically. Images left out of the count (unreadable; ReaL without a label set) are not rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = rows["counted"]
    positions = rows["position"][keep]
    columns = {"position": pa.array(positions), "image": pa.array([image_identity(index, int(i)) for i in positions]),
               "label": pa.array(rows["label"][keep]),
               "top5": pa.array(list(rows["top5"][keep]), type=pa.list_(pa.int32(), 5)),
               "correct_top1": pa.array(rows["correct_top1"][keep]),
               "correct_top5": pa.array(rows["correct_top5"][keep])}
    if "in_label_set" in rows:
        columns["in_label_set"] = pa.array(rows["in_label_set"][keep])
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps({"format": FORMAT, **meta})})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


class OutcomeError(ValueError):
    """An outcome file that cannot be read or compared; the message names it."""


def read(path: str) -> tuple[dict, dict]:
    """(columns as numpy arrays, metadata) of an outcome file, checked: a regular file of bounded size whose
    metadata says what it is and whose columns have their types."""
    import pyarrow.parquet as pq

    from d2v_plugin.evaluation.records import Unreadable, regular

    try:
        regular(path, "outcome file", FILE_BYTES)
        pf = pq.ParquetFile(path)
        meta = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
        table = pf.read()
    except Unreadable as err:
        raise OutcomeError(str(err)) from None
    except Exception as err:  # pyarrow's and json's errors on a damaged or foreign file
        raise OutcomeError(f"{path}: not a readable outcome file ({type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OutcomeError(f"{path}: not an outcome file of this plugin (no {FORMAT!r} in its metadata)")
    need = {"position", "image", "label", "correct_top1", "correct_top5"}
    if not need <= set(table.column_names):
        raise OutcomeError(f"{path}: missing columns {', '.join(sorted(need - set(table.column_names)))}")
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names
               if name != "top5"}
    for name in ("correct_top1", "correct_top5"):
        if columns[name].dtype != bool:
            raise OutcomeError(f"{path}: column {name} is not true/false")
    return columns, meta
