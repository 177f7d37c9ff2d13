"""Each job of a group keeps its own checkpoint files: the group's checkpoint, cut by member.

A member's file has the layout of a solo run's checkpoint (its weights, its optimiser and lr
schedule state, the shared loop and data state); resuming a group reads every member's file at the
same step and joins them again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traitsae.errors import TraitsaeError
from traitsae.files import atomic_write
from traitsae.training.checkpoint_io import AtomicCheckpointIO
from traitsae.training.resume import CHECKPOINT_DIR

# LambdaLR's state entries that hold one value per param group (= per member).
PER_GROUP_SCHEDULER_KEYS = ("base_lrs", "_last_lr", "lr_lambdas")


def split_checkpoint(
    checkpoint: dict[str, Any], index: int, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Member `index`'s part of a group checkpoint, in a solo run's layout; `config` (the job's
    own run config) replaces the group's in the resume state, so each job's resume is checked
    against its own settings."""
    prefix = f"members.{index}."
    part = dict(checkpoint)
    if config is not None:
        part["callbacks"] = {
            key: {**state, "config": config} if "config" in state else state
            for key, state in (checkpoint.get("callbacks") or {}).items()
        }
    part["state_dict"] = {
        key[len(prefix) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    part["optimizer_states"] = [_split_optimizer(s, index) for s in checkpoint["optimizer_states"]]
    part["lr_schedulers"] = [
        {k: [v[index]] if k in PER_GROUP_SCHEDULER_KEYS else v for k, v in s.items()}
        for s in checkpoint["lr_schedulers"]
    ]
    return part


def _split_optimizer(state: dict[str, Any], index: int) -> dict[str, Any]:
    group = state["param_groups"][index]
    return {
        "state": {
            new: state["state"][old]
            for new, old in enumerate(group["params"])
            if old in state["state"]
        },
        "param_groups": [{**group, "params": list(range(len(group["params"])))}],
    }


def join_checkpoints(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The group checkpoint from its members' parts (inverse of `split_checkpoint`)."""
    joined = dict(parts[0])
    joined["state_dict"] = {
        f"members.{index}.{key}": value
        for index, part in enumerate(parts)
        for key, value in part["state_dict"].items()
    }
    joined["optimizer_states"] = [
        _join_optimizers([part["optimizer_states"][i] for part in parts])
        for i in range(len(parts[0]["optimizer_states"]))
    ]
    joined["lr_schedulers"] = []
    for i, first in enumerate(parts[0]["lr_schedulers"]):
        states = [part["lr_schedulers"][i] for part in parts]
        joined["lr_schedulers"].append(
            {
                k: [s[k][0] for s in states] if k in PER_GROUP_SCHEDULER_KEYS else v
                for k, v in first.items()
            }
        )
    return joined


def _join_optimizers(states: list[dict[str, Any]]) -> dict[str, Any]:
    joined: dict[str, Any] = {"state": {}, "param_groups": []}
    offset = 0
    for state in states:
        (group,) = state["param_groups"]
        n = len(group["params"])
        joined["state"].update({offset + k: v for k, v in state["state"].items()})
        joined["param_groups"].append({**group, "params": list(range(offset, offset + n))})
        offset += n
    return joined


class GroupCheckpointIO(AtomicCheckpointIO):
    """Saves a group checkpoint as one file per job, at the same path inside each job dir
    (each file written atomically).

    Lightning names checkpoint paths inside the first job's dir; member i's file is the same
    path relative to job dir i.
    """

    def __init__(self, job_dirs: list[Path], configs: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.job_dirs = [Path(d) for d in job_dirs]
        self.configs = configs or [None] * len(self.job_dirs)

    def member_paths(self, path: str | Path) -> list[Path]:
        relative = Path(path).resolve().relative_to(self.job_dirs[0].resolve())
        return [job_dir / relative for job_dir in self.job_dirs]

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        """All members' files or none: each part is written to `<file>.partial`; once all are,
        a `<file>.commit` marker in the first job's dir says so, and the parts are renamed
        into place. A kill before the marker leaves every member at the old step; a kill
        after it is finished by `recover` (the next run's first step)."""
        paths = self.member_paths(path)
        for index, member_path in enumerate(paths):
            part = split_checkpoint(checkpoint, index, self.configs[index])
            super().save_checkpoint(part, partial_path(member_path), storage_options)
        listed = "\n".join(str(p) for p in paths).encode()
        marker = atomic_write(commit_path(paths[0]), lambda file: file.write(listed))  # commit
        _finish_commit(marker)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        paths = self.member_paths(path)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise TraitsaeError(
                f"cannot resume the grouped sweep from {path}: these jobs have no checkpoint at "
                f"the same step: {', '.join(missing)}. Re-run the sweep in a new hydra.sweep.dir, "
                "or pass train.resume=false to start every job of the group afresh."
            )
        load = super().load_checkpoint  # (a comprehension has no zero-argument super())
        parts = [load(p, map_location, weights_only) for p in paths]
        steps = {part.get("global_step") for part in parts}
        if len(steps) > 1:
            raise TraitsaeError(
                f"cannot resume the grouped sweep: its jobs' checkpoints {[str(p) for p in paths]} "
                f"are at different steps {sorted(steps)}. Re-run in a new hydra.sweep.dir or with "
                "train.resume=false."
            )
        return join_checkpoints(parts)

    def remove_checkpoint(self, path: str | Path) -> None:
        for member_path in self.member_paths(path):
            super().remove_checkpoint(member_path)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def commit_path(path: Path) -> Path:
    return path.with_name(path.name + ".commit")


def _finish_commit(marker: Path) -> None:
    """Rename the parts a commit marker lists into place (those not renamed yet)."""
    for member_path in map(Path, marker.read_text().split("\n")):
        partial = partial_path(member_path)
        if partial.exists():
            os.replace(partial, member_path)
    marker.unlink()


def recover(job_dirs: list[Path]) -> None:
    """Finish a group checkpoint that was committed but not wholly renamed; drop the parts of
    one that was not committed. Afterwards every member's files are at one step."""
    for marker in (Path(job_dirs[0]) / CHECKPOINT_DIR).glob("*.commit"):
        _finish_commit(marker)
    for job_dir in job_dirs:
        for partial in (Path(job_dir) / CHECKPOINT_DIR).glob("*.partial"):
            partial.unlink()
