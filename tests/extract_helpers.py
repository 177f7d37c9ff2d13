"""Shared helpers for the extraction/store/backbone/dataset tests (small and fast on 2 CPU cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PYTHON = sys.executable


def compose_extract(tmp: Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """extract.yaml composed in-process, every path under `tmp`, quiet and single-process."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            config_name="extract",
            overrides=[
                f"paths.root_dir={tmp}",
                "extract.num_workers=0",
                "extract.progress=false",
                "extract.batch_size=8",
                *overrides,
            ],
        )
    GlobalHydra.instance().clear()
    return cfg


def small_synthetic(root: Path, seed: int = 0) -> Path:
    """A reduced demo dataset (4 species x 8 images): enough for store and loader tests."""
    from traitsae.data.synthetic import generate, is_generated

    if not is_generated(root):
        generate(root, seed=seed, n_species=4, images_per_species=8)
    return root


def hooked_residual_stream(
    blocks: torch.nn.ModuleList, run: callable, layers: list[int]
) -> dict[int, torch.Tensor]:
    """Residual stream after `blocks[L]` captured with plain forward hooks during `run()`."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        blocks[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out.detach().clone())
        )
        for layer in layers
    ]
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    """Run `python extract.py <args>` in a subprocess (offline, quiet)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [PYTHON, str(REPO / "extract.py"), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a store (for exact comparisons between stores)."""
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def backbone_cfg(name: str, **overrides) -> DictConfig:
    cfg = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")
    with open_dict(cfg):
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg
