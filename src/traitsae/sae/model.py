"""Sparse autoencoders: x_hat = W_dec f(W_enc (x - b_dec) + b_enc) + b_dec, in normalised space.

Weights are stored latent-major: `W_enc` and `W_dec` are both [S, D] (row s = latent s), so the
decoder directions are rows and the k-sparse step can gather/scatter whole rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traitsae.config_checks import integer, number
from traitsae.errors import TraitsaeError
from traitsae.sae.activations import Activation, BatchTopK, JumpReLU, ReLU, TopK
from traitsae.sae.metrics import fraction_of_variance_unexplained
from traitsae.sae.sparse_ops import (
    owners,
    project_out_parallel_,
    row_offsets,
    sparse_decode,
    sparse_encode,
)

VARIANTS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")


@dataclass
class SAEOutput:
    """One forward pass. Dense variants fill `codes_BS`; the sparse training path fills the
    kept entries (`values_N`, `indices_N`, `rows_N`, in row order) and builds dense codes only
    when asked."""

    recon_BD: Tensor
    pre_BS: Tensor  # pre-activations (detached on the sparse path)
    codes_BS: Tensor | None = None
    values_N: Tensor | None = None
    indices_N: Tensor | None = None
    rows_N: Tensor | None = None
    prefix_recons: list[Tensor] = field(default_factory=list)  # Matryoshka: one per prefix

    @property
    def sparse(self) -> bool:
        return self.codes_BS is None and self.values_N is not None

    def dense_codes(self) -> Tensor:
        if self.codes_BS is None:
            assert self.values_N is not None and self.rows_N is not None
            zeros_BS = self.values_N.new_zeros(self.pre_BS.shape)
            self.codes_BS = zeros_BS.index_put((self.rows_N, self.indices_N), self.values_N)
        return self.codes_BS

    def fire_counts(self) -> Tensor:
        """How many vectors of the batch fired each latent -> [S] (no gradient)."""
        n_latents = self.pre_BS.shape[1]
        if self.sparse:
            return torch.bincount(self.indices_N[self.values_N.detach() > 0], minlength=n_latents)
        return (self.dense_codes().detach() > 0).sum(0)

    def l0(self) -> Tensor:
        """Active latents per vector -> [B] float."""
        if self.sparse:
            fired_rows = self.rows_N[self.values_N.detach() > 0]
            return torch.bincount(fired_rows, minlength=self.pre_BS.shape[0]).float()
        return (self.dense_codes().detach() > 0).sum(1).float()

    def l1(self) -> Tensor:
        """Mean sum of |codes| per vector (no gradient)."""
        with torch.no_grad():
            if self.sparse:
                return self.values_N.abs().sum() / self.pre_BS.shape[0]
            return self.dense_codes().abs().sum(1).mean()


def geometric_median(points_ND: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    median_D = points_ND.mean(0)
    for _ in range(iters):
        dist_N = (points_ND - median_D).norm(dim=1).clamp_min(1e-8)
        weights_N = 1.0 / dist_N
        new_D = (weights_N[:, None] * points_ND).sum(0) / weights_N.sum()
        if (new_D - median_D).norm() <= tol * median_D.norm().clamp_min(1e-8):
            return new_D
        median_D = new_D
    return median_D


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

    @torch.no_grad()
    def init_b_dec(self, x_ND: Tensor, method: str) -> None:
        """b_dec from normalised data before the first step (`sae.b_dec_init`): mean,
        geometric_median or zeros. Training and the untrained-SAE baseline both start here."""
        if method == "zeros":
            self.b_dec.zero_()
        elif method == "mean":
            self.b_dec.copy_(x_ND.float().mean(0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(x_ND.double()).float())
        else:
            raise TraitsaeError(
                f"sae.b_dec_init={method!r} is unknown; use mean, geometric_median or zeros."
            )

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
        if self.training and self.activation.sparse:
            return self._forward_sparse(x_BD)
        pre_BS = self.pre_acts(x_BD)
        codes_BS = self.activation(pre_BS)
        if not self.prefixes:
            return SAEOutput(recon_BD=self.decode(codes_BS), pre_BS=pre_BS, codes_BS=codes_BS)
        recons = self._prefix_recons(codes_BS)  # the last prefix is the whole dictionary
        return SAEOutput(recons[-1], pre_BS=pre_BS, codes_BS=codes_BS, prefix_recons=recons)

    def _forward_sparse(self, x_BD: Tensor) -> SAEOutput:
        """One dense GEMM without autograd (bf16 under autocast), the activation's selection,
        then everything on the kept entries, in float32."""
        n_rows = x_BD.shape[0]
        with torch.no_grad():
            pre_BS = torch.addmm(self.b_enc, x_BD - self.b_dec, self.W_enc.t())
            idx_N, crow = self.activation.select(pre_BS)
            rows_N = owners(crow, idx_N.numel())
            if self.prefixes:  # Matryoshka: one bag per (row, prefix segment)
                bounds = torch.tensor(self.prefix_sizes()[:-1], device=idx_N.device)
                n_seg = len(bounds) + 1
                bag_N = rows_N * n_seg + torch.bucketize(idx_N, bounds, right=True)
                if (bag_N[1:] < bag_N[:-1]).any():  # BatchTopK's entries come sorted already
                    order = bag_N.argsort(stable=True)  # rows stay in order: bags are row-major
                    idx_N, rows_N, bag_N = idx_N[order], rows_N[order], bag_N[order]
                bags = row_offsets(bag_N, n_rows * n_seg)
        with torch.autocast(x_BD.device.type, enabled=False):
            x_BD = x_BD.to(self.W_enc.dtype)
            vals_N = sparse_encode(x_BD, self.b_dec, self.W_enc, self.b_enc, idx_N, crow, pre_BS)
            vals_N = torch.relu(vals_N)
            if not self.prefixes:
                recon_BD = sparse_decode(vals_N, idx_N, self.W_dec, crow, self.unit_norm_decoder)
                recon_BD = recon_BD + self.b_dec
                prefix_recons = []
            else:
                seg_XD = sparse_decode(vals_N, idx_N, self.W_dec, bags, self.unit_norm_decoder)
                seg_BGD = seg_XD.view(n_rows, n_seg, -1)
                prefix_recons = [seg_BGD[:, 0] + self.b_dec]
                for g in range(1, n_seg):  # each prefix = the previous one + its segment
                    prefix_recons.append(prefix_recons[-1] + seg_BGD[:, g])
                recon_BD = prefix_recons[-1]
        return SAEOutput(
            recon_BD=recon_BD,
            pre_BS=pre_BS,
            values_N=vals_N,
            indices_N=idx_N,
            rows_N=rows_N,
            prefix_recons=prefix_recons,
        )

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
        # F.mse_loss: one fused pass over [B, D] each way, not sub, pow and mean apart.
        if not out.prefix_recons:
            return F.mse_loss(out.recon_BD, x_BD)
        losses = torch.stack([F.mse_loss(r, x_BD) for r in out.prefix_recons])
        if self.prefix_weights and len(self.prefix_weights) == len(losses):
            weights = torch.tensor(self.prefix_weights, dtype=losses.dtype, device=losses.device)
            return (losses * weights).sum() / weights.sum()
        return losses.mean()

    def auxk_loss(self, x_BD: Tensor, out: SAEOutput, dead_S: Tensor, k_aux: int) -> Tensor:
        """AuxK (Gao et al. 2024): the top-k_aux *dead* latents reconstruct the residual."""
        dead_idx = dead_S.nonzero().squeeze(1)
        if dead_idx.numel() == 0 or k_aux <= 0:
            return x_BD.new_zeros(())
        resid_BD = (x_BD - out.recon_BD).detach().to(self.W_enc.dtype)
        k = min(k_aux, dead_idx.numel())
        n_rows = x_BD.shape[0]
        with torch.no_grad():
            pre_dead_BN = out.pre_BS.detach().index_select(1, dead_idx)
            idx_N = dead_idx[pre_dead_BN.topk(k, dim=1, sorted=False).indices].reshape(-1)
            crow = torch.arange(0, n_rows * k + 1, k, device=x_BD.device)
        with torch.autocast(x_BD.device.type, enabled=False):
            x_BD, b_dec_D = x_BD.to(self.W_enc.dtype), self.b_dec.detach()
            vals_N = torch.relu(sparse_encode(x_BD, b_dec_D, self.W_enc, self.b_enc, idx_N, crow))
            aux_BD = sparse_decode(vals_N, idx_N, self.W_dec, crow, self.unit_norm_decoder)
            return fraction_of_variance_unexplained(aux_BD, resid_BD)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project W_dec's gradient onto the tangent of the unit sphere (dense paths; the
        sparse decode already returns a projected gradient)."""
        grad = self.W_dec.grad
        if grad is not None:
            project_out_parallel_(grad, self.W_dec, torch.linalg.vecdot(grad, self.W_dec))

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


