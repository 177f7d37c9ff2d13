"""Typed settings for training one SAE, built and checked once from the config's nodes.

- `Architecture` (`cfg.sae`'s architecture keys): what `build_sae` builds. `sae.d_sae` may wait
  for the store's d_model (`sae.expansion` x d_model): then only the checks against d_sae
  (k, prefixes) wait with it, and run when the SAE is built;
- `Objective` (`cfg.sae`'s training keys and the `cfg.sparsity` penalty): the loss, the
  steering of its sparsity and where b_dec starts;
- `Optim` (`cfg.optim`): Adam and its learning-rate schedule.

Each `from_node` checks every value (a TraitsaeError naming the key and the value), so a bad
setting fails before any store is opened; the code built from them trusts them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from traitsae.config_checks import integer, number
from traitsae.errors import TraitsaeError
from traitsae.sae.model import SparseAutoencoder, build_sae, check_family
from traitsae.sae.sparsity import NoPenalty, SparsityPenalty

DECAYS = ("cosine", "linear", "constant")
B_DEC_INITS = ("mean", "geometric_median", "zeros")


@dataclass(frozen=True)
class Architecture:
    """An SAE family and its sizes; `prefixes` as configured (latent counts or fractions)."""

    variant: str
    d_sae: int | None  # None: expansion x the store's d_model
    expansion: int | None
    k: int | None
    threshold_momentum: float | None
    threshold_init: float | None
    bandwidth: float | None
    prefixes: tuple[float, ...] | None
    sampled_prefixes: int
    prefix_weights: tuple[float, ...] | None
    unit_norm_decoder: bool

    @classmethod
    def from_node(cls, sae: Mapping[str, Any]) -> Architecture:
        """From `cfg.sae` (plain containers); the keys a family does not use are ignored."""
        d_sae = sae.get("d_sae")
        expansion = None
        if d_sae is not None:
            d_sae = integer("sae.d_sae", d_sae, minimum=1)
        elif sae.get("expansion"):
            expansion = integer("sae.expansion", sae["expansion"], minimum=1)
        else:
            raise TraitsaeError("set sae.d_sae=<latents> or sae.expansion=<latents per d_model>.")
        variant = str(sae.get("variant"))
        family = check_family(
            variant, d_sae, sae.get("k"), sae.get("threshold_momentum"),
            sae.get("threshold_init"), sae.get("bandwidth"), sae.get("prefixes"),
            sae.get("sampled_prefixes"),
        )  # fmt: skip
        matryoshka = variant == "matryoshka"
        prefixes, weights = sae.get("prefixes"), sae.get("prefix_weights")
        return cls(
            variant=variant,
            d_sae=d_sae,
            expansion=expansion,
            k=family.get("k"),
            threshold_momentum=family.get("threshold_momentum"),
            threshold_init=family.get("threshold_init"),
            bandwidth=family.get("bandwidth"),
            prefixes=tuple(prefixes) if matryoshka and prefixes else None,
            sampled_prefixes=family.get("sampled_prefixes", 0),
            prefix_weights=tuple(float(w) for w in weights) if matryoshka and weights else None,
            unit_norm_decoder=bool(sae["unit_norm_decoder"]),
        )

    def latents(self, d_model: int) -> int:
        return self.d_sae if self.d_sae is not None else int(self.expansion or 0) * d_model

    def build(self, d_model: int) -> SparseAutoencoder:
        """A freshly initialised SAE on vectors of d_model (draws from torch's RNG)."""
        return build_sae(
            self.variant,
            d_model,
            self.latents(d_model),
            self.k,
            threshold_momentum=self.threshold_momentum,
            threshold_init=self.threshold_init,
            bandwidth=self.bandwidth,
            prefixes=list(self.prefixes) if self.prefixes else None,
            sampled_prefixes=self.sampled_prefixes,
            prefix_weights=list(self.prefix_weights) if self.prefix_weights else None,
            unit_norm_decoder=self.unit_norm_decoder,
        )


@dataclass(frozen=True)
class Objective:
    """Loss = reconstruction + `penalty` (coefficient steered to `target_l0` when set) +
    `aux_coeff` x AuxK over latents dead for `dead_after_steps`; b_dec starts at `b_dec_init`."""

    penalty: SparsityPenalty
    aux_k: int | None  # None: d_model / 2
    aux_coeff: float
    dead_after_steps: int
    target_l0: float | None
    target_l0_start: float
    target_l0_ramp: float
    dense_threshold: float
    b_dec_init: str

    @classmethod
    def from_node(
        cls, sae: Mapping[str, Any], penalty: SparsityPenalty, architecture: Architecture
    ) -> Objective:
        """From `cfg.sae` and the penalty built from `cfg.sparsity` (this objective's own:
        with `sae.target_l0` its warm-up is switched off, the controller sets the coefficient)."""
        target = sae.get("target_l0")
        start = number("sae.target_l0_start", sae.get("target_l0_start") or 0.0)
        ramp = number("sae.target_l0_ramp", sae.get("target_l0_ramp") or 0.0)
        if target is not None:
            target = _check_target_l0(target, start, ramp, penalty, architecture)
            penalty.warmup_steps = 0
        b_dec_init = sae["b_dec_init"]
        if b_dec_init not in B_DEC_INITS:
            raise TraitsaeError(
                f"sae.b_dec_init={b_dec_init!r} is unknown; use mean, geometric_median or zeros."
            )
        aux_k = sae.get("aux_k")
        return cls(
            penalty=penalty,
            aux_k=None if aux_k is None else integer("sae.aux_k", aux_k, minimum=1),
            aux_coeff=number("sae.aux_coeff", sae["aux_coeff"]),
            dead_after_steps=integer("sae.dead_after_steps", sae["dead_after_steps"], minimum=1),
            target_l0=target,
            target_l0_start=start,
            target_l0_ramp=ramp,
            dense_threshold=number("sae.dense_threshold", sae["dense_threshold"], positive=True),
            b_dec_init=str(b_dec_init),
        )

    def summary(self) -> dict[str, Any]:
        """Plain values (for hparams): the penalty as its repr."""
        return {**vars(self), "penalty": repr(self.penalty)}


def _check_target_l0(
    target: Any, start: float, ramp: float, penalty: SparsityPenalty, architecture: Architecture
) -> float:
    """`sae.target_l0` only where the L0 is not fixed already, and with a penalty to adapt."""
    value = number("sae.target_l0", target, positive=True)
    if architecture.k is not None:
        raise TraitsaeError(
            f"sae.target_l0={value:g} does not apply to sae={architecture.variant}: its L0 is "
            f"fixed by sae.k={architecture.k} already. Set sae.k={max(1, round(value))} "
            "instead, or use target_l0 with sae=relu or sae=jumprelu."
        )
    if architecture.d_sae is not None:  # else once the store's d_model is known (SAEModule)
        check_target_fits(value, architecture.d_sae)
    if not start >= 0:
        raise TraitsaeError(
            f"sae.target_l0_start={start:g} must be >= 0: the multiple of target_l0 each latent "
            "starts firing at (0: cold start)."
        )
    if not 0 <= ramp <= 1:
        raise TraitsaeError(
            f"sae.target_l0_ramp={ramp:g} must be a fraction of the run in [0, 1] (0: the target "
            "from the first step)."
        )
    if isinstance(penalty, NoPenalty) or penalty.coeff <= 0:
        raise TraitsaeError(
            f"sae.target_l0={value:g} adapts the sparsity coefficient, but sparsity={penalty!r} "
            "has none to adapt; use sparsity=l1, tanh or l0 (sae=relu/jumprelu pick one) with "
            "a positive sparsity.coeff as the starting point."
        )
    return value


def check_target_fits(target_l0: float, d_sae: int) -> None:
    """An L0 target must be below the number of latents (every latent firing is no code)."""
    if target_l0 >= d_sae:
        raise TraitsaeError(
            f"sae.target_l0={target_l0:g} latents firing per vector is impossible with {d_sae} "
            "latents (sae.d_sae, or sae.expansion x d_model): it must be below them, and a "
            "sparse code uses a few per cent. Lower sae.target_l0 or raise sae.d_sae."
        )


@dataclass(frozen=True)
class Optim:
    """Adam's settings; the learning rate warms up linearly over `warmup_steps`, then `decay`s
    (cosine | linear | constant) down to `min_lr_ratio` x `lr` at the last step."""

    lr: float
    betas: tuple[float, float]
    eps: float
    warmup_steps: int
    decay: str
    min_lr_ratio: float

    @classmethod
    def from_node(cls, optim: Mapping[str, Any]) -> Optim:
        """From `cfg.optim` (plain containers)."""
        lr = number("optim.lr", optim["lr"], positive=True)
        eps = number("optim.eps", optim["eps"], positive=True)
        min_lr_ratio = number("optim.min_lr_ratio", optim["min_lr_ratio"])
        betas = optim["betas"]
        pair = list(betas) if isinstance(betas, list | tuple) else []
        if len(pair) != 2 or not all(0 <= number("optim.betas", b) < 1 for b in pair):
            raise TraitsaeError(f"optim.betas must be two numbers in [0, 1), got {betas!r}.")
        warmup_steps = integer("optim.warmup_steps", optim["warmup_steps"], minimum=0)
        decay = optim["decay"]
        if decay not in DECAYS:
            raise TraitsaeError(
                f"optim.decay={decay!r} is unknown; use cosine, linear or constant."
            )
        return cls(lr, (float(pair[0]), float(pair[1])), eps, warmup_steps, decay, min_lr_ratio)

    def lr_factor(self, step: int, total: int) -> float:
        """The learning rate at optimiser step `step` of `total`, as a multiple of `lr`."""
        warmup = self.warmup_steps
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if self.decay == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if self.decay == "linear":
            return 1.0 - (1.0 - self.min_lr_ratio) * progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )
