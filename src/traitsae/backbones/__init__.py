"""Backbones: `build_backbone(cfg.backbone)` -> `Backbone` (one interface for timm and open_clip)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from traitsae.backbones.base import Backbone, Final, Geometry, resolve_layers
from traitsae.backbones.openclip_vit import build_openclip
from traitsae.backbones.timm_vit import build_timm
from traitsae.errors import TraitsaeError

# Family registry: a new family is a builder function here plus conf/backbone/<name>.yaml files.
FAMILIES: dict[str, Callable[[Any], Backbone]] = {"timm": build_timm, "open_clip": build_openclip}
# The store's geometry is derived from these before the model is built (and checked after).
REQUIRED_KEYS = (
    "name", "family", "checkpoint", "image_size", "patch_size", "width", "depth",
    "n_prefix_tokens", "layers",
)  # fmt: skip


def check_backbone_cfg(cfg: Any) -> None:
    """Every key of REQUIRED_KEYS is set (TraitsaeError naming the missing ones otherwise)."""
    missing = [key for key in REQUIRED_KEYS if cfg.get(key) is None]
    if missing:
        raise TraitsaeError(
            f"backbone config {cfg.get('name')!r} lacks keys {missing}; see conf/backbone/*.yaml "
            "for complete examples."
        )


def build_backbone(cfg: Any, prune: bool = True) -> Backbone:
    """Build the backbone of `cfg` (the `backbone` config group); `prune` drops unused blocks."""
    check_backbone_cfg(cfg)
    family = cfg.family
    if family not in FAMILIES:
        raise TraitsaeError(
            f"unknown backbone family {family!r} in backbone {cfg.name!r}; known families: "
            f"{sorted(FAMILIES)}."
        )
    backbone = FAMILIES[family](cfg)
    check_geometry(cfg, backbone.geometry)
    if prune:
        # Blocks after the last requested layer never run (about 2x cheaper for a middle layer).
        backbone.trunk.prune_intermediate_layers(backbone.layers, prune_norm=True, prune_head=True)
        backbone.pruned = True
        backbone.text_tower = None  # extraction never needs it: free it
    return backbone


def check_geometry(cfg: Any, geometry: Geometry) -> None:
    """The config documents width/depth/patch/prefix tokens: they must match the built model."""
    expected = {  # config key -> what the built model has
        "width": geometry.d_model,
        "depth": geometry.depth,
        "patch_size": geometry.patch_size,
        "n_prefix_tokens": geometry.n_prefix_tokens,
        "image_size": geometry.image_size,
    }
    wrong = {
        key: (cfg.get(key), value) for key, value in expected.items() if int(cfg.get(key)) != value
    }
    if wrong:
        detail = ", ".join(f"{k}: config {c} vs model {m}" for k, (c, m) in wrong.items())
        raise TraitsaeError(
            f"backbone {cfg.name!r} ({cfg.checkpoint}) does not match its config ({detail}); fix "
            f"conf/backbone/{cfg.name}.yaml or the overrides."
        )


__all__ = [
    "Backbone", "FAMILIES", "Final", "Geometry", "build_backbone", "check_backbone_cfg", "resolve_layers",
]  # fmt: skip
