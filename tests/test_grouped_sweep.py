"""hydra/launcher=grouped: jobs sharing their data train in one process, each as its solo run."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from train_helpers import ROOT, compose_train, id_store, subprocess_env, train_overrides

import traitsae
from traitsae.training import train
from traitsae.training.group_checkpoints import join_checkpoints, split_checkpoint
from traitsae.training.grouping import group_jobs, splitting_keys


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grouped") / "ids.h5"
    return id_store(path, n_images=64, n_patches=4, d_model=16, layers=(1, 3))


def _sweep_overrides(store: Path, steps: int) -> list[str]:
    fixed = train_overrides(store, Path("unused"), steps=steps)
    return [o for o in fixed if not o.startswith(("hydra.run", "sae.k="))]


def _grouped_sweep(argv: list[str]) -> None:
    """train.py -m under @hydra.main in this process, with the grouped launcher."""
    import hydra

    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    GlobalHydra.instance().clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["train.py", "-m", "hydra/launcher=grouped", *argv])
        hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")(
            module.main.__wrapped__
        )()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return traitsae.load_sae(run).sae.state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


class StreamCounter:
    """Counts the passes started over the store (train and validation streams alike)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from traitsae.data.stream import ActivationStream

        self.passes = 0
        pieces = ActivationStream._pieces

        def counted(stream: ActivationStream):
            self.passes += 1
            return pieces(stream)

        monkeypatch.setattr(ActivationStream, "_pieces", counted)


def test_grouped_jobs_train_as_their_solo_runs(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "sweep"
    reads = StreamCounter(monkeypatch)
    _grouped_sweep(["sae=topk,matryoshka", "sae.k=2,4", f"hydra.sweep.dir={sweep}",
                    *_sweep_overrides(store, steps=12)])  # fmt: skip
    group_passes, reads.passes = reads.passes, 0
    runs = sorted(p.parent for p in sweep.glob("*/sae.json"))
    assert [r.name for r in runs] == ["0", "1", "2", "3"]  # the basic launcher's job dirs
    for run in runs:
        assert (run / ".hydra" / "overrides.yaml").is_file()
        assert (run / "checkpoints" / "last.ckpt").is_file()
        log = (run / "train.log").read_text()  # as a solo run's: the group's lines, its own done
        assert "training a group of 4 SAEs" in log and f"done {run}, step 12" in log
        assert log.count("] - done ") == 1
        with open(run / "csv" / "metrics.csv") as f:
            header = next(csv.reader(f))
        assert "train/loss" in header and not any(h.startswith("m1/") for h in header)
    variants = [(traitsae.load_sae(r).variant, traitsae.load_sae(r).sae.activation.k) for r in runs]
    assert sorted(variants) == [("matryoshka", 2), ("matryoshka", 4), ("topk", 2), ("topk", 4)]

    for variant, k in (("topk", 4), ("matryoshka", 2)):
        solo = tmp_path / f"solo_{variant}{k}"
        overrides = train_overrides(store, solo, steps=12, **{"sae.k": k})
        train(compose_train([f"sae={variant}", *overrides]))
        assert group_passes == reads.passes > 0  # four SAEs, the store read as for one
        reads.passes = 0
        (grouped,) = [r for r, v in zip(runs, variants, strict=True) if v == (variant, k)]
        _assert_same_weights(grouped, solo)
        assert traitsae.load_sae(grouped).meta["metrics"]["val/fvu"] == pytest.approx(
            traitsae.load_sae(solo).meta["metrics"]["val/fvu"], rel=1e-5
        )


def test_jobs_with_other_data_form_their_own_group(store: Path, tmp_path: Path) -> None:
    jobs = []
    for i, layer in enumerate((1, 3, 1)):
        job_dir = tmp_path / str(i)
        overrides = train_overrides(store, job_dir, steps=3, **{"data.layer": layer})
        cfg = compose_train(overrides)  # as the launcher: the job's config resolved in its set-up
        job_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        OmegaConf.resolve(job_cfg)
        jobs.append((job_cfg, job_dir))
    groups = group_jobs(jobs)
    assert groups == [[0, 2], [1]]
    assert splitting_keys(jobs, groups) == ["data.layer"]


def test_a_killed_group_resumes_from_its_jobs_checkpoints(store: Path, tmp_path: Path) -> None:
    """Every job checkpoints into its own dir, in a solo run's layout; re-running the sweep
    resumes the group from them, as a solo run resumes from the same file."""
    sweep = tmp_path / "sweep"
    argv = ["sae.k=2,4", f"hydra.sweep.dir={sweep}", *_sweep_overrides(store, steps=12)]
    kill = ["+callbacks.kill._target_=train_helpers.KillAtStep", "+callbacks.kill.step=7"]
    killed = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=grouped", *argv, *kill],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    parts = [torch.load(sweep / j / "checkpoints" / "last.ckpt", weights_only=False) for j in "01"]
    assert {part["global_step"] for part in parts} == {5}
    assert not any(key.startswith("members.") for key in parts[0]["state_dict"])
    joined = join_checkpoints(parts)
    for index, part in enumerate(parts):  # split(join(parts)) gives the parts back
        again = split_checkpoint(joined, index)
        assert again["state_dict"].keys() == part["state_dict"].keys()
        assert again["optimizer_states"] == part["optimizer_states"]
        assert again["lr_schedulers"] == part["lr_schedulers"]

    solo = tmp_path / "solo"  # a solo run of job 1's config, resuming from job 1's checkpoint
    shutil.copytree(sweep / "1" / "checkpoints", solo / "checkpoints")
    train(compose_train(train_overrides(store, solo, steps=12, **{"sae.k": 4})))
    _grouped_sweep(argv)  # the same sweep command again: the group resumes from step 5
    assert traitsae.load_sae(sweep / "1").meta["steps"] == 12
    _assert_same_weights(sweep / "1", solo)


def test_grouped_slurm_submits_one_job_per_group(store: Path, tmp_path: Path) -> None:
    """hydra/launcher=grouped_slurm through submitit's local executor (the same code path)."""
    sweep = tmp_path / "sweep"
    argv = ["-m", "hydra/launcher=grouped_slurm", "hydra.launcher.submitit.cluster=local",
            "hydra.launcher.submitit.parameters.timeout_min=10", f"hydra.sweep.dir={sweep}",
            "sae.k=2,4", *_sweep_overrides(store, steps=4)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "train.py", *argv],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 jobs in 1 group(s)" in proc.stderr + proc.stdout
    ks = sorted(traitsae.load_sae(p).sae.activation.k for p in sweep.glob("*/sae.json"))
    assert ks == [2, 4]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 1  # one job per group


def test_re_running_a_finished_grouped_sweep_keeps_every_export(
    store: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    argv = ["sae.k=2,4", f"hydra.sweep.dir={sweep}", *_sweep_overrides(store, steps=4)]
    _grouped_sweep(argv)
    before = {job: (sweep / job / "sae.json").read_bytes() for job in "01"}
    assert all(json.loads(text)["metrics"]["val/fvu"] > 0 for text in before.values())
    _grouped_sweep(argv)  # the same command again: nothing to do, nothing rewritten
    assert {job: (sweep / job / "sae.json").read_bytes() for job in "01"} == before
