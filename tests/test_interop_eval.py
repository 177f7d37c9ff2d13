"""Foreign checkpoints through evaluate.py, and export to saev's layout (round trip).

The evaluations depend on an SAE's weights, not on who saved them: a SAELens checkpoint and
the same weights as a traitsae export give identical eval=health and eval=cub_traits numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import (
    compose_evaluate,
    experiment_overrides,
    make_sae,
    make_store,
    planted_activations,
    planted_experiment,
    planted_split_labels,
    trait_directions,
)
from interop_helpers import FIXTURES, saelens_layout

import traitsae
from traitsae.errors import TraitsaeError
from traitsae.evaluation.registry import run_evaluation
from traitsae.sae.export import save_sae
from traitsae.sae.formats import saev_export
from traitsae.sae.model import build_sae

REPO = Path(__file__).resolve().parents[1]
D_MODEL = 32  # the fixtures' width


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A held-out store of the fixtures' width: backbone tiny, layer 3 (as SAELens records)."""
    root = tmp_path_factory.mktemp("interop_eval")
    _, test_NT = planted_split_labels(20, 40, 4)
    patches, cls = planted_activations(test_NT, trait_directions(4, D_MODEL), 16, seed=5)
    make_store(root / "acts", "test", np.arange(1, 41), patches, cls)
    narrow, _ = planted_activations(test_NT, trait_directions(4, 16), 16, seed=6)
    make_store(root / "narrow", "test", np.arange(1, 41), narrow, narrow.mean(1))
    return root


def health(target: Path, store_root: Path, out: Path, *extra: str):
    overrides = ["eval=health", f"sae_path={target}", f"paths.activations_dir={store_root}"]
    (result,) = run_evaluation(compose_evaluate([*overrides, *extra], out))
    return dataclasses.asdict(result)


def test_saelens_checkpoint_and_same_weights_in_traitsae_give_identical_health(store, tmp_path):
    """The decoder-norm-rescaled TopK fixture: the most folding of any SAELens variant."""
    fixture = FIXTURES / "saelens_topk_rescaled"
    foreign = traitsae.load_sae(fixture)
    meta = {"backbone": "tiny", "layer": 3, "tokens": "patches", "scale": 1.0}
    save_sae(foreign.sae, tmp_path / "run", meta)
    theirs = health(fixture, store / "acts", tmp_path / "a", "data.tokens=patches")
    ours = health(tmp_path / "run", store / "acts", tmp_path / "b")
    for key in ("run", "label"):
        theirs.pop(key), ours.pop(key)
    assert theirs == ours  # every number, bit for bit
    assert 0 < theirs["l0"] <= 6 and theirs["n_tokens"] == 40 * 16


def test_saelens_checkpoint_and_same_weights_give_identical_cub_traits(tmp_path):
    ex = planted_experiment(tmp_path / "cub", d_model=16, d_sae=32)
    foreign = saelens_layout(ex["run_dir"], tmp_path / "saelens")
    fast = [
        "eval=cub_traits",
        "eval.k=[5]",
        "eval.methods=[sae,sae_init,random,pca]",
        "eval.n_samples=1000",
        "eval.n_bootstrap=50",
        "eval.seeds=[0]",
    ]
    run_evaluation(compose_evaluate(experiment_overrides(ex, *fast), tmp_path / "a"))
    overrides = [o for o in experiment_overrides(ex, *fast) if not o.startswith("run=")]
    placement = ["data.tokens=patches"]  # SAELens records model (tiny) and layer (3)
    run_evaluation(
        compose_evaluate([f"sae_path={foreign}", *placement, *overrides], tmp_path / "b")
    )
    ours = json.loads((tmp_path / "a" / "cub_traits.json").read_text())
    theirs = json.loads((tmp_path / "b" / "cub_traits.json").read_text())
    assert ours["summary"] == theirs["summary"] and ours["per_trait"] == theirs["per_trait"]
    sae_rows = [r for r in ours["summary"] if r["method"] == "sae"]
    assert sae_rows and all(r["mean_ap"] > 0.5 for r in sae_rows)  # the oracle finds its traits


