"""A pretraining run's improvement over time: probe each of its checkpoints as it appears.

The run's folder is searched for checkpoints (data2vec pretraining's ``checkpoint_N.pt``,
``checkpoint_E_U.pt``, ``checkpoint_last.pt``, the thesis' Lightning ``*.ckpt``, encoder files); each
one's training step is read from the file itself (its reader's ``step``: fairseq's
``optimizer_history[-1]["num_updates"]``, Lightning's ``global_step``), never from its name. A file
still being written is left for a later pass: a torch zip archive without its end record, or one whose
size or modification time changed since the last look. Each update is probed once (with the same
probes and features); the results are kept in ``track.jsonl`` in the run's folder, one line per
checkpoint and probe result, in update order, rewritten atomically (a kill never leaves a broken
line), and drawn in ``top1_vs_update.png``.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
import zipfile

from d2v_plugin.atomic import atomic_path
from d2v_plugin.evaluation.records import Unreadable, copy_kept, count, fraction, read_jsonl
from d2v_plugin.models.safe_load import shown

logger = logging.getLogger(__name__)

TRACK_FILE, PLOT_FILE, BLOCKS_PLOT_FILE = "track.jsonl", "top1_vs_update.png", "blocks_vs_update.png"
MOVING_NAMES = ("checkpoint_last.pt", "checkpoint_best.pt", "last.ckpt")  # files rewritten as a run goes on
PATTERNS = ("*.pt", "*.ckpt", "**/*.ckpt")


def candidates(run_dir: str, own: str | None = None) -> list[str]:
    """The files in a run's folder that may be checkpoints, not those under the tracker's own folder ``own``
    (a run folder may itself be named track)."""
    found = set()
    for pattern in PATTERNS:
        found.update(glob.glob(os.path.join(run_dir, pattern), recursive=True))
    own = os.path.realpath(own) + os.sep if own else None
    return sorted(p for p in found if os.path.isfile(p) and not (own and os.path.realpath(p).startswith(own)))


class Settling:
    """Whether a file is complete: a zip archive with its end record, and either unchanged in size and
    modification time since the previous look, or last modified more than ``settle_s`` seconds ago."""

    def __init__(self, settle_s: float = 2.0):
        self.settle_s, self.seen = settle_s, {}

    def complete(self, path: str) -> bool | None:
        """True, False (incomplete: not a whole zip archive), or None (changing or too fresh: look again)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        now, before = (st.st_size, st.st_mtime_ns), self.seen.get(path)
        self.seen[path] = now
        if before != now and time.time() - st.st_mtime < self.settle_s:
            return None
        return zipfile.is_zipfile(path) or not _looks_like_zip(path)  # an older torch.save pickle has no end record


def _looks_like_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def track_line_problem(record: dict) -> str | None:
    """Why a parsed line of track.jsonl is not a result this tracker can use (None when it is one)."""
    if count(record.get("update")) is None:
        return f"its update {shown(repr(record.get('update'))[:40])} is not a count of updates"
    if not isinstance(record.get("probe"), str) or len(record["probe"]) > 64:
        return "it names no probe"
    if "top1" in record and record["top1"] is not None and fraction(record["top1"]) is None:
        return f"its top1 {shown(repr(record['top1'])[:40])} is not an accuracy in [0, 1]"
    if not isinstance(record.get("settings", {}), dict):
        return "its settings are not an object"
    return None


class Track:
    """A run's track.jsonl read back: its results, and the lines that are not results (kept as they are by
    every rewrite). A track.jsonl that is not a regular file is refused, naming it: nothing is written there."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, TRACK_FILE)
        self.records, self.kept = [], []
        if not os.path.lexists(self.path):
            return
        if os.path.islink(self.path):
            raise Unreadable(f"{self.path}: a link; track writes its results beside the run, never through a link")
        self.records, self.kept, problems = read_jsonl(self.path, track_line_problem, "track.jsonl")
        for problem in problems[:5]:
            logger.warning(f"{problem}: left out of what is read, kept in the file as it is")
        if len(problems) > 5:
            logger.warning(f"{self.path}: {len(problems) - 5} more lines left out, kept as they are")

    def write(self, records: list[dict]) -> None:
        """The results in update order, then the kept lines as they were, atomically."""
        records = sorted(records, key=lambda r: (r["update"], r.get("probe", ""), r.get("block") or 0,
                                                 r.get("k") or r.get("shots") or 0))
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            f.writelines((json.dumps(r) + "\n").encode() for r in records)
            copy_kept(self.kept, self.path, f)
        self.records = records


def read_track(run_dir: str) -> list[dict]:
    """The results of a run's track.jsonl (its other lines named and left out)."""
    return Track(run_dir).records


def _label(r: dict) -> str:
    return r["probe"] + (f" k={r['k']}" if r.get("k") else f" {r['shots']}-shot" if r.get("shots") else "")


