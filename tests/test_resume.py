"""Resume: a run SIGKILLed mid-training and re-run equals the uninterrupted run; a checkpoint
of another configuration, a truncated or a pickled one is refused with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ROOT, compose_train, id_store, subprocess_env, train_overrides

import traitsae
from traitsae.errors import TraitsaeError
from traitsae.training import train

STEPS = 12
# Matryoshka with sampled prefixes draws from the global torch RNG every step, two loader
# workers hand batches over through the shared rings, and the kill (step 7) falls between
# checkpoints (every 5 steps), inside a shuffle round and after a validation.
RUN = {
    "sae": "matryoshka",
    "sae.sampled_prefixes": 3,
    "data.num_workers": 2,
    "data.block_images": 4,
    "data.buffer_vectors": 256,
    "trainer.val_check_interval": 4,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "ids.h5"
    return id_store(path, n_images=256, n_patches=4, d_model=16, layers=(3,))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae.safetensors"))


def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(store: Path, tmp_path: Path) -> None:
    whole = train(compose_train(train_overrides(store, tmp_path / "whole", STEPS, **RUN)))

    run_dir = tmp_path / "killed"
    overrides = train_overrides(store, run_dir, STEPS, **RUN)
    killed = subprocess.run(
        [sys.executable, "train.py", *overrides, "+callbacks.kill._target_=train_helpers.KillAtStep",
         "+callbacks.kill.step=7"],  # fmt: skip
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run_dir / "sae.json").exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    train(compose_train(overrides))  # the same command again, without the crash

    expected, resumed = weights(whole), weights(run_dir)
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)
    meta_whole, meta_resumed = traitsae.load_sae(whole).meta, traitsae.load_sae(run_dir).meta
    assert meta_resumed["steps"] == STEPS
    assert meta_resumed["metrics"]["val/fvu"] == pytest.approx(meta_whole["metrics"]["val/fvu"])
    # One CSV log across the resume (a requeued Slurm job started csv/version_<n+1> before).
    assert sorted(run_dir.glob("csv/**/metrics.csv")) == [run_dir / "csv" / "metrics.csv"]


def _checkpointed_run(store: Path, run_dir: Path) -> list[str]:
    overrides = train_overrides(store, run_dir, steps=5)
    train(compose_train(overrides))
    return overrides


def test_resuming_with_another_config_is_refused_unless_overwrite(
    store: Path, tmp_path: Path
) -> None:
    overrides = _checkpointed_run(store, tmp_path / "run")
    with pytest.raises(TraitsaeError, match=r"sae\.k: 4 -> 8.*train\.overwrite=true"):
        train(compose_train([*overrides, "sae.k=8"]))
    # logging, progress bars and where outputs go may change freely
    train(compose_train([*overrides, "trainer.enable_progress_bar=true", "torch_threads=2"]))
    run = train(compose_train([*overrides, "sae.k=8", "train.overwrite=true"]))
    sae = traitsae.load_sae(run)
    assert sae.sae.activation.k == 8 and sae.meta["config"]["sae"]["k"] == 8


def test_truncated_and_pickled_checkpoints_are_refused(store: Path, tmp_path: Path) -> None:
    overrides = _checkpointed_run(store, tmp_path / "run")
    (tmp_path / "run" / "sae.json").unlink()  # unfinished (a finished run has nothing to do)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])
    with pytest.raises(TraitsaeError, match=r"(?s)last\.ckpt is unreadable.*truncated"):
        train(compose_train(overrides))

    class Payload:  # what a pickled checkpoint could smuggle in
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"state_dict": {}, "payload": Payload()}, last)
    with pytest.raises(TraitsaeError, match=r"last\.ckpt holds pickled Python objects"):
        train(compose_train(overrides))
