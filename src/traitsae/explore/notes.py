"""Notes a user attaches to latents, kept in one JSON file beside the run (session.notes):
`{"<latent>": "<text>"}`. Written whole to a temporary file in the same folder, then renamed, so
a crash or a second explorer never leaves half a file; read again on every save, so two open
pages do not drop each other's notes on other latents."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from traitsae.errors import TraitsaeError


def read_notes(path: str | Path) -> dict[int, str]:
    """Latent -> note; {} when the file does not exist yet."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {int(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError) as err:
        raise TraitsaeError(
            f"notes file {path} is not a JSON object of latent -> text ({err}); fix or move it "
            "(explore.notes=<file> to keep notes elsewhere)."
        ) from None


def save_note(path: str | Path, latent: int, text: str) -> dict[int, str]:
    """Set (or, with empty text, drop) one latent's note; returns all notes."""
    path = Path(path)
    notes = read_notes(path)
    if text.strip():
        notes[int(latent)] = text.strip()
    else:
        notes.pop(int(latent), None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({str(k): v for k, v in sorted(notes.items())}, f, indent=1)
        os.replace(partial, path)
    except OSError as err:
        raise TraitsaeError(
            f"cannot write notes file {path} ({err.strerror}); give a writable file with "
            "explore.notes=<file>."
        ) from None
    return notes
