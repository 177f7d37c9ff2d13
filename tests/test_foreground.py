"""Foreground flags end to end: extraction records them (masks or the colour rule), a store
without them gets them without a backbone pass, evaluations pool over them (eval.patches), and
bad input stops with one paragraph."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from discovery_helpers import SHARED, TRAIT_A, TRAIT_B, block_mask, planted_sae, planted_store
from extract_helpers import PYTHON, REPO, compose_extract, small_synthetic
from PIL import Image

from traitsae.data.images.foreground import ForegroundRule, color_foreground
from traitsae.data.store import Store, read_fingerprint
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.firing import scan
from traitsae.evaluation.core.foreground import patch_keep, pool_tokens, select_patches
from traitsae.evaluation.core.methods import Method, image_scores, sae_scorer
from traitsae.evaluation.discovery.discovery import collect_scores
from traitsae.extraction import extract
from traitsae.extraction.foreground import write_flags
from traitsae.sae.export import load_sae

GRID = (8, 8)  # the tiny backbone: 64 px images, 8 px patches, no resize or crop


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory) -> Path:
    return small_synthetic(tmp_path_factory.mktemp("syn") / "synthetic")


def majority_flags(labels_HW: np.ndarray) -> np.ndarray:
    """bool [64]: 8 x 8 patches whose pixels are mostly non-zero (written out independently)."""
    blocks = (labels_HW > 0).reshape(8, 8, 8, 8).sum(axis=(1, 3))  # [rows, cols] pixel counts
    return (blocks > 32).ravel()


# ----------------------------------------------------------------------------- extraction


def test_mask_flags_are_the_majority_rule_on_the_masks(tmp_path, syn_root):
    out = extract(compose_extract(tmp_path, [f"dataset.root={syn_root}"]))
    with Store(out) as store:
        flags_NP, paths = store.foreground(), store.metadata["path"]
        assert json.loads(store.foreground_rule)["rule"] == "masks"
    for i, path in enumerate(paths):
        rel = Path(path).relative_to(syn_root / "images")
        labels_HW = np.asarray(Image.open(syn_root / "masks" / rel))
        assert np.array_equal(flags_NP[i], majority_flags(labels_HW)), path
    assert 0 < flags_NP.mean() < 1


def test_color_rule_flags_the_specimen_not_the_background():
    image_HW3 = np.full((64, 64, 3), 230, np.uint8)  # a plain light background
    image_HW3[16:48, 8:40] = (90, 60, 30)  # a specimen covering patches rows 2-5, cols 1-4
    image_HW3[0:4, 60:64] = 0  # a label in a corner: 16 of a patch's 64 pixels, background
    image_HW3[56:64, 56:60] = 0  # half of a patch: a tie is background
    expected_P = np.zeros(GRID, bool)
    expected_P[2:6, 1:5] = True
    for color in ("border", (230, 230, 230)):
        flags_P = color_foreground(image_HW3, ForegroundRule("color", color, 40), GRID)
        assert np.array_equal(flags_P, expected_P.ravel()), color
    far = ForegroundRule("color", (90, 60, 30), 40)  # "background" = the specimen's colour
    assert np.array_equal(color_foreground(image_HW3, far, GRID), ~expected_P.ravel())


def test_flags_are_added_to_an_existing_store_without_re_extracting(tmp_path, syn_root, caplog):
    """A store written without flags (as every store before them) keeps its activations and its
    fingerprint; rerunning extract.py adds the flags from the images alone."""
    out = extract(
        compose_extract(tmp_path, [f"dataset.root={syn_root}", "extract.foreground.rule=none"])
    )
    with Store(out) as store:
        assert not store.has_foreground and store.foreground() is None
        before = store.patches(-1)[()]
    fingerprint = read_fingerprint(out)

    import traitsae.extraction.run as run_module

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone must not run again")

    original, run_module.encode_batch = run_module.encode_batch, no_backbone
    try:
        with caplog.at_level("INFO"):
            extract(compose_extract(tmp_path, [f"dataset.root={syn_root}"]))
            color = ["extract.foreground.rule=color", "extract.foreground.tolerance=30"]
            extract(compose_extract(tmp_path, [f"dataset.root={syn_root}", *color]))
    finally:
        run_module.encode_batch = original
    assert caplog.text.count("adding foreground flags") == 2
    assert not list(out.parent.glob("*.tmp"))  # the copy was renamed over the store
    with Store(out) as store:
        assert np.array_equal(store.patches(-1)[()], before)
        assert read_fingerprint(out) == fingerprint
        assert json.loads(store.foreground_rule) == {
            "rule": "color", "color": "border", "tolerance": 30, "patch_rule": "majority",
        }  # fmt: skip
        assert store.foreground().any()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("extract.foreground.rule=segment", r"extract\.foreground\.rule='segment' is not one of"),
        ("extract.foreground.tolerance=300", r"extract\.foreground\.tolerance=300 must be an int"),
        ("extract.foreground.color=[1,2]", r"extract\.foreground\.color=\[1, 2\] must be `border`"),
        ("dataset.masks=null", None),  # auto falls back to the colour rule
    ],
)
def test_bad_foreground_options_are_named(tmp_path, syn_root, override, message):
    cfg = compose_extract(tmp_path, [f"dataset.root={syn_root}", override])
    if message is None:
        with Store(extract(cfg)) as store:
            assert json.loads(store.foreground_rule)["rule"] == "color"
        cfg = compose_extract(
            tmp_path, [f"dataset.root={syn_root}", override, "extract.foreground.rule=masks"]
        )
        message = r"extract\.foreground\.rule=masks, but dataset 'synthetic' has no segmentation"
    with pytest.raises(TraitsaeError, match=message):
        extract(cfg)


def test_a_mask_of_the_wrong_size_stops_with_one_paragraph(tmp_path, syn_root):
    root = tmp_path / "synthetic"
    shutil.copytree(syn_root, root)
    for mask in (root / "masks").rglob("*.png"):
        Image.open(mask).resize((32, 32)).save(mask)
    proc = subprocess.run(
        [PYTHON, "extract.py", f"paths.root_dir={tmp_path}", f"dataset.root={root}",
         "extract.num_workers=0", "extract.progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.match(r"error: mask \S+\.png is 32 x 32 px but its image is 64 x 64", proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The discovery test store with foreground flags that leave out TRAIT_B's block (a
    background artefact of group B), and image 0 without any foreground patch."""
    root = tmp_path_factory.mktemp("planted")
    store = planted_store(root)
    run_dir = planted_sae(root / "run", store)
    with Store(store.path) as s:
        flags_NP = np.ones((s.n_images, s.n_patches), bool)
    flags_NP[:, block_mask(TRAIT_B).ravel()] = False
    flags_NP[0] = False
    write_flags(store.path, flags_NP, '{"rule": "test"}')
    return store, load_sae(run_dir / "sae.json"), flags_NP


