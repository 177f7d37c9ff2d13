"""eval=key on generated data whose species differ by planted, masked traits.

The L1 path and the tree must equal scikit-learn called directly on the same pooled matrix; the
key's first splits must use latents whose heat-maps sit on planted traits (known masks); the
oracle SAE's keys must beat its initialisation at equal numbers of latents (paired CI).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_helpers import LAYER, compose_evaluate
from keys_helpers import GRID, N_TRAITS, mask_of, masked_experiment, overrides
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.heatmaps import patch_mask
from traitsae.evaluation.keys import sparse
from traitsae.evaluation.keys.key import run
from traitsae.evaluation.keys.pooled import class_names
from traitsae.sae.export import load_sae

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return masked_experiment(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def key(experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("key_out")
    cfg = compose_evaluate(overrides(experiment, "key", "eval.n_latents=[1,2,4,8]"), out)
    return run(cfg), out


@torch.no_grad()
def pooled_by_hand(experiment, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Max over patches of the SAE's codes, straight from the store, and the species."""
    sae = load_sae(experiment["run"]).eval()
    path = experiment["root"] / "activations" / "synthetic" / split / "tiny.h5"
    with Store(path) as store:
        acts_NPD = torch.from_numpy(np.asarray(store.patches(LAYER)[:]))
        species = np.asarray(store.metadata["species"]).astype(str)
        paths = list(np.asarray(store.metadata["path"]).astype(str))
    codes_NPS = sae.encode(acts_NPD.reshape(-1, acts_NPD.shape[-1])).reshape(
        *acts_NPD.shape[:2], -1
    )
    return codes_NPS.amax(1).numpy(), species, paths


def test_l1_path_and_tree_equal_sklearn_on_the_same_pooled_matrix(experiment, tmp_path):
    tight = ("eval.path_tol=1e-6", "eval.path_max_iter=20000", "eval.n_cs=6", "eval.methods=[sae]")
    result = run(compose_evaluate(overrides(experiment, "key", *tight), tmp_path))
    x_train, s_train, _ = pooled_by_hand(experiment, "train")
    x_test, s_test, _ = pooled_by_hand(experiment, "test")
    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    names = sorted(set(s_train))
    y_train, y_test = (np.array([names.index(s) for s in v]) for v in (s_train, s_test))
    scaler = StandardScaler().fit(x_train)
    z_train, z_test = scaler.transform(x_train), scaler.transform(x_test)
    rows = result.methods["sae"].path
    assert len(rows) == 6
    # sklearn walked along the same C values, each fit warm-started from the previous one.
    direct = LogisticRegression(
        C=rows[0]["c"], l1_ratio=1.0, solver="saga", tol=1e-6, max_iter=20000, random_state=0,
        warm_start=True,
    )  # fmt: skip
    for row in rows:
        direct.set_params(C=row["c"]).fit(z_train, y_train)
        assert row["n_latents"] == int((direct.coef_ != 0).any(axis=0).sum())
        assert row["accuracy"] == pytest.approx((direct.predict(z_test) == y_test).mean())
    assert rows[-1]["n_latents"] > rows[0]["n_latents"] >= 1
    tree = DecisionTreeClassifier(max_depth=4, min_samples_leaf=2, random_state=0)
    tree.fit(x_train, y_train)
    splits = sparse.splits_of(result.methods["sae"].tree)
    internal = np.flatnonzero(tree.tree_.children_left != -1)
    assert sorted(s["latent"] for s in splits) == sorted(tree.tree_.feature[internal].tolist())
    assert splits[0]["latent"] == tree.tree_.feature[0]
    assert splits[0]["threshold"] == pytest.approx(tree.tree_.threshold[0])
    tree_acc = (tree.predict(x_test) == y_test).mean()
    assert result.methods["sae"].tree_accuracy.accuracy == pytest.approx(tree_acc)


