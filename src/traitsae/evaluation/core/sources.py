"""What every evaluation needs: the SAE it is given, the stores it reads, where outputs go.

Torch-free (the explorer's launch imports it); loading the SAE is core/sae.py."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.paths import extract_command, hydra_output_dir, missing_store_message, store_path


class TrainedOn(Protocol):
    """What the stores of an SAE follow from: a loaded RawSpaceSAE, or the explorer's record of
    its sae.json (read without torch)."""

    @property
    def backbone(self) -> str: ...
    @property
    def layer(self) -> int: ...
    @property
    def d_model(self) -> int: ...


def sae_source(cfg: DictConfig) -> str:
    """The SAE to evaluate: `sae=<sae.json>` (stored as `sae_path`) or `run=<train run dir>`."""
    source = cfg.get("sae_path") or cfg.get("run")
    if not source:
        raise TraitsaeError(
            "no SAE given: pass run=<train.py run dir> (it holds sae.json) or sae=<path to sae.json>."
        )
    path = Path(str(source))
    if not cfg.get("sae_path") and path.is_file() and path.suffix not in (".json", ".safetensors"):
        raise TraitsaeError(
            f"run={source} is a file, but run= takes a train.py run dir (the folder holding "
            "sae.json and sae.safetensors) or the sae.json in it. To evaluate an exported SAE "
            "file, pass sae=<path to sae.json>."
        )
    return str(source)


def eval_store_path(cfg: DictConfig, sae: TrainedOn, split: str) -> Path:
    return store_path(cfg.paths.activations_dir, cfg.dataset.name, split, sae.backbone)


def eval_stores(cfg: DictConfig, sae: TrainedOn, splits: list[str]) -> list[Store]:
    """Open the SAE backbone's stores of `cfg.dataset` for `splits`, checked against the SAE.

    Every missing split is named in one error, each with the extract.py command that makes it.
    """
    backbone, dataset = sae.backbone, cfg.dataset.name
    missing = [s for s in dict.fromkeys(splits) if not eval_store_path(cfg, sae, s).exists()]
    if missing:
        paths = [eval_store_path(cfg, sae, s) for s in missing]
        commands = [
            extract_command(backbone, dataset, s, cfg.paths.activations_dir) for s in missing
        ]
        raise TraitsaeError(missing_store_message(paths, commands))
    stores = [Store(eval_store_path(cfg, sae, s)) for s in splits]
    for store in stores:
        check_store_matches_sae(store, sae)
    return stores


def eval_store(cfg: DictConfig, sae: TrainedOn, split: str) -> Store:
    """Open the one store of the SAE's backbone on `cfg.dataset` × `split`."""
    return eval_stores(cfg, sae, [split])[0]


def check_store_matches_sae(store: Store, sae: TrainedOn) -> None:
    if store.d_model != sae.d_model:
        raise TraitsaeError(
            f"store {store.path} has d_model={store.d_model} but the SAE expects "
            f"d_model={sae.d_model} (trained on backbone {sae.backbone!r}); "
            "evaluate on a store of the same backbone."
        )
    if store.backbone != sae.backbone:
        raise TraitsaeError(
            f"store {store.path} holds backbone {store.backbone!r} activations but the SAE was "
            f"trained on {sae.backbone!r}."
        )
    if sae.layer not in store.layers:
        raise TraitsaeError(
            f"the SAE was trained on layer {sae.layer} but store {store.path} holds layers "
            f"{list(store.layers)}; re-extract with backbone.layers=[{sae.layer}]."
        )


def output_dir(cfg: DictConfig) -> Path:
    out = hydra_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    return out
