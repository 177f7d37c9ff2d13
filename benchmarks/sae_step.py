"""SAE training-step time vs the encoder's forward matmul (the floor), same process.

    python benchmarks/sae_step.py [--d-model 768 --d-sae 12288 --k 32 --batch 1024 --reps 10]
                                  [--variants topk,batchtopk,matryoshka] [--bf16] [--device cpu]

The step is what SAEModule.training_step + Lightning's optimiser step run: forward (dense
encoder GEMM, selection -- per-vector top-k, or the batch's top k*B -- then the k-sparse decode;
Matryoshka: one decode into per-prefix bags), the reconstruction loss, backward (k-sparse),
fused Adam, decoder row renormalisation. Timings alternate step / matmul so machine load drifts
hit both alike; the medians are compared. Target: step <= 1.5 x the fp32 matmul. `--bf16` also
times each step under bf16 autocast (trainer.precision=bf16-mixed: the dense GEMM in bf16, the
sparse part in fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from traitsae.sae.model import build_sae
from traitsae.sae.sparse_ops import keep_freed_memory

FAMILY = {"threshold_momentum": 0.01, "prefixes": [0.0625, 0.25, 1.0]}


def machine() -> str:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                 if line.startswith("Model name")), "unknown CPU")  # fmt: skip
    return f"{name}; load average {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_step(variant: str, args: argparse.Namespace, device: torch.device, bf16: bool):
    torch.manual_seed(0)
    sae = build_sae(variant, args.d_model, args.d_sae, k=args.k, **FAMILY).to(device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x_BD = torch.randn(args.batch, args.d_model, device=device)
    dead_S = torch.zeros(args.d_sae, dtype=torch.bool, device=device)  # AuxK: no dead latents
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            out = sae(x_BD)
            loss = sae.reconstruction_loss(x_BD, out) + sae.auxk_loss(x_BD, out, dead_S, 384) / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()

    def matmul() -> None:
        with torch.no_grad():
            torch.addmm(sae.b_enc, x_BD, sae.W_enc.t())

    return step, matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=12288)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--variants", default="topk,batchtopk,matryoshka")
    parser.add_argument("--bf16", action="store_true", help="also time bf16-mixed steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--no-keep-memory", action="store_true", help="skip keep_freed_memory()")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_keep_memory:
        keep_freed_memory()  # what train() does
    precisions = [False, True] if args.bf16 else [False]
    cases = {}  # (variant, bf16) -> (step, matmul)
    for variant in args.variants.split(","):
        for bf16 in precisions:
            cases[variant, bf16] = make_step(variant, args, device, bf16)
    for step, matmul in cases.values():  # warm-up: allocator, Adam state, thresholds
        for _ in range(2):
            step()
            matmul()
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in cases}
    mm_s: list[float] = []
    for _ in range(args.reps):  # interleaved: load drift hits every case alike
        for key, (step, matmul) in cases.items():
            times[key].append(timed(step, device))
            mm_s.append(timed(matmul, device))
    t_mm = statistics.median(mm_s)
    flops = 2 * args.batch * args.d_model * args.d_sae
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    print(
        f"SAE d_model={args.d_model} d_sae={args.d_sae} k={args.k} batch={args.batch}, "
        f"{args.reps} reps, {torch.get_num_threads()} threads; {where}"
    )
    print(f"encoder matmul fp32 : {t_mm * 1e3:8.1f} ms  ({flops / t_mm / 1e9:.0f} GFLOP/s)")
    for (variant, bf16), samples in times.items():
        t = statistics.median(samples)
        label = f"{variant} {'bf16' if bf16 else 'fp32'}"
        extra = ""
        if bf16:
            extra = f"  ({statistics.median(times[variant, False]) / t:.2f}x the fp32 step speed)"
        print(
            f"{label:<16} step: {t * 1e3:8.1f} ms  ({args.batch / t:>7,.0f} samples/s)  "
            f"ratio step / matmul = {t / t_mm:.2f}  (target <= 1.5){extra}"
        )


if __name__ == "__main__":
    main()
