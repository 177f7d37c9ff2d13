"""What a store is: its config identity (the fingerprint that guards resuming) and Job."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from traitsae.backbones import check_backbone_cfg, resolve_layers
from traitsae.config_diff import IMAGE_LIST_KEY
from traitsae.data.images import ImageList
from traitsae.data.images.foreground import ForegroundRule, foreground_rule
from traitsae.version import __version__


@dataclass
class Job:
    """One store to write: rows [lo, hi) of the split's image list."""

    out: Path
    lo: int
    hi: int
    fingerprint: str
    attrs: dict[str, Any] = field(default_factory=dict)
    foreground: ForegroundRule | None = None  # the flags to record (not in the fingerprint)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The parts of the config that define a store's content, resolved (stored as `config`)."""
    out: dict[str, Any] = {
        key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "dataset")
    }
    # Evaluation-only dataset keys (the discovery contrast pair, the segmentation-mask layout)
    # do not change activations.
    for key in ("contrast", "masks", "mask_classes"):
        out["dataset"].pop(key, None)
    out.update(split=str(cfg.split), seed=int(cfg.seed))
    out["extract"] = {"precision": str(cfg.extract.precision)}
    return out


def make_job(cfg: DictConfig, images: ImageList, out: Path, lo: int, hi: int) -> Job:
    """The store of rows [lo, hi): its root attrs and the fingerprint that guards resuming."""
    check_backbone_cfg(cfg.backbone)
    layers = resolve_layers(cfg.backbone.layers, int(cfg.backbone.depth), cfg.backbone.name)
    content = resolved_config(cfg)
    content["backbone"]["layers"] = layers
    key = {**content, "n_images": len(images), "rows": [lo, hi]}
    key[IMAGE_LIST_KEY] = image_list_digest(images, lo, hi)
    # The fingerprint decides whether an existing file may be resumed: same content, same rows,
    # same images in them (a folder that changed but kept its count must not resume).
    fingerprint = json.dumps(key, sort_keys=True)
    b = cfg.backbone
    side = int(b.image_size) // int(b.patch_size)
    attrs = {
        "backbone": b.name,
        "dataset": cfg.dataset.name,
        "split": cfg.split,
        "d_model": int(b.width),
        "n_patches": side * side,
        "n_prefix_tokens": int(b.n_prefix_tokens),
        "grid": [side, side],
        "layers": layers,
        "depth": int(b.depth),
        "image_size": int(b.image_size),
        "n_images": hi - lo,
        "config": OmegaConf.to_yaml(OmegaConf.create(content)),
        "image_root": str(images.root),
        "traitsae_version": __version__,
    }
    # The flags do not change the activations: their rule is an attr of its own, outside the
    # fingerprint, so stores extracted before (or with another rule) still resume and load.
    rule = configured_foreground(cfg)
    if rule is not None:
        attrs["foreground"] = rule.to_json()
    return Job(out, lo, hi, fingerprint, attrs, rule)


def configured_foreground(cfg: DictConfig) -> ForegroundRule | None:
    """`extract.foreground` of this config, resolved against its dataset."""
    options = OmegaConf.to_container(
        cfg.extract.get("foreground") or {"rule": "none"}, resolve=True
    )
    assert isinstance(options, dict)
    return foreground_rule(options, cfg.dataset)


def image_rows(images: ImageList, lo: int, hi: int) -> dict[str, np.ndarray]:
    """The images/ columns of rows [lo, hi): index (global position), path, label, metadata."""
    rows: dict[str, np.ndarray] = {"index": np.arange(lo, hi, dtype=np.int64)}
    for key, values in images.store_images().items():
        dtype = np.int64 if key == "label" else object
        rows[key] = np.asarray(values, dtype=dtype)[lo:hi]
    return rows


def image_list_digest(images: ImageList, lo: int, hi: int) -> str:
    """sha256 of rows [lo, hi) of the image list: every images/ column (path, label, metadata)
    and each file's size (-1 when missing). A renamed, replaced or re-labelled image changes it;
    one `stat` per image, no image is read."""
    digest = hashlib.sha256()
    columns = image_rows(images, lo, hi)
    for key in sorted(columns):
        digest.update(f"{key}\0".encode())
        text = "\0".join(map(str, columns[key].tolist()))
        digest.update(text.encode("utf-8", "surrogateescape"))
    sizes = [_file_size(path) for path in images.paths[lo:hi]]
    digest.update(("size\0" + "\0".join(map(str, sizes))).encode())
    return digest.hexdigest()


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # unreadable images are stored as invalid rows; a missing file is listed too
