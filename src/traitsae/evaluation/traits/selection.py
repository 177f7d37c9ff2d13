"""eval=cub_traits: each method's candidate directions, the best one per trait (chosen on the
train split or, as an upper bound, on the test split), and the summaries over traits and seeds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from traitsae.data.store import Store
from traitsae.evaluation.core.methods import (
    Method,
    image_scores,
)
from traitsae.evaluation.core.precision import (
    average_precision_columns,
    bootstrap_ci,
    paired_difference,
    precision_at_k,
    precision_at_trait_k,
    select_best,
)
from traitsae.evaluation.traits.options import CubTraitsOptions
from traitsae.evaluation.traits.probes import fit_trait_probes, probe_scores

PROTOCOLS = ("select_on_train", "select_on_test")
R = "R"  # the R-precision key beside the integer k's
Key = int | str


@dataclass
class Candidates:
    """One method's directions as candidates for every trait.

    train/test: {key: value [M, T]} of each direction for each trait on the selection and the
    reported split (key = k for precision@k, R for R-precision). `test_scores(rows, traits)` gives
    the test image scores [N, P] of (direction, trait) pairs (for AP), `origin(rows)` the method
    each direction comes from and its index there (the probe mixes methods).
    """

    name: str
    n_directions: int
    train: dict[Key, np.ndarray]
    test: dict[Key, np.ndarray]
    test_scores: Callable[[np.ndarray, np.ndarray], np.ndarray]
    origin: Callable[[np.ndarray], tuple[list[str], np.ndarray]]


def value_tables(
    scores_NM: np.ndarray, labels_NT: np.ndarray, ks: list[int], block: int
) -> dict[Key, np.ndarray]:
    """precision@k for each k and R-precision, [M, T] each, of every direction for every trait."""
    tables: dict[Key, np.ndarray] = dict(precision_at_k(scores_NM, labels_NT, ks, block))
    tables[R] = precision_at_trait_k(scores_NM, labels_NT, labels_NT.sum(0), block)
    return tables


def direction_candidates(
    name: str, scores_train_NM, scores_test_NM, labels_train_NT, labels_test_NT, ks, block
) -> Candidates:
    return Candidates(
        name,
        scores_train_NM.shape[1],
        value_tables(scores_train_NM, labels_train_NT, ks, block),
        value_tables(scores_test_NM, labels_test_NT, ks, block),
        lambda rows, traits: scores_test_NM[:, rows],
        lambda rows: ([name] * len(rows), np.asarray(rows)),
    )


def probe_candidates(
    oof_train_NX, test_NX, labels_train_NT, labels_test_NT, n_l2: int, ks, block
) -> Candidates:
    """The probes as candidates: row l of trait t is the probe of trait t with the l-th L2."""
    n_traits = labels_train_NT.shape[1]
    grid_LT = np.arange(n_l2)[:, None] * n_traits + np.arange(n_traits)[None]

    def own(tables: dict[Key, np.ndarray]) -> dict[Key, np.ndarray]:
        # Probe (l, t) is only a candidate for trait t: the diagonal of each [L*T, T] table.
        return {key: v[grid_LT, np.arange(n_traits)[None]] for key, v in tables.items()}

    return Candidates(
        "probe",
        n_l2,
        own(value_tables(oof_train_NX, labels_train_NT, ks, block)),
        own(value_tables(test_NX, labels_test_NT, ks, block)),
        lambda rows, traits: test_NX[:, np.asarray(rows) * n_traits + np.asarray(traits)],
        lambda rows: (["probe"] * len(rows), np.asarray(rows)),
    )


def union(name: str, parts: list[Candidates]) -> Candidates:
    """All parts' directions as one candidate set (the probe's hypothesis class)."""
    offsets = np.cumsum([0] + [p.train[R].shape[0] for p in parts])

    def locate(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part_P = np.searchsorted(offsets, rows, side="right") - 1
        return part_P, rows - offsets[part_P]

    def test_scores(rows, traits):
        part_P, local_P = locate(np.asarray(rows))
        out_NP = np.empty((parts[0].test_scores([0], [0]).shape[0], len(part_P)), np.float32)
        for i in np.unique(part_P):
            at = np.flatnonzero(part_P == i)
            out_NP[:, at] = parts[i].test_scores(local_P[at], np.asarray(traits)[at])
        return out_NP

    def origin(rows):
        part_P, local_P = locate(np.asarray(rows))
        names = [parts[i].origin([j])[0][0] for i, j in zip(part_P, local_P, strict=True)]
        return names, local_P

    keys = parts[0].train.keys()
    return Candidates(
        name,
        int(offsets[-1]),
        {key: np.concatenate([p.train[key] for p in parts]) for key in keys},
        {key: np.concatenate([p.test[key] for p in parts]) for key in keys},
        test_scores,
        origin,
    )


@dataclass
class Selection:
    """One method, protocol and key for one seed: the chosen direction per trait and its values."""

    best_T: np.ndarray
    value_T: np.ndarray  # on the reported (test) split
    selection_value_T: np.ndarray  # on the split it was chosen on
    ap_T: np.ndarray
    origin_T: list[str]


def select(c: Candidates, key: Key, labels_test_NT: np.ndarray) -> dict[str, Selection]:
    traits_T = np.arange(labels_test_NT.shape[1])
    out = {}
    for protocol, table in (("select_on_train", c.train[key]), ("select_on_test", c.test[key])):
        best_T, _ = select_best(table)
        scores_NT = c.test_scores(best_T, traits_T)
        ap_T = np.array(
            [
                average_precision_columns(scores_NT[:, t], labels_test_NT[:, [t]])[0]
                for t in traits_T
            ]
        )
        names, local_T = c.origin(best_T)
        out[protocol] = Selection(
            local_T, c.test[key][best_T, traits_T], table[best_T, traits_T], ap_T, names
        )
    return out


def method_candidates(
    methods: dict[str, Method],
    train_store: Store,
    test_store: Store,
    layer,
    tokens,
    labels,
    ks,
    opts,
    what,
) -> dict[str, Candidates]:
    """Score every method on both splits (one pass each) and tabulate its candidates."""
    if not methods:
        return {}
    scores_train, _ = image_scores(
        train_store, layer, methods, tokens, opts.device, f"{what}: scoring train"
    )
    scores_test, _ = image_scores(
        test_store, layer, methods, tokens, opts.device, f"{what}: scoring test"
    )
    return {
        name: direction_candidates(
            name, scores_train[name], scores_test[name], *labels, ks, opts.block
        )
        for name in methods
    }


def probe_union(
    sae,
    train_store: Store,
    test_store: Store,
    layer,
    tokens,
    sample,
    labels,
    ks,
    opts,
    seed,
    others,
) -> Candidates:
    """The supervised upper bound: patch-level probes plus every unsupervised direction."""

    probes = fit_trait_probes(
        train_store,
        layer,
        tokens,
        sample,
        labels[0],
        opts.probe_l2,
        opts.probe_folds,
        opts.probe_rounds,
        opts.probe_max_iter,
        seed,
    )
    oof_NX, test_NX = probe_scores(probes, train_store, test_store, layer, tokens, opts.device)
    own = probe_candidates(oof_NX, test_NX, *labels, len(opts.probe_l2), ks, opts.block)
    # The probes last: on a tie in training precision the direction with no fitted weights wins.
    return union("probe", [*others, own])


def summary_row(
    method: str,
    protocol: str,
    key: Key,
    sels: list[Selection],
    covered_T: np.ndarray,
    n_dirs: int,
    opts: CubTraitsOptions,
) -> dict[str, Any]:
    """Mean over covered traits (and seeds), bootstrap CI over traits, spread across seeds."""
    values_ST = np.stack([s.value_T[covered_T] for s in sels])
    ap_ST = np.stack([s.ap_T[covered_T] for s in sels])
    low, high = bootstrap_ci(values_ST.mean(0), opts.n_bootstrap, opts.seed, opts.ci_level)
    per_seed_S = values_ST.mean(1)
    row = {
        "method": method,
        "protocol": protocol,
        "k": key,
        "mean_precision": float(per_seed_S.mean()),
        "recall_at_tau": float((values_ST >= opts.tau).mean()),
        "tau": float(opts.tau),
        "mean_ap": float(np.nanmean(ap_ST)),
        "ci_low": low,
        "ci_high": high,
        "n_directions": int(n_dirs),
        "n_traits": int(covered_T.sum()),
        "n_seeds": len(sels),
        "seed_sd": float(per_seed_S.std(ddof=1)) if len(sels) > 1 else 0.0,
        "seed_min": float(per_seed_S.min()),
        "seed_max": float(per_seed_S.max()),
    }
    if key == R:
        row["mean_r_precision"] = row.pop("mean_precision")
        del row["k"]
    return row


def paired_differences(
    seed_means: dict[tuple[str, str, Key], np.ndarray], opts: CubTraitsOptions
) -> list[dict[str, Any]]:
    """SAE minus each other method per protocol and metric: paired bootstrap CI over traits.

    The pairs are traits (each method's seed-averaged value on the same trait), so trait
    difficulty cancels; `sae` vs `sae_init` is the trained SAE against its own initialisation.
    """
    rows = []
    for (name, protocol, key), values_T in seed_means.items():
        sae_T = seed_means.get(("sae", protocol, key))
        if name == "sae" or sae_T is None:
            continue
        difference = paired_difference(
            sae_T, values_T, opts.n_bootstrap, opts.seed, opts.ci_level, "traits"
        )
        metric = "r_precision" if key == R else "precision_at_k"
        rows.append(
            {"method": name, "protocol": protocol, "metric": metric}
            | {"k": None if key == R else key}
            | difference
        )
    return rows
