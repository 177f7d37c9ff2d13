"""LightningModule that trains one SAE on streamed (float16) activation batches."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from traitsae.errors import TraitsaeError
from traitsae.sae.config import Objective, Optim, check_target_fits
from traitsae.sae.metrics import (
    FiringFrequency,
    FractionOfVarianceUnexplained,
    dense_frequency,
    fraction_of_variance_unexplained,
)
from traitsae.sae.model import SAEOutput, SparseAutoencoder
from traitsae.sae.plots import firing_histogram
from traitsae.sae.sparsity import L0Controller, SparsityPenalty, start_firing_at


@dataclass
class StepLoss:
    """The loss of one batch and its parts -- the one definition training and validation log.

    `recon` is the reconstruction objective (Matryoshka: the weighted mean over its prefixes);
    `mse` is always the full dictionary's MSE per element, so train/mse and val/mse compare.
    """

    loss: Tensor
    recon: Tensor
    mse: Tensor
    sparsity: Tensor
    auxk: Tensor | None = None


def step_loss(
    sae: SparseAutoencoder,
    x_BD: Tensor,
    out: SAEOutput,
    penalty: SparsityPenalty,
    step: int,
    penalty_factor: float = 1.0,
) -> StepLoss:
    """Reconstruction + sparsity penalty (AuxK is added by the training step)."""
    recon = sae.reconstruction_loss(x_BD, out)
    mse = recon if not out.prefix_recons else F.mse_loss(out.recon_BD.detach(), x_BD)
    sparsity = penalty(out, sae, step, penalty_factor)
    return StepLoss(loss=recon + sparsity, recon=recon, mse=mse, sparsity=sparsity)


class SAEModule(L.LightningModule):
    """Loss = reconstruction MSE + sparsity penalty + aux_coeff * AuxK (TopK family).

    Inputs arrive as raw float16 [B, D]; they are cast and scaled (x * scale, so that
    E||x||^2 = d_model) here, on the device.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        objective: Objective,
        optim: Optim,
        scale: float = 1.0,
        max_steps: int = 1000,
        figures_dir: str | None = None,
    ) -> None:
        super().__init__()
        # Plain values only: checkpoints load with weights_only=True.
        self.save_hyperparameters(
            {
                "sae": sae.architecture(),
                "objective": objective.summary(),
                "optim": asdict(optim),
                "scale": float(scale),
                "max_steps": int(max_steps),
            }
        )
        self.sae = sae
        self.penalty = objective.penalty
        self.optim_cfg = optim
        self.aux_k = objective.aux_k or self.sae.d_model // 2
        self.aux_coeff = objective.aux_coeff
        self.dead_after_steps = objective.dead_after_steps
        self.l0_controller = None
        self.target_l0_start = objective.target_l0_start
        target_l0 = objective.target_l0
        if target_l0 is not None:  # the controller sets the coefficient (no warm-up ramp)
            check_target_fits(target_l0, sae.d_sae)  # d_sae may come from sae.expansion
            ramp = round(objective.target_l0_ramp * int(max_steps))
            self.l0_controller = L0Controller(target_l0, ramp_steps=ramp)
        self.dense_freq = dense_frequency(
            objective.dense_threshold, self.sae.d_sae, self.sae.activation.k or target_l0
        )
        self.figures_dir = Path(figures_dir) if figures_dir else None
        self.register_buffer("scale", torch.tensor(float(scale)))
        # Steps since each latent last fired on any rank (dead-latent tracking, AuxK).
        self.register_buffer("steps_since_fired", torch.zeros(self.sae.d_sae, dtype=torch.long))
        d_model, d_sae = self.sae.d_model, self.sae.d_sae
        self.val_loss = MeanMetric()
        self.val_recon = MeanMetric()
        self.val_l1 = MeanMetric()
        self.val_fvu = FractionOfVarianceUnexplained(d_model)
        self.val_freq = FiringFrequency(d_sae)
        self._last_time: float | None = None

    # ---- set-up --------------------------------------------------------------------------
    def init_from_sample(self, raw_sample_ND: Tensor, b_dec_method: str) -> None:
        """Data-dependent start from a raw sample (before the first step): b_dec (mean,
        geometric_median or zeros); with `sae.target_l0`, also each latent's firing point, so
        that L0 starts at `sae.target_l0_start` x the target (see `start_firing_at`)."""
        x_ND = raw_sample_ND.float() * self.scale.cpu()
        self.sae.init_b_dec(x_ND, b_dec_method)
        if self.l0_controller is not None and self.target_l0_start > 0:
            start_firing_at(self.sae, x_ND, self.target_l0_start * self.l0_controller.target)

    def normalise(self, batch_BD: Tensor) -> Tensor:
        return batch_BD.to(self.sae.W_enc.dtype) * self.scale

    # ---- training ------------------------------------------------------------------------
    def training_step(self, batch_BD: Tensor, batch_idx: int) -> Tensor:
        loss, logs = self.training_loss(batch_BD)
        l0 = logs.pop("train/l0")
        self.log_dict(logs, on_step=True)
        self.log("train/l0", l0, on_step=True, prog_bar=True)
        self._log_throughput(batch_BD.shape[0])
        return loss

    def training_loss(self, batch_BD: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One step's loss and the metrics to log (no logging here: a grouped sweep trains
        several SAE modules on one batch and logs each under its own job)."""
        x_BD = self.normalise(batch_BD)
        out = self.sae(x_BD)
        factor = self.l0_controller.factor() if self.l0_controller is not None else 1.0
        losses = step_loss(self.sae, x_BD, out, self.penalty, self.global_step, factor)
        loss = losses.loss
        dead_S = self._track_firing(out)
        logs: dict[str, Tensor] = {}
        if self.aux_coeff > 0:
            aux = self.sae.auxk_loss(x_BD, out, dead_S, self.aux_k)
            loss = loss + self.aux_coeff * aux
            logs["train/auxk"] = aux
        self._check_finite(loss, losses.mse, x_BD)
        l0 = out.l0().mean()
        if self.l0_controller is not None:
            self.l0_controller.update(float(l0))
            coeff = self.penalty.weight(self.global_step) * factor
            logs["train/sparsity_coeff"] = torch.as_tensor(float(coeff))
        with torch.no_grad():
            fvu = fraction_of_variance_unexplained(out.recon_BD.float(), x_BD.float())
        logs.update(
            {
                "train/loss": loss,
                "train/recon": losses.recon,
                "train/mse": losses.mse,
                "train/sparsity": losses.sparsity,
                "train/fvu": fvu,
                "train/l1": out.l1(),
                "train/dead_frac": dead_S.float().mean(),
                "train/l0": l0,
            }
        )
        return loss, logs

    @torch.no_grad()
    def _track_firing(self, out: SAEOutput) -> Tensor:
        counts_S = out.fire_counts()
        if self.trainer.world_size > 1:  # every rank must agree on which latents are dead
            counts_S = self.trainer.strategy.reduce(counts_S.float(), reduce_op="sum")
        self.steps_since_fired += 1
        self.steps_since_fired[counts_S > 0] = 0
        return self.steps_since_fired >= self.dead_after_steps

    def _check_finite(self, loss: Tensor, mse: Tensor, x_BD: Tensor) -> None:
        if torch.isfinite(loss):
            return
        x = x_BD.detach()
        lr = self.optimizers().param_groups[0]["lr"] if self._trainer else float("nan")
        raise TraitsaeError(
            f"non-finite loss at step {self.global_step}: loss={loss.item()}, mse={mse.item()}, "
            f"lr={lr:.3g}; batch of {x.shape[0]} normalised vectors: "
            f"{int((~torch.isfinite(x)).sum())} non-finite values, min={x.min().item():.4g}, "
            f"max={x.max().item():.4g}, mean |x|={x.abs().mean().item():.4g}, "
            f"scale={self.scale.item():.4g}. Check the store for inf/NaN activations (float16 "
            "overflow), lower optim.lr, or set trainer.gradient_clip_val."
        )

    def _log_throughput(self, n_vectors: int) -> None:
        now = time.perf_counter()
        if self._last_time is not None:
            rate = n_vectors * self.trainer.world_size / max(now - self._last_time, 1e-9)
            self.log("vec_per_s", rate, on_step=True, prog_bar=True, logger=False)
        self._last_time = now

    # ---- optimisation --------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optim, total = self.optim_cfg, int(self.hparams.max_steps)
        # Lightning's mixed-precision plugin cannot clip the gradients of a fused optimiser
        # (it unscales internally), so fused Adam is for full precision only.
        mixed = "mixed" in str(self.trainer.precision) if self._trainer else False
        fused = self.device.type in ("cpu", "cuda") and not mixed
        optimizer = torch.optim.Adam(
            self.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: optim.lr_factor(step, total)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The sparse decode (TopK, BatchTopK, Matryoshka) returns a projected decoder gradient.
        if self.sae.unit_norm_decoder and not self.sae.activation.sparse:
            self.sae.remove_parallel_grad()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.on_after_optimizer_step()

    def on_after_optimizer_step(self) -> None:
        if self.sae.unit_norm_decoder:
            self.sae.normalize_decoder()

    # ---- validation ----------------------------------------------------------------------
    def validation_step(self, batch_BD: Tensor, batch_idx: int) -> None:
        x_BD = self.normalise(batch_BD)
        out = self.sae(x_BD)
        factor = self.l0_controller.factor() if self.l0_controller is not None else 1.0
        losses = step_loss(self.sae, x_BD, out, self.penalty, self.global_step, factor)
        n = x_BD.shape[0]
        self.val_loss.update(losses.loss, n)
        self.val_recon.update(losses.recon, n)
        self.val_l1.update(out.l1(), n)
        self.val_fvu.update(out.recon_BD, x_BD)
        self.val_freq.update(out.fire_counts(), n)

    def on_validation_epoch_end(self) -> None:
        logs = self.validation_logs()
        if logs is not None:
            self.log_dict(logs, prog_bar=False)

    def validation_logs(self) -> dict[str, Tensor] | None:
        """The round's validation metrics (None when it had no data); resets them."""
        if self.val_freq.n.item() == 0 and self.trainer.world_size == 1:
            return None  # no validation data this round
        freq_S = self.val_freq.compute()
        logs = {
            "val/loss": self.val_loss.compute(),
            "val/recon": self.val_recon.compute(),
            "val/mse": self.val_fvu.mse().float(),
            "val/fvu": self.val_fvu.compute().float(),
            "val/l0": self.val_freq.l0().float(),
            "val/l1": self.val_l1.compute(),
            "val/dead_frac": (freq_S == 0).float().mean(),
            "val/dense_frac": (freq_S > self.dense_freq).float().mean(),
        }
        for metric in (self.val_loss, self.val_recon, self.val_l1, self.val_fvu, self.val_freq):
            metric.reset()
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._save_histogram(freq_S.float().cpu())
        return logs

    def _save_histogram(self, freq_S: Tensor) -> None:
        if self.figures_dir is None:
            return
        path = self.figures_dir / f"firing_freq_step{self.global_step:07d}.png"
        title = f"{self.sae.variant} step {self.global_step}"
        firing_histogram(freq_S, path, dense_freq=self.dense_freq, title=title)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="val/firing_freq", images=[str(path)], step=self.global_step)
