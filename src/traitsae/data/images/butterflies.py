"""Butterfly collections (e.g. Heliconius): an image folder plus a metadata CSV.

Keys: `metadata` (CSV relative to root), `encoding` (of the CSV), `file_column` (paths relative
to root), `species_column`, `subspecies_column`, `split_column` (when the CSV has no such column
every image is in every split), `filters` (column -> value or list of values, e.g. {view: dorsal}),
`strict`. Labels index the sorted species names of the filtered CSV (the same in every split);
every other CSV column is kept as per-image metadata.

Rows that cannot be used are dropped with a warning that counts them and names their lines:
rows whose fields do not match the header or whose file/species/subspecies is empty, and repeats
of an image file already listed (the first row of a file wins). `strict=true` makes either an
error instead.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from traitsae.data.images.common import ImageList, require_dir, require_file
from traitsae.errors import TraitsaeError

log = logging.getLogger(__name__)
EXTRA = "\0extra"  # where csv puts fields beyond the header's


def load_butterflies(cfg: Any, split: str) -> ImageList:
    root = require_dir(Path(cfg.root), "butterflies dataset root")
    csv_path = require_file(root / str(cfg.metadata), "metadata CSV", key="dataset.metadata")
    rows, lines, header = _read_csv(csv_path, str(cfg.get("encoding") or "utf-8-sig"))
    file_col, species_col = str(cfg.file_column), str(cfg.species_column)
    subspecies_col = cfg.get("subspecies_column")
    required = [file_col, species_col] + ([str(subspecies_col)] if subspecies_col else [])
    missing = [c for c in required if c not in header]
    if missing:
        raise TraitsaeError(
            f"{csv_path} lacks columns {missing} (has {header}); set dataset.file_column / "
            "dataset.species_column / dataset.subspecies_column to the CSV's names."
        )
    rows = usable_rows(rows, lines, required, csv_path, strict=bool(cfg.get("strict", False)))
    rows = apply_filters(rows, cfg.get("filters") or {}, header, csv_path)
    species = sorted({r[species_col] for r in rows})
    split_col = cfg.get("split_column")
    if split_col and split_col in header:
        rows = [r for r in rows if r[split_col] == split]
    keep_cols = [c for c in header if c != file_col]
    return ImageList(
        root=root,
        paths=[str((root / r[file_col]).resolve()) for r in rows],
        labels=np.array([species.index(r[species_col]) for r in rows], dtype=np.int64),
        metadata={_column_key(c, cfg): [r[c] for r in rows] for c in keep_cols},
    )


def _column_key(column: str, cfg: Any) -> str:
    """Species/subspecies columns are stored under the contract's names."""
    if column == cfg.species_column:
        return "species"
    if cfg.get("subspecies_column") and column == cfg.subspecies_column:
        return "subspecies"
    return column.replace("/", "_")


def _read_csv(path: Path, encoding: str) -> tuple[list[dict[str, str]], list[int], list[str]]:
    """Rows, the line number each ends on, and the header of a CSV file."""
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as err:
        raise TraitsaeError(
            f"{path} is not {encoding} text: byte {err.start} ({err.object[err.start : err.start + 1]!r}) "
            f"{err.reason}. Re-save the CSV as UTF-8 (e.g. iconv -f latin1 -t utf-8), or name its "
            "encoding with dataset.encoding=<codec>, e.g. dataset.encoding=latin-1."
        ) from None
    except LookupError:
        raise TraitsaeError(
            f"dataset.encoding={encoding!r} is not a text encoding Python knows (e.g. utf-8, "
            "latin-1, cp1252)."
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=EXTRA)
    rows, lines = [], []
    for row in reader:
        rows.append(row)
        lines.append(reader.line_num)
    return rows, lines, list(reader.fieldnames or [])


def usable_rows(
    rows: list[dict[str, str]], lines: list[int], required: list[str], csv_path: Path, strict: bool
) -> list[dict[str, str]]:
    """Drop (warn) or refuse (strict) rows with missing fields and repeated image files
    (`required[0]` is the file column)."""
    broken, repeated, seen, kept = [], [], set(), []
    for row, line in zip(rows, lines, strict=True):
        if EXTRA in row or None in row.values() or any(not row[c].strip() for c in required):
            broken.append(line)
            continue
        file = os.path.normpath(row[required[0]])
        if file in seen:
            repeated.append(line)
        else:
            seen.add(file)
            kept.append(row)
    problems = []
    if broken:
        problems.append(
            f"{len(broken)} rows whose fields do not match the header or leave one of "
            f"{required} empty (lines {_lines(broken)})"
        )
    if repeated:
        problems.append(
            f"{len(repeated)} rows repeating an image file listed earlier (lines "
            f"{_lines(repeated)}; the first row of each file is kept)"
        )
    if problems and strict:
        raise TraitsaeError(
            f"{csv_path} has {' and '.join(problems)}. Fix the CSV, or pass dataset.strict=false "
            "to drop these rows with a warning."
        )
    if problems:
        log.warning(
            "%s: dropped %s. Pass dataset.strict=true to make this an error.",
            csv_path, " and ".join(problems),
        )  # fmt: skip
    return kept


def _lines(numbers: list[int], shown: int = 5) -> str:
    listed = ", ".join(map(str, numbers[:shown]))
    return listed + (f", ... ({len(numbers) - shown} more)" if len(numbers) > shown else "")


def apply_filters(
    rows: list[dict[str, str]], filters: Mapping[str, Any], header: list[str], csv_path: Path
) -> list[dict[str, str]]:
    """Keep rows whose `column` equals the value (or one of the values) of every filter."""
    for column, wanted in filters.items():
        if column not in header:
            raise TraitsaeError(
                f"dataset.filters names column {column!r}, which {csv_path} does not have "
                f"(columns: {header})."
            )
        many = isinstance(wanted, list | tuple) or OmegaConf.is_list(wanted)
        allowed = {str(w) for w in wanted} if many else {str(wanted)}
        rows = [r for r in rows if r[column] in allowed]
    return rows
