"""Untrusted image bytes -> a safe, upright, 8-bit RGB `PIL.Image`; plus the reference output-size rule.

`load_image` is the one way bytes become pixels in this project. Whatever the bytes, it returns an RGB image or
raises a typed error that names the input: `InvalidImage` (empty, not an image, truncated, undecodable) or
`ImageTooLarge` (declared dimensions above the pixel limit, checked from the header before any pixel is decoded).
"""

from __future__ import annotations

import io
import logging
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLarge, InvalidImage

logger = logging.getLogger(__name__)

# Formats we decode. Pillow can open more (EPS shells out to Ghostscript, some are exotic attack surface): an
# upload in any other format is "not an image" here.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (multi-picture phone JPEGs)
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
REFERENCE_MIN_SIDE = 1024  # InstantID's resize_img: short side to 1024 ...
REFERENCE_MAX_SIDE = 1280  # ... then long side to 1280 ...
REFERENCE_MULTIPLE = 64  # ... then each side floored to a multiple of 64


def load_image(data: bytes, *, name: str = "image", max_pixels: int, max_side: int) -> Image.Image:
    """Decode untrusted image bytes into an upright 8-bit RGB image.

    First frame of animations; EXIF orientation applied; CMYK, palette, greyscale and 16-bit converted to 8-bit
    RGB; transparency composited over white (a transparent background becomes white, as it shows in a browser);
    images longer than `max_side` downscaled, keeping the aspect ratio.

    Args:
        data: The encoded image (JPEG, PNG, WebP, GIF, BMP or TIFF).
        name: What the caller calls this input (e.g. "face_image[0]"); every error names it.
        max_pixels: Reject images whose header declares more pixels than this, before decoding them.
        max_side: Downscale so that the longer side is at most this.

    Returns:
        A loaded (file-independent) RGB image.

    Raises:
        InvalidImage: Empty, not an image in a supported format, truncated or otherwise undecodable.
        ImageTooLarge: The declared dimensions exceed `max_pixels` (a decompression bomb is refused unread).
    """
    if not data:
        raise InvalidImage(f"{name} is empty (0 bytes); send a {_FORMAT_NAMES} image", field=name)
    img = _open_header(data, name, max_pixels)
    try:
        img.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
        img.load()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise InvalidImage(f"{name} is truncated or corrupt ({img.format}: {_reason(err)})", field=name) from err
    try:
        img = ImageOps.exif_transpose(img)  # returns a new, upright image (or a copy)
    except Exception as err:  # noqa: BLE001  a malformed EXIF block must not cost the photo: keep it as stored
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, _reason(err))
    try:
        rgb = _to_rgb(img)
    except Exception as err:
        raise InvalidImage(f"{name}: cannot convert {img.mode} pixels to RGB ({_reason(err)})", field=name) from err
    return _limit_side(rgb, max_side)


def _open_header(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Identify the format and read the declared size; no pixel data is decoded here."""
    try:
        # Pillow checks its own (process-wide) bomb limit inside open(): a warning above MAX_IMAGE_PIXELS, an error
        # above twice that. Both become our typed error or our own limit below, never an untyped escape. The
        # warning filter is swapped only for this call.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{name} declares too many pixels ({_reason(err)}); the limit is {max_pixels:,}",
                            field=name) from err
    except UnidentifiedImageError as err:
        raise InvalidImage(f"{name} is not an image ({len(data):,} bytes); send a {_FORMAT_NAMES} image",
                           field=name) from err
    except Exception as err:  # a header that parses halfway (e.g. a PNG cut inside its IHDR chunk)
        raise InvalidImage(f"{name} has a corrupt image header ({_reason(err)})", field=name) from err
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{name} declares an empty image ({width}x{height})", field=name)
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
                            field=name)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow decodes to."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode, img.format)).convert("RGB")
    if img.mode == "P":
        # a palette may carry transparency (tRNS / GIF transparent index): through RGBA so it lands on white
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inverted JPEG CMYK), YCbCr, LAB, HSV


def _to_uint8(arr: np.ndarray, mode: str, fmt: str | None) -> np.ndarray:
    """Greyscale with more than 8 bits -> 8 bits by scaling, not clipping (Pillow's convert clips at 255)."""
    arr = arr.astype(np.float64)
    if mode == "F":  # float TIFF: 0..1 or 0..255
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
    elif mode.startswith("I;16") or fmt == "PNG":  # 16-bit samples (a 16-bit PNG may open as mode I)
        scale = 255.0 / 65535.0
    else:  # 32-bit integer TIFF: 8-bit data stays, wider data is scaled to its own maximum
        peak = float(arr.max()) if arr.size else 0.0
        scale = 1.0 if peak <= 255 else 255.0 / peak
    return np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)


def _limit_side(img: Image.Image, max_side: int) -> Image.Image:
    width, height = img.size
    if max(width, height) <= max_side:
        return img
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: a fast box reduction first, then Lanczos on at most 3x the target (same look, much faster)
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _reason(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def image_to_bgr(img: Image.Image) -> np.ndarray:
    """An RGB image as the contiguous uint8 BGR array (H, W, 3) that OpenCV and insightface expect."""
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8)[:, :, ::-1])


def resize_like_reference(width: int, height: int) -> tuple[int, int]:
    """The output size InstantID's reference `resize_img` gives a photo of this size.

    The reference scales the short side to 1024 (rounding), then scales so that the long side is exactly 1280
    (rounding; this shrinks or enlarges), then floors each side to a multiple of 64: a square photo becomes
    1280x1280, a 4:3 one 1280x960. Sides that would floor to 0 (aspect ratios beyond 20:1) are kept at 64.

    Args:
        width: Photo width in pixels.
        height: Photo height in pixels.

    Returns:
        (width, height) of the output, multiples of 64.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = REFERENCE_MIN_SIDE / min(width, height)
    w, h = round(ratio * width), round(ratio * height)
    ratio = REFERENCE_MAX_SIDE / max(w, h)
    m = REFERENCE_MULTIPLE
    return max(m, round(ratio * w) // m * m), max(m, round(ratio * h) // m * m)


# Aspect ratios of the default output sizes (landscape; each also portrait). A request without a size gets the
# bucket nearest its photo's aspect ratio, sized by the reference's rule: so requests from different photos share
# a size, and with it a denoiser batch, where the exact rule gives nearly every photo its own size.
BUCKET_RATIOS = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1))


def size_buckets() -> list[tuple[int, int]]:
    """The default output sizes: the reference's rule applied to each bucket ratio, landscape and portrait
    (1280x1280, 1280x1024, 1280x960, 1280x832, 1280x704, 1280x640 and their transposes)."""
    sizes = []
    for w, h in BUCKET_RATIOS:
        for size in (resize_like_reference(w * 1000, h * 1000), resize_like_reference(h * 1000, w * 1000)):
            if size not in sizes:
                sizes.append(size)
    return sizes


def bucket_size(width: int, height: int) -> tuple[int, int]:
    """The default output size of a photo: the bucket whose aspect ratio is nearest (in log ratio) to the photo's."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = math.log(width / height)
    return min(size_buckets(), key=lambda size: abs(math.log(size[0] / size[1]) - ratio))
