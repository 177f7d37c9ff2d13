"""Sparse autoencoders: x_hat = W_dec f(W_enc (x - b_dec) + b_enc) + b_dec, in normalised space.

Weights are stored latent-major: `W_enc` and `W_dec` are both [S, D] (row s = latent s), so the
decoder directions are rows and the k-sparse step can gather/scatter whole rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from traitsae.errors import TraitsaeError
from traitsae.sae.activations import Activation, BatchTopK, JumpReLU, ReLU, TopK
from traitsae.sae.sparse_ops import sparse_decode, sparse_encode, topk_indices

VARIANTS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")


@dataclass
class SAEOutput:
    """One forward pass. Dense variants fill `codes_BS`; the TopK fast path fills
    (`values_BK`, `indices_BK`) and builds dense codes only when asked."""

    recon_BD: Tensor
    pre_BS: Tensor  # pre-activations (detached on the sparse path)
    codes_BS: Tensor | None = None
    values_BK: Tensor | None = None
    indices_BK: Tensor | None = None
    prefix_recons: list[Tensor] = field(default_factory=list)  # Matryoshka: one per prefix

    def dense_codes(self) -> Tensor:
        if self.codes_BS is None:
            assert self.values_BK is not None and self.indices_BK is not None
            zeros_BS = self.values_BK.new_zeros(self.pre_BS.shape)
            self.codes_BS = zeros_BS.scatter(1, self.indices_BK, self.values_BK)
        return self.codes_BS

    def fire_counts(self) -> Tensor:
        """How many vectors of the batch fired each latent -> [S] (no gradient)."""
        n_latents = self.pre_BS.shape[1]
        if self.codes_BS is None and self.indices_BK is not None:
            active = self.indices_BK[self.values_BK.detach() > 0]
            return torch.bincount(active, minlength=n_latents)
        return (self.dense_codes().detach() > 0).sum(0)

    def l0(self) -> Tensor:
        """Active latents per vector -> [B] float."""
        if self.codes_BS is None and self.values_BK is not None:
            return (self.values_BK.detach() > 0).sum(1).float()
        return (self.dense_codes().detach() > 0).sum(1).float()


def normalized_mse(recon_BD: Tensor, x_BD: Tensor) -> Tensor:
    """||x_hat - x||^2 / ||x - mean(x)||^2 over the batch (scale-free, for auxiliary losses)."""
    err = (recon_BD - x_BD).pow(2).sum()
    var = (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return err / var


class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        variant: str,
        d_model: int,
        d_sae: int,
        activation: Activation,
        prefixes: list[int] | None = None,
        sampled_prefixes: int = 0,
        prefix_weights: list[float] | None = None,
        unit_norm_decoder: bool = True,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.d_model = int(d_model)
        self.d_sae = int(d_sae)
        self.activation = activation
        self.prefixes = list(prefixes) if prefixes else None
        self.sampled_prefixes = int(sampled_prefixes)
        self.prefix_weights = list(prefix_weights) if prefix_weights else None
        self.unit_norm_decoder = bool(unit_norm_decoder)
        # Tied initialisation (W_enc = W_dec, unit rows): a good start that avoids early
        # dead latents (Gao et al. 2024).
        w_SD = torch.randn(self.d_sae, self.d_model)
        w_SD /= w_SD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_SD.clone())
        self.W_enc = nn.Parameter(w_SD.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_model))

    # ---- inference (batch-independent) -------------------------------------------------
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x_BD - self.b_dec, self.W_enc.t())

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense codes [B, S] >= 0 of normalised vectors."""
        return self.activation(self.pre_acts(x_BD.to(self.W_enc.dtype)))

    def decode(self, codes_BS: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, codes_BS.to(self.W_dec.dtype), self.W_dec)

    # ---- training ------------------------------------------------------------------------
    def forward(self, x_BD: Tensor) -> SAEOutput:
        if self.training and self.activation.sparse_k is not None and not self.prefixes:
            return self._forward_sparse(x_BD, self.activation.sparse_k)
        pre_BS = self.pre_acts(x_BD)
        act = self.activation
        codes_BS = act.train_codes(pre_BS) if self.training else act(pre_BS)
        if not self.prefixes:
            return SAEOutput(recon_BD=self.decode(codes_BS), pre_BS=pre_BS, codes_BS=codes_BS)
        recons = self._prefix_recons(codes_BS)  # the last prefix is the whole dictionary
        return SAEOutput(recons[-1], pre_BS=pre_BS, codes_BS=codes_BS, prefix_recons=recons)

    def _forward_sparse(self, x_BD: Tensor, k: int) -> SAEOutput:
        """TopK step: one dense GEMM (no autograd), then everything on the k winners."""
        xc_BD = x_BD - self.b_dec
        with torch.no_grad():
            pre_BS = torch.addmm(self.b_enc, xc_BD, self.W_enc.t())
            idx_BK = topk_indices(pre_BS, k)
        vals_BK = torch.relu(sparse_encode(xc_BD, self.W_enc, self.b_enc, idx_BK, pre_BS))
        recon_BD = sparse_decode(vals_BK, idx_BK, self.W_dec, self.unit_norm_decoder) + self.b_dec
        return SAEOutput(recon_BD=recon_BD, pre_BS=pre_BS, values_BK=vals_BK, indices_BK=idx_BK)

    def prefix_sizes(self) -> list[int]:
        """Matryoshka prefix sizes for this step: fixed, or sampled anew in training."""
        assert self.prefixes is not None
        if not (self.training and self.sampled_prefixes):
            return self.prefixes
        cuts = torch.randperm(self.d_sae - 1)[: self.sampled_prefixes - 1] + 1
        return sorted(int(c) for c in cuts) + [self.d_sae]

    def _prefix_recons(self, codes_BS: Tensor) -> list[Tensor]:
        # Reconstruction of each prefix = running sum of per-segment decodes: one decode in all.
        recons, partial_BD, start = [], self.b_dec.expand(codes_BS.shape[0], -1), 0
        for end in self.prefix_sizes():
            partial_BD = partial_BD + codes_BS[:, start:end] @ self.W_dec[start:end]
            recons.append(partial_BD)
            start = end
        return recons

    def reconstruction_loss(self, x_BD: Tensor, out: SAEOutput) -> Tensor:
        """Mean squared error per element; Matryoshka: weighted mean over its prefixes."""
        if not out.prefix_recons:
            return (out.recon_BD - x_BD).pow(2).mean()
        losses = torch.stack([(r - x_BD).pow(2).mean() for r in out.prefix_recons])
        if self.prefix_weights and len(self.prefix_weights) == len(losses):
            weights = torch.tensor(self.prefix_weights, dtype=losses.dtype, device=losses.device)
            return (losses * weights).sum() / weights.sum()
        return losses.mean()

    def auxk_loss(self, x_BD: Tensor, out: SAEOutput, dead_S: Tensor, k_aux: int) -> Tensor:
        """AuxK (Gao et al. 2024): the top-k_aux *dead* latents reconstruct the residual."""
        dead_idx = dead_S.nonzero().squeeze(1)
        if dead_idx.numel() == 0 or k_aux <= 0:
            return x_BD.new_zeros(())
        resid_BD = (x_BD - out.recon_BD).detach()
        k = min(k_aux, dead_idx.numel())
        with torch.no_grad():
            pre_dead_BN = out.pre_BS.detach().index_select(1, dead_idx)
            idx_BK = dead_idx[pre_dead_BN.topk(k, dim=1, sorted=False).indices]
        xc_BD = x_BD - self.b_dec.detach()
        vals_BK = torch.relu(sparse_encode(xc_BD, self.W_enc, self.b_enc, idx_BK))
        aux_BD = sparse_decode(vals_BK, idx_BK, self.W_dec, self.unit_norm_decoder)
        return normalized_mse(aux_BD, resid_BD)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project W_dec's gradient onto the tangent of the unit sphere (dense paths; the
        sparse decode already returns a projected gradient)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel_S = torch.linalg.vecdot(grad, self.W_dec)
        grad.addcmul_(self.W_dec, parallel_S[:, None], value=-1.0)

    def architecture(self) -> dict[str, Any]:
        """Everything `build_sae` needs to rebuild this SAE (recorded in sae.json)."""
        arch: dict[str, Any] = {
            "variant": self.variant,
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "unit_norm_decoder": self.unit_norm_decoder,
            **self.activation.spec(),
        }
        if self.prefixes:
            arch.update(
                prefixes=self.prefixes,
                sampled_prefixes=self.sampled_prefixes,
                prefix_weights=self.prefix_weights,
            )
        return arch


