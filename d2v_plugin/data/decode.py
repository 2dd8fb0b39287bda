"""Image files to RGB pixels, and the one definition of an unreadable file (``UnreadableImage``, with the
reason in words): TorchCodec for the JPEGs it decodes exactly as PIL does, PIL for the rest.

Every path decodes through these functions before any transform touches the pixels, so whatever a
decoder raises for a file (a truncated JPEG, a PNG that is not one, a decoder's MemoryError) means the
same thing everywhere: the file is skipped and reported (``task.on_bad_image``). The header's size is
checked against the bounds (d2v_plugin/limits.py: decoded pixels, aspect ratio) before anything is
decoded, and every resize's output size before it is computed."""
from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import torch
from PIL import Image

from d2v_plugin.limits import LIMITS, env_name

# PIL warns above its MAX_IMAGE_PIXELS and refuses above twice that: a raised bound applies to it too
if Image.MAX_IMAGE_PIXELS is not None and LIMITS.max_image_pixels > Image.MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = LIMITS.max_image_pixels


class UnreadableImage(Exception):
    """A file that does not decode to an image within the bounds; the message is the reason in words."""


@contextlib.contextmanager
def decoding(data: bytes | None = None):
    """What a decoder raises while it decodes one file is that file being unreadable (a bug in the
    plugin's own code outside these blocks still raises)."""
    try:
        yield
    except UnreadableImage:
        raise
    except MemoryError:
        raise UnreadableImage("decoding it ran out of memory") from None
    except Exception as err:  # noqa: B902 (decoders raise OSError, ValueError, SyntaxError, IndexError, ...)
        raise UnreadableImage(why_unreadable(err, data)) from None


def check_size(width: int, height: int, what: str = "the image") -> None:
    """The bounds on decoded pixels and aspect ratio, from a header's size or a resize's output."""
    if width < 1 or height < 1:
        raise UnreadableImage(f"{what} has no pixels ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > LIMITS.max_aspect_ratio:
        shape = f"1:{ratio:.0f}" if height > width else f"{ratio:.0f}:1"
        raise UnreadableImage(f"aspect ratio {shape} ({width}x{height}), over the bound of "
                              f"1:{LIMITS.max_aspect_ratio:g} ({env_name('max_aspect_ratio')})")
    if width * height > LIMITS.max_image_pixels:
        raise UnreadableImage(f"{what} is {width}x{height} = {width * height:,} pixels, over the bound of "
                              f"{LIMITS.max_image_pixels:,} ({env_name('max_image_pixels')})")


def open_image(data: bytes) -> Image.Image:
    """The file's header, read by content (not by extension), its size within the bounds: nothing is
    decoded yet (the transforms draw their crops from this size first)."""
    if not data:
        raise UnreadableImage("the file is empty")
    with decoding(data):
        img = Image.open(io.BytesIO(data))
    check_size(*img.size)
    return img


def decode_pil(img: Image.Image) -> Image.Image:
    """The image decoded in full by PIL (``draft`` applied, if set) and converted to RGB (grayscale,
    CMYK, palette, RGBA ...)."""
    with decoding():
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """An image file decoded as RGB (UnreadableImage naming the reason if it does not decode)."""
    with open(path, "rb") as f:
        return decode_pil(open_image(f.read()))


def hwc_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] view of its HWC pixels (channels-last strides, the layout torch's
    vectorised uint8 resampling reads without another copy)."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _exif_rotated(img: Image.Image) -> bool:
    return "exif" in img.info and img.getexif().get(0x0112, 1) != 1  # the Orientation tag


def tensor_decodable(img: Image.Image) -> bool:
    """A baseline or progressive JPEG in RGB or grey without an EXIF rotation: what TorchCodec decodes to
    PIL's pixels (it would apply a rotation, which PIL and ImageFolder ignore; CMYK keeps PIL's conversion)."""
    with decoding():
        return img.format == "JPEG" and img.mode in ("RGB", "L") and not _exif_rotated(img)


def decode(img: Image.Image, data: bytes | None = None) -> torch.Tensor:
    """The pixels of a still-undecoded PIL image as uint8 [3, H, W] (HWC strides).

    Given the file's bytes, a ``tensor_decodable`` JPEG is decoded by TorchCodec (libjpeg-turbo straight
    into a tensor: the same pixels as PIL's decoder, tested, without PIL's two copies); anything else
    goes through PIL, converted to RGB."""
    if data is not None and tensor_decodable(img):
        from torchcodec.decoders import decode_jpeg

        with decoding(data):
            try:
                return decode_jpeg(data, mode="RGB")
            except RuntimeError as err:  # corrupt or truncated (its message starts with "function, file:line, ")
                raise OSError(re.sub(r"^\w+, \S+:\d+, ", "", str(err).strip().splitlines()[-1])) from None
    return hwc_tensor(decode_pil(img))


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
                except (RuntimeError, MemoryError):
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
    return f"{type(err).__name__}: {text}" if text and not isinstance(err, OSError) else text or type(err).__name__

