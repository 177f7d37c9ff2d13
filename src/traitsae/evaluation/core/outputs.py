"""The one writer of evaluation outputs: JSON, CSV tables and figures, each written to a temporary
name beside its target and renamed when complete (a crash never leaves half a file under the
final name, and never touches an input)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


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
    """`data` as indented, strict JSON (with a final newline). Every number is finite: a NaN or
    inf (a statistic without data: a CI of one value, the AP of a class without positives...)
    is written as null, listed under the top-level `non_finite` key ({json path: "nan"|"inf"})
    and named in a warning, so no undefined number passes for a measured one."""
    clean, bad = finite_or_null(data)
    if bad:
        log.warning(
            "%s: %d value(s) are undefined (NaN or inf) and are written as null: %s%s",
            Path(path).name,
            len(bad),
            ", ".join(f"{k} = {v}" for k, v in list(bad.items())[:8]),
            " ..." if len(bad) > 8 else "",
        )
        if isinstance(clean, dict):
            clean["non_finite"] = bad
    with replacing(path) as f:
        f.write(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    return Path(path)


def finite_or_null(data: Any, where: str = "") -> tuple[Any, dict[str, str]]:
    """`data` (JSON-like) with every non-finite float replaced by None, and {json path: its
    value as text} of those replaced."""
    if isinstance(data, float):
        if math.isfinite(data):
            return data, {}
        return None, {where or "$": str(data)}
    if isinstance(data, Mapping):
        out, bad = {}, {}
        for key, value in data.items():
            out[key], found = finite_or_null(value, f"{where}.{key}" if where else str(key))
            bad |= found
        return out, bad
    if isinstance(data, (list, tuple)):
        pairs = [finite_or_null(value, f"{where}[{i}]") for i, value in enumerate(data)]
        return [v for v, _ in pairs], {k: v for _, found in pairs for k, v in found.items()}
    return data, {}


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
