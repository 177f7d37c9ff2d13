"""eval=key's outputs: key.json, CSV tables, the accuracy curves and key.html (the drawn key)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.data.store import Store
from traitsae.evaluation.core import figures
from traitsae.evaluation.core.figures import Panel, plot_panel_rows
from traitsae.evaluation.core.frames import ImageSource
from traitsae.evaluation.core.outputs import write_json
from traitsae.evaluation.core.report import Card, Section, write_report
from traitsae.evaluation.core.tokens import gather_codes
from traitsae.evaluation.keys import sparse
from traitsae.evaluation.keys.results import KeyResult
from traitsae.sae.export import RawSpaceSAE

ACCURACY = ["accuracy", "ci_low", "ci_high", "n_test"]


def write_outputs(
    result: KeyResult,
    out: Path,
    store: Store,
    sae: RawSpaceSAE,
    images: ImageSource,
    device: str = "cpu",
) -> dict[str, Path]:
    """Every output file in `out`; galleries of the SAE tree's latents from the train `store`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out / "key.json", result.to_json())}
    tables = {
        "path": (["method", "c", "n_latents", *ACCURACY], _rows(result, "path")),
        "budgets": (["method", "n_latents", *ACCURACY, "latents"], _rows(result, "budgets")),
        "differences": (
            ["method", "key", "sae_minus_method", "ci_low", "ci_high", "excludes_zero", "n_images"],
            result.differences,
        ),
    }
    for name, (columns, rows) in tables.items():
        paths[f"{name}_csv"] = _write_csv(out / f"key_{name}.csv", columns, rows)
    paths["curves_png"] = figures.save(curves_figure(result), out / "key_curves.png")
    galleries = draw_galleries(result, out, store, sae, images, device)
    paths["html"] = write_key_html(result, out / "key.html", galleries)
    return paths


