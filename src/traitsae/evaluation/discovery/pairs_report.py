"""What an `eval=discovery eval.pairs=<csv>` run writes on top of each pair's own outputs
(report.py, in pairs/<pair>/): discovery.json (`pairs`, `fdr`, every candidate with its `pair`),
candidates.csv, figures/discoveries_per_pair.png, an index.html over the pairs, and a table of
the pairs on the terminal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.evaluation.core import figures
from traitsae.evaluation.core.figures import plt
from traitsae.evaluation.core.outputs import write_csv, write_json
from traitsae.evaluation.core.report import Card, Section, write_report
from traitsae.evaluation.discovery.null import NullOptions
from traitsae.evaluation.discovery.pairs import Discovery, filter_text


def pair_row(found: Discovery) -> dict[str, Any]:
    """A pair's line of discovery.json `pairs`: its groups, sizes and what it found."""
    row: dict[str, Any] = {
        "pair": found.pair.name,
        "a": filter_text(found.pair.a),
        "b": filter_text(found.pair.b),
        "n_a": found.groups["a"]["n_images"],
        "n_b": found.groups["b"]["n_images"],
        "tested": None,
        "discoveries": None,
        "confirmed": None,
        "skipped_reason": found.skipped or None,
    }
    if found.result is None:
        return row
    summary = found.result.summary
    return {
        **row,
        "tested": summary["tested"],
        "discoveries": sum(summary["n_discoveries"].values()),
        "n_discoveries": summary["n_discoveries"],
        "candidates": len(found.candidates),
        "confirmed": sum(bool(c.stats.confirmed) for c in found.candidates),
        "sizes": summary["sizes"],
        "verdict": summary["verdict"],
        "report": f"pairs/{found.pair.name}/index.html",
    }


def pairs_json(
    pairs: Sequence[Discovery], null: NullOptions, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Top level of an eval.pairs run: the pairs, the joint FDR, every candidate (with its
    `pair`; figures relative to the top folder), settings."""
    rows = [pair_row(p) for p in pairs]
    tested = [p for p in pairs if p.result is not None]
    candidates = [c for p in tested for c in p.candidates]
    return {
        "pairs": rows,
        "alpha": null.alpha,
        "n_permutations": null.n_permutations,
        "max_permutations": null.max_permutations,
        "confirm": null.confirm,
        "min_group": null.min_group,
        "fdr": {
            "family": "all tested latents of all tested pairs together (Benjamini-Hochberg); "
            "confirmation: all candidates of all pairs together",
            "tests": sum(r["tested"] for r in rows if r["tested"] is not None),
            "pairs_tested": len(tested),
            "pairs_skipped": len(pairs) - len(tested),
            "discoveries": sum(r["discoveries"] for r in rows if r["discoveries"] is not None),
            "confirmation_tests": sum(c.stats.confirm_p_value is not None for c in candidates),
            "confirmed": sum(bool(c.stats.confirmed) for c in candidates),
        },
        "candidates": [
            {**c.row(), "figure": f"pairs/{p.pair.name}/{c.figure}" if c.figure else ""}
            for p in tested
            for c in p.candidates
        ],
        "settings": dict(settings),
    }


def pairs_figure(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Horizontal bars: discoveries specific to A and to B per pair; skipped pairs say so."""
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.42 * len(rows)))
    y = np.arange(len(rows))[::-1]
    n_a = np.array([(r.get("n_discoveries") or {}).get("a", 0) for r in rows])
    n_b = np.array([(r.get("n_discoveries") or {}).get("b", 0) for r in rows])
    ax.barh(y, n_a, color="tab:orange", label="specific to A")
    ax.barh(y, n_b, left=n_a, color="tab:blue", label="specific to B")
    for yi, row, total in zip(y, rows, n_a + n_b, strict=True):
        text = (
            f"skipped (n_a={row['n_a']}, n_b={row['n_b']})"
            if row["skipped_reason"]
            else f"{total} ({row['confirmed']} candidates confirmed)"
        )
        ax.text(total, yi, f"  {text}", va="center", fontsize="small")
    ax.set_yticks(y, [r["pair"] for r in rows])
    ax.set_xlabel("discoveries (q <= alpha, one FDR over all pairs)")
    ax.set_xlim(0, max(1, int((n_a + n_b).max(initial=0))) * 1.6)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title("Discoveries per pair")
    return figures.save(fig, path)


