"""train_group(jobs): the jobs of one group trained together on one activation stream."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from traitsae.errors import TraitsaeError
from traitsae.sae.export import save_sae
from traitsae.training.config import check_train_cfg, run_config
from traitsae.training.group_checkpoints import GroupCheckpointIO
from traitsae.training.group_module import MemberLogger, SAEGroupModule, member_metrics
from traitsae.training.recipe import build_module, export_meta, prepare_data
from traitsae.training.resume import resume_checkpoint
from traitsae.training.trainer import (
    fit,
    instantiate_checked,
    process_settings,
    quiet_lightning_console,
    run_callbacks,
    run_loggers,
)

log = logging.getLogger(__name__)


def _resume_path(jobs: list[tuple[DictConfig, Path]]) -> str | None:
    """The first job's last.ckpt when the whole group resumes; every job's checkpoint is checked
    against its own config, as a solo run's is."""
    paths = [resume_checkpoint(cfg, job_dir) for cfg, job_dir in jobs]
    if all(path is None for path in paths):
        return None
    if any(path is None for path in paths):
        fresh = [
            str(job_dir) for (_, job_dir), path in zip(jobs, paths, strict=True) if path is None
        ]
        raise TraitsaeError(
            f"cannot resume the grouped sweep: jobs {', '.join(fresh)} have no checkpoint while "
            "the others of their group do. Re-run in a new hydra.sweep.dir, or pass "
            "train.overwrite=true to start every job of the group afresh."
        )
    log.info("resuming the group from its jobs' checkpoints (%s, ...)", paths[0])
    return paths[0]


def train_group(jobs: list[tuple[DictConfig, Path]]) -> list[Path]:
    """Train every (config, job dir) of a group on the same batches; returns the job dirs.

    The configs agree on `traitsae.training.grouping.SHARED_NODES`; each job keeps its own SAE,
    seed (initialisation), optimiser, logger, checkpoints and export in its own job dir.
    """
    first, job_dirs = jobs[0][0], [Path(job_dir) for _, job_dir in jobs]
    for cfg, job_dir in jobs:
        check_train_cfg(cfg)
        job_dir.mkdir(parents=True, exist_ok=True)
    quiet_lightning_console()
    ckpt_path = _resume_path(jobs)
    with process_settings(first):
        dm, trainer_node = prepare_data(first)
        members = []
        for cfg, job_dir in jobs:
            torch.manual_seed(int(cfg.seed))  # each SAE starts as its solo run would
            member = build_module(cfg, dm, int(trainer_node["max_steps"]), job_dir)
            if ckpt_path is None:
                member.init_from_sample(torch.from_numpy(dm.sample), str(cfg.sae.b_dec_init))
            members.append(member)
        log.info(
            "training a group of %d SAEs on one stream from %s (layer %d, %s): %s",
            len(members), dm.store_path, dm.layer, dm.tokens,
            ", ".join(str(d) for d in job_dirs),
        )  # fmt: skip
        loggers = [
            MemberLogger(index, logger)
            for index, (cfg, _) in enumerate(jobs)
            for logger in run_loggers(cfg)
        ]
        group = SAEGroupModule(members)
        trainer = instantiate_checked(
            trainer_node,
            callbacks=run_callbacks(first, job_dirs[0]),
            logger=loggers or False,
            plugins=[GroupCheckpointIO(job_dirs, [run_config(cfg) for cfg, _ in jobs])],
        )
        fit(trainer, group, dm, ckpt_path)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        for index, ((cfg, job_dir), member) in enumerate(zip(jobs, members, strict=True)):
            own = member_metrics(metrics, index)
            log.info(
                "done %s, step %d: val FVU %.4g, L0 %.3g, dead %.3g, dense %.3g", job_dir,
                trainer.global_step, own.get("val/fvu", float("nan")),
                own.get("val/l0", float("nan")), own.get("val/dead_frac", float("nan")),
                own.get("val/dense_frac", float("nan")),
            )  # fmt: skip
            if cfg.train.export:
                meta = export_meta(cfg, dm, trainer)
                meta["metrics"] = own
                log.info("exported %s", save_sae(member.sae.cpu(), job_dir, meta))
    return job_dirs
