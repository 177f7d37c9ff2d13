"""eval=audit: Yield(B) equals a naive loop over the proposals, planted traits are proposed and
grounded above the baselines, the proposal-stage permutation null is calibrated, and bad input
(tau, masks, budgets) is a one-paragraph error."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from eval_helpers import LAYER, compose_evaluate
from keys_helpers import GRID, N_TRAITS, mask_of, masked_experiment, overrides
from sklearn.metrics import average_precision_score

from traitsae.data.images.masks import patch_class_counts, patch_labels
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.discovery.null import auroc_per_column
from traitsae.evaluation.keys import audit, grounding
from traitsae.evaluation.keys.audit import AuditOptions, run
from traitsae.sae.export import load_sae

FAST = ("eval.frame=stretch", "eval.patch_rule=any", "eval.budgets=[2,4,8]")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return masked_experiment(tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def audited(experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_out")
    extra = (*FAST, "eval.n_permutations=19")
    return run(compose_evaluate(overrides(experiment, "audit", *extra), out)), out


def test_yield_equals_a_naive_loop_over_proposals(experiment, audited):
    """Re-derive Yield(B) from scratch: sklearn's AP of each proposal against every class."""
    result, _ = audited
    sae = load_sae(experiment["run"]).eval()
    path = experiment["root"] / "activations" / "synthetic" / "test" / "tiny.h5"
    with Store(path) as store:
        acts = torch.from_numpy(np.asarray(store.patches(LAYER)[:])).reshape(-1, 16)
        paths = np.asarray(store.metadata["path"]).astype(str)
    labels = [
        patch_labels(patch_class_counts(mask_of(experiment["data"], p), GRID, N_TRAITS + 1),
                     range(1, N_TRAITS + 1), "any")
        for p in paths
    ]  # fmt: skip
    y_RC = np.concatenate(labels)
    with torch.no_grad():
        codes_RS = sae.encode(acts).numpy()
    tau = result.meta["options"]["tau"]
    sae_audit = result.methods["sae"]
    for row in sae_audit.yields:
        grounded = 0
        for proposal in sae_audit.proposals[: row["budget"]]:
            scores = codes_RS[:, proposal["direction"]]
            best = max(
                average_precision_score(y_RC[:, c], scores)
                for c in range(N_TRAITS)
                if y_RC[:, c].any()
            )
            assert best == pytest.approx(proposal["best_ap"], abs=1e-9)
            grounded += best >= tau
        assert row["yield"] == pytest.approx(grounded / row["budget"])


def test_planted_traits_are_proposed_and_grounded_above_baselines(audited):
    result, out = audited
    y = {name: {r["budget"]: r["yield"] for r in m.yields} for name, m in result.methods.items()}
    assert y["sae"][4] == 1.0 and y["sae"][8] >= 0.75
    # Planted traits are orthogonal directions: PCA and k-means may find them too; random
    # directions and the SAE's initialisation do not.
    for name in ("sae_init", "random"):
        assert result.methods[name].auc < result.methods["sae"].auc, name
    assert result.null["p_value"] == pytest.approx(1 / 20)  # nothing in the null beats it
    low, high = result.methods["sae"].auc_ci
    assert low <= result.methods["sae"].auc <= high
    saved = json.loads((out / "audit.json").read_text())
    assert saved["null"]["n_permutations"] == 19 and len(saved["null"]["null_auc"]) == 19
    for name in ("audit_yields.csv", "audit_proposals.csv", "audit_yield.png"):
        assert (out / name).stat().st_size > 0


def null_options(propose: str, n_permutations: int, tmp_path) -> AuditOptions:
    """The options as evaluate.py builds them (conf/eval/audit.yaml), with a short path."""
    extra = [f"eval.propose={propose}", f"eval.n_permutations={n_permutations}", "eval.n_cs=6"]
    cfg = compose_evaluate(["eval=audit", *extra, "eval.c_decades=2.0"], tmp_path)
    return build_options(AuditOptions, cfg)


