"""The SAE under test, loaded (torch): `run=<train run dir>` or `sae=<sae.json>`, traitsae's own
or another library's checkpoint.

Apart from core/sources.py, which the explorer's launch imports without loading torch."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.sources import sae_source
from traitsae.sae.export import FORMAT, RawSpaceSAE, load_sae
from traitsae.sae.formats import require_placement


def load_eval_sae(cfg: DictConfig, path: str | Path, device: str = "cpu") -> RawSpaceSAE:
    """`load_sae` with the command line's say on a foreign checkpoint (`sae_format=`,
    `backbone=`, `data.layer=`, `data.tokens=`), which must then know where it belongs; a
    `backbone=` given on the command line must be the one the SAE was trained on (every run of
    a sweep is checked: the stores it is evaluated on follow from sae.json's backbone)."""
    data = cfg.get("data") or {}
    requested = (cfg.get("backbone") or {}).get("name")
    sae = load_sae(
        path,
        device=device,
        sae_format=cfg.get("sae_format"),
        backbone=requested,
        layer=data.get("layer"),
        tokens=data.get("tokens"),
    )
    if sae.meta.get("format") != FORMAT:
        require_placement(sae, path)
    if requested and requested != sae.backbone:
        raise TraitsaeError(
            f"backbone={requested} was given, but the SAE {path} was trained on "
            f"{sae.backbone!r} activations (its sae.json 'backbone'); the stores it is "
            f"evaluated on follow from that. Drop backbone= or pass backbone={sae.backbone}."
        )
    return sae


def resolve_sae(cfg: DictConfig) -> RawSpaceSAE:
    """Load the SAE named by `run=<train run dir>` or `sae=<sae.json>` (`load_eval_sae`)."""
    return load_eval_sae(cfg, sae_source(cfg))
