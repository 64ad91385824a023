"""load_image turns any bytes into an upright 8-bit RGB image or a typed error that names the input."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, features

from instantid_core.errors import ImageTooLarge, InvalidImage
from instantid_core.images import image_to_bgr, load_image, resize_like_reference

LIMITS = {"max_pixels": 40_000_000, "max_side": 4096}


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def quadrants(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: orientation is visible."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2:] = (0, 255, 0)
    arr[h // 2:, : w // 2] = (0, 0, 255)
    arr[h // 2:, w // 2:] = (255, 255, 255)
    return Image.fromarray(arr)


def centre_colours(img: Image.Image) -> list[tuple[int, ...]]:
    """Colour at the centre of each quadrant: top-left, top-right, bottom-left, bottom-right."""
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    return [tuple(int(v) for v in arr[y, x]) for y, x in ((h // 4, w // 4), (h // 4, 3 * w // 4),
                                                          (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4))]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares width x height RGB pixels; its pixel data is a few compressed rows
    of zeros, so anything that tries to decode it fails with "truncated" (or exhausts memory)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif_declaring(width: int, height: int) -> bytes:
    """A tiny GIF whose logical screen and first frame declare width x height."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def test_zero_bytes_is_invalid_image_naming_the_input():
    with pytest.raises(InvalidImage, match="face_image\\[0\\] is empty") as info:
        load_image(b"", name="face_image[0]", **LIMITS)
    assert info.value.field == "face_image[0]"


def test_text_file_named_jpg_is_invalid_image():
    with pytest.raises(InvalidImage, match="selfie.jpg is not an image"):
        load_image(b"hello, this is not a JPEG\n" * 20, name="selfie.jpg", **LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_invalid_image(fmt):
    data = encode(quadrants((256, 256)), fmt)
    with pytest.raises(InvalidImage, match="photo"):
        load_image(data[: len(data) // 2], name="photo", **LIMITS)


def test_random_and_mangled_bytes_raise_only_typed_errors():
    rng = np.random.default_rng(0)
    formats = ["JPEG", "PNG", "GIF", "BMP", "TIFF"] + (["WEBP"] if features.check("webp") else [])
    samples = [encode(quadrants(), fmt) for fmt in formats]
    cases = [rng.bytes(int(n)) for n in rng.integers(1, 2000, 30)]
    for data in samples:
        cases += [data[:cut] for cut in rng.integers(1, len(data), 8)]
        for _ in range(8):
            mangled = bytearray(data)
            for pos in rng.integers(0, len(data), 4):
                mangled[pos] = int(rng.integers(0, 256))
            cases.append(bytes(mangled))
    for data in cases:
        try:
            img = load_image(data, name="fuzz", max_pixels=1_000_000, max_side=512)
        except (InvalidImage, ImageTooLarge) as err:
            assert "fuzz" in err.message
        else:
            assert img.mode == "RGB"


def test_cmyk_jpeg_becomes_matching_rgb():
    original = quadrants((128, 128))
    data = encode(original.convert("CMYK"), "JPEG", quality=95)
    img = load_image(data, name="cmyk", **LIMITS)
    assert img.mode == "RGB" and img.size == (128, 128)
    for got, want in zip(centre_colours(img), centre_colours(original), strict=False):
        assert np.abs(np.array(got) - np.array(want)).max() <= 8, (got, want)


def test_rgba_png_is_composited_over_white():
    arr = np.zeros((20, 30, 4), np.uint8)
    arr[:, :10] = (255, 0, 0, 255)  # opaque red
    arr[:, 10:20] = (0, 0, 255, 0)  # fully transparent blue: white
    arr[:, 20:] = (0, 0, 0, 128)  # half-transparent black: mid grey
    img = load_image(encode(Image.fromarray(arr), "PNG"), name="rgba", **LIMITS)
    out = np.asarray(img)
    assert img.mode == "RGB"
    assert tuple(out[5, 5]) == (255, 0, 0)
    assert tuple(out[5, 15]) == (255, 255, 255)
    assert np.abs(out[5, 25].astype(int) - 127).max() <= 1


def test_grey_alpha_png_is_composited_over_white():
    la = Image.fromarray(np.stack([np.full((8, 8), 0, np.uint8), np.zeros((8, 8), np.uint8)], axis=-1), "LA")
    img = load_image(encode(la, "PNG"), name="la", **LIMITS)
    assert img.mode == "RGB" and np.all(np.asarray(img) == 255)


def test_16bit_grey_png_scales_to_8bit_instead_of_clipping():
    values = np.array([[0, 257 * 64, 32896, 65535]], np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit PNG
    out = np.asarray(load_image(data, name="sixteen", **LIMITS))
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]


def test_16bit_rgb_png_keeps_its_colours():
    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 0] = 65535  # red at full scale, 16 bits
    rgb16[..., 2] = 32896  # blue at half scale
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb16[..., ::-1]))  # OpenCV writes BGR
    assert ok
    out = np.asarray(load_image(data.tobytes(), name="rgb16", **LIMITS))
    assert tuple(out[4, 4]) == (255, 0, 128)


