"""eval=cub_traits end to end on tiny planted stores, through Hydra's compose API."""

import json

import numpy as np
import pytest
from eval_helpers import (
    compose_evaluate,
    experiment_overrides,
    make_sae,
    make_store,
    planted_experiment,
)

from traitsae.errors import TraitsaeError
from traitsae.evaluation.registry import run_evaluation

FAST = [
    "eval=cub_traits",
    "eval.k=[5,20]",
    "eval.kmeans_clusters=8",
    "eval.n_samples=2000",
    "eval.n_bootstrap=200",
    "eval.seeds=[0,1]",
    "eval.probe_l2=[1.0e-3,1.0e-1]",
    "eval.probe_rounds=2",
    "eval.probe_max_iter=50",
]
METHODS = ("sae", "sae_init", "random", "pca", "kmeans", "probe")
SUMMARY_KEYS = {
    "method",
    "protocol",
    "k",
    "mean_precision",
    "recall_at_tau",
    "tau",
    "mean_ap",
    "ci_low",
    "ci_high",
    "n_directions",
}
PER_TRAIT_KEYS = {"trait", "method", "protocol", "k", "best_direction", "precision", "ap", "n_pos"}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return planted_experiment(tmp_path_factory.mktemp("cub"), absent_traits=(5,))


