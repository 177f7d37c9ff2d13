"""The statistics of `eval=discovery` on a per-image score matrix: no store, no SAE, no files.

    result = contrast(scores_NS, in_a_N, RankingRule(), NullOptions(), strata_N=None)
    result.table()      # candidate dicts, every statistic; result.summary: tested, alpha, ...
    results = contrasts([ContrastInput(scores_NS, in_a_N), ...], RankingRule(), NullOptions())

Rows are the images of the two groups (A where `in_a_N`, else B), columns are latents (an
image-level score, e.g. the max over patches).

1. Held-out half (`confirm` > 0): each group is split by image, seeded and balanced over strata,
   into a selection part and a confirmation part (the fraction `confirm`).
2. Selection part, per latent: firing rates, means, support and the AUROC of A vs B
   (Mann-Whitney, average ranks for ties). With strata it is the stratified AUROC
   sum_s U_s / sum_s n_a,s * n_b,s: only pairs of images from the same stratum are compared,
   so a latent that tells strata apart but not the groups within a stratum scores 0.5.
3. Null: group labels shuffled within strata; the statistic T = sum over A of the
   within-stratum centred ranks (= sum_s U_s - n_a,s * n_b,s / 2) for all latents at once, one
   matrix product per batch of shuffles. Two-sided p = (1 + #{|T_perm| >= |T_obs|}) /
   (1 + draws). Every latent gets `n_permutations` draws; a latent with fewer than
   `RESOLVED` exceedances gets 10x more, repeatedly, up to `max_permutations` (see
   `permutation_pvalues` for why this stays a valid p-value). Benjamini-Hochberg q-values over
   the tested latents: those firing on enough images to ever be a candidate (a count that
   shuffling labels cannot change, so leaving the rest out keeps the null exact).
4. Candidates: per group the `n_candidates` most specific eligible latents; a candidate is a
   discovery when q <= alpha.
5. Confirmation part: each candidate's AUROC and a one-sided permutation p in its own
   direction, BH over the candidates; `confirmed` when that q <= alpha.

`contrasts` runs several contrasts (eval.pairs) under one FDR: steps 1-3 per contrast, then one
BH over every contrast's tested latents together, and one over every contrast's candidates'
confirmation p-values together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from traitsae.evaluation.core.ranks import comparable_pairs, stratum_codes
from traitsae.evaluation.discovery.evidence import (
    confirm_candidates,
    confirm_fdr,
    strata_cells,
    verdicts,
)
from traitsae.evaluation.discovery.null import (
    GROUPS,
    NullOptions,
    UntestableContrast,
    bh_qvalues,
    check_group_sizes,
    confirmation_split,
    permutation_test,
)
from traitsae.evaluation.discovery.ranking import (
    CandidateStats,
    LatentTable,
    RankingRule,
    add_strata_aurocs,
    candidate_stats,
    firing_stats,
    rank_by_specificity,
)


@dataclass
class Contrast:
    latents: LatentTable
    candidates: list[CandidateStats]
    selection_N: np.ndarray  # bool: images the ranking and the p-values used
    summary: dict[str, Any] = field(default_factory=dict)
    codes_N: np.ndarray | None = None  # int: stratum of every image (all 0 without strata)

    def table(self) -> list[dict[str, Any]]:
        """The candidates as plain dicts (group A's first, each group most specific first)."""
        return [asdict(c) for c in self.candidates]


# ----------------------------------------------------------------------------- the contrast


@dataclass
class ContrastInput:
    """One contrast to test: image-level scores of its two groups.

    scores_NS: [N, S] scores of the N images of both groups; in_a_N: bool [N] (False = group
    B); strata_N: [N] stratum labels (e.g. "collection=X") or None; names: how errors and
    sentences name the groups (default "A", "B"); seed: entropy of its random generator
    (split, shuffles), default the null's seed.
    """

    scores_NS: np.ndarray
    in_a_N: np.ndarray
    strata_N: np.ndarray | None = None
    names: Mapping[str, str] | None = None
    seed: int | Sequence[int] | None = None


@dataclass
class Skipped:
    """A contrast that could not be tested (groups below min_group, or no shared stratum)."""

    reason: str


@dataclass
class _Selection:
    """A contrast after its permutation null on the selection part, before the joint BH."""

    scores_NS: np.ndarray
    in_a_N: np.ndarray
    strata_N: np.ndarray | None
    names: dict[str, str]
    codes_N: np.ndarray
    held_N: np.ndarray
    sizes: dict[str, dict[str, int]]
    rng: np.random.Generator
    firing: dict[str, np.ndarray]
    tested_S: np.ndarray
    t_S: np.ndarray
    p_S: np.ndarray
    draws_S: np.ndarray


def _select(
    item: ContrastInput, rule: RankingRule, null: NullOptions, fire_threshold: float, progress: bool
) -> _Selection:
    """Held-out split, group sizes, firing statistics and the permutation p of every tested
    latent on the selection part; raises UntestableContrast when there is nothing to test."""
    scores_NS = np.asarray(item.scores_NS)
    in_a_N = np.asarray(item.in_a_N, dtype=bool)
    names = dict(item.names or {"a": "A", "b": "B"})
    codes_N = stratum_codes(item.strata_N, len(in_a_N))
    rng = np.random.default_rng(null.seed if item.seed is None else item.seed)
    held_N = confirmation_split(in_a_N, codes_N, null.confirm, rng)
    sizes = check_group_sizes(in_a_N, held_N, null, names)
    select_N = ~held_N
    sel_NS, sel_a_N, sel_codes_N = scores_NS[select_N], in_a_N[select_N], codes_N[select_N]
    if comparable_pairs(sel_a_N, sel_codes_N) == 0:
        raise UntestableContrast(
            "no stratum of eval.strata holds images of both groups, so within strata there is "
            "nothing to compare; drop eval.strata or choose groups that share strata."
        )
    firing = firing_stats(sel_NS, sel_a_N, fire_threshold)
    # A candidate fires on >= min_support of its own group: fewer images in all can never be one.
    floor = max(1, math.ceil(rule.min_support * min(sel_a_N.sum(), (~sel_a_N).sum()) - 1e-9))
    tested_S = firing["support_a"] + firing["support_b"] >= floor
    t_S, p_S, draws_S = permutation_test(
        sel_NS, sel_a_N, sel_codes_N, null, rng, test_S=tested_S, progress=progress
    )
    return _Selection(
        scores_NS=scores_NS,
        in_a_N=in_a_N,
        strata_N=item.strata_N,
        names=names,
        codes_N=codes_N,
        held_N=held_N,
        sizes=sizes,
        rng=rng,
        firing=firing,
        tested_S=tested_S,
        t_S=t_S,
        p_S=p_S,
        draws_S=draws_S,
    )


def _candidates(
    sel: _Selection, q_S: np.ndarray, rule: RankingRule, null: NullOptions
) -> tuple[LatentTable, list[CandidateStats]]:
    """The per-latent table with its q-values, and the candidates confirmed on the held-out
    part (p-values only: q comes from the joint confirmation BH)."""
    select_N = ~sel.held_N
    sel_a_N, sel_codes_N = sel.in_a_N[select_N], sel.codes_N[select_N]
    firing = sel.firing
    table = LatentTable(
        **firing,
        auroc=0.5 + sel.t_S / comparable_pairs(sel_a_N, sel_codes_N),
        dense=(firing["rate_a"] >= rule.dense_rate) & (firing["rate_b"] >= rule.dense_rate),
        tested=sel.tested_S,
        p_value=sel.p_S,
        q_value=q_S,
        permutations=sel.draws_S,
    )
    candidates = [
        candidate_stats(table, latent, g, null.alpha)
        for g in GROUPS
        for latent in rank_by_specificity(table, g, rule)
    ]
    if sel.strata_N is not None:
        strata_N = np.asarray(sel.strata_N)[select_N]
        add_strata_aurocs(candidates, sel.scores_NS[select_N], sel_a_N, strata_N)
    if null.confirm > 0:
        held_N = sel.held_N
        confirm_candidates(
            candidates,
            sel.scores_NS[held_N],
            sel.in_a_N[held_N],
            sel.codes_N[held_N],
            null,
            sel.rng,
        )
    return table, candidates


def joint_qvalues(selections: Sequence[_Selection], null: NullOptions) -> list[np.ndarray]:
    """BH q-values over every contrast's tested latents at once (one family), split back per
    contrast; NaN where a latent was not tested or no null was run."""
    q_all = np.full(sum(int(s.tested_S.sum()) for s in selections), np.nan)
    if null.n_permutations:
        q_all = bh_qvalues(np.concatenate([s.p_S[s.tested_S] for s in selections] or [[]]))
    out, lo = [], 0
    for sel in selections:
        q_S = np.full(len(sel.p_S), np.nan)
        n = int(sel.tested_S.sum())
        q_S[sel.tested_S] = q_all[lo : lo + n]
        out.append(q_S)
        lo += n
    return out


def contrasts(
    items: Sequence[ContrastInput],
    rule: RankingRule,
    null: NullOptions,
    *,
    fire_threshold: float = 0.0,
    skip_untestable: bool = False,
    progress: bool = True,
) -> list[Contrast | Skipped]:
    """Several contrasts under one FDR: each gets its own permutation null (its own split and
    shuffles, seeded by its ContrastInput.seed), then

    - discoveries: BH q-values over all contrasts x tested latents together, so the expected
      share of false discoveries among all discoveries of the run is <= alpha;
    - confirmation: BH over the held-out p-values of all contrasts' candidates together, so
      the same holds for the confirmed candidates of the run.

    An untestable contrast raises UntestableContrast, or with `skip_untestable` is returned as
    Skipped (and stays out of both families).
    """
    selections: list[_Selection | Skipped] = []
    for item in items:
        try:
            selections.append(_select(item, rule, null, fire_threshold, progress))
        except UntestableContrast as err:
            if not skip_untestable:
                raise
            selections.append(Skipped(str(err)))
    tested = [s for s in selections if isinstance(s, _Selection)]
    family = sum(int(s.tested_S.sum()) for s in tested)
    picked = [
        _candidates(s, q, rule, null)
        for s, q in zip(tested, joint_qvalues(tested, null), strict=True)
    ]
    confirm_fdr([c for _, cands in picked for c in cands], null.alpha)
    results = iter(
        _summarise(sel, table, cands, null, family, len(tested))
        for sel, (table, cands) in zip(tested, picked, strict=True)
    )
    return [s if isinstance(s, Skipped) else next(results) for s in selections]


def _summarise(
    sel: _Selection,
    table: LatentTable,
    candidates: list[CandidateStats],
    null: NullOptions,
    family: int,
    n_contrasts: int,
) -> Contrast:
    select_N = ~sel.held_N
    counts, words = verdicts(
        table, candidates, null, sel.in_a_N[select_N], sel.codes_N[select_N], family, n_contrasts
    )
    summary = {
        "tested": int(table.tested.sum()),
        "alpha": null.alpha,
        "n_permutations": null.n_permutations,
        "max_permutations": null.max_permutations,
        "confirm": null.confirm,
        "min_group": null.min_group,
        "sizes": sel.sizes,
        "n_discoveries": counts,
        "verdict": words,
        "n_dense": int(table.dense.sum()),
        "strata": None
        if sel.strata_N is None
        else strata_cells(sel.strata_N, sel.in_a_N, sel.held_N),
        "family_tests": family,
        "family_contrasts": n_contrasts,
    }
    return Contrast(table, candidates, select_N, summary, sel.codes_N)


def contrast(
    scores_NS: np.ndarray,
    in_a_N: np.ndarray,
    rule: RankingRule,
    null: NullOptions,
    *,
    strata_N: np.ndarray | None = None,
    fire_threshold: float = 0.0,
    names: Mapping[str, str] | None = None,
    progress: bool = True,
) -> Contrast:
    """Rank latents specific to group A or B, with permutation p/q-values and confirmation:
    `contrasts` of one (its arguments are ContrastInput's)."""
    (result,) = contrasts(
        [ContrastInput(scores_NS, in_a_N, strata_N, names)],
        rule,
        null,
        fire_threshold=fire_threshold,
        progress=progress,
    )
    assert isinstance(result, Contrast)
    return result
