"""eval=discovery on a store with planted traits and an SAE whose latents read them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from discovery_helpers import SHARED, TRAIT_A, TRAIT_B, block_mask, planted_sae, planted_store

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import heatmaps
from traitsae.evaluation.core.frames import Frame, ImageSource
from traitsae.evaluation.core.tokens import gather_codes
from traitsae.evaluation.discovery.discovery import discover
from traitsae.evaluation.discovery.stats import NullOptions, RankingRule

CONTRACT_KEYS = {
    "p_value",
    "q_value",
    "confirmed",
    "confirm_auroc",
    "rank",
    "latent",
    "group",
    "auroc",
    "rate_a",
    "rate_b",
    "mean_a",
    "mean_b",
    "entropy",
    "morans_i",
    "score",
    "top_images",
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from traitsae.sae.export import load_sae

    root = tmp_path_factory.mktemp("planted")
    store = planted_store(root)
    sae = load_sae(planted_sae(root / "run", store))
    return store, sae, root


@pytest.fixture(scope="module")
def result(planted):
    store, sae, root = planted
    with Store(store.path) as opened:
        out = discover(
            opened,
            sae,
            {"species": ["001.Alpha"]},
            {"species": ["002.Beta"]},
            RankingRule(n_candidates=5),
            heatmaps.TriageWeights(),
            root / "out",
            n_top_images=4,
            images=ImageSource(str(store.image_root), Frame.simple(64)),
        )
    return out, root / "out"


def test_top_candidates_are_the_planted_traits(result, planted):
    out, _ = result
    by_group = {g: [c for c in out["candidates"] if c["group"] == g] for g in ("a", "b")}
    top_a, top_b = by_group["a"][0], by_group["b"][0]
    assert (top_a["latent"], top_a["rank"]) == (TRAIT_A, 1)
    assert top_b["latent"] == TRAIT_B
    assert top_a["auroc"] == 1.0 and top_a["rate_a"] == 1.0 and top_a["rate_b"] == 0.0
    assert top_b["auroc"] == 0.0
    for top in (top_a, top_b):  # 12 + 12 selection images, 12 + 12 held out
        assert top["discovery"] and top["q_value"] < 0.05 and top["p_value"] < 1e-4
        assert top["confirmed"] and top["confirm_auroc"] == (1.0 if top is top_a else 0.0)
    assert SHARED not in {c["latent"] for c in out["candidates"]}
    assert all(c["top_images"][0].startswith("001.Alpha/") for c in by_group["a"])


def test_candidate_heatmaps_sit_on_the_planted_block(result, planted):
    out, _ = result
    store, sae, _ = planted
    top_a = out["candidates"][0]
    with Store(store.path) as opened:
        rows = np.flatnonzero(np.isin(opened.metadata["path"], top_a["top_images"]))
        codes = gather_codes(opened, sae, rows, np.array([TRAIT_A]))
    block = np.kron(block_mask(TRAIT_A), np.ones((8, 8), dtype=bool))  # patch grid -> 64 px
    for row in rows:
        assert heatmaps.mass_inside(codes[row][:, 0].reshape(8, 8), block) > 0.95
    # A 2x2 block of 64 patches: narrow (low entropy) and coherent (positive Moran's I).
    assert top_a["entropy"] < 0.4 and top_a["morans_i"] > 0.3


def test_outputs_follow_the_contract(result, planted):
    out, out_dir = result
    _, sae, _ = planted
    saved = json.loads((out_dir / "discovery.json").read_text())
    assert saved == json.loads(json.dumps(out))
    assert saved["groups"]["a"]["n_images"] == 24 and saved["groups"]["b"]["n_images"] == 24
    assert saved["alpha"] == 0.05 and saved["n_permutations"] == 1000
    # Latents that never fire on 20 % of a group's images cannot be candidates: not tested.
    assert 3 <= saved["tested"] < sae.d_sae
    assert saved["sizes"]["a"] == {"selection": 12, "confirmation": 12}
    for cand in saved["candidates"]:
        assert set(cand) >= CONTRACT_KEYS
        assert (out_dir / cand["figure"]).stat().st_size > 1000
    for group in ("a", "b"):  # discoveries first, then confirmed, then by triage score
        mine = [c for c in saved["candidates"] if c["group"] == group]
        assert [c["rank"] for c in mine] == list(range(1, len(mine) + 1))
        keys = [(not c["discovery"], not c["confirmed"], -c["score"]) for c in mine]
        assert keys == sorted(keys)
    with (out_dir / "latents.csv").open() as f:
        latents = list(csv.DictReader(f))
    assert len(latents) == sae.d_sae and float(latents[SHARED]["auroc"]) == pytest.approx(
        0.5, abs=0.2
    )
    assert float(latents[TRAIT_A]["q_value"]) < 0.05
    assert sum(row["p_value"] == "" for row in latents) == sae.d_sae - saved["tested"]
    with (out_dir / "candidates.csv").open() as f:
        assert {"p_value", "q_value", "confirmed"} <= set(csv.DictReader(f).fieldnames)
    page = (out_dir / "index.html").read_text()
    assert all(c["figure"] in page for c in saved["candidates"])
    assert "Discoveries specific to group A" in page and "Other candidates for group B" in page


def test_groups_must_be_disjoint(planted, tmp_path):
    store, sae, _ = planted
    with Store(store.path) as opened, pytest.raises(TraitsaeError, match="share 24 images"):
        discover(
            opened,
            sae,
            {"species": ["001.Alpha"]},
            {"species": ["001.Alpha", "002.Beta"]},
            RankingRule(),
            heatmaps.TriageWeights(),
            tmp_path,
            images=ImageSource(None, None),
        )


def test_groups_without_a_difference_say_so(planted, tmp_path):
    """Alpha images against other Alpha images: no discoveries, in words, on every output."""
    store, sae, _ = planted
    with Store(store.path) as opened:
        out = discover(
            opened,
            sae,
            {"image_id": [str(i) for i in range(1, 13)]},
            {"image_id": [str(i) for i in range(13, 25)]},
            RankingRule(n_candidates=3),
            heatmaps.TriageWeights(),
            tmp_path,
            null=NullOptions(n_permutations=200, max_permutations=2000),
            images=ImageSource(None, None),
        )
    assert out["n_discoveries"] == {"a": 0, "b": 0}
    for g in ("a", "b"):
        assert out["verdict"][g].startswith(f"No discoveries: none of the {out['tested']} tested")
    page = (tmp_path / "index.html").read_text()
    assert page.count("No discoveries: none of the") == 2
    assert not any(c["discovery"] for c in out["candidates"])


def test_small_groups_stop_with_their_sizes(planted, tmp_path):
    store, sae, _ = planted
    with Store(store.path) as opened, pytest.raises(TraitsaeError, match="has 3 images"):
        discover(
            opened,
            sae,
            {"image_id": ["1", "2", "3"]},
            {"species": ["002.Beta"]},
            RankingRule(),
            heatmaps.TriageWeights(),
            tmp_path,
            images=ImageSource(None, None),
        )
