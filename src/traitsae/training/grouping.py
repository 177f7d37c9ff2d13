"""Which jobs of a sweep can train on one shared activation stream."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Config nodes that must be equal for jobs to share one stream and one Lightning Trainer: the data
# (store, layer, tokens, batch size, seed, ...), the training length and precision, checkpointing.
SHARED_NODES = ("data", "trainer", "checkpoint", "torch_threads", "train.resume")


Job = tuple[DictConfig, Path]  # a job's resolved config and its job dir


def shared_config(job: Job) -> dict[str, Any]:
    """The part of a job's config that its group shares, flattened to dotted keys; the job's
    own dir (e.g. trainer.default_root_dir) reads as `<job dir>` so it does not split groups."""
    cfg, job_dir = job
    flat: dict[str, Any] = {}
    for node in SHARED_NODES:
        value = OmegaConf.select(cfg, node)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        _flatten(node, value, flat)
    own = str(job_dir)
    return {k: v.replace(own, "<job dir>") if isinstance(v, str) else v for k, v in flat.items()}


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, out)
    else:
        out[prefix] = value


def group_jobs(jobs: Sequence[Job]) -> list[list[int]]:
    """Job indices grouped by shared config, groups in order of their first job."""
    groups: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        key = repr(sorted(shared_config(job).items()))
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def splitting_keys(jobs: Sequence[Job], groups: list[list[int]]) -> list[str]:
    """The shared keys whose values differ between groups (what kept the jobs apart)."""
    firsts = [shared_config(jobs[group[0]]) for group in groups]
    keys = sorted(set().union(*firsts))
    return [key for key in keys if len({repr(f.get(key)) for f in firsts}) > 1]
