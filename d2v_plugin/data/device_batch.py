"""The training device's side of a batch: JPEGs left encoded by the workers (``task.device_decode``)
are decoded and cropped there, back in their places in the batch."""
from __future__ import annotations

import torch

from d2v_plugin.data.index import DataError
from d2v_plugin.data.transforms import decode_crops


def decode_on_device(sample: dict, size: int, on_bad_image: str = "skip") -> bool:
    """Decode the batch's still-encoded JPEGs (``sample["encoded"]``, from ``ImageFolderDataset.collater``)
    on the device the batch is on and put each crop back at its place, so the batch is the one the
    workers would have built (same order, same pixels: mixup pairs sample i with B-1-i). A JPEG whose
    body does not decode is left out with its target and id and counted in ``bad_images``, or stops
    the run with ``on_bad_image=error``.

    Returns True when no image at all is left: the batch then runs as zeros with its gradient ignored,
    as fairseq does with its dummy batches."""
    encoded = sample.pop("encoded", None) if sample else None
    if not encoded:
        return False
    decoded_here = sample["net_input"]["images"]
    device = sample["target"].device
    crops = decode_crops(encoded["jpegs"], encoded["boxes"], encoded["flips"], size, device)
    bad = [path for path, crop in zip(encoded["paths"], crops) if crop is None]
    for path in bad:
        if on_bad_image == "error":
            raise DataError(f"unreadable image {path}: the JPEG data does not decode "
                            "(task.on_bad_image=skip skips such files)")
    sample.setdefault("bad_files", []).extend((path, "the JPEG data does not decode") for path in bad)

    n, positions = len(sample["target"]), encoded["positions"]
    images = torch.empty((n, 3, size, size), dtype=torch.uint8, device=decoded_here.device)
    others = sorted(set(range(n)) - set(positions))  # the places of the images the workers decoded
    images[torch.tensor(others, dtype=torch.long, device=images.device)] = decoded_here
    placed = [(k, crop) for k, crop in zip(positions, crops) if crop is not None]
    if placed:
        images[torch.tensor([k for k, _ in placed], device=images.device)] = torch.stack([c for _, c in placed])
    keep = sorted(others + [k for k, _ in placed])
    sample["net_input"]["images"] = images
    if not bad:
        return False
    sample["bad_images"] = sample.get("bad_images", 0) + len(bad)
    if not keep:
        images.zero_()
        return True
    keep = torch.tensor(keep, device=device)
    sample["net_input"]["images"] = images.index_select(0, keep)
    sample["id"], sample["target"] = sample["id"].index_select(0, keep), sample["target"].index_select(0, keep)
    sample["nsentences"] = sample["ntokens"] = len(keep)
    return False
