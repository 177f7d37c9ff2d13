"""The HDF5 activation store: one file per backbone x dataset x split (schema in DESIGN.md).

Layout:
  root attrs   backbone, dataset, split, d_model, n_patches, n_prefix_tokens, grid, layers (absolute),
               depth, image_size, config (resolved YAML), fingerprint, traitsae_version, n_images,
               image_root, metadata_columns, complete (set last)
  patches/<L>  float16 [N, P, D], chunked along N (a few MiB per chunk)
  cls/<L>      float16 [N, D]
  images/      index int64, path utf-8 (absolute), label int64 (-1 = none), valid bool, error utf-8
               (why an image is invalid), done bool (extraction progress), one utf-8 dataset per
               metadata column

Three ways in:
  `Store(path)`                 the read-only reader every later stage uses;
  `create_store(path, ...)`     one-shot writer from in-memory arrays (tests, small stores);
  `StoreWriter`                 the incremental, crash-safe writer extraction uses: it writes
                                `<path>.tmp`, records finished rows in `images/done` and renames
                                to `<path>` once complete.

Crash safety: the writer creates every dataset at full size with all chunks allocated up front
(HDF5 early allocation) and writes reasons into a fixed-length string dataset, so after creation
the run only overwrites raw bytes in place and never touches HDF5 metadata. A process killed at any
moment leaves a file whose structure is intact; rows not yet marked done are simply redone.
(HDF5's SWMR mode would also do, but a killed SWMR writer leaves "file is open for write" flags
that only the `h5clear` tool removes.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from traitsae import __version__
from traitsae.errors import TraitsaeError

STR_DTYPE = h5py.string_dtype("utf-8")
# Bookkeeping datasets under images/ that are not user metadata columns.
CORE_IMAGE_KEYS = ("index", "path", "label", "valid", "error", "done")
# Aim for chunks of ~2 MiB: whole-chunk reads are what the training loader does.
TARGET_CHUNK_BYTES = 2 * 1024 * 1024
# Fixed-length, so recording a reason rewrites bytes in place (no HDF5 heap/metadata change).
ERROR_BYTES = 256
ERROR_DTYPE = h5py.string_dtype("utf-8", ERROR_BYTES)
REQUIRED_ATTRS = ("backbone", "dataset", "split", "d_model", "n_patches", "grid", "layers", "depth")


def rows_per_chunk(row_shape: tuple[int, ...], itemsize: int = 2, n_rows: int | None = None) -> int:
    """Rows of one chunk along N so that a chunk holds about TARGET_CHUNK_BYTES."""
    row_bytes = int(np.prod(row_shape)) * itemsize
    rows = max(1, TARGET_CHUNK_BYTES // max(row_bytes, 1))
    return int(min(rows, n_rows)) if n_rows else int(rows)


def tmp_path(path: str | Path) -> Path:
    """Where an unfinished store lives until it is complete (never read by training)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


