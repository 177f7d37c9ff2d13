"""One LightningModule that trains several SAE modules on the same batches.

Each member keeps its own parameters, optimiser state (its own param group of one Adam: Adam's
state is per parameter, so this is N independent optimisers), lr schedule, gradient clipping and
decoder constraints, so a member follows the same trajectory as a solo run of its config.
Metrics are logged as `m<i>/<name>`; `MemberLogger` routes them to that job's own logger.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from traitsae.sae.module import SAEModule

MEMBER_KEY = re.compile(r"^m(\d+)/")


def member_prefix(index: int) -> str:
    return f"m{index}/"


class SAEGroupModule(L.LightningModule):
    def __init__(self, members: list[SAEModule]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def setup(self, stage: str) -> None:
        for member in self.members:  # members read the trainer (step, world size, loggers)
            member.trainer = self.trainer

    def training_step(self, batch_BD: Tensor, batch_idx: int) -> Tensor:
        # Parameters are disjoint, so backward of the sum gives every member its own gradient.
        total = batch_BD.new_zeros((), dtype=torch.float32)
        for index, member in enumerate(self.members):
            loss, logs = member.training_loss(batch_BD)
            self.log_dict(_prefixed(index, logs), on_step=True)
            total = total + loss
        return total

    def validation_step(self, batch_BD: Tensor, batch_idx: int) -> None:
        for member in self.members:
            member.validation_step(batch_BD, batch_idx)

    def on_validation_epoch_end(self) -> None:
        for index, member in enumerate(self.members):
            logs = member.validation_logs()
            if logs is not None:
                self.log_dict(_prefixed(index, logs))

    def configure_optimizers(self) -> dict[str, Any]:
        """One Adam with a param group per member, one LambdaLR with a schedule per group."""
        solo = [member.configure_optimizers() for member in self.members]
        groups = [dict(s["optimizer"].param_groups[0]) for s in solo]
        fused = bool(groups[0].get("fused"))
        optimizer = torch.optim.Adam(groups, lr=groups[0]["lr"], fused=fused)
        lambdas = [s["lr_scheduler"]["scheduler"].lr_lambdas[0] for s in solo]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for member in self.members:
            member.on_before_optimizer_step(optimizer)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each member's gradient on its own, as its solo run would (not the group norm)."""
        if not gradient_clip_val:
            return
        for group in optimizer.param_groups:
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(group["params"], gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(group["params"], gradient_clip_val)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        for member in self.members:
            member.on_after_optimizer_step()


def _prefixed(index: int, logs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {member_prefix(index) + key: value for key, value in logs.items()}


def member_metrics(metrics: dict[str, Any], index: int) -> dict[str, Any]:
    """A member's metrics with the `m<i>/` prefix removed, plus the shared ones (epoch, step)."""
    own = {}
    for key, value in metrics.items():
        match = MEMBER_KEY.match(key)
        if match is None:
            own[key] = value
        elif int(match.group(1)) == index:
            own[key[match.end() :]] = value
    return own


class MemberLogger(Logger):
    """A job's own logger (CSV, wandb, ...) that sees only that job's metrics."""

    def __init__(self, index: int, inner: Logger) -> None:
        super().__init__()
        self.index, self.inner = index, inner

    @property
    def name(self) -> str | None:
        return self.inner.name

    @property
    def version(self) -> int | str | None:
        return self.inner.version

    @property
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    def log_dir(self) -> str | None:
        return getattr(self.inner, "log_dir", None)

    @property
    def experiment(self) -> Any:
        return self.inner.experiment

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.inner.log_hyperparams(params, *args, **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        own = member_metrics(metrics, self.index)
        if own:
            self.inner.log_metrics(own, step)

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self.inner.finalize(status)
