"""The fairseq dataset over an image-folder index: decode to RGB, transform, skip or stop on bad images."""
from __future__ import annotations

import io
import logging
import os
import struct

import numpy as np
import torch
from fairseq.data import FairseqDataset
from PIL import Image

from d2v_plugin.data.index import DataError, FolderIndex
from d2v_plugin.data.transforms import RandomResizedCropFlip, ResizeCenterCrop, normalize_batch, tensor_decodable

logger = logging.getLogger(__name__)


def load_rgb(path: str) -> Image.Image:
    """Decode with PIL by content (not by extension) and convert grayscale, CMYK, palette, RGBA to RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


PLUGIN_TRANSFORMS = (RandomResizedCropFlip, ResizeCenterCrop)
# what PIL raises for files it cannot decode (UnidentifiedImageError and truncation are OSErrors)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class ImageFolderDataset(FairseqDataset):
    """Image ``i`` of epoch ``e`` is augmented with its own generator seeded from (seed, e, i): the same
    crop and flip whatever the number of data-loading workers or GPUs, after resuming a killed run, and
    without touching the global RNG (fairseq prefetches batches in a thread while the model trains)."""

    def __init__(self, index: FolderIndex, transform, on_bad_image: str = "skip", shuffle: bool = True,
                 seed: int = 1, normalize: bool = True, device_decode: bool = False):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"task.on_bad_image={on_bad_image!r}: use skip or error")
        if device_decode and (normalize or not isinstance(transform, RandomResizedCropFlip)):
            raise ValueError("device_decode needs the plugin's training transform and normalize=False")
        # JPEGs stay encoded: the sample holds the bytes, crop box and flip, and the consumer decodes
        # the batch on its device (decode_crops); other formats are decoded here as usual
        self.device_decode = device_decode
        self.index = index
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.shuffle = shuffle
        self.seed = seed
        self.normalize = normalize  # False: batches stay uint8 and the consumer normalises (on the GPU)
        self.epoch = 1
        self.sizes = np.ones(len(index), dtype=np.int64)  # every image is one example
        self.bad_seen = 0

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        path = os.path.join(self.index.split_dir, self.index.files[i])
        plugin = isinstance(self.transform, PLUGIN_TRANSFORMS)
        try:
            with open(path, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as img:
                if plugin:  # the plugin's transforms decode the file themselves (from the header's size on)
                    g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
                    if self.device_decode and tensor_decodable(img):
                        box, flip = self.transform.draw(img, g)  # the crop the transform would take
                        return {"id": i, "jpeg": data, "box": box, "flip": flip, "path": path,
                                "target": self.index.labels[i]}
                    image = self.transform(img, g, data)
                else:
                    decoded = img.convert("RGB")  # decoded now, a copy that outlives the file
        except DECODE_ERRORS as err:  # truncated, empty, not an image; a bug in the code still raises
            if self.on_bad_image == "error":
                raise DataError(f"unreadable image {path}: {err} (task.on_bad_image=skip skips such files)") from None
            self.bad_seen += 1
            logger.warning(f"skipping unreadable image {path}: {err} ({self.bad_seen} skipped in this process)")
            return {"id": i, "image": None, "target": self.index.labels[i]}
        if not plugin:  # timm's transforms (RandAugment path): their errors are bugs, not bad files
            image = self.transform(decoded)
        return {"id": i, "image": image, "target": self.index.labels[i]}

    def collater(self, samples: list[dict]) -> dict:
        decoded = [s for s in samples if s.get("image") is not None]
        encoded = [s for s in samples if "jpeg" in s]
        good = decoded + encoded  # the batch's order: decoded images first, then the still-encoded ones
        if not good:
            return {}  # fairseq treats an empty sample as a dummy batch
        if decoded:
            images = torch.stack([s["image"] for s in decoded])
        else:
            images = torch.empty((0, 3, self.transform.size, self.transform.size), dtype=torch.uint8)
        if images.dtype == torch.uint8 and self.normalize:  # the plugin's transforms leave it to the batch
            images = normalize_batch(images, self.transform.mean, self.transform.std)
        batch = {
            "id": torch.tensor([s["id"] for s in good]),
            "net_input": {"images": images},
            "target": torch.tensor([s["target"] for s in good]),
            "nsentences": len(good),
            "ntokens": len(good),
            "bad_images": len(samples) - len(good),
        }
        if encoded:  # plain Python values: fairseq moves tensors to the GPU, TorchCodec reads host bytes
            batch["encoded"] = {"jpegs": [s["jpeg"] for s in encoded], "boxes": [s["box"] for s in encoded],
                                "flips": [s["flip"] for s in encoded], "paths": [s["path"] for s in encoded]}
        return batch

    def num_tokens(self, index: int) -> int:
        return 1

    def size(self, index: int) -> int:
        return 1

    def ordered_indices(self):
        # fairseq seeds numpy per epoch around this call
        return np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))
