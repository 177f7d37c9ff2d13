"""One writer per store: `<store>.lock` names the owner's pid and host while an extraction runs.

A second extraction of the same store refuses, naming the owner. A lock left by a process that
died (same host, pid gone) is taken over. Locks of another host cannot be checked from here: the
message says which file to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from traitsae.errors import TraitsaeError

log = logging.getLogger(__name__)


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


@contextmanager
def store_lock(store: Path) -> Iterator[Path]:
    """Hold `<store>.lock` for the duration of the block (see module docstring)."""
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):  # a lost race with another taker re-reads the new owner
        if _create_with(path, json.dumps(me)):
            break
        owner = _read_owner(path)
        if owner is not None and not _is_stale(owner, me["host"]):
            raise TraitsaeError(
                f"store {store} is being written by another extraction (pid {owner['pid']} on "
                f"host {owner['host']}, lock file {path}). Wait for it to finish, or stop it; if "
                "that process no longer exists, delete the lock file."
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


def _read_owner(path: Path) -> dict | None:
    """The lock's {pid, host}; None when it is unreadable (not written by this module)."""
    try:
        owner = json.loads(path.read_text())
        return {"pid": int(owner["pid"]), "host": str(owner["host"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_stale(owner: dict, host: str) -> bool:
    if owner["host"] != host:
        return False  # cannot tell from here
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
