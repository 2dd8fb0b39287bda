"""The fairseq dataset over a split (an image-folder index, Parquet files or tar shards: data/containers.py):
read the bytes, decode to RGB, transform, skip or stop on bad images."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from fairseq.data import FairseqDataset

from d2v_plugin.cluster import leave_signals_to_main_process
from d2v_plugin.data.decode import UnreadableImage, open_image, tensor_decodable
from d2v_plugin.data.index import LABEL_PROBLEMS, DataError, FolderIndex
from d2v_plugin.data.transforms import RandomResizedCropFlip, TimmTransform

logger = logging.getLogger(__name__)


class BadImageReport:
    """Logs each unreadable image once (its path and the reason), however many times and in however
    many data-loading workers it is met: the workers only hand the failures over with the batch
    (``bad_files``), the consumer logs them here."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, batch: dict | None) -> int:
        """Log the batch's failures not seen before; returns how many images the batch left out."""
        for path, reason in (batch or {}).pop("bad_files", []):
            if path not in self.seen:
                self.seen.add(path)
                logger.warning(f"skipping unreadable image {path}: {reason} (task.on_bad_image=skip; each file "
                               f"is reported once)")
        return (batch or {}).get("bad_images", 0)


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s augmentation in ``epoch``: one number per (seed, epoch, image)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + int(index)


class EpochBatch(Sequence):
    """One training batch's image indices together with the epoch they are drawn for; iterating it
    gives ``(epoch, index)`` keys for ``ImageFolderDataset.__getitem__``.

    fairseq keeps its data-loading workers alive across epochs, and each worker holds its own copy of
    the dataset, so ``set_epoch`` in the training process never reaches them. The epoch therefore
    travels with every batch the workers are handed (see ``tag_batches_with_epoch``): image i of epoch
    e gets the same crop whatever the number of workers, without restarting them each epoch."""

    __slots__ = ("epoch", "indices")

    def __init__(self, epoch: int, indices):
        self.epoch, self.indices = int(epoch), indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        return (self.epoch, int(self.indices[k]))

    def __repr__(self) -> str:
        return f"EpochBatch(epoch={self.epoch}, indices={list(self.indices)})"


def tag_batches_with_epoch(batch_sampler):
    """fairseq's per-epoch batch sampler (``make_batches(dataset, epoch)``, or a frozen list of
    batches) -> the same batches as ``EpochBatch`` objects carrying their epoch."""
    def make_batches(dataset, epoch):
        batches = batch_sampler(dataset, epoch) if callable(batch_sampler) else batch_sampler
        return [EpochBatch(epoch, b) for b in batches]

    make_batches.tags_epochs = True
    return make_batches


