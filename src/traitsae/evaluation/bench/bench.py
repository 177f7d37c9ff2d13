"""`eval=bench`: rank SAEs of any origin (traitsae runs, other libraries' checkpoints) on one table.

Every SAE must read the same backbone, layer and token kind (so the same stores). For each, the
evaluations that apply run with their own options (`eval.health.*`, `eval.cub_traits.*`, as in
their YAMLs): health always; cub_traits when the dataset has CUB attribute files. The table
gives, per SAE, its origin (library) and config, FVU, L0, dead and dense fractions, R-precision
and precision@k of its latents (selected on train, reported on test, with the bootstrap CI over
traits), the probe bound and the best baseline; `paired` gives R-precision differences between
every two SAEs with a paired bootstrap CI over traits (trait difficulty cancels).

bench is not a task of its own question but a composition of tasks (like the registry): it
imports their compute functions and adds only the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, open_dict

from traitsae.data.images.cub_attributes import load_cub_attributes
from traitsae.errors import TraitsaeError
from traitsae.evaluation.bench.report import format_table, write_outputs
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.precision import paired_difference
from traitsae.evaluation.core.runs import run_labels
from traitsae.evaluation.core.sae import load_eval_sae
from traitsae.evaluation.core.sources import eval_stores, output_dir, sae_source
from traitsae.evaluation.quality.health import Health, HealthOptions, measure_run
from traitsae.evaluation.traits.cub_traits import evaluate_traits
from traitsae.evaluation.traits.options import CubTraitsOptions
from traitsae.evaluation.traits.report import TraitReport
from traitsae.sae.export import FORMAT, RawSpaceSAE
from traitsae.sae.formats import is_checkpoint

PROTOCOL = "select_on_train"  # the leaderboard's protocol: selected on train, reported on test
BASELINES = ("random", "pca", "kmeans")


@dataclass(frozen=True)
class BenchOptions:
    """The `eval.*` options of conf/eval/bench.yaml (defaults and meanings there); the options
    of the evaluations it runs are their own (`eval.health.*`, `eval.cub_traits.*`)."""

    saes: list[str] | None  # None: run=/sae=
    traits: str  # auto | true | false

    def __post_init__(self) -> None:
        if str(self.traits).lower() not in ("auto", "true", "false"):
            raise TraitsaeError(f"eval.traits={self.traits!r} must be auto, true or false.")


@dataclass
class Entry:
    """One SAE's row of the leaderboard."""

    label: str
    path: str
    origin: str  # the library that saved it (traitsae, saelens, ...)
    config: str  # variant, d_sae, k
    health: dict[str, Any]
    traits: dict[str, Any] = field(default_factory=dict)  # empty when cub_traits did not run


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra entry (registry: `bench`): evaluate every SAE, write bench.json/csv/png, print."""
    opts = build_options(BenchOptions, cfg)
    paths = bench_paths(cfg, opts)
    saes = [load_eval_sae(cfg, p) for p in paths]
    check_same_place(saes, paths)
    health_cfg, trait_cfg = sub_config(cfg, "health"), sub_config(cfg, "cub_traits")
    health_opts = build_options(HealthOptions, health_cfg)
    attributes = _attributes_root(cfg, opts)
    entries, reports = [], []
    for path, label, sae in zip(paths, run_labels(paths), saes, strict=True):
        sae = sae.to(health_opts.device)
        health = measure_run(health_cfg, health_opts, sae, path, label)
        entry = Entry(label, str(path), origin(sae), config_of(sae), health_summary(health))
        if attributes is not None:
            report = trait_report(trait_cfg, sae, attributes)
            entry.traits = trait_summary(report)
            reports.append(report)
        entries.append(entry)
    result = {
        "saes": [entry.__dict__ for entry in entries],
        "paired": paired_between_saes(entries, reports, trait_cfg) if reports else [],
        "placement": {k: saes[0].meta.get(k) for k in ("backbone", "layer", "tokens")},
        "not_run": not_run(attributes),
    }
    out = output_dir(cfg)
    write_outputs(result, out)
    print(format_table(result))
    print(f"bench: outputs in {out}")
    return result


def bench_paths(cfg: DictConfig, opts: BenchOptions) -> list[Path]:
    """eval.saes, else run=/sae=: one SAE, or each subfolder holding one (a sweep dir, or a
    folder of checkpoints of any origin), sweep jobs in numeric order."""
    if opts.saes:
        return [Path(str(p)) for p in opts.saes]
    target = Path(sae_source(cfg))
    if target.is_file() or _holds_sae(target):
        return [target]
    if not target.is_dir():
        raise TraitsaeError(f"eval=bench: {target} is neither an SAE nor a folder of SAEs.")
    found = [p for p in target.iterdir() if p.is_dir() and _holds_sae(p)]
    if not found:
        raise TraitsaeError(
            f"eval=bench: {target} holds no SAE, and none of its subfolders do (a traitsae run "
            "with sae.json, or another library's checkpoint). Pass a sweep dir, a folder of "
            "checkpoints, or eval.saes=[<path>, <path>]."
        )
    # Sweep jobs are numbered 0, 1, ..., 10: sort numerically where possible.
    return sorted(
        found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def _holds_sae(path: Path) -> bool:
    return (path / "sae.json").is_file() or is_checkpoint(path)


def check_same_place(saes: list[RawSpaceSAE], paths: list[Path]) -> None:
    """Every SAE reads the same stores: same backbone, layer, token kind and width."""
    places = [(s.backbone, s.layer, s.tokens, s.d_model) for s in saes]
    if len(set(places)) > 1:
        listing = "; ".join(
            f"{p}: backbone {b!r} layer {layer} tokens {t} d_model {d}"
            for p, (b, layer, t, d) in zip(paths, places, strict=True)
        )
        raise TraitsaeError(
            f"eval=bench ranks SAEs of one backbone, layer and token kind, but these differ: "
            f"{listing}. Bench them in separate runs (or fix a checkpoint's placement with "
            "backbone=, data.layer=, data.tokens=)."
        )


def sub_config(cfg: DictConfig, name: str) -> DictConfig:
    """The whole config with `eval` set to one evaluation's block (`eval.health`, ...)."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.eval = cfg.eval[name]
    return sub


