"""`eval=cub_traits`: do SAE latents find labelled traits better than cheap directions?

For every method (SAE latents, random unit directions, PCA components, k-means centroids,
per-trait linear probes) and every trait: precision@k of the best direction, selected on the
train split and reported on the test split (`select_on_train`), and, side by side, selected and
reported on the test split (`select_on_test`, the research notes' protocol, optimistic). Plus AP
of the selected direction, and summaries over traits with bootstrap confidence intervals.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from traitsae.data.images.cub_attributes import CubAttributes, load_cub_attributes
from traitsae.errors import TraitsaeError
from traitsae.evaluation import baselines, figures
from traitsae.evaluation.precision import (
    average_precision_pairs,
    bootstrap_ci,
    check_k,
    precision_at_k,
    select_best,
)
from traitsae.evaluation.scoring import (
    POOLS,
    Method,
    image_scores,
    linear_scorer,
    sae_scorer,
    valid_rows,
)

METHODS = ("sae", "random", "pca", "kmeans", "probe")
PROTOCOLS = ("select_on_train", "select_on_test")


@dataclass(frozen=True)
class Options:
    """The `eval.*` options of conf/eval/cub_traits.yaml (meanings documented there)."""

    k: list[int] = field(default_factory=lambda: [10, 50, 100])
    tau: float = 0.8
    certainty: list[int] = field(default_factory=lambda: [3, 4])
    pool: str = "max"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    n_samples: int = 100_000
    kmeans_clusters: int = 1024
    n_random: int | None = None  # None: as many as the SAE has latents
    pca_both_signs: bool = True
    probe_l2: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    probe_max_iter: int = 200
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    block: int = 2048
    device: str = "cpu"

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Options:
        ev = cfg.eval
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in OmegaConf.to_container(ev, resolve=True).items() if k in names}
        kwargs["device"] = cfg.get("device", "cpu")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.pool not in POOLS:
            raise TraitsaeError(f"eval.pool must be one of {POOLS}, got {self.pool!r}.")
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


@dataclass
class TraitReport:
    """Everything cub_traits.json holds; `summary` and `per_trait` rows follow DESIGN.md."""

    summary: list[dict[str, Any]]
    per_trait: list[dict[str, Any]]
    skipped_traits: list[dict[str, Any]]
    paired_differences: list[dict[str, Any]]
    meta: dict[str, Any]
    # Selection-split precision of each per_trait row (same order); CSV only, not in the contract.
    train_precision: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "per_trait": self.per_trait,
            "skipped_traits": self.skipped_traits,
            "paired_differences": self.paired_differences,
            "meta": self.meta,
        }


# ---------------------------------------------------------------- entry point


def run(cfg: DictConfig) -> TraitReport:
    """Hydra entry (`eval.entry`): evaluate, write JSON/CSV/PNG to the output dir, print a table."""
    from traitsae.evaluation.common import eval_stores, output_dir, resolve_sae

    opts = Options.from_cfg(cfg)
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


# ---------------------------------------------------------------- evaluation


def image_ids(store) -> np.ndarray:
    meta = store.metadata
    if "image_id" not in meta:
        raise TraitsaeError(
            f"store {store.path} has no images/image_id column (metadata columns: "
            f"{sorted(k for k in meta if k not in ('index', 'path', 'label', 'valid', 'error'))}); "
            "cub_traits needs a store extracted with dataset=cub or dataset=synthetic."
        )
    return meta["image_id"]


def build_methods(
    sae: torch.nn.Module,
    sample: baselines.TrainSample,
    labels_train_NT: np.ndarray,
    opts: Options,
) -> dict[str, Method]:
    """Every method's token scorer; baselines fit on the training sample."""
    d_model = sample.tokens_SD.shape[1]
    d_sae = int(sae.meta.get("d_sae", getattr(sae, "d_sae", 0)))
    methods: dict[str, Method] = {}

    def add_linear(name: str, dirs_MD: np.ndarray) -> None:
        scorer = linear_scorer(torch.from_numpy(dirs_MD).to(opts.device))
        methods[name] = Method(name, scorer, dirs_MD.shape[0], opts.pool)

    for name in opts.methods:
        if name == "sae":
            methods[name] = Method(name, sae_scorer(sae), d_sae, opts.pool)
        elif name == "random":
            add_linear(
                name, baselines.random_directions(d_model, opts.n_random or d_sae, opts.seed)
            )
        elif name == "pca":
            add_linear(
                name, baselines.pca_directions(sample.tokens_SD, opts.pca_both_signs, opts.seed)
            )
        elif name == "kmeans":
            add_linear(
                name, baselines.kmeans_directions(sample.tokens_SD, opts.kmeans_clusters, opts.seed)
            )
        elif name == "probe":
            w_TD, b_T = baselines.linear_probes(
                sample.pooled_ND,
                labels_train_NT,
                opts.probe_l2,
                opts.probe_max_iter,
                seed=opts.seed,
            )
            # Probes were fit on mean-pooled activations; the mean of per-token logits equals the
            # logit of the mean, so mean pooling scores images exactly as the probe was trained.
            w_TD, b_T = torch.from_numpy(w_TD), torch.from_numpy(b_T)
            scorer = linear_scorer(w_TD.to(opts.device), b_T.to(opts.device))
            methods[name] = Method(name, scorer, w_TD.shape[0], "mean")
    return methods