def test_missing_placement_names_each_override(store, tmp_path):
    fixture = FIXTURES / "sparsify_topk"  # records no model, layer or token kind
    with pytest.raises(TraitsaeError) as err:
        health(fixture, store / "acts", tmp_path)
    message = str(err.value)
    for needed in ("backbone, layer, tokens", "backbone=<name>", "data.layer=<n>", "data.tokens="):
        assert needed in message
    result = health(
        fixture, store / "acts", tmp_path, "backbone=tiny", "data.layer=3", "data.tokens=patches"
    )
    assert result["l0"] == pytest.approx(6.0)  # TopK k=6


def test_width_not_matching_the_store(store, tmp_path):
    with pytest.raises(TraitsaeError, match=r"has d_model=16 but the SAE expects d_model=32"):
        health(FIXTURES / "saelens_topk", store / "narrow", tmp_path, "data.tokens=patches")


def test_evaluate_cli_passes_sae_format_and_placement(store, tmp_path):
    """evaluate.py sae=<foreign checkpoint>, its format and placement on the command line."""
    command = [sys.executable, str(REPO / "evaluate.py"), "eval=health"]
    command += [f"sae={FIXTURES / 'saev_topk'}", "sae_format=saev", "backbone=tiny"]
    command += ["data.layer=3", "data.tokens=patches", f"paths.activations_dir={store / 'acts'}"]
    command += [f"hydra.run.dir={tmp_path / 'out'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads((tmp_path / "out" / "health.json").read_text())["runs"]
    assert run["l0"] == pytest.approx(6.0)


def test_wrong_sae_format(store, tmp_path):
    with pytest.raises(TraitsaeError, match=r"sae_format=sparsify was given, but .* does not hold"):
        health(FIXTURES / "saev_topk", store / "acts", tmp_path, "sae_format=sparsify")


# ---------------------------------------------------------------- export to saev


@pytest.mark.parametrize("variant", ["relu", "topk", "batchtopk", "matryoshka"])
def test_export_to_saev_round_trip(tmp_path, variant):
    torch.manual_seed(0)
    sae = build_sae(variant, 16, 48, k=4, threshold_momentum=0.1, prefixes=[12, 48])
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3), sae.b_dec.normal_(0.0, 0.3)
        if variant in ("batchtopk", "matryoshka"):
            sae.activation.threshold.fill_(0.5)
    meta = {"backbone": "tiny", "layer": 2, "tokens": "cls", "scale": 0.6, "dataset": "synthetic"}
    save_sae(sae, tmp_path / "run", meta)
    ours = traitsae.load_sae(tmp_path / "run")
    checkpoint = saev_export.export(tmp_path / "run", tmp_path / "saev")
    assert checkpoint == tmp_path / "saev" / "sae.pt"
    back = traitsae.load_sae(tmp_path / "saev")
    assert back.meta["format"] == "saev"
    assert (back.meta["backbone"], back.meta["layer"], back.meta["tokens"]) == ("tiny", 2, "cls")
    x_BD = torch.randn(64, 16) * 3.0 + 1.0
    with torch.no_grad():
        codes_BS = ours.encode(x_BD)
        torch.testing.assert_close(back.encode(x_BD), codes_BS, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            back.decode(codes_BS), ours.decode(codes_BS), atol=1e-5, rtol=1e-5
        )
    assert 0 < (codes_BS > 0).sum(1).float().mean() < 48


def test_export_refuses_what_saev_cannot_hold_and_never_overwrites_inputs(tmp_path):
    sae = build_sae("jumprelu", 16, 32, threshold_init=0.1, bandwidth=1e-3)
    save_sae(sae, tmp_path / "run", {"backbone": "tiny", "layer": 3, "scale": 1.0})
    with pytest.raises(TraitsaeError, match=r"jumprelu SAE; saev has no jumprelu activation"):
        saev_export.export(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out" / "sae.pt").exists()


def test_export_cli(tmp_path, capsys):
    make_sae(tmp_path / "run", 16, 32, variant="topk")
    saev_export.main([str(tmp_path / "run"), str(tmp_path / "out")])
    assert "saev checkpoint:" in capsys.readouterr().out
    assert traitsae.load_sae(tmp_path / "out").variant == "topk"
    with pytest.raises(SystemExit) as exit_info:
        saev_export.main([str(tmp_path / "nowhere"), str(tmp_path / "out2")])
    assert exit_info.value.code == 2 and "error: no exported SAE at" in capsys.readouterr().err
