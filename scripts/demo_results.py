"""Write docs/guide/demo.md from the JSON outputs of `make demo`, so that no demo number in the
docs is typed by hand.

    make demo
    .venv/bin/python scripts/demo_results.py            # runs eval=segments, key, audit if missing

Reads `<demo>/cub_traits/cub_traits.json`, `<demo>/discovery/discovery.json`,
`<demo>/segments/segments.json`, `<demo>/key/key.json`, `<demo>/audit/audit.json`,
`<demo>/steer/steer.json` and the collection workflow's
`<demo>/collection/{discovery_all,discovery_fg,traits_table,...}` outputs, and names the
machine and commit the numbers come from (float arithmetic differs between CPUs, so they
move slightly from one machine to another).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this tree's code, whichever install the venv points at

from traitsae.data.collection import pair_rows  # noqa: E402  (the collection's planted truth)

PROTOCOL = "select_on_train"


def ci(row: dict[str, Any], value: str, sign: str = "") -> str:
    """`value [low, high]`; an undefined number (null in the JSON: NaN or inf) reads n/a."""

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:{sign}.3f}"

    return f"{num(row[value])} [{num(row['ci_low'])}, {num(row['ci_high'])}]"


def signed_ci(row: dict[str, Any], value: str) -> str:
    return ci(row, value, "+")


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


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def matches(row: dict[str, str], filter_text: str) -> bool:
    """A pairs.csv filter (`column=value;column=v1|v2`) against a table row."""
    for term in filter_text.split(";"):
        column, values = term.split("=", 1)
        if row.get(column.strip()) not in {v.strip() for v in values.split("|")}:
            return False
    return True


def confirmed_discoveries(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """pair -> its candidates that are discoveries confirmed on the held-out images."""
    found: dict[str, list[dict[str, Any]]] = {}
    for c in report["candidates"]:
        if c.get("discovery") and c.get("confirmed") is True:
            found.setdefault(c["pair"], []).append(c)
    return found


def background_latents(rows: list[dict[str, str]]) -> tuple[int, int]:
    """(latents with more than half their code mass off the foreground, latents that fire) of an
    eval.latents=all table: mass summed over every image (sum of total * outside / sum of total)."""
    total: dict[str, float] = {}
    outside: dict[str, float] = {}
    for r in rows:
        t = float(r["total"])
        total[r["latent"]] = total.get(r["latent"], 0.0) + t
        outside[r["latent"]] = outside.get(r["latent"], 0.0) + (t * float(r["outside"]) if t else 0)
    alive = [s for s, t in total.items() if t > 0]
    return sum(outside[s] / total[s] > 0.5 for s in alive), len(alive)


def background_scored(report: dict[str, Any], rows: list[dict[str, str]]) -> tuple[int, int]:
    """(candidates whose image score comes from off the foreground, max_outside > max, in most
    images of their own group where they fire, candidates) of an eval.select=candidates table."""
    pairs = {p["pair"]: p for p in report["pairs"]}
    by_latent: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_latent.setdefault(r["latent"], []).append(r)
    scored_outside = 0
    for c in report["candidates"]:
        own = [
            r
            for r in by_latent.get(str(c["latent"]), [])
            if matches(r, pairs[c["pair"]][c["group"]])
        ]
        firing = [
            r for r in own if r["max_outside"] and float(max(r["max_outside"], r["max"] or "0")) > 0
        ]
        outside = [r for r in firing if float(r["max_outside"]) > float(r["max"] or 0)]
        scored_outside += bool(firing) and len(outside) > len(firing) / 2
    return scored_outside, len(report["candidates"])


def planted_centre(paths: list[str], grid: tuple[int, int]) -> str:
    """Mean centre of the planted spot's patches (mask classes >= 2, majority rule) in the
    specimen's bounding box, over the images whose masks show it: where the latent should be."""
    import numpy as np
    import torch
    from PIL import Image

    from traitsae.data.images.masks import patch_class_counts
    from traitsae.evaluation.specimens.measures import measure

    centres = []
    for path in paths:
        mask = Path(path.replace("/images/", "/masks/"))
        if not mask.is_file():
            continue
        labels_HW = np.asarray(Image.open(mask), dtype=np.int64)
        major_P = patch_class_counts(labels_HW, grid, int(labels_HW.max()) + 1).argmax(axis=1)
        if (major_P >= 2).any():
            spot_1P1 = torch.from_numpy((major_P >= 2).astype(np.float32))[None, :, None]
            m = measure(spot_1P1, torch.from_numpy(major_P > 0)[None], grid)
            centres.append((m["centroid_x_fg"][0, 0], m["centroid_y_fg"][0, 0]))
    if not centres:
        return "—"
    return f"({np.mean([c[0] for c in centres]):.2f}, {np.mean([c[1] for c in centres]):.2f})"