def _needed(variant: str, **option: Any) -> float:
    ((name, value),) = option.items()
    if value is None:
        raise TraitsaeError(
            f"sae={variant} needs `sae.{name}`; none given. Its default is in "
            f"conf/sae/{variant}.yaml: compose the config from there (or pass sae.{name}=...)."
        )
    return number(f"sae.{name}", value, positive=True)


def _check_k(k: Any, d_sae: int | None, variant: str) -> int:
    if k is None:
        raise TraitsaeError(f"sae={variant} needs `sae.k` (active latents per vector); none given.")
    k = integer("sae.k", k)
    if k < 1 or (d_sae is not None and k > d_sae):
        raise TraitsaeError(
            f"sae.k={k} is out of range for sae={variant} with d_sae={d_sae}: k must be in "
            f"1..d_sae. Lower sae.k or raise sae.d_sae / sae.expansion."
        )
    return k


def _check_prefixes(prefixes: Any, d_sae: int | None, sampled: int) -> list[int] | None:
    """Matryoshka's prefix sizes; None while d_sae is unknown (only the values are checked)."""
    if sampled:
        if sampled < 1 or (d_sae is not None and sampled > d_sae):
            raise TraitsaeError(
                f"sae.sampled_prefixes={sampled} must be between 1 and d_sae={d_sae}."
            )
        if d_sae is None:
            return None
        # Validation and export use evenly spaced prefixes when training samples them.
        return sorted({max(1, d_sae * (i + 1) // sampled) for i in range(sampled)})
    shown = d_sae or 1024  # an example size for the message
    if not prefixes:
        raise TraitsaeError(
            "sae=matryoshka needs `sae.prefixes` (increasing latent counts ending at d_sae, e.g. "
            f"[{shown // 16}, {shown // 4}, {shown}], or fractions of d_sae like "
            "[0.0625, 0.25, 1.0]) or `sae.sampled_prefixes=<n>`."
        )
    values = [number("sae.prefixes", p) for p in prefixes]
    if d_sae is None:
        if min(values) <= 0:
            raise TraitsaeError(f"sae.prefixes={list(prefixes)} must be positive latent counts.")
        return None
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


def check_family(
    variant: str,
    d_sae: int | None,
    k: Any = None,
    threshold_momentum: Any = None,
    threshold_init: Any = None,
    bandwidth: Any = None,
    prefixes: Any = None,
    sampled_prefixes: Any = 0,
) -> dict[str, Any]:
    """A family's settings checked and normalised: the one place every SAE's settings are
    checked, up front for a training config (`d_sae=None` while it depends on the store's
    d_model: the checks against d_sae wait until it is known) and again by `build_sae`.

    Returns the settings the family uses (`k`, `threshold_momentum`, `threshold_init`,
    `bandwidth`, `sampled_prefixes`, `prefixes` as latent counts, or None while d_sae is unknown).
    """
    if variant not in VARIANTS:
        raise TraitsaeError(
            f"unknown SAE variant sae={variant!r}; available: {', '.join(VARIANTS)} "
            "(choose with sae=<name>; each is a yaml file in conf/sae/)."
        )
    family: dict[str, Any] = {}
    if variant in ("topk", "batchtopk", "matryoshka"):
        family["k"] = _check_k(k, d_sae, variant)
    if variant in ("batchtopk", "matryoshka"):
        family["threshold_momentum"] = _needed(variant, threshold_momentum=threshold_momentum)
    if variant == "jumprelu":
        family["threshold_init"] = _needed(variant, threshold_init=threshold_init)
        family["bandwidth"] = _needed(variant, bandwidth=bandwidth)
    if variant == "matryoshka":
        sampled = integer("sae.sampled_prefixes", sampled_prefixes or 0, minimum=0)
        family["sampled_prefixes"] = sampled
        family["prefixes"] = _check_prefixes(prefixes, d_sae, sampled)
    return family


def build_sae(
    variant: str,
    d_model: int,
    d_sae: int,
    k: int | None = None,
    *,
    threshold_momentum: float | None = None,
    threshold_init: float | None = None,
    bandwidth: float | None = None,
    prefixes: list[int] | None = None,
    sampled_prefixes: int = 0,
    prefix_weights: list[float] | None = None,
    unit_norm_decoder: bool = True,
    **ignored: Any,
) -> SparseAutoencoder:
    """Build an SAE of one family; `ignored` swallows training-only keys of the `sae` config.

    A family's hyperparameters (threshold_momentum for BatchTopK and Matryoshka,
    threshold_init and bandwidth for JumpReLU) have their defaults in conf/sae/ only: they
    must be given here."""
    d_model, d_sae = int(d_model), int(d_sae)
    if d_model < 1 or d_sae < 1:
        raise TraitsaeError(f"SAE sizes must be positive, got d_model={d_model}, d_sae={d_sae}.")
    family = check_family(
        variant, d_sae, k, threshold_momentum, threshold_init, bandwidth, prefixes,
        sampled_prefixes,
    )  # fmt: skip
    if variant == "relu":
        act: Activation = ReLU()
    elif variant == "topk":
        act = TopK(family["k"])
    elif variant == "jumprelu":
        act = JumpReLU(d_sae, family["threshold_init"], family["bandwidth"])
    else:  # batchtopk, matryoshka
        act = BatchTopK(family["k"], family["threshold_momentum"])
    return SparseAutoencoder(
        variant,
        d_model,
        d_sae,
        act,
        prefixes=family.get("prefixes"),
        sampled_prefixes=family.get("sampled_prefixes", 0),
        prefix_weights=prefix_weights,
        unit_norm_decoder=unit_norm_decoder,
    )
