"""The store's schema and on-disk layout, shared by the reader and the writer.

  root attrs   backbone, dataset, split, d_model, n_patches, n_prefix_tokens, grid [rows, cols],
               layers (absolute block indices), depth, image_size, n_images, config (resolved
               YAML), fingerprint (what resuming compares), traitsae_version, image_root,
               metadata_columns, complete (set last)
  patches/<L>  float16 [N, P, D], chunked along N (about 2 MiB per chunk)
  cls/<L>      float16 [N, D]
  images/      index int64, path (absolute), label int64 (-1 = none), valid bool (False =
               unreadable image or non-finite activations: its rows are zeros), error (why it is
               invalid), done bool (the row is written: extraction progress), one string dataset
               per metadata column

Text datasets are utf-8. A file name that is not valid utf-8 keeps its bytes as they are
(Python's `surrogateescape`): the reader gives back the very str that `open()` needs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

STR_DTYPE = h5py.string_dtype("utf-8")
# Bookkeeping datasets under images/ that are not user metadata columns.
CORE_IMAGE_KEYS = ("index", "path", "label", "valid", "error", "done")
REQUIRED_ATTRS = ("backbone", "dataset", "split", "d_model", "n_patches", "grid", "layers", "depth")
# Aim for chunks of ~2 MiB: whole-chunk reads are what the training loader does.
TARGET_CHUNK_BYTES = 2 * 1024 * 1024
# Fixed-length, so recording a reason rewrites bytes in place (no HDF5 heap/metadata change).
ERROR_BYTES = 256
ERROR_DTYPE = h5py.string_dtype("utf-8", ERROR_BYTES)


def tmp_path(path: str | Path) -> Path:
    """Where an unfinished store lives until it is complete."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def rows_per_chunk(row_shape: tuple[int, ...], itemsize: int = 2, n_rows: int | None = None) -> int:
    """Rows of one chunk along N so that a chunk holds about TARGET_CHUNK_BYTES."""
    row_bytes = int(np.prod(row_shape)) * itemsize
    rows = max(1, TARGET_CHUNK_BYTES // max(row_bytes, 1))
    return int(min(rows, n_rows)) if n_rows else int(rows)


def encode_text(value: Any) -> bytes:
    """A str as the bytes stored for it: utf-8, with undecodable file-name bytes kept as is."""
    if isinstance(value, bytes | np.bytes_):
        return bytes(value)
    return str(value).encode("utf-8", "surrogateescape")


def decode_text(value: Any) -> str:
    """Inverse of `encode_text` (also for attrs h5py already returns as str)."""
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def printable(text: str) -> str:
    """`text` safe for any log handler: undecodable file-name bytes shown as \\xNN."""
    return encode_text(text).decode("utf-8", "backslashreplace")


def read_text(data: h5py.Dataset) -> np.ndarray:
    """A string dataset as an object array of str (see `encode_text`)."""
    return data.asstr(errors="surrogateescape")[()].astype(object)


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
