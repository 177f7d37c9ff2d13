"""Reconstruction and firing metrics: the one definition of each, for a batch and streaming.

The streaming forms are torchmetrics (they sum their states across DDP ranks themselves) and
serve validation, `eval=health` and `eval=dictionary` alike.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def unexplained_over_total(sq_err: Tensor, sum_x_D: Tensor, sum_sq: Tensor, n: Tensor) -> Tensor:
    """FVU from running sums: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, where the total
    variance is sum ||x||^2 - n ||mean||^2 (one pass over the data)."""
    total_var = sum_sq - sum_x_D.pow(2).sum() / n.clamp_min(1)
    return sq_err / total_var.clamp_min(1e-12)


def fraction_of_variance_unexplained(recon_BD: Tensor, x_BD: Tensor) -> Tensor:
    """FVU of one batch (differentiable: AuxK uses it as a scale-free loss)."""
    n = torch.tensor(float(x_BD.shape[0]), dtype=x_BD.dtype, device=x_BD.device)
    sq_err = (recon_BD - x_BD).pow(2).sum()
    return unexplained_over_total(sq_err, x_BD.sum(0), x_BD.pow(2).sum(), n)


class FractionOfVarianceUnexplained(Metric):
    """FVU over everything seen (float64 sums), and the per-element MSE alongside."""

    full_state_update = False

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.add_state("sq_err", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_model, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, recon_BD: Tensor, x_BD: Tensor) -> None:
        x64 = x_BD.detach().double()
        self.sq_err += (recon_BD.detach().double() - x64).pow(2).sum()
        self.sum_x += x64.sum(0).to(self.sum_x.device)
        self.sum_sq += x64.pow(2).sum()
        self.n += x_BD.shape[0]

    def compute(self) -> Tensor:
        return unexplained_over_total(self.sq_err, self.sum_x, self.sum_sq, self.n)

    def mse(self) -> Tensor:
        """Mean squared error per element over everything seen."""
        return self.sq_err / (self.n * self.sum_x.numel()).clamp_min(1)


class FiringFrequency(Metric):
    """Fraction of vectors on which each latent fires -> [S]."""

    full_state_update = False

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        self.add_state("fires", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, fire_counts_S: Tensor, n_vectors: int) -> None:
        self.fires += fire_counts_S.detach().double().to(self.fires.device)
        self.n += n_vectors

    def compute(self) -> Tensor:
        return self.fires / self.n.clamp_min(1)

    def l0(self) -> Tensor:
        """Mean active latents per vector (the sum of the firing frequencies)."""
        return self.compute().sum()


# Expected firing rate of a latent when the SAE fixes no L0 (ReLU/JumpReLU without target_l0):
# with the default dense_threshold of 10 this is the customary "fires on > 1 % of tokens".
UNTARGETED_RATE = 1e-3


def expected_firing_rate(d_sae: int, l0: float | None) -> float:
    """Mean firing rate per latent the SAE is built for: k / d_sae (TopK family) or
    target_l0 / d_sae; UNTARGETED_RATE when it sets no L0."""
    return float(l0) / d_sae if l0 else UNTARGETED_RATE


def dense_frequency(dense_threshold: float, d_sae: int, l0: float | None) -> float:
    """The firing frequency above which a latent is dense: `dense_threshold` times the
    expected rate (one definition for training logs, eval=health and the plots)."""
    return dense_threshold * expected_firing_rate(d_sae, l0)
