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
    with pytest.raises(TraitsaeError, match="no ground_truth/ group.*dataset=dictionary"):
        run_evaluation(compose_evaluate(["eval=dictionary", f"run={run}"], tmp_path))
