"""`eval=segments`: do single SAE latents pick out segmented traits patch by patch?

For each method (SAE latents, random unit directions, PCA components, k-means centroids, another
SAE given as `eval.reference`, and a supervised linear probe per class as the upper reference)
and each mask class: the direction with the best train-split AP (or 1-D probe loss) is selected
and reported on the test split with its AP, purity@k, coverage@tau and the AP of its 1-D
logistic probe (metrics: `patch_metrics`). Patches are labelled from per-image masks framed like
the images were (`core.patches`). Summaries over classes carry bootstrap CIs; SAE minus each
other method is a paired difference over classes with a bootstrap CI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.data.images.masks import RULES, MaskLayout, load_mask_layout
from traitsae.data.store import Store
from traitsae.data.synthetic import ensure_synthetic
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import probes
from traitsae.evaluation.core.methods import Method, baseline_methods
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.patches import FRAMES, SplitPatches, collect_patches, store_frame
from traitsae.evaluation.core.precision import bootstrap_ci, paired_difference, units_with_positives
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_stores, output_dir
from traitsae.evaluation.segments import metrics as patch_metrics
from traitsae.evaluation.segments.report import METRICS, SegmentsReport, format_table, write_outputs
from traitsae.sae.export import RawSpaceSAE, load_sae

METHODS = ("sae", "random", "pca", "kmeans", "probe")
SELECT_BY = ("ap", "probe_loss")


@dataclass(frozen=True)
class SegmentsOptions:
    """The `eval.*` options of conf/eval/segments.yaml (defaults and meanings there)."""

    train_split: str
    test_split: str
    patch_rule: str
    frame: str
    k: int
    tau: float
    select_by: str
    methods: list[str]
    reference: str | None
    probe1d_l2: float
    probe1d_steps: int
    probe_l2: list[float]
    probe_max_iter: int
    probe_max_patches: int
    n_samples: int
    kmeans_clusters: int
    n_random: int | None
    pca_both_signs: bool
    max_images: int | None
    max_score_bytes: int
    n_bootstrap: int
    ci_level: float
    seed: int
    device: str

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.patch_rule in RULES, f"eval.patch_rule must be one of {RULES}"),
            (self.frame in FRAMES, f"eval.frame must be one of {FRAMES}"),
            (self.select_by in SELECT_BY, f"eval.select_by must be one of {SELECT_BY}"),
            (self.k >= 1, "eval.k must be a positive integer"),
            (0.0 < self.tau <= 1.0, "eval.tau must be in (0, 1]"),
            (self.probe1d_l2 > 0, "eval.probe1d_l2 must be > 0 (it keeps separable fits finite)"),
            (self.probe1d_steps >= 1, "eval.probe1d_steps must be >= 1"),
            (self.max_images is None or self.max_images >= 1, "eval.max_images must be >= 1"),
            (
                bool(self.methods) and set(self.methods) <= set(METHODS),
                f"eval.methods must be a non-empty subset of {METHODS}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TraitsaeError(f"{message}; got {asdict(self)}.")


# ---------------------------------------------------------------- entry point


def run(cfg: DictConfig) -> SegmentsReport:
    """Hydra entry (`eval.entry`): evaluate, write JSON/CSV/PNG to the output dir, print a table."""
    opts = build_options(SegmentsOptions, cfg)
    if cfg.dataset.get("format") == "synthetic" and cfg.dataset.get("root"):
        # Demo data generated before masks existed gets them here (images stay untouched).
        ensure_synthetic(cfg.dataset.root, seed=int(cfg.dataset.get("seed", 0)))
    layout = load_mask_layout(cfg.dataset)
    sae = resolve_sae(cfg).to(opts.device)
    reference = load_sae(opts.reference).to(opts.device) if opts.reference else None
    if reference is not None and reference.layer != sae.layer:
        raise TraitsaeError(
            f"eval.reference={opts.reference} was trained on layer {reference.layer} "
            f"but the SAE under test on layer {sae.layer}; compare SAEs of one layer."
        )
    train_store, test_store = eval_stores(cfg, sae, [opts.train_split, opts.test_split])
    try:
        train, test = (
            load_split(store, layout, sae, opts, cfg.dataset.get("root"))
            for store in (train_store, test_store)
        )
    finally:
        train_store.close()
        test_store.close()
    report = evaluate_segments(sae, train, test, layout, opts, reference)
    out = output_dir(cfg)
    write_outputs(report, out)
    print(format_table(report))
    print(f"segments: outputs in {out}")
    return report


def load_split(
    store: Store,
    layout: MaskLayout,
    sae: RawSpaceSAE,
    opts: SegmentsOptions,
    image_root: str | None,
) -> SplitPatches:
    if sae.tokens != "patches":
        raise TraitsaeError(
            "eval=segments scores patches, but this SAE was trained on CLS tokens "
            "(data.tokens=cls); evaluate an SAE trained with data.tokens=patches."
        )
    return collect_patches(
        store,
        layout,
        sae.layer,
        frame=store_frame(store, opts.frame),
        rule=opts.patch_rule,
        image_root=image_root,
        max_images=opts.max_images,
        seed=opts.seed,
    )


# ---------------------------------------------------------------- evaluation


def build_methods(
    sae: RawSpaceSAE,
    reference: RawSpaceSAE | None,
    train: SplitPatches,
    n_classes: int,
    opts: SegmentsOptions,
) -> list[Method]:
    """Every method's token scorer; baselines fit on the train split's patches and centred on
    their mean (core/methods.py's rule)."""
    acts_RD = train.acts_RD
    rng = np.random.default_rng(opts.seed)
    n_rows = acts_RD.shape[0]
    sample_SD = acts_RD[np.sort(rng.choice(n_rows, min(n_rows, opts.n_samples), replace=False))]
    baselines = baseline_methods(
        opts.methods,
        sae,
        sample_SD.numpy(),
        acts_RD.mean(0),
        opts.seed,
        n_random=opts.n_random,
        pca_both_signs=opts.pca_both_signs,
        kmeans_clusters=min(opts.kmeans_clusters, sample_SD.shape[0]),
        device=opts.device,
    )
    methods = []
    for name in opts.methods:
        if name == "sae":
            methods.append(Method("sae", sae.encode, sae.d_sae))
        elif name == "probe":
            methods.append(supervised_probe(train, opts, rng))
        else:
            methods.append(baselines[name])
    if reference is not None:
        methods.append(Method("reference", reference.encode, reference.d_sae))
    return methods


def supervised_probe(
    train: SplitPatches, opts: SegmentsOptions, rng: np.random.Generator
) -> Method:
    """One L2 logistic regression per class on raw patch activations (the supervised reference)."""
    n_rows = train.acts_RD.shape[0]
    fit = np.sort(rng.choice(n_rows, min(n_rows, opts.probe_max_patches), replace=False))
    w_CD, b_C = probes.linear_probes(
        train.acts_RD[fit].numpy(),
        train.labels_RC[fit],
        opts.probe_l2,
        opts.probe_max_iter,
        seed=opts.seed,
    )
    w_DC = torch.from_numpy(w_CD).T.contiguous().to(opts.device)
    b_C = torch.from_numpy(b_C).to(opts.device)
    return Method("probe", lambda x_RD: x_RD @ w_DC + b_C, w_DC.shape[1], per_class=True)


def evaluate_segments(
    sae: RawSpaceSAE,
    train: SplitPatches,
    test: SplitPatches,
    layout: MaskLayout,
    opts: SegmentsOptions,
    reference: RawSpaceSAE | None = None,
) -> SegmentsReport:
    """All methods x classes on already collected patches."""
    keep_C, skipped = _classes_with_patches(layout, train.labels_RC, test.labels_RC)
    if not keep_C.any():
        raise TraitsaeError(
            f"no mask class of {layout.folder} labels any patch in both the train and the test "
            f"split under eval.patch_rule={opts.patch_rule}; try eval.patch_rule=any."
        )
    kept = np.flatnonzero(keep_C)
    train = _with_classes(train, kept)
    test = _with_classes(test, kept)
    names = [layout.classes[layout.class_ids[c]] for c in kept]
    ids = [layout.class_ids[c] for c in kept]
    scorers = build_methods(sae, reference, train, len(kept), opts)
    report = SegmentsReport([], [], skipped, [], _meta(opts, train, test, sae, names))
    per_values: dict[tuple[str, str], np.ndarray] = {}
    for scorer in scorers:
        _check_memory(scorer, train, test, opts)
        rows = _method_rows(scorer, train, test, opts)
        for metric in METRICS:
            per_values[(scorer.name, metric)] = rows[metric]
            report.summary.append(_summary(scorer, metric, rows[metric], opts))
        for c, (class_id, name) in enumerate(zip(ids, names, strict=True)):
            report.per_class.append(
                {"class_id": int(class_id), "class": name, "method": scorer.name}
                | {key: _number(values[c]) for key, values in rows.items()}
                | {
                    "n_pos_train": int(train.labels_RC[:, c].sum()),
                    "n_pos_test": int(test.labels_RC[:, c].sum()),
                }
            )
    report.paired_differences = _paired_differences(per_values, opts)
    return report


def _with_classes(split: SplitPatches, kept: np.ndarray) -> SplitPatches:
    return SplitPatches(**{**split.__dict__, "labels_RC": split.labels_RC[:, kept]})


def _classes_with_patches(
    layout: MaskLayout, labels_train_RC: np.ndarray, labels_test_RC: np.ndarray
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Classes with labelled patches in both splits; the others listed with the reason."""
    keep_C, skipped = units_with_positives(
        labels_train_RC.sum(0), labels_test_RC.sum(0), "labelled patches"
    )
    ids = layout.class_ids
    rows = [
        {"class_id": int(ids[c]), "class": layout.classes[ids[c]], **row}
        for c, row in skipped.items()
    ]
    return keep_C, rows


def _check_memory(
    scorer: Method, train: SplitPatches, test: SplitPatches, opts: SegmentsOptions
) -> None:
    n_rows = max(train.acts_RD.shape[0], test.acts_RD.shape[0])
    needed = n_rows * scorer.n_directions * 4
    if needed > opts.max_score_bytes:
        raise TraitsaeError(
            f"method {scorer.name}: {n_rows} patches x {scorer.n_directions} directions need "
            f"{needed / 2**30:.1f} GiB of scores, above eval.max_score_bytes="
            f"{opts.max_score_bytes}; lower eval.max_images or raise the limit."
        )


def _method_rows(
    scorer: Method, train: SplitPatches, test: SplitPatches, opts: SegmentsOptions
) -> dict[str, np.ndarray]:
    """Per class: the selected direction and its test metrics (and train AP / probe losses)."""
    y_train_RC, y_test_RC = train.labels_RC, test.labels_RC
    n_classes = y_train_RC.shape[1]
    s_train_RM = scorer.scores(train.acts_RD, opts.device)
    ap_train_MC = patch_metrics.average_precision(s_train_RM, y_train_RC)
    probes = patch_metrics.fit_probes_1d(
        s_train_RM, y_train_RC, opts.probe1d_l2, opts.probe1d_steps
    )
    loss_train_MC = patch_metrics.probe_loss(probes, s_train_RM, y_train_RC)
    classes_C = np.arange(n_classes)
    if scorer.per_class:
        best_C = classes_C
    elif opts.select_by == "ap":
        best_C = np.nanargmax(ap_train_MC, axis=0)
    else:
        best_C = np.nanargmin(loss_train_MC, axis=0)
    del s_train_RM
    s_test_RC = scorer.scores(test.acts_RD, opts.device)[:, best_C]  # column c: class c's pick
    diag = (classes_C, classes_C)
    logits_RC = probes.pair_logits(best_C, s_test_RC)
    loss_test_C = torch.nn.functional.binary_cross_entropy_with_logits(
        logits_RC, torch.from_numpy(y_test_RC).to(torch.float64), reduction="none"
    ).mean(0)
    return {
        "best_direction": best_C,
        "ap": patch_metrics.average_precision(s_test_RC, y_test_RC)[diag],
        "probe_ap": patch_metrics.average_precision(logits_RC, y_test_RC)[diag],
        "purity": patch_metrics.purity_at_k(s_test_RC, y_test_RC, opts.k)[diag],
        "coverage": patch_metrics.coverage_at_tau(s_test_RC, y_test_RC, opts.tau)[diag],
        "probe_loss": loss_test_C.numpy(),
        "probe_slope": probes.slope_MC[best_C, classes_C].numpy(),
        "train_ap": ap_train_MC[best_C, classes_C],
        "train_probe_loss": loss_train_MC[best_C, classes_C],
    }


def _number(value: Any) -> int | float:
    return int(value) if np.issubdtype(np.asarray(value).dtype, np.integer) else float(value)


def _summary(
    scorer: Method, metric: str, values_C: np.ndarray, opts: SegmentsOptions
) -> dict[str, Any]:
    low, high = bootstrap_ci(values_C, opts.n_bootstrap, opts.seed, opts.ci_level)
    return {
        "method": scorer.name,
        "metric": metric,
        "mean": float(np.mean(values_C)),
        "ci_low": low,
        "ci_high": high,
        "n_classes": int(len(values_C)),
        "n_directions": int(scorer.n_directions),
    }


def _paired_differences(
    per_values: dict[tuple[str, str], np.ndarray], opts: SegmentsOptions
) -> list[dict[str, Any]]:
    """SAE minus each other method per metric, with a paired bootstrap CI over classes."""
    rows = []
    for (name, metric), values_C in per_values.items():
        sae_C = per_values.get(("sae", metric))
        if name == "sae" or sae_C is None:
            continue
        difference = paired_difference(
            sae_C, values_C, opts.n_bootstrap, opts.seed, opts.ci_level, "classes"
        )
        rows.append({"method": name, "metric": metric} | difference)
    return rows


def _meta(
    opts: SegmentsOptions,
    train: SplitPatches,
    test: SplitPatches,
    sae: RawSpaceSAE,
    names: list[str],
) -> dict[str, Any]:
    n_patches = train.acts_RD.shape[0] // max(1, len(train.rows_N))
    return {
        "options": asdict(opts),
        "classes": names,
        "patches_per_image": int(n_patches),
        "sae": {k: sae.meta.get(k) for k in ("backbone", "dataset", "layer", "variant", "d_sae")},
        **{
            f"{split}_{key}": value
            for split, part in (("train", train), ("test", test))
            for key, value in (
                ("store", part.store_path),
                ("n_images", int(len(part.rows_N))),
                ("n_images_without_mask", part.n_without_mask),
                ("n_patches", int(part.acts_RD.shape[0])),
            )
        },
    }
