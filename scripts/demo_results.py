"""Write docs/guide/demo.md from the JSON outputs of `make demo`, so that no demo number in the
docs is typed by hand.

    make demo
    .venv/bin/python scripts/demo_results.py            # runs eval=segments, key, audit if missing

Reads `<demo>/cub_traits/cub_traits.json`, `<demo>/discovery/discovery.json`,
`<demo>/segments/segments.json`, `<demo>/key/key.json`, `<demo>/audit/audit.json` and
`<demo>/steer/steer.json`, and names
the machine and commit the numbers come from (float arithmetic differs between CPUs, so they
move slightly from one machine to another).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "select_on_train"


def ci(row: dict[str, Any], value: str) -> str:
    return f"{row[value]:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def signed_ci(row: dict[str, Any], value: str) -> str:
    return f"{row[value]:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cub_traits_section(report: dict[str, Any], k: int = 10) -> str:
    at_k = {
        r["method"]: r
        for r in report["summary"]
        if r["protocol"] == PROTOCOL and r["k"] == k and r.get("mean_precision") is not None
    }
    r_prec = {r["method"]: r for r in report["r_precision"]["summary"] if r["protocol"] == PROTOCOL}
    rows = [
        [
            method,
            ci(at_k[method], "mean_precision") if method in at_k else "—",
            ci(r_prec[method], "mean_r_precision") if method in r_prec else "—",
            str(at_k.get(method, r_prec.get(method, {})).get("n_directions", "—")),
        ]
        for method in dict.fromkeys([*at_k, *r_prec])
    ]
    differences = [
        [
            d["method"],
            "R-precision" if d["metric"] == "r_precision" else f"P@{d['k']}",
            signed_ci(d, "sae_minus_method"),
            "yes" if d["excludes_zero"] else "no",
        ]
        for d in report["paired_differences"]
        if d["protocol"] == PROTOCOL and d["k"] in (None, k)
    ]
    return (
        "## cub_traits: the planted traits\n\n"
        f"`{PROTOCOL}`, mean over `eval.seeds`, 95 % bootstrap CI over the traits. `probe` is the\n"
        "supervised upper bound; `sae_init` the same SAE before training.\n\n"
        + table(["method", f"P@{k}", "R-precision", "directions"], rows)
        + "\nThe trained SAE minus each method, paired over the same traits:\n\n"
        + table(["method", "metric", "SAE − method", "CI excludes 0"], differences)
    )


def own_group(auroc: float | None, group: str) -> str:
    """discovery.json's AUROCs are A vs B; a group-B candidate reads the right way round as 1 − it."""
    if auroc is None:
        return "—"
    return f"{auroc if group == 'a' else 1.0 - auroc:.2f}"


def discovery_section(report: dict[str, Any], top: int = 3) -> str:
    groups = report.get("groups", {})
    lines = [
        "## discovery: what separates the two demo species\n",
        "Groups: "
        + ", ".join(f"{k} = {g['name']} ({g['n_images']} images)" for k, g in groups.items())
        + "; "
        f"{report.get('tested', '—')} latents tested, {report.get('n_permutations', '—')} "
        f"permutations, FDR level {report.get('alpha', '—')}.\n",
    ]
    verdict = report.get("verdict")
    if isinstance(verdict, dict):
        lines += [f"- group {g}: {sentence}" for g, sentence in verdict.items()]
        lines.append("")
    rows = []
    for group in ("a", "b"):
        candidates = [c for c in report["candidates"] if c["group"] == group][:top]
        rows += [
            [
                group,
                str(c["rank"]),
                str(c["latent"]),
                own_group(c["auroc"], group),
                f"{c['p_value']:.3g}",
                f"{c['q_value']:.3g}",
                "yes" if c.get("confirmed") else "no",
                own_group(c.get("confirm_auroc"), group),
            ]
            for c in candidates
        ]
    header = ["group", "rank", "latent", "AUROC", "p", "q", "confirmed", "held-out AUROC"]
    note = (
        "\nAUROCs are each candidate's own group against the other (0.5 = no difference, 1 = "
        "every image of its group scores above every image of the other).\n"
    )
    return "\n".join(lines) + "\n" + table(header, rows) + note


