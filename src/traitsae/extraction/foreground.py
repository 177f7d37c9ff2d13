"""Foreground flags for a store that is already extracted: no backbone pass, images only.

A store written before the flags existed, or with another `extract.foreground` rule, keeps its
activations: the flags are not part of the fingerprint. Re-running the same extract.py command
computes them from the images (decode, frame, masks or colour rule) and writes them into a copy
of the store that then replaces it -- the store is never modified in place, so a crash or a full
disk leaves the original whole. The copy needs the store's size in free disk space for a moment.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from traitsae.backbones import build_backbone
from traitsae.cluster.signals import ignore_job_signals
from traitsae.data.images import ImageDataset
from traitsae.data.images.foreground import ForegroundFlags, ForegroundRule
from traitsae.data.store import Store
from traitsae.data.store.writer import check_room
from traitsae.errors import TraitsaeError
from traitsae.locks import store_lock

log = logging.getLogger(__name__)


def ensure_foreground(cfg: DictConfig, out: Path, rule: ForegroundRule | None) -> bool:
    """Give the complete store `out` the flags of `rule` unless it has them; True if added."""
    if rule is None:
        return False
    with Store(out) as store:
        if store.has_foreground and store.foreground_rule == rule.to_json():
            return False
        paths = [str(p) for p in store.metadata["path"]]
        valid_N = store.valid.copy()
        size, grid = store.image_size, tuple(int(g) for g in store.grid)
        had = store.foreground_rule or ("flags of unknown rule" if store.has_foreground else "")
    log.info(
        "adding foreground flags (%s) to %s%s: images only, no backbone pass", rule.to_json(),
        out, f", replacing {had}" if had else "",
    )  # fmt: skip
    flags_NP = image_flags(cfg, paths, rule, size, grid) & valid_N[:, None]
    with store_lock(out):
        write_flags(out, flags_NP, rule.to_json())
    return True


def image_flags(
    cfg: DictConfig, paths: list[str], rule: ForegroundRule, size: int, grid: tuple[int, int]
) -> np.ndarray:
    """bool [N, P]: the flags of every image in `paths` (all False for an unreadable one)."""
    flags = ForegroundFlags.build(rule, cfg.dataset, frame_transform(cfg), size, grid)
    dataset = ImageDataset(paths, flags.to_tensor, size, foreground=flags)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=int(cfg.extract.batch_size),
        num_workers=int(cfg.extract.num_workers),
        worker_init_fn=ignore_job_signals,
    )
    parts = []
    for batch in loader:
        for reason in batch["foreground_error"]:
            if reason:  # a mask that does not fit its image
                raise TraitsaeError(reason)
        parts.append(batch["foreground"].numpy().astype(bool))
    return np.concatenate(parts) if parts else np.zeros((0, grid[0] * grid[1]), bool)


def frame_transform(cfg: DictConfig) -> object:
    """The backbone's preprocessing; it depends on the architecture, not the weights, so the
    model is built without loading them."""
    backbone_cfg = OmegaConf.create(OmegaConf.to_container(cfg.backbone, resolve=True))
    backbone_cfg.pretrained, backbone_cfg.weights = False, None
    return build_backbone(backbone_cfg).transform


def write_flags(out: Path, flags_NP: np.ndarray, rule_json: str) -> None:
    """A copy of `out` with `images/foreground` = flags_NP, renamed over `out`."""
    tmp = out.with_name(out.name + ".foreground.tmp")
    try:
        check_room(tmp, out.stat().st_size + flags_NP.nbytes)
        shutil.copyfile(out, tmp)
        with h5py.File(tmp, "r+", locking=False) as f:
            if "foreground" in f["images"]:
                del f["images/foreground"]
            f["images"].create_dataset("foreground", data=flags_NP, chunks=True)
            f.attrs.create("foreground", rule_json.encode(), dtype=h5py.string_dtype("utf-8"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
