"""The Steer page's model side: `eval=steer` itself (`compute_steer`) on this explorer's SAE and
dataset, so the page shows what the CLI reports (no Streamlit here).

The launch's configuration (session.launch: dataset, paths, SAE, and `steer`, conf/eval/steer.yaml
with any `steer.*` override) becomes an `evaluate.py eval=steer` configuration for one target
(and optionally source) class. The probe is fitted on `steer.train_split` and the latents chosen
there by their measured effect; the images steered are held out: the explored split when it is
not the train split, else `test`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from traitsae.errors import TraitsaeError
from traitsae.explore.session import Session

HELD_OUT_FALLBACK = "test"  # steered when the explorer shows the probe's own train split


def held_out_split(session: Session) -> str:
    """The split whose images are steered: never the one the probe and latents come from."""
    train_split = str(session.launch.get("steer", {}).get("train_split", "train"))
    return session.split if session.split != train_split else HELD_OUT_FALLBACK


def steer_config(session: Session, target: str, source: str | None) -> DictConfig:
    """`evaluate.py eval=steer eval.target_class=<target> [eval.source_class=<source>]` on the
    explored SAE and dataset, from the launch's configuration."""
    if not session.launch or "steer" not in session.launch:
        raise TraitsaeError(
            f"explorer session for {session.sae} holds no steering options (it was saved by an "
            "older explore.py); start the explorer again."
        )
    launch = dict(session.launch)
    options = {**launch.pop("steer"), "target_class": str(target)}
    options["source_class"] = None if source is None else str(source)
    return OmegaConf.create({**launch, "eval": options, "split": held_out_split(session)})


def run_steer(session: Session, target: str, source: str | None) -> Any:
    """eval=steer's `Steered` (result, probabilities [A, n, C], probe, changed patches [n, P])."""
    from traitsae.evaluation.causal.steer import compute_steer  # lazy: torch
    from traitsae.evaluation.causal.steer_options import SteerOptions
    from traitsae.evaluation.core.options import build_options

    cfg = steer_config(session, target, source)
    return compute_steer(cfg, build_options(SteerOptions, cfg))
