"""`hydra/launcher=slurm`: hydra-submitit-launcher's Slurm launcher, waiting as traitsae does.

Jobs run exactly as with `submitit_slurm` (its `__call__` and `checkpoint`: a job that reaches
its time limit is requeued and resumes from last.ckpt). What differs is the driver's side
(`traitsae.cluster.slurm`): a request Slurm refuses, or a job that fails, ends the sweep with one
paragraph naming the key or the job's `error:`, never a submitit traceback, and a failed job is
noticed without Slurm accounting (`sacct`) too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

# Launcher keys that are not sbatch parameters: where jobs write, and the requeue budget.
EXECUTOR_KEYS = ("submitit_folder", "max_num_timeout")


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from traitsae.errors import exit_on_user_error

        return exit_on_user_error(self._launch)(job_overrides, initial_job_idx)

    def _launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> list[JobReturn]:
        import submitit

        from traitsae.cluster.slurm import result, submit

        assert self.config is not None
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=params["submitit_folder"],
            cluster="slurm",
            slurm_max_num_timeout=params.get("max_num_timeout", 0),
        )
        generic = generic_keys()
        executor.update_parameters(
            **{
                key if key in generic else f"slurm_{key}": value
                for key, value in params.items()
                if key not in EXECUTOR_KEYS
            }
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
        submitit_launcher.log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        numbered = list(enumerate(job_overrides, start=initial_job_idx))
        for idx, overrides in numbered:
            submitit_launcher.log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        # The arguments of `__call__` (which runs the job), one tuple per job.
        calls = [
            (list(o), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            for idx, o in numbered
        ]
        jobs = submit(executor, self, list(zip(*calls, strict=True)), resource_keys(params))
        return [
            result(job, f"sweep job #{idx} ({' '.join(filter_overrides(o))})")
            for job, (idx, o) in zip(jobs, numbered, strict=True)
        ]


def generic_keys() -> set[str]:
    """Parameters every submitit executor takes by their plain name (the rest: `slurm_<name>`)."""
    return set(OmegaConf.structured(BaseQueueConf).keys())


def resource_keys(
    params: dict[str, Any], key: Callable[[str], str] = lambda name: f"hydra.launcher.{name}"
) -> dict[str, str]:
    """Resource -> `key=value` as the user configured it (named in refusal messages); `params`
    by submitit's plain names, `key` gives the config key of each."""

    def said(*names: str) -> str:
        return ", ".join(f"{key(n)}={params[n]}" for n in names if params.get(n) is not None)

    extra = params.get("additional_parameters") or {}
    return {
        "gpus": said("gpus_per_node", "gpus_per_task", "gres"),
        "memory": said("mem_gb", "mem_per_cpu", "mem_per_gpu"),
        "cpus": said("cpus_per_task", "tasks_per_node", "nodes"),
        "partition": said("partition") or f"{key('partition')}=null (the cluster's default)",
        "time": said("timeout_min"),
        "account": said("account", "qos")
        or ", ".join(f"{key('additional_parameters')}.{k}={v}" for k, v in extra.items()),
    }