def segments_section(report: dict[str, Any]) -> str:
    by_method: dict[str, dict[str, str]] = {}
    for row in report["summary"]:
        by_method.setdefault(row["method"], {})[row["metric"]] = ci(row, "mean")
    metrics = ["ap", "probe_ap", "purity", "coverage"]
    rows = [[m, *(values.get(x, "—") for x in metrics)] for m, values in by_method.items()]
    return (
        "## segments: patches against the planted-trait masks\n\n"
        "Test split, mean over mask classes, 95 % bootstrap CI over classes.\n\n"
        + table(["method", *metrics], rows)
    )


def key_section(report: dict[str, Any]) -> str:
    meta, methods = report["meta"], report["methods"]
    budgets = sorted({r["n_latents"] for m in methods.values() for r in m["budgets"]})
    rows = [
        [
            name,
            *(ci(next((r for r in m["budgets"] if r["n_latents"] == n), {}), "accuracy")
              if any(r["n_latents"] == n for r in m["budgets"]) else "—" for n in budgets),
            ci(m["tree_accuracy"], "accuracy"),
        ]
        for name, m in methods.items()
    ]  # fmt: skip
    differences = [
        [d["method"], d["key"], signed_ci(d, "sae_minus_method"), "yes" if d["excludes_zero"] else "no"]
        for d in report["differences"]
        if d["method"] == "sae_init"
    ]  # fmt: skip
    dense = report["dense_probe"]
    return (
        f"## key: {meta['class_column']} from a few latents\n\n"
        f"Held-out accuracy on {meta['n_test']} test images ({len(meta['classes'])} classes, "
        f"chance {1 / len(meta['classes']):.3f}), 95 % bootstrap CI over the images. `n=k`: the "
        f"first k latents to enter the L1 path, refit; `tree`: depth <= "
        f"{meta['options']['max_depth']}. The dense probe on every raw dimension: "
        f"{ci(dense, 'accuracy')}.\n\n"
        + table(["method", *(f"n={n}" for n in budgets), "tree"], rows)
        + "\nThe trained SAE minus its initialisation, paired over the same test images:\n\n"
        + table(["method", "key", "SAE − method", "CI excludes 0"], differences)
    )


def audit_section(report: dict[str, Any]) -> str:
    meta, methods, null = report["meta"], report["methods"], report["null"]
    budgets = sorted({r["budget"] for m in methods.values() for r in m["yields"]})
    rows = [
        [
            name,
            *(next((f"{r['yield']:.2f}" for r in m["yields"] if r["budget"] == b), "—")
              for b in budgets),
            f"{m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]",
            f"{m['n_grounded_all']}/{m['n_directions']}",
        ]
        for name, m in methods.items()
    ]  # fmt: skip
    options = meta["options"]
    lines = (
        f"## audit: proposals for {options['class_column']} grounded in the masks\n\n"
        f"Proposer `{options['propose']}` on the train split; a proposal is grounded when its "
        f"best-class patch AP reaches {options['tau']} on {meta['n_audited_images']} held-out "
        "masked images. AUC: 95 % bootstrap CI over those images; `grounded`: the method's "
        "directions with AP >= tau, proposed or not.\n\n"
    )
    if null:
        lines += (
            f"Permutation null ({null['n_permutations']} label shuffles, re-proposed and "
            f"re-audited): observed AUC {null['observed_auc']:.3f}, p = {null['p_value']:.3g}.\n\n"
        )
    return lines + table(["method", *(f"Y({b})" for b in budgets), "AUC", "grounded"], rows)