@pytest.fixture(scope="module")
def report(experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cfg = compose_evaluate(experiment_overrides(experiment, *FAST), out)
    return run_evaluation(cfg), out


def test_json_follows_the_contract(report):
    _, out = report
    data = json.loads((out / "cub_traits.json").read_text())
    assert all(set(row) >= SUMMARY_KEYS for row in data["summary"])
    assert all(set(row) >= PER_TRAIT_KEYS for row in data["per_trait"])
    combos = {(r["method"], r["protocol"], r["k"]) for r in data["summary"]}
    assert combos == {
        (m, p, k) for m in METHODS for p in ("select_on_train", "select_on_test") for k in (5, 20)
    }
    r_rows = data["r_precision"]["summary"]
    assert {(r["method"], r["protocol"]) for r in r_rows} == {(m, p) for m, p, _ in combos}
    n_dirs = {r["method"]: r["n_directions"] for r in data["summary"]}
    # PCA: 16 x 2 signs; the probe: 2 L2 values per trait plus every other method's directions.
    assert n_dirs == {
        "sae": 32,
        "sae_init": 32,
        "random": 32,
        "pca": 32,
        "kmeans": 8,
        "probe": 2 + 32 + 32 + 32 + 32 + 8,
    }
    for name in ("summary", "per_trait", "skipped", "differences"):
        assert (out / f"cub_traits_{name}.csv").stat().st_size > 0
    for name in ("methods", "precision_distribution"):
        assert (out / f"cub_traits_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_trait_without_positives_is_skipped_and_listed(report):
    rep, _ = report
    assert [s["trait"] for s in rep.skipped_traits] == ["has_trait_5::colour"]
    assert "has_trait_5::colour" not in {r["trait"] for r in rep.per_trait}
    assert all(np.isfinite(r["mean_precision"]) and np.isfinite(r["mean_ap"]) for r in rep.summary)


def test_oracle_sae_finds_every_trait_and_beats_random(report, experiment):
    rep, _ = report
    sae_rows = [
        r for r in rep.per_trait if r["method"] == "sae" and r["protocol"] == "select_on_train"
    ]
    # Latent t was built to detect trait t: selection on train must pick it, and it is perfect.
    assert all(int(r["trait"].split("_")[2].split(":")[0]) == r["best_direction"] for r in sae_rows)
    assert all(r["precision"] == 1.0 for r in sae_rows)
    summary = {(r["method"], r["protocol"], r["k"]): r for r in rep.summary}
    sae, rand = summary[("sae", "select_on_train", 20)], summary[("random", "select_on_train", 20)]
    assert sae["mean_precision"] > rand["ci_high"]
    assert rand["ci_low"] <= rand["mean_precision"] <= rand["ci_high"]
    n_pos = {r["trait"]: r["n_pos"] for r in sae_rows}
    assert n_pos["has_trait_0::colour"] == int(experiment["test_NT"][:, 0].sum())
    # Selecting on the test split can only look better than (or equal to) selecting on train.
    for (m, p, k), row in summary.items():
        if p == "select_on_train":
            assert (
                summary[(m, "select_on_test", k)]["mean_precision"] >= row["mean_precision"] - 1e-6
            )


def test_sae_export_path_and_mean_pool(experiment, tmp_path):
    overrides = experiment_overrides(
        experiment, *FAST, "eval.pool=mean", "eval.methods=[sae,random]"
    )
    # An export's sae.json instead of a run dir (evaluate.py turns the CLI's sae= into sae_path=).
    overrides[0] = f"sae_path={experiment['sae_json']}"
    rep = run_evaluation(compose_evaluate(overrides, tmp_path))
    assert {r["method"] for r in rep.summary} == {"sae", "random"}


def test_k_larger_than_split_is_skipped_with_one_line(experiment, tmp_path, capsys):
    fast = [o for o in FAST if not o.startswith("eval.k=")] + ["eval.methods=[sae,random]"]
    cfg = compose_evaluate(experiment_overrides(experiment, *fast, "eval.k=[10,500]"), tmp_path)
    rep = run_evaluation(cfg)
    assert {r["k"] for r in rep.summary} == {10}
    out = capsys.readouterr().out
    assert out.count("eval.k: skipping k=500: the train split") == 1
    assert "only 120 valid images" in out
    cfg = compose_evaluate(experiment_overrides(experiment, *fast, "eval.k=[500]"), tmp_path)
    with pytest.raises(TraitsaeError, match="every k exceeds the 120 valid images"):
        run_evaluation(cfg)


def test_sae_of_another_layer_or_backbone(experiment, tmp_path):
    for name, kwargs, message in (
        ("layer", {"layer": 2}, "trained on layer 2"),
        ("backbone", {"backbone": "dinov2_small"}, "extract.py backbone=dinov2_small"),
    ):
        sae_json = make_sae(tmp_path / name, 16, 32, **kwargs)
        overrides = experiment_overrides(experiment, *FAST)
        overrides[0] = f"run={sae_json}"
        with pytest.raises(TraitsaeError, match=message):
            run_evaluation(compose_evaluate(overrides, tmp_path))


def test_invalid_images_are_skipped(experiment, tmp_path):
    from traitsae.data.store import Store
    from traitsae.evaluation.core.methods import Method, image_scores, linear_scorer

    rng = np.random.default_rng(0)
    patches_NPD = rng.standard_normal((10, 4, 8)).astype(np.float32)
    valid_N = np.ones(10, dtype=bool)
    valid_N[[2, 7]] = False
    patches_NPD[~valid_N] = 0.0
    path = make_store(
        tmp_path, "test", np.arange(1, 11), patches_NPD, patches_NPD.mean(1), valid_N=valid_N
    )
    import torch

    dirs_MD = torch.from_numpy(rng.standard_normal((3, 8)).astype(np.float32))
    with Store(path) as store:
        scores, rows = image_scores(store, 3, {"lin": Method("lin", linear_scorer(dirs_MD), 3)})
    np.testing.assert_array_equal(rows, np.flatnonzero(valid_N))
    expected_NM = (patches_NPD.astype(np.float16).astype(np.float32) @ dirs_MD.numpy().T).max(1)
    np.testing.assert_allclose(scores["lin"], expected_NM[valid_N], rtol=1e-5, atol=1e-5)


def test_bad_options(experiment, tmp_path):
    for override, message in (
        ("eval.pool=median", "eval.pool"),
        ("eval.methods=[sae,ica]", "eval.methods"),
        ("eval.certainty=[5]", "eval.certainty"),
        ("eval.seeds=[1,1]", "eval.seeds"),
        ("eval.seeds=abc", "eval.seeds must be a list of integers.*'abc'"),
        ("eval.seeds=[0,x]", "eval.seeds must be a list of integers"),
        ("eval.probe_folds=1", "eval.probe_folds"),
    ):
        cfg = compose_evaluate(experiment_overrides(experiment, *FAST, override), tmp_path)
        with pytest.raises(TraitsaeError, match=message):
            run_evaluation(cfg)


def test_short_table_is_printed(experiment, tmp_path, capsys):
    run_evaluation(
        compose_evaluate(experiment_overrides(experiment, *FAST, "eval.methods=[sae]"), tmp_path)
    )
    out = capsys.readouterr().out
    assert "k = R: R-precision" in out and "recall@0.8" in out
    assert "skipped has_trait_5::colour: no positives in the train and test split" in out


@pytest.mark.slow
def test_cli_bad_input_exits_2_without_traceback(experiment, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    overrides = experiment_overrides(experiment, *FAST)
    overrides[0] = f"sae={experiment['sae_json']}"  # the CLI contract's spelling of an export
    cmd = [
        sys.executable,
        str(repo / "evaluate.py"),
        *overrides,
        "eval.k=[1000]",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: eval.k=[1000]: every k") and "Traceback" not in bad.stderr


def test_missing_stores_print_every_extract_command(experiment, tmp_path):
    overrides = experiment_overrides(experiment, *FAST, f"paths.activations_dir={tmp_path}")
    with pytest.raises(TraitsaeError) as err:
        run_evaluation(compose_evaluate(overrides, tmp_path))
    for split in ("train", "test"):
        assert f"extract.py backbone=tiny dataset=synthetic split={split}" in str(err.value)
