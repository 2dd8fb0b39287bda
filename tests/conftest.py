"""Shared fixtures: tiny encoders, tiny checkpoints and tiny image folders, built on the spot."""
import os
import sys

import pytest
import torch

import d2v_plugin  # noqa: F401  (registers the task, model and criterion)
from d2v_plugin.demo_data import write_random_images
from d2v_plugin.models.encoder import Data2Vec2ImageEncoder, EncoderConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)

TINY = dict(embed_dim=32, depth=5, num_heads=4, patch_size=8, image_size=24)


def tiny_encoder(seed: int = 0, **overrides) -> Data2Vec2ImageEncoder:
    torch.manual_seed(seed)
    enc = Data2Vec2ImageEncoder(EncoderConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # non-trivial norms, so a wrong norm placement shows
        for name, p in enc.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return enc.eval()


@pytest.fixture
def image_root(tmp_path):
    """3 classes, 8 train + 4 val images each, 24x24 PNGs."""
    root = tmp_path / "images"
    write_random_images(str(root), classes=3, per_class={"train": 8, "val": 4}, size=24)
    return root


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "index_cache")
