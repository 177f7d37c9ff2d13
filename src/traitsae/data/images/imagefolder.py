"""Class-subfolder image collections: `root/<split dir>/<class>/<image>` (ImageNet, iNat21)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from traitsae.data.images.common import ImageList, require_dir
from traitsae.errors import TraitsaeError


def load_imagefolder(cfg: Any, split: str) -> ImageList:
    """`dataset.splits` maps a split name to its subfolder (null = the root itself)."""
    root = require_dir(Path(cfg.root), "image folder root")
    splits = dict(cfg.get("splits") or {})
    if splits and split not in splits:
        raise TraitsaeError(
            f"split={split!r} is not defined for dataset {cfg.name!r}; dataset.splits has "
            f"{sorted(splits)}."
        )
    sub = splits.get(split)
    folder = require_dir(root / sub if sub else root, f"split {split!r} folder", "dataset.splits")
    try:
        classes, class_to_idx = find_classes(str(folder))
    except FileNotFoundError as err:
        raise TraitsaeError(f"{folder} has no class subfolders ({err}).") from None
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    return ImageList(
        root=root,
        paths=[str(Path(p).resolve()) for p, _ in samples],
        labels=np.array([c for _, c in samples], dtype=np.int64),
        metadata={"species": [classes[c] for _, c in samples]},
    )