def evaluate_traits(
    sae: torch.nn.Module, train_store, test_store, attrs: CubAttributes, opts: Options
) -> TraitReport:
    """All methods x traits x k x protocols, on already opened and checked stores."""
    layer = int(sae.meta["layer"])
    tokens = str(sae.meta.get("tokens", "patches"))
    # Labels first: traits without positives in either split are dropped before anything is fit.
    rows_train, rows_test = valid_rows(train_store), valid_rows(test_store)
    labels_train_NT = attrs.labels(image_ids(train_store)[rows_train], opts.certainty)
    labels_test_NT = attrs.labels(image_ids(test_store)[rows_test], opts.certainty)
    ks = check_k(opts.k, len(rows_train), f"the train split ({train_store.path})")
    check_k(ks, len(rows_test), f"the test split ({test_store.path})")
    keep_T, skipped = _traits_with_positives(attrs.names, labels_train_NT, labels_test_NT)
    if not keep_T.any():
        raise TraitsaeError(
            "no trait has positives in both the train and the test split with certainty in "
            f"{opts.certainty}; check eval.certainty and the attribute files."
        )
    kept = np.flatnonzero(keep_T)
    labels_train_NT, labels_test_NT = labels_train_NT[:, kept], labels_test_NT[:, kept]

    sample = baselines.sample_train_activations(
        train_store, layer, tokens, opts.n_samples, opts.seed
    )
    # The probes are fit on sample.pooled_ND with labels_train_NT: same rows, same order.
    assert np.array_equal(sample.rows_N, rows_train)
    methods = build_methods(sae, sample, labels_train_NT, opts)
    scores_train, _ = image_scores(train_store, layer, methods, tokens, opts.device)
    scores_test, _ = image_scores(test_store, layer, methods, tokens, opts.device)

    report = TraitReport([], [], skipped, [], _meta(opts, train_store, test_store, sae, len(kept)))
    per_values: dict[tuple[str, str, int], np.ndarray] = {}
    n_pos_T = labels_test_NT.sum(0)
    for name, method in methods.items():
        rows = _method_rows(
            name,
            scores_train[name],
            scores_test[name],
            labels_train_NT,
            labels_test_NT,
            ks,
            opts,
        )
        for protocol, k, best_T, prec_T, train_prec_T, ap_T in rows:
            per_values[(name, protocol, k)] = prec_T
            report.summary.append(
                _summary(name, protocol, k, prec_T, ap_T, method.n_directions, opts)
            )
            for i, t in enumerate(kept):
                report.per_trait.append(
                    {
                        "trait": attrs.names[t],
                        "method": name,
                        "protocol": protocol,
                        "k": k,
                        "best_direction": int(best_T[i]),
                        "precision": float(prec_T[i]),
                        "ap": float(ap_T[i]),
                        "n_pos": int(n_pos_T[i]),
                    }
                )
                report.train_precision.append(float(train_prec_T[i]))
    report.paired_differences = _paired_differences(per_values, opts)
    return report


