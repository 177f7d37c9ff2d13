"""Which training settings recover the `dataset=dictionary` features? A fast in-process sweep.

    python benchmarks/recovery_sweep.py --runs "" "data.batch_size=1024" "optim.lr=1e-3" \
        [--budget 2500000] [--full] [--stores /tmp/traitsae_dictionary]

Each run is a list of train.py overrides on top of `dataset=dictionary sae.d_sae=2048 sae.k=8`.
The stores are written once by the real generator (`extract.py dataset=dictionary`, train and
test split) and reused. Training is the project's own: the composed config builds the real
`SAEModule` (optimiser, scheduler, AuxK, controller, b_dec init from the data module's sample,
its normaliser) and a Lightning Trainer with the config's trainer settings fits it for
`budget // data.batch_size` steps; only the loader differs from train.py -- the train store's
vectors are held in memory and served as shuffled float16 batches (no worker processes), which
is what makes a run take minutes instead of a quarter of an hour on a busy CPU. Scores come from
`eval=dictionary`'s `score_sae` on the held-out test store (`--full`: every score; otherwise
recovered / MMCS / FVU / L0 only, which skips the [F, S] co-firing statistics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

CONF = Path(__file__).resolve().parents[1] / "conf"
BASE = ["dataset=dictionary", "sae.d_sae=2048", "sae.k=8"]


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return hydra_compose(name, overrides=overrides)


def ensure_stores(root: Path, dataset: list[str]) -> dict[str, Path]:
    """The train and test dictionary stores under `root` (written once, then reused)."""
    from traitsae.data.dictionary import write_dictionary_store

    paths = {}
    for split in ("train", "test"):
        cfg = compose(
            "extract",
            ["dataset=dictionary", f"split={split}", f"paths.activations_dir={root}",
             "extract.progress=false", *dataset],
        )  # fmt: skip
        paths[split] = write_dictionary_store(cfg)
    return paths


class MemoryBatches(torch.utils.data.IterableDataset):
    """Endless shuffled float16 batches of in-memory vectors (one permutation per epoch)."""

    def __init__(self, x_ND: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x_ND, self.batch_size, self.seed = x_ND, batch_size, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        n = self.x_ND.shape[0] // self.batch_size * self.batch_size
        while True:
            perm = torch.randperm(self.x_ND.shape[0], generator=gen)[:n]
            for idx in perm.view(-1, self.batch_size):
                yield self.x_ND[idx]


class Trace(L.Callback):
    """train/l0 (and the controller's coefficient) every `every` steps: how L0 got there."""

    def __init__(self, every: int = 200) -> None:
        self.every, self.points = every, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            m = trainer.callback_metrics
            point = [step, round(float(m["train/l0"]), 2)]
            if "train/sparsity_coeff" in m:
                point.append(float(f"{float(m['train/sparsity_coeff']):.3g}"))
            self.points.append(point)


def train_vectors(dm) -> torch.Tensor:
    """The data module's training vectors (its train/val split), float16 [N, D]."""
    from traitsae.data.stream import ActivationStream

    plan = dm.train_plan
    stream = ActivationStream(plan, 65536, 65536, dm.seed, shuffle=False, epochs=1)
    return torch.cat(list(stream))


def run_one(
    overrides: list[str], stores: dict[str, Path], budget: int, full: bool, cache: dict
) -> dict:
    from traitsae.evaluation.quality.dictionary import score_sae
    from traitsae.sae.export import RawSpaceSAE
    from traitsae.training.config import TrainConfig, instantiate_checked
    from traitsae.training.recipe import build_module

    cfg = compose("train", BASE + [f"data.store={stores['train']}", *overrides])
    batch = int(cfg.data.batch_size)
    steps = (
        int(cfg.trainer.max_steps) if any("max_steps" in o for o in overrides) else budget // batch
    )
    L.seed_everything(int(cfg.seed), verbose=False)
    dm = instantiate_checked(cfg.data)
    dm.prepare()
    if "x" not in cache:
        cache["x"] = train_vectors(dm)
    config = dataclasses.replace(TrainConfig.from_cfg(cfg), max_steps=steps)
    module = build_module(config, dm, Path("/tmp"))
    module.figures_dir = None
    module.init_from_sample(torch.from_numpy(dm.sample), str(cfg.sae.b_dec_init))
    loader = torch.utils.data.DataLoader(
        MemoryBatches(cache["x"], batch, int(cfg.seed)), batch_size=None
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=cfg.trainer.gradient_clip_val, precision=cfg.trainer.precision,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[trace := Trace()],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    module.sae.eval()
    raw = RawSpaceSAE(module.sae, dm.scale, {"d_model": dm.d_model, "variant": module.sae.variant})
    scores = score_sae(raw, stores["test"]) if full else quick_scores(raw, stores["test"])
    dead = float((module.steps_since_fired >= module.dead_after_steps).float().mean())
    return {"overrides": " ".join(overrides) or "(defaults)", "steps": steps, "batch": batch,
            "lr": float(cfg.optim.lr), "variant": module.sae.variant,
            "seconds": round(seconds, 1), "train_dead": dead,
            "final_coeff": coeff_of(module), **scores, "trace": trace.points}  # fmt: skip


def coeff_of(module) -> float | None:
    if module.l0_controller is None:
        return None
    return module.penalty.coeff * module.l0_controller.factor()


@torch.no_grad()
def quick_scores(sae, store_path: Path) -> dict:
    """recovered / MMCS from the decoder, FVU and L0 on the test store's first 16,384 vectors."""
    from traitsae.data.dictionary import read_truth
    from traitsae.data.store import Store
    from traitsae.evaluation.quality.dictionary import recovered_by_kind
    from traitsae.sae.metrics import fraction_of_variance_unexplained

    with Store(store_path) as store:
        truth = read_truth(store)
        features_FD = torch.from_numpy(truth["features"]).double()
        x_ND = torch.from_numpy(np.asarray(store.patches(0)[:64], dtype=np.float32))
    x_ND = x_ND.reshape(-1, x_ND.shape[-1])
    unit = torch.nn.functional.normalize
    best_F = (unit(features_FD, dim=1) @ unit(sae.W_dec.double(), dim=1).T).max(1).values
    codes_NS = sae.encode(x_ND)
    parents_F = torch.from_numpy(truth["parents"])
    rare_F = torch.from_numpy(truth["frequency"]) <= float(np.quantile(truth["frequency"], 0.25))
    return {
        "recovered": float((best_F > 0.9).double().mean()),
        **recovered_by_kind(best_F, parents_F),  # where the misses are: hierarchy or rarity
        "recovered_rarest_quarter": float((best_F[rare_F] > 0.9).double().mean()),
        "mmcs": float(best_F.mean()),
        "fvu": float(fraction_of_variance_unexplained(sae.decode(codes_NS), x_ND)),
        "l0": float((codes_NS > 0).sum(1).float().mean()),
    }


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines()
         if line.startswith("Model name")), platform.processor())  # fmt: skip
    return f"{cpu}; load {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=[""], help="one quoted override list each")
    parser.add_argument("--budget", type=int, default=2_500_000, help="training vectors per run")
    parser.add_argument("--stores", type=Path, default=Path("/tmp/traitsae_dictionary"))
    parser.add_argument("--dataset", nargs="*", default=[], help="dataset.* overrides (both)")
    parser.add_argument("--full", action="store_true", help="all eval=dictionary scores")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    stores = ensure_stores(args.stores, args.dataset)
    cache: dict = {}
    for spec in args.runs:
        print(f"[{time.strftime('%H:%M:%S')}] {machine()}", flush=True)
        result = run_one(args.dataset + spec.split(), stores, args.budget, args.full, cache)
        result["machine"] = machine()
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
