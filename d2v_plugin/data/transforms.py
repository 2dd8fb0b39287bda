"""Train and eval transforms: data2vec's pretraining augmentation, resize + centre-crop for eval.

The plugin's own transforms take the still-undecoded PIL image and a ``torch.Generator``:
- the crop box is drawn from the header size alone, with the generator (RandomResizedCrop's
  distribution: area fraction uniform in ``scale``, log aspect ratio uniform in log(3/4)..log(4/3),
  10 tries, then a centre crop), so augmentation never touches the global RNG;
- the training crop is resized by torch's uint8 antialiased bicubic kernel (PIL's filter, applied to
  the crop as torchvision's RandomResizedCrop does; ~5x faster than PIL's resize, pixels within
  rounding); evaluation keeps PIL's resize, exactly what data2vec and timm evaluate with;
- with ``fast_decode``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's
  ``draft``) when the chosen box still keeps at least the output size (training: box edges rounded to
  the reduced grid; evaluation: the whole image); the crop boxes' distribution is unchanged;
- they return uint8 tensors; the collater normalises the whole batch at once.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, RGBA ... -> RGB (decodes the image if it is not yet)."""
    return img if img.mode == "RGB" else img.convert("RGB")


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


def hwc_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] view of its HWC pixels (channels-last strides, the layout torch's
    vectorised uint8 resampling reads without another copy)."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _exif_rotated(img: Image.Image) -> bool:
    return "exif" in img.info and img.getexif().get(0x0112, 1) != 1  # the Orientation tag


def tensor_decodable(img: Image.Image) -> bool:
    """A baseline or progressive JPEG in RGB or grey without an EXIF rotation: what TorchCodec decodes to
    PIL's pixels (it would apply a rotation, which PIL and ImageFolder ignore; CMYK keeps PIL's conversion)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and not _exif_rotated(img)


def decode(img: Image.Image, data: bytes | None = None) -> torch.Tensor:
    """The pixels of a still-undecoded PIL image as uint8 [3, H, W] (HWC strides).

    Given the file's bytes, a ``tensor_decodable`` JPEG is decoded by TorchCodec (libjpeg-turbo straight
    into a tensor: the same pixels as PIL's decoder, tested, without PIL's two copies); anything else
    goes through PIL, converted to RGB."""
    if data is not None and tensor_decodable(img):
        from torchcodec.decoders import decode_jpeg

        try:
            return decode_jpeg(data, mode="RGB")
        except RuntimeError as err:  # corrupt or truncated: what PIL reports as OSError
            raise OSError(str(err).strip().splitlines()[-1]) from None
    return hwc_tensor(to_rgb(img))


def decode_crops(jpegs: list, boxes: list, flips: list, size: int, device) -> list:
    """JPEG bytes -> their (left, top, w, h) crops resized to size x size and flipped where asked, as
    uint8 [3, size, size] on ``device``: TorchCodec decodes the batch there (nvJPEG on a GPU). An image
    the batched decode fails on is retried alone, then on the CPU; None where neither decodes it."""
    from torchcodec.decoders import decode_jpeg

    try:
        decoded = decode_jpeg(jpegs, mode="RGB", device=device)
    except RuntimeError:
        decoded = []
        for data in jpegs:
            try:
                decoded.append(decode_jpeg(data, mode="RGB", device=device))
            except RuntimeError:
                try:
                    decoded.append(decode_jpeg(data, mode="RGB").to(device))
                except RuntimeError:
                    decoded.append(None)
    out = []
    for image, box, flip in zip(decoded, boxes, flips):
        crop = None if image is None else resize_crop(image, *box, size, size)
        out.append(crop.flip(-1) if flip and crop is not None else crop)
    return out


def resize_crop(image: torch.Tensor, left: int, top: int, w: int, h: int, out_w: int, out_h: int) -> torch.Tensor:
    """The (left, top, w, h) crop of a uint8 [3, H, W] image resized to out_h x out_w, antialiased bicubic:
    PIL's filter (a = -0.5, support widened by the scale when shrinking) applied to the cropped image, as
    torchvision's RandomResizedCrop does on PIL images, in torch's vectorised uint8 kernel (~5x faster
    than PIL's; pixels agree within rounding)."""
    crop = image[None, :, top:top + h, left:left + w]
    if crop.device.type == "cpu":
        return F.interpolate(crop, size=(out_h, out_w), mode="bicubic", antialias=True)[0]
    return resize_in_float(crop, out_w, out_h)[0]


def resize_in_float(images: torch.Tensor, out_w: int, out_h: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, out_h, out_w], the same antialiased bicubic filter computed in
    float32 and rounded: what the GPU runs (its kernels resample floating point only)."""
    out = F.interpolate(images.float(), size=(out_h, out_w), mode="bicubic", antialias=True)
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
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip, drawn from a generator."""

    def __init__(self, size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5,
                 fast_decode: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.fast_decode, self.mean, self.std = fast_decode, tuple(mean), tuple(std)

    def draw(self, img: Image.Image, generator=None):
        """The crop box (left, top, w, h) and the flip, from the header's size alone."""
        box = sample_crop(*img.size, self.scale, self.ratio, generator)
        return box, float(torch.rand(1, generator=generator)) < self.flip

    def __call__(self, img: Image.Image, generator=None, data: bytes | None = None) -> torch.Tensor:
        """``img``: opened, not decoded (its header gives the size the crop is drawn from); ``data``:
        the file's bytes, if the caller has them (the faster JPEG decoder reads them)."""
        box, flip = self.draw(img, generator)
        reduced = drafted_box(img, box, self.size, self.size) if self.fast_decode else None
        image = decode(img, data) if reduced is None else hwc_tensor(to_rgb(img))  # PIL decodes drafted
        out = resize_crop(image, *(reduced or box), self.size, self.size)
        return (out.flip(-1) if flip else out).contiguous()


class ResizeCenterCrop:
    """Resize the shorter side to int(size / crop_ratio) (bicubic), then the centre size x size."""

    def __init__(self, size: int = 224, crop_ratio: float = 0.875, fast_decode: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.crop_ratio, self.fast_decode = size, crop_ratio, fast_decode
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, generator=None, data: bytes | None = None) -> torch.Tensor:
        """Called as the training transform is; decodes with PIL whatever ``data`` holds."""
        width, height = img.size
        short = int(self.size / self.crop_ratio)
        # torchvision's Resize(int): the shorter side becomes `short`, the longer one scales, truncated
        new_w, new_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        if self.fast_decode and img.format == "JPEG":
            img.draft("RGB", (new_w, new_h))  # the largest DCT scaling that keeps the image >= new size
        # PIL's resize, exactly what data2vec's and timm's evaluation transforms compute
        resized = to_rgb(img).resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0 if self.fast_decode else None)
        left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        return hwc_tensor(resized.crop((left, top, left + self.size, top + self.size))).contiguous()


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
