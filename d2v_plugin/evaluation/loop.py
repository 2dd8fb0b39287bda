"""A split's images in the model's input form: the eval transform (resize, centre crop) in data-loading
workers, batches from pinned memory copied to the device one batch ahead (data.device_batch's
DevicePrefetcher), normalised there; unreadable files skipped and reported once. ``evaluate``: a
classifier's top-1 / top-5 over this rank's shard, counts summed over the ranks."""
from __future__ import annotations

import time

import torch

from d2v_plugin.evaluation.metrics import fraction
from d2v_plugin.evaluation.runtime import Runtime, progress


class _Batches(torch.utils.data.Sampler):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def batches_of(indices, batch_size: int) -> list[list[int]]:
    indices = list(indices)
    return [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]


def eval_batches(index, data_cfg, runtime: Runtime, batches: list[list[int]], workers: int, desc: str = "evaluate",
                 dtype=None):
    """(images, target, ids) of each of ``batches`` (lists of the index's items), in order, on the
    runtime's device and normalised (in ``dtype``, default float32); a batch without any readable image
    is left out. A progress bar counts images on rank 0."""
    from d2v_plugin.data.dataset import BadImageReport, ImageFolderDataset
    from d2v_plugin.data.device_batch import DevicePrefetcher, to_model_input
    from d2v_plugin.data.transforms import data_eval_transform

    dataset = ImageFolderDataset(index, data_eval_transform(data_cfg), shuffle=False)
    cuda = runtime.device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_Batches(batches), num_workers=workers,
                                         collate_fn=dataset.collater, pin_memory=cuda,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    report_bad_images = BadImageReport()
    bar = progress(runtime, sum(len(b) for b in batches), desc)
    try:
        for batch in DevicePrefetcher(iter(loader), lambda sample: sample, runtime.device):
            bar.update(batch.get("nsentences", 0) + batch.get("bad_images", 0))
            report_bad_images(batch)
            if to_model_input(batch, data_cfg, dtype):
                continue  # no readable image in it: nothing to count
            yield batch["net_input"]["images"], batch["target"], batch["id"]
    finally:
        bar.close()


def evaluate(model, index, runtime: Runtime, batch_size: int = 64, workers: int | None = None,
             scorer=None, desc: str = "evaluate", confusion=None, outcomes=None) -> dict:
    """Top-1 / top-5 of a loaded classifier on a split, over every rank's shard, as exact fractions of
    the images counted, with their 95% intervals. ``scorer``: how another set counts (evaluation/
    benchmarks.py: a subset of the classes, label sets); plain top-k by default. ``confusion``
    (evaluation/per_class.py) is shown every batch's top-1 predictions, ``outcomes`` (evaluation/outcomes.py)
    every image's."""
    from d2v_plugin.evaluation.benchmarks import Scorer
    from d2v_plugin.evaluation.statistics import interval

    scorer = scorer or Scorer()
    workers = runtime.default_workers() if workers is None else workers
    model = model.to(runtime.device).eval()
    mine = batches_of(runtime.shard(len(index)), batch_size)
    top1 = top5 = n = 0
    start = time.perf_counter()
    with torch.no_grad(), runtime.autocast():
        for images, target, ids in eval_batches(index, model.data_cfg, runtime, mine, workers, desc=desc):
            logits = model(images).float()
            outcome = scorer.outcome(logits, target, ids)
            if confusion is not None:
                confusion.add(logits, target)
            if outcomes is not None:
                outcomes.add(ids, target, outcome)
            top1, top5 = top1 + int(outcome["top1"].sum()), top5 + int(outcome["top5_ok"].sum())
            n += int(outcome["counted"].sum())
    top1, top5, n = runtime.sum([top1, top5, n])
    seconds = time.perf_counter() - start
    return {"top1": fraction(top1, n), "top1_interval": interval(top1, n), "top5": fraction(top5, n),
            "top5_interval": interval(top5, n), "n": n, "data": model.data_cfg.describe(), **runtime.describe(),
            "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1) if seconds else None}
