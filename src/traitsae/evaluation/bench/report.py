"""eval=bench outputs: bench.json (everything), bench.csv (one row per SAE), bench_pareto.png
(trait score against FVU and against L0, each SAE numbered, coloured by origin), a table."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.evaluation.core import figures
from traitsae.evaluation.core.outputs import write_json

HEALTH = ("fvu", "l0", "dead_fraction", "dense_fraction", "mse", "n_tokens")


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i, sae in enumerate(result["saes"]):
        row = {"index": i, **{k: sae[k] for k in ("label", "origin", "config", "path")}}
        row.update({k: sae["health"][k] for k in HEALTH})
        traits = dict(sae["traits"])
        ci = traits.pop("r_precision_ci", None)
        if ci is not None:
            traits["r_precision_ci_low"], traits["r_precision_ci_high"] = ci
        rows.append(row | traits)
    return rows


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """bench.json, bench.csv and bench_pareto.png in `out` (each written under a temporary
    name, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "csv": out / "bench.csv", "png": out / "bench_pareto.png"}
    write_json(paths["json"], result)
    rows = csv_rows(result)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp = paths["csv"].with_name(paths["csv"].name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(paths["csv"])
    tmp_png = out / "bench_pareto.tmp.png"
    figures.save(pareto_figure(result), tmp_png).replace(paths["png"])
    return paths


def pareto_figure(result: dict[str, Any]):
    """Trait score (R-precision, or 1 - FVU without traits) against FVU and against L0."""
    plt = figures.plt
    saes = result["saes"]
    has_traits = all("r_precision" in s["traits"] for s in saes)
    score = [s["traits"]["r_precision"] if has_traits else 1 - s["health"]["fvu"] for s in saes]
    ylabel = "R-precision of its latents (test)" if has_traits else "1 - FVU"
    origins = sorted({s["origin"] for s in saes})
    colours = {o: plt.cm.tab10(i % 10) for i, o in enumerate(origins)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, xlabel in (
        (axes[0], "fvu", "FVU (fraction of variance unexplained)"),
        (axes[1], "l0", "L0 (active latents per token)"),
    ):
        x = np.array([s["health"][key] for s in saes], dtype=float)
        for n, o in enumerate(origins):  # a marker per origin, smaller on top: ties stay visible
            idx = [i for i, s in enumerate(saes) if s["origin"] == o]
            ax.scatter(x[idx], np.array(score)[idx], color=colours[o], label=o,
                       marker="osD^v"[n % 5], s=60 / (1 + n), zorder=3 + n)  # fmt: skip
        points: dict[tuple[float, float], list[str]] = {}
        for i, (xi, yi) in enumerate(zip(x, score, strict=True)):
            points.setdefault((float(xi), float(yi)), []).append(str(i))
        for (xi, yi), names in points.items():  # SAEs at the same point share one label
            ax.annotate(",".join(names), (xi, yi), xytext=(4, 4), textcoords="offset points",
                        fontsize=8)  # fmt: skip
        # The best trade-off: lower FVU / L0 and higher score; the frontier of (x, -score).
        front = figures.pareto_front(x, -np.asarray(score, dtype=float))
        order = np.argsort(x[front])
        ax.plot(x[front][order], np.asarray(score)[front][order], color="tab:red", lw=1, zorder=2)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.margins(0.12)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=8, title="origin", title_fontsize=8)
    key = "\n".join(f"{i}: {s['label']} ({s['origin']}, {s['config']})" for i, s in enumerate(saes))
    fig.text(0.01, -0.02, key, va="top", ha="left", fontsize=8, family="monospace", wrap=True)
    fig.tight_layout()
    return fig


def format_table(result: dict[str, Any]) -> str:
    rows = csv_rows(result)
    width = max([len("SAE")] + [len(f"{r['index']}: {r['label']}") for r in rows])
    head = f"{'SAE':<{width}} {'origin':<20} {'FVU':>7} {'L0':>8} {'dead':>6} {'R-prec':>7} {'probe':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        rp, probe = r.get("r_precision"), r.get("probe_bound_r_precision")
        lines.append(
            f"{str(r['index']) + ': ' + r['label']:<{width}} {r['origin']:<20} {r['fvu']:7.3f} "
            f"{r['l0']:8.2f} {r['dead_fraction']:6.1%} "
            f"{'-' if rp is None else f'{rp:7.3f}':>7} {'-' if probe is None else f'{probe:7.3f}':>7}"
        )
    for p in result["paired"]:
        lines.append(
            f"{p['a']} - {p['b']}: R-precision {p['a_minus_b']:+.3f} "
            f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] over {p['n_traits']} traits"
        )
    return "\n".join(lines)
