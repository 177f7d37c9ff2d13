"""dataset=dictionary (generated store with ground truth) and eval=dictionary (scores vs truth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import compose_evaluate
from extract_helpers import compose_extract
from train_helpers import id_store

from traitsae.data.dictionary import DictionarySpec, make_dictionary, read_truth
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.quality.dictionary import recovered_by_kind
from traitsae.evaluation.registry import run_evaluation
from traitsae.extraction import extract
from traitsae.sae.export import save_sae
from traitsae.sae.model import build_sae

SMALL = [
    "dataset=dictionary",
    "dataset.n_features=96",
    "dataset.d_model=32",
    "dataset.n_parents=8",
    "dataset.children_per_parent=3",
    "dataset.mean_active=4",
    "dataset.correlation=0.0",
    "dataset.patches_per_image=64",
    "dataset.images={train: 64, test: 64}",
    "dataset.truth_images=64",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dictionary")
    return extract(compose_extract(tmp, [*SMALL, "split=test"]))


def test_generated_store_holds_the_truth_and_streams_like_any_store(store: Path) -> None:
    with Store(store) as s:
        truth = read_truth(s)
        assert (s.backbone, s.d_model, s.n_patches, s.layers) == ("dictionary", 32, 64, [0])
        acts_ND = np.asarray(s.patches(0)[()], np.float32).reshape(-1, 32)
    features_FD, parents_F = truth["features"], truth["parents"]
    assert features_FD.shape == (96, 32) and features_FD.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features_FD, axis=1), 1.0, rtol=1e-5)
    assert (parents_F[:8] == -1).all() and (parents_F[8:32] == np.repeat(np.arange(8), 3)).all()
    indptr, idx, vals = truth["codes_indptr"], truth["codes_indices"], truth["codes_values"]
    assert truth["truth_vectors"] == len(indptr) - 1 == 64 * 64
    assert np.diff(indptr).mean() == pytest.approx(4, rel=0.15)  # mean_active
    # a child fires only with its parent, and never with a sibling
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    on = np.zeros((len(indptr) - 1, 96), bool)
    on[rows, idx] = True
    child = parents_F >= 0
    assert on[:, child].any()
    assert (on[:, parents_F[child]] | ~on[:, child]).all()
    assert (on[:, 8:32].reshape(-1, 8, 3).sum(2) <= 1).all()
    # the stored vectors are codes @ features + bias + noise (float16)
    codes_NF = np.zeros((len(indptr) - 1, 96), np.float32)
    codes_NF[rows, idx] = vals
    resid_ND = acts_ND - codes_NF @ features_FD
    assert np.abs(resid_ND - resid_ND.mean(0)).std() < 0.05  # bias + noise sd 0.01 only


def test_same_seed_same_dictionary_for_every_split(store: Path) -> None:
    cfg = compose_extract(Path("/unused"), [*SMALL, "split=test"])
    spec = DictionarySpec.from_cfg(cfg.dataset, "train")
    with Store(store) as s:
        np.testing.assert_array_equal(
            read_truth(s)["features"], make_dictionary(spec).features_FD.astype(np.float32)
        )


def _export(run: Path, sae: torch.nn.Module, store: Path, d_model: int = 32) -> Path:
    meta = {"backbone": "dictionary", "dataset": "dictionary", "layer": 0, "scale": 1.0,
            "store": str(store)}  # fmt: skip
    save_sae(sae, run, meta)
    return run


def test_scores_separate_the_true_dictionary_from_a_random_one(store: Path, tmp_path) -> None:
    with Store(store) as s:
        truth = read_truth(s)
    features_FD = torch.from_numpy(truth["features"])
    oracle = build_sae("relu", 32, 96).eval()
    with torch.no_grad():  # encoder = decoder = the true features; fires where a feature does
        oracle.W_dec.copy_(features_FD)
        oracle.W_enc.copy_(features_FD)
        oracle.b_dec.copy_(torch.from_numpy(truth["bias"]))
        oracle.b_enc.fill_(-0.5)
    random = build_sae("topk", 32, 96, k=4).eval()
    sweep = tmp_path / "sweep"
    _export(sweep / "0", oracle, store)
    _export(sweep / "1", random, store)
    results = run_evaluation(compose_evaluate(["eval=dictionary", f"run={sweep}"], tmp_path))
    best, worst = results
    assert best.mmcs == pytest.approx(1.0) and best.recovered == 1.0
    assert worst.recovered == 0.0 and worst.mmcs < 0.6
    assert best.mcc > worst.mcc + 0.3 and best.f1 > worst.f1 + 0.2
    assert best.absorption_pairs == worst.absorption_pairs > 0
    data = json.loads((tmp_path / "dictionary.json").read_text())
    assert [r["mmcs"] for r in data["runs"]] == [best.mmcs, worst.mmcs]
    single = run_evaluation(compose_evaluate(["eval=dictionary", f"run={sweep / '0'}"], tmp_path))
    keys = json.loads((tmp_path / "dictionary.json").read_text())
    assert {"mmcs", "recovered", "mcc", "f1", "absorption", "splitting"} <= keys.keys()
    assert keys["mcc"] == single[0].mcc
    assert keys["recovered_parents"] == keys["recovered_children"] == 1.0


def test_recovered_by_kind_counts_parents_children_and_the_rest() -> None:
    parents_F = torch.tensor([-1, -1, 0, 0, 1, -1])  # 0, 1 parents; 2-4 children; 5 other
    best_F = torch.tensor([0.95, 0.2, 0.99, 0.7, 0.3, 0.91])
    assert recovered_by_kind(best_F, parents_F) == {
        "recovered_parents": 0.5,
        "recovered_children": pytest.approx(1 / 3),
        "recovered_others": 1.0,
    }
    flat = recovered_by_kind(best_F, torch.full((6,), -1))
    assert flat["recovered_parents"] is None and flat["recovered_children"] is None
    assert flat["recovered_others"] == 0.5


def test_store_without_ground_truth_is_a_clear_error(tmp_path) -> None:
    plain = id_store(tmp_path / "plain.h5", d_model=32)
    run = _export(tmp_path / "run", build_sae("topk", 32, 96, k=4).eval(), plain)
    with pytest.raises(TraitsaeError, match="no ground_truth/features.*dataset=dictionary"):
        run_evaluation(compose_evaluate(["eval=dictionary", f"run={run}"], tmp_path))


def _hand_written_truth(tmp_path: Path, parents: bool) -> tuple[Path, np.ndarray]:
    """A plain store (layer 0, 32 dims) with ground truth written by hand: only
    ground_truth/features (+ parents), no true codes: the documented minimum."""
    import h5py

    path = id_store(tmp_path / "plain.h5", n_images=16, n_patches=4, d_model=32, layers=(0,))
    rng = np.random.default_rng(3)
    features_FD = rng.normal(size=(12, 32)).astype(np.float32)
    features_FD /= np.linalg.norm(features_FD, axis=1, keepdims=True)
    with h5py.File(path, "a") as f:
        f.create_dataset("ground_truth/features", data=features_FD)
        if parents:  # 0, 1 parents of 2-3 and 4-5
            f.create_dataset("ground_truth/parents", data=np.array([-1, -1, 0, 0, 1, 1] + [-1] * 6))
    return path, features_FD


def _decoder_sae(rows_FD: np.ndarray) -> torch.nn.Module:
    sae = build_sae("topk", 32, len(rows_FD), k=4).eval()
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(rows_FD))
        sae.W_enc.copy_(torch.from_numpy(rows_FD))
    return sae


@pytest.mark.parametrize("parents", [False, True])
def test_features_only_truth_scores_what_it_can_and_says_why_not(tmp_path, parents, capsys):
    """It used to die with KeyError 'truth_vectors' (a traceback): the sweeps issue's contract is
    ground_truth/features (+ parents) alone."""
    store, features_FD = _hand_written_truth(tmp_path, parents)
    run = _export(tmp_path / "run", _decoder_sae(features_FD), store)
    (result,) = run_evaluation(compose_evaluate(["eval=dictionary", f"run={run}"], tmp_path))
    assert result.mmcs == pytest.approx(1.0) and result.recovered == 1.0
    assert result.n_vectors == 16 * 4 and np.isfinite([result.l0, result.fvu]).all()
    assert result.mcc is None and result.f1 is None and result.absorption is None
    assert "no true codes" in result.skipped["mcc"] and "no true codes" in result.skipped["f1"]
    if parents:
        assert result.absorption_cos == pytest.approx(0.0, abs=1e-6)  # the true features
        assert result.recovered_parents == result.recovered_children == 1.0
        assert "absorption_cos" not in result.skipped
    else:
        assert result.absorption_cos is None and result.recovered_children is None
        assert "no ground_truth/parents" in result.skipped["absorption_cos"]
    saved = json.loads((tmp_path / "dictionary.json").read_text())
    assert saved["mcc"] is None and saved["skipped"]["mcc"] == result.skipped["mcc"]
    printed = capsys.readouterr().out
    assert "MCC n/a" in printed and "n/a: true_l0, mcc, f1" in printed


def test_absorption_by_decoder_geometry_sees_a_child_latent_that_took_its_parent(tmp_path):
    store, features_FD = _hand_written_truth(tmp_path, parents=True)
    absorbing = features_FD.copy()
    absorbing[2:6] += features_FD[[0, 0, 1, 1]]  # each child's latent = child + parent
    absorbing[2:6] /= np.linalg.norm(absorbing[2:6], axis=1, keepdims=True)
    run = _export(tmp_path / "run", _decoder_sae(absorbing), store)
    (result,) = run_evaluation(compose_evaluate(["eval=dictionary", f"run={run}"], tmp_path))
    assert result.absorption_cos > 0.6  # cos(child + parent, parent) ~ 0.71 for near-orthogonal


def test_another_seed_s_dictionary_is_refused(store: Path, tmp_path) -> None:
    """Scoring an SAE against another dictionary than its own used to print scores silently."""
    other = extract(compose_extract(tmp_path / "other", [*SMALL, "split=test", "dataset.seed=1"]))
    run = _export(tmp_path / "run", build_sae("topk", 32, 96, k=4).eval(), store)
    cfg = compose_evaluate(["eval=dictionary", f"run={run}", f"data.store={other}"], tmp_path)
    with pytest.raises(TraitsaeError, match="holds another one .its features differ"):
        run_evaluation(cfg)
    same = extract(compose_extract(tmp_path / "same", [*SMALL, "split=train"]))  # same seed
    cfg = compose_evaluate(["eval=dictionary", f"run={run}", f"data.store={same}"], tmp_path)
    assert run_evaluation(cfg)[0].mcc is not None
