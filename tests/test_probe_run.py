"""eval=probe: class-probe accuracy on original activations vs SAE reconstructions."""

import json

import pytest
import torch
from eval_helpers import LAYER, compose_evaluate, experiment_overrides, planted_experiment

from traitsae.errors import TraitsaeError
from traitsae.evaluation.registry import run_evaluation
from traitsae.sae.export import load_sae, save_sae


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    # Class label = whether the image carries trait 0 (planted on one of its 16 patches).
    return planted_experiment(tmp_path_factory.mktemp("probe"), n_train=160, n_test=160, rate=0.5)


def test_oracle_sae_keeps_the_class_signal(experiment, tmp_path):
    result = run_evaluation(
        compose_evaluate(experiment_overrides(experiment, "eval=probe"), tmp_path)
    )
    assert result["features"] == "pooled"  # the SAE was trained on patches
    assert result["n_classes"] == 2 and result["n_train"] == result["n_test"] == 160
    assert result["accuracy_original"] > result["chance"] + 0.1
    # The oracle's latent 0 reconstructs the trait-0 direction: the class stays readable.
    assert result["accuracy_reconstructed"] > result["chance"] + 0.1
    assert result["accuracy_drop"] == pytest.approx(
        result["accuracy_original"] - result["accuracy_reconstructed"]
    )
    assert json.loads((tmp_path / "probe.json").read_text()) == result


def test_sae_that_never_fires_drops_to_chance(experiment, tmp_path):
    sae = load_sae(experiment["sae_json"])
    with torch.no_grad():
        sae.sae.b_enc.fill_(-1e3)  # every code 0: reconstructions are the constant b_dec
    sae_json = save_sae(sae.sae, tmp_path / "dead", {**sae.meta, "scale": 1.0})
    overrides = experiment_overrides(experiment, "eval=probe", "eval.features=cls")
    overrides[0] = f"run={sae_json}"
    result = run_evaluation(compose_evaluate(overrides, tmp_path))
    assert result["features"] == "cls" and result["layer"] == LAYER
    assert result["accuracy_reconstructed"] == pytest.approx(result["chance"], abs=0.02)
    assert result["accuracy_drop"] > 0.1


def test_bad_feature_choice(experiment, tmp_path):
    cfg = compose_evaluate(
        experiment_overrides(experiment, "eval=probe", "eval.features=registers"), tmp_path
    )
    with pytest.raises(TraitsaeError, match="eval.features"):
        run_evaluation(cfg)
