"""The one training recipe: store -> ActivationsDataModule -> SAE module(s) -> fit -> sae.json.

`train(cfg)` is `train_group` with a group of one. Set-up, train, finish:
- every job's config is checked up front (clear errors before anything is built), its job dir
  made, and the checkpoint to resume from chosen (`resume`: exact, or refused when the config
  changed);
- the data module opens the store once (layer, validation split, normaliser scale);
- each job's SAE module is built from its `cfg.sae` / `cfg.sparsity` / `cfg.optim`, seeded by its
  own `seed`; b_dec starts at the data's mean or geometric median unless the run resumes;
- Lightning runs to `trainer.max_steps` on an endless shuffled stream, checkpointing into
  `<job dir>/checkpoints`. One job trains its `SAEModule` as is; several train as one
  `SAEGroupModule` on the same batches, each job keeping its own logger and checkpoint files;
- the last step is always validated, a one-line summary per job is logged, and rank 0 writes
  each job's portable `sae.safetensors` + `sae.json` into its job dir.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from traitsae.data.datamodule import ActivationsDataModule
from traitsae.errors import TraitsaeError
from traitsae.locks import run_dir_lock
from traitsae.paths import hydra_output_dir
from traitsae.sae.export import save_sae
from traitsae.sae.module import SAEModule
from traitsae.training.checkpoint_io import AtomicCheckpointIO
from traitsae.training.config import TrainConfig, instantiate_checked, run_config
from traitsae.training.group_checkpoints import GroupCheckpointIO, recover
from traitsae.training.group_module import MemberLogger, SAEGroupModule, member_metrics
from traitsae.training.grouping import Job
from traitsae.training.resume import finished_export, resume_group
from traitsae.training.trainer import (
    fit,
    job_logs,
    process_settings,
    quiet_lightning_console,
    rank_log_files,
    run_callbacks,
    run_loggers,
    seed_everything,
    trainer_node,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> Path:
    """Train one SAE as configured; returns the run dir (holding sae.json)."""
    (run_dir,) = train_group([(cfg, hydra_output_dir())])
    return run_dir


def train_group(jobs: list[Job]) -> list[Path]:
    """Train every (config, job dir) on the same batches; returns the job dirs.

    The configs agree on `traitsae.training.grouping.SHARED_NODES` (the data, the trainer); each
    job keeps its own SAE, seed (initialisation), optimiser, logger, checkpoints and export.
    """
    rank_log_files()
    configs = _set_up(jobs)
    job_dirs = [Path(job_dir) for _, job_dir in jobs]
    # A solo run's train.log is Hydra's; a group's jobs get theirs here.
    logs = job_logs(job_dirs) if len(jobs) > 1 else nullcontext()
    with exclusive_run_dirs(job_dirs), logs:
        _train_in([(cfg, Path(job_dir)) for cfg, job_dir in jobs], configs)
    return job_dirs


@contextmanager
def exclusive_run_dirs(run_dirs: list[Path]) -> Iterator[None]:
    """One training run per run dir (`traitsae.locks.run_dir_lock`), held by the process that
    launches the run: the other DDP ranks (started by Lightning, torchrun or Slurm) belong to it."""
    with ExitStack() as stack:
        if rank_zero_only.rank == 0:
            for run_dir in run_dirs:
                stack.enter_context(run_dir_lock(run_dir))
        yield


def _train_in(jobs: list[Job], configs: list[TrainConfig]) -> None:
    """The run itself, with every job dir locked. A job whose export is already finished (this
    configuration, every step) keeps it, metrics included; when all are, nothing is done."""
    first, job_dirs = jobs[0][0], [job_dir for _, job_dir in jobs]
    finished = {}
    for index, (cfg, job_dir) in enumerate(jobs):
        if (meta := finished_export(cfg, job_dir)) is not None:
            finished[index] = meta
            log.info(
                "%s already holds this run, finished: %s. Nothing to do for it "
                "(train.overwrite=true trains it again).",
                job_dir, summary(meta["steps"], meta["metrics"]),
            )  # fmt: skip
    if len(finished) == len(jobs):
        return
    if len(jobs) > 1:
        recover(job_dirs)  # a group checkpoint the last run did not finish writing
    ckpt_path = resume_group(jobs)
    with process_settings(first):
        dm, node = prepare_data(first)
        members = []
        for config, job_dir in zip(configs, job_dirs, strict=True):
            torch.manual_seed(config.seed)  # each SAE starts as its solo run would
            member = build_module(config, dm, job_dir)
            if ckpt_path is None:  # a resumed run takes b_dec from its checkpoint
                member.init_from_sample(torch.from_numpy(dm.sample), config.objective.b_dec_init)
            members.append(member)
        _log_start(dm, members, job_dirs)
        module, lightning_kwargs = _lightning_parts(jobs, members)
        trainer = instantiate_checked(
            node, callbacks=run_callbacks(first, job_dirs[0]), **lightning_kwargs
        )
        fit(trainer, module, dm, ckpt_path)
    if trainer.is_global_zero:
        _finish(jobs, members, dm, trainer, skip=set(finished))


def _set_up(jobs: list[Job]) -> list[TrainConfig]:
    """Every job's config typed and checked, its job dir made."""
    configs = [TrainConfig.from_cfg(cfg) for cfg, _ in jobs]
    for _, job_dir in jobs:
        job_dir = Path(job_dir)
        if job_dir.exists() and not job_dir.is_dir():
            raise TraitsaeError(f"hydra.run.dir={job_dir} is a file; the run dir must be a folder.")
        job_dir.mkdir(parents=True, exist_ok=True)
    quiet_lightning_console()
    return configs


