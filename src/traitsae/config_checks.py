"""Up-front checks of scalar config values: each names the key, the value and what is expected."""

from __future__ import annotations

import math
from typing import Any

from traitsae.errors import TraitsaeError


def integer(key: str, value: Any, minimum: int | None = None) -> int:
    """`value` as an int (>= `minimum`), or a TraitsaeError naming `key`."""
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise TraitsaeError(f"{key} must be an integer, got {value!r}.") from None
    if minimum is not None and number < minimum:
        raise TraitsaeError(f"{key} must be an integer >= {minimum}, got {number}.")
    return number


def number(key: str, value: Any, positive: bool = False) -> float:
    """`value` as a finite float (> 0 when `positive`), or a TraitsaeError naming `key`."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = math.nan
    if not math.isfinite(result) or (positive and result <= 0):
        kind = "positive number" if positive else "number"
        raise TraitsaeError(f"{key} must be a {kind}, got {value!r}.")
    return result


def fraction(key: str, value: Any) -> float:
    """`value` as a float in [0, 1), or a TraitsaeError naming `key`."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = math.nan
    if not 0.0 <= result < 1.0:
        raise TraitsaeError(f"{key} must be a number in [0, 1), got {value!r}.")
    return result
