"""Any PIL image -> 8-bit RGB, with a rule for every mode (what `ImageDataset` feeds models).

PIL's own `convert("RGB")` clips 16- and 32-bit values to 255 (a 16-bit PNG turns white) and
drops transparency. Here:
- `I;16*` (16-bit grey: PNG, TIFF) and `I` (32-bit integer, what 16-bit files decode to in some
  readers): the 16-bit range 0..65535 maps to 0..255. `I` values outside it are an error.
- `F` (32-bit float): values in [0, 1] map to 0..255, values in [0, 255] are kept; anything
  else (or NaN/inf) is an error.
- Transparency (`RGBA`, `LA`, `La`, `RGBa`, `PA`, and `P`/`L`/`RGB` with a transparent colour)
  is composited over white, the background of most specimen photographs.
- `CMYK` uses the file's ICC profile when it has one; every other mode (`1`, `L`, `P`, `RGB`,
  `YCbCr`, `LAB`, `HSV`, ...) is PIL's conversion.
An error marks the image invalid with its reason (see `ImageDataset`); nothing is guessed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms

BACKGROUND = (255, 255, 255)
ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as an 8-bit RGB image (the rules are in the module docstring); ValueError when its
    values have no 8-bit meaning."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        return _grey(np.asarray(img, dtype=np.float64), 65535.0, mode)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        return _grey(values, 1.0 if values.size and values.max() <= 1.0 else 255.0, mode)
    if mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        profile = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        return ImageCms.profileToProfile(
            img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    return img.convert("RGB")


def _grey(values: np.ndarray, full_scale: float, mode: str) -> Image.Image:
    """Grey values in [0, full_scale] -> 8-bit RGB (round to nearest)."""
    if values.size and not (
        np.isfinite(values).all() and 0 <= values.min() <= values.max() <= full_scale
    ):
        raise ValueError(
            f"mode {mode} image with values in [{values.min():g}, {values.max():g}], outside "
            f"[0, {full_scale:g}]: it has no 8-bit meaning; convert it to 8 or 16 bits"
        )
    grey = np.rint(values * (255.0 / full_scale)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
