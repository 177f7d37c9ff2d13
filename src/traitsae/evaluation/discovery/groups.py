"""The two groups of a discovery and its strata, read from the store's per-image metadata."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from traitsae.errors import TraitsaeError

# Store columns that are bookkeeping, not metadata to group by.
NOT_GROUPABLE = ("valid", "index", "error", "done")


_MAX_VALUES_LISTED = 25


def parse_group(spec: Any, name: str) -> dict[str, list[str]]:
    """`{species: erato, subspecies: [lativita, notabilis]}` -> {column: [allowed values]}."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping) or not spec:
        raise TraitsaeError(
            f"eval.{name} must be a non-empty mapping of metadata column to value(s), e.g. "
            f"eval.{name}='{{species: erato, subspecies: lativita}}'; got {spec!r}."
        )
    group: dict[str, list[str]] = {}
    for column, values in spec.items():
        values = list(values) if isinstance(values, (list, tuple, ListConfig)) else [values]
        if not values:
            raise TraitsaeError(f"eval.{name}.{column} lists no values; give one or a list.")
        group[str(column)] = [str(v) for v in values]
    return group


def value_counts(values: np.ndarray) -> str:
    counts = Counter(str(v) for v in values).most_common()
    listed = ", ".join(f"{v!r} ({n})" for v, n in counts[:_MAX_VALUES_LISTED])
    more = (
        f", ... and {len(counts) - _MAX_VALUES_LISTED} more"
        if len(counts) > _MAX_VALUES_LISTED
        else ""
    )
    return listed + more


def column_listing(metadata: Mapping[str, np.ndarray]) -> str:
    valid_N = np.asarray(metadata["valid"], dtype=bool)
    return "; ".join(
        f"{c}: {value_counts(np.asarray(metadata[c])[valid_N])}"
        for c in sorted(metadata)
        if c not in NOT_GROUPABLE and c != "path"
    )


def group_mask(
    metadata: Mapping[str, np.ndarray], group: Mapping[str, list[str]], name: str, source: str
) -> np.ndarray:
    """Valid images matching every column of the group; errors list what is available."""
    valid_N = np.asarray(metadata["valid"], dtype=bool)
    mask_N = valid_N.copy()
    for column, allowed in group.items():
        if column not in metadata or column in NOT_GROUPABLE:
            raise TraitsaeError(
                f"eval.{name} filters on column {column!r}, which store {source} does not have. "
                f"Available metadata columns (values with image counts): "
                f"{column_listing(metadata)}."
            )
        mask_N &= np.isin(np.asarray(metadata[column]).astype(str), allowed)
    if not mask_N.any():
        listing = "; ".join(f"{c}: {value_counts(np.asarray(metadata[c])[valid_N])}" for c in group)
        raise TraitsaeError(
            f"eval.{name}={dict(group)} selects no valid image of store {source}. Values present "
            f"in the filtered columns (with image counts): {listing}."
        )
    return mask_N


def parse_strata(spec: Any) -> list[str]:
    """eval.strata: null, one column name or a list of them."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, (list, tuple, ListConfig)) and all(isinstance(c, str) for c in spec):
        return list(spec)
    raise TraitsaeError(
        f"eval.strata must be a metadata column or a list of them, e.g. eval.strata=[collection]; "
        f"got {spec!r}."
    )


def strata_labels(
    metadata: Mapping[str, np.ndarray], columns: Sequence[str], source: str
) -> np.ndarray | None:
    """One label per store row, e.g. "collection=NHM, camera=D7000"; None without strata."""
    if not columns:
        return None
    missing = [c for c in columns if c not in metadata or c in NOT_GROUPABLE]
    if missing:
        raise TraitsaeError(
            f"eval.strata names column(s) {missing} that store {source} does not have. Available "
            f"metadata columns (values with image counts): {column_listing(metadata)}."
        )
    parts = [[f"{c}={v}" for v in np.asarray(metadata[c]).astype(str)] for c in columns]
    return np.array([", ".join(values) for values in zip(*parts, strict=True)])


def describe_group(group: Mapping[str, list[str]]) -> str:
    return ", ".join(f"{col}={'|'.join(vals)}" for col, vals in group.items())