class Store:
    """Read-only view of one activation store. Use as a context manager or call `close()`."""

    def __init__(self, path: str | Path, require_complete: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TraitsaeError(
                f"activation store {self.path} does not exist; write it with extract.py "
                "(see traitsae.paths.extract_command)."
            )
        try:
            self.file = h5py.File(self.path, "r", locking=False)
        except OSError as err:
            raise TraitsaeError(
                f"{self.path} is not a readable HDF5 file ({err}); re-extract it with extract.py "
                "(add extract.overwrite=true to replace it)."
            ) from err
        self._validate(require_complete)
        attrs = self.file.attrs
        self.backbone: str = str(attrs["backbone"])
        self.dataset: str = str(attrs["dataset"])
        self.split: str = str(attrs["split"])
        self.d_model: int = int(attrs["d_model"])
        self.n_patches: int = int(attrs["n_patches"])
        self.n_prefix_tokens: int = int(attrs.get("n_prefix_tokens", 1))
        self.grid: tuple[int, int] = tuple(int(g) for g in attrs["grid"])  # (rows, cols)
        self.layers: list[int] = [int(layer) for layer in attrs["layers"]]
        self.depth: int = int(attrs["depth"])
        self.image_size: int = int(attrs.get("image_size", 0))
        self.n_images: int = int(attrs.get("n_images", self.file["images/index"].shape[0]))
        self.complete: bool = bool(attrs.get("complete", False))
        self.config: str = str(attrs.get("config", ""))
        self.metadata_columns: list[str] = [str(c) for c in attrs.get("metadata_columns", [])]
        self._metadata: dict[str, np.ndarray] | None = None

    def _validate(self, require_complete: bool) -> None:
        attrs = self.file.attrs
        missing = [key for key in REQUIRED_ATTRS if key not in attrs]
        groups = [g for g in ("patches", "cls", "images") if g not in self.file]
        if missing or groups:
            self.file.close()
            raise TraitsaeError(
                f"{self.path} is not a traitsae activation store: missing root attrs {missing} "
                f"and groups {groups}. Write stores with extract.py (or "
                "traitsae.data.store.create_store)."
            )
        if require_complete and not bool(attrs.get("complete", False)):
            self.file.close()
            raise TraitsaeError(
                f"activation store {self.path} is incomplete (extraction was interrupted); "
                "re-run the same extract.py command to finish it."
            )

    def resolve_layer(self, layer: int) -> int:
        """Absolute block index of `layer` (negative counts from the end of the backbone)."""
        absolute = int(layer) + self.depth if int(layer) < 0 else int(layer)
        if absolute not in self.layers:
            raise TraitsaeError(
                f"layer {layer} (absolute {absolute} of depth {self.depth}) is not in store "
                f"{self.path}, which holds layers {self.layers}; pick one of those or re-extract "
                f"with backbone.layers=[{layer}]."
            )
        return absolute

    def patches(self, layer: int) -> h5py.Dataset:
        """float16 [N, P, D] patch activations after block `layer`."""
        return self.file[f"patches/{self.resolve_layer(layer)}"]

    def cls(self, layer: int) -> h5py.Dataset:
        """float16 [N, D] CLS-token activations after block `layer`."""
        return self.file[f"cls/{self.resolve_layer(layer)}"]

    def tokens(self, layer: int, tokens: str = "patches") -> h5py.Dataset:
        if tokens not in ("patches", "cls"):
            raise TraitsaeError(f"tokens must be 'patches' or 'cls', got {tokens!r}.")
        return self.patches(layer) if tokens == "patches" else self.cls(layer)

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """index, path, label, valid (and error) plus every metadata column, read once."""
        if self._metadata is None:
            images = self.file["images"]
            meta: dict[str, np.ndarray] = {}
            for key in ("index", "label", "valid"):
                meta[key] = images[key][()]
            for key in ("path", "error", *self.metadata_columns):
                if key in images:
                    meta[key] = images[key].asstr()[()].astype(object)
            self._metadata = meta
        return self._metadata

    @property
    def valid(self) -> np.ndarray:
        return self.metadata["valid"]

    def iter_blocks(
        self, layer: int, tokens: str = "patches", block: int = 256
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, float16 rows [b, P, D] or [b, D]) in order, `block` images at a time."""
        dataset = self.tokens(layer, tokens)
        for start in range(0, self.n_images, block):
            yield start, dataset[start : start + block]

    def iter_valid(
        self, layer: int, tokens: str = "patches", block: int = 256, keep: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (store rows [b], float16 rows [b, P, D] or [b, D]) of the valid images (and of
        `keep`, a bool [N] mask, when given), in order, `block` images per read; a block with no
        such image is not read at all."""
        keep_N = self.valid if keep is None else self.valid & np.asarray(keep, dtype=bool)
        dataset = self.tokens(layer, tokens)
        for start in range(0, self.n_images, block):
            keep_B = keep_N[start : start + block]
            if not keep_B.any():
                continue
            acts = dataset[start : start + len(keep_B)]
            rows_B = np.arange(start, start + len(keep_B))
            yield (rows_B, acts) if keep_B.all() else (rows_B[keep_B], acts[keep_B])

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, backbone={self.backbone}, dataset={self.dataset}, "
            f"split={self.split}, n_images={self.n_images}, layers={self.layers}, "
            f"d_model={self.d_model}, n_patches={self.n_patches})"
        )


