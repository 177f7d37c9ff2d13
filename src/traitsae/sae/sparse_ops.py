"""k-sparse building blocks for the TopK training step.

A TopK SAE step needs one dense GEMM (the encoder forward). Everything after the top-k choice
touches only the k active latents per row, so decode, both weight gradients and the input
gradient are written here on (values, indices) pairs instead of dense [B, S] codes:
- decode:           embedding_bag(indices, W, per_sample_weights=values)     # gather-sum
- grad of values:   sampled_addmm over the active pattern                      # SDDMM
- grad of W rows:   embedding_bag over the transposed pattern (bags = latents) # scatter-sum
The dense B x S code matrix is never built.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this many columns per group the grouped top-k gains nothing over torch.topk.
_MIN_GROUP = 8


def topk_indices(pre_BS: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k largest entries per row, exact (ties may break differently).

    torch.topk copies every element into a (value, index) buffer: ~2.5 ns per element here.
    Instead: split each row into groups of k, take the k groups with the largest maxima (the
    k-th largest value is >= the k-th largest group maximum, so every winner lives in one of
    those groups), and run topk on those k*k candidates only. One vectorised amax pass.
    """
    n_rows, n_cols = pre_BS.shape
    group = max(k, _MIN_GROUP)
    if n_cols % group != 0 or n_cols < 4 * group * k:
        return pre_BS.topk(k, dim=1, sorted=False).indices
    groups_BGg = pre_BS.view(n_rows, n_cols // group, group)
    best_groups_Bk = groups_BGg.amax(dim=2).topk(k, dim=1, sorted=False).indices
    cand_Bkg = groups_BGg.gather(1, best_groups_Bk[:, :, None].expand(n_rows, k, group))
    win_Bk = cand_Bkg.view(n_rows, k * group).topk(k, dim=1, sorted=False).indices
    # candidate position -> column: group id * group + offset inside the group
    return best_groups_Bk.gather(1, win_Bk // group) * group + win_Bk % group


class _Pattern:
    """The active (row, latent) pairs sorted by latent: bags for the scatter-sums.

    Built once per index tensor and shared by the encoder and decoder backward passes."""

    _cache: tuple[Tensor, int, _Pattern] | None = None

    @classmethod
    def of(cls, idx_BK: Tensor, n_latents: int) -> _Pattern:
        cached = cls._cache
        if cached is not None and cached[0] is idx_BK and cached[1] == n_latents:
            return cached[2]
        pattern = cls(idx_BK, n_latents)
        cls._cache = (idx_BK, n_latents, pattern)
        return pattern

    def __init__(self, idx_BK: Tensor, n_latents: int) -> None:
        flat = idx_BK.reshape(-1)
        self.order = flat.argsort()
        self.rows = torch.div(self.order, idx_BK.shape[1], rounding_mode="floor")
        counts = torch.bincount(flat, minlength=n_latents)
        self.offsets = torch.zeros(n_latents, dtype=torch.long, device=idx_BK.device)
        self.offsets[1:] = counts.cumsum(0)[:-1]

    def scatter_rows(self, weights_BK: Tensor, rows_BD: Tensor) -> Tensor:
        """out[s] = sum over active (b, k) with idx[b,k] = s of weights[b,k] * rows[b] -> [S, D]."""
        return F.embedding_bag(
            self.rows,
            rows_BD,
            self.offsets,
            mode="sum",
            per_sample_weights=weights_BK.reshape(-1)[self.order],
        )


def gather_dot(a_BD: Tensor, w_SD: Tensor, idx_BK: Tensor) -> Tensor:
    """out[b, k] = <a[b], w[idx[b, k]]> without materialising w[idx] ([B, K, D])."""
    n_rows, k = idx_BK.shape
    crow = torch.arange(0, n_rows * k + 1, k, device=idx_BK.device)
    with warnings.catch_warnings():  # the CSR "beta" notice is noise: it only carries a pattern
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            idx_BK.reshape(-1),
            a_BD.new_zeros(n_rows * k),
            (n_rows, w_SD.shape[0]),
            check_invariants=False,
        )
    return torch.sparse.sampled_addmm(pattern, a_BD, w_SD.t(), beta=0.0).values().view(n_rows, k)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, vals_BK: Tensor, idx_BK: Tensor, w_SD: Tensor, unit_rows: bool) -> Tensor:
        ctx.save_for_backward(vals_BK, idx_BK, w_SD)
        ctx.unit_rows = unit_rows
        return F.embedding_bag(idx_BK, w_SD, mode="sum", per_sample_weights=vals_BK)

    @staticmethod
    def backward(ctx: Any, grad_BD: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        vals_BK, idx_BK, w_SD = ctx.saved_tensors
        grad_vals_BK = gather_dot(grad_BD, w_SD, idx_BK)
        grad_w_SD = None
        if ctx.needs_input_grad[2]:
            pattern = _Pattern.of(idx_BK, w_SD.shape[0])
            grad_w_SD = pattern.scatter_rows(vals_BK, grad_BD)
            if ctx.unit_rows:
                # Remove the component parallel to each (unit) row; <grad[b], w[s]> for active
                # pairs is grad_vals, so the projection costs one bincount, not a [S, D] pass.
                parallel_S = torch.bincount(
                    idx_BK.reshape(-1),
                    (vals_BK * grad_vals_BK).reshape(-1),
                    minlength=w_SD.shape[0],
                )
                grad_w_SD.addcmul_(w_SD, parallel_S[:, None], value=-1.0)
        return grad_vals_BK, None, grad_w_SD, None


class _SparseEncodeValues(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, xc_BD: Tensor, w_SD: Tensor, b_S: Tensor, idx_BK: Tensor, vals_BK: Tensor
    ) -> Tensor:
        ctx.save_for_backward(xc_BD, w_SD, idx_BK)
        return vals_BK

    @staticmethod
    def backward(ctx: Any, grad_BK: Tensor) -> tuple[Tensor | None, ...]:
        xc_BD, w_SD, idx_BK = ctx.saved_tensors
        n_latents = w_SD.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_BK, w_SD, mode="sum", per_sample_weights=grad_BK)
        if ctx.needs_input_grad[1]:
            grad_w = _Pattern.of(idx_BK, n_latents).scatter_rows(grad_BK, xc_BD)
        if ctx.needs_input_grad[2]:
            grad_b = torch.bincount(idx_BK.reshape(-1), grad_BK.reshape(-1), minlength=n_latents)
            grad_b = grad_b.to(grad_BK.dtype)
        return grad_x, grad_w, grad_b, None, None


