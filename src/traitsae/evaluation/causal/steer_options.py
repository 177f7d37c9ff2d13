"""`eval=steer`'s options (conf/eval/steer.yaml), checked once: the alphas, where the edit goes,
its unit, how latents are ranked. Shared by the run (steer.py) and the function API the explorer
calls (steering.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import ListConfig, OmegaConf

from traitsae.errors import TraitsaeError
from traitsae.evaluation.causal.forward import ProbeOptions

WHERE = ("all", "firing")
MAX_ALPHA = 1000.0  # |alpha| above this is not a steering step but an overflow
RANKS = ("effect", "specificity")
ALPHA_MEANING = {
    "typical": "each edited token's code of latent s raised by alpha * alpha_unit[s], its mean "
    "code over the edited tokens of a target-class image (train split)",
    "code": "each edited token's code of latent s raised by alpha",
}


def check_alphas(alphas: Sequence[float]) -> list[float]:
    try:
        values = sorted(float(a) for a in alphas)
    except (TypeError, ValueError) as err:
        raise TraitsaeError(f"eval.alphas={list(alphas)} must be numbers ({err}).") from None
    bad = [a for a in values if not math.isfinite(a) or abs(a) > MAX_ALPHA]
    if bad:
        raise TraitsaeError(
            f"eval.alphas={list(alphas)}: {bad} {'is' if len(bad) == 1 else 'are'} not a finite "
            f"step of at most {MAX_ALPHA:g} typical activations (beyond it the edited tokens "
            "overflow float32 and every probability is nan); give e.g. eval.alphas=[0,0.5,1,2]."
        )
    if 0.0 not in values:
        raise TraitsaeError(
            f"eval.alphas={list(alphas)} must include 0 (the unsteered probabilities every other "
            "alpha is compared with), e.g. eval.alphas=[0,2,4,8]."
        )
    return values


def as_list(value: Any) -> list:
    if isinstance(value, ListConfig):
        return list(OmegaConf.to_container(value, resolve=True))
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass(frozen=True)
class SteerOptions(ProbeOptions):
    """The `eval.*` options of conf/eval/steer.yaml (defaults and meanings there)."""

    target_class: str | None
    latents: list[int] | None
    n_latents: int
    n_candidates: int
    rank: str
    alphas: list[float]
    alpha_units: str
    where: str
    tokens: str
    source_class: str | None
    images: list[Any] | None
    max_images: int
    n_control: int

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "alphas", check_alphas(as_list(self.alphas)))
        set_(self, "latents", [int(s) for s in as_list(self.latents)] if self.latents else None)
        set_(self, "images", as_list(self.images) if self.images else None)
        if self.where not in WHERE:
            raise TraitsaeError(f"eval.where must be one of {WHERE}, got {self.where!r}.")
        if self.alpha_units not in ALPHA_MEANING:
            raise TraitsaeError(
                f"eval.alpha_units must be one of {sorted(ALPHA_MEANING)}, got "
                f"{self.alpha_units!r}."
            )
        if self.rank not in RANKS:
            raise TraitsaeError(f"eval.rank must be one of {RANKS}, got {self.rank!r}.")
        if self.n_candidates < self.n_latents:
            raise TraitsaeError(
                f"eval.n_candidates={self.n_candidates} must be >= eval.n_latents="
                f"{self.n_latents} (the latents are chosen among the candidates)."
            )
        if int(self.n_control) < 0:
            raise TraitsaeError(f"eval.n_control must be >= 0, got {self.n_control}.")
        if self.target_class is None:
            raise TraitsaeError("eval.target_class is required: give a class name as in the store.")
