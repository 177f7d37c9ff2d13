"""Streaming passes of eval=discovery and eval=features on a store of >= 1 M patches.

    .venv/bin/python benchmarks/discovery.py [--images 4096 --grid 16 --d-model 128 --d-sae 4096]

Writes a random float16 store (default 4096 images x 256 patches = 1,048,576 patches) and a
random TopK SAE, then times each pass in a fresh subprocess so that its peak memory (ru_maxrss)
is its own: discovery's scoring pass (image-level scores of two groups + per-latent statistics)
and features' scan (firing counts + per-latent running top-k). Reported: patches/s and peak RSS
above the process's resident size before the pass (imports, SAE, store metadata).
Targets: one read of the store; memory bounded by batch_patches x d_sae (plus, for discovery,
n_group_images x d_sae) -- never n_patches x d_sae.
"""

from __future__ import annotations

import argparse
import json
import resource
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
    from traitsae.evaluation import discovery, features
    from traitsae.sae.export import load_sae

    torch.set_flush_denormal(True)
    sae = load_sae(run_dir)
    with Store(store_path) as store:
        meta = store.metadata
        before = current_rss_mib()
        start = time.perf_counter()
        if name == "discovery":
            mask_a = discovery.group_mask(meta, {"species": ["erato"]}, "group_a", "bench")
            mask_b = discovery.group_mask(meta, {"species": ["melpomene"]}, "group_b", "bench")
            scores = discovery.collect_scores(
                store, sae, mask_a, mask_b, batch_patches=batch_patches
            )
            discovery.latent_stats(scores)
        else:
            features.scan(store, sae, top_k=16, batch_patches=batch_patches)
        seconds = time.perf_counter() - start
        n_patches = store.n_images * store.n_patches
    return {
        "pass": name,
        "patches": n_patches,
        "seconds": round(seconds, 2),
        "patches_per_s": round(n_patches / seconds),
        "peak_rss_mib": round(rss_mib()),
        "peak_above_start_mib": round(rss_mib() - before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=16, help="patch grid side (P = grid^2)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-patches", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--one-pass", choices=("discovery", "features"), help=argparse.SUPPRESS)
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
        f"TopK k={args.k}; batch_patches {args.batch_patches}"
    )
    for name in ("discovery", "features"):
        cmd = [
            sys.executable,
            __file__,
            "--one-pass",
            name,
            "--workdir",
            str(workdir),
            "--batch-patches",
            str(args.batch_patches),
        ]
        result = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        print(
            f"{name:>9}: {result['patches_per_s']:>10,} patches/s ({result['seconds']} s), "
            f"peak RSS {result['peak_rss_mib']} MiB (+{result['peak_above_start_mib']} MiB "
            "during the pass)"
        )


if __name__ == "__main__":
    main()
