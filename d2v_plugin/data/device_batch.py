"""A collated batch to the model's input on the training device: JPEGs the workers left encoded
(``task.device_decode``) decoded and cropped there, back in their places in the batch; uint8 pixels
normalised with the data config's mean and std, in the model's dtype."""
from __future__ import annotations

import torch

from d2v_plugin.data.config import DataConfig
from d2v_plugin.data.decode import decode_jpegs_on
from d2v_plugin.data.index import DataError
from d2v_plugin.data.transforms import resize_crop

_SCALES: dict = {}  # (mean, std, device) -> (mean * 255, std * 255): built once, not on every step


def _scales(mean, std, device):
    key = (tuple(mean), tuple(std), str(device))
    if key not in _SCALES:
        as_tensor = [torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).mul_(255.0).to(device) for v in (mean, std)]
        _SCALES[key] = tuple(as_tensor)
    return _SCALES[key]


def normalize_batch(images: torch.Tensor, data_cfg: DataConfig = DataConfig()) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, scaled to [0, 1] and normalised (one pass, on the batch's device)."""
    mean, std = _scales(data_cfg.mean, data_cfg.std, images.device)
    return (images.float() - mean) / std


_DECODE_STREAMS: dict = {}  # device -> the CUDA stream the batch decode runs on


def _decode_and_crop(jpegs, boxes, flips, size, device) -> list:
    out = []
    for image, box, flip in zip(decode_jpegs_on(device, jpegs), boxes, flips):
        crop = None if image is None else resize_crop(image, *box, size, size)
        out.append(crop.flip(-1) if flip and crop is not None else crop)
    return out


def decode_crops(jpegs: list, boxes: list, flips: list, size: int, device) -> list:
    """JPEG bytes -> their (left, top, w, h) crops resized to size x size and flipped where asked, as
    uint8 [3, size, size] on ``device``; None for an image that does not decode. On a GPU the decode and
    resize run on a stream of their own, which the compute stream then waits for (an event, no host
    synchronisation), so they do not queue behind the model's kernels still running."""
    device = torch.device(device)
    if device.type != "cuda":
        return _decode_and_crop(jpegs, boxes, flips, size, device)
    compute = torch.cuda.current_stream(device)
    stream = _DECODE_STREAMS.setdefault(str(device), torch.cuda.Stream(device))
    with torch.cuda.stream(stream):
        out = _decode_and_crop(jpegs, boxes, flips, size, device)
    compute.wait_stream(stream)
    for crop in out:
        if crop is not None:
            crop.record_stream(compute)  # made on the decode stream, used on the compute stream
    return out


def decode_on_device(sample: dict, size: int, on_bad_image: str = "skip") -> bool:
    """Decode the batch's still-encoded JPEGs (``sample["encoded"]``, from ``ImageFolderDataset.collater``)
    on the device the batch is on and put each crop back at its place, so the batch is the one the
    workers would have built (same order, same pixels: mixup pairs sample i with B-1-i). A JPEG whose
    body does not decode is left out with its target and id, counted in ``bad_images`` and listed in
    ``bad_files``, or stops the run with ``on_bad_image=error``.

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


def to_model_input(sample: dict, data_cfg: DataConfig, dtype=None, size: int | None = None,
                   on_bad_image: str = "skip") -> bool:
    """A collated batch (already on its device) -> the model's input, in place: encoded JPEGs decoded
    there (``size``: the crop size), uint8 pixels normalised with ``data_cfg`` in ``dtype`` (the
    model's). timm's transform (the RandAugment path) delivers normalised floats: left as they are.
    Returns True when no image is left (see ``decode_on_device``)."""
    empty = decode_on_device(sample, size or data_cfg.image_size, on_bad_image)
    images = (sample or {}).get("net_input", {}).get("images")
    if images is not None and images.dtype == torch.uint8:
        images = normalize_batch(images, data_cfg)
        sample["net_input"]["images"] = images.to(dtype) if dtype is not None else images
    return empty


class Normalized:
    """An eval transform followed by normalisation: PIL image -> float [3, H, W], ready for the model."""

    def __init__(self, transform, data_cfg: DataConfig):
        self.transform, self.data_cfg = transform, data_cfg

    def __call__(self, img) -> torch.Tensor:
        return normalize_batch(self.transform(img, 0).unsqueeze(0), self.data_cfg)[0]  # one fixed seed