def trait_rows(
    report: dict[str, Any], rows: list[dict[str, str]], grid: tuple[int, int] | None = None
) -> list[list[str]]:
    """Per pair, its confirmed discovery of highest held-out AUROC (then best rank) measured in
    the specimen table: mean area in each group, mean centroid (in the specimen's bounding box)
    in its own group, and (with the patch `grid`) where the planted spot is in the masks."""
    pairs = {p["pair"]: p for p in report["pairs"]}
    out = []
    for pair, found in confirmed_discoveries(report).items():
        best = max(found, key=lambda c: (c["confirm_auroc"], -c["rank"]))
        mine = [r for r in rows if r["latent"] == str(best["latent"])]
        own, other = best["group"], "b" if best["group"] == "a" else "a"
        area = {
            g: [float(r["area"]) for r in mine if r["area"] and matches(r, pairs[pair][g])]
            for g in "ab"
        }
        own_rows = [r for r in mine if matches(r, pairs[pair][own])]
        where = [
            (float(r["centroid_x_fg"]), float(r["centroid_y_fg"]))
            for r in own_rows
            if r["centroid_x_fg"]
        ]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        out.append(
            [
                pair,
                str(best["latent"]),
                own,
                f"{mean(area[own]):.3f}",
                f"{mean(area[other]):.3f}",
                f"({mean([x for x, _ in where]):.2f}, {mean([y for _, y in where]):.2f})",
                planted_centre([r["path"] for r in own_rows], grid) if grid else "—",
            ]
        )
    return out


def collection_section(coll: Path) -> str:
    """The collection workflow: every pair under one FDR, every patch vs foreground tokens."""
    runs = {
        name: json.loads((coll / f"discovery_{name}" / "discovery.json").read_text())
        for name in ("all", "fg")
        if (coll / f"discovery_{name}" / "discovery.json").exists()
    }
    truth = {r["pair"]: r for r in pair_rows()}
    found = {name: confirmed_discoveries(report) for name, report in runs.items()}
    rows = []
    for p in next(iter(runs.values()))["pairs"]:
        cells = [
            p["pair"],
            truth[p["pair"]]["trait"] or f"none ({truth[p['pair']]['kind']})",
            f"{p['n_a']} / {p['n_b']}",
        ]
        for name, report in runs.items():
            mine = next(q for q in report["pairs"] if q["pair"] == p["pair"])
            cells.append(f"{mine['discoveries'] or 0} / {len(found[name].get(p['pair'], []))}")
        rows.append(cells)
    labels = {"all": "every patch", "fg": "foreground"}
    header = ["pair", "planted difference", "images A / B",
              *(f"{labels[n]}: discoveries / confirmed" for n in runs)]  # fmt: skip
    alpha = next(iter(runs.values()))["alpha"]
    planted = [k for k, r in truth.items() if r["kind"] == "planted"]
    without = [k for k, r in truth.items() if r["kind"] != "planted"]
    bullets = []
    for name, report in runs.items():
        discovering = {p["pair"] for p in report["pairs"] if p["discoveries"]}
        bullets.append(
            f"- {labels[name]}: planted pairs with a confirmed discovery "
            f"{sum(bool(found[name].get(k)) for k in planted)} of {len(planted)}; pairs without a "
            f"planted difference with any discovery at q <= {alpha}: "
            f"{len(discovering & set(without))} of {len(without)}."
        )
    if (coll / "latents_all" / "traits_table.csv").exists():
        spent, alive = background_latents(read_rows(coll / "latents_all" / "traits_table.csv"))
        bullets.append(
            f"- Latents spent on the background: {spent} of the {alive} firing latents of the "
            "every-patch SAE put more than half of their code mass (train split) outside the "
            "specimen's patches. The foreground SAE never sees those patches."
        )
    if "all" in runs and (coll / "candidates_all" / "traits_table.csv").exists():
        k, n = background_scored(
            runs["all"], read_rows(coll / "candidates_all" / "traits_table.csv")
        )
        bullets.append(
            f"- Candidates scored by the background (every patch): {k} of {n} take their image "
            "score from a patch outside the specimen (an artefact outscores the specimen, "
            "`max_outside` > `max`) in most images of their own group where they fire. With "
            "`eval.patches=foreground` no score can come from outside the specimen."
        )
    text = (
        "## collection: co-mimic pairs under one FDR, every patch vs foreground\n\n"
        "`dataset=collection` (generated): co-mimic subspecies pairs of *erato* and *melpomene*, "
        "three with a planted wing spot in the erato subspecies, two without a difference, and "
        "two null pairs splitting one subspecies by collection and by sex; every photo has a "
        "ruler, a label (paper colour by collection) and a colour card around the specimen. The "
        "same pipeline twice: an SAE on **every patch** pooled over every patch, and an SAE on "
        "the **foreground** patches (`data.tokens=foreground`, flags from the masks) pooled over "
        f"them. `eval=discovery eval.pairs`: BH over all pairs x latents together, q <= {alpha}; "
        "confirmed = the held-out images confirm it ([discovery](discovery.md)).\n\n"
        + table(header, rows)
        + "\n"
        + "\n".join(bullets)
        + "\n"
    )
    table_csv = coll / "traits_table" / "traits_table.csv"
    if "fg" in runs and table_csv.exists():
        meta = json.loads((coll / "traits_table" / "traits_table.json").read_text())
        grid = (int(meta["grid"][0]), int(meta["grid"][1]))
        text += (
            "\nThe specimen x trait table of the foreground run's confirmed discoveries "
            "([traits_table](traits_table.md)): per pair the one of highest held-out AUROC, its mean "
            "`area` "
            "(share of the specimen's patches it fires on) in each group and its mean centroid "
            "in the specimen's bounding box (x right, y down, 0..1) in its own group, beside the "
            "centre of the planted spot's patches in the masks.\n\n"
            + table(["pair", "latent", "group", "area (own)", "area (other)", "centroid (x, y)",
                     "planted spot (x, y)"],
                    trait_rows(runs["fg"], read_rows(table_csv), grid))
        )  # fmt: skip
    return text


