"""eval=health: metrics against a direct computation, and a sweep dir with its Pareto frontier."""

import csv
import json

import numpy as np
import pytest
import torch
from eval_helpers import (
    compose_evaluate,
    make_sae,
    make_store,
    planted_activations,
    planted_split_labels,
    trait_directions,
)

from traitsae.errors import TraitsaeError
from traitsae.evaluation.registry import run_evaluation
from traitsae.sae.export import load_sae

D_MODEL = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    _, test_NT = planted_split_labels(40, 60, 4)
    patches, cls = planted_activations(test_NT, trait_directions(4, D_MODEL), 16, seed=3)
    valid_N = np.ones(60, dtype=bool)
    valid_N[5] = False  # an unreadable image: excluded from every statistic
    make_store(root / "acts", "test", np.arange(1, 61), patches, cls, valid_N=valid_N)
    sweep = root / "sweep"
    for job, (variant, d_sae) in enumerate((("relu", 8), ("topk", 32), ("relu", 64))):
        make_sae(sweep / str(job), D_MODEL, d_sae, variant=variant, seed=job)
        (sweep / str(job) / ".hydra").mkdir()
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(
            f"- sae={variant}\n- sae.d_sae={d_sae}\n- hydra.job.num={job}\n"
        )
    return {"acts": root / "acts", "sweep": sweep, "patches": patches[valid_N]}


def overrides(setup, target):
    return ["eval=health", f"run={target}", f"paths.activations_dir={setup['acts']}"]


def test_single_run_metrics_match_direct_computation(setup, tmp_path):
    run_dir = setup["sweep"] / "0"
    (result,) = run_evaluation(compose_evaluate(overrides(setup, run_dir), tmp_path))
    sae = load_sae(run_dir)
    x_RD = torch.from_numpy(
        setup["patches"].astype(np.float16).astype(np.float32).reshape(-1, D_MODEL)
    )
    with torch.no_grad():
        codes_RS = sae.encode(x_RD)
        err = ((x_RD - sae.decode(codes_RS)) ** 2).sum().item()
    assert result.n_tokens == x_RD.shape[0]
    assert result.mse == pytest.approx(err / x_RD.numel(), rel=1e-4)
    assert result.fvu == pytest.approx(err / ((x_RD - x_RD.mean(0)) ** 2).sum().item(), rel=1e-4)
    freq_S = (codes_RS > 0).float().mean(0).numpy()
    assert result.l0 == pytest.approx(float((codes_RS > 0).sum(1).float().mean()))
    np.testing.assert_allclose(result.firing_frequency, freq_S, atol=1e-6)
    assert result.dead_fraction == pytest.approx(float((freq_S == 0).mean()))
    assert result.dense_fraction == pytest.approx(float((freq_S > 0.01).mean()))
    assert result.label == "sae=relu d_sae=8"  # one run: all its overrides, hydra.* left out
    assert result.dense_freq == pytest.approx(0.01)  # relu: 10 x the untargeted rate 1e-3
    assert (tmp_path / "health_firing_frequency.png").is_file()


def test_sweep_dir_gives_csv_and_pareto(setup, tmp_path):
    results = run_evaluation(
        compose_evaluate(overrides(setup, setup["sweep"]) + ["eval.max_tokens=500"], tmp_path)
    )
    assert [r.label for r in results] == [
        "sae=relu d_sae=8",
        "sae=topk d_sae=32",
        "sae=relu d_sae=64",
    ]
    assert all(r.n_tokens == 500 for r in results)
    assert results[1].dense_freq == pytest.approx(10 * 8 / 32)  # topk: 10 x k / d_sae
    rows = list(csv.DictReader((tmp_path / "health.csv").open()))
    assert [int(r["d_sae"]) for r in rows] == [8, 32, 64]
    assert [r["sae"] for r in rows] == ["relu", "topk", "relu"]  # swept overrides as columns
    l0 = np.array([r.l0 for r in results])
    fvu = np.array([r.fvu for r in results])
    for i, r in enumerate(results):  # on the frontier iff no other run is at least as good on both
        dominated = any(
            l0[j] <= l0[i] and fvu[j] <= fvu[i] and (l0[j], fvu[j]) != (l0[i], fvu[i])
            for j in range(3)
        )
        assert r.pareto == (not dominated)
        assert rows[i]["pareto"] == str(r.pareto)
    assert any(r.pareto for r in results)
    data = json.loads((tmp_path / "health.json").read_text())
    assert len(data["runs"]) == 3 and "log10_frequency_histogram" in data["runs"][0]
    assert (tmp_path / "health_pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_labels_name_only_what_differs_and_stay_short(tmp_path):
    from traitsae.evaluation.core.runs import run_labels, short_names

    runs = []
    for job, (k, lr) in enumerate(((16, "0.001"), (32, "0.001"), (16, "0.0004"))):
        run = tmp_path / str(job)
        (run / ".hydra").mkdir(parents=True)
        overrides = f"- sae=topk\n- sae.k={k}\n- optim.lr={lr}\n- hydra.job.num={job}\n"
        (run / ".hydra" / "overrides.yaml").write_text(overrides)
        runs.append(run)
    assert run_labels(runs) == ["k=16 lr=0.001", "k=32 lr=0.001", "k=16 lr=0.0004"]
    assert short_names(["sae.k", "data.k", "optim.lr"]) == {
        "sae.k": "sae.k", "data.k": "data.k", "optim.lr": "lr",
    }  # fmt: skip


def test_empty_dir_is_an_error(setup, tmp_path):
    with pytest.raises(TraitsaeError, match="holds no sae.json"):
        run_evaluation(compose_evaluate(overrides(setup, tmp_path), tmp_path))


@pytest.mark.parametrize("target", ["0", ""])
def test_a_backbone_the_sae_was_not_trained_on_is_refused(setup, tmp_path, target):
    """health (one run or a sweep) used to ignore a `backbone=` that every other evaluation
    refuses, and scored the SAE's own store as if it were that backbone's."""
    cfg = compose_evaluate(
        [*overrides(setup, setup["sweep"] / target), "backbone=dinov2"], tmp_path
    )
    with pytest.raises(TraitsaeError, match="backbone=dinov2 was given, but the SAE .* trained on"):
        run_evaluation(cfg)
