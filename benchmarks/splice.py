"""eval=splice's pass vs a plain forward pass of the same backbone over the same images.

    .venv/bin/python benchmarks/splice.py                     # random dinov2_small and tiny
    .venv/bin/python benchmarks/splice.py --backbone dinov2_small --layer -2 --expansion 16

The first SAE evaluated on a split runs blocks 0..L once, the SAE on block L's edited tokens, and
blocks L+1.. and the head on each of the four conditions (clean, spliced, mean- and zero-ablated):
its FLOPs over a plain forward are 3 x (blocks after L) / depth plus the SAE's encoder. Clean and
ablated results do not depend on the SAE: eval=splice caches them, and every further SAE of a
sweep on the split runs only its spliced pass (1 + the SAE's encoder) and reads the clean
reference (last block's tokens, float16, memory-mapped) from the cache, as timed here. Both
passes include the per-image metrics (cosine, relative error). Printed: each pass's ratio to the
plain forward in time (fastest of the alternating runs: other processes only ever slow a run
down; the median ratio too) and in FLOPs (torch's FlopCounterMode: matmuls and attention).
Same preprocessed batches in memory (no decoding), random weights (same compute as pretrained).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from traitsae.backbones import Final, build_backbone  # noqa: E402
from traitsae.evaluation.causal.forward import sae_token_positions  # noqa: E402
from traitsae.evaluation.causal.splice import CONDITIONS, Tally, splice_batch  # noqa: E402
from traitsae.sae.export import RawSpaceSAE  # noqa: E402
from traitsae.sae.model import build_sae  # noqa: E402

DEFAULTS = {"dinov2_small": (-2, 64, 16), "tiny": (1, 256, 64)}  # layer, images, batch size


def backbone_cfg(name: str):
    cfg = OmegaConf.load(REPO / "conf" / "backbone" / f"{name}.yaml")
    with open_dict(cfg):
        cfg.pretrained = False  # random weights: same compute, no download
    return cfg


@torch.inference_mode()
def time_passes(
    name: str, layer: int, n_images: int, batch: int, expansion: int, k: int, repeats: int
):
    backbone = build_backbone(backbone_cfg(name), prune=False)
    g = backbone.geometry
    layer = layer % g.depth
    sae = RawSpaceSAE(
        build_sae("topk", g.d_model, expansion * g.d_model, k).eval(),
        scale=1.0,
        meta={"layer": layer, "tokens": "patches"},
    )
    n_tokens = g.n_prefix_tokens + g.n_patches
    positions_T = sae_token_positions(sae, "auto", g.n_prefix_tokens, n_tokens)
    mean_TD = torch.zeros(n_tokens, g.d_model)
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(batch, 3, g.image_size, g.image_size, generator=gen)
        for _ in range(max(1, n_images // batch))
    ]
    last = g.depth - 1
    further = ("spliced",)
    # What a further SAE reads from the cache: the clean last-block tokens (float16, read
    # memory-mapped as eval=splice does) and the clean embeddings.
    cache_dir = tempfile.TemporaryDirectory()
    tokens_path = Path(cache_dir.name) / "final-tokens.npy"
    clean = [backbone.finish_from(backbone.tokens_after(x, last), last) for x in batches]
    np.save(tokens_path, np.concatenate([f.tokens_BTD.numpy() for f in clean]).astype(np.float16))
    cached_NTD = np.load(tokens_path, mmap_mode="r")

    def plain(x: torch.Tensor, _: int) -> None:
        backbone.finish_from(backbone.tokens_after(x, last), last)

    def spliced(conditions: tuple[str, ...]):
        def one(x: torch.Tensor, i: int) -> None:
            finals = splice_batch(backbone, sae, x, layer, positions_T, mean_TD, conditions)
            if "clean" not in finals:
                rows = slice(i * batch, (i + 1) * batch)
                tokens_BTD = torch.from_numpy(np.asarray(cached_NTD[rows], dtype=np.float32))
                finals["clean"] = Final(tokens_BTD, clean[i].embedding_BE)
            Tally().add(np.arange(len(x)), finals)

        return one

    passes = {"plain": plain, "first": spliced(CONDITIONS), "further": spliced(further)}
    flops = {}
    for label, fn in passes.items():
        with FlopCounterMode(display=False) as counter:
            fn(batches[0], 0)
        flops[label] = counter.get_total_flops()
    for i, x in enumerate(batches):  # warm-up
        plain(x, i)
    times = {label: [] for label in passes}
    for _ in range(repeats):
        for label, fn in passes.items():
            started = time.perf_counter()
            for i, x in enumerate(batches):
                fn(x, i)
            times[label].append(time.perf_counter() - started)
    # The SAE alone on one batch's patch tokens: the dense decode(encode(x)) against
    # RawSpaceSAE.forward, which sums only the k active decoder rows (TopK).
    x_RD = backbone.tokens_after(batches[0], layer)[:, positions_T].reshape(-1, g.d_model)
    sae_times = {"dense": [], "k rows": []}
    for _ in range(repeats):
        for label, fn in (("dense", lambda: sae.decode(sae.encode(x_RD))), ("k rows", sae)):
            started = time.perf_counter()
            fn(x_RD) if label == "k rows" else fn()
            sae_times[label].append(time.perf_counter() - started)
    n = len(batches) * batch
    print(
        f"{name:13s} block {layer}/{g.depth - 1}, d_sae {expansion * g.d_model} k {k}, {n} images, "
        f"plain {n / min(times['plain']):.1f} img/s, load {os.getloadavg()[0]:.1f}:"
    )
    for label, conditions in (("first", CONDITIONS), ("further", further)):
        best = min(times[label]) / min(times["plain"])
        median = statistics.median(s / p for s, p in zip(times[label], times["plain"], strict=True))
        print(
            f"  {label:7s} SAE ({', '.join(conditions)}): time {best:.2f}x (median {median:.2f}x), "
            f"FLOPs {flops[label] / flops['plain']:.3f}x"
        )
    dense, sparse = min(sae_times["dense"]), min(sae_times["k rows"])
    print(
        f"  SAE reconstruction of {len(x_RD)} tokens: dense decode {dense * 1e3:.0f} ms, "
        f"k-row decode {sparse * 1e3:.0f} ms ({dense / sparse:.2f}x faster)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(DEFAULTS), action="append")
    parser.add_argument("--layer", type=int)
    parser.add_argument("--images", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"
    )
    print(f"CPU: {model}; torch threads {torch.get_num_threads()}; load: {os.getloadavg()}")
    for name in args.backbone or list(DEFAULTS):
        layer, images, batch = DEFAULTS[name]
        time_passes(
            name,
            args.layer if args.layer is not None else layer,
            args.images or images,
            args.batch_size or batch,
            args.expansion,
            args.k,
            args.repeats,
        )


if __name__ == "__main__":
    main()
