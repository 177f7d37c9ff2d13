"""What `eval=discovery` writes: discovery.json, latents.csv, candidates.csv, index.html and a
summary on the terminal. Discoveries (q <= alpha) are kept apart from the other candidates, and
a group without discoveries says so, and why when the group sizes made one impossible.

With eval.pairs, each tested pair gets those files in pairs/<pair>/, and the top folder gets
discovery.json (`pairs`, `fdr`, every candidate with its `pair`), candidates.csv,
figures/discoveries_per_pair.png and an index.html over the pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.evaluation.core import figures
from traitsae.evaluation.core.figures import plt
from traitsae.evaluation.core.outputs import write_csv, write_json
from traitsae.evaluation.core.report import Card, Section, write_report
from traitsae.evaluation.discovery.candidates import Candidate
from traitsae.evaluation.discovery.pairs import Discovery, filter_text
from traitsae.evaluation.discovery.stats import Contrast, LatentTable, NullOptions

# The candidate numbers shown in tables and cards, in this order.
_SHOWN = (
    "rank",
    "latent",
    "score",
    "auroc",
    "p_value",
    "q_value",
    "confirm_auroc",
    "confirmed",
    "rate_a",
    "rate_b",
    "entropy",
    "morans_i",
    "support",
)


def shown_columns(candidates: list[Candidate]) -> tuple[str, ...]:
    """_SHOWN, plus `replicated` (k/n) where eval.replicates ran."""
    replicated = any(c.replicates is not None for c in candidates)
    return (*_SHOWN, "replicated") if replicated else _SHOWN


def replicated_text(cand: Candidate) -> str | None:
    """ "k/n": replicated in k of n replicate SAEs (None: no null, so no verdict)."""
    if cand.replicates is None or cand.replicated_in is None:
        return None
    return f"{cand.replicated_in}/{cand.n_replicates}"


def replication_note(cand: Candidate) -> str:
    """One line per replicate: its matched latent, cosine, held-out AUROC and q."""
    parts = []
    for t in cand.replicates or []:
        verdict = {True: "replicated", False: "not replicated", None: "no test"}[t["replicated"]]
        if not t["matched"]:
            verdict = "no match"
        q = "" if t["q_value"] is None else f", q {t['q_value']:.2g}"
        parts.append(
            f"{t['replicate']}: latent {t['latent']} (cos {t['cosine']:.2f}), AUROC "
            f"{t['auroc']:.2f}{q}: {verdict}"
        )
    return "Replicates: " + "; ".join(parts) if parts else ""


def discovery_json(
    candidates: list[Candidate],
    result: Contrast,
    groups: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Top level: groups, the null's summary (tested, alpha, n_permutations, ...), candidates
    (contract keys first, then every statistic), settings."""
    return {
        "groups": dict(groups),
        **result.summary,
        "candidates": [c.row() for c in candidates],
        "settings": dict(settings),
    }


def write_latents_csv(path: Path, table: LatentTable) -> None:
    """Every latent's statistics on the selection part, one row each (empty p/q: not tested)."""
    columns = table.columns()
    rows = [
        ["" if isinstance(v, float) and np.isnan(v) else v for v in row]
        for row in zip(*(values.tolist() for values in columns.values()), strict=True)
    ]
    write_csv(path, list(columns), rows)


def write_candidates_csv(path: Path, candidates: list[Candidate]) -> None:
    """One row per candidate, every statistic; one `auroc[<stratum>]` column per stratum."""
    rows = []
    for cand in candidates:
        row = {k: v for k, v in cand.row().items() if not isinstance(v, (list, dict))}
        row.update({f"auroc[{s}]": v for s, v in (cand.stats.strata_auroc or {}).items()})
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["group", "rank", "latent"]
    write_csv(path, columns, rows)


def _card(cand: Candidate, out_dir: Path) -> Card:
    row = {**cand.row(), "replicated": replicated_text(cand)}
    numbers = {k: row[k] for k in shown_columns([cand])[2:]}
    strata = cand.stats.strata_auroc
    notes = [
        "AUROC within each stratum: " + "; ".join(f"{s}: {v:.2f}" for s, v in strata.items())
        if strata
        else "",
        replication_note(cand),
    ]
    note = " ".join(n for n in notes if n)
    return Card(
        heading=f"{cand.stats.group.upper()} #{cand.rank}: latent {cand.stats.latent}",
        anchor=f"{cand.stats.group}-{cand.rank}",
        figure=out_dir / cand.figure if cand.figure else None,
        numbers=numbers,
        note=note,
    )


def group_sections(
    group: str, candidates: list[Candidate], summary: Mapping[str, Any], name: str, out_dir: Path
) -> list[Section]:
    """Discoveries of one group, then its other candidates; each says so when it is empty."""
    mine = [c for c in candidates if c.stats.group == group]
    found = [c for c in mine if c.stats.discovery]
    rest = [c for c in mine if not c.stats.discovery]
    alpha = summary["alpha"]

    def rows(cands: list[Candidate]) -> list[dict[str, Any]]:
        return [
            {**c.row(), "replicated": replicated_text(c), "anchor": f"{group}-{c.rank}"}
            for c in cands
        ]

    shown = shown_columns(candidates)

    label = f"group {group.upper()} ({name})"
    sections = []
    if summary["n_permutations"]:
        found_note = "" if found else summary["verdict"][group]
        sections.append(
            Section(
                f"Discoveries specific to {label}: q <= {alpha}",
                shown,
                rows(found),
                [_card(c, out_dir) for c in found],
                found_note,
            )
        )
    rest_note = (
        ""
        if rest
        else (
            "No other candidate."
            if found
            else "No latent passed the candidate filters (support, AUROC floor, not dense)."
        )
    )
    heading = "Other candidates" if summary["n_permutations"] else "Candidates"
    sections.append(
        Section(
            f"{heading} for {label}"
            + (f": not significant at q <= {alpha}" if found or rest else ""),
            shown,
            rows(rest),
            [_card(c, out_dir) for c in rest],
            rest_note,
        )
    )
    return sections


