"""What every evaluation shares (as DINOv2's eval utilities are): the loop over a split's batches in
the model's input form, and top-k counting. Used by the criterion's validation, cli.evaluate and
cli.knn; never re-implemented per command."""
from __future__ import annotations

import sys

import torch


def topk_correct(scores: torch.Tensor, target: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """How many rows have the target as their top-1 class, and among their top-k (k capped at the
    number of classes): two 0-d integer tensors (no host sync)."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    hits = top == target.unsqueeze(-1)
    return hits[:, 0].sum(), hits.any(dim=-1).sum()


def eval_batches(index, data_cfg, batch_size: int = 64, workers: int = 0, desc: str = "evaluate"):
    """The index's images through the eval transform of ``data_cfg`` (resize, centre crop), batched
    and normalised as the model takes them, with a progress bar on stderr; unreadable files are
    skipped and logged once. Yields (images, target) in index order."""
    from tqdm import tqdm

    from d2v_plugin.data.dataset import BadImageReport, ImageFolderDataset
    from d2v_plugin.data.device_batch import to_model_input
    from d2v_plugin.data.transforms import data_eval_transform

    dataset = ImageFolderDataset(index, data_eval_transform(data_cfg), shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=dataset.collater)
    report_bad_images = BadImageReport()
    for batch in tqdm(loader, desc=desc, file=sys.stderr, unit="batch"):
        report_bad_images(batch)
        if to_model_input(batch, data_cfg):
            continue  # no readable image in it: nothing to count
        yield batch["net_input"]["images"], batch["target"]
