"""Shared plotting helpers for evaluation outputs (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # evaluation figures are files only; they never need a display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from traitsae.evaluation.core.outputs import write_figure


def save(fig, path: str | Path) -> Path:
    """Write a figure as PNG and free it."""
    path = write_figure(fig, Path(path), dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def grouped_bars_with_ci(
    groups: Sequence[str],
    series: Mapping[str, Sequence[tuple[float, float, float]]],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "",
    ax=None,
):
    """Bars per group (x) and series (colour); each value is (estimate, ci_low, ci_high)."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.6))
    width = 0.8 / max(len(series), 1)
    x_G = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        est, low, high = (np.asarray(v, dtype=float) for v in zip(*values, strict=True))
        err_2G = np.stack([est - low, high - est]).clip(min=0)
        ax.bar(
            x_G + (i - (len(series) - 1) / 2) * width,
            est,
            width,
            yerr=err_2G,
            capsize=3,
            label=name,
        )
    ax.set_xticks(x_G, groups)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    # Below the axes: inside, the legend would hide the bars that reach 1.0.
    ax.legend(
        fontsize="small", ncols=min(len(series), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1)
    )
    return fig if fig is not None else ax.figure


def distributions(
    values: Mapping[str, np.ndarray],
    *,
    title: str,
    ylabel: str,
    ax=None,
    reference: float | None = None,
):
    """One box (with the points jittered over it) per named sample, e.g. per-trait precision."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(values), 3.6))
    names = list(values)
    ax.boxplot([values[n] for n in names], showfliers=False)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names, start=1):
        v = np.asarray(values[name])
        ax.scatter(i + rng.uniform(-0.15, 0.15, v.size), v, s=4, alpha=0.4, color="k")
    if reference is not None:
        ax.axhline(reference, color="tab:red", lw=1, ls="--")
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return fig if fig is not None else ax.figure


def subplots(n: int, *, width: float = 4.5, height: float = 3.6):
    """A row of n axes sharing y."""
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), sharey=True, squeeze=False)
    return fig, list(axes[0])


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of points not dominated in (lower x, lower y); a point with a NaN or inf coordinate
    is never on the front (NaN compares false with everything, so it used to be)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    front = np.isfinite(x) & np.isfinite(y)
    for i in np.flatnonzero(front):
        dominated_by = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        front[i] = not dominated_by.any()
    return front


def pareto_plot(
    x: np.ndarray, y: np.ndarray, labels: Sequence[str], *, xlabel: str, ylabel: str, title: str
):
    """Scatter of runs, the Pareto frontier (lower is better on both axes) drawn and ringed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    front = pareto_front(x, y)
    ax.scatter(x[~front], y[~front], color="tab:gray", label="dominated")
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], "o-", color="tab:red", label="Pareto frontier")
    for xi, yi, label in zip(x, y, labels, strict=True):
        ax.annotate(label, (xi, yi), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def log_histogram(values: np.ndarray, *, xlabel: str, title: str, floor: float = 1e-8):
    """Histogram of log10(values); zeros are counted at log10(floor) so dead latents stay visible."""
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.hist(np.log10(np.maximum(np.asarray(values, dtype=float), floor)), bins=50)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    return fig


@dataclass
class Panel:
    """One image of a figure: pixels, its patch heat-map and a caption."""

    image_HW3: np.ndarray | None  # None when the image file is unavailable: map alone
    map_RC: np.ndarray
    caption: str


def plot_panel_rows(
    rows: Sequence[tuple[str, Sequence[Panel]]],
    out_path: Path,
    title: str,
    alpha: float = 0.55,
    cmap: str = "inferno",
) -> Path:
    """One figure row per (label, panels); a shared colour scale so weak rows look weak."""

    n_rows = len(rows)
    n_cols = max(1, max(len(panels) for _, panels in rows))
    vmax = max((float(p.map_RC.max()) for _, panels in rows for p in panels), default=1.0) or 1.0
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(2.0 * n_cols, 2.2 * n_rows + 0.4), squeeze=False
    )
    for r, (label, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            panel = panels[c]
            if panel.image_HW3 is not None:
                height, width = panel.image_HW3.shape[:2]
                ax.imshow(panel.image_HW3)
                # Silent patches stay transparent so the picture shows where the latent is off.
                ax.imshow(
                    np.ma.masked_less_equal(panel.map_RC, 0),
                    cmap=cmap,
                    alpha=alpha,
                    vmin=0,
                    vmax=vmax,
                    extent=(0, width, height, 0),
                    interpolation="nearest",
                )
            else:
                ax.imshow(panel.map_RC, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(panel.caption, fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_figure(fig, out_path, dpi=80)
    plt.close(fig)
    return out_path