def _rows(result: KeyResult, part: str) -> list[dict[str, Any]]:
    rows = []
    for name, method in result.methods.items():
        for row in getattr(method, part):
            rows.append(
                {"method": name, **row, "latents": " ".join(map(str, row.get("latents", [])))}
            )
    return rows


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def curves_figure(result: KeyResult):
    """Held-out accuracy against latents used: the L1 path (lines) and the keys of n (dots)."""
    fig, ax = figures.plt.subplots(figsize=(6.4, 4.2))
    for i, (name, method) in enumerate(result.methods.items()):
        colour = f"C{i}"
        points = sorted((r["n_latents"], r["accuracy"]) for r in method.path if r["n_latents"])
        if points:
            ax.plot(
                *zip(*points, strict=True), "-", color=colour, alpha=0.6, label=f"{name} (L1 path)"
            )
        keys = method.budgets
        if keys:
            n = np.array([r["n_latents"] for r in keys])
            acc = np.array([r["accuracy"] for r in keys])
            err = np.stack([acc - [r["ci_low"] for r in keys], [r["ci_high"] for r in keys] - acc])
            ax.errorbar(n, acc, yerr=err.clip(min=0), fmt="o", color=colour, capsize=3, ms=4)
    dense = result.dense
    ax.axhline(
        dense["accuracy"], color="k", ls="--", lw=1, label="dense probe (raw, mean+max pooled)"
    )
    ax.axhspan(dense["ci_low"], dense["ci_high"], color="k", alpha=0.08)
    ax.axhline(1 / len(result.meta["classes"]), color="grey", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("latents (directions) used")
    ax.set_ylabel(f"held-out accuracy ({result.meta['class_column']})")
    ax.set_ylim(0, 1.02)
    ax.set_title("sparse keys: L1 path (lines), refit keys of n latents with 95% CI (dots)")
    ax.legend(fontsize="x-small", loc="lower right")
    return fig


def draw_galleries(
    result: KeyResult,
    out: Path,
    store: Store,
    sae: RawSpaceSAE,
    images: ImageSource,
    device: str,
) -> dict[int, Path]:
    """One figure per split of the SAE's tree: its latent's top train images with heat-maps."""
    splits = sparse.splits_of(result.methods["sae"].tree)
    if not splits or sae.tokens != "patches":
        return {}
    latents = np.array(sorted({s["latent"] for s in splits}), dtype=np.int64)
    rows = np.array(sorted({r for s in splits for r in s["top_rows"]}), dtype=np.int64)
    codes = gather_codes(store, sae, rows, latents, device)
    grid = tuple(int(g) for g in store.grid)
    column = {int(lat): j for j, lat in enumerate(latents)}
    labels = np.asarray(store.metadata[result.meta["class_column"]]).astype(str)
    paths = np.asarray(store.metadata["path"]).astype(str)
    drawn = {}
    for split in splits:
        j = column[split["latent"]]
        panels = [
            Panel(
                images.load(paths[r]),
                codes[r][:, j].reshape(grid),
                f"{labels[r]} #{r} {score:.2f}",
            )
            for r, score in zip(split["top_rows"], split["top_scores"], strict=True)
        ]
        target = out / "key" / f"node{split['node']:03d}_latent{split['latent']}.png"
        title = f"latent {split['latent']}: top train images (split at {split['threshold']:.3g})"
        drawn[split["node"]] = plot_panel_rows([("", panels)], target, title)
    return drawn


def couplets(tree: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """(split, low line, high line) per split, numbered breadth-first from 1 like a field key."""
    splits = sparse.splits_of(tree)
    number = {s["node"]: i for i, s in enumerate(splits, start=1)}

    def goes_to(child: dict[str, Any]) -> str:
        if child["leaf"]:
            return f"{child['class']} ({child['n_train']} train images)"
        return f"go to {number[child['node']]}"

    return [
        (
            s,
            f"{number[s['node']]}a. latent {s['latent']} <= {s['threshold']:.3g} ... {goes_to(s['low'])}",
            f"{number[s['node']]}b. latent {s['latent']} > {s['threshold']:.3g} ... {goes_to(s['high'])}",
        )
        for s in splits
    ]


def write_key_html(result: KeyResult, path: Path, galleries: dict[int, Path]) -> Path:
    summary = [
        {
            "method": name,
            "tree accuracy": m.tree_accuracy.accuracy,
            "tree CI": f"[{m.tree_accuracy.ci_low:.2f}, {m.tree_accuracy.ci_high:.2f}]",
            "latents in tree": len(m.tree_latents),
            **{f"key of {r['n_latents']}": r["accuracy"] for r in m.budgets},
        }
        for name, m in result.methods.items()
    ]
    columns = list(dict.fromkeys(k for row in summary for k in row))
    cards = [
        Card(f"{low}  |  {high}", f"node{s['node']}", galleries.get(s["node"]),
             {"train images here": s["n_train"], "classes": ", ".join(s["class_counts"])})
        for s, low, high in couplets(result.methods["sae"].tree)
    ]  # fmt: skip
    baseline_cards = [
        Card(f"{name}: tree accuracy {m.tree_accuracy.accuracy:.3f}", f"tree-{name}", None,
             note=" | ".join(f"{low}; {high}" for _, low, high in couplets(m.tree)))
        for name, m in result.methods.items() if name != "sae"
    ]  # fmt: skip
    dense = result.dense
    intro = (
        f"Classes: {result.meta['class_column']} ({len(result.meta['classes'])} classes, "
        f"{result.meta['n_train']} train / {result.meta['n_test']} test images). Accuracies are on "
        f"the test split with {int(result.meta['options']['ci_level'] * 100)}% bootstrap CIs over "
        f"its images. The dense probe on every raw dimension, mean- and max-pooled "
        f"({dense['n_dimensions']} features), reaches {dense['accuracy']:.3f} "
        f"[{dense['ci_low']:.3f}, {dense['ci_high']:.3f}]: what a probe without sparsity reads."
    )
    sections = [
        Section("Methods", columns, summary, []),
        Section(
            "The key (the SAE's tree)",
            [],
            [],
            cards,
            "Read from 1: compare the image's score of the named latent (its "
            f"{result.meta['options']['pool']} over patches) with the threshold and follow the "
            "line. Each gallery shows the latent's top train images with its heat-maps.",
        ),
        Section("The same tree on the baselines' directions", [], [], baseline_cards),
    ]
    return write_report(path, "Dichotomous key on SAE latents", intro, sections)


def format_table(result: KeyResult) -> str:
    """The short table printed at the end of a run."""
    budgets = sorted({r["n_latents"] for m in result.methods.values() for r in m.budgets})
    head = (
        f"{'method':<9}"
        + "".join(f"{f'n={n}':>8}" for n in budgets)
        + f"{'tree':>8}{'tree CI':>16}{'depth':>6}"
    )
    lines = [
        f"held-out accuracy ({result.meta['class_column']}, {result.meta['n_test']} test images)",
        head,
        "-" * len(head),
    ]
    for name, m in result.methods.items():
        by_n = {r["n_latents"]: r["accuracy"] for r in m.budgets}
        cells = "".join(f"{by_n[n]:>8.3f}" if n in by_n else f"{'-':>8}" for n in budgets)
        t = m.tree_accuracy
        depth = max((s["depth"] + 1 for s in sparse.splits_of(m.tree)), default=0)
        lines.append(
            f"{name:<9}{cells}{t.accuracy:>8.3f}  [{t.ci_low:.3f}, {t.ci_high:.3f}]{depth:>6}"
        )
    d = result.dense
    lines.append(
        f"dense probe ({d['n_dimensions']} raw features): {d['accuracy']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]  chance {1 / len(result.meta['classes']):.3f}"
    )
    for row in result.differences:
        if row["method"] == "sae_init":
            verdict = "CI excludes 0" if row["excludes_zero"] else "not told apart"
            lines.append(
                f"trained SAE - SAE at init, {row['key']}: {row['sae_minus_method']:+.3f} "
                f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] ({verdict})"
            )
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
