"""Small real datasets and checkpoints built offline, for the demo, the tests and the benchmarks."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_digits(root: str, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                 per_class: int | None = None) -> dict:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as RGB PNGs in
    ``root/{train,val}/<digit>/``, upscaled bicubically; a fixed stratified split. ``per_class``: only
    the first N images of each digit (a quick subset for tests)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    if per_class is not None:
        idx = np.concatenate([np.flatnonzero(digits.target == d)[:per_class] for d in range(10)])
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target[idx])
    counts = {}
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in ids:
            label = int(digits.target[i])
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            grey = Image.fromarray((digits.images[i] * (255.0 / 16.0)).astype(np.uint8), mode="L")
            grey.resize((image_size, image_size), Image.BICUBIC).convert("RGB").save(
                os.path.join(folder, f"{i:04d}.png"))
        counts[split] = len(ids)
    return counts


def write_random_images(root: str, classes: int = 3, per_class: dict | None = None, size: int = 24, seed: int = 0):
    """Tiny synthetic image folders for tests: class k images are noise around a class-specific colour,
    so a model can learn them in a few updates."""
    per_class = per_class or {"train": 8, "val": 4}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for k in range(classes):
            folder = os.path.join(root, split, f"class_{k}")
            os.makedirs(folder, exist_ok=True)
            colour = np.array([255 * (k % 3 == c) for c in range(3)], dtype=np.float64)
            for j in range(n):
                pixels = np.clip(colour * 0.7 + rng.normal(40, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{j:03d}.png"))
