"""Where things live on disk: the store path convention shared by extract, train and evaluate."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def store_path(activations_dir: str | Path, dataset: str, split: str, backbone: str) -> Path:
    """`${paths.activations_dir}/${dataset.name}/${split}/${backbone.name}.h5` (DESIGN.md)."""
    return Path(activations_dir) / dataset / split / f"{backbone}.h5"


def store_path_from_cfg(
    cfg: DictConfig, split: str | None = None, backbone: str | None = None
) -> Path:
    return store_path(
        cfg.paths.activations_dir,
        cfg.dataset.name,
        split or cfg.split,
        backbone or cfg.backbone.name,
    )


def extract_command(backbone: str, dataset: str, split: str, activations_dir: str | Path) -> str:
    """The exact command that writes a missing store (printed in missing-store errors)."""
    return (
        f"python extract.py backbone={backbone} dataset={dataset} split={split} "
        f"paths.activations_dir={activations_dir}"
    )


def hydra_output_dir() -> Path:
    """Hydra's output dir for this job (run dir or sweep subdir); cwd is never changed."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
