"""A Lightning callback for benchmarks/gpu.sh: samples/s and the share of step time spent
waiting for the loader (from the end of one step to the start of the next)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class LoaderShare(L.Callback):
    def __init__(self, skip_steps: int = 20) -> None:
        self.skip_steps = skip_steps  # start-up: allocator, cuDNN/cuBLAS heuristics, workers
        self.wait_s = self.compute_s = 0.0
        self.samples = 0
        self._end: float | None = None
        self._start = 0.0

    @staticmethod
    def _now(trainer: Any) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self._start = self._now(trainer)
        if self._end is not None and trainer.global_step >= self.skip_steps:
            self.wait_s += self._start - self._end

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self._end = self._now(trainer)
        if trainer.global_step > self.skip_steps:
            self.compute_s += self._end - self._start
            self.samples += int(args[1].shape[0])

    def on_train_end(self, trainer: Any, module: Any) -> None:
        total = self.wait_s + self.compute_s
        if total > 0:
            print(
                f"training: {self.samples / total:,.0f} samples/s over {self.samples:,} samples; "
                f"loader wait {self.wait_s / total:.1%} of step time"
            )