class ImageFolderDataset(FairseqDataset):
    """Image ``i`` of epoch ``e`` is augmented from a seed of (seed, e, i) alone: the same crop and flip
    (and RandAugment draw) whatever the number of data-loading workers or GPUs, and after resuming a
    killed run (see data/transforms.py for how each transform uses the seed).

    Items are read by index (``ds[i]``: the epoch last given to ``set_epoch``) or by ``(epoch, i)``, the
    keys of an ``EpochBatch`` (what the training split's batches hold). Batches hold uint8 pixels
    (timm's transform: its normalised floats); ``data.device_batch.to_model_input`` makes them the
    model's input on the training device."""

    def __init__(self, index: FolderIndex, transform, on_bad_image: str = "skip", shuffle: bool = True,
                 seed: int = 1, device_decode: bool = False):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"task.on_bad_image={on_bad_image!r}: use skip or error")
        if device_decode and not isinstance(transform, RandomResizedCropFlip):
            raise ValueError("device_decode needs the plugin's training transform")
        # JPEGs stay encoded: the sample holds the bytes, crop box and flip, and the consumer decodes
        # the batch on its device (data/device_batch.py); other formats are decoded here as usual
        self.device_decode = device_decode
        self.index = index
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 1
        self.sizes = np.ones(len(index), dtype=np.int64)  # every image is one example
        self.stop_signals = ()  # set by a training run's task: a data-loading worker leaves them to it

    @property
    def uses_global_rngs(self) -> bool:
        """timm's transform draws from process-wide RNGs (seeded per image and restored: TimmTransform)."""
        return getattr(self.transform, "uses_global_rngs", False)

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key) -> dict:
        if self.stop_signals:
            leave_signals_to_main_process(self.stop_signals)  # once per data-loading worker
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        seed = image_seed(self.seed, epoch, i)
        if self.index.labels[i] < 0:  # a container's record without a (usable) label
            return self._bad(i, self.index.describe(i), LABEL_PROBLEMS[int(self.index.labels[i])])
        try:
            data = self.index.read(i)  # the encoded bytes, from a file, a Parquet row or a tar member
            with open_image(data) as img:  # its header, within the bounds; the transforms decode it in full first
                if self.device_decode and tensor_decodable(img):
                    box, flip = self.transform.draw(img, seed)  # the crop the transform would take
                    return {"id": i, "jpeg": data, "box": box, "flip": flip, "path": self.index.describe(i),
                            "target": self.index.labels[i]}
                image = self.transform(img, seed, data)
        except UnreadableImage as err:  # the one definition (data/decode.py); a bug in the code still raises
            return self._bad(i, self.index.describe(i), str(err))
        except MemoryError:
            return self._bad(i, self.index.describe(i), "decoding it ran out of memory")
        return {"id": i, "image": image, "target": self.index.labels[i]}

    def _bad(self, i: int, where: str, reason: str) -> dict:
        if self.on_bad_image == "error":
            raise DataError(f"unreadable image {where}: {reason} (task.on_bad_image=skip skips such files)")
        return {"id": i, "image": None, "target": max(int(self.index.labels[i]), 0), "bad": (where, reason)}

    def collater(self, samples: list[dict]) -> dict:
        """Samples -> a batch in the samples' order, unreadable images left out and listed (``bad_files``,
        ``bad_images``). With ``device_decode`` the still-encoded JPEGs are listed under ``encoded`` with
        their places in the batch, and ``net_input.images`` holds the images decoded here, in batch order
        without those places: ``data.device_batch.decode_on_device`` fills them in.

        A batch without any readable image is one zero image marked ``no_image_left``: it runs (every rank
        runs every step) but counts nothing (the criterion reports it as 0 images, the gradient is
        ignored), and its failures travel with it as any batch's do. fairseq's own empty batch would run
        an earlier batch in its place, and validation would count those images again."""
        if not samples:
            return {}
        good = [s for s in samples if s.get("image") is not None or "jpeg" in s]
        if not good:
            timm = isinstance(self.transform, TimmTransform)  # timm's transform gives normalised floats
            size = self.transform.size
            return {"id": torch.tensor([-1]),
                    "net_input": {"images": torch.zeros((1, 3, size, size), dtype=torch.float32 if timm else torch.uint8)},
                    "target": torch.tensor([0]), "nsentences": 0, "ntokens": 0, "bad_images": len(samples),
                    "bad_files": [s["bad"] for s in samples if "bad" in s], "no_image_left": True}
        decoded = [s["image"] for s in good if "jpeg" not in s]
        if decoded:
            images = torch.stack(decoded)
        else:
            images = torch.empty((0, 3, self.transform.size, self.transform.size), dtype=torch.uint8)
        batch = {
            "id": torch.tensor([s["id"] for s in good]),
            "net_input": {"images": images},
            "target": torch.tensor([s["target"] for s in good]),
            "nsentences": len(good),
            "ntokens": len(good),
            "bad_images": len(samples) - len(good),
        }
        if len(good) < len(samples):
            batch["bad_files"] = [s["bad"] for s in samples if "bad" in s]
        encoded = [(k, s) for k, s in enumerate(good) if "jpeg" in s]
        if encoded:  # plain Python values: fairseq moves tensors to the GPU, TorchCodec reads host bytes
            batch["encoded"] = {"positions": [k for k, _ in encoded], "jpegs": [s["jpeg"] for _, s in encoded],
                                "boxes": [s["box"] for _, s in encoded], "flips": [s["flip"] for _, s in encoded],
                                "paths": [s["path"] for _, s in encoded]}
        return batch

    def num_tokens(self, index: int) -> int:
        return 1

    def size(self, index: int) -> int:
        return 1

    def ordered_indices(self):
        # fairseq seeds numpy per epoch around this call
        return np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))
