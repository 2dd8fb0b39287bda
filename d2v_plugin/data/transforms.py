"""Train and eval transforms: data2vec's pretraining augmentation, resize + centre-crop for eval, and
timm's ImageNet training transform (RandAugment, random erasing) behind the same call.

Every transform is called as ``transform(img, seed, data)``: ``img`` is the opened, not yet decoded PIL
image (its header gives the size the crop is drawn from), ``seed`` the image's own seed of (common.seed,
epoch, index), ``data`` the file's bytes (the faster JPEG decoder reads them), and returns the image as
a tensor. The plugin's transforms return uint8 pixels (normalisation happens on the batch, on the
training device: data/device_batch.py); timm's returns its normalised float tensor.

- The crop box is drawn from the header size alone, with a generator of the image's seed
  (RandomResizedCrop's distribution: area fraction uniform in ``scale``, log aspect ratio uniform in
  log(3/4)..log(4/3), 10 tries, then a centre crop), so augmentation never touches the global RNG.
- The training crop is resized by torch's uint8 antialiased bicubic kernel (PIL's filter, applied to
  the crop as torchvision's RandomResizedCrop does; ~5x faster than PIL's resize, pixels within
  rounding); evaluation keeps PIL's resize, exactly what data2vec and timm evaluate with.
- With ``fast_decode``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's
  ``draft``) when the chosen box still keeps at least the output size (box edges rounded to the
  reduced grid); the crop boxes' distribution is unchanged. Training only: validation decodes in full.
"""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from d2v_plugin.data.config import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from d2v_plugin.data.decode import check_size, decode, decode_pil, decoding, hwc_tensor

# the data config's interpolation (``task.interpolation``) -> PIL's filter (evaluation, timm's transform)
# and torch's mode (training crops); torch antialiases bilinear and bicubic when shrinking, as PIL does
MODES = {"bicubic": (Image.BICUBIC, "bicubic"), "bilinear": (Image.BILINEAR, "bilinear"),
         "nearest": (Image.NEAREST, "nearest")}
assert set(MODES) == set(INTERPOLATIONS)


def interpolation_modes(name: str) -> tuple:
    """(PIL filter, torch mode) of an interpolation name; an unknown name is an error naming the setting."""
    if name not in MODES:
        raise ValueError(f"task.interpolation={name!r}: use one of {', '.join(INTERPOLATIONS)}")
    return MODES[name]


def _interpolate(images: torch.Tensor, out_h: int, out_w: int, mode: str) -> torch.Tensor:
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(images, size=(out_h, out_w), mode=mode, antialias=antialias)


