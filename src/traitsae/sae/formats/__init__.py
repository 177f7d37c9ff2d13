"""Checkpoints of other SAE libraries, read into traitsae's `RawSpaceSAE`.

One module per library (saelens, sparsify, saev, overcomplete, dictionary_learning), each with
`FILES` (what it looks for, for messages), `find(path)` (the checkpoint it would read at
`path`, or None) and `read(location) -> ForeignSAE`. `traitsae.load_sae` stays the one entry:
it calls `load_foreign` for anything that is not a traitsae export. `saev_export` writes a
traitsae SAE in saev's layout. Torch pickles are read with
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from traitsae.errors import TraitsaeError
from traitsae.sae.formats import dictionary_learning, overcomplete, saelens, saev, sparsify
from traitsae.sae.formats.common import Converted, ForeignSAE, require_placement, to_traitsae

READERS: dict[str, ModuleType] = {
    "saelens": saelens,
    "sparsify": sparsify,
    "saev": saev,
    "overcomplete": overcomplete,
    "dictionary_learning": dictionary_learning,
}
TRAITSAE_FILES = "sae.json + sae.safetensors (traitsae's own export)"

__all__ = ["READERS", "Converted", "ForeignSAE", "detect", "load_foreign", "require_placement"]


def _looked_for() -> str:
    return "; ".join(
        [f"traitsae: {TRAITSAE_FILES}"] + [f"{n}: {m.FILES}" for n, m in READERS.items()]
    )


def detect(path: str | Path, fmt: str | None = None) -> tuple[str, Path]:
    """(library name, checkpoint location) of the foreign checkpoint at `path`.

    `fmt` names the library when the files fit several; without it the files decide."""
    path = Path(path)
    if not path.exists():
        raise TraitsaeError(f"no SAE checkpoint at {path}: the path does not exist.")
    if fmt is not None:
        if fmt not in READERS:
            raise TraitsaeError(
                f"sae_format={fmt!r} is unknown; use one of traitsae, {', '.join(READERS)}."
            )
        location = READERS[fmt].find(path)
        if location is None:
            raise TraitsaeError(
                f"sae_format={fmt} was given, but {path} does not hold its files "
                f"({READERS[fmt].FILES})."
            )
        return fmt, location
    found = {name: loc for name, reader in READERS.items() if (loc := reader.find(path))}
    if not found:
        raise TraitsaeError(
            f"no exported SAE at {path}: it matches no checkpoint format traitsae reads. Looked "
            f"for {_looked_for()}."
            " Point at the folder (or file) the library saved (a train.py run dir holds sae.json"
            " once training finished), or pass sae_format=<name>."
        )
    if len(found) > 1:
        raise TraitsaeError(
            f"{path} fits several checkpoint formats ({', '.join(found)}); pass "
            f"sae_format=<one of them> to say which library saved it."
        )
    ((name, location),) = found.items()
    return name, location


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint of one of the libraries read here."""
    return any(reader.find(Path(path)) for reader in READERS.values())


def load_foreign(path: str | Path, fmt: str | None = None, **placement: Any) -> Converted:
    """Read a foreign checkpoint into traitsae's pieces (`traitsae.load_sae` wraps them).

    `placement` (backbone, layer, tokens) overrides what the checkpoint records."""
    name, location = detect(path, fmt)
    return to_traitsae(READERS[name].read(location), location, placement)
