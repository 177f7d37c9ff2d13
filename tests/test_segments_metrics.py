"""Patch metrics of eval=segments against naive loops and sklearn, on small cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from traitsae.evaluation.segments import metrics as pm


@pytest.fixture(scope="module")
def case():
    """Scores with ties (sparse, rounded latents), a constant direction, and correlated labels."""
    rng = np.random.default_rng(0)
    n_rows, n_dirs, n_classes = 240, 9, 3
    s_RM = rng.standard_normal((n_rows, n_dirs)).astype(np.float32)
    s_RM[:, :4] = np.maximum(s_RM[:, :4], 0).round(1)  # many ties, most at 0
    s_RM[:, 8] = 0.0  # dead latent
    y_RC = rng.random((n_rows, n_classes)) < 0.15
    y_RC[:, 1] |= s_RM[:, 5] > 1.0
    y_RC[:, 2] |= s_RM[:, 2] > 0.5
    return s_RM, y_RC


def naive_ap(s_R, y_R):
    """Mean over positives of the precision among patches scoring >= that positive's score."""
    precs = [y_R[s_R >= s_R[i]].mean() for i in np.flatnonzero(y_R)]
    return float(np.mean(precs))


def naive_purity(s_R, y_R, k, rng_draws=500, seed=0):
    """Expected fraction of positives in the top k under random tie-breaking (Monte Carlo)."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(rng_draws):
        order = np.lexsort((rng.random(s_R.size), -s_R))
        total += y_R[order[:k]].mean()
    return total / rng_draws


def naive_coverage(s_R, y_R, tau):
    act = [max(float(v), 0.0) for v in s_R]
    fires = [a >= tau * max(act) and a > 0 for a in act]
    return sum(f and y for f, y in zip(fires, y_R, strict=True)) / y_R.sum()


def test_average_precision_equals_naive_loop_and_sklearn(case):
    from sklearn.metrics import average_precision_score

    s_RM, y_RC = case
    ap_MC = pm.average_precision(s_RM, y_RC, budget=20_000)  # several blocks
    for j in range(s_RM.shape[1]):
        for c in range(y_RC.shape[1]):
            assert ap_MC[j, c] == pytest.approx(naive_ap(s_RM[:, j], y_RC[:, c]), abs=1e-12)
    for j, c in ((0, 2), (5, 1), (8, 0)):
        want = average_precision_score(y_RC[:, c], s_RM[:, j])
        assert ap_MC[j, c] == pytest.approx(want, abs=1e-12)
    assert np.isnan(pm.average_precision(s_RM, np.zeros((240, 1), bool))).all()


def test_purity_equals_expected_top_k_fraction(case):
    s_RM, y_RC = case
    pur_MC = pm.purity_at_k(s_RM, y_RC, 16)
    for j in (0, 5):  # tied at the 16th score, continuous
        for c in range(y_RC.shape[1]):
            want = naive_purity(s_RM[:, j], y_RC[:, c], 16, rng_draws=500 if j == 0 else 1)
            assert pur_MC[j, c] == pytest.approx(want, abs=0.03 if j == 0 else 1e-6)
    assert pur_MC[8] == pytest.approx(y_RC.mean(0), abs=1e-6)  # all tied: the base rate


def test_coverage_equals_naive_loop(case):
    s_RM, y_RC = case
    for tau in (0.3, 1.0):
        cov_MC = pm.coverage_at_tau(s_RM, y_RC, tau, budget=3_000)
        for j in range(s_RM.shape[1]):
            for c in range(y_RC.shape[1]):
                want = naive_coverage(s_RM[:, j], y_RC[:, c], tau)
                assert cov_MC[j, c] == pytest.approx(want, abs=1e-12)
    assert (pm.coverage_at_tau(s_RM, y_RC, 0.3)[8] == 0).all()  # a dead latent covers nothing


def test_vectorised_1d_probes_match_sklearn(case):
    from sklearn.linear_model import LogisticRegression

    s_RM, y_RC = case
    n_rows, l2 = s_RM.shape[0], 1e-3
    probes = pm.fit_probes_1d(s_RM, y_RC, l2=l2, steps=10, budget=50_000)
    loss_MC = pm.probe_loss(probes, s_RM, y_RC, budget=50_000)
    for j in range(s_RM.shape[1]):
        x_R = s_RM[:, j].astype(np.float64)
        z_R = (x_R - x_R.mean()) / (x_R.std() or 1.0)
        for c in range(y_RC.shape[1]):
            ref = LogisticRegression(C=1 / (l2 * n_rows), tol=1e-12, max_iter=10_000)
            ref.fit(z_R[:, None], y_RC[:, c])
            assert probes.slope_MC[j, c].item() == pytest.approx(ref.coef_[0, 0], abs=1e-6)
            assert probes.intercept_MC[j, c].item() == pytest.approx(ref.intercept_[0], abs=1e-6)
            p_R = ref.predict_proba(z_R[:, None])[:, 1]
            bce = -np.mean(y_RC[:, c] * np.log(p_R) + (1 - y_RC[:, c]) * np.log(1 - p_R))
            assert loss_MC[j, c] == pytest.approx(bce, abs=1e-6)


def test_pair_logits_pick_each_class_its_direction(case):
    s_RM, y_RC = case
    probes = pm.fit_probes_1d(s_RM, y_RC)
    dirs_C = np.array([5, 0, 2])
    logits_RC = probes.pair_logits(dirs_C, s_RM[:, dirs_C])
    for c, j in enumerate(dirs_C):
        z_R = (torch.from_numpy(s_RM[:, j]) - probes.mean_M[j]) / probes.std_M[j]
        want = probes.intercept_MC[j, c] + probes.slope_MC[j, c] * z_R.double()
        assert torch.allclose(logits_RC[:, c], want)


def test_units_with_positives_lists_the_splits_that_lack_them() -> None:
    from traitsae.evaluation.core.precision import units_with_positives

    keep, skipped = units_with_positives(np.array([3, 0, 0, 2]), np.array([1, 4, 0, 0]), "masks")
    assert keep.tolist() == [True, False, False, False]
    assert {u: row["reason"] for u, row in skipped.items()} == {
        1: "no masks in the train split",
        2: "no masks in the train and test split",
        3: "no masks in the test split",
    }
    assert skipped[3] == {"n_pos_train": 2, "n_pos_test": 0, "reason": "no masks in the test split"}
