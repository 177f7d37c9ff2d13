"""`eval=health`: reconstruction and sparsity of one SAE, or of every run of a sweep.

On the held-out store: MSE, FVU (fraction of variance unexplained), L0, dead and dense latent
fractions, and the log10 firing-frequency histogram. With `run=<multirun sweep dir>` every job
that exported an SAE is measured; a Pareto plot of L0 vs FVU marks the frontier and labels runs
by their Hydra overrides.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.errors import TraitsaeError
from traitsae.evaluation import features, figures
from traitsae.evaluation.encode import iter_valid_tokens
from traitsae.evaluation.scoring import images_per_block

CSV_FIELDS = [
    "run",
    "label",
    "variant",
    "d_sae",
    "layer",
    "tokens",
    "n_tokens",
    "mse",
    "fvu",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "pareto",
]


@dataclass
class Health:
    run: str
    label: str
    variant: str
    d_sae: int
    layer: int
    tokens: str
    n_tokens: int
    mse: float  # mean squared error per element, raw activation space
    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mean x||^2
    l0: float  # mean number of active latents per token
    dead_fraction: float  # latents that never fire on the held-out store
    dense_fraction: float  # latents firing on more than `dense_threshold` of tokens
    firing_frequency: list[float]  # per latent, fraction of tokens where it fires
    pareto: bool = False


# ---------------------------------------------------------------- entry point


def run(cfg: DictConfig) -> list[Health]:
    """Hydra entry: measure one run (`run=`/`sae=`) or every run of a sweep dir (`run=<sweep>`)."""
    from traitsae.evaluation.common import output_dir, sae_source
    from traitsae.sae.export import load_sae

    target = sae_source(cfg)
    results = []
    for run_dir in find_runs(target):
        sae = load_sae(run_dir, device=cfg.get("device", "cpu"))
        results.append(measure_run(cfg, sae, run_dir))
    mark_pareto(results)
    out = output_dir(cfg)
    write_outputs(results, out)
    for i, r in enumerate(results):  # density vs mean activation, coloured by label entropy
        name = "health_density.png" if len(results) == 1 else f"health_density_{i}.png"
        features.density_for_health(cfg, load_sae(r.run), out / name, r.label)
    print(format_table(results))
    print(f"health: outputs in {out}")
    return results


def find_runs(target: str | Path) -> list[Path]:
    """The run dirs (or sae.json files) to measure: one, or every sweep job holding an sae.json."""
    target = Path(target)
    if target.is_file() or (target / "sae.json").is_file():
        return [target]
    if not target.is_dir():
        raise TraitsaeError(f"{target} is neither a train run dir, a sweep dir nor an sae.json.")
    runs = [p.parent for p in target.glob("*/sae.json")]
    if not runs:
        raise TraitsaeError(
            f"{target} holds no sae.json, and none of its subdirectories do: pass a finished "
            "train.py run dir, or a multirun sweep dir whose jobs finished (each writes sae.json)."
        )
    # Sweep jobs are numbered 0, 1, ..., 10: sort numerically where possible.
    return sorted(
        runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def run_label(run_dir: Path) -> str:
    """A run's Hydra overrides (from .hydra/overrides.yaml), else its directory name."""
    from omegaconf import OmegaConf

    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        overrides = [str(o) for o in OmegaConf.load(path) if not str(o).startswith("hydra.")]
        if overrides:
            return " ".join(overrides)
    return run_dir.name


def measure_run(cfg: DictConfig, sae: torch.nn.Module, run_dir: Path) -> Health:
    """Health of one SAE on the store of its backbone x `cfg.dataset` x `eval.split`."""
    from traitsae.evaluation.common import eval_store

    store = eval_store(cfg, sae, cfg.eval.split)
    try:
        stats = reconstruction_stats(
            sae,
            store,
            int(sae.meta["layer"]),
            str(sae.meta.get("tokens", "patches")),
            cfg.eval.max_tokens,
            cfg.get("device", "cpu"),
        )
    finally:
        store.close()
    freq_S = stats.pop("firing_frequency")
    return Health(
        run=str(run_dir),
        label=run_label(Path(run_dir)),
        variant=str(sae.meta.get("variant", "")),
        d_sae=int(freq_S.size),
        layer=int(sae.meta["layer"]),
        tokens=str(sae.meta.get("tokens", "patches")),
        dead_fraction=float((freq_S == 0).mean()),
        dense_fraction=float((freq_S > cfg.eval.dense_threshold).mean()),
        firing_frequency=freq_S.tolist(),
        **stats,
    )


# ---------------------------------------------------------------- metrics