def test_pooling_over_foreground_patches_drops_a_background_latent(planted):
    store_info, sae, flags_NP = planted
    with Store(store_info.path) as store:
        a_N = np.arange(store.n_images) < store_info.n_per_group
        everywhere = collect_scores(store, sae, a_N, ~a_N, progress=False)
        assert everywhere.scores_NS[~a_N[everywhere.image_index], TRAIT_B].min() > 0
        selection = select_patches(store, "foreground", sae)
        assert selection["skipped_without_foreground"] == [str(store.metadata["path"][0])]
        assert not store.valid[0] and store.valid[1:].all()
        fg = collect_scores(store, sae, a_N, ~a_N, progress=False)
        assert 0 not in fg.image_index
        assert (fg.scores_NS[:, TRAIT_B] == 0).all()  # its patches are background
        rows = np.searchsorted(everywhere.image_index, fg.image_index)
        for latent in (TRAIT_A, SHARED):  # foreground latents keep their scores
            assert np.allclose(fg.scores_NS[:, latent], everywhere.scores_NS[rows, latent])
        # cub_traits' and features' passes pool the same way
        method = {"sae": Method("sae", sae_scorer(sae), sae.d_sae, "max")}
        scores, rows_N = image_scores(store, sae.layer, method)
        assert np.array_equal(rows_N, fg.image_index)
        assert np.allclose(scores["sae"], fg.scores_NS, atol=1e-5)
        stats, _ = scan(store, sae, 4)
        assert stats.patch_fires_S[TRAIT_B] == 0 and stats.n_images == store.n_images - 1
        assert stats.n_patches == int(flags_NP.sum())


def test_masked_mean_and_max_are_over_the_kept_patches():
    s_BPM = torch.tensor([[[1.0], [-5.0], [3.0]], [[2.0], [4.0], [-1.0]]])
    keep_BP = torch.tensor([[True, True, False], [False, False, True]])
    assert pool_tokens(s_BPM, "max", keep_BP).flatten().tolist() == [1.0, -1.0]
    assert pool_tokens(s_BPM, "mean", keep_BP).flatten().tolist() == [-2.0, -1.0]
    assert pool_tokens(s_BPM, "max").flatten().tolist() == [3.0, 4.0]


def test_auto_follows_the_sae_and_a_store_without_flags_names_extract(planted, tmp_path):
    store_info, sae, _ = planted
    with Store(store_info.path) as store:
        assert select_patches(store, "auto", sae)["patches"] == "all"
        assert patch_keep(store, np.array([0, 1])) is None
        sae.meta["foreground"] = True  # trained with data.tokens=foreground
        try:
            assert select_patches(store, "auto", sae)["patches"] == "foreground"
        finally:
            sae.meta.pop("foreground")
        with pytest.raises(TraitsaeError, match="eval.patches must be one of"):
            select_patches(store, "fg", sae)
    bare = planted_store(tmp_path)
    with Store(bare.path) as store, pytest.raises(
        TraitsaeError, match=r"(?s)has no foreground flags.*rerun the extract.py command.*"
        r"eval.patches=all"
    ):  # fmt: skip
        select_patches(store, "foreground", sae)
    with h5py.File(bare.path, "r") as f:
        n_images, n_patches = f["patches/3"].shape[:2]
    write_flags(bare.path, np.zeros((n_images, n_patches), bool), '{"rule": "test"}')
    with Store(bare.path) as store, pytest.raises(TraitsaeError, match="no image of store"):
        select_patches(store, "foreground", sae)
