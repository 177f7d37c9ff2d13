"""Every PIL mode becomes the 8-bit RGB image it shows (traitsae.data.images.decode.to_rgb)."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from traitsae.data.images import ImageDataset
from traitsae.data.images.decode import to_rgb

WHITE = (255, 255, 255)


def _saved(tmp_path, img: Image.Image, name: str) -> Image.Image:
    """Round trip through a real file, so the mode is what a decoder gives."""
    img.save(tmp_path / name)
    return Image.open(tmp_path / name)


def _rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_16_bit_png_spans_the_8_bit_range(tmp_path):
    grey = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = _saved(tmp_path, Image.fromarray(grey), "g16.png")
    assert img.mode == "I;16"
    np.testing.assert_array_equal(_rgb(img)[0, :, 0], [0, 1, 128, 255])
    # What ImageDataset feeds the model is the same image, not the white PIL default.
    image_CHW = ImageDataset([str(tmp_path / "g16.png")], T.ToTensor(), 4)[0]["image"]
    np.testing.assert_allclose(image_CHW[0, 0].numpy() * 255, [0, 1, 128, 255], atol=1e-4)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16_bit_byte_orders(mode):
    values = [0, 1000, 65535]
    dtype = ">u2" if mode.endswith("B") else "<u2"
    img = Image.frombytes(mode, (3, 1), np.array(values, dtype=dtype).tobytes())
    np.testing.assert_array_equal(_rgb(img)[0, :, 1], np.rint(np.array(values) / 257))


def test_32_bit_integer_is_read_as_16_bit_and_refused_beyond(tmp_path):
    img = _saved(tmp_path, Image.fromarray(np.array([[0, 65535]], np.int32)), "i.tif")
    assert img.mode == "I"
    np.testing.assert_array_equal(_rgb(img)[0, :, 2], [0, 255])
    with pytest.raises(ValueError, match=r"mode I .*outside \[0, 65535\]"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32)))


def test_float_images_in_unit_or_byte_range(tmp_path):
    unit = _saved(tmp_path, Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), "f.tif")
    assert unit.mode == "F"
    np.testing.assert_array_equal(_rgb(unit)[0, :, 0], [0, 128, 255])
    byte = Image.fromarray(np.array([[0.0, 20.0, 255.0]], np.float32))
    np.testing.assert_array_equal(_rgb(byte)[0, :, 0], [0, 20, 255])
    for bad in (300.0, np.nan, -1.0):
        with pytest.raises(ValueError, match="mode F"):
            to_rgb(Image.fromarray(np.array([[0.0, bad]], np.float32)))


def test_palette_with_transparency_is_composited_over_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0  # palette entry 0 (black) is transparent
    img = _saved(tmp_path, img, "p.png")
    assert img.mode == "P" and "transparency" in img.info
    assert [tuple(px) for px in _rgb(img)[0]] == [WHITE, (200, 30, 40)]


@pytest.mark.parametrize(
    ("mode", "pixel", "expected"),
    [
        ("LA", (100, 0), WHITE),
        ("LA", (100, 255), (100, 100, 100)),
        ("LA", (0, 128), (127, 127, 127)),
        ("RGBA", (200, 0, 0, 255), (200, 0, 0)),
        ("RGBA", (0, 0, 0, 0), WHITE),
        ("RGBA", (0, 0, 255, 128), (127, 127, 255)),
        ("PA", (0, 0), WHITE),
    ],
)
def test_alpha_modes(mode, pixel, expected):
    got = tuple(_rgb(Image.new(mode, (1, 1), pixel))[0, 0])
    assert np.abs(np.subtract(got, expected)).max() <= 1, (mode, pixel, got)


@pytest.mark.parametrize("mode", ["La", "RGBa"])
def test_premultiplied_alpha_modes(mode):
    transparent = Image.new(mode, (1, 1), (0,) * len(mode))
    assert tuple(_rgb(transparent)[0, 0]) == WHITE
    opaque = Image.new(mode, (1, 1), (90,) * (len(mode) - 1) + (255,))
    assert tuple(_rgb(opaque)[0, 0]) == (90, 90, 90)


def test_cmyk(tmp_path):
    img = _saved(tmp_path, Image.new("CMYK", (1, 1), (255, 0, 0, 0)), "c.tif")
    assert img.mode == "CMYK"
    assert tuple(_rgb(img)[0, 0]) == (0, 255, 255)  # pure cyan


def test_bilevel_grey_and_rgb_keep_their_values(tmp_path):
    bilevel = _saved(tmp_path, Image.new("1", (2, 1), 0), "b.png")
    bilevel.load()
    bilevel.putpixel((1, 0), 1)
    assert bilevel.mode == "1" and _rgb(bilevel)[0, :, 0].tolist() == [0, 255]
    assert tuple(_rgb(Image.new("L", (1, 1), 77))[0, 0]) == (77, 77, 77)
    assert tuple(_rgb(Image.new("RGB", (1, 1), (1, 2, 3)))[0, 0]) == (1, 2, 3)
    assert tuple(_rgb(Image.new("YCbCr", (1, 1), (128, 128, 128)))[0, 0]) == (128, 128, 128)


def test_grey_with_a_transparent_value(tmp_path):
    img = Image.new("L", (2, 1), 10)
    img.putpixel((1, 0), 60)
    img.info["transparency"] = 10
    img = _saved(tmp_path, img, "lt.png")
    assert img.mode == "L" and img.info.get("transparency") == 10
    assert [tuple(px) for px in _rgb(img)[0]] == [WHITE, (60, 60, 60)]
