"""The statistics of eval=discovery on score matrices alone: AUROC, the permutation null, BH,
strata, the held-out half, group-size checks. No store or SAE needed."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.metrics import roc_auc_score

from traitsae.errors import TraitsaeError
from traitsae.evaluation.discovery import null as discovery_stats
from traitsae.evaluation.discovery.null import (
    auroc_per_column,
    bh_qvalues,
    confirmation_split,
    permutation_test,
    shuffled_labels,
    stratum_codes,
)
from traitsae.evaluation.discovery.ranking import rank_by_specificity
from traitsae.evaluation.discovery.stats import NullOptions, RankingRule, contrast


def null_scores(rng: np.random.Generator, n_images: int, n_latents: int) -> np.ndarray:
    """Half continuous columns, half sparse ones (mostly exact zeros: many ties), no signal."""
    dense_NS = rng.random((n_images, n_latents // 2))
    sparse_NS = rng.random((n_images, n_latents - n_latents // 2))
    sparse_NS[rng.random(sparse_NS.shape) < 0.7] = 0.0
    return np.concatenate([dense_NS, sparse_NS], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- AUROC


def test_auroc_matches_sklearn_with_ties(monkeypatch):
    rng = np.random.default_rng(1)
    scores = np.where(rng.random((40, 6)) < 0.5, 0.0, rng.random((40, 6))).astype(np.float32)
    positive = np.arange(40) < 15
    scores[positive, 2] += 1.0  # a clearly specific column
    ours = auroc_per_column(scores, positive)
    expected = [roc_auc_score(positive, scores[:, j]) for j in range(6)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert ours[2] == 1.0
    monkeypatch.setattr(discovery_stats, "_BLOCK_ELEMENTS", 80)  # 2 columns per block
    np.testing.assert_allclose(auroc_per_column(scores, positive), ours, rtol=1e-12)


def test_stratified_auroc_counts_same_stratum_pairs_only():
    rng = np.random.default_rng(4)
    scores = np.round(rng.random((30, 3)), 1)  # rounded: ties
    positive = rng.random(30) < 0.5
    strata = rng.choice(["x", "y", "z"], 30)
    wins = pairs = np.zeros(3)
    for i, j in itertools.product(range(30), repeat=2):
        if positive[i] and not positive[j] and strata[i] == strata[j]:
            wins = wins + (scores[i] > scores[j]) + 0.5 * (scores[i] == scores[j])
            pairs = pairs + 1
    np.testing.assert_allclose(auroc_per_column(scores, positive, strata), wins / pairs)


# ----------------------------------------------------------------------------- BH


def naive_bh(p_values: np.ndarray) -> np.ndarray:
    """q_(i) = min over j >= i of p_(j) * m / j, capped at 1 (sorted order)."""
    m = len(p_values)
    order = np.argsort(p_values)
    q_sorted = [
        min(1.0, min(p_values[order[j]] * m / (j + 1) for j in range(i, m))) for i in range(m)
    ]
    q = np.empty(m)
    q[order] = q_sorted
    return q


def test_bh_qvalues_equal_the_naive_definition():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(40) ** 3, [0.001, 0.001, 1.0]])
    np.testing.assert_allclose(bh_qvalues(p), naive_bh(p), rtol=1e-12)
    assert bh_qvalues(np.array([])).size == 0


# ----------------------------------------------------------------------------- the null


def test_shuffles_stay_within_strata():
    rng = np.random.default_rng(0)
    in_a = np.array([True] * 3 + [False] * 2 + [True] + [False] * 4 + [True, False])
    codes = stratum_codes(np.array(["x"] * 5 + ["y"] * 5 + ["z"] * 2), len(in_a))
    labels = shuffled_labels(in_a, codes, 200, rng)
    for code in np.unique(codes):
        np.testing.assert_array_equal(labels[:, codes == code].sum(1), in_a[codes == code].sum())
    # 10 * 5 * 2 = 100 labellings keep the counts: 200 draws meet most of them.
    assert len({row.tobytes() for row in labels}) > 60


def test_pvalues_equal_the_exact_permutation_distribution():
    """Tiny groups: enumerate every labelling; many draws must land on the exact p-value."""
    rng = np.random.default_rng(5)
    scores = np.round(rng.random((8, 4)), 1)
    in_a = np.arange(8) < 4
    exact = []
    observed = auroc_per_column(scores, in_a)
    for picks in itertools.combinations(range(8), 4):
        labels = np.isin(np.arange(8), picks)
        exact.append(
            np.abs(auroc_per_column(scores, labels) - 0.5) >= np.abs(observed - 0.5) - 1e-9
        )
    exact_p = np.mean(exact, axis=0)
    null = NullOptions(n_permutations=20_000, max_permutations=20_000)
    _, p, draws = permutation_test(scores, in_a, np.zeros(8, int), null, rng, progress=False)
    assert (draws == 20_000).all()
    np.testing.assert_allclose(p, exact_p, atol=0.01)


def test_null_pvalues_are_uniform_and_discoveries_rare():
    """No true difference: p-values (with refinement) are ~uniform for continuous scores and
    never anti-conservative for tied ones, and a run has any discovery at most ~alpha often."""
    n_runs, n_latents, alpha = 40, 120, 0.05
    null = NullOptions(n_permutations=100, max_permutations=10_000, confirm=0, alpha=alpha)
    continuous, tied, runs_with_discoveries = [], [], 0
    for seed in range(n_runs):
        rng = np.random.default_rng(seed)
        scores = null_scores(rng, 30, n_latents)
        in_a = rng.permutation(30) < 14
        result = contrast(
            scores,
            in_a,
            RankingRule(),
            NullOptions(**{**null.__dict__, "seed": seed}),
            progress=False,
        )
        p = result.latents.p_value
        continuous.append(p[: n_latents // 2])
        tied.append(p[n_latents // 2 :][result.latents.tested[n_latents // 2 :]])
        runs_with_discoveries += sum(result.summary["n_discoveries"].values()) > 0
    continuous, tied = np.concatenate(continuous), np.concatenate(tied)
    for t in (0.001, 0.01, 0.05, 0.2, 0.5):
        slack = 3 * math.sqrt(t * (1 - t) / continuous.size) + 2e-3
        assert abs((continuous <= t).mean() - t) <= slack, t
        assert (tied <= t).mean() <= t + 3 * math.sqrt(t * (1 - t) / tied.size) + 2e-3, t
    # Under the complete null, BH's FDR is P(any discovery) <= alpha.
    assert runs_with_discoveries <= binom.ppf(0.999, n_runs, alpha)


def test_planted_contrast_is_a_discovery_and_confirmed():
    rng = np.random.default_rng(7)
    scores = null_scores(rng, 60, 200)
    in_a = np.arange(60) < 30
    scores[:, 5] = np.where(in_a, 1.0 + rng.random(60), rng.random(60) * (rng.random(60) < 0.2))
    scores[:, 9] = np.where(in_a, 0.0, 0.5 + rng.random(60))  # specific to B
    result = contrast(scores, in_a, RankingRule(), NullOptions(), progress=False)
    top, top_b = (next(c for c in result.table() if c["group"] == g) for g in ("a", "b"))
    assert top_b["latent"] == 9 and top_b["discovery"] and top_b["confirmed"]
    assert top["latent"] == 5 and top["auroc"] == 1.0
    assert top["q_value"] < 0.05 and top["discovery"] and top["confirmed"]
    assert top["confirm_auroc"] == 1.0 and top["confirm_p_value"] < 0.01
    assert top["permutations"] == NullOptions().max_permutations  # refined to the floor
    assert result.summary["n_discoveries"] == {"a": 1, "b": 1}
    assert result.summary["sizes"]["a"] == {"selection": 15, "confirmation": 15}
    assert not any(c["discovery"] for c in result.table() if c["latent"] not in (5, 9))


def test_strata_expose_a_confound():
    """Collection X is mostly group A, Y mostly B; latent 0 tells the collections apart (not the
    groups within one), latent 1 tells the groups apart within each collection."""
    rng = np.random.default_rng(3)
    collection = np.array(["X"] * 40 + ["Y"] * 40)
    in_a = np.concatenate([rng.permutation(40) < 32, rng.permutation(40) < 8])
    scores = null_scores(rng, 80, 40)
    scores[:, 0] = np.where(collection == "X", 1.0 + rng.random(80), 0.0)
    scores[:, 1] = np.where(in_a, 1.0 + rng.random(80), 0.0)
    options = NullOptions(confirm=0)
    plain = contrast(scores, in_a, RankingRule(min_auroc=0.75), options, progress=False)
    assert plain.latents.q_value[0] < 0.05  # the confound looks like a discovery
    assert 0 in {c.latent for c in plain.candidates}
    strata = np.char.add("collection=", collection)
    within = contrast(scores, in_a, RankingRule(), options, strata_N=strata, progress=False)
    assert within.latents.q_value[0] > 0.05 and abs(within.latents.auroc[0] - 0.5) < 0.2
    assert within.latents.q_value[1] < 0.05
    (cand,) = [c for c in within.candidates if c.latent == 1]
    assert set(cand.strata_auroc) == {"collection=X", "collection=Y"}
    assert min(cand.strata_auroc.values()) == 1.0 and cand.auroc_unstratified == 1.0
    assert 0 not in {c.latent for c in within.candidates}
    cells = {c["stratum"]: (c["n_a"], c["n_b"]) for c in within.summary["strata"]}
    assert cells == {"collection=X": (32, 8), "collection=Y": (8, 32)}


def test_strata_without_both_groups_are_an_error():
    in_a = np.arange(20) < 10
    strata = np.where(in_a, "X", "Y")
    with pytest.raises(TraitsaeError, match="no stratum of eval.strata holds images of both"):
        contrast(
            np.random.default_rng(0).random((20, 3)),
            in_a,
            RankingRule(),
            NullOptions(confirm=0),
            strata_N=strata,
            progress=False,
        )


# ----------------------------------------------------------------------------- held-out half


def test_confirmation_split_is_seeded_and_balanced_over_strata():
    in_a = np.arange(50) < 21
    codes = stratum_codes(np.array(["x", "y"] * 25), 50)
    held = confirmation_split(in_a, codes, 0.5, np.random.default_rng(0))
    assert (held & in_a).sum() == 10 and (held & ~in_a).sum() == 14
    for member in (in_a, ~in_a):
        per_stratum = [(held & member & (codes == c)).sum() for c in (0, 1)]
        total = [(member & (codes == c)).sum() for c in (0, 1)]
        assert all(abs(h - t / 2) <= 1 for h, t in zip(per_stratum, total, strict=True))
    np.testing.assert_array_equal(
        held, confirmation_split(in_a, codes, 0.5, np.random.default_rng(0))
    )
    assert not confirmation_split(in_a, codes, 0.0, np.random.default_rng(0)).any()


def test_small_groups_are_an_error_naming_the_sizes():
    scores = np.random.default_rng(0).random((15, 4))
    in_a = np.arange(15) < 3
    with pytest.raises(TraitsaeError) as err:
        contrast(
            scores, in_a, RankingRule(), NullOptions(confirm=0), names={"a": "sp=x", "b": "sp=y"}
        )
    message = str(err.value)
    assert "group A (sp=x) has 3 images" in message and "group B (sp=y) has 12 images" in message
    assert "eval.min_group=5" in message
    with pytest.raises(TraitsaeError, match=r"has 12 images \(6 to select, 6 to confirm\)"):
        contrast(scores, ~in_a & (np.arange(15) < 15), RankingRule(), NullOptions(min_group=7))
    result = contrast(
        scores, in_a, RankingRule(), NullOptions(confirm=0, min_group=3), progress=False
    )
    assert result.summary["sizes"]["a"]["selection"] == 3


@pytest.mark.parametrize(
    "options, key",
    [
        ({"n_permutations": -1}, "eval.n_permutations"),
        ({"n_permutations": 100, "max_permutations": 10}, "eval.max_permutations"),
        ({"alpha": 0}, "eval.alpha"),
        ({"confirm": 1.0}, "eval.confirm"),
        ({"min_group": 0}, "eval.min_group"),
    ],
)
def test_bad_null_options_are_user_errors(options, key):
    with pytest.raises(TraitsaeError, match=key):
        NullOptions(**options)


def test_no_permutations_gives_statistics_without_pvalues():
    rng = np.random.default_rng(0)
    scores = null_scores(rng, 24, 10)
    result = contrast(
        scores, np.arange(24) < 12, RankingRule(min_auroc=0.5), NullOptions(n_permutations=0)
    )
    assert np.isnan(result.latents.p_value).all() and (result.latents.permutations == 0).all()
    assert all(c.p_value is None and c.confirmed is None for c in result.candidates)
    assert all(c.confirm_auroc is not None for c in result.candidates)


# ----------------------------------------------------------------------------- ranking


def test_ranking_keeps_specific_latents_and_drops_shared_dense_rare():
    n_a, n_b = 20, 20
    in_a = np.arange(n_a + n_b) < n_a
    rng = np.random.default_rng(2)
    scores = np.zeros((n_a + n_b, 5), dtype=np.float32)
    scores[:n_a, 0] = 1 + rng.random(n_a)  # specific to A
    scores[n_a:, 1] = 1 + rng.random(n_b)  # specific to B
    scores[:, 2] = 1 + rng.random(n_a + n_b)  # shared trait: fires everywhere
    scores[:, 3] = rng.random(n_a + n_b) + np.where(in_a, 1.0, 0.5)  # dense, stronger in A
    scores[:2, 4] = 5.0  # specific to A but too rare
    rule = RankingRule(min_support=0.2, dense_rate=0.9, min_auroc=0.75, n_candidates=5)
    table = contrast(scores, in_a, rule, NullOptions(confirm=0, n_permutations=0)).latents
    assert rank_by_specificity(table, "a", rule).tolist() == [0]
    assert rank_by_specificity(table, "b", rule).tolist() == [1]
    assert table.rate_a[0] == 1.0 and table.rate_b[0] == 0.0
    assert table.dense.tolist() == [False, False, True, True, False]


def test_smallest_p_of_large_groups_is_the_draws_floor():
    in_a = np.arange(4000) < 2000  # C(4000, 2000) overflows a float
    assert discovery_stats.smallest_p(in_a, np.zeros(4000, int), 999) == 1e-3
    assert discovery_stats.smallest_p(np.arange(4) < 2, np.zeros(4, int), 999) == 1 / 6
