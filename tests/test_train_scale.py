"""Scale-out paths as subprocesses: CPU DDP with 2 processes, and a sweep via submitit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import ROOT, compose_train, id_store, subprocess_env, train_overrides

import traitsae
from traitsae.training import train

STEPS, BATCH = 10, 32


def run_train_py(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ddp_two_cpu_processes_agree_and_share_the_data(tmp_path: Path) -> None:
    store = id_store(tmp_path / "ids.h5", n_images=256, n_patches=4, d_model=16, layers=(3,))
    record = ["+callbacks.rec._target_=train_helpers.RecordRun"]
    ddp = train_overrides(store, tmp_path / "ddp", steps=STEPS, **{"data.batch_size": BATCH})
    run_train_py([*ddp, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  *record, f"+callbacks.rec.out_dir={tmp_path / 'ddp_rec'}"])  # fmt: skip
    ranks = [json.loads((tmp_path / "ddp_rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[1]["end_step"] == STEPS
    assert ranks[0]["weights_sha"] == ranks[1]["weights_sha"]  # identical weights on both ranks
    seen = ranks[0]["ids"] + ranks[1]["ids"]
    assert len(seen) == STEPS * BATCH * 2 and len(set(seen)) == len(seen)  # no vector twice

    single = train_overrides(store, tmp_path / "one", steps=STEPS, **{"data.batch_size": 2 * BATCH})
    train(compose_train([*single, *record, f"+callbacks.rec.out_dir={tmp_path / 'one_rec'}"]))
    one = json.loads((tmp_path / "one_rec" / "rank0.json").read_text())
    exported = traitsae.load_sae(tmp_path / "ddp")  # rank 0 exported the run
    assert exported.meta["steps"] == STEPS
    ddp_fvu, one_fvu = ranks[0]["metrics"]["val/fvu"], one["metrics"]["val/fvu"]
    assert ddp_fvu == pytest.approx(one_fvu, rel=0.15)  # same effective batch, same quality


def test_sweep_through_submitit_local_launcher(tmp_path: Path) -> None:
    store = id_store(tmp_path / "ids.h5", n_images=64, n_patches=4, d_model=16, layers=(3,))
    base = train_overrides(store, tmp_path / "unused", steps=4)
    base = [o for o in base if not o.startswith(("hydra.run", "sae.k="))]
    run_train_py(["-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                  "hydra.launcher.timeout_min=10", "sae.k=2,4", *base])  # fmt: skip
    exported = sorted((tmp_path / "sweep").glob("*/sae.json"))
    assert len(exported) == 2
    assert sorted(traitsae.load_sae(p).sae.activation.k for p in exported) == [2, 4]
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))  # ran via submitit


def test_slurm_launcher_presets_compose() -> None:
    """slurm fits a CPU partition (no GPU, no memory request); slurm_gpu asks one GPU a task."""
    cpu = compose_train(["hydra/launcher=slurm", "hydra.launcher.partition=cpu"]).hydra.launcher
    assert cpu._target_.endswith("slurm_launcher.SlurmLauncher")
    assert (cpu.partition, cpu.gpus_per_node, cpu.mem_gb, cpu.tasks_per_node) == (
        "cpu",
        None,
        None,
        1,
    )
    assert cpu.array_parallelism > 0 and cpu.timeout_min > 0 and cpu.max_num_timeout > 0
    gpu = compose_train(["hydra/launcher=slurm_gpu"]).hydra.launcher
    assert gpu._target_ == cpu._target_ and (gpu.gpus_per_node, gpu.mem_gb) == (1, 64)
    for name, gpus in (("grouped_slurm", None), ("grouped_slurm_gpu", 1)):
        grouped = compose_train([f"hydra/launcher={name}"]).hydra.launcher.submitit.parameters
        assert grouped.gpus_per_node == gpus
