"""Validation metrics as torchmetrics (they sum their states across DDP ranks themselves)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class FractionOfVarianceUnexplained(Metric):
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over everything seen (mean over all vectors)."""

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
        self.sum_x += x64.sum(0)
        self.sum_sq += x64.pow(2).sum()
        self.n += x_BD.shape[0]

    def compute(self) -> Tensor:
        # total variance = sum ||x||^2 - n ||mean||^2, from running sums (one pass)
        total_var = self.sum_sq - self.sum_x.pow(2).sum() / self.n.clamp_min(1)
        return (self.sq_err / total_var.clamp_min(1e-12)).float()


class FiringFrequency(Metric):
    """Fraction of vectors on which each latent fires -> [S]."""

    full_state_update = False

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        self.add_state("fires", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, fire_counts_S: Tensor, n_vectors: int) -> None:
        self.fires += fire_counts_S.detach().double()
        self.n += n_vectors

    def compute(self) -> Tensor:
        return (self.fires / self.n.clamp_min(1)).float()
