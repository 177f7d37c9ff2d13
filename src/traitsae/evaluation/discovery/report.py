"""What `eval=discovery` writes: discovery.json, latents.csv, candidates.csv, index.html and a
summary on the terminal. Discoveries (q <= alpha) are kept apart from the other candidates, and
a group without discoveries says so, and why when the group sizes made one impossible.
With eval.pairs, each tested pair gets these files in pairs/<pair>/ (pairs_report.py writes the
top folder)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.evaluation.core.outputs import write_csv, write_json
from traitsae.evaluation.core.report import Card, Section, write_report
from traitsae.evaluation.discovery.candidates import Candidate
from traitsae.evaluation.discovery.ranking import LatentTable
from traitsae.evaluation.discovery.stats import Contrast

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
