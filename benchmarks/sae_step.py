"""TopK SAE training-step time vs the encoder's forward matmul (the floor), same process.

    python benchmarks/sae_step.py [--d-model 768 --d-sae 12288 --k 32 --batch 1024 --reps 10]

The step is what SAEModule.training_step + Lightning's optimiser step run: forward (dense
encoder GEMM, top-k, k-sparse decode), MSE + AuxK loss, backward (k-sparse), fused Adam, decoder
row renormalisation. Timings alternate step / matmul so machine load drifts hit both alike;
the medians are compared. Target: step <= 1.5 x matmul.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from traitsae.sae.model import build_sae
from traitsae.sae.sparse_ops import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=12288)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--no-keep-memory", action="store_true", help="skip keep_freed_memory()")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_keep_memory:
        keep_freed_memory()  # what train() does
    torch.manual_seed(0)

    sae = build_sae("topk", args.d_model, args.d_sae, k=args.k).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x_BD = torch.randn(args.batch, args.d_model)
    dead_S = torch.zeros(args.d_sae, dtype=torch.bool)  # AuxK runs only when latents are dead

    def step() -> None:
        out = sae(x_BD)
        loss = sae.reconstruction_loss(x_BD, out) + sae.auxk_loss(x_BD, out, dead_S, 384) / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()

    def matmul() -> None:
        with torch.no_grad():
            torch.addmm(sae.b_enc, x_BD, sae.W_enc.t())

    for _ in range(2):  # warm-up: allocator, Adam state
        step()
        matmul()
    step_s, mm_s = [], []
    for _ in range(args.reps):
        for fn, times in ((step, step_s), (matmul, mm_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    t_step, t_mm = statistics.median(step_s), statistics.median(mm_s)
    flops = 2 * args.batch * args.d_model * args.d_sae
    print(
        f"TopK SAE d_model={args.d_model} d_sae={args.d_sae} k={args.k} batch={args.batch} fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"encoder matmul : {t_mm * 1e3:8.1f} ms  ({flops / t_mm / 1e9:.0f} GFLOP/s)")
    print(f"training step  : {t_step * 1e3:8.1f} ms  ({args.batch / t_step:,.0f} samples/s)")
    print(f"ratio step / matmul = {t_step / t_mm:.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
