"""The `f` of x_hat = W_dec f(W_enc (x - b_dec) + b_enc) + b_dec: one class per SAE family.

Every activation maps pre-activations [B, S] to codes [B, S] >= 0. `forward` is the inference
rule (what `encode` uses, batch-independent); sparse families also `select` the entries a
training step keeps (BatchTopK differs there: it selects over the whole batch and learns the
inference threshold from it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from traitsae.sae.sparse_ops import batch_topk_entries, row_offsets, topk_indices


class Activation(nn.Module):
    """Base class; `spec()` is what sae.json records to rebuild the activation.

    Sparse families (TopK, BatchTopK) also implement `select`: which (vector, latent) entries
    a training step keeps, as flat latent indices in row order plus their CSR row pointer; the
    model then trains on those entries only (sparse_ops). Dense families train on `forward`.
    """

    #: True when training keeps a selection of entries (`select`), not dense codes.
    sparse: bool = False
    #: Active latents per vector the family is built for (k), when it fixes one.
    k: int | None = None

    def select(self, pre_BS: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {}


class ReLU(Activation):
    def forward(self, pre_BS: Tensor) -> Tensor:
        return torch.relu(pre_BS)


def topk_dense(pre_BS: Tensor, k: int) -> Tensor:
    """Keep the k largest entries per row (after ReLU), zero elsewhere; differentiable."""
    idx_BK = topk_indices(pre_BS.detach(), k)
    vals_BK = torch.relu(pre_BS.gather(1, idx_BK))
    return torch.zeros_like(pre_BS).scatter(1, idx_BK, vals_BK)


class TopK(Activation):
    sparse = True

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = int(k)

    def select(self, pre_BS: Tensor) -> tuple[Tensor, Tensor]:
        n_rows = pre_BS.shape[0]
        crow = torch.arange(0, n_rows * self.k + 1, self.k, device=pre_BS.device)
        return topk_indices(pre_BS, self.k).reshape(-1), crow

    def forward(self, pre_BS: Tensor) -> Tensor:
        return topk_dense(pre_BS, self.k)

    def spec(self) -> dict[str, Any]:
        return {"k": self.k}


class BatchTopK(Activation):
    """Top k*B positive activations over the batch in training; a learned threshold at
    inference.

    The threshold is a running mean of the smallest activation kept in each training batch,
    so that inference keeps about k latents per vector without looking at its batch.
    """

    sparse = True

    def __init__(self, k: int, threshold_momentum: float) -> None:
        super().__init__()
        self.k = int(k)
        self.momentum = float(threshold_momentum)
        # -1 = not estimated yet; inference then falls back to per-vector TopK.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, pre_BS: Tensor) -> Tensor:
        if self.threshold.item() < 0:
            return topk_dense(pre_BS, self.k)
        return torch.where(pre_BS > self.threshold, pre_BS, torch.zeros_like(pre_BS))

    def select(self, pre_BS: Tensor) -> tuple[Tensor, Tensor]:
        rows_N, idx_N = batch_topk_entries(pre_BS, self.k * pre_BS.shape[0])
        if self.training and rows_N.numel():
            self._update_threshold(pre_BS[rows_N, idx_N].min().float())
        return idx_N, row_offsets(rows_N, pre_BS.shape[0])

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: Tensor) -> None:
        if self.threshold.item() < 0:
            self.threshold.copy_(smallest_kept)
        else:
            self.threshold.lerp_(smallest_kept.to(self.threshold.dtype), self.momentum)

    def spec(self) -> dict[str, Any]:
        return {"k": self.k, "threshold_momentum": self.momentum}


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """z * H(z - theta); d/dtheta by a straight-through kernel estimate of width `bandwidth`."""

    @staticmethod
    def forward(ctx: Any, pre_BS: Tensor, theta_S: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BS, theta_S)
        ctx.bandwidth = bandwidth
        return pre_BS * (pre_BS > theta_S)

    @staticmethod
    def backward(ctx: Any, grad_BS: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_BS, theta_S = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_BS * (pre_BS > theta_S)
        kernel_BS = _rectangle((pre_BS - theta_S) / eps)
        grad_theta = -(theta_S / eps) * (kernel_BS * grad_BS).sum(0)
        return grad_pre, grad_theta, None


class _StepFn(torch.autograd.Function):
    """H(z - theta) with the same pseudo-derivative w.r.t. theta (no gradient to z)."""

    @staticmethod
    def forward(ctx: Any, pre_BS: Tensor, theta_S: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BS, theta_S)
        ctx.bandwidth = bandwidth
        return (pre_BS > theta_S).to(pre_BS.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BS: Tensor) -> tuple[None, Tensor, None]:
        pre_BS, theta_S = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel_BS = _rectangle((pre_BS - theta_S) / eps)
        return None, -(1.0 / eps) * (kernel_BS * grad_BS).sum(0), None


def step_ste(pre_BS: Tensor, theta_S: Tensor, bandwidth: float) -> Tensor:
    """Heaviside step H(pre - theta) whose gradient reaches theta (for L0 penalties)."""
    return _StepFn.apply(pre_BS, theta_S, bandwidth)


class JumpReLU(Activation):
    """Per-latent thresholds theta = exp(log_theta) trained with a straight-through estimator."""

    def __init__(self, d_sae: int, threshold_init: float, bandwidth: float) -> None:
        super().__init__()
        self.bandwidth = float(bandwidth)
        self.threshold_init = float(threshold_init)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), float(threshold_init)).log())

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, pre_BS: Tensor) -> Tensor:
        return _JumpReLUFn.apply(pre_BS, self.threshold, self.bandwidth)

    def spec(self) -> dict[str, Any]:
        return {"threshold_init": self.threshold_init, "bandwidth": self.bandwidth}