README_BLOCK = "demo-collection"  # README.md's lines between <!-- generated: NAME --> markers


def collection_numbers(coll: Path) -> str:
    """The README's sentence of collection numbers (both runs needed)."""
    runs = {
        n: json.loads((coll / f"discovery_{n}" / "discovery.json").read_text())
        for n in ("all", "fg")
    }
    truth = {r["pair"]: r for r in pair_rows()}
    planted = [k for k, r in truth.items() if r["kind"] == "planted"]
    without = [k for k, r in truth.items() if r["kind"] != "planted"]

    def counts(report: dict[str, Any]) -> tuple[int, int]:
        found = confirmed_discoveries(report)
        discovering = {p["pair"] for p in report["pairs"] if p["discoveries"]}
        return sum(bool(found.get(k)) for k in planted), len(discovering & set(without))

    (all_found, all_false), (fg_found, fg_false) = counts(runs["all"]), counts(runs["fg"])
    text = (
        f"With foreground tokens {fg_found} of {len(planted)} planted pairs have a confirmed "
        f"discovery ({all_found} of {len(planted)} on every patch) and {fg_false} of "
        f"{len(without)} pairs without a planted difference have any ({all_false} on every patch)"
    )
    latents = coll / "latents_all" / "traits_table.csv"
    if latents.exists():
        spent, alive = background_latents(read_rows(latents))
        text += (
            f"; on every patch {spent} of the SAE's {alive} firing latents fire mostly on the "
            "background"
        )
    return text + "."


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- generated: {name} -->", f"<!-- end: {name} -->"
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


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
        "[segments](segments.md), [key](key.md), [audit](audit.md), [steer](causal.md), "
        "[traits_table](traits_table.md).\n",
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
    if (demo / "collection" / "discovery_fg" / "discovery.json").exists():
        sections.append(collection_section(demo / "collection"))
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
    coll = demo / "collection"
    if not (coll / "discovery_all" / "discovery.json").exists():
        return
    # The tables behind the collection's background numbers (make demo-collection writes the rest).
    for name, extra in (("latents_all", "eval.latents=all"),
                        ("candidates_all", f"eval.discovery={coll / 'discovery_all'}")):  # fmt: skip
        if (coll / name / "traits_table.csv").exists():
            continue
        subprocess.run(
            [
                sys.executable,
                "evaluate.py",
                "eval=traits_table",
                "dataset=collection",
                "split=train",
                f"run={coll / 'train_all'}",
                f"paths.activations_dir={demo / 'activations'}",
                extra,
                "eval.select=candidates",
                f"hydra.run.dir={coll / name}",
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
    coll = args.demo / "collection"
    if all((coll / f"discovery_{n}" / "discovery.json").exists() for n in ("all", "fg")):
        readme = ROOT / "README.md"
        updated = replace_block(readme.read_text(), README_BLOCK, collection_numbers(coll))
        tmp = readme.with_suffix(".tmp")
        tmp.write_text(updated)
        tmp.replace(readme)
        print(f"wrote the collection numbers into {readme}")


if __name__ == "__main__":
    main()
