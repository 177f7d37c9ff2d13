"""Segmentation-mask layout, framing through the backbone preprocessing, patch-label rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from traitsae.data import synthetic
from traitsae.data.images.masks import (
    frame_labels,
    load_mask_layout,
    patch_class_counts,
    patch_labels,
    read_mask_classes,
)
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.frames import Frame

CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"


def layout_cfg(root, masks="masks", classes="classes.txt"):
    return OmegaConf.create(
        {"name": "d", "root": str(root), "masks": masks, "mask_classes": classes}
    )


def test_layout_matches_masks_to_images_by_path_tail(tmp_path):
    (tmp_path / "masks" / "a").mkdir(parents=True)
    for rel in ("a/x", "x", "y"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / f"{rel}.png")
    (tmp_path / "classes.txt").write_text("0 background\n1 head\n2 dorsal fin\n")
    layout = load_mask_layout(layout_cfg(tmp_path))
    assert layout.classes == {1: "head", 2: "dorsal fin"}
    assert layout.mask_path("/data/images/a/x.jpg") == tmp_path / "masks" / "a" / "x.png"
    assert layout.mask_path("/data/images/b/x.jpg") == tmp_path / "masks" / "x.png"  # flat folder
    assert layout.mask_path("/data/y.jpeg") == tmp_path / "masks" / "y.png"
    assert layout.mask_path("/data/z.jpg") is None


def test_classes_file_json_and_errors(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"0": "bg", "1": "head", "3": "eye"}))
    assert read_mask_classes(tmp_path / "c.json") == {1: "head", 3: "eye"}
    (tmp_path / "bad.txt").write_text("head 1\n")
    with pytest.raises(TraitsaeError, match="bad.txt"):
        read_mask_classes(tmp_path / "bad.txt")
    with pytest.raises(TraitsaeError, match="no segmentation masks"):
        load_mask_layout(layout_cfg(tmp_path, masks=None))
    with pytest.raises(TraitsaeError, match="does not exist"):
        load_mask_layout(layout_cfg(tmp_path, masks="nope"))


def test_mask_read_checks_values_mode_and_size(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("1 head\n")
    Image.fromarray(np.array([[0, 1], [7, 1]], np.uint8)).save(tmp_path / "masks" / "m.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "masks" / "rgb.png")
    layout = load_mask_layout(layout_cfg(tmp_path))
    with pytest.raises(TraitsaeError, match=r"pixel values \[7\]"):
        layout.read(tmp_path / "masks" / "m.png")
    with pytest.raises(TraitsaeError, match="mode 'RGB'"):
        layout.read(tmp_path / "masks" / "rgb.png")
    with pytest.raises(TraitsaeError, match="2 x 2 px but its image is 3 x 2"):
        layout.read(tmp_path / "masks" / "m.png", image_size=(3, 2))


@pytest.mark.parametrize("cut", [20, 60])  # in the header / in the pixel data
def test_a_truncated_mask_is_named(tmp_path, cut):
    """A truncated mask PNG used to raise PIL's OSError without the file's name (a traceback)."""
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("1 head\n")
    path = tmp_path / "masks" / "m.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 2, (64, 64), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:cut])
    layout = load_mask_layout(layout_cfg(tmp_path))
    with pytest.raises(TraitsaeError, match=rf"mask {path} cannot be read .*truncated"):
        layout.read(path)


def test_patch_label_rules_equal_a_naive_loop():
    rng = np.random.default_rng(0)
    labels_HW = rng.choice(4, size=(12, 12), p=[0.5, 0.3, 0.15, 0.05])
    counts_PK = patch_class_counts(labels_HW, (3, 3), 4)
    for rule in ("majority", "any"):
        got = patch_labels(counts_PK, [1, 2, 3], rule)
        for r in range(3):
            for c in range(3):
                block = labels_HW[4 * r : 4 * r + 4, 4 * c : 4 * c + 4].ravel()
                hist = np.bincount(block, minlength=4)
                for j, cls in enumerate([1, 2, 3]):
                    want = hist[cls] > 0 if rule == "any" else int(np.argmax(hist)) == cls
                    assert got[3 * r + c, j] == want
    with pytest.raises(TraitsaeError, match="patch_rule"):
        patch_labels(counts_PK, [1], "most")


def test_majority_counts_background_and_ties_go_to_the_lowest_id():
    counts_PK = np.array([[10, 6, 0], [0, 8, 8], [2, 1, 1]])
    assert patch_labels(counts_PK, [1, 2], "majority").tolist() == [
        [False, False],
        [True, False],
        [False, False],
    ]
    assert patch_labels(counts_PK, [1, 2], "any").tolist() == [
        [True, False],
        [True, True],
        [True, True],
    ]


def test_masks_are_framed_like_the_backbone_frames_its_images():
    """A non-square image through tiny's transform with crop_pct 0.875 (resize 73, crop 64).

    Each 12 x 12 block of the raw image gets its own colour and the mask the block's id; after
    the backbone's own (bicubic, antialiased) transform, the model input's pixel colours must be
    the colour of the block the framed (nearest-neighbour) mask claims, wherever the mask is
    constant 2 px around (bicubic blends across block edges). A mask one pixel off fails.
    """
    import torch

    from traitsae.backbones import build_backbone

    cfg = OmegaConf.load(CONF / "backbone" / "tiny.yaml")
    cfg.crop_pct = 0.875
    transform = build_backbone(cfg).transform
    height, width, side = 96, 120, 12
    ids_HW = (np.arange(height)[:, None] // side) * 64 + np.arange(width)[None, :] // side
    palette = np.random.default_rng(0).integers(0, 256, size=(ids_HW.max() + 1, 3))
    pixels_3HW = transform(Image.fromarray(palette[ids_HW].astype(np.uint8))) * 0.5 + 0.5
    framed_HW = frame_labels(Frame.from_transform(transform, 64).image_ops, ids_HW)
    assert framed_HW.shape == (64, 64) == tuple(pixels_3HW.shape[1:])

    def interior_matches(labels_HW: np.ndarray) -> torch.Tensor:
        pad = np.pad(labels_HW, 2, mode="edge")
        interior_HW = np.ones_like(labels_HW, dtype=bool)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                interior_HW &= pad[2 + dy : 66 + dy, 2 + dx : 66 + dx] == labels_HW
        expected_3HW = torch.from_numpy(palette[labels_HW].transpose(2, 0, 1) / 255.0)
        close_HW = (pixels_3HW - expected_3HW).abs().amax(0) < 0.02
        assert interior_HW.mean() > 0.2
        return close_HW[torch.from_numpy(interior_HW)]

    assert interior_matches(framed_HW).all()
    for axis in (0, 1):
        assert not interior_matches(np.roll(framed_HW, 1, axis=axis)).all()
    # Ignoring the crop (a plain resize to 64 x 64) frames a different region altogether.
    assert (frame_labels(Frame.simple(64, "stretch").image_ops, ids_HW) != framed_HW).mean() > 0.5


def test_frame_refuses_unknown_geometry():
    with pytest.raises(TraitsaeError, match="eval.frame"):
        frame_labels([lambda img: img.rotate(90)], np.zeros((4, 4), np.int64))


def test_synthetic_writes_masks_in_the_layout_and_adds_them_to_old_demo_data(tmp_path):
    root = synthetic.generate(tmp_path / "syn", n_species=2, images_per_species=3)
    cfg = OmegaConf.load(CONF / "dataset" / "synthetic.yaml")
    cfg.root = str(root)
    layout = load_mask_layout(cfg)
    assert list(layout.classes.values()) == synthetic.trait_names()
    ids_N, masks_NTHW = synthetic.load_trait_masks(root)
    images = sorted((root / "images").rglob("*.png"))
    assert len(layout.index) == len(images) == len(ids_N)
    first = layout.read(layout.mask_path(images[0]), Image.open(images[0]).size)
    assert np.array_equal(first > 0, masks_NTHW[0].any(0))
    for t in np.flatnonzero(masks_NTHW[0].any((1, 2))):
        assert (first == t + 1).any()
    # Demo data generated before masks existed: the masks are added, the images left alone.
    image_bytes = images[0].read_bytes()
    __import__("shutil").rmtree(root / synthetic.MASKS_DIR)
    (root / synthetic.MASK_CLASSES).unlink()
    synthetic.ensure_synthetic(root)
    assert images[0].read_bytes() == image_bytes
    assert np.array_equal(load_mask_layout(cfg).read(layout.mask_path(images[0])), first)
