"""Checkpoints written whole or not at all (`AtomicCheckpointIO`).

Lightning's own writer serialises to memory, then copies a temporary file from the system's
temp folder into place: on another filesystem than /tmp that copy truncates the target first,
so a kill during the `last.ckpt` rewrite left 0 bytes, and no fsync guards against power loss.
Here every checkpoint goes through `traitsae.files.atomic_write`: the previous one stays intact
until the new one is complete on disk. Reusable: a plugin subclasses it and calls
`save_checkpoint` for each file it writes (`GroupCheckpointIO` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from traitsae.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are atomic (temporary file, fsync, rename)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote: Lightning's own way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: torch.save(checkpoint, file))
