"""precision@k (blockwise vs the research notes' loop), tie handling, AP, selection, bootstrap."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.precision import (
    average_precision_columns,
    average_precision_pairs,
    bootstrap_ci,
    check_k,
    precision_at_k,
    precision_at_k_loop,
    select_best,
    usable_ks,
)


def random_problem(n=150, m=37, t=9, seed=0):
    rng = np.random.default_rng(seed)
    scores_NM = rng.standard_normal((n, m)).astype(np.float32)  # continuous: no ties
    labels_NT = rng.random((n, t)) < 0.3
    return scores_NM, labels_NT


def test_blockwise_equals_naive_loop():
    scores_NM, labels_NT = random_problem()
    fast = precision_at_k(scores_NM, labels_NT, [5, 20, 100], block=8)  # several blocks, ragged end
    for k in (5, 20, 100):
        np.testing.assert_array_equal(fast[k], precision_at_k_loop(scores_NM, labels_NT, k))


def test_best_direction_matches_the_notes_evaluate():
    scores_NM, labels_NT = random_problem(seed=1)
    best_T, prec_T = select_best(precision_at_k(scores_NM, labels_NT, [10])[10])
    for t in range(labels_NT.shape[1]):
        # The notes' evaluate(): strictly-better scan over features, one argsort each.
        best_prec, best_j = 0.0, None
        for j in range(scores_NM.shape[1]):
            prec = labels_NT[np.argsort(scores_NM[:, j])[-10:], t].mean()
            if prec > best_prec:
                best_prec, best_j = prec, j
        assert best_T[t] == best_j
        assert prec_T[t] == pytest.approx(best_prec)


def test_ties_at_the_threshold_share_the_remaining_slots():
    labels_NT = np.zeros((40, 1), dtype=bool)
    labels_NT[:10] = True  # base rate 0.25
    scores_NM = np.zeros((40, 2), dtype=np.float32)
    scores_NM[[0, 1, 20], 1] = 5.0  # fires on 2 positives and 1 negative, zero elsewhere
    prec = precision_at_k(scores_NM, labels_NT, [10])[10][:, 0]
    assert prec[0] == pytest.approx(0.25)  # all tied: expected precision = base rate
    # 3 sure images (2 positive) + 7 slots shared by 37 tied images (8 positive).
    assert prec[1] == pytest.approx((2 + 7 * 8 / 37) / 10)
    prec3 = precision_at_k(scores_NM, labels_NT, [3, 40])
    assert prec3[3][1, 0] == pytest.approx(2 / 3)  # the tie group fits exactly: nothing shared
    np.testing.assert_allclose(prec3[40][:, 0], 0.25)  # k = N: every image, the base rate


def test_k_larger_than_the_split_is_a_clear_error():
    scores_NM, labels_NT = random_problem(n=30)
    with pytest.raises(TraitsaeError, match="only 30 valid images"):
        precision_at_k(scores_NM, labels_NT, [10, 50])
    with pytest.raises(TraitsaeError, match="positive integers"):
        check_k([0], 30)


def test_non_finite_scores_and_misaligned_labels_are_errors():
    scores_NM, labels_NT = random_problem(n=30)
    scores_NM[3, 2] = np.nan
    with pytest.raises(TraitsaeError, match="non-finite"):
        precision_at_k(scores_NM, labels_NT, [5])
    with pytest.raises(TraitsaeError, match="aligned"):
        precision_at_k(scores_NM[:20], labels_NT, [5])


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    scores_N = rng.integers(0, 6, size=200).astype(np.float32)  # many ties
    labels_NT = rng.random((200, 4)) < 0.2
    labels_NT[:, 3] = False
    ap_T = average_precision_columns(scores_N, labels_NT)
    for t in range(3):
        assert ap_T[t] == pytest.approx(average_precision_score(labels_NT[:, t], scores_N))
    assert np.isnan(ap_T[3])  # no positives: undefined, not 0

    scores_NM = rng.standard_normal((200, 5))
    ap_P = average_precision_pairs(scores_NM, labels_NT, np.array([4, 0, 4]), np.array([0, 1, 2]))
    expected = [
        average_precision_score(labels_NT[:, t], scores_NM[:, j])
        for j, t in ((4, 0), (0, 1), (4, 2))
    ]
    np.testing.assert_allclose(ap_P, expected)


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    values_T = np.random.default_rng(0).random(300)
    low, high = bootstrap_ci(values_T, n_boot=500, seed=1)
    assert low < values_T.mean() < high
    assert (low, high) == bootstrap_ci(values_T, n_boot=500, seed=1)
    narrow = bootstrap_ci(np.full(50, 0.7), n_boot=200)
    assert narrow == pytest.approx((0.7, 0.7))
    wide_low, wide_high = bootstrap_ci(values_T[:20], n_boot=500, seed=1)
    assert wide_high - wide_low > high - low  # fewer traits, wider interval


def test_usable_ks_skips_what_a_small_split_cannot_rank():
    ks, notes = usable_ks([100, 10, 50, 10], 90, "the train split (x.h5)")
    assert ks == [10, 50]
    assert notes == ["eval.k: skipping k=100: the train split (x.h5) has only 90 valid images"]
    with pytest.raises(TraitsaeError, match="every k exceeds the 5 valid images"):
        usable_ks([10], 5, "the test split")