def steer_section(report: dict[str, Any]) -> str:
    meta, verdict, readout = report["meta"], report["verdict"], report["readout"]
    target = report["target_class"]
    rows = [
        [
            f"{p['alpha']:g}",
            f"{p['mean_p_target']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]",
            f"{p['control_mean_p_target']:.3f}" if "control_mean_p_target" in p else "—",
            signed_ci({"d": p["difference"], "ci_low": p["difference_ci"][0],
                       "ci_high": p["difference_ci"][1]}, "d") if "difference" in p else "—",
            f"{p['frac_top1_target']:.3f}",
        ]
        for p in report["curve"]
    ]  # fmt: skip
    verdict_line = (
        f"Rises at every alpha: {'yes' if verdict['monotonic'] else 'no'}; beats the control at "
        f"every alpha > 0: {'yes' if verdict['beats_control'] else 'no'}; the probe reads "
        f"{target} on held-out images: {'yes' if verdict['readout_informative'] else 'no'} "
        f"(mean p on clean {target} images {readout['p_target_on_target']:.3f} vs "
        f"{readout['p_target_on_source']:.3f} on the source images, difference "
        f"{readout['difference']:+.3f} [{readout['difference_ci'][0]:+.3f}, "
        f"{readout['difference_ci'][1]:+.3f}]). Evidence: "
        f"**{'yes' if verdict['evidence'] else 'no'}**.\n"
    )
    notes = "".join(f"\n- {note}" for note in report.get("notes", []))
    return (
        f"## steer: {target}'s latents on held-out images of the other classes\n\n"
        f"`{meta['backbone']}`, SAE at block {meta['layer']} of {meta['depth']}, latents "
        f"{report['latents']} (chosen on the {meta['train_split']} split); "
        f"{report['n_images']} {meta['split']} images. Mean p({target}) with its 95 % CI over the "
        f"images; control: {report['control']['n_sets']} sets of frequency-matched random latents "
        "at equal norm, and the paired difference per image.\n\n"
        + table(["alpha", "mean p(target)", "control", "difference", "top-1 = target"], rows)
        + "\n"
        + verdict_line
        + (notes + "\n" if notes else "")
    )


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return model


def commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def render(demo: Path) -> str:
    sections = [
        "# What the demo shows\n",
        "Generated by `scripts/demo_results.py` from the outputs of `make demo` "
        f"({datetime.date.today().isoformat()}, commit {commit()}, {machine()}). "
        "How to read each table: [cub_traits](cub_traits.md), [discovery](discovery.md), "
        "[segments](segments.md), [key](key.md), [audit](audit.md), [steer](causal.md).\n",
    ]
    readers = [
        ("cub_traits/cub_traits.json", cub_traits_section),
        ("discovery/discovery.json", discovery_section),
        ("segments/segments.json", segments_section),
        ("key/key.json", key_section),
        ("audit/audit.json", audit_section),
        ("steer/steer.json", steer_section),
    ]
    for name, section in readers:
        path = demo / name
        if path.exists():
            sections.append(section(json.loads(path.read_text())))
    return "\n".join(sections)


def run_missing(demo: Path) -> None:
    """eval=segments, key and audit are not part of `make demo`; run each on the demo's SAE
    when its output is missing."""
    for name in ("segments", "key", "audit"):
        if (demo / name / f"{name}.json").exists():
            continue
        subprocess.run(
            [
                sys.executable,
                "evaluate.py",
                f"eval={name}",
                "dataset=synthetic",
                f"run={demo / 'train'}",
                f"paths.activations_dir={demo / 'activations'}",
                f"hydra.run.dir={demo / name}",
            ],
            cwd=ROOT,
            check=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "logs" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "guide" / "demo.md")
    parser.add_argument("--no-run", action="store_true", help="only read what exists")
    args = parser.parse_args()
    if not (args.demo / "cub_traits" / "cub_traits.json").exists():
        sys.exit(f"error: no demo outputs under {args.demo}: run `make demo` first.")
    if not args.no_run:
        run_missing(args.demo)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(render(args.demo))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