def sparse_decode(vals_BK: Tensor, idx_BK: Tensor, w_SD: Tensor, unit_rows: bool = False) -> Tensor:
    """sum_k vals[b, k] * w[idx[b, k]] -> [B, D]; `unit_rows` projects w's gradient onto the
    tangent of the unit sphere (for decoders whose rows are kept at unit norm)."""
    return _SparseDecode.apply(vals_BK, idx_BK, w_SD, unit_rows)


def sparse_encode(
    xc_BD: Tensor, w_SD: Tensor, b_S: Tensor, idx_BK: Tensor, pre_BS: Tensor | None = None
) -> Tensor:
    """Pre-activations at the chosen latents, differentiable w.r.t. xc, w and b.

    `pre_BS` (the dense forward, computed without autograd) supplies the values when given;
    otherwise they are recomputed on the k latents only.
    """
    if pre_BS is not None:
        vals_BK = pre_BS.gather(1, idx_BK)
    else:
        vals_BK = gather_dot(xc_BD.detach(), w_SD.detach(), idx_BK) + b_S.detach()[idx_BK]
    return _SparseEncodeValues.apply(xc_BD, w_SD, b_S, idx_BK, vals_BK)


def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks instead of unmapping them.

    An SAE step allocates and frees the same large tensors every step ([B, S] pre-activations,
    [S, D] gradients). By default glibc returns each to the OS and the next step pays a page
    fault per 4 KiB to get it back -- a large share of a k-sparse step. Returns False where
    this does not apply (not glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 31))
