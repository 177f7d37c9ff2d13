"""eval=discovery with and without its permutation null, and eval=features, on >= 1 M patches.

    .venv/bin/python benchmarks/discovery.py [--images 4096 --grid 16 --d-model 128 --d-sae 4096]

Writes a random float16 store (default 4096 images x 256 patches = 1,048,576 patches, two
groups of 2048 images) and a random TopK SAE, then times each pass in a fresh subprocess so that
its peak memory (ru_maxrss) is its own:
- `discovery`: the scoring pass (image-level scores of both groups) + the statistics with
  eval.n_permutations=0 (held-out half, AUROC, candidates, no null);
- `discovery+null`: the same with 1000 permutations (default eval.max_permutations refinement);
- `features`: firing counts + per-latent running top-k.
The two discovery passes alternate (`--repeats` times each) so machine load drifts hit both;
the ratio of their medians is the cost of the null (target <= 1.5).
Reported: patches/s, seconds in the statistics, and peak RSS above the process's resident size
before the pass. Memory stays bounded by batch_patches x d_sae plus n_group_images x d_sae.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, n_images: int, grid: int, d_model: int) -> None:
    from traitsae.data.store import create_store

    rng = np.random.default_rng(0)
    acts_NPD = np.empty((n_images, grid * grid, d_model), dtype=np.float16)
    for start in range(0, n_images, 256):  # fill in slices: float32 temporaries stay small
        block = rng.standard_normal((min(256, n_images - start), grid * grid, d_model), np.float32)
        acts_NPD[start : start + len(block)] = block
    species = np.where(np.arange(n_images) % 2 == 0, "erato", "melpomene")
    create_store(
        path,
        patches={0: acts_NPD},
        cls={0: acts_NPD[:, 0]},
        images={"path": np.array([f"img_{i}.png" for i in range(n_images)]), "species": species},
        attrs={
            "backbone": "bench",
            "dataset": "bench",
            "split": "test",
            "depth": 1,
            "grid": [grid, grid],
            "image_size": grid * 8,
        },
    )


def make_sae(run_dir: Path, d_model: int, d_sae: int, k: int) -> None:
    import torch

    from traitsae.sae.export import save_sae
    from traitsae.sae.model import build_sae

    torch.manual_seed(0)
    sae = build_sae(variant="topk", d_model=d_model, d_sae=d_sae, k=k)
    save_sae(
        sae,
        run_dir,
        meta={
            "backbone": "bench",
            "dataset": "bench",
            "layer": 0,
            "tokens": "patches",
            "scale": 1.0,
        },
    )


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_pass(name: str, store_path: Path, run_dir: Path, batch_patches: int) -> dict:
    """Time one pass in this process (called in a fresh subprocess)."""
    import torch

    from traitsae.data.store import Store
    from traitsae.evaluation import discovery, discovery_stats, features
    from traitsae.sae.export import load_sae

    torch.set_flush_denormal(True)
    sae = load_sae(run_dir)
    stats_seconds = 0.0
    with Store(store_path) as store:
        meta = store.metadata
        before = current_rss_mib()
        start = time.perf_counter()
        if name.startswith("discovery"):
            mask_a = discovery.group_mask(meta, {"species": ["erato"]}, "group_a", "bench")
            mask_b = discovery.group_mask(meta, {"species": ["melpomene"]}, "group_b", "bench")
            scores = discovery.collect_scores(
                store, sae, mask_a, mask_b, batch_patches=batch_patches, progress=False
            )
            null = discovery_stats.NullOptions(n_permutations=1000 if name.endswith("null") else 0)
            stats_start = time.perf_counter()
            result = discovery_stats.contrast(
                scores.scores_NS, scores.in_a, discovery_stats.RankingRule(), null, progress=False
            )
            stats_seconds = time.perf_counter() - stats_start
            refined = int((result.latents.permutations > null.n_permutations).sum())
        else:
            features.scan(store, sae, top_k=16, batch_patches=batch_patches)
            refined = 0
        seconds = time.perf_counter() - start
        n_patches = store.n_images * store.n_patches
    return {
        "pass": name,
        "patches": n_patches,
        "seconds": round(seconds, 2),
        "stats_seconds": round(stats_seconds, 2),
        "refined_latents": refined,
        "patches_per_s": round(n_patches / seconds),
        "peak_rss_mib": round(rss_mib()),
        "peak_above_start_mib": round(rss_mib() - before),
    }


def one_pass(name: str, workdir: Path, batch_patches: int) -> dict:
    cmd = [sys.executable, __file__, "--one-pass", name, "--workdir", str(workdir)]
    cmd += ["--batch-patches", str(batch_patches)]
    stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(stdout.strip().splitlines()[-1])


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    load = Path("/proc/loadavg").read_text().split()[:3]
    return f"{model}, {len(os.sched_getaffinity(0))} cores, load {' '.join(load)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=16, help="patch grid side (P = grid^2)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-patches", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each discovery pass")
    parser.add_argument(
        "--one-pass", choices=("discovery", "discovery+null", "features"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="traitsae_bench_"))
    store_path, run_dir = workdir / "bench.h5", workdir / "sae"
    if args.one_pass:
        print(json.dumps(run_pass(args.one_pass, store_path, run_dir, args.batch_patches)))
        return
    if not store_path.exists():
        make_store(store_path, args.images, args.grid, args.d_model)
    make_sae(run_dir, args.d_model, args.d_sae, args.k)
    size_mib = store_path.stat().st_size / 2**20
    print(
        f"store: {args.images} images x {args.grid**2} patches = {args.images * args.grid**2:,} "
        f"patches, d_model {args.d_model} ({size_mib:.0f} MiB); SAE d_sae {args.d_sae}, "
        f"TopK k={args.k}; batch_patches {args.batch_patches}\nmachine: {machine()}"
    )
    runs: dict[str, list[dict]] = {"discovery": [], "discovery+null": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(one_pass(name, workdir, args.batch_patches))
    runs["features"] = [one_pass("features", workdir, args.batch_patches)]
    for name, results in runs.items():
        for result in results:
            print(
                f"{name:>14}: {result['patches_per_s']:>10,} patches/s ({result['seconds']} s, "
                f"statistics {result['stats_seconds']} s, {result['refined_latents']} latents "
                f"refined), peak RSS {result['peak_rss_mib']} MiB "
                f"(+{result['peak_above_start_mib']} MiB during the pass)"
            )
    plain, null = (statistics.median(r["seconds"] for r in runs[n]) for n in list(runs)[:2])
    print(
        f"cost of the null: {null / plain:.2f}x the discovery without it (medians of "
        f"{args.repeats} alternating runs); machine after: {machine()}"
    )


if __name__ == "__main__":
    main()
