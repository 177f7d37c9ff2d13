"""Pluggable sparsity penalties, chosen by `sparsity: {_target_: ...}` in the config.

A penalty maps one forward pass to a scalar added to the loss. The coefficient ramps up
linearly over `warmup_steps` (sparsity warm-up: let the dictionary learn to reconstruct
before it is pushed to be sparse). To add one: subclass `SparsityPenalty`, implement
`per_vector`, and write `conf/sparsity/<name>.yaml` with its `_target_`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from traitsae.errors import TraitsaeError
from traitsae.sae.activations import JumpReLU, ReLU, step_ste
from traitsae.sae.model import SAEOutput, SparseAutoencoder


class SparsityPenalty:
    name = "penalty"

    def __init__(self, coeff: float, warmup_steps: int = 0) -> None:  # 0: no ramp
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

    def __call__(
        self, out: SAEOutput, sae: SparseAutoencoder, step: int, factor: float = 1.0
    ) -> Tensor:
        """The penalty of this batch; `factor` scales the coefficient (see L0Controller)."""
        weight = self.weight(step) * factor
        if weight == 0.0:
            return out.recon_BD.new_zeros(())
        return weight * self.per_vector(out, sae).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coeff={self.coeff}, warmup_steps={self.warmup_steps})"


class NoPenalty(SparsityPenalty):
    """For families whose sparsity is structural (TopK, BatchTopK, Matryoshka)."""

    name = "none"

    def __init__(self) -> None:
        super().__init__(coeff=0.0, warmup_steps=0)

    def __call__(
        self, out: SAEOutput, sae: SparseAutoencoder, step: int, factor: float = 1.0
    ) -> Tensor:
        return out.recon_BD.new_zeros(())


class L1Penalty(SparsityPenalty):
    """sum_s |f_s| * ||W_dec[s]|| (decoder-norm weighting stops the SAE from shrinking codes
    while growing decoder rows, when decoder rows are not kept at unit norm)."""

    name = "l1"

    def __init__(self, coeff: float, warmup_steps: int, weight_by_decoder_norm: bool) -> None:
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

    def __init__(self, coeff: float, warmup_steps: int, scale: float) -> None:
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


MAX_LOG_FACTOR = math.log(1e4)


class L0Controller(nn.Module):
    """Sparsity on request (`sae.target_l0`): adapts the penalty coefficient until the L0 of
    training batches reaches the target.

    A PI controller in log space: with e = log(L0_ema / reference) (an exponential moving
    average of the batch L0), the coefficient is multiplied by exp(integral_gain * sum(e) +
    proportional_gain * e). Log space makes it scale-free (the same gains for an L0 of 8 or
    of 800) and keeps the coefficient positive. It replaces the penalty's warm-up ramp (a
    ramp under an integrating controller winds it up). Its state is in buffers, so
    checkpoints resume it.

    The reference moves log-linearly from the first batch's L0 down to the target over
    `ramp_steps` steps, then stays there: L0 falls at a pace Adam can follow (the step size,
    not the coefficient, sets how fast it can fall), so the integral does not store up a
    coefficient that collapses L0 once it takes effect, and the decoder learns on the way.

    The default start (`start_firing_at`, `sae.target_l0_start`) puts L0 near the target from
    step 0 with the coefficient still at `sparsity.coeff`, far from the one that holds it
    (x4 on the dictionary, x20 on the small test store), so the integral must be quick to get
    there: integral_gain 0.1 (0.03 left relu 14 % above the target after 400 test steps).

    Anti-wind-up by conditional integration as well: the integral holds while L0 is moving
    towards the reference fast enough to close the gap within `horizon` steps; a slower
    approach still integrates, so a stalled L0 is pushed on.
    """

    def __init__(
        self,
        target: float,
        ramp_steps: int = 0,
        integral_gain: float = 0.1,
        proportional_gain: float = 1.0,
        ema_momentum: float = 0.1,
        horizon: float = 100.0,
    ) -> None:
        super().__init__()
        self.target = float(target)
        self.ramp_steps = int(ramp_steps)
        self.integral_gain = integral_gain
        self.proportional_gain = proportional_gain
        self.ema_momentum = ema_momentum
        self.horizon = horizon
        self.register_buffer("log_integral", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("l0_ema", torch.tensor(-1.0, dtype=torch.float64))
        # the reference's start (the first batch's L0) and the updates so far: what
        # `reference()` needs to resume exactly
        self.register_buffer("l0_start", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("n_updates", torch.tensor(0, dtype=torch.long))

    def reference(self, step: int | None = None) -> float:
        """The L0 the controller tracks after `step` updates (default: so far)."""
        step = int(self.n_updates) if step is None else step
        start = float(self.l0_start)
        if self.ramp_steps <= 0 or start <= self.target:  # already sparse enough: no ramp
            return self.target
        progress = min(1.0, step / self.ramp_steps)
        return math.exp((1 - progress) * math.log(start) + progress * math.log(self.target))

    def factor(self) -> float:
        """The multiplier of the penalty coefficient for the next step."""
        if self.l0_ema.item() < 0:
            return 1.0
        # bounded kick: at the start L0 can be 100x the target, and a 100x coefficient at once
        # drives Adam to shrink every encoder row until all codes die
        error = max(-1.0, min(1.0, self._error()))
        return math.exp(float(self.log_integral) + self.proportional_gain * error)

    @torch.no_grad()
    def update(self, l0: float) -> None:
        """Feed one batch's mean L0 (after its step)."""
        if self.l0_ema.item() < 0:
            self.l0_ema.fill_(l0)
            self.l0_start.fill_(max(l0, 1e-3))
            self.n_updates.fill_(1)
            return
        before = self._error()
        self.n_updates += 1
        self.l0_ema.lerp_(torch.tensor(l0, dtype=torch.float64), self.ema_momentum)
        error = self._error()
        if error * (before - error) * self.horizon > error * error:  # closing fast enough
            return
        # bounded steps: a batch with L0 = 0 must not throw the coefficient away; bounded
        # integral: a last guard for a target the penalty cannot reach
        step = self.integral_gain * max(-2.0, min(2.0, error))
        self.log_integral.copy_((self.log_integral + step).clamp(-MAX_LOG_FACTOR, MAX_LOG_FACTOR))

    def _error(self) -> float:
        return math.log(max(float(self.l0_ema), 1e-3) / self.reference())


