"""eval=discovery with and without its permutation null, and eval=features, on >= 1 M patches.

    .venv/bin/python benchmarks/discovery.py [--images 4096 --grid 16 --d-model 128 --d-sae 4096]

Writes a random float16 store (default 4096 images x 256 patches = 1,048,576 patches, two
groups of 2048 images) and a random TopK SAE, then times each pass in a fresh subprocess so that
its peak memory (ru_maxrss) is its own:
- `discovery`: the scoring pass (image-level scores of both groups), then the statistics with
  eval.n_permutations=0 (held-out half, AUROC, candidates, no null) and with 1000 permutations
  (default eval.max_permutations refinement), alternating `--repeats` times on the same scores so
  machine-load drifts hit both. Cost of the null = (pass + median with) / (pass + median
  without); target <= 1.5.
- `features`: firing counts + per-latent running top-k.
Reported: patches/s, seconds, and peak RSS above the process's resident size before the pass. Memory stays bounded by batch_patches x d_sae plus n_group_images x d_sae.
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


def run_pass(name: str, store_path: Path, run_dir: Path, batch_patches: int, repeats: int) -> dict:
    """Time one pass in this process (called in a fresh subprocess).

    discovery: the scoring pass once, then the statistics without and with the null,
    alternating `repeats` times (the pass is the same for both, so it is timed once).
    """
    import torch

    from traitsae.data.store import Store
    from traitsae.evaluation.core import firing
    from traitsae.evaluation.discovery import discovery, groups
    from traitsae.evaluation.discovery import stats as discovery_stats
    from traitsae.sae.export import load_sae

    torch.set_flush_denormal(True)
    sae = load_sae(run_dir)
    out: dict = {"pass": name}
    with Store(store_path) as store:
        meta = store.metadata
        before = current_rss_mib()
        start = time.perf_counter()
        if name == "discovery":
            mask_a = groups.group_mask(meta, {"species": ["erato"]}, "group_a", "bench")
            mask_b = groups.group_mask(meta, {"species": ["melpomene"]}, "group_b", "bench")
            scores = discovery.collect_scores(
                store, sae, mask_a, mask_b, batch_patches=batch_patches, progress=False
            )
            out["pass_seconds"] = time.perf_counter() - start
            timings: dict[str, list[float]] = {"plain": [], "null": []}
            for _ in range(repeats):
                for variant, n_permutations in (("plain", 0), ("null", 1000)):
                    null = discovery_stats.NullOptions(n_permutations=n_permutations)
                    stats_start = time.perf_counter()
                    result = discovery_stats.contrast(
                        scores.scores_NS,
                        scores.in_a,
                        discovery_stats.RankingRule(),
                        null,
                        progress=False,
                    )
                    timings[variant].append(time.perf_counter() - stats_start)
            out["stats_seconds"] = {k: [round(t, 2) for t in v] for k, v in timings.items()}
            out["refined_latents"] = int((result.latents.permutations > 1000).sum())
            out["tested"] = result.summary["tested"]
        else:
            firing.scan(store, sae, top_k=16, batch_patches=batch_patches)
        seconds = time.perf_counter() - start
        n_patches = store.n_images * store.n_patches
    return {
        **out,
        "patches": n_patches,
        "seconds": round(seconds, 2),
        "patches_per_s": round(n_patches / seconds),
        "peak_rss_mib": round(rss_mib()),
        "peak_above_start_mib": round(rss_mib() - before),
    }


def one_pass(name: str, workdir: Path, batch_patches: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--one-pass", name, "--workdir", str(workdir)]
    cmd += ["--batch-patches", str(batch_patches), "--repeats", str(repeats)]
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
    parser.add_argument("--repeats", type=int, default=3, help="statistics runs per variant")
    parser.add_argument("--skip-features", action="store_true")
    parser.add_argument("--one-pass", choices=("discovery", "features"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="traitsae_bench_"))
    store_path, run_dir = workdir / "bench.h5", workdir / "sae"
    if args.one_pass:
        result = run_pass(args.one_pass, store_path, run_dir, args.batch_patches, args.repeats)
        print(json.dumps(result))
        return
    if not store_path.exists():
        make_store(store_path, args.images, args.grid, args.d_model)
    make_sae(run_dir, args.d_model, args.d_sae, args.k)
    size_mib = store_path.stat().st_size / 2**20
    print(
        f"store: {args.images} images x {args.grid**2} patches = {args.images * args.grid**2:,} "
        f"patches, d_model {args.d_model} ({size_mib:.0f} MiB); SAE d_sae {args.d_sae}, "
        f"TopK k={args.k}; batch_patches {args.batch_patches}\nmachine: {machine()}",
        flush=True,
    )
    result = one_pass("discovery", workdir, args.batch_patches, args.repeats)
    plain = statistics.median(result["stats_seconds"]["plain"])
    null = statistics.median(result["stats_seconds"]["null"])
    pass_s = result["pass_seconds"]
    print(
        f"discovery: scoring pass {pass_s:.1f} s ({result['patches'] / pass_s:,.0f} patches/s); "
        f"statistics without the null {result['stats_seconds']['plain']} s, with 1000 "
        f"permutations {result['stats_seconds']['null']} s ({result['tested']} latents tested, "
        f"{result['refined_latents']} refined); peak RSS {result['peak_rss_mib']} MiB "
        f"(+{result['peak_above_start_mib']} MiB during the pass)\n"
        f"cost of the null: {(pass_s + null) / (pass_s + plain):.2f}x the discovery without it "
        f"(medians of {args.repeats} alternating runs); machine after: {machine()}",
        flush=True,
    )
    if not args.skip_features:
        result = one_pass("features", workdir, args.batch_patches, 1)
        print(
            f"features: {result['patches_per_s']:,} patches/s ({result['seconds']} s), peak RSS "
            f"{result['peak_rss_mib']} MiB (+{result['peak_above_start_mib']} MiB during the pass)"
        )


if __name__ == "__main__":
    main()
