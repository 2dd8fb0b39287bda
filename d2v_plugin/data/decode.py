"""Image files to RGB pixels: TorchCodec for the JPEGs it decodes exactly as PIL does, PIL for the rest,
and what counts as an unreadable file (with the reason in words)."""
from __future__ import annotations

import re
import struct

import numpy as np
import torch
from PIL import Image

# what PIL raises for files it cannot decode (UnidentifiedImageError and truncation are OSErrors)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Decode with PIL by content (not by extension) and convert grayscale, CMYK, palette, RGBA to RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, RGBA ... -> RGB (decodes the image if it is not yet)."""
    return img if img.mode == "RGB" else img.convert("RGB")


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


def decode_jpegs_on(device, jpegs: list) -> list:
    """JPEG bytes -> uint8 [3, H, W] tensors on ``device``: TorchCodec decodes the batch there (nvJPEG
    on a GPU). An image the batched decode fails on is retried alone, then on the CPU; None where
    neither decodes it."""
    from torchcodec.decoders import decode_jpeg

    try:
        return decode_jpeg(jpegs, mode="RGB", device=device)
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
        return decoded


def why_unreadable(err: Exception, data: bytes | None = None) -> str:
    """The decoder's reason, in words a person can act on (PIL's messages name in-memory buffers)."""
    if data is not None and not data:
        return "the file is empty"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image: no decoder recognises its content"
    if isinstance(err, Image.DecompressionBombError):
        return f"larger than PIL's decompression-bomb limit ({err})"
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err)).strip()
    return text or type(err).__name__
