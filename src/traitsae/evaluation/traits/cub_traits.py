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

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.data.images.cub_attributes import CubAttributes, load_cub_attributes
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import directions
from traitsae.evaluation.core.foreground import select_patches
from traitsae.evaluation.core.methods import Method, baseline_methods, sae_scorer
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.precision import (
    units_with_positives,
    usable_ks,
)
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_stores, output_dir
from traitsae.evaluation.core.tokens import valid_rows
from traitsae.evaluation.traits.options import UNSUPERVISED, CubTraitsOptions
from traitsae.evaluation.traits.report import TraitReport, format_table, write_outputs
from traitsae.evaluation.traits.selection import (
    Candidates,
    Key,
    R,
    Selection,
    method_candidates,
    paired_differences,
    probe_union,
    select,
    summary_row,
)
from traitsae.sae.export import RawSpaceSAE

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> TraitReport:
    """Hydra entry (registry: `cub_traits`): evaluate, write JSON/CSV/PNG to the output dir, print a table."""
    opts = build_options(CubTraitsOptions, cfg)
    root = opts.attributes_root or cfg.dataset.get("root")
    if not root:
        raise TraitsaeError(
            "eval=cub_traits needs the CUB attribute files: set dataset.root (or "
            "eval.attributes_root) to the CUB_200_2011 directory."
        )
    attrs = load_cub_attributes(root)
    sae = resolve_sae(cfg).to(opts.device)
    train_store, test_store = eval_stores(cfg, sae, [opts.train_split, opts.test_split])
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


def image_ids(store: Store) -> np.ndarray:
    meta = store.metadata
    if "image_id" not in meta:
        raise TraitsaeError(
            f"store {store.path} has no images/image_id column (metadata columns: "
            f"{sorted(k for k in meta if k not in ('index', 'path', 'label', 'valid', 'error'))}); "
            "cub_traits needs a store extracted with dataset=cub or dataset=synthetic."
        )
    return meta["image_id"]


def evaluate_traits(
    sae: RawSpaceSAE,
    train_store: Store,
    test_store: Store,
    attrs: CubAttributes,
    opts: CubTraitsOptions,
) -> TraitReport:
    """All methods x traits x k x protocols x seeds, on already opened and checked stores."""
    layer = sae.layer
    tokens = sae.tokens
    skipped_fg = [  # eval.patches: pool over foreground patches?
        len(select_patches(store, opts.patches, sae)["skipped_without_foreground"])
        for store in (train_store, test_store)
    ]
    # Labels first: traits without positives in either split are dropped before anything is fit.
    rows_train, rows_test = valid_rows(train_store), valid_rows(test_store)
    labels_train_NT = attrs.labels(image_ids(train_store)[rows_train], opts.certainty)
    labels_test_NT = attrs.labels(image_ids(test_store)[rows_test], opts.certainty)
    ks, notes = usable_ks(opts.k, len(rows_train), f"the train split ({train_store.path})")
    ks, more = usable_ks(ks, len(rows_test), f"the test split ({test_store.path})")
    notes += more
    if train_store.patch_mask is not None:
        notes.append(
            "eval.patches=foreground: every method pools over foreground patches only "
            f"({skipped_fg[0]} train / {skipped_fg[1]} test images without one skipped)"
        )
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
        fixed["sae"] = method_candidates(
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
        methods = baseline_methods(
            opts.methods,
            sae,
            sample.tokens_SD,
            torch.from_numpy(sample.tokens_SD.mean(0)),
            seed,
            n_random=opts.n_random,
            pca_both_signs=opts.pca_both_signs,
            kmeans_clusters=opts.kmeans_clusters,
            pool=opts.pool,
            device=opts.device,
        )
        cands = {
            **fixed,
            **method_candidates(
                methods, train_store, test_store, layer, tokens, labels, ks, opts, f"seed {seed}"
            ),
        }
        if "probe" in opts.methods:
            cands["probe"] = probe_union(
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
        row = summary_row(name, protocol, key, sels, covered_T, n_dirs[name], opts)
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
    report.paired_differences = paired_differences(seed_means, opts)
    return report


def _traits_with_positives(
    names: list[str], labels_train_NT: np.ndarray, labels_test_NT: np.ndarray
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Traits usable in both splits; the others listed with the reason (not NaNs in a mean)."""
    keep_T, skipped = units_with_positives(
        labels_train_NT.sum(0), labels_test_NT.sum(0), "positives"
    )
    return keep_T, [{"trait": names[t], **row} for t, row in skipped.items()]


def _meta(
    opts: CubTraitsOptions, train_store: Store, test_store: Store, sae, n_traits: int
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
