"""Outputs of `eval=segments`: segments.json, CSV tables, a PNG, and the printed table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from traitsae.evaluation.core import figures
from traitsae.evaluation.core.outputs import write_csv, write_json

METRICS = ("ap", "probe_ap", "purity", "coverage")


@dataclass
class SegmentsReport:
    """Everything segments.json holds."""

    summary: list[dict[str, Any]]
    per_class: list[dict[str, Any]]
    skipped_classes: list[dict[str, Any]]
    paired_differences: list[dict[str, Any]]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PER_CLASS_FIELDS = [
    "class_id", "class", "method", "best_direction", "ap", "probe_ap", "purity", "coverage",
    "probe_loss", "probe_slope", "train_ap", "train_probe_loss", "n_pos_train", "n_pos_test",
]  # fmt: skip
METRIC_LABELS = {
    "ap": "AP",
    "probe_ap": "1-D probe AP",
    "purity": "purity@k",
    "coverage": "coverage@tau",
}


def write_outputs(report: SegmentsReport, out: Path) -> dict[str, Path]:
    """segments.json, segments_{summary,per_class,skipped,differences}.csv, segments_methods.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "segments.json"}
    write_json(paths["json"], report.to_json())
    tables = {
        "summary": (
            ["method", "metric", "mean", "ci_low", "ci_high", "n_classes", "n_directions"],
            report.summary,
        ),
        "per_class": (PER_CLASS_FIELDS, report.per_class),
        "skipped": (
            ["class_id", "class", "n_pos_train", "n_pos_test", "reason"],
            report.skipped_classes,
        ),
        "differences": (
            ["method", "metric", "sae_minus_method", "ci_low", "ci_high", "excludes_zero"],
            report.paired_differences,
        ),
    }
    for name, (fields, rows) in tables.items():
        paths[f"{name}_csv"] = write_csv(out / f"segments_{name}.csv", fields, rows)
    paths["methods_png"] = figures.save(methods_figure(report), out / "segments_methods.png")
    return paths


def _methods(report: SegmentsReport) -> list[str]:
    return list(dict.fromkeys(row["method"] for row in report.summary))


def _row(report: SegmentsReport, method: str, metric: str) -> dict[str, Any]:
    return next(r for r in report.summary if r["method"] == method and r["metric"] == metric)


def methods_figure(report: SegmentsReport):
    """Mean over classes of each metric (groups) per method (bars), with bootstrap CIs."""
    opts = report.meta["options"]
    labels = {
        **METRIC_LABELS,
        "purity": f"purity@{opts['k']}",
        "coverage": f"coverage@{opts['tau']:g}",
    }
    series = {
        method: [
            (
                _row(report, method, m)["mean"],
                _row(report, method, m)["ci_low"],
                _row(report, method, m)["ci_high"],
            )
            for m in METRICS
        ]
        for method in _methods(report)
    }
    n_classes = len(report.meta["classes"])
    return figures.grouped_bars_with_ci(
        [labels[m] for m in METRICS],
        series,
        title=f"patch-level traits ({n_classes} classes, best direction selected on train)",
        ylabel="mean over classes (test split)",
    )


def format_table(report: SegmentsReport) -> str:
    """The short table printed at the end of a run."""
    opts = report.meta["options"]
    level = int(round(opts["ci_level"] * 100))
    names = {**METRIC_LABELS, "purity": f"purity@{opts['k']}", "coverage": f"cover@{opts['tau']:g}"}
    head = f"{'method':<10}" + "".join(f"{names[m]:>26}" for m in METRICS) + f"{'dirs':>7}"
    lines = [f"mean over classes, test split, {level}% bootstrap CI over classes", head]
    lines.append("-" * len(head))
    for method in _methods(report):
        cells = []
        for metric in METRICS:
            r = _row(report, method, metric)
            cells.append(f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]".rjust(26))
        n_dirs = _row(report, method, METRICS[0])["n_directions"]
        lines.append(f"{method:<10}" + "".join(cells) + f"{n_dirs:>7}")
    for d in report.paired_differences:
        if d["metric"] == "ap":
            mark = "CI excludes 0" if d["excludes_zero"] else "CI includes 0"
            lines.append(
                f"  AP: sae - {d['method']:<9} {d['sae_minus_method']:+.3f} "
                f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]  {mark}"
            )
    meta = report.meta
    lines.append(
        f"{len(meta['classes'])} classes evaluated on {meta['test_n_images']} test images "
        f"({meta['test_n_patches']} patches, rule {opts['patch_rule']}); selection on "
        f"{meta['train_n_images']} train images by {opts['select_by']}; "
        f"{len(report.skipped_classes)} classes skipped"
    )
    for s in report.skipped_classes:
        lines.append(f"  skipped {s['class']}: {s['reason']}")
    left_out = meta["train_n_images_without_mask"] + meta["test_n_images_without_mask"]
    if left_out:
        lines.append(f"  {left_out} valid images have no mask and were left out")
    return "\n".join(lines)


__all__ = ["format_table", "methods_figure", "write_outputs"]
