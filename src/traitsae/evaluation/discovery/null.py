"""The permutation null of `eval=discovery`: within-stratum centred ranks, AUROC, shuffled group
labels (one matrix product per batch of shuffles) and Benjamini-Hochberg q-values. The steps
are described in stats.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import false_discovery_control
from tqdm.auto import tqdm

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.ranks import centred_ranks, comparable_pairs, stratum_codes

# A Monte Carlo p-value resting on >= this many exceedances has a relative error of about
# 1/sqrt(RESOLVED); fewer means the p-value is still limited by the number of draws.
RESOLVED = 10
GROUPS = ("a", "b")


# Centred rank sums are multiples of 0.5: compare with half a step of slack, exact in float64.
_HALF_STEP = 0.25


_PERMUTATION_BATCH = 256


_HELD_SHUFFLE_BYTES = 64 * 2**20  # shuffles (bool) up to this size are generated once


# Column blocks of ranks of about this many float64 elements (32 MiB).
_BLOCK_ELEMENTS = 2**22


LabelBatches = Callable[[], Iterable[np.ndarray]]  # yields bool [B, N] shuffles, same each call


class UntestableContrast(TraitsaeError):
    """Groups too small (eval.min_group) or sharing no stratum: nothing to test. A single
    contrast stops with this message; a pair of eval.pairs is skipped with it."""


@dataclass(frozen=True)
class NullOptions:
    """The permutation null, FDR level, held-out fraction and smallest group allowed."""

    n_permutations: int = 1000  # draws for every latent; 0 = no null (no p-values)
    max_permutations: int = 100_000  # draws for latents whose p is limited by the draws
    alpha: float = 0.05  # FDR level of discoveries and of confirmation
    confirm: float = 0.5  # fraction of each group held out for confirmation; 0 = none
    min_group: int = 5  # images per group (in each part) below which the run stops
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.n_permutations < 0:
            problems.append(f"eval.n_permutations={self.n_permutations} must be >= 0")
        if self.max_permutations < self.n_permutations:
            problems.append(
                f"eval.max_permutations={self.max_permutations} must be >= "
                f"eval.n_permutations={self.n_permutations}"
            )
        if not 0 < self.alpha < 1:
            problems.append(f"eval.alpha={self.alpha} must be in (0, 1)")
        if not 0 <= self.confirm < 1:
            problems.append(f"eval.confirm={self.confirm} must be in [0, 1) (0 = no held-out half)")
        if self.min_group < 1:
            problems.append(f"eval.min_group={self.min_group} must be >= 1")
        if problems:
            raise TraitsaeError("invalid discovery options: " + "; ".join(problems) + ".")


def column_blocks(n_rows: int, n_columns: int) -> range:
    return range(0, n_columns, max(1, _BLOCK_ELEMENTS // max(1, n_rows)))


def shuffled_labels(
    in_a_N: np.ndarray, codes_N: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """bool [n, N]: n independent shuffles of the group labels, each within strata."""
    labels_nN = np.empty((n, len(in_a_N)), dtype=bool)
    for code in np.unique(codes_N):
        cols = np.flatnonzero(codes_N == code)
        labels_nN[:, cols] = rng.permuted(np.tile(in_a_N[cols], (n, 1)), axis=1)
    return labels_nN


def scan_columns(
    scores_NS: np.ndarray,
    in_a_N: np.ndarray,
    codes_N: np.ndarray,
    columns: np.ndarray,
    shuffles: LabelBatches | None = None,
    sign_S: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The observed statistic T of `columns`, and how many shuffles reach it.

    T = sum over A of the centred ranks; "reach" is |T_perm| >= |T| (two-sided, sign_S None) or
    sign * T_perm >= sign * T (one-sided, sign +1 where A should score higher). Ranks are made
    once per block of columns; each batch of shuffles is one float64 matrix product.
    """
    observed_C = np.zeros(len(columns))
    exceed_C = np.zeros(len(columns), dtype=np.int64)
    weights_N = torch.from_numpy(in_a_N.astype(np.float64))
    blocks = column_blocks(len(in_a_N), len(columns))
    for lo in blocks:
        part = slice(lo, lo + blocks.step)
        ranks_NC = torch.from_numpy(centred_ranks(scores_NS[:, columns[part]], codes_N))
        t_C = weights_N @ ranks_NC
        observed_C[part] = t_C.numpy()
        if shuffles is None:
            continue
        sign_C = None if sign_S is None else torch.from_numpy(sign_S[columns[part]])
        for labels_BN in shuffles():
            t_BC = torch.from_numpy(labels_BN).to(torch.float64) @ ranks_NC
            if sign_C is None:
                reached_BC = t_BC.abs() >= t_C.abs() - _HALF_STEP
            else:
                reached_BC = t_BC * sign_C >= t_C * sign_C - _HALF_STEP
            exceed_C[part] += reached_BC.sum(dim=0).numpy()
    return observed_C, exceed_C


