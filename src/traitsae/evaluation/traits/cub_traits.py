"""`eval=cub_traits`: do SAE latents find labelled traits better than cheap directions?

Methods: the SAE's latents; the same SAE at initialisation (`sae_init`: random tied rows through
the same encoder, so "training helped" is tested apart from "beats random"); random unit
directions; PCA components; k-means centroids; and `probe`, the supervised upper bound.
Every direction scores an image by the max (eval.pool) over its patches.

For every trait and method the best direction is selected on the train split and its precision
reported on the test split (`select_on_train`), and, side by side, selected and reported on the
test split (`select_on_test`, the research notes' protocol, optimistic). Metrics: precision@k for
the traits with at least k positives in the test split (`n_traits` says how many each k covers)
and R-precision (precision at the trait's own number of positives) for every trait, plus the AP
of the selected direction. Seed-dependent methods are repeated for each of eval.seeds; summaries
give the mean over seeds, the spread across seeds and a bootstrap CI over traits.

`probe` is the best of a hypothesis class that contains every other method's: per trait, the
patch-level (max-pooled) logistic probes of `trait_probes` *and* every unsupervised direction of
the run, chosen by precision on the train split, measured out of sample for the probes (cross-
fitting) and as usual for the directions. On the train split it is therefore >= every method by
construction; on the test split it bounds them up to the noise of the selection.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.data.images.cub_attributes import CubAttributes, load_cub_attributes
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import directions, figures
from traitsae.evaluation.core.methods import (
    Method,
    check_pool,
    image_scores,
    linear_scorer,
    sae_scorer,
    valid_rows,
)
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.precision import (
    average_precision_columns,
    bootstrap_ci,
    paired_difference,
    precision_at_k,
    precision_at_trait_k,
    select_best,
    units_with_positives,
    usable_ks,
)
from traitsae.evaluation.core.sources import eval_stores, output_dir, resolve_sae
from traitsae.evaluation.traits.probes import fit_trait_probes, probe_scores
from traitsae.sae.export import RawSpaceSAE

log = logging.getLogger(__name__)

METHODS = ("sae", "sae_init", "random", "pca", "kmeans", "probe")
UNSUPERVISED = ("sae", "sae_init", "random", "pca", "kmeans")
PROTOCOLS = ("select_on_train", "select_on_test")
R = "R"  # the R-precision key beside the integer k's
Key = int | str


@dataclass(frozen=True)
class Options:
    """The `eval.*` options of conf/eval/cub_traits.yaml (defaults and meanings there)."""

    k: list[int]
    tau: float
    certainty: list[int]
    pool: str
    methods: list[str]
    seeds: list[int]  # null in the YAML: [seed]
    n_samples: int
    kmeans_clusters: int
    n_random: int | None  # None: as many as the SAE has latents
    pca_both_signs: bool
    probe_l2: list[float]
    probe_folds: int
    probe_rounds: int
    probe_max_iter: int
    n_bootstrap: int
    ci_level: float
    seed: int
    block: int
    device: str

    def __post_init__(self) -> None:
        if self.seeds is None:
            object.__setattr__(self, "seeds", [self.seed])
        self.validate()

    def validate(self) -> None:
        check_pool(self.pool)
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise TraitsaeError(
                f"eval.methods must be a non-empty subset of {METHODS}, got {self.methods}."
            )
        if not 0.0 < self.tau <= 1.0:
            raise TraitsaeError(f"eval.tau must be in (0, 1], got {self.tau}.")
        bad = sorted(set(self.certainty) - {1, 2, 3, 4})
        if bad or not self.certainty:
            raise TraitsaeError(
                f"eval.certainty must list CUB certainty ids (1 not visible, 2 guessing, "
                f"3 probably, 4 definitely), got {self.certainty}."
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise TraitsaeError(
                f"eval.seeds must be a non-empty list of distinct integers, got {self.seeds}."
            )
        if self.probe_folds < 2 or self.probe_rounds < 0 or not self.probe_l2:
            raise TraitsaeError(
                "eval.probe_folds must be >= 2, eval.probe_rounds >= 0 and eval.probe_l2 a "
                f"non-empty list; got {self.probe_folds}, {self.probe_rounds}, {self.probe_l2}."
            )


@dataclass
class TraitReport:
    """Everything cub_traits.json holds; `summary` and `per_trait` rows follow the contract in docs/ARCHITECTURE.md."""

    summary: list[dict[str, Any]]
    per_trait: list[dict[str, Any]]
    r_summary: list[dict[str, Any]]
    r_per_trait: list[dict[str, Any]]
    skipped_traits: list[dict[str, Any]]
    notes: list[str]
    paired_differences: list[dict[str, Any]]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "per_trait": self.per_trait,
            "r_precision": {"summary": self.r_summary, "per_trait": self.r_per_trait},
            "skipped_traits": self.skipped_traits,
            "notes": self.notes,
            "paired_differences": self.paired_differences,
            "meta": self.meta,
        }


# ---------------------------------------------------------------- entry point


def run(cfg: DictConfig) -> TraitReport:
    """Hydra entry (registry: `cub_traits`): evaluate, write JSON/CSV/PNG to the output dir, print a table."""

    opts = build_options(Options, cfg)
    root = cfg.eval.get("attributes_root") or cfg.dataset.get("root")
    if not root:
        raise TraitsaeError(
            "eval=cub_traits needs the CUB attribute files: set dataset.root (or "
            "eval.attributes_root) to the CUB_200_2011 directory."
        )
    attrs = load_cub_attributes(root)
    sae = resolve_sae(cfg).to(opts.device)
    train_store, test_store = eval_stores(cfg, sae, [cfg.eval.train_split, cfg.eval.test_split])
    try:
        report = evaluate_traits(sae, train_store, test_store, attrs, opts)
    finally:
        train_store.close()
        test_store.close()
    out = output_dir(cfg)
    write_outputs(report, out)
    print(format_table(report))
    print(f"cub_traits: outputs in {out}")
    return report


# ---------------------------------------------------------------- candidates and selection


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


# ---------------------------------------------------------------- evaluation


def image_ids(store: Store) -> np.ndarray:
    meta = store.metadata
    if "image_id" not in meta:
        raise TraitsaeError(
            f"store {store.path} has no images/image_id column (metadata columns: "
            f"{sorted(k for k in meta if k not in ('index', 'path', 'label', 'valid', 'error'))}); "
            "cub_traits needs a store extracted with dataset=cub or dataset=synthetic."
        )
    return meta["image_id"]


def unsupervised_methods(
    sae: RawSpaceSAE, sample: directions.TrainSample, opts: Options, seed: int
) -> dict[str, Method]:
    """Token scorers of the seed-dependent baselines, fit on the training sample."""
    d_model = sample.tokens_SD.shape[1]
    d_sae = sae.d_sae
    methods: dict[str, Method] = {}

    def add_linear(name: str, dirs_MD: np.ndarray) -> None:
        scorer = linear_scorer(torch.from_numpy(dirs_MD).to(opts.device))
        methods[name] = Method(name, scorer, dirs_MD.shape[0], opts.pool)

    for name in opts.methods:
        if name == "sae_init":
            init = directions.untrained_sae(sae, sample.tokens_SD, seed)
            methods[name] = Method(name, sae_scorer(init), d_sae, opts.pool)
        elif name == "random":
            add_linear(name, directions.random_directions(d_model, opts.n_random or d_sae, seed))
        elif name == "pca":
            add_linear(name, directions.pca_directions(sample.tokens_SD, opts.pca_both_signs, seed))
        elif name == "kmeans":
            log.info(
                "fitting k-means: %d centroids on %d tokens",
                opts.kmeans_clusters,
                sample.tokens_SD.shape[0],
            )
            add_linear(
                name, directions.kmeans_directions(sample.tokens_SD, opts.kmeans_clusters, seed)
            )
    return methods


def evaluate_traits(
    sae: RawSpaceSAE, train_store: Store, test_store: Store, attrs: CubAttributes, opts: Options
) -> TraitReport:
    """All methods x traits x k x protocols x seeds, on already opened and checked stores."""
    layer = sae.layer
    tokens = sae.tokens
    # Labels first: traits without positives in either split are dropped before anything is fit.
    rows_train, rows_test = valid_rows(train_store), valid_rows(test_store)
    labels_train_NT = attrs.labels(image_ids(train_store)[rows_train], opts.certainty)
    labels_test_NT = attrs.labels(image_ids(test_store)[rows_test], opts.certainty)
    ks, notes = usable_ks(opts.k, len(rows_train), f"the train split ({train_store.path})")
    ks, more = usable_ks(ks, len(rows_test), f"the test split ({test_store.path})")
    notes += more
    keep_T, skipped = _traits_with_positives(attrs.names, labels_train_NT, labels_test_NT)
    if not keep_T.any():
        raise TraitsaeError(
            "no trait has positives in both the train and the test split with certainty in "
            f"{opts.certainty}; check eval.certainty and the attribute files."
        )
    kept = np.flatnonzero(keep_T)
    labels_train_NT = labels_train_NT[:, kept].astype(np.float32)
    labels_test_NT = labels_test_NT[:, kept].astype(np.float32)
    n_pos_test_T = labels_test_NT.sum(0).astype(int)
    for k in ks:
        if not (n_pos_test_T >= k).any():
            notes.append(f"eval.k: k={k}: no trait has {k} positives in the test split")
    for note in notes:
        print(note)
    labels = (labels_train_NT, labels_test_NT)

    selections: dict[tuple[str, str, Key], list[Selection]] = {}
    n_dirs: dict[str, int] = {}
    fixed: dict[str, Candidates] = {}  # seed-independent (the trained SAE)
    if "sae" in opts.methods:
        fixed["sae"] = _candidates_of(
            {"sae": Method("sae", sae_scorer(sae), sae.d_sae, opts.pool)},
            train_store,
            test_store,
            layer,
            tokens,
            labels,
            ks,
            opts,
            "sae",
        )["sae"]
    for seed in opts.seeds:
        sample = directions.sample_train_activations(
            train_store, layer, tokens, opts.n_samples, seed
        )
        assert np.array_equal(sample.rows_N, rows_train)
        methods = unsupervised_methods(sae, sample, opts, seed)
        cands = {
            **fixed,
            **_candidates_of(
                methods, train_store, test_store, layer, tokens, labels, ks, opts, f"seed {seed}"
            ),
        }
        if "probe" in opts.methods:
            cands["probe"] = _probe_union(
                sae,
                train_store,
                test_store,
                layer,
                tokens,
                sample,
                labels,
                ks,
                opts,
                seed,
                [cands[m] for m in UNSUPERVISED if m in cands],
            )
        for name in opts.methods:
            n_dirs[name] = cands[name].n_directions
            for key in [*ks, R]:
                for protocol, sel in select(cands[name], key, labels_test_NT).items():
                    selections.setdefault((name, protocol, key), []).append(sel)

    names = [attrs.names[t] for t in kept]
    n_pos_train_T = labels_train_NT.sum(0).astype(int)
    report = TraitReport(
        [],
        [],
        [],
        [],
        skipped,
        notes,
        [],
        _meta(opts, train_store, test_store, sae, len(kept)),
    )
    seed_means: dict[tuple[str, str, Key], np.ndarray] = {}
    for (name, protocol, key), sels in selections.items():
        covered_T = n_pos_test_T >= (0 if key == R else key)
        if not covered_T.any():
            continue
        values_ST = np.stack([s.value_T for s in sels])
        seed_means[(name, protocol, key)] = np.where(covered_T, values_ST.mean(0), np.nan)
        row = _summary(name, protocol, key, sels, covered_T, n_dirs[name], opts)
        (report.r_summary if key == R else report.summary).append(row)
        for seed, sel in zip(opts.seeds, sels, strict=True):
            for i in np.flatnonzero(covered_T):
                trait_row = {
                    "trait": names[i],
                    "method": name,
                    "protocol": protocol,
                    "k": int(n_pos_test_T[i]) if key == R else key,
                    "best_direction": int(sel.best_T[i]),
                    "precision": float(sel.value_T[i]),
                    "ap": float(sel.ap_T[i]),
                    "n_pos": int(n_pos_test_T[i]),
                    "seed": int(seed),
                    "best_method": sel.origin_T[i],
                    "selection_precision": float(sel.selection_value_T[i]),
                    "n_pos_train": int(n_pos_train_T[i]),
                }
                if key == R:
                    del trait_row["k"]
                    trait_row["r_precision"] = trait_row.pop("precision")
                    trait_row["selection_r_precision"] = trait_row.pop("selection_precision")
                    report.r_per_trait.append(trait_row)
                else:
                    report.per_trait.append(trait_row)
    report.paired_differences = _paired_differences(seed_means, opts)
    return report


def _candidates_of(
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


def _probe_union(
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


def _traits_with_positives(
    names: list[str], labels_train_NT: np.ndarray, labels_test_NT: np.ndarray
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Traits usable in both splits; the others listed with the reason (not NaNs in a mean)."""
    keep_T, skipped = units_with_positives(
        labels_train_NT.sum(0), labels_test_NT.sum(0), "positives"
    )
    return keep_T, [{"trait": names[t], **row} for t, row in skipped.items()]


