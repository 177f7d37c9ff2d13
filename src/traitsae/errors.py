"""User-facing errors: one clear paragraph, no traceback from deep inside h5py or torch."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class TraitsaeError(Exception):
    """Bad input or state the user can fix; the message says what and how."""


def exit_on_user_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point: a TraitsaeError prints `error: ...` and exits 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TraitsaeError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
