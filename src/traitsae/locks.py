"""One writer at a time: a lock file naming its owner's pid and host while a stage writes.

- `store_lock(store)`: one extraction per store (`<store>.lock`);
- `run_dir_lock(run_dir)`: one training run per run dir (`<run dir>/train.lock`).

A second writer refuses, naming the owner. A lock left by a process that died is taken over:
same host and its pid is gone, or an earlier incarnation of this same Slurm job (a requeued job
restarts, possibly on another node, and runs one incarnation at a time). Locks of another host
cannot be checked from here: the message says which file to delete once that run is known to be
gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from traitsae.errors import TraitsaeError

log = logging.getLogger(__name__)
RUN_DIR_LOCK = "train.lock"


def lock_path(store: Path) -> Path:
    """The lock file of a store: `<store>.lock` next to it."""
    return store.with_name(store.name + ".lock")


@contextmanager
def store_lock(store: Path) -> Iterator[Path]:
    """Hold `<store>.lock` while an extraction writes `store`."""
    with exclusive(lock_path(store), f"store {store} is being written by another extraction"):
        yield lock_path(store)


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `<run dir>/train.lock` while a training run writes checkpoints and its export."""
    path = Path(run_dir) / RUN_DIR_LOCK
    with exclusive(path, f"run dir {run_dir} is in use by another training run"):
        yield path


@contextmanager
def exclusive(path: Path, busy: str) -> Iterator[Path]:
    """Hold the lock file `path` for the block; `busy` starts the error a second writer gets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    for _ in range(3):  # a lost race with another taker re-reads the new owner
        if _create_with(path, json.dumps(me)):
            break
        owner = _read_owner(path)
        if owner is not None and not _is_stale(owner, me):
            raise TraitsaeError(
                f"{busy} (pid {owner['pid']} on host {owner['host']}, lock file {path}). Wait "
                "for it to finish, or stop it; if that process no longer exists, delete the "
                "lock file."
            )
        log.warning("taking over the stale lock %s (its owner %s has exited)", path, owner)
        path.unlink(missing_ok=True)
    else:
        raise TraitsaeError(f"could not take the lock {path}; retry the command.")
    try:
        yield path
    finally:
        if _read_owner(path) == me:
            path.unlink(missing_ok=True)


def _me() -> dict[str, Any]:
    me: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
    if os.environ.get("SLURM_JOB_ID"):
        me["slurm_job"] = os.environ["SLURM_JOB_ID"]
        me["slurm_restart"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return me


def _create_with(path: Path, text: str) -> bool:
    """Create `path` holding `text` atomically (a reader never sees it empty); False if it
    exists. The hard link is what fails when another process holds the lock."""
    draft = path.with_name(f"{path.name}.{os.getpid()}")
    draft.write_text(text)
    try:
        os.link(draft, path)
        return True
    except FileExistsError:
        return False
    finally:
        draft.unlink(missing_ok=True)


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The lock's {pid, host[, slurm_job, slurm_restart]}; None when it is unreadable (not
    written by this module)."""
    try:
        owner = json.loads(path.read_text())
        return {**owner, "pid": int(owner["pid"]), "host": str(owner["host"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_stale(owner: dict[str, Any], me: dict[str, Any]) -> bool:
    if owner.get("slurm_job") and owner.get("slurm_job") == me.get("slurm_job"):
        # The same Slurm job again: an earlier incarnation (requeued) is gone by now.
        return owner.get("slurm_restart") != me.get("slurm_restart")
    if owner["host"] != me["host"]:
        return False  # cannot tell from here
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