def _summary(
    method: str,
    protocol: str,
    key: Key,
    sels: list[Selection],
    covered_T: np.ndarray,
    n_dirs: int,
    opts: Options,
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


def _paired_differences(
    seed_means: dict[tuple[str, str, Key], np.ndarray], opts: Options
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


def _meta(
    opts: Options, train_store: Store, test_store: Store, sae, n_traits: int
) -> dict[str, Any]:
    return {
        "options": asdict(opts),
        "train_store": str(train_store.path),
        "test_store": str(test_store.path),
        "n_images_train": int(np.asarray(train_store.metadata["valid"]).sum()),
        "n_images_test": int(np.asarray(test_store.metadata["valid"]).sum()),
        "n_traits_evaluated": n_traits,
        "sae": {
            k: sae.meta.get(k)
            for k in ("backbone", "dataset", "layer", "tokens", "variant", "d_sae", "steps")
        },
    }


# ---------------------------------------------------------------- outputs


SUMMARY_CSV_FIELDS = [
    "method",
    "protocol",
    "k",
    "mean_precision",
    "ci_low",
    "ci_high",
    "seed_sd",
    "seed_min",
    "seed_max",
    "n_seeds",
    "recall_at_tau",
    "n_traits",
    "tau",
    "mean_ap",
    "n_directions",
]
PER_TRAIT_CSV_FIELDS = [
    "trait",
    "method",
    "protocol",
    "k",
    "seed",
    "best_method",
    "best_direction",
    "precision",
    "selection_precision",
    "ap",
    "n_pos",
    "n_pos_train",
]
DIFFERENCE_CSV_FIELDS = [
    "method",
    "protocol",
    "metric",
    "k",
    "sae_minus_method",
    "ci_low",
    "ci_high",
    "excludes_zero",
    "n_traits",
]


def _as_k_rows(rows: list[dict[str, Any]], value: str) -> list[dict[str, Any]]:
    """R-precision rows in the precision@k tables' columns (k = "R")."""
    return [
        {
            **r,
            "k": R,
            "mean_precision": r.get("mean_r_precision"),
            "precision": r.get("r_precision"),
            "selection_precision": r.get(f"selection_{value}"),
        }
        for r in rows
    ]


def write_outputs(report: TraitReport, out: Path) -> dict[str, Path]:
    """cub_traits.json, CSV tables and PNG figures in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "cub_traits.json"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2))
    csvs = {
        "summary": (SUMMARY_CSV_FIELDS, report.summary + _as_k_rows(report.r_summary, "")),
        "per_trait": (
            PER_TRAIT_CSV_FIELDS,
            report.per_trait + _as_k_rows(report.r_per_trait, "r_precision"),
        ),
        "skipped": (["trait", "n_pos_train", "n_pos_test", "reason"], report.skipped_traits),
        "differences": (DIFFERENCE_CSV_FIELDS, report.paired_differences),
    }
    for name, (fields, rows) in csvs.items():
        paths[f"{name}_csv"] = _write_csv(out / f"cub_traits_{name}.csv", fields, rows)
    paths["methods_png"] = figures.save(
        method_comparison_figure(report), out / "cub_traits_methods.png"
    )
    paths["distribution_png"] = figures.save(
        precision_distribution_figure(report), out / "cub_traits_precision_distribution.png"
    )
    return paths


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _methods_in(report: TraitReport) -> list[str]:
    return list(dict.fromkeys(row["method"] for row in report.summary + report.r_summary))


def _summary_by_key(report: TraitReport) -> dict[tuple[str, str, Key], dict[str, Any]]:
    rows = report.summary + _as_k_rows(report.r_summary, "")
    return {(r["method"], r["protocol"], r["k"]): r for r in rows}


def method_comparison_figure(report: TraitReport):
    """Mean precision@k and R-precision per method (bars, bootstrap CIs), a panel per protocol."""
    keys: list[Key] = sorted({row["k"] for row in report.summary}) + [R]
    by_key = _summary_by_key(report)
    fig, axes = figures.subplots(len(PROTOCOLS), width=1.6 + 1.6 * len(keys))
    for ax, protocol in zip(axes, PROTOCOLS, strict=True):
        series = {}
        for method in _methods_in(report):
            rows = [by_key.get((method, protocol, key)) for key in keys]
            series[method] = [
                (r["mean_precision"], r["ci_low"], r["ci_high"]) if r else (np.nan,) * 3
                for r in rows
            ]
        figures.grouped_bars_with_ci(
            [f"k={k}" if k != R else "R-prec." for k in keys],
            series,
            title=protocol.replace("_", " "),
            ylabel="mean over traits (k <= n_pos)",
            ax=ax,
        )
    return fig


def precision_distribution_figure(report: TraitReport):
    """Per-trait precision distribution per method (select_on_train), one panel per k and R."""
    keys: list[Key] = sorted({row["k"] for row in report.summary}) + [R]
    rows = report.per_trait + _as_k_rows(report.r_per_trait, "r_precision")
    fig, axes = figures.subplots(len(keys))
    tau = report.meta["options"]["tau"]
    for ax, key in zip(axes, keys, strict=True):
        values = {
            m: np.array(
                [
                    r["precision"]
                    for r in rows
                    if r["method"] == m and r["k"] == key and r["protocol"] == "select_on_train"
                ]
            )
            for m in _methods_in(report)
        }
        label = f"precision@{key}" if key != R else "R-precision"
        figures.distributions(
            values,
            title=f"{label} per trait and seed (selected on train)",
            ylabel="on test",
            ax=ax,
            reference=tau,
        )
    return fig


def format_table(report: TraitReport) -> str:
    """The short table printed at the end of a run."""
    level = int(round(report.meta["options"]["ci_level"] * 100))
    tau = report.meta["options"]["tau"]
    head = (
        f"{'method':<8} {'protocol':<16} {'k':>4}  {'mean':>6}  {f'{level}% CI':<14}  "
        f"{'seed sd':>7}  {'traits':>6}  {f'recall@{tau:g}':>10}  {'mean AP':>7}  {'dirs':>6}"
    )
    lines = [head, "-" * len(head)]
    rows = report.summary + _as_k_rows(report.r_summary, "")
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(
        rows,
        key=lambda r: (
            r["protocol"] != "select_on_train",
            r["k"] == R,
            r["k"] if r["k"] != R else 0,
            order[r["method"]],
        ),
    ):
        lines.append(
            f"{r['method']:<8} {r['protocol']:<16} {r['k']:>4}  {r['mean_precision']:>6.3f}  "
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {r['seed_sd']:>7.3f}  "
            f"{r['n_traits']:>6}  {r['recall_at_tau']:>10.3f}  "
            f"{r['mean_ap']:>7.3f}  {r['n_directions']:>6}"
        )
    lines.append(
        "k = R: R-precision (precision at each trait's number of test positives); mean over "
        "seeds; CI: bootstrap over traits; seed sd: spread of the mean across eval.seeds."
    )
    for d in report.paired_differences:
        if d["method"] == "sae_init" and d["protocol"] == "select_on_train":
            what = "R-precision" if d["metric"] == "r_precision" else f"precision@{d['k']}"
            verdict = "CI excludes 0" if d["excludes_zero"] else "CI includes 0: not told apart"
            lines.append(
                f"trained SAE - SAE at init, {what}: {d['sae_minus_method']:+.3f} "
                f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] over {d['n_traits']} traits ({verdict})"
            )
    n_traits = report.meta["n_traits_evaluated"]
    lines.append(
        f"{n_traits} traits evaluated, {len(report.skipped_traits)} skipped (no positives)"
    )
    for s in report.skipped_traits[:10]:
        lines.append(f"  skipped {s['trait']}: {s['reason']}")
    if len(report.skipped_traits) > 10:
        lines.append(f"  ... and {len(report.skipped_traits) - 10} more (cub_traits_skipped.csv)")
    return "\n".join(lines)
