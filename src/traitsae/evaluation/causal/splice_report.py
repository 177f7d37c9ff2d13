"""What eval=splice writes: splice.json, splice.csv, splice.png and the printed table."""

from __future__ import annotations

from typing import Any

from traitsae.evaluation.causal.forward import BASELINES, CONDITIONS
from traitsae.evaluation.core import figures
from traitsae.evaluation.core.outputs import write_csv, write_json


def write_outputs(result: dict[str, Any], out) -> None:
    write_json(out / "splice.json", result)
    columns = ["metric", *CONDITIONS, "recovered", "recovered_why"]
    write_csv(out / "splice.csv", columns, result["metrics"])
    rows = result["metrics"]
    meta = result["meta"]
    fig = figures.grouped_bars_with_ci(
        [r["metric"].replace("_", "\n") for r in rows],
        {c: [(r[c], r[c], r[c]) for r in rows] for c in CONDITIONS},
        title=f"{meta['backbone']} block {meta['layer']}: SAE spliced in ({meta['dataset']} "
        f"{meta['split']}, {meta['n_images']} images)",
        ylabel="value",
    )
    figures.save(fig, out / "splice.png")
    print(format_result(result))
    print(f"splice: outputs in {out}")


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{'metric':24s}" + "".join(f"{c:>14s}" for c in (*CONDITIONS, "recovered"))]
    for row in result["metrics"]:
        rec = "n/a*" if row["recovered"] is None else f"{row['recovered']:.3f}"
        lines.append(
            f"{row['metric']:24s}" + "".join(f"{row[c]:14.4f}" for c in CONDITIONS) + f"{rec:>14s}"
        )
    lines += [
        f"  * {row['metric']}: recovered n/a: {row['recovered_why']}"
        for row in result["metrics"]
        if row["recovered"] is None
    ]
    return "\n".join(lines)


def recovered(clean: float, spliced: float, ablated: float) -> float | None:
    """(spliced - ablated) / (clean - ablated); None when clean equals the ablation."""
    gap = clean - ablated
    return None if abs(gap) < 1e-12 else (spliced - ablated) / gap


def metric_rows(values: dict[str, dict[str, float]], baseline: str) -> list[dict[str, Any]]:
    """One row per metric: the value under each condition and the fraction recovered."""
    ablated = BASELINES[baseline]
    rows = []
    for metric, v in values.items():
        row = {
            "metric": metric,
            **{c: float(v[c]) for c in CONDITIONS},
            "recovered": recovered(v["clean"], v["spliced"], v[ablated]),
        }
        if row["recovered"] is None:
            row["recovered_why"] = (
                f"clean and {ablated} are equal ({v['clean']:.4g}): erasing the edited tokens "
                "does not change this metric, so there is nothing to recover"
            )
        rows.append(row)
    return rows