def _traits_with_positives(
    names: list[str], labels_train_NT: np.ndarray, labels_test_NT: np.ndarray
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Traits usable in both splits; the others listed with the reason (not NaNs in a mean)."""
    pos_train_T, pos_test_T = labels_train_NT.sum(0), labels_test_NT.sum(0)
    keep_T = (pos_train_T > 0) & (pos_test_T > 0)
    skipped = [
        {
            "trait": names[t],
            "n_pos_train": int(pos_train_T[t]),
            "n_pos_test": int(pos_test_T[t]),
            "reason": "no positives in the "
            + " and ".join(
                s for s, n in (("train", pos_train_T[t]), ("test", pos_test_T[t])) if n == 0
            )
            + " split",
        }
        for t in np.flatnonzero(~keep_T)
    ]
    return keep_T, skipped


def _method_rows(
    name: str,
    scores_train_NM: np.ndarray,
    scores_test_NM: np.ndarray,
    labels_train_NT: np.ndarray,
    labels_test_NT: np.ndarray,
    ks: list[int],
    opts: Options,
):
    """(protocol, k, best [T], test precision [T], train precision [T], test AP [T]) rows."""
    n_traits = labels_test_NT.shape[1]
    if name == "probe":
        # Probe t is trained for trait t: nothing to select, and only the diagonal is needed.
        diag_T = np.arange(n_traits)
        prec_train = precision_at_k(scores_train_NM, labels_train_NT, ks)
        prec_test = precision_at_k(scores_test_NM, labels_test_NT, ks)
        ap_T = average_precision_pairs(scores_test_NM, labels_test_NT, diag_T, diag_T)
        for k in ks:
            for protocol in PROTOCOLS:
                yield (
                    protocol,
                    k,
                    diag_T,
                    prec_test[k][diag_T, diag_T],
                    prec_train[k][diag_T, diag_T],
                    ap_T,
                )
        return
    prec_train = precision_at_k(scores_train_NM, labels_train_NT, ks, opts.block)
    prec_test = precision_at_k(scores_test_NM, labels_test_NT, ks, opts.block)
    traits_T = np.arange(n_traits)
    for k in ks:
        best_on_train_T, train_prec_T = select_best(prec_train[k])
        best_on_test_T, _ = select_best(prec_test[k])
        for protocol, best_T in (
            ("select_on_train", best_on_train_T),
            ("select_on_test", best_on_test_T),
        ):
            ap_T = average_precision_pairs(scores_test_NM, labels_test_NT, best_T, traits_T)
            yield (
                protocol,
                k,
                best_T,
                prec_test[k][best_T, traits_T],
                prec_train[k][best_T, traits_T],
                ap_T,
            )


def _summary(
    method: str,
    protocol: str,
    k: int,
    prec_T: np.ndarray,
    ap_T: np.ndarray,
    n_dirs: int,
    opts: Options,
) -> dict[str, Any]:
    low, high = bootstrap_ci(prec_T, opts.n_bootstrap, opts.seed, opts.ci_level)
    return {
        "method": method,
        "protocol": protocol,
        "k": int(k),
        "mean_precision": float(prec_T.mean()),
        "recall_at_tau": float((prec_T >= opts.tau).mean()),
        "tau": float(opts.tau),
        "mean_ap": float(np.nanmean(ap_T)),
        "ci_low": low,
        "ci_high": high,
        "n_directions": int(n_dirs),
    }


def _paired_differences(
    per_values: dict[tuple[str, str, int], np.ndarray], opts: Options
) -> list[dict[str, Any]]:
    """SAE minus each other method, per protocol and k, with a paired bootstrap CI over traits."""
    rows = []
    for (name, protocol, k), prec_T in per_values.items():
        sae_T = per_values.get(("sae", protocol, k))
        if name == "sae" or sae_T is None:
            continue
        diff_T = sae_T - prec_T
        low, high = bootstrap_ci(diff_T, opts.n_bootstrap, opts.seed, opts.ci_level)
        rows.append(
            {
                "method": name,
                "protocol": protocol,
                "k": k,
                "sae_minus_method": float(diff_T.mean()),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return rows


def _meta(opts: Options, train_store, test_store, sae, n_traits: int) -> dict[str, Any]:
    return {
        "options": asdict(opts),
        "train_store": str(train_store.path),
        "test_store": str(test_store.path),
        "n_images_train": int(np.asarray(train_store.metadata["valid"]).sum()),
        "n_images_test": int(np.asarray(test_store.metadata["valid"]).sum()),
        "n_traits_evaluated": n_traits,
        "sae": {
            k: sae.meta.get(k)
            for k in ("backbone", "dataset", "layer", "tokens", "variant", "d_sae")
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
    "recall_at_tau",
    "n_recalled",
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
    "best_direction",
    "precision",
    "train_precision",
    "ap",
    "n_pos",
]


def write_outputs(report: TraitReport, out: Path) -> dict[str, Path]:
    """cub_traits.json, CSV tables and PNG figures in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "cub_traits.json"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2))
    n_traits = report.meta["n_traits_evaluated"]
    summary_rows = [
        {**row, "n_recalled": round(row["recall_at_tau"] * n_traits), "n_traits": n_traits}
        for row in report.summary
    ]
    per_trait_rows = [
        {**row, "train_precision": train}
        for row, train in zip(report.per_trait, report.train_precision, strict=True)
    ]
    paths["summary_csv"] = _write_csv(
        out / "cub_traits_summary.csv", SUMMARY_CSV_FIELDS, summary_rows
    )
    paths["per_trait_csv"] = _write_csv(
        out / "cub_traits_per_trait.csv", PER_TRAIT_CSV_FIELDS, per_trait_rows
    )
    paths["skipped_csv"] = _write_csv(
        out / "cub_traits_skipped.csv",
        ["trait", "n_pos_train", "n_pos_test", "reason"],
        report.skipped_traits,
    )
    paths["differences_csv"] = _write_csv(
        out / "cub_traits_differences.csv",
        ["method", "protocol", "k", "sae_minus_method", "ci_low", "ci_high"],
        report.paired_differences,
    )
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
    return list(dict.fromkeys(row["method"] for row in report.summary))