def test_first_splits_sit_on_planted_traits(experiment, key):
    """The root and its children split on latents whose heat-maps lie inside one trait's mask."""
    result, _ = key
    sae = load_sae(experiment["run"]).eval()
    path = experiment["root"] / "activations" / "synthetic" / "train" / "tiny.h5"
    with Store(path) as store:
        patches = store.patches(LAYER)
        paths = np.asarray(store.metadata["path"]).astype(str)
        first = [s for s in sparse.splits_of(result.methods["sae"].tree) if s["depth"] <= 1]
        assert len(first) >= 2
        for split in first:
            mass_TN = []
            for row, score in zip(split["top_rows"], split["top_scores"], strict=True):
                if score <= 0:
                    continue
                with torch.no_grad():
                    codes_PS = sae.encode(torch.from_numpy(np.asarray(patches[row])))
                map_RC = codes_PS[:, split["latent"]].reshape(GRID).numpy()
                mask = mask_of(experiment["data"], str(paths[row]))
                # A latent can only point at patches: the mass on the patches the trait touches.
                on_T = [map_RC[patch_mask(mask == t + 1, GRID)].sum() for t in range(N_TRAITS)]
                mass_TN.append(np.array(on_T) / map_RC.sum())
            best = np.mean(mass_TN, axis=0).max()
            assert len(mass_TN) >= 3 and best > 0.8, (split["latent"], best)


def test_trained_keys_beat_initialisation_at_equal_latents(key):
    result, out = key
    by = {(d["method"], d["key"]): d for d in result.differences}
    for key in ("n=8", "tree"):
        diff = by[("sae_init", key)]
        assert diff["excludes_zero"] and diff["sae_minus_method"] > 0, diff
    sae = {r["n_latents"]: r for r in result.methods["sae"].budgets}
    assert sae[8]["accuracy"] > 0.8 and sae[8]["ci_low"] <= sae[8]["accuracy"] <= sae[8]["ci_high"]
    saved = json.loads((out / "key.json").read_text())
    assert {"methods", "dense_probe", "differences", "notes", "meta"} <= set(saved)
    assert saved["methods"]["sae"]["tree"]["leaf"] is False
    for name in ("key_path.csv", "key_budgets.csv", "key_differences.csv", "key_curves.png"):
        assert (out / name).stat().st_size > 0
    html = (out / "key.html").read_text()
    assert "1a. latent" in html and len(list((out / "key").glob("*.png"))) >= 3


def test_bad_class_column_budget_and_classes_are_user_errors(experiment, tmp_path):
    with pytest.raises(TraitsaeError, match="not a metadata column.*species"):
        run(compose_evaluate(overrides(experiment, "key", "eval.class_column=colour"), tmp_path))
    with pytest.raises(TraitsaeError, match="asks for 64 latents but the SAE.*only 32"):
        run(compose_evaluate(overrides(experiment, "key", "eval.n_latents=[4,64]"), tmp_path))
    one = "eval.classes=[001.Alpha_warbler]"
    with pytest.raises(TraitsaeError, match="fewer than two classes"):
        run(compose_evaluate(overrides(experiment, "key", one), tmp_path))
    store = SimpleNamespace(path="x.h5")
    with pytest.raises(TraitsaeError, match="fewer than two classes"):
        class_names(np.array(["a", "a", "a"]), None, store, "species")


def test_prints_a_table_and_the_cli_turns_bad_input_into_one_error_line(
    experiment, tmp_path, capsys
):
    args = overrides(experiment, "key", "eval.methods=[sae,random]", "eval.n_latents=[2]")
    run(compose_evaluate(args, tmp_path))
    out = capsys.readouterr().out
    assert "held-out accuracy (species" in out and "dense probe" in out and "random" in out
    command = [sys.executable, str(ROOT / "evaluate.py"), f"hydra.run.dir={tmp_path}"]
    bad = subprocess.run(
        [*command, *args, "eval.class_column=colour"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert "eval.class_column='colour' is not a metadata column" in bad.stderr
