"""The explorer's columns linked from other evaluations' outputs (cub_traits, discovery)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from traitsae.explore.linked import cub_trait_columns, discovery_columns


def test_a_trait_without_a_precision_is_left_out(tmp_path: Path) -> None:
    rows = [
        {"method": "sae", "protocol": "select_on_train", "k": 10, "trait": "has_crown",
         "best_direction": 2, "precision": 0.8},
        {"method": "sae", "protocol": "select_on_train", "k": 10, "trait": "has_wing",
         "best_direction": 3, "precision": None},  # written as null: no held-out positives
    ]  # fmt: skip
    path = tmp_path / "cub_traits.json"
    path.write_text(json.dumps({"per_trait": rows}))
    columns = cub_trait_columns(path, d_sae=4)
    assert list(columns["cub_trait"]) == ["", "", "has_crown", ""]
    assert np.isnan(columns["cub_precision@10"][3])


def test_a_latent_found_in_several_pairs_shows_each_pair(tmp_path: Path) -> None:
    candidates = [
        {"latent": 1, "group": "a", "rank": 1, "pair": "lativita_malleti", "q_value": 0.01},
        {"latent": 1, "group": "b", "rank": 2, "pair": "cyrbia_cythera", "q_value": 0.2},
        {"latent": 2, "group": "a", "rank": 1, "pair": "cyrbia_cythera", "q_value": None},
    ]
    (tmp_path / "discovery.json").write_text(json.dumps({"candidates": candidates}))
    columns = discovery_columns(tmp_path, d_sae=3)
    assert columns["discovery_rank"][1] == "lativita_malleti: A#1, cyrbia_cythera: B#2"
    assert columns["discovery_q"][1] == 0.01
    assert np.isnan(columns["discovery_q"][2])
