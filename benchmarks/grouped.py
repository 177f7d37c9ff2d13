"""A grouped sweep's training step vs N solo steps: the cost of training N SAEs on one batch.

    python benchmarks/grouped.py [--members 8 --d-model 768 --d-sae 12288 --k 32 --batch 1024]
                                 [--steps 6 --rounds 2] [--auxk] [--device gpu --precision bf16-mixed]

Both go through Lightning's fit loop on the same in-memory float16 batches: a solo SAEModule,
and an SAEGroupModule of `--members` SAEModules (what hydra/launcher=grouped trains). Fits
alternate solo / group `--rounds` times so machine load drifts hit both alike; per-step medians
(after warm-up steps) are compared. Target: group step <= 1.05 x members x solo step. The data
side is shared by construction: a group reads each batch from the store once for all members.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from traitsae.sae.module import SAEModule
from traitsae.sae.sparse_ops import keep_freed_memory
from traitsae.training.config import TrainConfig
from traitsae.training.group_module import SAEGroupModule

REPO = Path(__file__).resolve().parents[1]

WARMUP = 2


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        sync()  # CUDA runs asynchronously: a step has ended when its kernels have
        self.times.append(time.perf_counter() - self._start)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def member(args: argparse.Namespace, seed: int) -> SAEModule:
    """A TopK member built from the real conf/ (so the benchmark follows the config's keys)."""
    overrides = ["sae=topk", f"sae.k={args.k}", f"sae.d_sae={args.d_sae}", "sparsity=none",
                 "optim.lr=1e-4", "optim.warmup_steps=0", "optim.decay=constant"]  # fmt: skip
    if args.auxk:  # every latent that missed the last batch counts as dead: AuxK every step
        overrides.append("sae.dead_after_steps=1")
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=overrides)
    config = TrainConfig.from_cfg(cfg)
    torch.manual_seed(seed)
    sae = config.architecture.build(args.d_model)
    return SAEModule(sae, config.objective, config.optim, max_steps=10**6)


def fit_steps(
    module: L.LightningModule, batches: list[torch.Tensor], args: argparse.Namespace
) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_steps=len(batches), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
        callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.times[WARMUP:]


def where(args: argparse.Namespace) -> str:
    if args.device == "gpu":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f} (1 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=12288)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per fit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--auxk", action="store_true", help="AuxK every step (slower steps)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    keep_freed_memory()  # what train() does
    batches = [torch.randn(args.batch, args.d_model).half() for _ in range(WARMUP + args.steps)]
    solo_s, group_s = [], []
    for _ in range(args.rounds):
        solo_s += fit_steps(member(args, 0), batches, args)
        group = SAEGroupModule([member(args, seed) for seed in range(args.members)])
        group_s += fit_steps(group, batches, args)
    t_solo, t_group = statistics.median(solo_s), statistics.median(group_s)
    print(
        f"TopK SAEs d_model={args.d_model} d_sae={args.d_sae} k={args.k} batch={args.batch} "
        f"{args.precision} on {where(args)}, {args.rounds} rounds x {args.steps} steps"
    )
    print(f"solo step            : {t_solo * 1e3:8.1f} ms")
    print(f"group of {args.members} step      : {t_group * 1e3:8.1f} ms")
    ratio = t_group / (args.members * t_solo)
    print(f"group / ({args.members} x solo) = {ratio:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