def prepare_data(cfg: DictConfig) -> tuple[ActivationsDataModule, dict[str, Any]]:
    """Seed everything, build and prepare the data module; the trainer's node to go with it."""
    seed_everything(int(cfg.seed))
    dm = instantiate_checked(cfg.data, expected_width=cfg.backbone.get("width"))
    dm.prepare()
    return dm, trainer_node(cfg, has_val=dm.n_val_vectors > 0)


def build_module(config: TrainConfig, dm: Any, run_dir: Path) -> SAEModule:
    """The SAE LightningModule for this config and store (d_model and normaliser from the data
    module); draws the SAE's initialisation from torch's RNG."""
    return SAEModule(
        config.architecture.build(dm.d_model),
        config.objective,
        config.optim,
        scale=dm.scale,
        max_steps=config.max_steps,
        figures_dir=str(run_dir / "figures"),
    )


def _lightning_parts(
    jobs: list[Job], members: list[SAEModule]
) -> tuple[SAEModule | SAEGroupModule, dict[str, Any]]:
    """What Lightning trains, with the trainer's loggers (and plugins). One job trains its own
    module: a solo run keeps its plain metric names, hparams and checkpoint layout."""
    if len(members) == 1:
        plugins = [AtomicCheckpointIO()]
        return members[0], {"logger": run_loggers(jobs[0][0]) or False, "plugins": plugins}
    loggers = [
        MemberLogger(index, logger)
        for index, (cfg, _) in enumerate(jobs)
        for logger in run_loggers(cfg)
    ]
    job_dirs = [Path(job_dir) for _, job_dir in jobs]
    checkpoint_io = GroupCheckpointIO(job_dirs, [run_config(cfg) for cfg, _ in jobs])
    return SAEGroupModule(members), {"logger": loggers or False, "plugins": [checkpoint_io]}


def _log_start(dm: Any, members: list[SAEModule], job_dirs: list[Path]) -> None:
    saes = [f"sae={m.sae.variant} d_sae={m.sae.d_sae}" for m in members]
    if len(members) == 1:
        what = saes[0]
    else:
        listed = "; ".join(f"{sae} -> {d}" for sae, d in zip(saes, job_dirs, strict=True))
        what = f"a group of {len(members)} SAEs on one stream ({listed})"
    log.info(
        "training %s on %s (layer %d, %s; %d train / %d val vectors, scale %.4g)",
        what, dm.store_path, dm.layer, dm.tokens, dm.n_train_vectors, dm.n_val_vectors, dm.scale,
    )  # fmt: skip


def _finish(
    jobs: list[Job], members: list[SAEModule], dm: Any, trainer: Any, skip: set[int]
) -> None:
    """Each job's one-line summary and export (rank 0), but for the jobs in `skip` (finished
    before: their exports are kept)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    step = int(trainer.global_step)
    for index, ((cfg, job_dir), member) in enumerate(zip(jobs, members, strict=True)):
        if index in skip:
            continue
        own = member_metrics(metrics, index)  # a solo run's metrics carry no member prefix
        where = f" {job_dir}" if len(jobs) > 1 else ""
        its_log = {"job_dir": str(job_dir)}  # (job_logs: this job's train.log only)
        log.info("done%s, %s", where, summary(step, own), extra=its_log)
        if cfg.train.export:
            path = save_sae(member.sae.cpu(), job_dir, export_meta(cfg, dm, step, own))
            log.info("exported %s", path, extra=its_log)


def summary(step: int, metrics: dict[str, float]) -> str:
    """One line: the final step's validation metrics."""

    def value(key: str) -> str:
        return f"{metrics[key]:.4g}" if key in metrics else "n/a"

    return (
        f"step {step}: val FVU {value('val/fvu')}, L0 {value('val/l0')}, "
        f"dead {value('val/dead_frac')}, dense {value('val/dense_frac')}"
    )


def export_meta(cfg: DictConfig, dm: Any, step: int, metrics: dict[str, float]) -> dict[str, Any]:
    """sae.json fields besides the architecture: provenance, normaliser, final metrics."""
    info = dm.describe()
    return {
        "backbone": info["backbone"],
        "dataset": info["dataset"],
        "split": cfg.split,
        "layer": info["layer"],
        "tokens": info["tokens"],
        "foreground": info["foreground"],  # data.tokens=foreground: foreground patches only
        "scale": info["scale"],
        "store": info["store"],
        "n_train_vectors": info["n_train_vectors"],
        "steps": step,
        "metrics": metrics,
        "config": run_config(cfg),
    }
