"""train_group(jobs): the jobs of one group trained together on one activation stream."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from traitsae.training import (
    CHECKPOINT_DIR,
    _callbacks,
    _loggers,
    _process_settings,
    _trainer_kwargs,
    build_module,
    export_meta,
)

log = logging.getLogger(__name__)


def _resume_path(cfg: DictConfig, job_dirs: list[Path]) -> str | None:
    """The first job's last.ckpt when the group resumes (the checkpoint IO checks the others)."""
    last = job_dirs[0] / CHECKPOINT_DIR / "last.ckpt"
    if cfg.get("resume", True) and last.is_file():
        log.info("resuming the group from %s (and its jobs' checkpoints)", last)
        return str(last)
    return None


def train_group(jobs: list[tuple[DictConfig, Path]]) -> list[Path]:
    """Train every (config, job dir) of a group on the same batches; returns the job dirs.

    The configs agree on `traitsae.sweeps.grouping.SHARED_NODES`; each job keeps its own SAE,
    seed (initialisation), optimiser, logger, checkpoints and export in its own job dir.
    """
    import lightning as L
    from hydra.utils import instantiate

    from traitsae.sae.export import save_sae
    from traitsae.sweeps.checkpoints import GroupCheckpointIO
    from traitsae.sweeps.module import MemberLogger, SAEGroupModule, member_metrics

    first, job_dirs = jobs[0][0], [Path(job_dir) for _, job_dir in jobs]
    for job_dir in job_dirs:
        job_dir.mkdir(parents=True, exist_ok=True)
    with _process_settings(first):
        L.seed_everything(int(first.seed), workers=True)
        dm = instantiate(first.data)
        dm.prepare()
        trainer_kwargs = _trainer_kwargs(first)
        if dm.n_val_vectors == 0:
            trainer_kwargs["limit_val_batches"] = 0
        ckpt_path = _resume_path(first, job_dirs)
        members = []
        for cfg, job_dir in jobs:
            torch.manual_seed(int(cfg.seed))  # each SAE starts as its solo run would
            member = build_module(cfg, dm, int(trainer_kwargs["max_steps"]), job_dir)
            if ckpt_path is None:
                member.init_b_dec(
                    torch.from_numpy(dm.sample), str(cfg.sae.get("b_dec_init", "mean"))
                )
            members.append(member)
        log.info(
            "training a group of %d SAEs on one stream from %s (layer %d, %s): %s",
            len(members), dm.store_path, dm.layer, dm.tokens,
            ", ".join(str(d) for d in job_dirs),
        )  # fmt: skip
        loggers = [
            MemberLogger(index, logger)
            for index, (cfg, _) in enumerate(jobs)
            for logger in _loggers(cfg)
        ]
        group = SAEGroupModule(members)
        trainer = L.Trainer(
            **trainer_kwargs,
            callbacks=_callbacks(first, job_dirs[0]),
            logger=loggers or False,
            plugins=[GroupCheckpointIO(job_dirs)],
        )
        trainer.fit(group, datamodule=dm, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        for index, ((cfg, job_dir), member) in enumerate(zip(jobs, members, strict=True)):
            if cfg.get("export", True):
                meta = export_meta(cfg, dm, trainer)
                meta["metrics"] = member_metrics(metrics, index)
                log.info("exported %s", save_sae(member.sae.cpu(), job_dir, meta))
    return job_dirs
