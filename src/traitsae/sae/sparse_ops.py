"""k-sparse building blocks for the TopK, BatchTopK and Matryoshka training steps.

These steps need one dense GEMM (the encoder forward). Everything after the selection touches
only the kept (vector, latent) entries, held flat and sorted by vector ("rows", CSR order):
`idx_N` (latent of entry n), `crow` (entries of row r are crow[r]:crow[r+1]). Decoding sums
entries into "bags" -- a bag is a row, or for Matryoshka one (row, prefix segment) pair -- so
decode, both weight gradients and the input gradient run on entries, never on dense [B, S]:
- decode:           embedding_bag(idx, W, offsets, per_sample_weights=values)  # gather-sum
- grad of values:   sampled_addmm over the active pattern                       # SDDMM
- grad of W rows:   embedding_bag over the transposed pattern (bags = latents)  # scatter-sum
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
    Candidates below that k-th group maximum cannot win; masking them first makes the last
    topk cheaper (it compares mostly equal values).
    """
    n_rows, n_cols = pre_BS.shape
    group = max(k, _MIN_GROUP)
    if n_cols % group != 0 or n_cols < 4 * group * k:
        return pre_BS.topk(k, dim=1, sorted=False).indices
    groups_BGg = pre_BS.view(n_rows, n_cols // group, group)
    best_Bk = groups_BGg.amax(dim=2).topk(k, dim=1, sorted=False)
    best_groups_Bk = best_Bk.indices
    cand_Bkg = groups_BGg.gather(1, best_groups_Bk[:, :, None].expand(n_rows, k, group))
    cand_BC = cand_Bkg.view(n_rows, k * group)
    cut_B1 = best_Bk.values.amin(dim=1, keepdim=True)  # NaN cut: no comparison holds, no mask
    cand_BC = cand_BC.masked_fill_(cand_BC < cut_B1, float("-inf"))
    win_Bk = cand_BC.topk(k, dim=1, sorted=False).indices
    # candidate position -> column: group id * group + offset inside the group
    return best_groups_Bk.gather(1, win_Bk // group) * group + win_Bk % group


def batch_topk_entries(pre_BS: Tensor, n_keep: int, sample_rows: int = 16) -> tuple[Tensor, Tensor]:
    """The `n_keep` largest positive entries of the whole batch -> (rows_N, idx_N), row-major.

    Exact, without sorting B*S values. A cut from a sample of rows, set low enough to let
    ~1.5 x n_keep entries through, picks candidates; the exact top n_keep is taken among them.
    Candidates are found on group maxima -- a group is 8 columns S/8 apart, so the maxima are
    one vertical reduction over contiguous rows, the only full pass over [B, S]. Every entry
    above the cut is a candidate, so the result is exact whenever the candidates number at
    least n_keep (else: a lower cut, finally a full top-k).
    """
    n_rows, n_cols = pre_BS.shape
    n_keep = min(n_keep, pre_BS.numel())
    group = _MIN_GROUP if n_cols % _MIN_GROUP == 0 else 1
    stride = n_cols // group  # group (b, j) holds columns j, j + stride, j + 2 stride, ...
    gmax_BG = pre_BS.view(n_rows, group, stride).amax(1) if group > 1 else pre_BS
    sample = pre_BS[:: max(1, n_rows // sample_rows)].reshape(-1)
    share = n_keep / pre_BS.numel()
    members = torch.arange(group, device=pre_BS.device) * stride
    for margin in (1.5, 4.0):
        rank = min(sample.numel(), max(1, int(margin * share * sample.numel())))
        cut = max(float(sample.topk(rank, sorted=False).values.min()), 0.0)
        g_rows, g_cols = (gmax_BG > cut).nonzero(as_tuple=True)
        # the candidate groups' entries: flat positions in [B * S]
        flat_N = ((g_rows * n_cols + g_cols)[:, None] + members).reshape(-1)
        vals_N = pre_BS.reshape(-1)[flat_N]
        above = vals_N > cut
        flat_N, vals_N = flat_N[above], vals_N[above]
        if flat_N.numel() >= n_keep or cut == 0.0:  # cut 0: every positive entry is in
            break
    else:  # too many ties at the cut to trust it: sort everything
        flat_N = pre_BS.reshape(-1).topk(n_keep, sorted=False).indices
        flat_N = flat_N[pre_BS.reshape(-1)[flat_N] > 0]
    if flat_N.numel() > n_keep:
        flat_N = flat_N[vals_N.topk(n_keep, sorted=False).indices]
    flat_N = flat_N.sort().values  # row-major
    return flat_N.div(n_cols, rounding_mode="floor"), flat_N % n_cols


def row_offsets(rows_N: Tensor, n_rows: int) -> Tensor:
    """CSR row pointer [n_rows + 1] of entries sorted by row."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows_N.device)
    crow[1:] = torch.bincount(rows_N, minlength=n_rows).cumsum(0)
    return crow


def owners(crow: Tensor, n_entries: int) -> Tensor:
    """Row (or bag) of each entry from a CSR pointer -> [N]."""
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=crow.device), counts,
                                   output_size=n_entries)  # fmt: skip


def project_out_parallel_(grad_SD: Tensor, w_SD: Tensor, parallel_S: Tensor) -> Tensor:
    """grad[s] -= parallel[s] * w[s]: with parallel = <grad[s], w[s]> and unit rows w[s] this
    keeps only the gradient tangent to the unit sphere (unit-norm decoder rows)."""
    return grad_SD.addcmul_(w_SD, parallel_S[:, None].to(grad_SD.dtype), value=-1.0)


class _Pattern:
    """The entries sorted by latent: bags for the scatter-sums into [S, D].

    Built once per index tensor and shared by the encoder and decoder backward passes."""

    _cache: tuple[Tensor, int, _Pattern] | None = None

    @classmethod
    def of(cls, idx_N: Tensor, n_latents: int) -> _Pattern:
        cached = cls._cache
        if cached is not None and cached[0] is idx_N and cached[1] == n_latents:
            return cached[2]
        pattern = cls(idx_N, n_latents)
        cls._cache = (idx_N, n_latents, pattern)
        return pattern

    def __init__(self, idx_N: Tensor, n_latents: int) -> None:
        self.order = idx_N.argsort()
        counts = torch.bincount(idx_N, minlength=n_latents)
        self.offsets = torch.zeros(n_latents, dtype=torch.long, device=idx_N.device)
        self.offsets[1:] = counts.cumsum(0)[:-1]

    def dot_rows(self, rows_XD: Tensor, w_SD: Tensor, owner_N: Tensor) -> Tensor:
        """out[n] = <rows[owner[n]], w[idx[n]]> -> [N], like `gather_dot` but walking w in
        latent order: each row of w is read once, from memory in sequence."""
        n_entries = owner_N.numel()
        crow = torch.cat([self.offsets, self.offsets.new_full((1,), n_entries)])
        shape = (w_SD.shape[0], rows_XD.shape[0])
        pattern = _csr_pattern(crow, owner_N[self.order], shape, w_SD.dtype)
        dots_N = torch.sparse.sampled_addmm(pattern, w_SD, rows_XD.t(), beta=0.0).values()
        return torch.empty_like(dots_N).index_copy_(0, self.order, dots_N)

    def scatter_rows(self, weights_N: Tensor, rows_XD: Tensor, owner_N: Tensor) -> Tensor:
        """out[s] = sum over entries n of latent s of weights[n] * rows[owner[n]] -> [S, D]."""
        return F.embedding_bag(
            owner_N[self.order],
            rows_XD,
            self.offsets,
            mode="sum",
            per_sample_weights=weights_N[self.order],
        )


def gather_dot(a_XD: Tensor, w_SD: Tensor, idx_N: Tensor, crow: Tensor) -> Tensor:
    """out[n] = <a[owner(n)], w[idx[n]]> without materialising w[idx] ([N, D])."""
    pattern = _csr_pattern(crow, idx_N, (a_XD.shape[0], w_SD.shape[0]), a_XD.dtype)
    return torch.sparse.sampled_addmm(pattern, a_XD, w_SD.t(), beta=0.0).values()


def _csr_pattern(crow: Tensor, col_N: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A sparse CSR matrix that only carries a pattern (for sampled_addmm with beta 0)."""
    with warnings.catch_warnings():  # the CSR "beta" notice is noise here
        warnings.simplefilter("ignore", UserWarning)
        values_N = torch.zeros(col_N.numel(), dtype=dtype, device=col_N.device)
        return torch.sparse_csr_tensor(crow, col_N, values_N, shape, check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, vals_N: Tensor, idx_N: Tensor, w_SD: Tensor, crow: Tensor, unit_rows: bool
    ) -> Tensor:
        ctx.save_for_backward(vals_N, idx_N, w_SD, crow)
        ctx.unit_rows = unit_rows
        return F.embedding_bag(idx_N, w_SD, crow[:-1], mode="sum", per_sample_weights=vals_N)

    @staticmethod
    def backward(ctx: Any, grad_XD: Tensor) -> tuple[Tensor | None, ...]:
        vals_N, idx_N, w_SD, crow = ctx.saved_tensors
        grad_XD = grad_XD.contiguous()
        pattern = _Pattern.of(idx_N, w_SD.shape[0])
        owner_N = owners(crow, idx_N.numel())
        grad_vals_N = pattern.dot_rows(grad_XD, w_SD, owner_N)
        grad_w_SD = None
        if ctx.needs_input_grad[2]:
            grad_w_SD = pattern.scatter_rows(vals_N, grad_XD, owner_N)
            if ctx.unit_rows:
                # <grad[b], w[s]> over active pairs is grad_vals: the projection costs one
                # bincount, not a pass over [S, D].
                parallel_S = torch.bincount(idx_N, vals_N * grad_vals_N, minlength=w_SD.shape[0])
                project_out_parallel_(grad_w_SD, w_SD, parallel_S)
        return grad_vals_N, None, grad_w_SD, None, None


class _SparseEncodeValues(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x_BD: Tensor, b_dec_D: Tensor, w_SD: Tensor, b_S: Tensor, idx_N: Tensor,
        crow: Tensor, vals_N: Tensor,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x_BD - b_dec_D, w_SD, idx_N, crow)
        return vals_N

    @staticmethod
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:
        xc_BD, w_SD, idx_N, crow = ctx.saved_tensors
        needs_x, needs_b_dec, needs_w, needs_b = ctx.needs_input_grad[:4]
        grad_x = grad_b_dec = grad_w = grad_b = None
        if needs_b_dec or needs_b:  # d/d b_enc: the entries' gradients summed per latent
            grad_b = torch.bincount(idx_N, grad_N, minlength=w_SD.shape[0]).to(grad_N.dtype)
        if needs_x:
            grad_x = F.embedding_bag(idx_N, w_SD, crow[:-1], mode="sum", per_sample_weights=grad_N)
        if needs_b_dec:
            # pre = W (x - b_dec) + b_enc, so d/d b_dec = -(d/d b_enc) @ W: one pass over W
            # instead of summing a gathered row of W per entry.
            grad_b_dec = -(grad_b @ w_SD)
        if needs_w:
            pattern = _Pattern.of(idx_N, w_SD.shape[0])
            grad_w = pattern.scatter_rows(grad_N, xc_BD, owners(crow, idx_N.numel()))
        return grad_x, grad_b_dec, grad_w, grad_b if needs_b else None, None, None, None


def sparse_decode(
    vals_N: Tensor, idx_N: Tensor, w_SD: Tensor, crow: Tensor, unit_rows: bool = False
) -> Tensor:
    """Bag sums sum_{n in bag} vals[n] * w[idx[n]] -> [n_bags, D] (bags given by `crow`);
    `unit_rows` projects w's gradient onto the tangent of the unit sphere."""
    return _SparseDecode.apply(vals_N, idx_N, w_SD, crow, unit_rows)


def sparse_encode(
    x_BD: Tensor,
    b_dec_D: Tensor,
    w_SD: Tensor,
    b_S: Tensor,
    idx_N: Tensor,
    crow: Tensor,
    pre_BS: Tensor | None = None,
) -> Tensor:
    """Pre-activations <x - b_dec, w[s]> + b[s] at the kept entries [N], differentiable
    w.r.t. x, b_dec, w and b.

    `pre_BS` (the dense forward, computed without autograd) supplies the values when given;
    otherwise they are recomputed on the kept entries only.
    """
    if pre_BS is not None:
        flat_N = owners(crow, idx_N.numel()) * pre_BS.shape[1] + idx_N
        vals_N = pre_BS.reshape(-1)[flat_N].to(w_SD.dtype)
    else:
        xc_BD = (x_BD - b_dec_D).detach()
        vals_N = gather_dot(xc_BD, w_SD.detach(), idx_N, crow) + b_S.detach()[idx_N]
    return _SparseEncodeValues.apply(x_BD, b_dec_D, w_SD, b_S, idx_N, crow, vals_N)


def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks instead of unmapping them.

    An SAE step allocates and frees the same large tensors every step ([B, S] pre-activations,
    [S, D] gradients). By default glibc returns each to the OS and the next step pays a page
    fault per 4 KiB to get it back -- a large share of a k-sparse step. Returns False where
    this does not apply (not glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 31))