def _token_batches(
    store, layer: int, tokens: str, d_sae: int, max_tokens: int | None, device: str
) -> Iterator[torch.Tensor]:
    block = images_per_block(store, tokens, d_sae)
    seen = 0
    for _, acts_BPD in iter_valid_tokens(store, layer, tokens, block, device):
        x_RD = acts_BPD.reshape(-1, acts_BPD.shape[-1])
        if max_tokens is not None:
            x_RD = x_RD[: max_tokens - seen]
        seen += x_RD.shape[0]
        yield x_RD
        if max_tokens is not None and seen >= max_tokens:
            return


@torch.no_grad()
def reconstruction_stats(
    sae: torch.nn.Module,
    store,
    layer: int,
    tokens: str,
    max_tokens: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Streaming MSE, FVU, L0 and per-latent firing frequency over the store's valid tokens."""
    d_sae = int(sae.meta.get("d_sae", getattr(sae, "d_sae", 0)))
    n = 0
    sq_err = sum_sq = 0.0  # float64 Python accumulators: millions of tokens
    sum_D = torch.zeros(store.d_model, dtype=torch.float64)
    active = 0
    fires_S = torch.zeros(d_sae, dtype=torch.float64)
    for x_RD in _token_batches(store, layer, tokens, d_sae, max_tokens, device):
        codes_RS = sae.encode(x_RD)
        x_hat_RD = sae.decode(codes_RS)
        fired_RS = codes_RS > 0
        n += x_RD.shape[0]
        sq_err += float(((x_RD - x_hat_RD) ** 2).sum(dtype=torch.float64))
        sum_sq += float((x_RD.double() ** 2).sum())
        sum_D += x_RD.double().sum(0).cpu()
        active += int(fired_RS.sum())
        fires_S += fired_RS.sum(0, dtype=torch.float64).cpu()
    if n == 0:
        raise TraitsaeError(f"store {store.path} has no valid tokens to measure the SAE on.")
    total_var = sum_sq - float((sum_D**2).sum()) / n  # sum ||x - mean||^2
    return {
        "n_tokens": n,
        "mse": sq_err / (n * store.d_model),
        "fvu": sq_err / total_var if total_var > 0 else float("nan"),
        "l0": active / n,
        "firing_frequency": (fires_S / n).numpy(),
    }


def mark_pareto(results: list[Health]) -> None:
    """Flag runs on the L0-FVU frontier (no run is both sparser and more faithful)."""
    if not results:
        return
    front = figures.pareto_front(
        np.array([r.l0 for r in results]), np.array([r.fvu for r in results])
    )
    for r, on_front in zip(results, front, strict=True):
        r.pareto = bool(on_front)


# ---------------------------------------------------------------- outputs


def write_outputs(results: list[Health], out: Path) -> dict[str, Path]:
    """health.csv, health.json (with the frequency histograms), and PNGs in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "health.csv", "json": out / "health.json"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    payload = []
    for r in results:
        row = asdict(r)
        freq_S = np.asarray(row.pop("firing_frequency"))
        counts, edges = (
            np.histogram(np.log10(freq_S[freq_S > 0]), bins=50) if (freq_S > 0).any() else ([], [])
        )
        row["log10_frequency_histogram"] = {
            "counts": np.asarray(counts).tolist(),
            "edges": np.asarray(edges).tolist(),
        }
        payload.append(row)
    paths["json"].write_text(json.dumps({"runs": payload}, indent=2))
    paths["pareto_png"] = figures.save(
        figures.pareto_plot(
            [r.l0 for r in results],
            [r.fvu for r in results],
            [r.label for r in results],
            xlabel="L0 (active latents per token)",
            ylabel="FVU",
            title="sparsity vs reconstruction",
        ),
        out / "health_pareto.png",
    )
    for i, r in enumerate(results):
        suffix = "" if len(results) == 1 else f"_{i}"
        paths[f"frequency_png{suffix}"] = figures.save(
            figures.log_histogram(
                r.firing_frequency, xlabel="log10 firing frequency (dead at -8)", title=r.label
            ),
            out / f"health_firing_frequency{suffix}.png",
        )
    return paths


def format_table(results: list[Health]) -> str:
    head = f"{'run':<40} {'L0':>8} {'FVU':>7} {'MSE':>10} {'dead':>6} {'dense':>6}  pareto"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.label[:40]:<40} {r.l0:>8.2f} {r.fvu:>7.3f} {r.mse:>10.4g} "
            f"{r.dead_fraction:>6.3f} {r.dense_fraction:>6.3f}  {'*' if r.pareto else ''}"
        )
    return "\n".join(lines)
