"""Figures of SAE health (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor


def firing_histogram(freq_S: Tensor, path: Path, dense_freq: float, title: str = "") -> Path:
    """log10 firing-frequency histogram with the dense threshold marked; never-firing latents
    counted in the title."""
    freq = freq_S.numpy()
    alive = freq[freq > 0]
    # A bare Figure draws with the Agg canvas: no pyplot state, no backend to choose.
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    if alive.size:
        ax.hist(np.log10(alive), bins=50, color="tab:blue")
    ax.axvline(np.log10(dense_freq), color="tab:red", lw=1, ls="--",
               label=f"dense (> {dense_freq:.3g})")  # fmt: skip
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    dead = int((freq == 0).sum())
    ax.set_title(f"{title}  dead: {dead}/{freq.size}".strip())
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
