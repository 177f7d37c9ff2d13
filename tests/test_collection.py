"""The generated museum collection (traitsae.data.collection): layout, masks, pairs, artefacts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from traitsae.data import collection
from traitsae.data.images import load_image_list
from traitsae.data.images.masks import load_mask_layout
from traitsae.errors import TraitsaeError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "collection.yaml"


def dataset_cfg(root: Path):
    cfg = OmegaConf.load(CONF)
    cfg.root = str(root)
    return cfg


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    return collection.generate(
        tmp_path_factory.mktemp("coll") / "collection", images_per_subspecies=6
    )


def test_deterministic_and_seeded(coll, tmp_path):
    again = collection.generate(tmp_path / "again", images_per_subspecies=6)
    other = collection.generate(tmp_path / "other", seed=1, images_per_subspecies=6)
    files = sorted(p.relative_to(coll) for p in coll.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((coll / f).read_bytes() == (again / f).read_bytes() for f in files)
    png = next(f for f in files if f.suffix == ".png")
    assert (coll / png).read_bytes() != (other / png).read_bytes()


def test_the_butterflies_loader_reads_it_with_every_column(coll):
    train = load_image_list(dataset_cfg(coll), "train")
    test = load_image_list(dataset_cfg(coll), "test")
    n_subspecies = 2 * len(collection.RINGS)
    assert len(train) == 4 * n_subspecies and len(test) == 2 * n_subspecies
    assert set(train.metadata) >= {"species", "subspecies", "ring", "collection", "sex", "split"}
    assert set(train.metadata["species"]) == {"erato", "melpomene"}
    for sub in set(train.metadata["subspecies"]):  # balanced within subspecies x split
        rows = [i for i, s in enumerate(train.metadata["subspecies"]) if s == sub]
        assert sorted(train.metadata["collection"][i] for i in rows) == ["c1", "c1", "c2", "c2"]
        assert sorted(train.metadata["sex"][i] for i in rows) == [
            "female",
            "female",
            "male",
            "male",
        ]


def test_masks_mark_the_specimen_and_the_planted_trait_only(coll):
    layout = load_mask_layout(dataset_cfg(coll))
    assert layout.classes == {
        1: "specimen",
        **{2 + k: t.name for k, t in enumerate(collection.TRAITS)},
    }
    images = load_image_list(dataset_cfg(coll), "train")
    for path, sub in zip(images.paths, images.metadata["subspecies"], strict=True):
        img = np.asarray(Image.open(path), dtype=np.int16)
        labels = layout.read(layout.mask_path(path))
        species, _, ring, trait = collection.subspecies_traits()[sub]
        drawn = set(np.unique(labels).tolist()) - {0, 1}
        assert drawn <= ({2 + trait} if trait is not None else set())
        for t in drawn:  # the mask is where the trait's colour is
            colour = np.array(collection.TRAITS[t - 2].colour)
            assert np.abs(img[labels == t] - colour).mean() < 25
        # The specimen stays inside the central 6 x 6 patches (of 8 px); artefacts lie outside it.
        rows, cols = np.nonzero(labels)
        assert rows.min() >= 7 and rows.max() <= 56 and cols.min() >= 7 and cols.max() <= 56
        background = img[labels == 0]
        off_colour = np.abs(background - np.array(collection.BACKGROUND)).max(axis=1) > 30
        assert off_colour.sum() > 100  # ruler, label and colour card


def test_planted_traits_only_in_the_planted_pairs(coll):
    truth = json.loads((coll / collection.TRUTH).read_text())["pairs"]
    with open(coll / collection.PAIRS, newline="") as f:
        pairs = list(csv.DictReader(f))
    assert [p["pair"] for p in pairs] == list(truth)
    kinds = [truth[p["pair"]]["kind"] for p in pairs]
    assert kinds.count("planted") == 3 and kinds.count("mimic") == 2 and kinds.count("null") == 2
    layout = load_mask_layout(dataset_cfg(coll))
    images = load_image_list(dataset_cfg(coll), "train")
    has_trait = {}
    for path, sub in zip(images.paths, images.metadata["subspecies"], strict=True):
        labels = layout.read(layout.mask_path(path))
        has_trait.setdefault(sub, []).append(bool((labels >= 2).any()))
    for ring in collection.RINGS:
        assert not any(has_trait[ring.melpomene])
        assert any(has_trait[ring.erato]) == (ring.trait is not None)


def test_generated_on_first_use_and_a_foreign_folder_refused(tmp_path):
    cfg = dataset_cfg(tmp_path / "made")
    assert len(load_image_list(cfg, "train")) > 0 and (tmp_path / "made" / ".complete").is_file()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("")
    with pytest.raises(TraitsaeError, match="no complete collection dataset"):
        collection.ensure_collection(tmp_path / "foreign")
