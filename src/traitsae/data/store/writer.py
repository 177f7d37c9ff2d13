"""The one store writer: incremental, crash-safe and resumable (`StoreWriter`, `create_store`).

`create_store` writes a whole store from in-memory arrays through the same writer;
`store_is_done` says whether an existing store is already the one asked for.

`StoreWriter.open` creates `<path>.tmp` (or reopens it when its fingerprint matches), `write`
stores a batch of rows and marks them done, `finish` sets `complete` and renames the file to
`<path>`. Crash safety: the file is built under a draft name and becomes `<path>.tmp` only once
every dataset exists at full size with all chunks allocated (HDF5 early allocation), so a crash
or a full disk while creating it leaves nothing to misread. Afterwards the run only overwrites
bytes in place and never touches HDF5 metadata: a process killed at any moment leaves a file
whose structure is intact, and rows not yet marked done are simply redone. (HDF5's SWMR mode
would also do, but a killed SWMR writer leaves "file is open for write" flags that only the
`h5clear` tool removes.)
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from traitsae.config_diff import fingerprint_difference, predates_image_list
from traitsae.data.store.reader import Store, read_fingerprint
from traitsae.data.store.schema import (
    CORE_IMAGE_KEYS,
    ERROR_BYTES,
    ERROR_DTYPE,
    STR_DTYPE,
    decode_text,
    encode_text,
    row_offsets,
    rows_per_chunk,
    tmp_path,
)
from traitsae.errors import TraitsaeError
from traitsae.version import __version__

log = logging.getLogger(__name__)


class StoreWriter:
    """Incremental, resumable writer (see the module docstring). Rows are committed by setting
    `images/done` after their activations are written, so a killed run resumes at the first row
    not done."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.file = file
        self.layers = [int(layer) for layer in file.attrs["layers"]]
        self.n_images = int(file.attrs["n_images"])
        self._patches = {layer: file[f"patches/{layer}"] for layer in self.layers}
        self._cls = {layer: file[f"cls/{layer}"] for layer in self.layers}
        self._valid = file["images/valid"]
        self._error = file["images/error"]
        self._done = file["images/done"]
        self._foreground = file["images"].get("foreground")  # None: the store records no flags
        # The per-row data goes to its preallocated bytes with plain pwrite: no HDF5 chunk
        # cache, no per-batch metadata work, and the GIL is released while the bytes are copied.
        # HDF5 keeps `error` and `done`, and never touches the rows written this way.
        raw = [*self._patches.values(), *self._cls.values(), self._valid]
        raw += [self._foreground] if self._foreground is not None else []
        self._offsets = dict.fromkeys(data.name for data in raw)
        self._fd = -1
        if hasattr(os, "pwrite"):  # POSIX; elsewhere every row goes through HDF5
            self._fd = os.open(file.filename, os.O_WRONLY)
            self._offsets = {data.name: row_offsets(data) for data in raw}

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        attrs: Mapping[str, Any],
        images: Mapping[str, Any],
        fingerprint: str,
        overwrite: bool = False,
    ) -> StoreWriter:
        """Create or resume the unfinished store next to `path`. `attrs` are the root attrs
        (n_images, layers, n_patches and d_model among them); `images` the images/ columns
        known up front (index, path, label, metadata)."""
        path = Path(path)
        tmp = tmp_path(path)
        _ensure_writable(path)
        if tmp.exists():
            existing = read_fingerprint(tmp)
            if existing == fingerprint:
                check_room(tmp, _store_bytes(attrs))
                try:
                    return cls._reopen(path, tmp)
                except OSError:
                    log.warning("%s is unreadable (left by a hard crash); starting again", tmp)
            elif existing is None:
                log.warning("%s is unreadable (left by a crash); starting it again", tmp)
            elif not overwrite:
                raise TraitsaeError(
                    f"an unfinished store {tmp} exists from a run with a different configuration "
                    f"({fingerprint_difference(existing, fingerprint)}). Resuming would mix "
                    "the two runs' rows. Re-run the original command (with the original images) "
                    "to finish it, or pass extract.overwrite=true to start again."
                )
            tmp.unlink()
        draft = tmp.with_name(tmp.name + ".new")
        check_room(tmp, _store_bytes(attrs))
        try:
            _create(draft, attrs, images, fingerprint)
            os.replace(draft, tmp)
        finally:
            draft.unlink(missing_ok=True)
        return cls._reopen(path, tmp)

    @classmethod
    def _reopen(cls, path: Path, tmp: Path) -> StoreWriter:
        return cls(path, h5py.File(tmp, "r+", locking=False))

    @classmethod
    def resume(cls, path: str | Path) -> StoreWriter:
        """Reopen the unfinished store of `path` created by `open` (after a `close`)."""
        return cls._reopen(Path(path), tmp_path(path))

    def first_pending(self) -> int:
        """Index of the first image whose rows are not yet committed."""
        pending = np.flatnonzero(~self._done[()])
        return int(pending[0]) if pending.size else self.n_images

    def write(
        self,
        start: int,
        patches: Mapping[int, np.ndarray],
        cls: Mapping[int, np.ndarray],
        valid: np.ndarray,
        errors: Mapping[int, str] | None = None,
        foreground: np.ndarray | None = None,
    ) -> None:
        """Store rows [start, start + B): patches[L] [B, P, D], cls[L] [B, D] float16.

        `errors` maps absolute row index -> why that row is invalid (kept in images/error);
        `foreground` [B, P] bool goes to images/foreground when the store has it.
        """
        stop = start + len(valid)
        for layer in self.layers:
            self._write_rows(self._patches[layer], start, patches[layer])
            self._write_rows(self._cls[layer], start, cls[layer])
        self._write_rows(self._valid, start, valid)
        if self._foreground is not None and foreground is not None:
            self._write_rows(self._foreground, start, np.asarray(foreground, dtype=bool))
        _fault_injection(stop)
        if errors:
            for index, reason in errors.items():
                self._error[index] = _fit(reason)
            self.file.flush()  # reasons reach the file before their rows are marked done
        # Only now are the rows committed: a run killed before this flush redoes the batch.
        self._done[start:stop] = True
        self.file.flush()

    def _write_rows(self, data: h5py.Dataset, start: int, rows: np.ndarray) -> None:
        """rows -> data[start : start + len(rows)], as raw bytes when the layout allows."""
        offsets_N = self._offsets[data.name]
        if offsets_N is None:
            data[start : start + len(rows)] = rows
            return
        write_rows(self._fd, offsets_N, start, np.ascontiguousarray(rows, dtype=data.dtype))

    def errors(self) -> dict[int, str]:
        """Row index -> reason, for every invalid row written so far (this run and earlier ones)."""
        reasons = self._error[()]
        return {int(i): decode_text(reasons[i]) for i in np.flatnonzero(reasons != b"")}

    def finish(self, complete: bool = True) -> Path:
        """Move the store into place, marked complete (the last attribute written) unless
        `complete=False` (then it stays what an interrupted extraction leaves)."""
        if complete and self.first_pending() != self.n_images:
            raise RuntimeError(f"finish() called with rows still pending in {self.path}")
        self.close()
        tmp = tmp_path(self.path)
        if complete:
            with h5py.File(tmp, "r+", locking=False) as f:
                f.attrs["complete"] = True
        os.replace(tmp, self.path)
        return self.path

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def create_store(
    path: str | Path,
    *,
    patches: Mapping[int, np.ndarray],
    cls: Mapping[int, np.ndarray],
    images: Mapping[str, Any],
    attrs: Mapping[str, Any],
) -> Path:
    """Write a whole store from in-memory arrays with `StoreWriter`.

    `patches[L]` is [N, P, D], `cls[L]` is [N, D] (cast to float16); `images` holds at least
    `path`, usually `label` and metadata columns, and may hold `valid`, `error`, `done` (the
    rows written; the others stay unwritten, as an interrupted extraction leaves them) and
    `foreground` (bool [N, P]; `attrs["foreground"]` then names its rule); `attrs`
    needs backbone, dataset and split. Derived when absent: d_model, n_patches, layers,
    n_images, a square grid, depth (highest layer + 1). `attrs["complete"]=False` leaves the
    store unfinished (at `path` itself).
    """
    path = Path(path)
    layers = sorted(int(layer) for layer in patches)
    if sorted(int(layer) for layer in cls) != layers:
        raise TraitsaeError(f"create_store: patches layers {layers} and cls layers differ.")
    acts = {layer: np.asarray(patches[layer], dtype=np.float16) for layer in layers}
    cls16 = {layer: np.asarray(cls[layer], dtype=np.float16) for layer in layers}
    n_images, n_patches, d_model = acts[layers[0]].shape
    for layer in layers:
        if acts[layer].shape != (n_images, n_patches, d_model) or cls16[layer].shape != (
            n_images,
            d_model,
        ):
            raise TraitsaeError(
                f"create_store: layer {layer} has patches {acts[layer].shape} and cls "
                f"{cls16[layer].shape}; expected [{n_images}, {n_patches}, {d_model}] and "
                f"[{n_images}, {d_model}]."
            )
    side = int(round(np.sqrt(n_patches)))
    root = {
        "d_model": d_model, "n_patches": n_patches, "n_prefix_tokens": 1, "layers": layers,
        "n_images": n_images, "grid": [side, n_patches // max(side, 1)],
        "depth": max(layers) + 1, "image_size": 0, "config": "", **dict(attrs),
    }  # fmt: skip
    complete = bool(root.pop("complete", True))
    columns = {k: v for k, v in images.items() if k not in ("valid", "error", "done", "foreground")}
    flags_NP = images.get("foreground")
    if flags_NP is not None:
        flags_NP = np.asarray(flags_NP, dtype=bool)
        if flags_NP.shape != (n_images, n_patches):
            raise TraitsaeError(
                f"create_store: images['foreground'] has shape {flags_NP.shape}; expected "
                f"[{n_images}, {n_patches}] (images x patches)."
            )
        root.setdefault("foreground", '{"rule": "given"}')
    valid_N = np.asarray(images.get("valid", np.ones(n_images, bool)), dtype=bool)
    done_N = np.asarray(images.get("done", np.ones(n_images, bool)), dtype=bool)
    reasons = np.asarray(images.get("error", [""] * n_images), dtype=object)
    writer = StoreWriter.open(
        path, attrs=root, images=columns, fingerprint=str(root.get("fingerprint", "")),
        overwrite=True,
    )  # fmt: skip
    try:
        for lo, hi in _runs(done_N):
            errors = {i: str(reasons[i]) for i in range(lo, hi) if reasons[i]}
            part = {layer: a[lo:hi] for layer, a in acts.items()}
            part_cls = {layer: a[lo:hi] for layer, a in cls16.items()}
            flags = None if flags_NP is None else flags_NP[lo:hi]
            writer.write(lo, part, part_cls, valid_N[lo:hi], errors, flags)
        return writer.finish(complete=complete)
    finally:
        writer.close()


def store_is_done(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when `out` is a complete store of this config; error or delete when it differs."""
    if not out.exists():
        return False
    existing = read_fingerprint(out)
    if existing == fingerprint or predates_image_list(existing, fingerprint):
        with Store(out, require_complete=False) as store:
            if store.complete:
                if existing != fingerprint:  # kept: re-extracting it could cost hours
                    log.warning(
                        "%s predates the image-list check: its images cannot be confirmed to be "
                        "the dataset's current ones. If the image folder changed since, "
                        "re-extract with extract.overwrite=true.", out,
                    )  # fmt: skip
                return True
    if not overwrite:
        raise TraitsaeError(
            f"store {out} already exists and was written with a different configuration "
            f"({config_difference(existing, fingerprint)}). Pass extract.overwrite=true to "
            "replace it, or write elsewhere with paths.activations_dir=<dir>."
        )
    log.warning("extract.overwrite=true: replacing %s", out)
    out.unlink()
    return False


config_difference = fingerprint_difference  # how a refused resume or overwrite lists the change


def _runs(mask_N: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) of every run of True in `mask_N`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask_N.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _create(
    tmp: Path, attrs: Mapping[str, Any], images: Mapping[str, Any], fingerprint: str
) -> None:
    n_images, n_patches, d_model = (int(attrs[k]) for k in ("n_images", "n_patches", "d_model"))
    with h5py.File(tmp, "w") as f:
        chunk = rows_per_chunk((n_patches, d_model), n_rows=n_images)
        for layer in (int(layer) for layer in attrs["layers"]):
            f.create_dataset(
                f"patches/{layer}", shape=(n_images, n_patches, d_model), dtype=np.float16,
                chunks=(chunk, n_patches, d_model), dcpl=_preallocated(),
            )  # fmt: skip
            f.create_dataset(
                f"cls/{layer}", shape=(n_images, d_model), dtype=np.float16,
                chunks=(min(n_images, 4096), d_model), dcpl=_preallocated(),
            )  # fmt: skip
        group = f.create_group("images")
        columns = _write_images(group, images, n_images)
        group.create_dataset("valid", data=np.ones(n_images, dtype=bool))
        group.create_dataset("done", data=np.zeros(n_images, dtype=bool))
        group.create_dataset("error", (n_images,), ERROR_DTYPE, dcpl=_preallocated())
        if attrs.get("foreground"):  # the rule that fills it, as JSON
            group.create_dataset(
                "foreground", shape=(n_images, n_patches), dtype=bool,
                chunks=(rows_per_chunk((n_patches,), 1, n_images), n_patches),
                dcpl=_preallocated(fill=True),
            )  # fmt: skip
        root = {"traitsae_version": __version__, **attrs}
        root.update(metadata_columns=columns, fingerprint=fingerprint)
        for key, value in root.items():
            _set_attr(f, key, value)
        f.attrs["complete"] = False


def _write_images(group: h5py.Group, images: Mapping[str, Any], n_images: int) -> list[str]:
    """Write the known images/ columns (default index and label); returns the metadata column
    names (every column that is not bookkeeping)."""
    columns = {
        "index": np.arange(n_images, dtype=np.int64),
        "label": np.full(n_images, -1, dtype=np.int64),
        **images,
    }
    for key, values in columns.items():
        arr = np.asarray(values)
        if arr.shape[:1] != (n_images,):
            raise TraitsaeError(
                f"images/{key} has {arr.shape[:1]} rows but the store holds {n_images} images."
            )
        if arr.dtype.kind in "USO":
            text = np.array([encode_text(v) for v in arr.tolist()] or [], dtype=object)
            group.create_dataset(key, data=text, dtype=STR_DTYPE, shape=(n_images,))
        else:
            group.create_dataset(key, data=arr)
    return [key for key in columns if key not in CORE_IMAGE_KEYS]


def _set_attr(obj: h5py.HLObject, key: str, value: Any) -> None:
    """Set an attr; strings (and string lists) are stored as utf-8 text (see `encode_text`)."""
    if isinstance(value, list | tuple | np.ndarray):
        arr = np.asarray(value)
        if arr.dtype.kind in "USO" or (arr.size == 0 and key == "metadata_columns"):
            text = np.array([encode_text(v) for v in arr.tolist()], dtype=object)
            obj.attrs.create(key, text, shape=(len(text),), dtype=STR_DTYPE)
            return
        obj.attrs[key] = arr
    elif value is None:
        obj.attrs[key] = ""
    elif isinstance(value, str):
        obj.attrs.create(key, encode_text(value), dtype=STR_DTYPE)
    else:
        obj.attrs[key] = value


def _preallocated(fill: bool = False) -> h5py.h5p.PropDCID:
    """Dataset creation properties: allocate every chunk now, and write fill values (zeros)
    only when `fill` (small datasets; the activations are never filled)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if fill else h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _store_bytes(attrs: Mapping[str, Any]) -> int:
    """Upper estimate of the file's size: activations, per-image columns (error reasons are
    ERROR_BYTES each, paths and metadata ~1 KiB) and 1 MiB of HDF5 metadata."""
    n, p, d = (int(attrs[k]) for k in ("n_images", "n_patches", "d_model"))
    flags = n * p if attrs.get("foreground") else 0
    return len(attrs["layers"]) * n * (p + 1) * d * 2 + n * (ERROR_BYTES + 1024) + flags + 2**20


def check_room(path: Path, total_bytes: int) -> None:
    """Refuse to start when the store cannot fit: free disk space under `path`'s folder (minus
    what `path` already holds) and the process file-size limit (`ulimit -f`), which a file of
    full length no longer meets. A file cut short by either, even where HDF5 reports success,
    is unreliable (h5py can crash closing it): that is why this is checked first."""
    stat = path.stat() if path.exists() else None
    held, length = (stat.st_blocks * 512, stat.st_size) if stat else (0, 0)
    free = shutil.disk_usage(path.parent).free
    if total_bytes - held > free:
        raise TraitsaeError(
            f"the store {path} needs {_size(total_bytes - held)} more, but only {_size(free)} are "
            f"free under {path.parent}. Free space there or write elsewhere with "
            "paths.activations_dir=<dir>; rerunning the same command then resumes."
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and total_bytes > max(limit, length):
        raise TraitsaeError(
            f"the store {path} needs up to {_size(total_bytes)}, above this process's file-size "
            f"limit of {_size(limit)} (ulimit -f). Raise the limit (ulimit -f unlimited) and run "
            "the same command again."
        )


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return ""


def _fit(reason: str) -> bytes:
    """Stored bytes of `reason`, cut to ERROR_BYTES (on a character boundary when cut)."""
    raw = encode_text(reason)
    if len(raw) <= ERROR_BYTES:
        return raw
    return raw[:ERROR_BYTES].decode("utf-8", "ignore").encode("utf-8")


def write_rows(fd: int, offsets_N: np.ndarray, start: int, rows: np.ndarray) -> None:
    """Write C-contiguous `rows` as rows [start, start + len(rows)) of a dataset whose rows
    start at byte `offsets_N` of the file open as `fd` (see `row_offsets`)."""
    if not len(rows):
        return
    offsets_B = offsets_N[start : start + len(rows)]
    # Consecutive rows of one chunk are consecutive bytes: one write per run of them.
    breaks = np.flatnonzero(np.diff(offsets_B) != rows[0].nbytes) + 1
    for lo, hi in zip([0, *breaks], [*breaks, len(rows)], strict=True):
        _pwrite_all(fd, memoryview(rows[lo:hi]).cast("B"), int(offsets_B[lo]))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # pwrite may write less than asked (e.g. > 2 GiB at once on Linux)
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _fault_injection(rows_written: int) -> None:
    """Crash-test hook: `TRAITSAE_KILL_AFTER_ROWS=n` sends this process SIGKILL (or the signal
    named by `TRAITSAE_KILL_SIGNAL`, e.g. INT for Ctrl-C) once rows up to n are written but
    *before* they are marked done -- the worst moment for a crash (tests use it)."""
    limit = os.environ.get("TRAITSAE_KILL_AFTER_ROWS")
    if limit and rows_written >= int(limit):
        name = os.environ.get("TRAITSAE_KILL_SIGNAL", "KILL")
        os.environ.pop("TRAITSAE_KILL_AFTER_ROWS")  # once
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def _ensure_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TraitsaeError(
            f"cannot create the store directory {path.parent} ({err.strerror}); set "
            "paths.activations_dir to a writable directory."
        ) from err
    if not os.access(path.parent, os.W_OK):
        raise TraitsaeError(
            f"the store directory {path.parent} is not writable; set paths.activations_dir to a "
            "writable directory."
        )
