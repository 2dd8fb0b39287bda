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


def _decode_and_crop(jpegs, boxes, flips, size, device, interpolation) -> list:
    out = []
    for image, box, flip in zip(decode_jpegs_on(device, jpegs), boxes, flips):
        crop = None if image is None else resize_crop(image, *box, size, size, interpolation)
        out.append(crop.flip(-1) if flip and crop is not None else crop)
    return out


def decode_crops(jpegs: list, boxes: list, flips: list, size: int, device, interpolation: str = "bicubic") -> list:
    """JPEG bytes -> their (left, top, w, h) crops resized to size x size and flipped where asked, as
    uint8 [3, size, size] on ``device`` (on the current stream); None for an image that does not decode.

    On the CPU: TorchCodec's libjpeg-turbo and torch's uint8 resize, the workers' own code, so the pixels
    are the workers' exactly. On a GPU: nvJPEG, then the resize in float32, rounded: nvJPEG's IDCT and
    upsampling differ from libjpeg-turbo's by a level here and there, and the float resize from the uint8
    one by rounding (tests/test_device_decode.py); the crop boxes and flips are the same."""
    return _decode_and_crop(jpegs, boxes, flips, size, torch.device(device), interpolation)


def _index(values, device) -> torch.Tensor:
    """A list of ints as a long tensor on ``device``, copied from pinned memory without a host wait."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def decode_on_device(sample: dict, size: int, on_bad_image: str = "skip", interpolation: str = "bicubic") -> None:
    """Decode the batch's still-encoded JPEGs (``sample["encoded"]``, from ``ImageFolderDataset.collater``)
    on the device the batch is on and put each crop back at its place, so the batch is the one the
    workers would have built (same order, same crops: mixup pairs sample i with B-1-i). A JPEG whose
    body does not decode is left out with its target and id, counted in ``bad_images`` and listed in
    ``bad_files``, or stops the run with ``on_bad_image=error``.

    When no image at all is left, the batch runs as zeros with its gradient ignored, as fairseq does
    with its dummy batches: ``sample["no_image_left"]`` says so (``to_model_input`` returns it)."""
    encoded = sample.pop("encoded", None) if sample else None
    if not encoded:
        return
    decoded_here = sample["net_input"]["images"]
    device = sample["target"].device
    crops = decode_crops(encoded["jpegs"], encoded["boxes"], encoded["flips"], size, device, interpolation)
    bad = [path for path, crop in zip(encoded["paths"], crops) if crop is None]
    for path in bad:
        if on_bad_image == "error":
            raise DataError(f"unreadable image {path}: the JPEG data does not decode "
                            "(task.on_bad_image=skip skips such files)")
    sample.setdefault("bad_files", []).extend((path, "the JPEG data does not decode") for path in bad)

    n, positions = len(sample["target"]), encoded["positions"]
    images = torch.empty((n, 3, size, size), dtype=torch.uint8, device=decoded_here.device)
    others = sorted(set(range(n)) - set(positions))  # the places of the images the workers decoded
    if others:
        images[_index(others, images.device)] = decoded_here
    placed = [(k, crop) for k, crop in zip(positions, crops) if crop is not None]
    if placed:
        images[_index([k for k, _ in placed], images.device)] = torch.stack([c for _, c in placed])
    keep = sorted(others + [k for k, _ in placed])
    sample["net_input"]["images"] = images
    if not bad:
        return
    sample["bad_images"] = sample.get("bad_images", 0) + len(bad)
    if not keep:
        images.zero_()
        sample["no_image_left"] = True
        return
    keep = _index(keep, device)
    sample["net_input"]["images"] = images.index_select(0, keep)
    sample["id"], sample["target"] = sample["id"].index_select(0, keep), sample["target"].index_select(0, keep)
    sample["nsentences"] = sample["ntokens"] = len(keep)


def to_model_input(sample: dict, data_cfg: DataConfig, dtype=None, size: int | None = None,
                   on_bad_image: str = "skip") -> bool:
    """A collated batch (already on its device) -> the model's input, in place: encoded JPEGs decoded
    there unless the ``DevicePrefetcher`` did it already (``size``: the crop size), uint8 pixels
    normalised with ``data_cfg`` in ``dtype`` (the model's). timm's transform (the RandAugment path)
    delivers normalised floats: left as they are. Returns True when no image is left (see
    ``decode_on_device``)."""
    decode_on_device(sample, size or data_cfg.image_size, on_bad_image, data_cfg.interpolation)
    images = (sample or {}).get("net_input", {}).get("images")
    if images is not None and images.dtype == torch.uint8:
        images = normalize_batch(images, data_cfg)
        sample["net_input"]["images"] = images.to(dtype) if dtype is not None else images
    return bool((sample or {}).get("no_image_left", False))


def to_device(sample, device: torch.device):
    """Every tensor of a batch on ``device``; from the DataLoader's pinned memory without a host wait."""
    if torch.is_tensor(sample):
        return sample.to(device, non_blocking=True)
    if isinstance(sample, dict):
        return {k: to_device(v, device) for k, v in sample.items()}
    if isinstance(sample, list):
        return [to_device(v, device) for v in sample]
    return sample


def _tensors(sample):
    if torch.is_tensor(sample):
        yield sample
    elif isinstance(sample, dict):
        for v in sample.values():
            yield from _tensors(v)
    elif isinstance(sample, list):
        for v in sample:
            yield from _tensors(v)


_END = object()


class DevicePrefetcher:
    """The training batches made ready on the training device one batch ahead, as timm's
    ``PrefetchLoader`` prepares the next batch on a side stream: a background thread takes batch k + 1
    from ``batches``, copies it to ``device`` from pinned memory, and decodes its still-encoded JPEGs
    there (``prepare``: ``decode_on_device``) while the training thread runs batch k. TorchCodec's CUDA
    decode waits for the GPU before it returns, which then costs the decode thread's time, not the
    training step's. On a GPU the thread works on a stream of its own and the training stream waits for
    its event (no host synchronisation in the training thread); on the CPU the same code runs with plain
    tensors. An error in the thread (``on_bad_image=error``) is raised in the training thread."""

    def __init__(self, batches, prepare, device, ahead: int = 1):
        import queue
        import threading

        self.device = torch.device(device)
        self._source, self._prepare = batches, prepare
        self._queue = queue.Queue(maxsize=ahead)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="d2v-device-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)  # the current device is per thread
            for sample in self._source:
                if self._stream is None:
                    self._queue.put((self._prepare(to_device(sample, self.device)), None))
                    continue
                with torch.cuda.stream(self._stream):
                    sample = self._prepare(to_device(sample, self.device))
                    ready = torch.cuda.Event()
                    ready.record(self._stream)
                self._queue.put((sample, ready))
            self._queue.put((_END, None))
        except BaseException as err:  # noqa: B902 (handed to the training thread, raised there)
            self._queue.put((err, None))

    def __iter__(self):
        return self

    def __next__(self):
        sample, ready = self._queue.get()
        if sample is _END:
            self._queue.put((_END, None))  # asked again after the end: still the end
            raise StopIteration
        if isinstance(sample, BaseException):
            raise sample
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for t in _tensors(sample):
                t.record_stream(compute)  # made on the prefetch stream, used (and freed) on the compute stream
        return sample


class Normalized:
    """An eval transform followed by normalisation: PIL image -> float [3, H, W], ready for the model."""

    def __init__(self, transform, data_cfg: DataConfig):
        self.transform, self.data_cfg = transform, data_cfg

    def __call__(self, img) -> torch.Tensor:
        return normalize_batch(self.transform(img, 0).unsqueeze(0), self.data_cfg)[0]  # one fixed seed