def _check_k(k: int | None, d_sae: int, variant: str) -> int:
    if k is None:
        raise TraitsaeError(f"sae={variant} needs `sae.k` (active latents per vector); none given.")
    if not 0 < int(k) <= d_sae:
        raise TraitsaeError(
            f"sae.k={k} is out of range for sae={variant} with d_sae={d_sae}: k must be in "
            f"1..d_sae. Lower sae.k or raise sae.d_sae / sae.expansion."
        )
    return int(k)


def _check_prefixes(prefixes: list[int | float] | None, d_sae: int, sampled: int) -> list[int]:
    if sampled:
        if not 1 <= sampled <= d_sae:
            raise TraitsaeError(
                f"sae.sampled_prefixes={sampled} must be between 1 and d_sae={d_sae}."
            )
        # Validation and export use evenly spaced prefixes when training samples them.
        return sorted({max(1, d_sae * (i + 1) // sampled) for i in range(sampled)})
    if not prefixes:
        raise TraitsaeError(
            "sae=matryoshka needs `sae.prefixes` (increasing latent counts ending at d_sae, e.g. "
            f"[{d_sae // 16}, {d_sae // 4}, {d_sae}], or fractions of d_sae like [0.0625, 0.25, 1.0]) "
            "or `sae.sampled_prefixes=<n>`."
        )
    # floats in (0, 1] are fractions of d_sae, so one config fits every dictionary size
    sizes = [round(p * d_sae) if isinstance(p, float) and 0 < p <= 1 else int(p) for p in prefixes]
    increasing = all(a < b for a, b in zip(sizes, sizes[1:], strict=False))
    if not increasing or sizes[0] < 1 or sizes[-1] > d_sae:
        raise TraitsaeError(
            f"sae.prefixes={sizes} must be strictly increasing positive latent counts no larger "
            f"than d_sae={d_sae}, e.g. [{d_sae // 16}, {d_sae // 4}, {d_sae}]."
        )
    if sizes[-1] != d_sae:
        sizes.append(d_sae)  # the full dictionary always reconstructs too
    return sizes


def build_sae(
    variant: str,
    d_model: int,
    d_sae: int,
    k: int | None = None,
    *,
    threshold_momentum: float = 0.01,
    threshold_init: float = 0.05,
    bandwidth: float = 0.05,
    prefixes: list[int] | None = None,
    sampled_prefixes: int = 0,
    prefix_weights: list[float] | None = None,
    unit_norm_decoder: bool = True,
    **ignored: Any,
) -> SparseAutoencoder:
    """Build an SAE of one family; `ignored` swallows training-only keys of the `sae` config."""
    if variant not in VARIANTS:
        raise TraitsaeError(
            f"unknown SAE variant sae={variant!r}; available: {', '.join(VARIANTS)} "
            "(one yaml per variant in conf/sae/)."
        )
    d_model, d_sae = int(d_model), int(d_sae)
    if d_model < 1 or d_sae < 1:
        raise TraitsaeError(f"SAE sizes must be positive, got d_model={d_model}, d_sae={d_sae}.")
    sizes = None
    if variant == "relu":
        act: Activation = ReLU()
    elif variant == "topk":
        act = TopK(_check_k(k, d_sae, variant))
    elif variant == "batchtopk":
        act = BatchTopK(_check_k(k, d_sae, variant), threshold_momentum)
    elif variant == "jumprelu":
        act = JumpReLU(d_sae, threshold_init, bandwidth)
    else:
        act = BatchTopK(_check_k(k, d_sae, variant), threshold_momentum)
        sizes = _check_prefixes(prefixes, d_sae, int(sampled_prefixes))
    return SparseAutoencoder(
        variant,
        d_model,
        d_sae,
        act,
        prefixes=sizes,
        sampled_prefixes=int(sampled_prefixes) if variant == "matryoshka" else 0,
        prefix_weights=prefix_weights,
        unit_norm_decoder=unit_norm_decoder,
    )
