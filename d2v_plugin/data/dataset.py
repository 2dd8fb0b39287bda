"""The fairseq dataset over an image-folder index: decode to RGB, transform, skip or stop on bad images."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from fairseq.data import FairseqDataset
from PIL import Image

from d2v_plugin.data.index import DataError, FolderIndex

logger = logging.getLogger(__name__)


def load_rgb(path: str) -> Image.Image:
    """Decode with PIL by content (not by extension) and convert grayscale, CMYK, palette, RGBA to RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


class ImageFolderDataset(FairseqDataset):
    def __init__(self, index: FolderIndex, transform, on_bad_image: str = "skip", shuffle: bool = True):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"task.on_bad_image={on_bad_image!r}: use skip or error")
        self.index = index
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.shuffle = shuffle
        self.sizes = np.ones(len(index), dtype=np.int64)  # every image is one example
        self.bad_seen = 0

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        path = os.path.join(self.index.split_dir, self.index.files[i])
        try:
            image = self.transform(load_rgb(path))
        except Exception as err:  # any decoder failure: truncated, empty, not an image
            if self.on_bad_image == "error":
                raise DataError(f"unreadable image {path}: {err} (task.on_bad_image=skip skips such files)") from None
            self.bad_seen += 1
            logger.warning(f"skipping unreadable image {path}: {err} ({self.bad_seen} skipped in this process)")
            return {"id": i, "image": None, "target": self.index.labels[i]}
        return {"id": i, "image": image, "target": self.index.labels[i]}

    def collater(self, samples: list[dict]) -> dict:
        good = [s for s in samples if s["image"] is not None]
        if not good:
            return {}  # fairseq treats an empty sample as a dummy batch
        return {
            "id": torch.tensor([s["id"] for s in good]),
            "net_input": {"images": torch.stack([s["image"] for s in good])},
            "target": torch.tensor([s["target"] for s in good]),
            "nsentences": len(good),
            "ntokens": len(good),
            "bad_images": len(samples) - len(good),
        }

    def num_tokens(self, index: int) -> int:
        return 1

    def size(self, index: int) -> int:
        return 1

    def ordered_indices(self):
        # fairseq seeds numpy per epoch around this call
        return np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))
