"""How two configurations differ, key by key: what a refused resume or overwrite lists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

MISSING = "<absent>"


class Change(NamedTuple):
    key: str  # dotted path, e.g. "sae.k"
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one {dotted.key: leaf} mapping (lists are leaves)."""
    if not isinstance(tree, Mapping) or not tree:
        return {prefix.rstrip("."): tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every dotted key whose value differs (or exists on one side only), sorted."""
    before, after = flatten(old), flatten(new)
    keys = sorted(
        k for k in before.keys() | after.keys() if before.get(k, MISSING) != after.get(k, MISSING)
    )
    return [Change(k, before.get(k, MISSING), after.get(k, MISSING)) for k in keys]