def write_pairs_index(path: Path, data: Mapping[str, Any], figure: Path) -> Path:
    """One page: the pairs (each linking to its own report), the figure, every discovery."""
    alpha, fdr = data["alpha"], data["fdr"]
    pair_rows = [
        {**r, "href": r.get("report", "")} for r in data["pairs"]
    ]  # skipped pairs have no report
    columns = ("pair", "a", "b", "n_a", "n_b", "tested", "discoveries", "confirmed")
    skipped = [r for r in data["pairs"] if r["skipped_reason"]]
    skipped_note = " ".join(f"{r['pair']}: {r['skipped_reason']}" for r in skipped)
    found = [
        {
            **c,
            "replicated": None
            if c.get("replicated_in") is None
            else f"{c['replicated_in']}/{c['n_replicates']}",
            "href": f"pairs/{c['pair']}/index.html#{c['group']}-{c['rank']}",
        }
        for c in data["candidates"]
        if c["discovery"]
    ]
    found_columns = ("pair", "group", "rank", "latent", "auroc", "q_value", "confirmed")
    if any(c.get("replicated_in") is not None for c in data["candidates"]):
        found_columns = (*found_columns, "replicated")
    intro = (
        f"{len(data['pairs'])} pairs, {fdr['pairs_tested']} tested. Each pair's latents were "
        "tested by its own permutation null (shuffles within strata), and the q-values come "
        f"from one Benjamini-Hochberg FDR over all {fdr['tests']} tests of all pairs together: "
        f"at q <= {alpha}, the expected share of false discoveries among the "
        f"{fdr['discoveries']} discoveries of the whole run is at most {alpha}. Confirmation "
        "(held-out images) is one FDR over all pairs' candidates likewise. Click a pair for "
        "its report (heat-map galleries); discovery.json and candidates.csv hold every number."
    )
    sections = [
        Section(
            "Pairs",
            columns,
            pair_rows,
            [Card("Discoveries per pair", "figure", figure)],
            f"Skipped (groups too small for eval.min_group={data['min_group']}, or no shared "
            f"stratum): {skipped_note}"
            if skipped
            else "",
        ),
        Section(
            f"Discoveries of all pairs (q <= {alpha})",
            found_columns,
            found,
            [],
            "" if found else f"No pair has a discovery at q <= {alpha}.",
        ),
    ]
    return write_report(path, "Trait discovery over pairs", intro, sections, link_column="pair")


def write_pairs_outputs(
    out: Path, pairs: Sequence[Discovery], null: NullOptions, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """discovery.json, candidates.csv, figures/discoveries_per_pair.png and index.html of an
    eval.pairs run (each pair's own outputs are already in pairs/<pair>/); returns the JSON."""
    data = pairs_json(pairs, null, settings)
    write_json(out / "discovery.json", data)
    rows = [
        {k: v for k, v in c.items() if not isinstance(v, (list, dict))} for c in data["candidates"]
    ]
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["pair", "group", "rank"]
    write_csv(out / "candidates.csv", columns, rows)
    figure = pairs_figure(data["pairs"], out / "figures" / "discoveries_per_pair.png")
    write_pairs_index(out / "index.html", data, figure)
    print("\n=== pairs (one FDR over all pairs) ===")
    print(f"{'pair':<24} {'n_a':>5} {'n_b':>5} {'tested':>6} {'disc':>5} {'conf':>5}  skipped")
    for r in data["pairs"]:
        print(
            f"{r['pair']:<24} {r['n_a']:>5} {r['n_b']:>5} {_fmt_count(r['tested']):>6} "
            f"{_fmt_count(r['discoveries']):>5} {_fmt_count(r.get('confirmed')):>5}  "
            f"{'yes' if r['skipped_reason'] else ''}"
        )
    return data


def _fmt_count(value: int | None) -> str:
    return "-" if value is None else str(value)
