"""Where things live on disk: the store path convention, its extract command, Hydra's output dir.

The store path convention is shared by extract, train and evaluate. The message for a store that is not
there yet reads how far it got, so it lives beside the store reader
(`traitsae.data.store.missing_store_message`); it is re-exported here for the evaluations that
still import it from this module."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from traitsae.data.store import missing_store_message

__all__ = [
    "extract_command",
    "hydra_output_dir",
    "missing_store_message",
    "store_path",
    "store_path_from_cfg",
]


def store_path(activations_dir: str | Path, dataset: str, split: str, backbone: str) -> Path:
    """`${paths.activations_dir}/${dataset.name}/${split}/${backbone.name}.h5`."""
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
    """The exact command that writes (or finishes) a store of the path convention."""
    return (
        f"python extract.py backbone={backbone} dataset={dataset} split={split} "
        f"paths.activations_dir={activations_dir}"
    )


def hydra_output_dir() -> Path:
    """Hydra's output dir for this job (run dir or sweep subdir); cwd is never changed."""
    return Path(HydraConfig.get().runtime.output_dir)
