"""The one writer of evaluation outputs: JSON, CSV tables and figures, each written to a temporary
name beside its target and renamed when complete (a crash never leaves half a file under the
final name, and never touches an input)."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def replacing(path: Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> Path:
    """`data` as indented JSON (with a final newline)."""
    with replacing(path) as f:
        f.write(json.dumps(data, indent=2) + "\n")
    return Path(path)


def write_csv(
    path: Path, fields: Sequence[str], rows: Sequence[Mapping[str, Any] | Sequence[Any]]
) -> Path:
    """A CSV table: a header of `fields`, then one line per row (a mapping, whose keys outside
    `fields` are left out, or a sequence in `fields` order)."""
    with replacing(path, newline="") as f:
        if rows and isinstance(rows[0], Mapping):
            writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        else:
            plain = csv.writer(f)
            plain.writerow(fields)
            plain.writerows(rows)
    return Path(path)


def write_figure(fig: Any, path: Path, **savefig_kwargs: Any) -> Path:
    """A matplotlib figure as PNG (the caller closes it)."""
    with replacing(path, "wb") as f:
        fig.savefig(f, format="png", **savefig_kwargs)
    return Path(path)
