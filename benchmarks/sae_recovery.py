"""Does a TopK SAE trained by train.py recover a known dictionary?

    python benchmarks/sae_recovery.py [--steps 3000]

Setup (printed): `n_features` unit-norm ground-truth directions in d_model dimensions (more
features than dimensions: superposition), each vector a sparse non-negative combination of
`active` features (Bernoulli support, magnitudes U(0.5, 1.5)) plus Gaussian noise, stored as a
float16 activation store. train.py's pipeline (data module, TopK SAE module, export) trains
on it; a true feature counts as recovered when some decoder row has cosine > 0.9 with it.
Target: >= 90 % recovered.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_data(args: argparse.Namespace, path: Path) -> np.ndarray:
    from traitsae.data.store import create_store

    rng = np.random.default_rng(args.seed)
    dictionary = rng.standard_normal((args.n_features, args.d_model))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    n = args.images * args.patches
    support = rng.random((n, args.n_features)) < args.active / args.n_features
    codes = support * rng.uniform(0.5, 1.5, size=support.shape)
    acts = codes @ dictionary + args.noise * rng.standard_normal((n, args.d_model))
    acts = acts.reshape(args.images, args.patches, args.d_model).astype(np.float16)
    create_store(
        path,
        patches={0: acts},
        cls={0: acts[:, 0]},
        images={"path": np.array([f"{i}.png" for i in range(args.images)])},
        attrs={"backbone": "synthetic_dictionary", "dataset": "synthetic", "split": "train",
               "depth": 1},
    )  # fmt: skip
    return dictionary


def train_sae(args: argparse.Namespace, store: Path, out: Path) -> Path:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from traitsae.training import train

    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = [
        f"data.store={store}", f"backbone.width={args.d_model}", "data.layer=0",
        f"sae.d_sae={args.d_sae}", f"sae.k={args.k}", f"trainer.max_steps={args.steps}",
        f"data.batch_size={args.batch}", "data.num_workers=1", "trainer.val_check_interval=500",
        "trainer.limit_val_batches=5", "trainer.enable_progress_bar=false", f"optim.lr={args.lr}",
        "sae.dead_after_steps=200", "torch_threads=1", f"trainer.precision={args.precision}", f"hydra.run.dir={out}", f"paths.activations_dir={out}",
    ]  # fmt: skip
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    return train(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-features", type=int, default=256)
    parser.add_argument("--active", type=float, default=5.0, help="mean active features/vector")
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--patches", type=int, default=200)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="32-true", help="trainer.precision (bf16-mixed)")
    args = parser.parse_args()

    import traitsae

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "dictionary.h5"
        dictionary = make_data(args, store)
        start = time.perf_counter()
        run = train_sae(args, store, Path(tmp) / "run")
        elapsed = time.perf_counter() - start
        sae = traitsae.load_sae(run)
        fvu = sae.meta["metrics"].get("val/fvu", float("nan"))
    w_dec = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1).numpy()
    cos_FS = dictionary @ w_dec.T  # [n_features, d_sae]
    best_F = cos_FS.max(axis=1)
    recovered = float((best_F > 0.9).mean())
    print(
        f"data: {args.images * args.patches:,} vectors, d_model={args.d_model}, "
        f"{args.n_features} true features ({args.n_features / args.d_model:.0f}x superposition), "
        f"~{args.active:g} active per vector, magnitudes U(0.5,1.5), noise sd {args.noise}"
    )
    print(
        f"SAE : TopK d_sae={args.d_sae} k={args.k}, {args.steps} steps x batch {args.batch}, "
        f"precision {args.precision}, "
        f"lr {args.lr} ({elapsed:.0f} s incl. start-up), val FVU {fvu:.3f}"
    )
    print(f"median best cosine {np.median(best_F):.3f}; recovered (cos > 0.9): {recovered:.1%}"
          "  (target >= 90 %)")  # fmt: skip


if __name__ == "__main__":
    main()
