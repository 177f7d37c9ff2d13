"""Which patches an image-level score pools over: `eval.patches` (all | foreground | auto).

The one place every evaluation (discovery, cub_traits, features; the explorer and the specimen
table) turns the option into a store view: `select_patches(store, eval.patches, sae)` reads the
store's foreground flags (`images/foreground`, recorded by extract.py), keeps only the images with
at least one foreground patch (the others are skipped, and said so) and sets `store.patch_mask`.
Pooling then goes through `pool_tokens(scores_BPM, pool, patch_keep(store, rows_B))`:
the max (or mean) over an image's foreground patches only.

`auto` (the default) pools over the foreground when the SAE was trained on it
(`data.tokens=foreground`, sae.json `foreground: true`), else over every patch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from traitsae.data.store import Store
from traitsae.data.store.schema import printable
from traitsae.errors import TraitsaeError

log = logging.getLogger(__name__)
PATCHES = ("auto", "all", "foreground")


def check_patches(patches: str) -> None:
    if patches not in PATCHES:
        raise TraitsaeError(
            f"eval.patches must be one of {PATCHES}, got {patches!r}: pool image scores over "
            "every patch (all), the foreground patches only (foreground), or as the SAE was "
            "trained (auto)."
        )


def resolve_patches(patches: str, sae: Any = None) -> str:
    """`all` or `foreground`: `auto` follows the SAE's training (sae.json `foreground`)."""
    check_patches(patches)
    if patches != "auto":
        return patches
    meta = getattr(sae, "meta", None) or {}
    return "foreground" if meta.get("foreground") else "all"


def select_patches(store: Store, patches: str, sae: Any = None) -> dict[str, Any]:
    """Apply `eval.patches` to `store` (see the module docstring); returns what the outputs
    record: {"patches": all | foreground, "skipped_without_foreground": [paths]}."""
    mode = resolve_patches(patches, sae)
    if mode == "all":
        store.patch_mask = None
        return {"patches": "all", "skipped_without_foreground": []}
    flags_NP = store.foreground()
    if flags_NP is None:
        raise TraitsaeError(
            f"eval.patches={patches} pools image scores over the foreground patches, but store "
            f"{store.path} has no foreground flags (images/foreground). Add them without "
            "re-extracting the activations: rerun the extract.py command that wrote the store "
            "(extract.foreground.rule=auto by default: the dataset's masks, else the "
            "border-colour rule; docs/guide/extract.md). Or pool over every patch with "
            "eval.patches=all."
        )
    empty_N = store.valid & ~flags_NP.any(axis=1)
    skipped = [printable(str(p)) for p in store.metadata["path"][empty_N]]
    if skipped:
        log.warning(
            "eval.patches=foreground: skipping %d of %d images of %s that have no foreground "
            "patch (no mask, an empty mask, or nothing apart from the background); first: %s",
            len(skipped), int(store.valid.sum()), store.path, ", ".join(skipped[:3]),
        )  # fmt: skip
    store.restrict(~empty_N)
    if not store.valid.any():
        raise TraitsaeError(
            f"eval.patches=foreground: no image of store {store.path} has a foreground patch "
            f"(rule {store.foreground_rule or 'unknown'}); check the masks or the background "
            "rule (extract.foreground) and rerun extract.py, or use eval.patches=all."
        )
    store.patch_mask = flags_NP
    return {"patches": "foreground", "skipped_without_foreground": skipped}


def patch_keep(store: Store, rows_B: np.ndarray, device: Any = "cpu") -> torch.Tensor | None:
    """bool [B, P]: the patches of store rows `rows_B` that scores pool over (None: all)."""
    if store.patch_mask is None:
        return None
    return torch.from_numpy(store.patch_mask[np.asarray(rows_B)]).to(device)


def pool_tokens(
    s_BPM: torch.Tensor, pool: str, keep_BP: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, P, M] -> [B, M]: max or mean over each image's tokens, or over its `keep_BP`
    patches only (every image has at least one: `select_patches` skips the others)."""
    if keep_BP is None:
        return s_BPM.amax(dim=1) if pool == "max" else s_BPM.mean(dim=1)
    keep_BP1 = keep_BP.to(s_BPM.device)[:, :, None]
    if pool == "max":
        return s_BPM.masked_fill(~keep_BP1, -torch.inf).amax(dim=1)
    return (s_BPM * keep_BP1).sum(dim=1) / keep_BP1.sum(dim=1).clamp(min=1)