def _root_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """User attrs plus the fixed version attr."""
    return {"traitsae_version": __version__, **dict(attrs)}


def _set_attr(obj: h5py.HLObject, key: str, value: Any) -> None:
    """Set an attr; string lists become utf-8 string arrays (h5py rejects numpy '<U')."""
    if isinstance(value, list | tuple | np.ndarray):
        arr = np.asarray(value)
        if arr.dtype.kind in "USO" or (arr.size == 0 and key == "metadata_columns"):
            obj.attrs.create(key, np.array(list(value), dtype=object), dtype=STR_DTYPE)
            return
        obj.attrs[key] = arr
    elif value is None:
        obj.attrs[key] = ""
    else:
        obj.attrs[key] = value


def _write_images(group: h5py.Group, images: Mapping[str, Any], n_images: int) -> list[str]:
    """Write images/ datasets; returns the metadata column names (everything not core)."""
    columns = []
    for key, values in images.items():
        arr = np.asarray(values)
        if arr.shape[0] != n_images:
            raise TraitsaeError(
                f"images/{key} has {arr.shape[0]} rows but the store holds {n_images} images."
            )
        if arr.dtype.kind in "USO":
            group.create_dataset(key, data=arr.astype(object), dtype=STR_DTYPE)
        else:
            group.create_dataset(key, data=arr)
        if key not in CORE_IMAGE_KEYS:
            columns.append(key)
    defaults = {
        "index": np.arange(n_images, dtype=np.int64),
        "label": np.full(n_images, -1, dtype=np.int64),
        "valid": np.ones(n_images, dtype=bool),
    }
    for key, default in defaults.items():
        if key not in group:
            group.create_dataset(key, data=default)
    if "path" not in group:
        group.create_dataset("path", data=np.array([""] * n_images, dtype=object), dtype=STR_DTYPE)
    return columns


