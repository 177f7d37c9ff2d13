"""What eval=cub_traits writes: cub_traits.json, the CSV tables, two figures, the printed table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.evaluation.core import figures
from traitsae.evaluation.core.outputs import write_csv, write_json
from traitsae.evaluation.traits.options import METHODS
from traitsae.evaluation.traits.selection import PROTOCOLS, Key, R


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
    write_json(paths["json"], report.to_json())
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
        paths[f"{name}_csv"] = write_csv(out / f"cub_traits_{name}.csv", fields, rows)
    paths["methods_png"] = figures.save(
        method_comparison_figure(report), out / "cub_traits_methods.png"
    )
    paths["distribution_png"] = figures.save(
        precision_distribution_figure(report), out / "cub_traits_precision_distribution.png"
    )
    return paths


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