def intro_text(summary: Mapping[str, Any]) -> str:
    sizes = summary["sizes"]
    n_pairs = summary.get("family_contrasts", 1)
    over_pairs = f" of all {n_pairs} pairs of the run together" if n_pairs > 1 else ""
    held = (
        f" Each group was split by image (seeded) into a selection part (A {sizes['a']['selection']}, "
        f"B {sizes['b']['selection']} images) and a held-out confirmation part "
        f"(A {sizes['a']['confirmation']}, B {sizes['b']['confirmation']}); every number but "
        "confirm_* is on the selection part. confirmed = one-sided permutation test on the "
        f"held-out images alone, BH over the candidates{over_pairs}, q <= {summary['alpha']}."
        if summary["confirm"]
        else ""
    )
    family = (
        f"all {summary['family_tests']} tests{over_pairs} ({summary['tested']} latents of this "
        "pair tested)"
        if n_pairs > 1
        else f"the {summary['tested']} latents tested"
    )
    null = (
        f" p_value: two-sided permutation test ({summary['n_permutations']:,} shuffles of the "
        f"group labels{' within strata' if summary['strata'] else ''}, more for small p, up to "
        f"{summary['max_permutations']:,}); q_value: Benjamini-Hochberg over {family}. A "
        f"discovery has q <= {summary['alpha']}."
        if summary["n_permutations"]
        else " No permutation null was run (eval.n_permutations=0)."
    )
    strata = (
        " AUROC compares images within the same stratum only (eval.strata); each card lists "
        "the AUROC inside every stratum."
        if summary["strata"]
        else ""
    )
    replicated = (
        " replicated = k/n: in k of n other SAEs the latent with the closest decoder direction "
        "(cosine >= the threshold) separates the groups on the held-out images (one-sided "
        "permutation test, BH over all candidates x replicates, q <= alpha); each card lists "
        "the matches."
        if summary.get("replication")
        else ""
    )
    return (
        "Latents ranked by evidence, then by triage score = alpha*specificity + "
        "beta*(-entropy) + gamma*Moran's I."
        + null
        + held
        + strata
        + replicated
        + " Each figure shows the "
        "latent's patch heat-map on its top images in its own group (upper row) and in the other "
        "group (lower row), on one colour scale. Full numbers: discovery.json, candidates.csv, "
        "latents.csv."
    )


def write_index(
    path: Path,
    candidates: list[Candidate],
    data: Mapping[str, Any],
    out_dir: Path,
    title: str = "",
) -> Path:
    sections = [
        section
        for g in ("a", "b")
        for section in group_sections(g, candidates, data, data["groups"][g]["name"], out_dir)
    ]
    summary = {**data, "replication": data["settings"].get("replication")}
    heading = f"Trait discovery: {title}" if title else "Trait discovery"
    return write_report(path, heading, intro_text(summary), sections, link_column="latent")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.2g}" if abs(value) < 1e-2 and value else f"{value:.3f}"


def print_summary(candidates: list[Candidate], data: Mapping[str, Any]) -> None:
    for group in ("a", "b"):
        print(
            f"\ngroup {group.upper()} = {data['groups'][group]['name']}: {data['verdict'][group]}"
        )
        mine = [c for c in candidates if c.stats.group == group]
        if not mine:
            print("  no candidate passed the filters (support, AUROC floor, not dense)")
            continue
        print(
            f"{'rank':>4} {'latent':>6} {'score':>6} {'auroc':>6} {'p':>8} {'q':>8} "
            f"{'disc':>4} {'conf':>4} {'c_auroc':>7} {'rate_a':>6} {'rate_b':>6}"
        )
        for c in mine:
            s = c.stats
            print(
                f"{c.rank:>4} {s.latent:>6} {c.score:>6.3f} {s.auroc:>6.3f} {_fmt(s.p_value):>8} "
                f"{_fmt(s.q_value):>8} {_fmt(s.discovery):>4} {_fmt(s.confirmed):>4} "
                f"{_fmt(s.confirm_auroc):>7} {s.rate_a:>6.2f} {s.rate_b:>6.2f}"
            )


def write_outputs(
    out: Path,
    candidates: list[Candidate],
    result: Contrast,
    groups: Mapping[str, Any],
    settings: Mapping[str, Any],
    title: str = "",
) -> dict[str, Any]:
    """Every output file (figures already drawn) and the terminal summary; returns the JSON."""
    data = discovery_json(candidates, result, groups, settings)
    write_json(out / "discovery.json", data)
    write_latents_csv(out / "latents.csv", result.latents)
    write_candidates_csv(out / "candidates.csv", candidates)
    write_index(out / "index.html", candidates, data, out, title)
    print_summary(candidates, data)
    return data


# ----------------------------------------------------------------------------- eval.pairs


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
