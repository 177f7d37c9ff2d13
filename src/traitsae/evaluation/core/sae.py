"""The SAE under test, loaded (torch): `run=<train run dir>` or `sae=<sae.json>`.

Apart from core/sources.py, which the explorer's launch imports without loading torch."""

from __future__ import annotations

from omegaconf import DictConfig

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.sources import sae_source
from traitsae.sae.export import RawSpaceSAE, load_sae


def resolve_sae(cfg: DictConfig) -> RawSpaceSAE:
    """Load the SAE named by `run=<train run dir>` or `sae=<sae.json>`; a `backbone=` given on
    the command line must be the one the SAE was trained on (sae.json names it)."""
    sae = load_sae(sae_source(cfg))
    requested = (cfg.get("backbone") or {}).get("name")
    if requested and requested != sae.backbone:
        raise TraitsaeError(
            f"backbone={requested} was given, but the SAE {sae_source(cfg)} was trained on "
            f"{sae.backbone!r} activations (its sae.json 'backbone'); the stores it is "
            f"evaluated on follow from that. Drop backbone= or pass backbone={sae.backbone}."
        )
    return sae