def test_palette_png_keeps_its_colours():
    original = quadrants()
    img = load_image(encode(original.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"),
                     name="palette", **LIMITS)
    assert img.mode == "RGB" and centre_colours(img) == centre_colours(original)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    img = load_image(buf.getvalue(), name="anim", **LIMITS)
    assert img.mode == "RGB" and tuple(np.asarray(img)[8, 8]) == (255, 0, 0)


def test_animated_webp_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    if getattr(Image.open(io.BytesIO(buf.getvalue())), "n_frames", 1) != 2:
        pytest.skip("this Pillow build writes no animated WebP")
    img = load_image(buf.getvalue(), name="anim", **LIMITS)
    assert tuple(np.asarray(img)[8, 8]) == (255, 0, 0)


@pytest.mark.parametrize("data", [png_declaring(100_000, 100_000), gif_declaring(65_535, 65_535),
                                  png_declaring(10_000, 10_000), png_declaring(10_000, 5_000)],
                         ids=["png-10G", "gif-4G", "png-100M", "png-50M"])
def test_decompression_bomb_is_refused_from_its_header(data):
    assert len(data) < 200  # a few bytes that declare billions of pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape either
        with pytest.raises(ImageTooLarge, match="bomb .*pixels"):
            load_image(data, name="bomb", **LIMITS)


def test_pixel_limit_is_checked_before_decoding():
    # 3000x3000 is under Pillow's own limit; its pixel data is truncated, so decoding would raise InvalidImage:
    # ImageTooLarge proves the size was refused from the header alone.
    with pytest.raises(ImageTooLarge, match="3000x3000"):
        load_image(png_declaring(3000, 3000), name="big", max_pixels=1_000_000, max_side=4096)
    with pytest.raises(InvalidImage, match="truncated"):
        load_image(png_declaring(3000, 3000), name="big", max_pixels=10_000_000, max_side=4096)


def test_image_longer_than_max_side_is_downscaled_keeping_aspect():
    img = load_image(encode(quadrants((3000, 1500)), "PNG"), name="huge", max_pixels=40_000_000, max_side=1024)
    assert img.size == (1024, 512)
    assert centre_colours(img) == centre_colours(quadrants())


def test_image_within_max_side_keeps_its_size():
    assert load_image(encode(quadrants((300, 200)), "PNG"), name="small", **LIMITS).size == (300, 200)


@pytest.mark.parametrize("orientation, stored", [
    (3, Image.Transpose.ROTATE_180),  # stored upside down
    (6, Image.Transpose.ROTATE_90),  # stored lying on its side: viewers rotate 90 degrees clockwise
    (8, Image.Transpose.ROTATE_270),
])
def test_exif_rotated_jpeg_comes_out_upright(orientation, stored):
    upright = quadrants((96, 64))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(upright.transpose(stored), "JPEG", quality=95, exif=exif.tobytes())
    img = load_image(data, name="phone.jpg", **LIMITS)
    assert img.size == upright.size
    for got, want in zip(centre_colours(img), centre_colours(upright), strict=False):
        assert np.abs(np.array(got) - np.array(want)).max() <= 8, (got, want)


def test_image_to_bgr_swaps_channels():
    bgr = image_to_bgr(Image.new("RGB", (4, 2), (255, 10, 0)))
    assert bgr.shape == (2, 4, 3) and bgr.dtype == np.uint8 and bgr.flags.c_contiguous
    assert tuple(bgr[0, 0]) == (0, 10, 255)


@pytest.mark.parametrize("size, expected", [
    ((512, 512), (1280, 1280)),  # square: short side 1024, then long side to 1280
    ((800, 600), (1280, 960)),
    ((600, 800), (960, 1280)),
    ((1000, 3000), (384, 1280)),  # 1024x3072 -> 427x1280 -> floored to 64
    ((4000, 100), (1280, 64)),  # never below 64
])
def test_resize_like_reference(size, expected):
    assert resize_like_reference(*size) == expected


def test_resize_like_reference_gives_multiples_of_64_with_long_side_1280():
    for w in range(64, 3000, 97):
        for h in (64, 333, 1024, 2500):
            out = resize_like_reference(w, h)
            assert all(side % 64 == 0 and 64 <= side <= 1280 for side in out)
            assert max(out) == 1280