def create_store(
    path: str | Path,
    *,
    patches: Mapping[int, np.ndarray],
    cls: Mapping[int, np.ndarray],
    images: Mapping[str, Any],
    attrs: Mapping[str, Any],
) -> Path:
    """Write a complete store in one go from in-memory arrays.

    `patches[L]` is [N, P, D], `cls[L]` is [N, D] (cast to float16); `images` holds at least
    `path` and usually `label`, plus metadata columns; `attrs` needs backbone, dataset, split,
    depth and grid (d_model, n_patches, layers and n_images are derived when absent).
    Missing `grid`/`depth` default to a square grid and the highest layer + 1.
    """
    path = Path(path)
    layers = sorted(int(layer) for layer in patches)
    if sorted(int(layer) for layer in cls) != layers:
        raise TraitsaeError(f"create_store: patches layers {layers} and cls layers differ.")
    first = np.asarray(patches[layers[0]])
    n_images, n_patches, d_model = first.shape
    side = int(round(np.sqrt(n_patches)))
    root = {
        "d_model": d_model,
        "n_patches": n_patches,
        "n_prefix_tokens": 1,
        "layers": layers,
        "n_images": n_images,
        "grid": [side, n_patches // max(side, 1)],
        "depth": max(layers) + 1,
        "image_size": 0,
        "config": "",
        **dict(attrs),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        chunk = rows_per_chunk((n_patches, d_model), n_rows=n_images)
        for layer in layers:
            acts_NPD = np.asarray(patches[layer], dtype=np.float16)
            cls_ND = np.asarray(cls[layer], dtype=np.float16)
            if acts_NPD.shape != (n_images, n_patches, d_model) or cls_ND.shape != (
                n_images,
                d_model,
            ):
                raise TraitsaeError(
                    f"create_store: layer {layer} has patches {acts_NPD.shape} and cls "
                    f"{cls_ND.shape}; expected [{n_images}, {n_patches}, {d_model}] and "
                    f"[{n_images}, {d_model}]."
                )
            f.create_dataset(f"patches/{layer}", data=acts_NPD, chunks=(chunk, n_patches, d_model))
            f.create_dataset(f"cls/{layer}", data=cls_ND)
        columns = _write_images(f.create_group("images"), images, n_images)
        root.setdefault("metadata_columns", columns)
        for key, value in _root_attrs(root).items():
            if key != "complete":
                _set_attr(f, key, value)
        f.attrs["complete"] = bool(attrs.get("complete", True))
    return path


class StoreWriter:
    """Incremental, resumable writer for extraction.

    `StoreWriter.open(...)` creates `<path>.tmp` (or reopens it when its fingerprint matches),
    `write(start, acts, valid)` stores a batch of rows, `finish()` adds the error reasons, sets
    `complete` and renames the file to `path`. Rows are committed by setting `images/done` after
    their activations are flushed, so a killed run resumes at the first row not done.
    """

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
        # The per-row data goes to its preallocated bytes with plain pwrite: no HDF5 chunk
        # cache, no per-batch metadata work, and the GIL is released while the bytes are copied.
        # HDF5 keeps `error` and `done`, and never touches the rows written this way.
        raw = [*self._patches.values(), *self._cls.values(), self._valid]
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
        n_patches: int,
        d_model: int,
        fingerprint: str,
        overwrite: bool = False,
    ) -> StoreWriter:
        """Create or resume the temporary store next to `path` (see class docstring)."""
        path = Path(path)
        tmp = tmp_path(path)
        _ensure_writable(path)
        if tmp.exists():
            existing = _read_fingerprint(tmp)
            if existing != fingerprint and not overwrite:
                raise TraitsaeError(
                    f"an unfinished store {tmp} exists from a run with a different configuration "
                    "(different backbone, layers, dataset or image rows). Re-run the original "
                    "command to finish it, or pass extract.overwrite=true to start again."
                )
            if existing == fingerprint:
                try:
                    return cls._reopen(path, tmp)
                except OSError:
                    pass  # unreadable leftover of a hard crash: start again below
            tmp.unlink()
        cls._create(tmp, attrs, images, n_patches, d_model, fingerprint)
        return cls._reopen(path, tmp)

    @staticmethod
    def _create(
        tmp: Path,
        attrs: Mapping[str, Any],
        images: Mapping[str, Any],
        n_patches: int,
        d_model: int,
        fingerprint: str,
    ) -> None:
        n_images = int(attrs["n_images"])
        layers = [int(layer) for layer in attrs["layers"]]
        with h5py.File(tmp, "w") as f:
            chunk = rows_per_chunk((n_patches, d_model), n_rows=n_images)
            for layer in layers:
                f.create_dataset(
                    f"patches/{layer}",
                    shape=(n_images, n_patches, d_model),
                    dtype=np.float16,
                    chunks=(chunk, n_patches, d_model),
                    dcpl=_preallocated(),
                )
                f.create_dataset(
                    f"cls/{layer}",
                    shape=(n_images, d_model),
                    dtype=np.float16,
                    chunks=(min(n_images, 4096), d_model),
                    dcpl=_preallocated(),
                )
            group = f.create_group("images")
            columns = _write_images(group, images, n_images)
            group.create_dataset("done", data=np.zeros(n_images, dtype=bool))
            group.create_dataset("error", shape=(n_images,), dtype=ERROR_DTYPE, fillvalue=b"")
            root = {**attrs, "metadata_columns": columns, "fingerprint": fingerprint}
            for key, value in _root_attrs(root).items():
                _set_attr(f, key, value)
            f.attrs["complete"] = False

    @classmethod
    def _reopen(cls, path: Path, tmp: Path) -> StoreWriter:
        return cls(path, h5py.File(tmp, "r+", locking=False))

    @classmethod
    def resume(cls, path: str | Path) -> StoreWriter:
        """Reopen the unfinished store of `path` created by `open` (after a `close`)."""
        return cls._reopen(Path(path), tmp_path(path))

    def first_pending(self) -> int:
        """Index of the first image whose rows are not yet committed."""
        done_N = self._done[()]
        pending = np.flatnonzero(~done_N)
        return int(pending[0]) if pending.size else self.n_images

    def write(
        self,
        start: int,
        patches: Mapping[int, np.ndarray],
        cls: Mapping[int, np.ndarray],
        valid: np.ndarray,
        errors: Mapping[int, str] | None = None,
    ) -> None:
        """Store rows [start, start + B): patches[L] [B, P, D], cls[L] [B, D] float16.

        `errors` maps absolute row index -> why that row is invalid (kept in images/error).
        """
        stop = start + len(valid)
        for layer in self.layers:
            self._write_rows(self._patches[layer], start, patches[layer])
            self._write_rows(self._cls[layer], start, cls[layer])
        self._write_rows(self._valid, start, valid)
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
        reasons = self._error.asstr()[()]
        return {int(i): str(reasons[i]) for i in np.flatnonzero(reasons != "")}

    def finish(self) -> Path:
        """Mark the store complete (the last attribute written) and move it into place."""
        if self.first_pending() != self.n_images:
            raise RuntimeError(f"finish() called with rows still pending in {self.path}")
        self.close()
        tmp = tmp_path(self.path)
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


def _preallocated() -> h5py.h5p.PropDCID:
    """Dataset creation properties: allocate every chunk now, never write fill values."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _fit(reason: str) -> bytes:
    """utf-8 bytes of `reason`, cut to ERROR_BYTES on a character boundary."""
    return reason.encode("utf-8")[:ERROR_BYTES].decode("utf-8", "ignore").encode("utf-8")


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
    """Crash-test hook: `TRAITSAE_KILL_AFTER_ROWS=n` SIGKILLs this process once rows up to n are
    written but *before* they are marked done -- the worst moment for a crash (tests use it)."""
    limit = os.environ.get("TRAITSAE_KILL_AFTER_ROWS")
    if limit and rows_written >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def row_offsets(data: h5py.Dataset) -> np.ndarray | None:
    """Byte offset in the file of each row (index along axis 0) of `data`, or None unless its
    rows are raw bytes at fixed places: unfiltered, native byte order, contiguous or chunked in
    whole rows, every chunk allocated (what `StoreWriter` creates). The extraction writer and
    the training loader use it to move rows with plain file I/O, without HDF5 in between."""
    if not data.dtype.isnative or data.shape[0] == 0:
        return None
    if data.id.get_create_plist().get_nfilters():
        return None
    n_rows = data.shape[0]
    row_bytes = math.prod(data.shape[1:]) * data.dtype.itemsize
    if data.chunks is None:
        chunk_rows, starts = n_rows, {0: data.id.get_offset()}
    elif tuple(data.chunks[1:]) != tuple(data.shape[1:]) or not hasattr(data.id, "chunk_iter"):
        return None
    else:
        chunk_rows, starts = data.chunks[0], {}
        data.id.chunk_iter(lambda c: starts.__setitem__(c.chunk_offset[0], c.byte_offset))
    firsts = range(0, n_rows, chunk_rows)
    if any(starts.get(first) is None for first in firsts):
        return None  # a chunk not allocated yet: only HDF5 knows where it will go
    chunk_at_C = np.array([starts[first] for first in firsts], np.int64)
    rows = np.arange(n_rows)
    return chunk_at_C[rows // chunk_rows] + rows % chunk_rows * row_bytes


def _read_fingerprint(path: Path) -> str | None:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return str(f.attrs.get("fingerprint", ""))
    except OSError:
        return None


def read_fingerprint(path: str | Path) -> str | None:
    """The config fingerprint a store (or unfinished store) was written with; None if unreadable."""
    return _read_fingerprint(Path(path))


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
