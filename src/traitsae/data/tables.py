"""Whitespace-separated text tables: the `.txt` files of the CUB layout.

The CUB loader reads them; the demo generator writes them (and reads them back)."""

from __future__ import annotations

from pathlib import Path

from traitsae.errors import TraitsaeError


def read_table(path: Path, n_fields: int) -> list[list[str]]:
    """Whitespace-separated lines -> first `n_fields` fields (extra fields are ignored)."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=n_fields - 1) if n_fields == 2 else line.split()
        if len(parts) < n_fields:
            raise TraitsaeError(
                f"{path}:{lineno}: expected {n_fields} whitespace-separated fields, got {line!r}."
            )
        rows.append(parts[:n_fields])
    return rows