def auroc_per_column(
    scores_NS: np.ndarray, positive_N: np.ndarray, strata_N: np.ndarray | None = None
) -> np.ndarray:
    """AUROC of every column, positives vs the rest (Mann-Whitney U, ties averaged: sklearn's
    roc_auc_score); with strata, the stratified AUROC over same-stratum pairs only."""
    positive_N = np.asarray(positive_N, dtype=bool)
    codes_N = stratum_codes(strata_N, len(positive_N))
    pairs = comparable_pairs(positive_N, codes_N)
    if pairs == 0:
        raise TraitsaeError("AUROC needs images of both groups (in at least one stratum).")
    observed_S, _ = scan_columns(scores_NS, positive_N, codes_N, np.arange(scores_NS.shape[1]))
    return 0.5 + observed_S / pairs


def permutation_test(
    scores_NS: np.ndarray,
    in_a_N: np.ndarray,
    codes_N: np.ndarray,
    null: NullOptions,
    rng: np.random.Generator,
    *,
    test_S: np.ndarray | None = None,
    sign_S: np.ndarray | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed T of every column; permutation p-values of the `test_S` columns (NaN for the
    others) and the draws each p-value rests on.

    Round 1: `n_permutations` shuffles, shared by all columns. Then, while a column has fewer
    than RESOLVED exceedances (its p is limited by the draws, not by the data), it gets fresh
    shuffles up to 10x the draws so far, until `max_permutations`.
    Still a valid p-value: a column stops early only with >= RESOLVED exceedances, i.e. with
    p >= (RESOLVED + 1) / (draws + 1). For a level u take the first round j whose stopping
    floor (RESOLVED + 1) / (T_j + 1) is <= u: a column with final p <= u either stopped at
    round j (p = its fixed-T_j p-value) or went on past it, which needs p_j <= RESOLVED /
    (T_j + 1) < u. So {p <= u} lies inside {p_j <= u}, the event of an ordinary fixed-draw
    permutation p-value, whose probability under the null is <= u.
    """
    n_columns = scores_NS.shape[1]
    test_S = np.ones(n_columns, dtype=bool) if test_S is None else np.asarray(test_S, dtype=bool)
    test_S = test_S & (null.n_permutations > 0)
    observed_S = np.zeros(n_columns)
    exceed_S = np.zeros(n_columns, dtype=np.int64)
    draws_S = np.where(test_S, null.n_permutations, 0)
    done = null.n_permutations
    with tqdm(desc="permutation null", unit="draws", disable=not progress) as bar:
        # Round 1 ranks every column once (for T); only tested columns meet the shuffles.
        first = shuffle_batches(in_a_N, codes_N, done, rng)
        for columns, shuffles in ((np.flatnonzero(~test_S), None), (np.flatnonzero(test_S), first)):
            observed_S[columns], exceed_S[columns] = scan_columns(
                scores_NS, in_a_N, codes_N, columns, shuffles, sign_S
            )
        bar.update(done)
        while 0 < done < null.max_permutations:
            columns = np.flatnonzero(test_S & (exceed_S < RESOLVED))
            if not columns.size:
                break
            target = min(10 * done, null.max_permutations)
            bar.set_postfix(refining=f"{columns.size} latents")
            more = shuffle_batches(in_a_N, codes_N, target - done, rng)
            exceed_S[columns] += scan_columns(scores_NS, in_a_N, codes_N, columns, more, sign_S)[1]
            draws_S[columns] = target
            bar.update(target - done)
            done = target
    p_S = np.where(test_S, (exceed_S + 1) / (draws_S + 1), np.nan)
    return observed_S, p_S, draws_S


def shuffle_batches(
    in_a_N: np.ndarray, codes_N: np.ndarray, n: int, rng: np.random.Generator
) -> LabelBatches:
    """n new shuffles, in batches that are the same on every call, so every block of columns
    meets the same shuffles: held in memory when small, else regenerated from one seed each."""
    seed = int(rng.integers(2**63))
    sizes = [min(_PERMUTATION_BATCH, n - lo) for lo in range(0, n, _PERMUTATION_BATCH)]

    def batches() -> Iterable[np.ndarray]:
        return (
            shuffled_labels(in_a_N, codes_N, size, np.random.default_rng([seed, k]))
            for k, size in enumerate(sizes)
        )

    if n * len(in_a_N) <= _HELD_SHUFFLE_BYTES:
        held = list(batches())
        return lambda: held
    return batches


def bh_qvalues(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of a family."""
    p_values = np.asarray(p_values, dtype=np.float64)
    return false_discovery_control(p_values, method="bh") if p_values.size else p_values


def smallest_p(in_a_N: np.ndarray, codes_N: np.ndarray, max_draws: int) -> float:
    """The smallest p-value these groups and draws allow: one arrangement of the labels out of
    prod_s C(n_s, n_a,s), and 1 / (max_draws + 1)."""
    arrangements = math.prod(
        math.comb(int((codes_N == c).sum()), int((in_a_N & (codes_N == c)).sum()))
        for c in np.unique(codes_N)
    )
    return 1.0 / min(arrangements, max_draws + 1)  # ints: arrangements can exceed any float


def confirmation_split(
    in_a_N: np.ndarray, codes_N: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """bool [N]: images held out for confirmation, floor(fraction * n) of each group.

    Within a group, images are ordered by stratum (random order inside a stratum) and every
    image where floor((i + 1) * fraction) steps up is held out, so each stratum is split too.
    """
    held_N = np.zeros(len(in_a_N), dtype=bool)
    if fraction <= 0:
        return held_N
    for member in (True, False):
        rows = np.flatnonzero(in_a_N == member)
        order = rows[np.lexsort((rng.random(rows.size), codes_N[rows]))]
        i = np.arange(order.size)
        held_N[order[np.floor((i + 1) * fraction) > np.floor(i * fraction)]] = True
    return held_N


def check_group_sizes(
    in_a_N: np.ndarray, held_N: np.ndarray, null: NullOptions, names: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """Images per group and part; groups below min_group (in any part) are an error."""
    sizes = {
        g: {
            "selection": int((member & ~held_N).sum()),
            "confirmation": int((member & held_N).sum()),
        }
        for g, member in (("a", in_a_N), ("b", ~in_a_N))
    }
    parts = ("selection", "confirmation") if null.confirm > 0 else ("selection",)
    if min(sizes[g][p] for g in GROUPS for p in parts) >= null.min_group:
        return sizes

    def describe(g: str) -> str:
        total = sum(sizes[g].values())
        split = (
            f" ({sizes[g]['selection']} to select, {sizes[g]['confirmation']} to confirm)"
            if null.confirm > 0
            else ""
        )
        return f"group {g.upper()} ({names[g]}) has {total} images{split}"

    held = f" at eval.confirm={null.confirm}" if null.confirm > 0 else ""
    raise UntestableContrast(
        f"{describe('a')} and {describe('b')}{held}; eval.min_group={null.min_group} asks for at "
        f"least {null.min_group} per group in each part: on a handful of images an AUROC of 1.0 "
        "happens by chance. Widen the groups, lower eval.confirm (0 = no held-out half), or set "
        "eval.min_group to a smaller number to accept small groups knowingly."
    )
