"""Files written whole or not at all: `atomic_write` (a temporary file in the same folder,
fsync'd, renamed over the target), and the write errors that mean "no room"."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from traitsae.errors import TraitsaeError

# Write errors that mean "no room": what to tell the user instead of a traceback.
NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "the file-size limit (ulimit -f) is reached"}  # fmt: skip


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through `write(file)`: a reader, or a rerun after a crash (SIGKILL, power
    loss) or a full disk, sees the previous file or the new one, never a part of either.

    The bytes go to `.<name>.tmp-<pid>` in the same folder (a rename across filesystems would be
    a copy into the target, which a crash cuts short), are fsync'd, and replace `path` with one
    rename; the folder is fsync'd so the rename survives a crash too. On an error the temporary
    file is removed and `path` is untouched; no room left is a TraitsaeError.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if (full := no_space(err)) is not None:
            raise TraitsaeError(
                f"writing {path} failed: {NO_SPACE[full.errno]} ({full.strerror}). "
                f"{'The previous ' + path.name + ' is kept. ' if path.exists() else ''}Free "
                f"space under {path.parent} and run the same command again."
            ) from None
        raise
    _fsync_dir(path.parent)
    return path


def no_space(err: BaseException) -> OSError | None:
    """The out-of-room OSError behind `err`, if any: writers such as torch.save's zip writer
    report a failed write as their own error, with the OSError as its context."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: folders cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders
    finally:
        os.close(fd)