def plot_track(run_dir: str, lines: list[dict]) -> str:
    """top1_vs_update.png (each probe's top-1 with its interval as a band; the label-free measures, when
    tracked, in a second panel under it) and, for a sweep over the blocks, blocks_vs_update.png."""
    series, free = {}, {}
    for r in lines:
        if r.get("update") is None or r.get("block") is not None:
            continue
        if r.get("probe") in ("rankme", "alphareq") and isinstance(r.get("value"), float):
            free.setdefault(r["probe"], []).append((r["update"], r["value"]))
            continue
        if r.get("top1") is None:
            continue
        band = r.get("top1_interval") if isinstance(r.get("top1_interval"), dict) else {}
        lo, hi = band.get("low"), band.get("high")
        series.setdefault(_label(r), []).append((r["update"], 100 * r["top1"], (100 * lo, 100 * hi)
                                                 if isinstance(lo, float) and isinstance(hi, float) else None))
    path = plot_top1_vs_update(os.path.join(run_dir, PLOT_FILE), series, label_free=free)
    if any(r.get("block") is not None for r in lines):
        plot_blocks(os.path.join(run_dir, BLOCKS_PLOT_FILE), lines)
    return path


def best_blocks(lines: list[dict]) -> dict:
    """probe label -> {update: (best block, its top-1)} of a sweep's lines (ties to the earlier block)."""
    out = {}
    for r in lines:
        if r.get("block") is None or r.get("top1") is None or r.get("update") is None:
            continue
        at = out.setdefault(_label(r), {})
        if r["update"] not in at or r["top1"] > at[r["update"]][1]:
            at[r["update"]] = (r["block"], r["top1"])
    return out


def plot_blocks(path: str, lines: list[dict]) -> str:
    """A sweep over the blocks: for each probe, a heatmap of top-1 (%) by update (rows) and block (columns)
    with each update's best block ringed, and beside it the best block against the update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    best = best_blocks(lines)
    probes = sorted(best)
    fig, axes = plt.subplots(len(probes), 2, figsize=(9.6, 3.2 * len(probes)), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for row, label in zip(axes, probes):
        mine = [r for r in lines if r.get("block") is not None and r.get("top1") is not None and _label(r) == label]
        updates = sorted({r["update"] for r in mine})
        blocks = sorted({r["block"] for r in mine})
        grid = np.full((len(updates), len(blocks)), np.nan)
        for r in mine:
            grid[updates.index(r["update"]), blocks.index(r["block"])] = 100 * r["top1"]
        image = row[0].imshow(grid, aspect="auto", cmap="viridis", origin="upper")
        row[0].set_xticks(range(len(blocks)), [str(b) for b in blocks])
        row[0].set_yticks(range(len(updates)), [f"{u:,}" for u in updates])
        row[0].set_xlabel("block")
        row[0].set_ylabel("update")
        row[0].set_title(f"{label}: top-1 (%)")
        for u, update in enumerate(updates):
            b = best[label][update][0]
            row[0].scatter([blocks.index(b)], [u], s=60, facecolors="none", edgecolors="red")
        fig.colorbar(image, ax=row[0])
        row[1].plot(updates, [best[label][u][0] for u in updates], marker="o", markersize=3)
        row[1].set_xlabel("update")
        row[1].set_ylabel("best block")
        row[1].set_yticks(blocks)
        row[1].grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_top1_vs_update(path: str, series: dict, legend_size=None, label_free: dict | None = None) -> str:
    """A PNG of val top-1 (%) against the pretraining update: one line per ``series`` entry (label ->
    [(update, top-1 %)] or [(update, top-1 %, (low %, high %))], the interval drawn as a band), written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if label_free:  # a second panel under top-1: the label-free measures against the same updates
        fig, (ax, below) = plt.subplots(2, 1, figsize=(6.4, 6.4), dpi=100, sharex=True,
                                        gridspec_kw={"height_ratios": [3, 2]})
        for name, points in sorted(label_free.items()):
            xs, ys = zip(*sorted(points))
            below.plot(xs, ys, marker="s", markersize=3, label={"rankme": "RankMe", "alphareq": "alpha-ReQ"}[name])
        below.set_xlabel("pretraining update")
        below.set_ylabel("label-free")
        below.grid(alpha=0.3)
        below.legend(fontsize=legend_size)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, points in sorted(series.items()):
        points = sorted(p if len(p) == 3 else (*p, None) for p in points)
        xs, ys, bands = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if all(b is not None for b in bands):  # the 95% interval of each point, as a band
            ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], alpha=0.2)
    ax.set_xlabel("pretraining update")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