@pytest.mark.parametrize(
    ("propose", "n_runs", "n_permutations"), [("discovery", 400, 19), ("classifier", 30, 9)]
)
def test_permutation_null_is_calibrated_on_labels_unrelated_to_masks(
    propose, n_runs, n_permutations, tmp_path
):
    """Labels drawn independently of everything (within two strata): p uniform on its grid."""
    budgets = [2, 4, 8]
    base = null_options(propose, n_permutations, tmp_path)
    p_values = []
    for seed in range(n_runs):
        rng = np.random.default_rng(seed)
        x_NS = rng.exponential(size=(36, 16)) * (rng.random((36, 16)) < 0.5)
        ap_S = rng.random(16)  # grounding: fixed, whatever the labels
        codes_N = np.arange(36) % 2
        y_N = grounding.permute_within(np.arange(36) % 3, codes_N, rng)
        opts = replace(base, seed=seed)
        proposer = audit.Proposer(x_NS, codes_N, opts, budgets[-1])
        ranking = proposer.rank(y_N)
        null = audit.permutation_null(proposer, y_N, codes_N, ap_S, budgets, ranking, opts)
        p_values.append(null["p_value"])
    p = np.array(p_values)
    grid = np.arange(1, n_permutations + 2) / (n_permutations + 1)
    assert set(np.round(p, 9)) <= set(np.round(grid, 9))
    for t in grid[[0, 1, len(grid) // 2]]:
        slack = 3 * math.sqrt(t * (1 - t) / n_runs) + 1e-9
        assert abs((p <= t + 1e-9).mean() - t) <= slack, (t, (p <= t + 1e-9).mean())


def test_bad_tau_masks_and_budgets_are_user_errors(experiment, tmp_path):
    for tau in ("0", "1.5", "-0.2"):
        with pytest.raises(TraitsaeError, match=r"eval.tau=.* must be in \(0, 1\]"):
            run(compose_evaluate(overrides(experiment, "audit", f"eval.tau={tau}"), tmp_path))
    with pytest.raises(TraitsaeError, match="needs a dataset with masks.*no segmentation masks"):
        run(compose_evaluate(overrides(experiment, "audit", "dataset.masks=null"), tmp_path))
    with pytest.raises(TraitsaeError, match="asks for 100 latents but the SAE.*only 32"):
        run(compose_evaluate(overrides(experiment, "audit", *FAST[:2]), tmp_path))
    with pytest.raises(TraitsaeError, match="not a metadata column"):
        extra = (*FAST, "eval.class_column=colour")
        run(compose_evaluate(overrides(experiment, "audit", *extra), tmp_path))
    with pytest.raises(TraitsaeError, match="eval.propose"):
        run(compose_evaluate(overrides(experiment, "audit", "eval.propose=lasso"), tmp_path))


def test_weighted_ap_equals_ap_on_resampled_rows():
    """The bootstrap's presorted AP with image counts as weights = AP on the duplicated rows."""
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(np.round(rng.random((400, 6)), 1).astype(np.float32))
    labels = rng.random((400, 3)) < 0.1
    best, cls = grounding.best_class_ap(scores, labels)
    ranked = grounding.RankedPatches(scores, labels, cls)
    np.testing.assert_allclose(ranked.ap(torch.ones(400)), best, atol=1e-6)
    weights = rng.integers(0, 3, 400)
    rows = np.repeat(np.arange(400), weights)
    direct = [average_precision_score(labels[rows, c], scores[rows, j]) for j, c in enumerate(cls)]
    np.testing.assert_allclose(ranked.ap(torch.from_numpy(weights)), direct, atol=1e-6)


def test_discovery_proposer_ranks_by_discoverys_stratified_auroc(tmp_path):
    rng = np.random.default_rng(3)
    x_NS, codes_N = rng.exponential(size=(30, 12)), np.arange(30) % 3
    y_N = rng.integers(0, 3, 30)
    opts = null_options("discovery", 0, tmp_path)
    auroc_CS = np.stack([auroc_per_column(x_NS, y_N == c, codes_N) for c in range(3)])
    expected = np.argsort(-auroc_CS.max(axis=0), kind="stable")
    np.testing.assert_array_equal(audit.Proposer(x_NS, codes_N, opts, 8).rank(y_N), expected)
