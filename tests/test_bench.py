"""eval=bench: one leaderboard for SAEs of any origin on the same backbone and layer."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from eval_helpers import compose_evaluate, experiment_overrides, make_sae, planted_experiment
from interop_helpers import saelens_layout

from traitsae.errors import TraitsaeError
from traitsae.evaluation.registry import run_evaluation

FAST = [
    "eval=bench",
    "eval.cub_traits.k=[5]",
    "eval.cub_traits.methods=[sae,random,probe]",
    "eval.cub_traits.n_samples=1000",
    "eval.cub_traits.n_bootstrap=100",
    "eval.cub_traits.seeds=[0]",
    "eval.cub_traits.probe_l2=[1.0e-2]",
    "eval.cub_traits.probe_rounds=1",
    "eval.cub_traits.probe_max_iter=30",
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A folder of three SAEs: the planted oracle (traitsae), the same weights in SAELens's
    layout, and a random TopK SAE (traitsae)."""
    root = tmp_path_factory.mktemp("bench")
    ex = planted_experiment(root / "cub", d_model=16, d_sae=32)
    saes = root / "saes"
    shutil.copytree(ex["run_dir"], saes / "0")
    make_sae(saes / "1", 16, 32, variant="topk", seed=1)
    saelens_layout(ex["run_dir"], saes / "oracle_saelens")
    overrides = [o for o in experiment_overrides(ex, *FAST) if not o.startswith("run=")]
    out = root / "out"
    cfg = compose_evaluate([f"run={saes}", "data.tokens=patches", *overrides], out)
    return ex, saes, run_evaluation(cfg), out


def test_leaderboard_rows_and_outputs(bench):
    _, _, result, out = bench
    assert [(s["label"], s["origin"]) for s in result["saes"]] == [
        ("0", "traitsae"),
        ("1", "traitsae"),
        ("oracle_saelens", "saelens"),
    ]
    assert result["saes"][1]["config"] == "topk d_sae=32 k=8"
    assert json.loads((out / "bench.json").read_text())["saes"][0]["label"] == "0"
    with (out / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {"fvu", "l0", "r_precision", "probe_bound_r_precision"} <= set(
        rows[0]
    )
    assert (out / "bench_pareto.png").stat().st_size > 0
    assert set(result["not_run"]) == {"segments", "dictionary"}


def test_same_weights_same_numbers_whoever_saved_them(bench):
    _, _, result, _ = bench
    oracle, _, foreign = result["saes"]
    assert oracle["health"] == foreign["health"]
    assert oracle["traits"] == foreign["traits"]
    (same,) = [p for p in result["paired"] if {p["a"], p["b"]} == {"0", "oracle_saelens"}]
    assert same["a_minus_b"] == 0 and same["ci_low"] == 0 == same["ci_high"]


def test_the_oracle_ranks_above_a_random_sae_with_a_paired_ci(bench):
    _, _, result, _ = bench
    oracle, random_sae, _ = result["saes"]
    assert oracle["traits"]["r_precision"] > random_sae["traits"]["r_precision"]
    (pair,) = [p for p in result["paired"] if {p["a"], p["b"]} == {"0", "1"}]
    assert pair["a_minus_b"] > 0 and pair["excludes_zero"] and pair["n_traits"] == 6
    assert oracle["traits"]["probe_bound_r_precision"] >= oracle["traits"]["r_precision"] - 0.2


def test_saes_of_different_layers_are_refused(bench, tmp_path):
    ex, saes, _, _ = bench
    make_sae(tmp_path / "layer2", 16, 32, layer=2)
    overrides = [o for o in experiment_overrides(ex, *FAST) if not o.startswith("run=")]
    listed = f"eval.saes=[{saes / '0'},{tmp_path / 'layer2'}]"
    cfg = compose_evaluate([f"run={saes}", listed, *overrides], tmp_path / "out")
    with pytest.raises(TraitsaeError, match=r"one backbone, layer and token kind.*layer 2"):
        run_evaluation(cfg)


def test_without_attribute_files_only_health_runs(bench, tmp_path):
    ex, saes, _, _ = bench
    cfg = compose_evaluate(
        [
            f"run={saes / '1'}",
            "eval=bench",
            f"paths.activations_dir={ex['activations']}",
            f"paths.data_dir={tmp_path / 'no_data'}",  # not the demo's data a checkout may hold
        ],
        tmp_path,
    )
    result = run_evaluation(cfg)
    (only,) = result["saes"]
    assert only["traits"] == {} and "cub_traits" in result["not_run"] and not result["paired"]
