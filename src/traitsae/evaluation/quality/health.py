"""`eval=health`: reconstruction and sparsity of one SAE, or of every run of a sweep.

On the held-out store: MSE, FVU (fraction of variance unexplained), L0, dead and dense latent
fractions, and the log10 firing-frequency histogram. A latent is dense when it fires more than
`eval.dense_threshold` times the rate the SAE is built for (k / d_sae, target_l0 / d_sae;
metrics.expected_firing_rate). With `run=<multirun sweep dir>` every job that exported an SAE is
measured: runs are labelled by the overrides that differ across the sweep (short names, also CSV
columns), and the Pareto plots (L0 vs FVU with the frontier; L0 vs dead fraction) mark them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import figures
from traitsae.evaluation.core.firing import (
    density_outputs,
    scan,
)
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.outputs import write_csv, write_json
from traitsae.evaluation.core.runs import find_runs, run_labels, swept_overrides
from traitsae.evaluation.core.sae import load_eval_sae
from traitsae.evaluation.core.sources import eval_store, output_dir, sae_source
from traitsae.evaluation.core.tokens import images_per_block, iter_valid_tokens
from traitsae.sae.export import RawSpaceSAE
from traitsae.sae.metrics import FiringFrequency, FractionOfVarianceUnexplained, dense_frequency

CSV_FIELDS = [
    "run",
    "label",  # the overrides that differ across the sweep; one column each follows
    "swept",
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
    "dense_freq",
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
    dense_fraction: float  # latents firing on more than `dense_freq` of tokens
    dense_freq: float  # eval.dense_threshold x the expected firing rate
    firing_frequency: list[float]  # per latent, fraction of tokens where it fires
    pareto: bool = False
    swept: dict[str, str] = field(default_factory=dict)  # short override name -> value


@dataclass(frozen=True)
class HealthOptions:
    """The `eval.*` options of conf/eval/health.yaml (defaults and meanings there)."""

    split: str
    dense_threshold: float
    max_tokens: int | None
    top_k: int
    device: str


def run(cfg: DictConfig) -> list[Health]:
    """Hydra entry: measure one run (`run=`/`sae=`) or every run of a sweep dir (`run=<sweep>`)."""
    opts = build_options(HealthOptions, cfg)
    runs = find_runs(sae_source(cfg))
    swept = swept_overrides(runs)
    results = []
    for run_dir, label, overrides in zip(runs, run_labels(runs), swept, strict=True):
        sae = load_eval_sae(cfg, run_dir, device=opts.device)
        results.append(measure_run(cfg, opts, sae, run_dir, label, overrides))
    mark_pareto(results)
    out = output_dir(cfg)
    write_outputs(results, out)
    for i, r in enumerate(results):  # density vs mean activation, coloured by label entropy
        name = "health_density.png" if len(results) == 1 else f"health_density_{i}.png"
        density_for_health(cfg, opts, load_eval_sae(cfg, r.run), out / name, r.label)
    print(format_table(results))
    print(f"health: outputs in {out}")
    return results


def measure_run(
    cfg: DictConfig,
    opts: HealthOptions,
    sae: RawSpaceSAE,
    run_dir: Path,
    label: str | None = None,
    swept: dict[str, str] | None = None,
) -> Health:
    """Health of one SAE on the store of its backbone x `cfg.dataset` x `eval.split`."""

    store = eval_store(cfg, sae, opts.split)
    try:
        stats = reconstruction_stats(
            sae,
            store,
            sae.layer,
            sae.tokens,
            opts.max_tokens,
            opts.device,
        )
    finally:
        store.close()
    freq_S = stats.pop("firing_frequency")
    d_sae = int(freq_S.size)
    target_l0 = ((sae.meta.get("config") or {}).get("sae") or {}).get("target_l0")
    dense_freq = dense_frequency(
        opts.dense_threshold, d_sae, sae.meta["architecture"].get("k") or target_l0
    )
    return Health(
        run=str(run_dir),
        label=label if label is not None else run_labels([Path(run_dir)])[0],
        swept=dict(swept or {}),
        variant=str(sae.meta.get("variant", "")),
        d_sae=d_sae,
        layer=sae.layer,
        tokens=sae.tokens,
        dead_fraction=float((freq_S == 0).mean()),
        dense_fraction=float((freq_S > dense_freq).mean()),
        dense_freq=dense_freq,
        firing_frequency=freq_S.tolist(),
        **stats,
    )


# ---------------------------------------------------------------- metrics


def _token_batches(
    store: Store, layer: int, tokens: str, d_sae: int, max_tokens: int | None, device: str
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
    sae: RawSpaceSAE,
    store: Store,
    layer: int,
    tokens: str,
    max_tokens: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Streaming MSE, FVU, L0 and per-latent firing frequency over the store's valid tokens."""

    d_sae = sae.d_sae
    fvu = FractionOfVarianceUnexplained(store.d_model)
    freq = FiringFrequency(d_sae)
    for x_RD in _token_batches(store, layer, tokens, d_sae, max_tokens, device):
        codes_RS = sae.encode(x_RD)
        fvu.update(sae.decode(codes_RS).cpu(), x_RD.cpu())
        freq.update((codes_RS > 0).sum(0).cpu(), x_RD.shape[0])
    if freq.n.item() == 0:
        raise TraitsaeError(f"store {store.path} has no valid tokens to measure the SAE on.")
    return {
        "n_tokens": int(freq.n.item()),
        "mse": float(fvu.mse()),
        "fvu": float(fvu.compute()),
        "l0": float(freq.l0()),
        "firing_frequency": freq.compute().numpy(),
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
    """health.csv (one column per swept override), health.json (with the frequency
    histograms), and PNGs in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "health.csv", "json": out / "health.json"}
    swept_keys = list(dict.fromkeys(k for r in results for k in r.swept))
    fields = [f for f in CSV_FIELDS if f != "swept"]
    fields[2:2] = [k for k in swept_keys if k not in fields]
    write_csv(paths["csv"], fields, [{**r.swept, **asdict(r)} for r in results])
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
    write_json(paths["json"], {"runs": payload})
    paths["pareto_png"] = figures.save(pareto_figure(results), out / "health_pareto.png")
    for i, r in enumerate(results):
        suffix = "" if len(results) == 1 else f"_{i}"
        paths[f"frequency_png{suffix}"] = figures.save(
            figures.log_histogram(
                r.firing_frequency, xlabel="log10 firing frequency (dead at -8)", title=r.label
            ),
            out / f"health_firing_frequency{suffix}.png",
        )
    return paths


def pareto_figure(results: list[Health]):
    """L0 vs FVU (frontier joined) and L0 vs dead fraction, side by side. Points carry their
    run number; the key below the axes gives each number's label, so long labels never
    cover the data or run off the figure."""
    plt = figures.plt
    fig, (ax_fvu, ax_dead) = plt.subplots(1, 2, figsize=(10, 4))
    l0 = np.array([r.l0 for r in results])
    order = np.argsort(l0)
    front = [i for i in order if results[i].pareto]
    for ax, values, ylabel in (
        (ax_fvu, [r.fvu for r in results], "FVU (fraction of variance unexplained)"),
        (ax_dead, [r.dead_fraction for r in results], "dead fraction"),
    ):
        colours = ["tab:red" if r.pareto else "tab:blue" for r in results]
        ax.scatter(l0, values, c=colours, s=28, zorder=3)
        for i, (x, y) in enumerate(zip(l0, values, strict=True)):
            ax.annotate(str(i), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8,
                        annotation_clip=True)  # fmt: skip
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(0.12)  # room for the numbers inside the axes
    ax_fvu.plot(l0[front], [results[i].fvu for i in front], color="tab:red", lw=1,
                label="Pareto front", zorder=2)  # fmt: skip
    ax_fvu.legend(fontsize=8, loc="upper right")
    ax_fvu.set_title("sparsity vs reconstruction")
    ax_dead.set_title("dead latents")
    key = "\n".join(
        f"{i}: {r.label}{'  (front)' if r.pareto else ''}" for i, r in enumerate(results)
    )
    fig.text(0.01, -0.02, key, va="top", ha="left", fontsize=8, family="monospace", wrap=True)
    fig.tight_layout()
    return fig


def format_table(results: list[Health]) -> str:
    width = max([len("run")] + [len(r.label) for r in results])
    head = f"{'run':<{width}} {'L0':>8} {'FVU':>7} {'MSE':>10} {'dead':>6} {'dense':>6}  pareto"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.label:<{width}} {r.l0:>8.2f} {r.fvu:>7.3f} {r.mse:>10.4g} "
            f"{r.dead_fraction:>6.3f} {r.dense_fraction:>6.3f}  {'*' if r.pareto else ''}"
        )
    return "\n".join(lines)


def density_for_health(
    cfg: DictConfig, opts: HealthOptions, sae: RawSpaceSAE, out_png: Path, title: str
) -> Path | None:
    """eval=health's density figure: one scan of the held-out store (patch SAEs only)."""

    if sae.tokens != "patches":
        return None  # a CLS SAE has one token per image: no patch frequency to plot
    with eval_store(cfg, sae, opts.split) as store:
        stats, topk = scan(store, sae, opts.top_k, device=opts.device)
        density_outputs(store, stats, topk, out_png, title)
    return out_png
