"""What eval=splice writes: splice.json, splice.csv, splice.png and the printed table."""

from __future__ import annotations

from typing import Any

from traitsae.evaluation.causal.forward import CONDITIONS
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
