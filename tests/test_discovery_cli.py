"""evaluate.py eval=discovery|features|encode through Hydra: composition, overrides, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from discovery_helpers import TRAIT_A, TRAIT_B, compose_cfg, planted_sae, planted_store

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.codes import SparseCodes
from traitsae.evaluation.registry import run_evaluation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    store = planted_store(root, n_per_group=12)
    return store, planted_sae(root / "run", store), root


def evaluate_cfg(overrides: list[str], out_dir: Path):
    return compose_cfg("evaluate", overrides, out_dir)


def base_overrides(planted, name: str) -> list[str]:
    store, run_dir, root = planted
    return [
        f"eval={name}",
        f"run={run_dir}",
        f"paths.root_dir={root}",
        f"paths.activations_dir={root / 'activations'}",
        *([f"eval.image_root={store.image_root}"] if name != "encode" else []),
    ]


def test_discovery_groups_from_cli_strings(planted, tmp_path):
    cfg = evaluate_cfg(
        [
            *base_overrides(planted, "discovery"),
            "eval.group_a={species: 001.Alpha}",
            "eval.group_b={species: [002.Beta], image_id: [13, 14, 15, 16, 17, 18, 19, 20]}",
            "eval.weights.gamma=1.0",
            "eval.min_group=4",  # B: 8 images, 4 of them held out
            "eval.n_permutations=500",
        ],
        tmp_path,
    )
    result = run_evaluation(cfg)
    saved = json.loads((tmp_path / "discovery.json").read_text())
    assert saved["groups"]["a"]["n_images"] == 12 and saved["groups"]["b"]["n_images"] == 8
    assert saved["settings"]["weights"]["gamma"] == 1.0
    assert saved["min_group"] == 4 and saved["n_permutations"] == 500
    assert saved["sizes"]["b"] == {"selection": 4, "confirmation": 4}
    firsts = {c["group"]: c["latent"] for c in reversed(result["candidates"])}
    assert firsts == {"a": TRAIT_A, "b": TRAIT_B}
    assert (tmp_path / "index.html").exists() and (tmp_path / "candidates.csv").exists()


def test_features_and_encode_runs(planted, tmp_path):
    cfg = evaluate_cfg(
        [*base_overrides(planted, "features"), "eval.latents=[0,1]", "eval.top_k=3"],
        tmp_path / "features",
    )
    result = run_evaluation(cfg)
    assert [e["latent"] for e in result["latents"]] == [0, 1]
    assert all(len(e["top_images"]) == 3 for e in result["latents"])
    assert (tmp_path / "features" / "frequency.png").exists()

    cfg = evaluate_cfg([*base_overrides(planted, "encode")], tmp_path / "encode")
    with SparseCodes(run_evaluation(cfg)) as codes:
        assert codes.csr().shape == (24 * 64, 32)


def test_empty_group_is_a_user_error(planted, tmp_path):
    cfg = evaluate_cfg(
        [
            *base_overrides(planted, "discovery"),
            "eval.group_a={species: erato}",
            "eval.group_b={species: 002.Beta}",
        ],
        tmp_path,
    )
    with pytest.raises(TraitsaeError, match=r"'001.Alpha' \(12\)"):
        run_evaluation(cfg)


def test_strata_that_split_the_groups_apart_are_a_user_error(planted, tmp_path):
    cfg = evaluate_cfg(
        [
            *base_overrides(planted, "discovery"),
            "eval.group_a={species: 001.Alpha}",
            "eval.group_b={species: 002.Beta}",
            "eval.strata=[label]",  # label is the species here: no stratum holds both groups
        ],
        tmp_path,
    )
    with pytest.raises(TraitsaeError, match="no stratum of eval.strata holds images of both"):
        run_evaluation(cfg)


def test_cli_unknown_column_exits_2_with_listing(planted, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", MPLBACKEND="Agg")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate.py"),
            *base_overrides(planted, "discovery"),
            "eval.group_a={subspecies: lativita}",
            "eval.group_b={species: 002.Beta}",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: eval.group_a filters on column 'subspecies'" in proc.stderr
    assert "species: '001.Alpha' (12), '002.Beta' (12)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_groups_default_to_the_datasets_contrast_pair(planted, tmp_path):
    cfg = evaluate_cfg(
        [
            *base_overrides(planted, "discovery"),
            "+dataset.contrast={group_a: {species: 001.Alpha}, group_b: {species: 002.Beta}}",
            "eval.draw_images=false",
        ],
        tmp_path,
    )
    result = run_evaluation(cfg)
    assert result["groups"]["a"]["filter"] == {"species": ["001.Alpha"]}
    assert result["candidates"][0]["latent"] == TRAIT_A
