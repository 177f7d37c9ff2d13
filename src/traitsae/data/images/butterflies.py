"""Butterfly collections (e.g. Heliconius): an image folder plus a metadata CSV.

Keys (DESIGN.md): `metadata` (CSV relative to root), `file_column` (paths relative to root),
`species_column`, `subspecies_column`, `split_column` (when the CSV has no such column every image
is in every split), `filters` (column -> value or list of values, e.g. {view: dorsal}).
Labels index the sorted species names of the filtered CSV (the same in every split); every other
CSV column is kept as per-image metadata.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from traitsae.data.images.common import ImageList, require_dir, require_file
from traitsae.errors import TraitsaeError


def load_butterflies(cfg: Any, split: str) -> ImageList:
    root = require_dir(Path(cfg.root), "butterflies dataset root")
    csv_path = require_file(root / str(cfg.metadata), "metadata CSV", key="dataset.metadata")
    rows, header = _read_csv(csv_path)
    file_col, species_col = str(cfg.file_column), str(cfg.species_column)
    subspecies_col = cfg.get("subspecies_column")
    required = [file_col, species_col] + ([str(subspecies_col)] if subspecies_col else [])
    missing = [c for c in required if c not in header]
    if missing:
        raise TraitsaeError(
            f"{csv_path} lacks columns {missing} (has {header}); set dataset.file_column / "
            "dataset.species_column / dataset.subspecies_column to the CSV's names."
        )
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


def _read_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    return rows, header


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
