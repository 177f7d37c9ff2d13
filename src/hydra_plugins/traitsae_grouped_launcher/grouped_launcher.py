"""`hydra/launcher=grouped`: a sweep's jobs that share their data train in one process.

Hydra finds launchers only inside the `hydra_plugins` namespace package, hence this module.
Each job still gets its own job dir, `.hydra/` record and outputs, as with the basic launcher;
then `traitsae.training.grouping` groups the jobs and `traitsae.training.train_group` trains each group.

Hydra imports every module of `hydra_plugins` when any Hydra app starts (extract.py and
evaluate.py too), so this module imports `traitsae.training` (whose package imports Lightning:
`extract.py --help` took 31 s instead of 1 s under load with it at module level) only when a
sweep launches, and submitit (an optional dependency, the `slurm` extra) only when it submits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from traitsae.errors import exit_on_user_error

log = logging.getLogger(__name__)


def _prepare_job(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """Run inside Hydra's job set-up: the job's config resolved against its own job dir."""
    OmegaConf.resolve(cfg)
    return cfg, Path(HydraConfig.get().runtime.output_dir)


class TrainGroup:
    """One group's training as a callable: run here, or pickled into a submitit job.

    A Slurm job that times out is requeued with the same arguments (`checkpoint`), and the
    group resumes from its jobs' last.ckpt files.
    """

    def __call__(self, jobs: list[tuple[DictConfig, Path]], hydra_cfg: DictConfig) -> list[Path]:
        from traitsae.training import train_group  # see the module docstring
        from traitsae.training.trainer import LOG_FORMAT

        HydraConfig.instance().set_config(hydra_cfg)  # as inside the group's first job
        if not logging.getLogger().handlers:  # a submitit job: its log is stderr
            logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        return exit_on_user_error(train_group)(jobs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class GroupedLauncher(Launcher):
    def __init__(self, submitit: DictConfig | None = None) -> None:
        super().__init__()
        self.submitit = OmegaConf.to_container(submitit, resolve=True) if submitit else None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        return exit_on_user_error(self._launch)(job_overrides, initial_job_idx)

    def _launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from traitsae.training.grouping import group_jobs, splitting_keys  # see the docstring

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        prepared = [self._prepare(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        runs = [run for run, _ in prepared]
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        jobs = [run.return_value for run in runs]
        groups = group_jobs(jobs)
        split_by = splitting_keys(jobs, groups)
        log.info(
            "%d jobs in %d group(s)%s", len(jobs), len(groups),
            f", kept apart by {', '.join(split_by)}" if split_by else "",
        )  # fmt: skip
        payloads = [([jobs[i] for i in group], prepared[group[0]][1]) for group in groups]
        for group in groups:
            log.info("group: jobs %s", ", ".join(f"#{initial_job_idx + i}" for i in group))
        for group, job_dirs in zip(groups, self._run(payloads), strict=True):
            for i, job_dir in zip(group, job_dirs, strict=True):
                runs[i].return_value = job_dir
        return runs

    def _run(self, payloads: list[tuple[list[Any], DictConfig]]) -> list[list[Path]]:
        """Train every group: one after the other here, or one submitit job per group."""
        if self.submitit is None:
            return [TrainGroup()(jobs, hydra_cfg) for jobs, hydra_cfg in payloads]
        import submitit

        from traitsae.cluster.slurm import result, submit

        options = dict(self.submitit)
        cluster = options.pop("cluster")
        executor = submitit.AutoExecutor(
            folder=options.pop("folder"),
            cluster=cluster,
            **{f"{cluster}_max_num_timeout": options.pop("max_num_timeout", 3)},
        )
        parameters = {k: v for k, v in options.pop("parameters", {}).items() if v is not None}
        executor.update_parameters(**parameters)
        keys = resource_keys(parameters)
        submitted = submit(executor, TrainGroup(), list(zip(*payloads, strict=True)), keys)
        log.info("submitted %d group job(s) to %s", len(submitted), cluster)
        return [result(job, f"group job {i}") for i, job in enumerate(submitted)]

    def _prepare(self, idx: int, overrides: Sequence[str]) -> tuple[JobReturn, DictConfig]:
        """Hydra's job set-up (job dir, `.hydra/` record) without training yet."""
        assert self.config is not None and self.hydra_context is not None
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = self.hydra_context.config_loader.load_sweep_config(
            self.config, list(overrides)
        )
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=_prepare_job,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        if ret.status != JobStatus.COMPLETED:
            _ = ret.return_value  # re-raises the job's error
        return ret, sweep_config


def resource_keys(parameters: dict[str, Any]) -> dict[str, str]:
    """Resource -> `key=value` as configured under hydra.launcher.submitit.parameters."""
    from hydra_plugins.traitsae_grouped_launcher import slurm_launcher

    plain = {k.removeprefix("slurm_"): v for k, v in parameters.items()}
    generic = slurm_launcher.generic_keys()
    return slurm_launcher.resource_keys(
        plain,
        lambda name: (
            "hydra.launcher.submitit.parameters." + (name if name in generic else f"slurm_{name}")
        ),
    )