class Tracker:
    """Probes a run's new checkpoints. ``settings``: everything that changes a result, recorded in every line
    of track.jsonl; an update counts as probed only by lines recorded under the same settings (a change of
    any of them probes again)."""

    def __init__(self, run_dir: str, settings: dict, probe, runtime, store_dir: str | None = None,
                 settle_s: float = 2.0):
        self.run_dir, self.settings, self.probe, self.runtime = run_dir, settings, probe, runtime
        self.own_dir = os.path.join(run_dir, "track")
        self.store_dir = store_dir or os.path.join(self.own_dir, "features")
        self.settling = Settling(settle_s)
        self.unusable: set = set()  # (path, size, mtime) of files that are not checkpoints of an encoder
        self.stopping = False

    def _done_updates(self, lines) -> set:
        return {r["update"] for r in lines if r.get("settings") == self.settings}

    def ready(self, wait: bool) -> list[tuple]:
        """(update, path, identity, epoch) of the complete checkpoints, in update order; ``wait``: files too
        fresh to tell are looked at again after the settling time (a single pass), else left for later."""
        from d2v_plugin.evaluation.features import file_identity
        from d2v_plugin.models.checkpoints import CheckpointError, read_checkpoint

        paths = candidates(self.run_dir, self.store_dir)
        states = {p: self.settling.complete(p) for p in paths}
        if wait and any(v is None for v in states.values()):
            time.sleep(self.settling.settle_s)
            states.update({p: self.settling.complete(p) for p, v in states.items() if v is None})
        found = []
        for path in (p for p, v in states.items() if v):
            identity = file_identity(path)
            key = (identity["path"], identity["size"], identity["mtime_ns"])
            if key in self.unusable:
                continue
            try:
                ckpt = read_checkpoint(path, mmap=True)
            except (CheckpointError, ValueError) as err:
                logger.warning(f"not tracked: {err}")
                self.unusable.add(key)
                continue
            update = count(ckpt.step)
            if update is None:
                recorded = "no training step" if ckpt.step is None else \
                    f"the training step {shown(repr(ckpt.step)[:40])}, which is not a count of updates"
                logger.warning(f"not tracked: {path} records {recorded}")
                self.unusable.add(key)
                continue
            epoch = count(ckpt.epoch)
            found.append((update, path, identity, epoch))
        return self._one_per_update(sorted(found))

    @staticmethod
    def _one_per_update(found: list[tuple]) -> list[tuple]:
        """One file per update (fairseq's checkpoint_last.pt is a copy of the newest interval checkpoint): the
        one with a name that stays (checkpoint_E_U.pt over checkpoint_last.pt / _best.pt), the others named."""
        by_update = {}
        for item in found:
            by_update.setdefault(item[0], []).append(item)
        out = []
        for update, items in by_update.items():
            items.sort(key=lambda item: (os.path.basename(item[1]) in MOVING_NAMES, item[1]))
            out.append(items[0])
            if len(items) > 1:
                others = ", ".join(os.path.basename(item[1]) for item in items[1:])
                logger.warning(f"track: {others} also hold{'s' if len(items) == 2 else ''} update {update:,}: "
                               f"{os.path.basename(items[0][1])} is the one probed")
        return out

    def once(self, wait: bool = True) -> int:
        """One pass: probe every complete checkpoint whose update is not tracked yet; returns how many.
        Rank 0 decides which, and when to stop: every rank probes the same checkpoints together."""
        found = self.runtime.broadcast(self.ready(wait) if self.runtime.is_main else None)
        done = self._done_updates(Track(self.run_dir).records)
        probed = 0
        for update, path, identity, epoch in found:
            if update in done or self.runtime.broadcast(self.stopping if self.runtime.is_main else None):
                continue
            if self.runtime.is_main:
                logger.warning(f"track: probing {path} (update {update:,})")
            store = os.path.join(self.store_dir, str(update))
            results = list(self.probe(path, store))
            if self.runtime.is_main:
                from d2v_plugin.evaluation.provenance import file_record

                shutil.rmtree(store, ignore_errors=True)
                # the file as it was: a checkpoint_last.pt or checkpoint_best.pt changes as the run goes on
                new = [{**r, "update": update, "epoch": epoch, "checkpoint": path, "file": file_record(path),
                        "settings": self.settings} for r in results]
                track = Track(self.run_dir)  # read again: nothing written there meanwhile is lost
                track.write(track.records + new)
                plot_track(self.run_dir, track.records)
            done.add(update)
            probed += 1
        return probed

    def watch(self, poll_s: float) -> None:
        """Passes every ``poll_s`` seconds until ``stopping`` is set (SIGTERM, Ctrl-C): between two passes
        or two checkpoints, never inside the writing of track.jsonl. A run folder that does not exist yet
        (pretraining not started) is waited for."""
        while not self.runtime.broadcast(self.stopping if self.runtime.is_main else None):
            if not self.runtime.broadcast(os.path.isdir(self.run_dir) if self.runtime.is_main else None):
                self._sleep(poll_s)
                continue
            self.once(wait=False)
            self._sleep(poll_s)

    def _sleep(self, poll_s: float) -> None:
        deadline = time.monotonic() + poll_s
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, poll_s))
