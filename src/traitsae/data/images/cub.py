"""CUB-200-2011 layout (also written by the synthetic demo generator).

root/images.txt `<id> <relative path>`, image_class_labels.txt `<id> <class id>`, classes.txt
`<class id> <name>`, train_test_split.txt `<id> <1 = train>`, attributes.txt `<attr id> <name>`,
attributes/image_attribute_labels.txt `<id> <attr id> <is_present> <certainty id> [<time> ...]`
(some lines of the real file carry extra fields: only the first four are read).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traitsae.data.images.common import ImageList, require_dir, require_file
from traitsae.data.tables import read_table
from traitsae.errors import TraitsaeError

SPLITS = {"train": {1}, "test": {0}, "all": {0, 1}}


def load_cub(root: str | Path, split: str) -> ImageList:
    """Images of `split` (train, test or all) with labels (class id - 1) and metadata."""
    root = require_dir(Path(root), "CUB dataset root")
    if split not in SPLITS:
        raise TraitsaeError(f"split={split!r} is not a CUB split; use one of {sorted(SPLITS)}.")
    images = dict(read_table(require_file(root / "images.txt", "CUB image list"), 2))
    labels = dict(read_table(require_file(root / "image_class_labels.txt", "CUB labels file"), 2))
    classes = dict(read_table(require_file(root / "classes.txt", "CUB class list"), 2))
    is_train = dict(read_table(require_file(root / "train_test_split.txt", "CUB split file"), 2))
    ids = sorted((int(i) for i in images), key=int)
    keep = [i for i in ids if int(is_train.get(str(i), -1)) in SPLITS[split]]
    class_ids = [int(labels[str(i)]) for i in keep]
    return ImageList(
        root=root,
        paths=[str((root / "images" / images[str(i)]).resolve()) for i in keep],
        labels=np.array([c - 1 for c in class_ids], dtype=np.int64),
        metadata={
            "image_id": [str(i) for i in keep],
            "species": [classes[str(c)] for c in class_ids],
        },
    )