def method_comparison_figure(report: TraitReport):
    """Mean precision@k per method (bars) with bootstrap CIs, one panel per protocol."""
    ks = sorted({row["k"] for row in report.summary})
    fig, axes = figures.subplots(len(PROTOCOLS), width=1.6 + 1.6 * len(ks))
    for ax, protocol in zip(axes, PROTOCOLS, strict=True):
        series = {}
        for method in _methods_in(report):
            by_k = {
                r["k"]: r
                for r in report.summary
                if r["method"] == method and r["protocol"] == protocol
            }
            series[method] = [
                (by_k[k]["mean_precision"], by_k[k]["ci_low"], by_k[k]["ci_high"]) for k in ks
            ]
        figures.grouped_bars_with_ci(
            [f"k={k}" for k in ks],
            series,
            title=protocol.replace("_", " "),
            ylabel="mean precision@k over traits",
            ax=ax,
        )
    return fig


def precision_distribution_figure(report: TraitReport):
    """Per-trait precision@k distribution per method (select_on_train), one panel per k."""
    ks = sorted({row["k"] for row in report.summary})
    fig, axes = figures.subplots(len(ks))
    tau = report.summary[0]["tau"]
    for ax, k in zip(axes, ks, strict=True):
        values = {
            m: np.array(
                [
                    r["precision"]
                    for r in report.per_trait
                    if r["method"] == m and r["k"] == k and r["protocol"] == "select_on_train"
                ]
            )
            for m in _methods_in(report)
        }
        figures.distributions(
            values,
            title=f"precision@{k} per trait (selected on train)",
            ylabel="precision on test",
            ax=ax,
            reference=tau,
        )
    return fig


def format_table(report: TraitReport) -> str:
    """The short table printed at the end of a run."""
    level = int(round(report.meta["options"]["ci_level"] * 100))
    tau = report.meta["options"]["tau"]
    head = (
        f"{'method':<8} {'protocol':<16} {'k':>4}  {'mean P@k':>8}  {f'{level}% CI':<15} "
        f"{f'recall@{tau:g}':>16}  {'mean AP':>7}  {'dirs':>6}"
    )
    lines = [head, "-" * len(head)]
    n_traits = report.meta["n_traits_evaluated"]
    for r in sorted(report.summary, key=lambda r: (r["protocol"] != "select_on_train", r["k"])):
        recall = f"{r['recall_at_tau']:.3f} ({round(r['recall_at_tau'] * n_traits)}/{n_traits})"
        lines.append(
            f"{r['method']:<8} {r['protocol']:<16} {r['k']:>4}  {r['mean_precision']:>8.3f}  "
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  "
            f"{recall:>16}  "
            f"{r['mean_ap']:>7.3f}  {r['n_directions']:>6}"
        )
    lines.append(
        f"{n_traits} traits evaluated, {len(report.skipped_traits)} skipped (no positives)"
    )
    for s in report.skipped_traits[:10]:
        lines.append(f"  skipped {s['trait']}: {s['reason']}")
    if len(report.skipped_traits) > 10:
        lines.append(f"  ... and {len(report.skipped_traits) - 10} more (cub_traits_skipped.csv)")
    return "\n".join(lines)
