"""precision@k at CUB scale: blockwise top-k + matmul vs the research notes' argsort loop.

Also R-precision (a k per trait: each trait's own number of positives) against the same loop.

    .venv/bin/python benchmarks/precision.py [--n 5794 --m 24576 --t 312 --k 100]

Random scores (no ties) and random labels at CUB's label density. The loop runs on a slice of
directions and traits in the same process and is extrapolated linearly to the full M x T (its cost
is one argsort per pair); the two results are compared on that slice. Target: >= 100x, identical
results, peak memory < 2 GiB (ru_maxrss, which includes the scores matrix itself).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from traitsae.evaluation.core.precision import (
    precision_at_k,
    precision_at_k_loop,
    precision_at_trait_k,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5794, help="images (CUB test split)")
    parser.add_argument("--m", type=int, default=24576, help="directions (SAE latents)")
    parser.add_argument("--t", type=int, default=312, help="traits (CUB attributes)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--loop-m", type=int, default=256, help="directions in the loop's slice")
    parser.add_argument("--loop-t", type=int, default=8, help="traits in the loop's slice")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    scores_NM = rng.standard_normal((args.n, args.m), dtype=np.float32)
    labels_NT = rng.random((args.n, args.t)) < 0.1  # CUB attributes are ~10 % positive

    start = time.perf_counter()
    prec_MT = precision_at_k(scores_NM, labels_NT, [args.k], block=args.block)[args.k]
    fast_s = time.perf_counter() - start

    sl_M, sl_T = slice(0, args.loop_m), slice(0, args.loop_t)
    start = time.perf_counter()
    ref_mt = precision_at_k_loop(scores_NM[:, sl_M], labels_NT[:, sl_T], args.k)
    loop_s = time.perf_counter() - start
    loop_full_s = loop_s * (args.m * args.t) / (args.loop_m * args.loop_t)

    identical = bool(np.array_equal(ref_mt, prec_MT[sl_M, sl_T]))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"N={args.n} M={args.m} T={args.t} k={args.k} threads={torch.get_num_threads()}")
    print(f"blockwise top-k + matmul: {fast_s:8.2f} s")
    print(
        f"argsort loop:             {loop_full_s:8.0f} s (extrapolated from "
        f"{args.loop_m}x{args.loop_t} pairs in {loop_s:.2f} s)"
    )
    print(f"speed-up:                 {loop_full_s / fast_s:8.0f}x (target >= 100x)")
    print(f"identical on the slice:   {identical}")
    print(f"peak memory (RSS):        {peak_gib:8.2f} GiB (target < 2 GiB)")

    n_pos_T = labels_NT.sum(0)
    start = time.perf_counter()
    r_MT = precision_at_trait_k(scores_NM, labels_NT, n_pos_T, block=args.block)
    r_fast_s = time.perf_counter() - start
    start = time.perf_counter()
    r_ref_mt = np.stack(
        [
            precision_at_k_loop(scores_NM[:, sl_M], labels_NT[:, [t]], int(n_pos_T[t]))[:, 0]
            for t in range(args.loop_t)
        ],
        axis=1,
    )
    r_loop_s = time.perf_counter() - start
    r_loop_full_s = r_loop_s * (args.m * args.t) / (args.loop_m * args.loop_t)
    print(
        f"R-precision ({len(np.unique(n_pos_T))} distinct k): {r_fast_s:8.2f} s blockwise, "
        f"{r_loop_full_s:8.0f} s loop (extrapolated), {r_loop_full_s / r_fast_s:6.0f}x, "
        f"identical on the slice: {bool(np.array_equal(r_ref_mt, r_MT[sl_M, sl_T]))}"
    )


if __name__ == "__main__":
    main()
