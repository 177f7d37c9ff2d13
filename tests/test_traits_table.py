"""eval=traits_table: per image x latent area, max, mean and centroid over the foreground.

The planted experiment: a generated collection (known masks), a store whose patch activations
carry trait t's direction in proportion to the share of the patch the trait's spot covers (as a
patch token mixes what the patch shows), foreground flags from the masks (majority rule), and an
oracle SAE whose latent t reads trait t's direction with a threshold at half coverage.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from eval_helpers import compose_evaluate, make_sae, trait_directions
from omegaconf import OmegaConf
from PIL import Image

from traitsae.data import collection
from traitsae.data.images import load_image_list
from traitsae.data.images.masks import patch_class_counts
from traitsae.data.store import create_store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.registry import run_evaluation
from traitsae.evaluation.specimens.measures import measure
from traitsae.paths import store_path

GRID, D_MODEL, D_SAE, LAYER, AMPLITUDE = (8, 8), 16, 24, 3, 8.0
N_TRAITS = len(collection.TRAITS)


def class_counts(root: Path, image_path: str) -> np.ndarray:
    mask = np.asarray(Image.open(root / "masks" / image_path.split("/images/")[1]))
    return patch_class_counts(mask, GRID, 2 + N_TRAITS)  # [P, classes]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("table")
    data = collection.generate(root / "collection", images_per_subspecies=6)
    dataset = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/dataset/collection.yaml")
    dataset.root = str(data)
    images = load_image_list(dataset, "train")
    dirs_TD = trait_directions(N_TRAITS, D_MODEL)
    rng = np.random.default_rng(0)
    patches, foreground, spots = [], [], []
    for path in images.paths:
        counts_PK = class_counts(data, path)
        cover_PT = counts_PK[:, 2:] / counts_PK.sum(1, keepdims=True)  # share of each patch
        acts_PD = 0.3 * rng.standard_normal((GRID[0] * GRID[1], D_MODEL))
        patches.append((acts_PD + AMPLITUDE * cover_PT @ dirs_TD).astype(np.float32))
        foreground.append(counts_PK.argmax(1) > 0)  # majority rule: any non-zero class
        spots.append(counts_PK.argmax(1)[:, None] == 2 + np.arange(N_TRAITS))  # [P, T]
    patches_NPD = np.stack(patches)
    path = store_path(root / "activations", "collection", "train", "tiny")
    create_store(
        path,
        patches={LAYER: patches_NPD},
        cls={LAYER: patches_NPD.mean(1)},
        images={"path": np.array(images.paths, dtype=object), "label": images.labels}
        | {k: np.array(v, dtype=object) for k, v in images.metadata.items()}
        | {"foreground": np.stack(foreground)},
        attrs={"backbone": "tiny", "dataset": "collection", "split": "train", "depth": LAYER + 1,
               "grid": list(GRID), "image_size": 64},
    )  # fmt: skip
    # Latent t fires where trait t covers more than half a patch.
    run = make_sae(root / "run", D_MODEL, D_SAE, dirs_TD, threshold=AMPLITUDE / 2).parent
    return {
        "root": root,
        "data": data,
        "run": run,
        "store": path,
        "foreground": np.stack(foreground),
        "spots": np.stack(spots),
        "images": images,
    }


def table_cfg(planted: dict, out: Path, *extra: str):
    return compose_evaluate(
        [
            "eval=traits_table",
            "dataset=collection",
            f"dataset.root={planted['data']}",
            f"run={planted['run']}",
            f"paths.activations_dir={planted['root'] / 'activations'}",
            "split=train",
            *extra,
        ],
        out,
    )


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "traits_table.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_area_is_the_spot_share_of_foreground_patches(planted, tmp_path):
    latents = list(range(N_TRAITS)) + [N_TRAITS + 2]  # the traits and one distractor
    cfg = table_cfg(planted, tmp_path, f"eval.latents={latents}")
    data = run_evaluation(cfg)
    assert "images/foreground" in data["foreground"] and data["n_images"] == len(planted["images"])
    rows = read_rows(tmp_path)
    assert len(rows) == len(planted["images"]) * len(latents)
    assert {"subspecies", "collection", "sex", "area", "centroid_x_fg"} <= set(rows[0])
    checked = 0
    for row in rows:
        image, latent = int(row["image"]), int(row["latent"])
        fg_P = planted["foreground"][image]
        assert int(row["n_foreground"]) == fg_P.sum()
        if latent >= N_TRAITS:
            continue
        spot_P = planted["spots"][image][:, latent] & fg_P
        share = spot_P.sum() / fg_P.sum()
        assert abs(float(row["area"]) - share) <= 1 / fg_P.sum() + 1e-5, (
            row
        )  # one patch (CSV: 6 digits)
        if spot_P.any():
            checked += 1
            y, x = np.divmod(np.flatnonzero(spot_P), GRID[1])
            assert abs(float(row["centroid_y"]) - (y.mean() + 0.5) / GRID[0]) <= 1 / GRID[0]
            assert abs(float(row["centroid_x"]) - (x.mean() + 0.5) / GRID[1]) <= 1 / GRID[1]
            assert 0 <= float(row["centroid_x_fg"]) <= 1 and 0 <= float(row["centroid_y_fg"]) <= 1
        else:
            assert row["centroid_x"] == "" and float(row["max"]) < AMPLITUDE
    assert checked >= 10  # the planted spots were measured (3 erato subspecies x 4 images)
    frame = pd.read_parquet(tmp_path / "traits_table.parquet")
    assert len(frame) == len(rows) and frame["area"].dtype == np.float64
    assert frame["subspecies"].iloc[0] == rows[0]["subspecies"]


def test_measure_units_and_empty_cases():
    # One image on a 2 x 4 grid: foreground = columns 1..2 of both rows; the latent fires on
    # patch (0, 2) with 3 and (1, 2) with 1, and on the background patch (0, 0) with 9.
    codes = torch.zeros(2, 8, 1)
    codes[0, [2, 6, 0], 0] = torch.tensor([3.0, 1.0, 9.0])
    fg = torch.zeros(2, 8, dtype=torch.bool)
    fg[0, [1, 2, 5, 6]] = True  # image 1 has no foreground at all
    m = {k: v[:, 0] for k, v in measure(codes, fg, (2, 4)).items()}
    assert m["n_foreground"].tolist() == [4, 0] and m["n_fires"].tolist() == [2, 0]
    assert m["area"][0] == 0.5 and m["max"][0] == 3.0 and m["mean"][0] == 1.0
    assert m["centroid_x"][0] == pytest.approx(2.5 / 4)  # column 2's centre, background ignored
    assert m["centroid_y"][0] == pytest.approx((3 * 0.25 + 1 * 0.75) / 4)
    assert m["centroid_x_fg"][0] == pytest.approx((2.5 / 4 - 0.25) / 0.5)  # box: columns 1..2
    assert m["centroid_y_fg"][0] == pytest.approx((3 * 0.25 + 1 * 0.75) / 4)  # box: both rows
    assert m["total"][0] == 13.0 and m["outside"][0] == pytest.approx(9 / 13)
    assert m["max_outside"][0] == 9.0 and m["max_outside"][1] == 0.0
    assert all(math.isnan(m[k][1]) for k in ("area", "max", "mean", "centroid_x", "centroid_y_fg"))
    assert math.isnan(m["outside"][1]) and m["total"][1] == 0


def write_discovery(path: Path, candidates: list[dict], d_sae: int = D_SAE) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "discovery.json").write_text(
        json.dumps({"alpha": 0.05, "candidates": candidates, "settings": {"d_sae": d_sae}})
    )
    return path


def test_latents_from_a_discovery_run(planted, tmp_path):
    disc = write_discovery(
        tmp_path / "disc",
        [
            {"latent": 1, "group": "a", "discovery": True, "confirmed": True, "pair": "p1"},
            {"latent": 2, "group": "a", "discovery": True, "confirmed": False, "pair": "p1"},
            {"latent": 1, "group": "b", "discovery": True, "confirmed": True, "pair": "p2"},
            {"latent": 5, "group": "b", "discovery": False, "confirmed": None},
        ],
    )
    data = run_evaluation(table_cfg(planted, tmp_path / "t", f"eval.discovery={disc}"))
    assert data["latents"] == [1]
    assert [s["pair"] for s in data["sources"]] == ["p1", "p2"]
    data = run_evaluation(
        table_cfg(planted, tmp_path / "c", f"eval.discovery={disc}", "eval.select=candidates")
    )
    assert data["latents"] == [1, 2, 5]


def test_every_patch_when_the_store_has_no_flags(planted, tmp_path):
    data = run_evaluation(table_cfg(planted, tmp_path, "eval.latents=all", "eval.foreground=all"))
    assert data["latents"] == list(range(D_SAE))
    assert data["foreground"].startswith("every patch")
    assert {int(r["n_foreground"]) for r in read_rows(tmp_path)} == {GRID[0] * GRID[1]}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["eval.latents=[0,99]"], r"\[99\], outside this SAE's latents 0..23"),
        ([], "needs latents"),
        (["eval.discovery=/nonexistent/disc"], "no discovery.json there"),
        (["eval.select=best", "eval.latents=[0]"], "eval.select must be one of"),
        (["eval.latents=[a]"], "list of latent indices"),
    ],
)
def test_bad_options(planted, tmp_path, extra, message):
    with pytest.raises(TraitsaeError, match=message):
        run_evaluation(table_cfg(planted, tmp_path, *extra))


def test_bad_discovery_runs(planted, tmp_path):
    unconfirmed = write_discovery(
        tmp_path / "u", [{"latent": 2, "group": "a", "discovery": True, "confirmed": False}]
    )
    with pytest.raises(TraitsaeError, match=r"1 discoveries .* 0 of them confirmed"):
        run_evaluation(table_cfg(planted, tmp_path, f"eval.discovery={unconfirmed}"))
    other = write_discovery(tmp_path / "o", [{"latent": 2, "discovery": True}], d_sae=512)
    with pytest.raises(TraitsaeError, match="SAE with 512 latents"):
        run_evaluation(table_cfg(planted, tmp_path, f"eval.discovery={other}"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "discovery.json").write_text("{}")
    with pytest.raises(TraitsaeError, match="not the discovery.json"):
        run_evaluation(table_cfg(planted, tmp_path, f"eval.discovery={tmp_path / 'junk'}"))


def test_flags_required_but_missing(planted, tmp_path):
    bare = tmp_path / "activations" / "collection" / "train" / "tiny.h5"
    bare.parent.mkdir(parents=True)
    with h5py.File(planted["store"]) as src, h5py.File(bare, "w") as dst:
        for key in ("patches", "cls"):
            src.copy(key, dst)
        dst.create_group("images")
        for key in src["images"]:
            if key != "foreground":
                src["images"].copy(key, dst["images"])
        dst.attrs.update(src.attrs)
    cfg = table_cfg(planted, tmp_path / "out", "eval.latents=[0]", "eval.foreground=flags")
    cfg.paths.activations_dir = str(tmp_path / "activations")
    with pytest.raises(TraitsaeError, match="has no images/foreground"):
        run_evaluation(cfg)
