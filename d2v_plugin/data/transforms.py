"""Train and eval transforms: data2vec's pretraining augmentation, resize + centre-crop for eval.

The plugin's own transforms take the still-undecoded PIL image and a ``torch.Generator``:
- the crop box is drawn from the header size alone, with the generator (RandomResizedCrop's
  distribution: area fraction uniform in ``scale``, log aspect ratio uniform in log(3/4)..log(4/3),
  10 tries, then a centre crop), so augmentation never touches the global RNG;
- with ``fast_decode``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's
  ``draft``) when the chosen box still keeps at least the output size, and resized with PIL's
  ``reducing_gap``; the crop boxes, and so the augmentation distribution, are unchanged;
- they return uint8 tensors; the collater normalises the whole batch at once.
"""
import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, RGBA ... -> RGB (decodes the image if it is not yet)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


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


def _decode_box(img: Image.Image, box, out_w: int, out_h: int, fast: bool):
    """Decode ``img`` (at a reduced JPEG scale when ``fast`` and the box allows) and map ``box``
    (left, top, right, bottom in full-size pixels) into the decoded image's coordinates."""
    if fast and img.format == "JPEG":
        reduce = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)
        if reduce >= 2:
            full_w, full_h = img.size
            img.draft("RGB", (math.ceil(full_w / reduce), math.ceil(full_h / reduce)))
            sx, sy = img.size[0] / full_w, img.size[1] / full_h
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return to_rgb(img), box


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip, drawn from a generator."""

    def __init__(self, size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5,
                 fast_decode: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.fast_decode, self.mean, self.std = fast_decode, tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, generator=None) -> torch.Tensor:
        left, top, w, h = sample_crop(*img.size, self.scale, self.ratio, generator)
        flip = float(torch.rand(1, generator=generator)) < self.flip
        img, box = _decode_box(img, (left, top, left + w, top + h), self.size, self.size, self.fast_decode)
        out = img.resize((self.size, self.size), Image.BICUBIC, box=box,
                         reducing_gap=3.0 if self.fast_decode else None)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(out)


class ResizeCenterCrop:
    """Resize the shorter side to int(size / crop_ratio) (bicubic), then the centre size x size."""

    def __init__(self, size: int = 224, crop_ratio: float = 0.875, fast_decode: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.crop_ratio, self.fast_decode = size, crop_ratio, fast_decode
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, generator=None) -> torch.Tensor:
        width, height = img.size
        short = int(self.size / self.crop_ratio)
        # torchvision's Resize(int): the shorter side becomes `short`, the longer one scales, truncated
        new_w, new_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        img, box = _decode_box(img, (0, 0, width, height), new_w, new_h, self.fast_decode)
        resized = img.resize((new_w, new_h), Image.BICUBIC, box=box, reducing_gap=3.0 if self.fast_decode else None)
        left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        return to_uint8_tensor(resized.crop((left, top, left + self.size, top + self.size)))


def normalize_batch(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, scaled to [0, 1] and normalised (one pass, on the batch's device)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - m) / s


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, keeping timm's meaning at 0 bits: Pillow >= 10 refuses ``bits=0``, which
    RandAugment's increasing posterize ('inc1' policies, level 10) asks for; 0 bits kept is black,
    what Pillow computed before it refused."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def install_timm_posterize_fix() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


def train_transform(image_size: int = 224, scale=(0.08, 1.0), auto_augment: str | None = None,
                    random_erasing: float = 0.0, fast_decode: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RandomResizedCrop(bicubic) + horizontal flip (normalised in the collater): the augmentation the
    student was pretrained with. ``auto_augment`` / ``random_erasing`` switch to timm's ImageNet train
    transform (RandAugment, random erasing), which data2vec's own fine-tuning uses; that one draws
    from the data-loading process's global RNG and returns normalised float tensors."""
    if auto_augment or random_erasing:
        from timm.data import create_transform

        install_timm_posterize_fix()
        return create_transform(
            input_size=image_size, is_training=True, scale=tuple(scale), auto_augment=auto_augment,
            interpolation="bicubic", re_prob=random_erasing, re_mode="pixel", re_count=1, mean=mean, std=std,
        )
    return RandomResizedCropFlip(image_size, scale, fast_decode=fast_decode, mean=mean, std=std)


def eval_transform(image_size: int = 224, crop_ratio: float = 0.875, fast_decode: bool = False,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side to image_size / crop_ratio (bicubic), centre-crop image_size."""
    return ResizeCenterCrop(image_size, crop_ratio, fast_decode, mean, std)


class Normalized:
    """A plugin transform followed by normalisation: PIL image -> float [3, H, W], ready for the model."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img: Image.Image) -> torch.Tensor:
        t = self.transform
        return normalize_batch(t(img).unsqueeze(0), t.mean, t.std)[0]
