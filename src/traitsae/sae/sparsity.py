"""Pluggable sparsity penalties, chosen by `sparsity: {_target_: ...}` in the config.

A penalty maps one forward pass to a scalar added to the loss. The coefficient ramps up
linearly over `warmup_steps` (sparsity warm-up: let the dictionary learn to reconstruct
before it is pushed to be sparse). To add one: subclass `SparsityPenalty`, implement
`per_vector`, and write `conf/sparsity/<name>.yaml` with its `_target_`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from traitsae.errors import TraitsaeError
from traitsae.sae.activations import JumpReLU, step_ste
from traitsae.sae.model import SAEOutput, SparseAutoencoder


class SparsityPenalty:
    name = "penalty"

    def __init__(self, coeff: float = 0.0, warmup_steps: int = 0) -> None:
        if coeff < 0:
            raise TraitsaeError(f"sparsity.coeff must be >= 0, got {coeff}.")
        self.coeff = float(coeff)
        self.warmup_steps = int(warmup_steps)

    def weight(self, step: int) -> float:
        """Coefficient at this optimiser step (linear warm-up from 0)."""
        if self.warmup_steps <= 0:
            return self.coeff
        return self.coeff * min(1.0, (step + 1) / self.warmup_steps)

    def per_vector(self, out: SAEOutput, sae: SparseAutoencoder) -> Tensor:
        """Penalty of each vector of the batch -> [B]."""
        raise NotImplementedError

    def __call__(self, out: SAEOutput, sae: SparseAutoencoder, step: int) -> Tensor:
        weight = self.weight(step)
        if weight == 0.0:
            return out.recon_BD.new_zeros(())
        return weight * self.per_vector(out, sae).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coeff={self.coeff}, warmup_steps={self.warmup_steps})"


class NoPenalty(SparsityPenalty):
    """For families whose sparsity is structural (TopK, BatchTopK, Matryoshka)."""

    name = "none"

    def __call__(self, out: SAEOutput, sae: SparseAutoencoder, step: int) -> Tensor:
        return out.recon_BD.new_zeros(())


class L1Penalty(SparsityPenalty):
    """sum_s |f_s| * ||W_dec[s]|| (decoder-norm weighting stops the SAE from shrinking codes
    while growing decoder rows, when decoder rows are not kept at unit norm)."""

    name = "l1"

    def __init__(
        self, coeff: float = 1.0, warmup_steps: int = 0, weight_by_decoder_norm: bool = True
    ) -> None:
        super().__init__(coeff, warmup_steps)
        self.weight_by_decoder_norm = weight_by_decoder_norm

    def per_vector(self, out: SAEOutput, sae: SparseAutoencoder) -> Tensor:
        codes_BS = out.dense_codes().abs()
        if self.weight_by_decoder_norm:
            codes_BS = codes_BS * sae.W_dec.norm(dim=1)
        return codes_BS.sum(1)


class TanhPenalty(SparsityPenalty):
    """sum_s tanh(scale * |f_s| * ||W_dec[s]||): L1 near zero, saturating for large codes,
    so strong features are not shrunk (a smooth L0 proxy)."""

    name = "tanh"

    def __init__(self, coeff: float = 1.0, warmup_steps: int = 0, scale: float = 1.0) -> None:
        super().__init__(coeff, warmup_steps)
        self.scale = float(scale)

    def per_vector(self, out: SAEOutput, sae: SparseAutoencoder) -> Tensor:
        weighted_BS = out.dense_codes().abs() * sae.W_dec.norm(dim=1)
        return torch.tanh(self.scale * weighted_BS).sum(1)


class L0Penalty(SparsityPenalty):
    """Number of active latents, made trainable by the JumpReLU straight-through estimator
    (gradient to the thresholds only); needs `sae=jumprelu`."""

    name = "l0"

    def per_vector(self, out: SAEOutput, sae: SparseAutoencoder) -> Tensor:
        act = sae.activation
        if not isinstance(act, JumpReLU):
            raise TraitsaeError(
                f"the L0 penalty (sparsity=l0) needs learned thresholds, i.e. sae=jumprelu; "
                f"sae={sae.variant} has none. Use sparsity=l1 or sparsity=tanh instead."
            )
        return step_ste(out.pre_BS, act.threshold, act.bandwidth).sum(1)
