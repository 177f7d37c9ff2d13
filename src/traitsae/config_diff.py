"""How two configurations differ, key by key: what a refused resume or overwrite lists."""

from __future__ import annotations

import json
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


# The fingerprint key that holds the digest of a store's image list (see extraction.jobs).
IMAGE_LIST_KEY = "image_list"


def fingerprint_difference(old: str | None, new: str) -> str:
    """Human summary of how two JSON fingerprints differ: `key: old -> new` for each changed key;
    the image-list digest is explained in words rather than shown as two hashes."""
    try:
        before, after = json.loads(old or ""), json.loads(new)
    except json.JSONDecodeError:
        return "the existing file carries no traitsae fingerprint"
    words = []
    for change in changed_keys(before, after):
        if change.key != IMAGE_LIST_KEY:
            words.append(str(change))
        elif change.old == MISSING:
            words.append("image list: the file predates the image-list check, so its images "
                         "cannot be confirmed to be these")  # fmt: skip
        else:
            words.append("image list: the images' paths, labels or file sizes changed since it "
                         f"was written (digest {str(change.old)[:12]} -> {str(change.new)[:12]})")  # fmt: skip
    return "; ".join(words) or "no difference"


def predates_image_list(old: str | None, new: str) -> bool:
    """Whether fingerprint `old` is `new` without the image-list digest: a file written before
    fingerprints held the image list, of otherwise the same configuration."""
    try:
        before, after = json.loads(old or ""), json.loads(new)
    except json.JSONDecodeError:
        return False
    if not isinstance(before, dict) or IMAGE_LIST_KEY in before:
        return False
    return {**before, IMAGE_LIST_KEY: after.get(IMAGE_LIST_KEY)} == after