def sample_crop(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """(left, top, w, h) of a random crop, distributed as torchvision's RandomResizedCrop."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height  # fall back to the largest centre crop within the ratio range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_crop(image: torch.Tensor, left: int, top: int, w: int, h: int, out_w: int, out_h: int,
                interpolation: str = "bicubic") -> torch.Tensor:
    """The (left, top, w, h) crop of a uint8 [3, H, W] image resized to out_h x out_w, antialiased (bicubic
    by default: PIL's filter, a = -0.5, support widened by the scale when shrinking) applied to the cropped
    image, as torchvision's RandomResizedCrop does on PIL images, in torch's vectorised uint8 kernel (~5x
    faster than PIL's; pixels agree within rounding)."""
    crop = image[None, :, top:top + h, left:left + w]
    if crop.device.type == "cpu":
        return _interpolate(crop, out_h, out_w, interpolation_modes(interpolation)[1])[0]
    return resize_in_float(crop, out_w, out_h, interpolation)[0]


def resize_in_float(images: torch.Tensor, out_w: int, out_h: int, interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, out_h, out_w], the same antialiased filter computed in float32 and
    rounded: what the GPU runs (its kernels resample floating point only)."""
    out = _interpolate(images.float(), out_h, out_w, interpolation_modes(interpolation)[1])
    return out.round_().clamp_(0, 255).to(torch.uint8)


def drafted_box(img: Image.Image, box, out_w: int, out_h: int):
    """With ``fast_decode``: when the box is at least twice the output size, set the JPEG to decode at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's ``draft``) and return the box in the reduced
    image's pixels, its edges rounded to that grid (under half a reduced pixel away). None when no
    reduced decode applies."""
    left, top, w, h = box
    reduce = min(w / out_w, h / out_h)
    if img.format != "JPEG" or reduce < 2:
        return None
    full_w, full_h = img.size
    img.draft("RGB", (math.ceil(full_w / reduce), math.ceil(full_h / reduce)))
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    x0, y0, x1, y1 = round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy)
    return x0, y0, x1 - x0, y1 - y0


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, interpolation) + horizontal flip, drawn from the image's seed."""

    def __init__(self, size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5,
                 fast_decode: bool = False, interpolation: str = "bicubic"):
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.fast_decode = fast_decode
        interpolation_modes(interpolation)
        self.interpolation = interpolation

    def draw(self, img: Image.Image, seed):
        """The crop box (left, top, w, h) and the flip, from the header's size alone. ``seed``: the
        image's seed, or a torch.Generator to draw from."""
        g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        box = sample_crop(*img.size, self.scale, self.ratio, g)
        return box, float(torch.rand(1, generator=g)) < self.flip

    def __call__(self, img: Image.Image, seed, data: bytes | None = None) -> torch.Tensor:
        box, flip = self.draw(img, seed)
        with decoding(data):
            reduced = drafted_box(img, box, self.size, self.size) if self.fast_decode else None
        image = decode(img, data) if reduced is None else hwc_tensor(decode_pil(img))  # PIL decodes drafted
        out = resize_crop(image, *(reduced or box), self.size, self.size, self.interpolation)
        return (out.flip(-1) if flip else out).contiguous()


class ResizeCenterCrop:
    """Resize the shorter side to int(size / crop_ratio) (bicubic by default), then the centre size x size."""

    def __init__(self, size: int = 224, crop_ratio: float = 0.875, fast_decode: bool = False,
                 interpolation: str = "bicubic"):
        self.size, self.crop_ratio, self.fast_decode = size, crop_ratio, fast_decode
        self.filter = interpolation_modes(interpolation)[0]

    def __call__(self, img: Image.Image, seed=None, data: bytes | None = None) -> torch.Tensor:
        """Deterministic: ``seed`` is there for the common call; PIL decodes the image in full first."""
        width, height = img.size
        short = int(self.size / self.crop_ratio)
        # torchvision's Resize(int): the shorter side becomes `short`, the longer one scales, truncated
        new_w, new_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        check_size(new_w, new_h, "its resize")
        if self.fast_decode and img.format == "JPEG":
            with decoding(data):
                img.draft("RGB", (new_w, new_h))  # the largest DCT scaling that keeps the image >= new size
        # PIL's resize, exactly what data2vec's and timm's evaluation transforms compute
        resized = decode_pil(img).resize((new_w, new_h), self.filter, reducing_gap=3.0 if self.fast_decode else None)
        left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        return hwc_tensor(resized.crop((left, top, left + self.size, top + self.size))).contiguous()


class TransformError(RuntimeError):
    """timm's transform failed on an image that decoded in full: a bug to report, not a bad file to skip."""


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Run timm's transform (RandAugment, random erasing, the flip) from a known state of the global
    RNGs it draws from (Python's ``random``, numpy's, torch's CPU generator), then put them back. Only
    the CPU generator is touched: CUDA generators (drop path on a GPU) never see this."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class TimmTransform:
    """timm's ImageNet training transform (data2vec's fine-tuning: RandAugment + random erasing) with
    the plugin transforms' call: the image decoded by PIL, the global RNGs timm draws from seeded by the
    image's seed and restored (the same draws whatever the worker, rank or resume), its errors told
    apart from unreadable files. Returns timm's normalised float tensor."""

    uses_global_rngs = True  # the training loop must not share the process-wide RNGs with it in a thread

    def __init__(self, transform, size: int):
        self.transform, self.size = transform, size

    def __call__(self, img: Image.Image, seed, data: bytes | None = None) -> torch.Tensor:
        decoded = decode_pil(img)  # decoded in full now: an unreadable file fails here, as on every path
        try:
            with seeded_global_rngs(seed):
                return self.transform(decoded)
        except Exception as err:
            raise TransformError(f"timm's training transform failed: {type(err).__name__}: {err}") from err


def train_transform(image_size: int = 224, scale=(0.08, 1.0), auto_augment: str | None = None,
                    random_erasing: float = 0.0, fast_decode: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    interpolation: str = "bicubic"):
    """RandomResizedCrop + horizontal flip: the augmentation the student was pretrained with (bicubic).
    ``auto_augment`` / ``random_erasing`` switch to timm's ImageNet train transform (RandAugment, random
    erasing, normalised with ``mean`` / ``std``), which data2vec's own fine-tuning uses."""
    interpolation_modes(interpolation)
    if auto_augment or random_erasing:
        from timm.data import create_transform

        from d2v_plugin import compat

        compat.install_timm_posterize_fix()
        return TimmTransform(create_transform(
            input_size=image_size, is_training=True, scale=tuple(scale), auto_augment=auto_augment,
            interpolation=interpolation, re_prob=random_erasing, re_mode="pixel", re_count=1, mean=mean, std=std,
        ), image_size)
    return RandomResizedCropFlip(image_size, scale, fast_decode=fast_decode, interpolation=interpolation)


def eval_transform(image_size: int = 224, crop_ratio: float = 0.875, fast_decode: bool = False,
                   interpolation: str = "bicubic"):
    """Resize the shorter side to image_size / crop_ratio (bicubic by default), centre-crop image_size."""
    return ResizeCenterCrop(image_size, crop_ratio, fast_decode, interpolation)


def data_eval_transform(data_cfg, fast_decode: bool = False):
    """The eval transform a data config describes (size, crop ratio, interpolation)."""
    return eval_transform(data_cfg.image_size, data_cfg.crop_ratio, fast_decode, data_cfg.interpolation)
