"""Other ImageNet sets a classifier is reported on, each read as its own layout demands (timm's
``validate.py`` and ``real_labels.py`` define them):

- ``imagenet-v2``: class folders ``0`` ... ``999`` are the class indices (a sort by name would put ``10``
  before ``2``);
- ``imagenet-real``: ImageNet's val folder and ``real.json``, a label set per val image in the order of the
  ``ILSVRC2012_val_NNNNNNNN`` file numbers: a prediction is right when it is in the set; images with an
  empty set are left out;
- ``imagenet-a``, ``imagenet-r``: 200 of the 1,000 classes as wnid folders: the model is scored on its
  logits of those classes only, the subset computed from the model's own class names (the wnids it was
  trained with) and the set's folders, never from a bundled list;
- ``imagenet-sketch``: 1,000 wnid folders, read as ImageNet's val is.

``prepare`` gives the index to evaluate and the scorer that counts top-1 / top-5 the set's way.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from d2v_plugin.data.index import shown_path
from d2v_plugin.evaluation.metrics import topk_correct

BENCHMARKS = ("imagenet-v2", "imagenet-real", "imagenet-a", "imagenet-r", "imagenet-sketch")
WNID = re.compile(r"^n[0-9]{8}$")
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)
R_PREFIXES = ("art_", "cartoon_", "deviantart_", "embroidery_", "graffiti_", "graphic_", "misc_", "origami_",
              "painting_", "sculpture_", "sketch_", "sticker_", "tattoo_", "toy_", "videogame_")


class BenchmarkError(ValueError):
    """A set that cannot be scored as asked; the message names the fix."""


@dataclass
class Scorer:
    """Each image's outcome in a batch of logits (its top-5 classes, whether top-1 and top-5 are right, whether it
    counts), and the batch's counts: plain, on a subset of the classes (A / R), or on label sets (ReaL)."""

    subset: torch.Tensor | None = None  # model class indices the set has (A / R)
    label_sets: dict = field(default_factory=dict)  # index item -> set of class indices (ReaL)

    def outcome(self, logits: torch.Tensor, target: torch.Tensor, ids: torch.Tensor) -> dict:
        """Per image: ``top5`` [B, 5] model class indices (-1 past the classes there are), ``top1`` / ``top5_ok``
        right or not, ``counted`` (ReaL leaves out images without a label set), ``in_set`` (ReaL: the top-1 in
        the image's label set, else None)."""
        k = 5
        if self.subset is not None:
            subset = self.subset.to(logits.device)
            top = subset[logits[:, subset].topk(min(k, len(subset)), dim=1).indices]  # the model's class indices
        else:
            top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        if top.shape[1] < k:
            top = torch.cat([top, top.new_full((len(top), k - top.shape[1]), -1)], dim=1)
        if self.label_sets:
            sets = [self.label_sets.get(i, set()) for i in ids.tolist()]
            rows = top.cpu().tolist()
            c1 = torch.tensor([bool(s) and r[0] in s for r, s in zip(rows, sets)])
            c5 = torch.tensor([bool(s) and any(p in s for p in r) for r, s in zip(rows, sets)])
            counted = torch.tensor([bool(s) for s in sets])  # no label fits the image: timm's real_labels.py leaves it
            return {"top5": top, "top1": c1, "top5_ok": c5, "counted": counted, "in_set": c1}
        hits = top == target.unsqueeze(1)
        return {"top5": top, "top1": hits[:, 0], "top5_ok": hits.any(1),
                "counted": torch.ones(len(target), dtype=torch.bool, device=top.device), "in_set": None}

    def count(self, logits: torch.Tensor, target: torch.Tensor, ids: torch.Tensor) -> tuple[int, int, int]:
        o = self.outcome(logits, target, ids)
        return int(o["top1"].sum()), int(o["top5_ok"].sum()), int(o["counted"].sum())


def _index_name(name: str) -> bool:
    """A folder named by a class index in ASCII digits (``str.isdigit`` also takes '²' and other digits)."""
    return re.fullmatch(r"[0-9]{1,9}", name) is not None


def _folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise BenchmarkError(f"--data {root}: not a folder (give the set's folder, the one holding its class folders)")
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def detect(root: str) -> tuple[str, str]:
    """(benchmark, why) from a set folder's layout."""
    names = _folders(root)
    if os.path.isfile(os.path.join(root, "real.json")):
        return "imagenet-real", "real.json beside the val class folders"
    if names and all(_index_name(n) for n in names):
        return "imagenet-v2", f"{len(names)} class folders named by index"
    wnids = [n for n in names if WNID.match(n)]
    if not wnids or len(wnids) != len(names):
        odd = [shown_path(n) for n in names if not WNID.match(n) and not _index_name(n)]
        named = f" (folders {', '.join(odd[:5])} are neither)" if odd else ""
        raise BenchmarkError(f"--benchmark auto: {root} holds neither index folders (V2), wnid folders (A, R, Sketch) "
                             f"nor real.json (ReaL){named}: name the set with --benchmark")
    sample = next((f for f in os.listdir(os.path.join(root, wnids[0]))), "")
    if len(wnids) < 1000:
        kind = "imagenet-r" if sample.lower().startswith(R_PREFIXES) else "imagenet-a"
        return kind, f"{len(wnids)} wnid folders ({'renditions' if kind == 'imagenet-r' else 'no rendition'} file names)"
    return "imagenet-sketch", f"{len(wnids)} wnid folders"


