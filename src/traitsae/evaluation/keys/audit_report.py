"""eval=audit's outputs: audit.json, CSV tables and the yield-curve figure; the printed table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traitsae.evaluation.core import figures
from traitsae.evaluation.core.outputs import write_json
from traitsae.evaluation.keys.key_report import _write_csv
from traitsae.evaluation.keys.results import AuditResult


def write_outputs(result: AuditResult, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out / "audit.json", result.to_json())}
    yields = [{"method": n, **row} for n, m in result.methods.items() for row in m.yields]
    proposals = [{"method": n, **row} for n, m in result.methods.items() for row in m.proposals]
    paths["yields_csv"] = _write_csv(
        out / "audit_yields.csv",
        ["method", "budget", "yield", "ci_low", "ci_high", "n_grounded"],
        yields,
    )
    paths["proposals_csv"] = _write_csv(
        out / "audit_proposals.csv",
        ["method", "rank", "direction", "best_ap", "best_class", "grounded"],
        proposals,
    )
    paths["png"] = figures.save(yield_figure(result), out / "audit_yield.png")
    return paths


def yield_figure(result: AuditResult):
    """Yield(B) per method with bootstrap CIs; the SAE's permutation null as a band."""
    fig, ax = figures.plt.subplots(figsize=(6.0, 4.0))
    for i, (name, m) in enumerate(result.methods.items()):
        b = np.array([r["budget"] for r in m.yields])
        y = np.array([r["yield"] for r in m.yields])
        err = np.stack([y - [r["ci_low"] for r in m.yields], [r["ci_high"] for r in m.yields] - y])
        ax.errorbar(b, y, yerr=err.clip(min=0), fmt="o-", color=f"C{i}", capsize=3, ms=4,
                    label=f"{name} (AUC {m.auc:.2f})")  # fmt: skip
    if result.null:
        budgets = [int(b) for b in result.null["null_yields_mean"]]
        ax.plot(budgets, list(result.null["null_yields_mean"].values()), "k--", lw=1,
                label=f"SAE, shuffled labels (p = {result.null['p_value']:.3g})")  # fmt: skip
        ax.fill_between(budgets, 0, list(result.null["null_yields_q95"].values()), color="k",
                        alpha=0.08, label="null 95% quantile")  # fmt: skip
    tau = result.meta["options"]["tau"]
    ax.set_xscale("log")
    ax.set_xlabel("budget B (top proposals audited)")
    ax.set_ylabel(f"Yield(B): fraction with best-class AP >= {tau:g}")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"propose ({result.meta['options']['propose']}) - audit on masks")
    ax.legend(fontsize="x-small")
    return fig


def format_table(result: AuditResult) -> str:
    budgets = sorted({r["budget"] for m in result.methods.values() for r in m.yields})
    opts = result.meta["options"]
    head = (
        f"{'method':<9}" + "".join(f"{f'Y({b})':>8}" for b in budgets)
        + f"{'AUC':>7}{'AUC CI':>16}{'grounded':>10}"
    )  # fmt: skip
    lines = [
        f"Yield(B): proposals ({opts['propose']}, {opts['class_column']}) with best-class patch "
        f"AP >= {opts['tau']:g} on {result.meta['n_audited_images']} held-out masked images",
        head,
        "-" * len(head),
    ]
    for name, m in result.methods.items():
        by_b = {r["budget"]: r["yield"] for r in m.yields}
        cells = "".join(f"{by_b[b]:>8.3f}" if b in by_b else f"{'-':>8}" for b in budgets)
        lines.append(
            f"{name:<9}{cells}{m.auc:>7.3f}  [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}]"
            f"{f'{m.n_grounded_all}/{m.n_directions}':>10}"
        )
    lines.append(
        "CI: percentile bootstrap over the audited images; grounded: directions of the method "
        "with AP >= tau, proposed or not."
    )
    if result.null:
        n = result.null
        lines.append(
            f"permutation null (SAE, labels shuffled within strata {n['strata'] or '-'}, "
            f"{n['n_permutations']} draws): observed AUC {n['observed_auc']:.3f}, null mean "
            f"{np.mean(n['null_auc']):.3f}, p = {n['p_value']:.3g}"
        )
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
