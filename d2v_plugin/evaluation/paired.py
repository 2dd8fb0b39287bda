"""Is model A better than model B? Two or more outcome files of one split (evaluation/outcomes.py) compared
pair by pair: the difference in top-1 with its paired-bootstrap interval, the exact McNemar p-value on the
images they disagree on, Holm's correction over the pairs, and a verdict (evaluation/statistics.py)."""
from __future__ import annotations

import itertools
import os

import numpy as np

from d2v_plugin.evaluation import statistics as st
from d2v_plugin.evaluation.outcomes import OutcomeError, read


def load(paths) -> list[dict]:
    """Each file's name, per-image top-1 correctness in position order, images and metadata; all of one split
    (the same index digest and the same images), else an OutcomeError naming the difference."""
    models = []
    for path in paths:
        columns, meta = read(path)
        order = np.argsort(columns["position"], kind="stable")
        models.append({"path": path, "name": os.path.basename(path), "meta": meta,
                       "position": columns["position"][order], "image": columns["image"][order],
                       "top1": columns["correct_top1"][order]})
    first = models[0]
    for other in models[1:]:
        a, b = first["meta"].get("index_digest"), other["meta"].get("index_digest")
        if a != b:
            raise OutcomeError(f"{other['path']} is of another split than {first['path']}: index digest "
                               f"{str(b)[:12]} against {str(a)[:12]}")
        if len(other["image"]) != len(first["image"]) or not np.array_equal(other["image"], first["image"]):
            only_a = sorted(set(first["image"]) - set(other["image"]))
            only_b = sorted(set(other["image"]) - set(first["image"]))
            example = (f"{only_a[0]} only in the first" if only_a else f"{only_b[0]} only in the second"
                       if only_b else "the same images in another order")
            raise OutcomeError(f"{other['path']} and {first['path']} score other images ({len(other['image']):,} "
                               f"against {len(first['image']):,}; {example}): compare outcomes of one split")
    return models


def compare(paths, resamples: int = st.RESAMPLES, seed: int = st.BOOTSTRAP_SEED) -> list[dict]:
    """One record per pair of models: top-1 of each with its interval, the difference with its paired-bootstrap
    interval, the discordant counts, McNemar's p, Holm's adjusted p (over all the pairs) and the verdict."""
    models = load(paths)
    n = len(models[0]["image"])
    out = []
    for a, b in itertools.combinations(models, 2):
        only_a = int((a["top1"] & ~b["top1"]).sum())
        only_b = int((~a["top1"] & b["top1"]).sum())
        out.append({"a": a["name"], "b": b["name"], "n": n,
                    "top1_a": float(a["top1"].mean()), "top1_a_interval": st.interval(int(a["top1"].sum()), n),
                    "top1_b": float(b["top1"].mean()), "top1_b_interval": st.interval(int(b["top1"].sum()), n),
                    "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": st.mcnemar(only_a, only_b),
                    "difference": st.paired_bootstrap(a["top1"], b["top1"], resamples, seed),
                    "checkpoint_a": a["meta"].get("checkpoint"), "checkpoint_b": b["meta"].get("checkpoint"),
                    "sha256_a": a["meta"].get("checkpoint_sha256"), "sha256_b": b["meta"].get("checkpoint_sha256"),
                    "index_digest": a["meta"].get("index_digest")})
    adjusted = st.holm([r["mcnemar_p"] for r in out])
    for r, p in zip(out, adjusted):
        r["holm_p"] = p
        r["verdict"] = st.verdict(r["only_a_right"], r["only_b_right"], p)
    return out