def _model_wnids(classes: list, benchmark: str) -> dict:
    if not classes or not all(WNID.match(str(c)) for c in classes):
        shown = ", ".join(map(str, (classes or [])[:3])) or "none recorded"
        raise BenchmarkError(f"--benchmark {benchmark}: the model's class names are not ImageNet wnids ({shown}, ...): "
                             f"its logits cannot be matched to the set's classes; evaluate a model trained on "
                             f"ImageNet's wnid folders (its checkpoint or export records them)")
    return {c: i for i, c in enumerate(classes)}


def prepare(benchmark: str, root: str, classes: list, num_classes: int, real_labels: str | None = None,
            cache_dir: str | None = None):
    """(index, scorer, details) of a set: the images with their labels as model class indices, the scorer
    that counts them the set's way, and what the result records (classes used, ...)."""
    from d2v_plugin.data.index import index_split

    parent, name = os.path.dirname(os.path.abspath(root)), os.path.basename(os.path.abspath(root))
    folders = _folders(root)
    if benchmark == "imagenet-v2":
        bad = [shown_path(f) for f in folders if not _index_name(f) or int(f) >= num_classes]
        if bad:
            raise BenchmarkError(f"--benchmark imagenet-v2: folders {', '.join(bad[:5])} are not class indices below "
                                 f"the model's {num_classes} classes (V2's folders are named 0 ... 999)")
        index = index_split(parent, name, classes=[str(i) for i in range(num_classes)], cache_dir=cache_dir)
        return index, Scorer(), {"class_folders": len(folders)}
    if benchmark == "imagenet-real":
        wnids = _model_wnids(classes, benchmark)
        index = index_split(parent, name, classes=list(wnids), cache_dir=cache_dir)
        sets = _real_sets(real_labels or os.path.join(root, "real.json"), index, num_classes)
        left_out = sum(1 for s in sets.values() if not s)
        return index, Scorer(label_sets=sets), {"empty_label_sets": left_out}
    if benchmark in ("imagenet-a", "imagenet-r", "imagenet-sketch"):
        wnids = _model_wnids(classes, benchmark)
        missing = [f for f in folders if f not in wnids]
        if missing:
            raise BenchmarkError(f"--benchmark {benchmark}: the set's folder(s) {', '.join(missing[:5])} name wnids the "
                                 f"model was not trained on: evaluate a model of ImageNet-1k's classes")
        index = index_split(parent, name, classes=list(wnids), cache_dir=cache_dir)
        if benchmark == "imagenet-sketch" or len(folders) == len(wnids):
            return index, Scorer(), {"classes_used": len(wnids)}
        subset = torch.tensor(sorted(wnids[f] for f in folders))
        return index, Scorer(subset=subset), {"classes_used": len(subset), "classes_of_model": len(wnids)}
    raise BenchmarkError(f"--benchmark {benchmark!r}: use one of {', '.join(BENCHMARKS)} or auto")


def _real_sets(path: str, index, num_classes: int) -> dict:
    """index item -> set of class indices, from real.json's lists in val file order."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"--benchmark imagenet-real: {path} not found (give --real-labels real.json)")
    if os.path.getsize(path) > 64 * 2**20:
        raise BenchmarkError(f"{path}: larger than a ReaL file is")
    try:
        with open(path) as f:
            real = json.load(f)
    except (ValueError, RecursionError) as err:
        raise BenchmarkError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(real, list) or not all(isinstance(s, list) for s in real):
        raise BenchmarkError(f"{path}: not ReaL's format (a list with a list of class indices per val image)")
    if len(real) != len(index):
        raise BenchmarkError(f"{path} holds label sets for {len(real):,} images but {index.split_dir} has "
                             f"{len(index):,}: ReaL's file is for ImageNet's full val split (50,000 images named "
                             f"ILSVRC2012_val_NNNNNNNN)")
    sets = {}
    for i in range(len(index)):
        m = VAL_FILE.search(os.path.basename(index.files[i]))
        if m is None or not 1 <= int(m.group(1)) <= len(real):
            raise BenchmarkError(f"{index.describe(i)}: not an ILSVRC2012_val_NNNNNNNN file: ReaL's labels follow the "
                                 f"val files' numbers")
        labels = real[int(m.group(1)) - 1]
        if not all(type(c) is int and 0 <= c < num_classes for c in labels):  # (true is no class)
            raise BenchmarkError(f"{path}: entry {int(m.group(1))} holds labels outside 0..{num_classes - 1}")
        sets[i] = set(labels)
    return sets