def _attributes_root(cfg: DictConfig, opts: BenchOptions) -> Path | None:
    """Where the CUB attribute files are, when cub_traits applies (eval.traits)."""
    mode = str(opts.traits).lower()
    root = cfg.eval.cub_traits.get("attributes_root") or cfg.dataset.get("root")
    present = bool(root) and (Path(str(root)) / "attributes.txt").is_file()
    if mode == "false":
        return None
    if mode == "true" and not present:
        raise TraitsaeError(
            "eval.traits=true but no CUB attribute files were found (attributes.txt in "
            f"{root or 'dataset.root / eval.cub_traits.attributes_root, neither set'})."
        )
    return Path(str(root)) if present else None


def not_run(attributes: Path | None) -> dict[str, str]:
    reasons = {
        "segments": "not part of eval=bench yet: run eval=segments per SAE",
        "dictionary": "not part of eval=bench yet: run eval=dictionary (a dictionary store)",
    }
    if attributes is None:
        reasons["cub_traits"] = "no CUB attribute files (dataset.root/attributes.txt)"
    return reasons


def origin(sae: RawSpaceSAE) -> str:
    fmt = str(sae.meta.get("format"))
    return "traitsae" if fmt == FORMAT else fmt


def config_of(sae: RawSpaceSAE) -> str:
    k = sae.meta["architecture"].get("k")
    return f"{sae.variant} d_sae={sae.d_sae}" + (f" k={k}" if k else "")


def health_summary(h: Health) -> dict[str, Any]:
    keys = ("fvu", "mse", "l0", "dead_fraction", "dense_fraction", "n_tokens")
    return {k: getattr(h, k) for k in keys}


def trait_report(cfg: DictConfig, sae: RawSpaceSAE, root: Path) -> TraitReport:
    opts = build_options(CubTraitsOptions, cfg)
    train, test = eval_stores(cfg, sae, [opts.train_split, opts.test_split])
    try:
        return evaluate_traits(sae.to(opts.device), train, test, load_cub_attributes(root), opts)
    finally:
        train.close()
        test.close()


def _row(report: TraitReport, method: str, key: str | int) -> dict[str, Any] | None:
    rows = report.r_summary if key == "R" else [r for r in report.summary if r["k"] == key]
    found = [r for r in rows if r["method"] == method and r["protocol"] == PROTOCOL]
    return found[0] if found else None


def trait_summary(report: TraitReport) -> dict[str, Any]:
    """R-precision (with its CI) and P@k of the SAE's latents, the probe bound, the best baseline."""
    sae_r = _row(report, "sae", "R")
    summary: dict[str, Any] = {}
    if sae_r is not None:
        summary.update(
            r_precision=sae_r["mean_r_precision"],
            r_precision_ci=[sae_r["ci_low"], sae_r["ci_high"]],
            n_traits=report.meta["n_traits_evaluated"],
        )
    for row in report.summary:
        if row["method"] == "sae" and row["protocol"] == PROTOCOL:
            summary[f"p_at_{row['k']}"] = row["mean_precision"]
    probe = _row(report, "probe", "R")
    if probe is not None:
        summary["probe_bound_r_precision"] = probe["mean_r_precision"]
    baselines = [r for m in BASELINES if (r := _row(report, m, "R")) is not None]
    if baselines:
        best = max(baselines, key=lambda r: r["mean_r_precision"])
        summary["best_baseline"] = best["method"]
        summary["best_baseline_r_precision"] = best["mean_r_precision"]
    return summary


def _per_trait_r(report: TraitReport) -> dict[str, float]:
    """The SAE's R-precision per trait (mean over seeds; the trained SAE's is seed-free)."""
    values: dict[str, list[float]] = {}
    for row in report.r_per_trait:
        if row["method"] == "sae" and row["protocol"] == PROTOCOL:
            values.setdefault(row["trait"], []).append(row["r_precision"])
    return {trait: float(np.mean(v)) for trait, v in values.items()}


def paired_between_saes(
    entries: list[Entry], reports: list[TraitReport], cfg: DictConfig
) -> list[dict[str, Any]]:
    """R-precision of SAE a minus SAE b for every pair, bootstrap CI over the shared traits."""
    opts = build_options(CubTraitsOptions, cfg)
    per_trait = [_per_trait_r(r) for r in reports]
    rows = []
    for (i, a), (j, b) in combinations(enumerate(per_trait), 2):
        traits = sorted(set(a) & set(b))
        diff = paired_difference(
            np.array([a[t] for t in traits]),
            np.array([b[t] for t in traits]),
            opts.n_bootstrap,
            opts.seed,
            opts.ci_level,
            "traits",
        )
        rows.append(
            {"a": entries[i].label, "b": entries[j].label, "metric": "r_precision"}
            | {"a_minus_b": diff.pop("sae_minus_method")}
            | diff
        )
    return rows
