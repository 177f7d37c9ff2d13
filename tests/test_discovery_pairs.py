"""Many contrasts under one FDR (stats.contrasts): the joint BH, the joint confirmation, skipped
pairs, per-pair seeds, and the calibration of the joint procedure on true-null pairs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom
from test_discovery_stats import null_scores

from traitsae.evaluation.discovery import stats
from traitsae.evaluation.discovery.stats import (
    Contrast,
    ContrastInput,
    NullOptions,
    RankingRule,
    Skipped,
    UntestableContrast,
    bh_qvalues,
    contrasts,
)


def halves(rng: np.random.Generator, n_images: int) -> np.ndarray:
    """bool [n]: a random half of one group (group A), the rest group B: a true-null pair."""
    return rng.permutation(n_images) < n_images // 2


def planted_item(rng: np.random.Generator, seed: int) -> ContrastInput:
    scores = null_scores(rng, 40, 30)
    in_a = np.arange(40) < 20
    scores[:, 3] = np.where(in_a, 1.0 + rng.random(40), 0.0)  # specific to A
    return ContrastInput(scores, in_a, seed=[0, seed])


def test_q_values_are_one_bh_over_all_pairs_and_latents():
    rng = np.random.default_rng(0)
    items = [planted_item(rng, 1), ContrastInput(null_scores(rng, 30, 25), halves(rng, 30))]
    results = contrasts(items, RankingRule(), NullOptions(), progress=False)
    assert all(isinstance(r, Contrast) for r in results)
    tables = [r.latents for r in results]
    p_all = np.concatenate([t.p_value[t.tested] for t in tables])
    np.testing.assert_allclose(
        np.concatenate([t.q_value[t.tested] for t in tables]), bh_qvalues(p_all)
    )
    assert all(r.summary["family_tests"] == p_all.size for r in results)
    assert all(r.summary["family_contrasts"] == 2 for r in results)
    # Confirmation: one BH over the held-out p-values of every pair's candidates.
    cands = [c for r in results for c in r.candidates if c.confirm_p_value is not None]
    np.testing.assert_allclose(
        [c.confirm_q_value for c in cands], bh_qvalues(np.array([c.confirm_p_value for c in cands]))
    )
    assert (
        results[0].latents.q_value[3] <= 0.05
        and "2 contrasts together" in (results[0].summary["verdict"]["a"])
    )


def test_a_pairs_own_null_does_not_depend_on_the_other_pairs():
    """Seeded per pair: adding a pair changes the q-values (a larger family), not the p-values."""
    rng = np.random.default_rng(1)
    first = planted_item(rng, 7)
    other = ContrastInput(null_scores(rng, 30, 25), halves(rng, 30), seed=[0, 8])
    alone = stats.contrast(first.scores_NS, first.in_a_N, RankingRule(), NullOptions(seed=0))
    (one,) = contrasts([first], RankingRule(), NullOptions(), progress=False)
    both = contrasts([other, first], RankingRule(), NullOptions(), progress=False)
    np.testing.assert_array_equal(one.latents.p_value, both[1].latents.p_value)
    assert both[1].summary["family_tests"] > one.summary["family_tests"]
    # The default seed of a ContrastInput is the null's seed: contrast() is a list of one.
    assert alone.summary["family_tests"] == int(alone.latents.tested.sum())


def test_untestable_pairs_are_skipped_or_stop_the_run():
    rng = np.random.default_rng(2)
    small = ContrastInput(rng.random((12, 5)), np.arange(12) < 3, names={"a": "x", "b": "y"})
    items = [planted_item(rng, 1), small]
    with pytest.raises(UntestableContrast, match=r"group A \(x\) has 3 images"):
        contrasts(items, RankingRule(), NullOptions(), progress=False)
    results = contrasts(items, RankingRule(), NullOptions(), skip_untestable=True, progress=False)
    assert isinstance(results[1], Skipped) and "has 3 images" in results[1].reason
    # The skipped pair is in neither family.
    assert results[0].summary["family_tests"] == int(results[0].latents.tested.sum())


def null_pairs_run(seed: int, n_pairs: int, joint: bool) -> bool:
    """One run of `n_pairs` true-null pairs (random halves of one group of 30 images and 30
    latents, each pair its own halving); True when any pair has a discovery. `joint=False`: BH per pair."""
    rng = np.random.default_rng(seed)
    scores = null_scores(rng, 30, 30)
    items = [ContrastInput(scores, halves(rng, 30), seed=[seed, k]) for k in range(n_pairs)]
    null = NullOptions(n_permutations=100, max_permutations=10_000, confirm=0, seed=seed)
    if joint:
        results = contrasts(items, RankingRule(), null, progress=False)
    else:
        results = [contrasts([item], RankingRule(), null, progress=False)[0] for item in items]
    return any(sum(r.summary["n_discoveries"].values()) for r in results)


def test_joint_fdr_on_true_null_pairs_stays_at_alpha():
    """Random halves of one group: no pair has a true difference, so the FDR is P(any
    discovery in the run), which the joint BH keeps <= alpha over all pairs. BH per pair would
    not: with 8 pairs P(any) ~ 1 - 0.95^8 = 34 %, and these seeds show it (measured: 5 of 80
    runs with a false discovery jointly, 20 per pair; the bound is 11)."""
    n_runs, n_pairs, alpha = 80, 8, 0.05
    bound = binom.ppf(0.999, n_runs, alpha)
    joint = sum(null_pairs_run(seed, n_pairs, joint=True) for seed in range(n_runs))
    assert joint <= bound
    per_pair = sum(null_pairs_run(seed, n_pairs, joint=False) for seed in range(n_runs))
    assert per_pair > bound  # the test can fail: separate FDRs leak false discoveries