@torch.no_grad()
def start_firing_at(sae: SparseAutoencoder, x_ND: Tensor, l0: float) -> None:
    """Set each latent's firing point so that it fires on a fraction l0 / d_sae of `x_ND`
    (normalised vectors; b_dec set already): the SAE then starts at an L0 of about `l0`.

    ReLU: b_enc = -(that quantile of the pre-activations); JumpReLU: the thresholds. A random
    unit encoder row gives pre-activations of unit scale, so the L0 of a cold start is
    hundreds; what moves it down is slow (Adam moves b_enc and the log-thresholds by <= lr
    per step, thousands of steps for an L0 of 8 in 2048), and shrinking the encoder rows
    instead (what an L1 penalty does first) kills the codes.
    """
    act = sae.activation
    if not isinstance(act, JumpReLU | ReLU):
        raise TraitsaeError(f"a firing start applies to relu/jumprelu, not sae={sae.variant}.")
    n = x_ND.shape[0]
    n_fire = max(1, min(n - 1, round(n * l0 / sae.d_sae)))
    centred_ND = x_ND.to(sae.W_enc.dtype) - sae.b_dec
    # per latent, the (n_fire + 1)-th largest pre-activation (b_enc = 0): n_fire of the sample
    # lie above it; latents in chunks, so the [N, chunk] block stays small at any width
    point_S = torch.cat(
        [(centred_ND @ w_CD.T).topk(n_fire + 1, dim=0).values[-1] for w_CD in sae.W_enc.split(2048)]
    )
    sae.b_enc.zero_()
    if isinstance(act, JumpReLU):
        act.log_threshold.copy_(point_S.clamp_min(1e-3).log())
    else:
        sae.b_enc.copy_(-point_S)
