"""How the Slurm launchers wait for jobs and report Slurm's refusals (no Slurm needed: squeue and
sbatch are stood in for; tests/test_cluster.py runs the real thing)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from traitsae.cluster import slurm
from traitsae.errors import TraitsaeError


class SlurmJob:  # the name is what `slurm.result` checks
    def __init__(self, folder: Path) -> None:
        self.job_id = "7_0"
        self.paths = SimpleNamespace(
            stderr=folder / "7_0_0_log.err", result_pickle=folder / "7_0_0_result.pkl"
        )

    def results(self) -> list:
        raise AssertionError("without a result file, submitit's results() asks sacct forever")


def test_a_job_gone_from_squeue_without_a_result_fails_with_its_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No accounting: sacct cannot say the job failed; squeue no longer lists it."""
    job = SlurmJob(tmp_path)
    job.paths.stderr.write_text(
        "Traceback (most recent call last):\nerror: store /x.h5 does not exist.\n"
    )
    monkeypatch.setattr(slurm, "squeue_state", lambda job_id: None)
    monkeypatch.setattr(slurm, "RESULT_GRACE_S", 0.0)
    start = time.monotonic()
    with pytest.raises(TraitsaeError) as err:
        slurm.result(job, "sweep job #0 (sae.k=4)")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "sweep job #0 (sae.k=4) failed (Slurm job 7_0): store /x.h5 does not exist." in message
    assert "Traceback" not in message and "\n" not in message


def test_a_job_that_can_never_start_is_cancelled_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cancelled = []
    monkeypatch.setattr(slurm, "squeue_state", lambda job_id: ("PENDING", "PartitionConfig"))
    monkeypatch.setattr(
        slurm.subprocess, "run", lambda cmd, **kw: cancelled.append(cmd) or SimpleNamespace()
    )
    with pytest.raises(TraitsaeError, match="can never start: Slurm says PartitionConfig"):
        slurm.result(SlurmJob(tmp_path), "group job 0")
    assert cancelled == [["scancel", "7_0"]]


@pytest.mark.parametrize(
    ("sbatch_says", "named"),
    [
        ("sbatch: error: Invalid generic resource (gres) specification", "gpus_per_node=1"),
        ("sbatch: error: Memory specification can not be satisfied", "mem_gb=64"),
        ("sbatch: error: invalid partition specified: gpu", "partition=gpu"),
        ("sbatch: error: Requested node configuration is not available", "cpus_per_task=8"),
    ],
)
def test_a_refused_request_names_the_launcher_key(sbatch_says: str, named: str) -> None:
    from submitit.core.utils import FailedJobError

    from hydra_plugins.traitsae_grouped_launcher.slurm_launcher import resource_keys

    params = {"gpus_per_node": 1, "mem_gb": 64, "cpus_per_task": 8, "partition": "gpu"}

    def refuse(*args):
        print("printed by submitit before it raises", file=__import__("sys").stderr)
        try:
            raise subprocess.CalledProcessError(1, ["sbatch"], stderr=sbatch_says)
        except subprocess.CalledProcessError as cause:
            raise FailedJobError(sbatch_says) from cause

    with pytest.raises(TraitsaeError) as err:
        slurm.submit(SimpleNamespace(map_array=refuse), print, [[1]], resource_keys(params))
    message = str(err.value)
    assert sbatch_says in message and f"comes from hydra.launcher.{named}" in message
    assert "\n" not in message
