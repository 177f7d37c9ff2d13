"""The store's schema, written once (`SCHEMA`): the reader checks it, the writer writes it.

One HDF5 file per backbone x dataset x split, at
`${paths.activations_dir}/${dataset.name}/${split}/${backbone.name}.h5`. Extraction writes it as
`<store>.tmp` and renames it once every row is written; `complete` is set last, so a store
under its final name is whole.

Text datasets and attrs are utf-8. A file name that is not valid utf-8 keeps its bytes as they
are (Python's `surrogateescape`): the reader gives back the very str that `open()` needs.

A store written by another tool needs the required keys, with the shapes the attrs promise
(`Store(path)` names the first dataset that is missing or of the wrong shape). Without `index`,
`label`, `valid`, `error` or `done` every row is usable, indexed in order and unlabelled.
Read a store with `traitsae.data.store.Store(path)`: `store.valid` are the *usable* rows (valid
and done), the only rows any reader uses, so an unfinished `.tmp` store read directly exposes
only the images already written. Write one from arrays with `traitsae.data.store.create_store`
(the writer extraction uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

# Aim for chunks of ~2 MiB: whole-chunk reads are what the training loader does.
TARGET_CHUNK_BYTES = 2 * 1024 * 1024
# Fixed-length, so recording a reason rewrites bytes in place (no HDF5 heap/metadata change).
ERROR_BYTES = 256


@dataclass(frozen=True)
class Key:
    """One key of a store: a root attr (`kind="attr"`) or a dataset (its path in the file)."""

    name: str  # `<L>` stands for a layer, `<column>` for a metadata column
    kind: str  # "attr" or "dataset"
    type: str  # dtype and shape: N images, P patches, D = d_model
    required: bool  # a store without it is refused
    meaning: str


SCHEMA: tuple[Key, ...] = (
    Key("backbone", "attr", "str", True, "the backbone's config name (`dictionary` for a generated store)"),
    Key("dataset", "attr", "str", True, "the dataset's config name"),
    Key("split", "attr", "str", True, "the split (`train`, `test`, ...)"),
    Key("d_model", "attr", "int", True, "D, the width of every stored vector"),
    Key("n_patches", "attr", "int", True, "P, patch tokens per image (prefix tokens excluded)"),
    Key("grid", "attr", "int [2]", True, "the patch grid [rows, cols]; rows x cols = P, row-major"),
    Key("layers", "attr", "int [L]", True, "the stored layers: absolute block indices (a block's output)"),
    Key("depth", "attr", "int", True, "the backbone's block count, so negative layers resolve"),
    Key("n_images", "attr", "int", False, "N, the rows (default: the rows of `patches/<L>`)"),
    Key("n_prefix_tokens", "attr", "int", False, "CLS and register tokens before the patches (not in `patches/`)"),
    Key("image_size", "attr", "int", False, "the backbone's input side in pixels (0: no images)"),
    Key("config", "attr", "str", False, "resolved YAML of the config that defines the content"),
    Key("fingerprint", "attr", "str", False, "JSON identity of the content, which resuming and re-running compare"),
    Key("traitsae_version", "attr", "str", False, "the traitsae version that wrote the store"),
    Key("image_root", "attr", "str", False, "the dataset root the images were read from"),
    Key("metadata_columns", "attr", "str [C]", False, "names of the `images/<column>` datasets"),
    Key("complete", "attr", "bool", False, "set last, when every row is written (absent: False)"),
    Key("foreground", "attr", "str", False, "JSON of the rule that wrote `images/foreground` (docs/guide/extract.md); absent: no flags"),
    Key("patches/<L>", "dataset", "float16 [N, P, D]", True, f"patch tokens after block L, chunked along N (about {TARGET_CHUNK_BYTES >> 20} MiB a chunk)"),
    Key("cls/<L>", "dataset", "float16 [N, D]", True, "the CLS token after block L"),
    Key("images/index", "dataset", "int64 [N]", False, "position in the split's image list (default: 0 .. N-1)"),
    Key("images/path", "dataset", "str [N]", True, "the image file (absolute)"),
    Key("images/label", "dataset", "int64 [N]", False, "class id (-1: none; the default)"),
    Key("images/valid", "dataset", "bool [N]", False, "False: unreadable image or non-finite activations, its rows are zeros (default: True)"),
    Key("images/error", "dataset", "str [N]", False, f"why the image is invalid (empty when valid; at most {ERROR_BYTES} bytes)"),
    Key("images/done", "dataset", "bool [N]", False, "the row is written: extraction progress (default: True)"),
    Key("images/foreground", "dataset", "bool [N, P]", False, "True: the patch shows the specimen (foreground), patches in the order of `patches/<L>`; invalid rows all False"),
    Key("images/<column>", "dataset", "str [N]", False, "one per metadata column: `image_id`, `species` (CUB, synthetic); `species`, `subspecies` and the other CSV columns (butterflies)"),
)  # fmt: skip
REQUIRED_ATTRS = tuple(key.name for key in SCHEMA if key.kind == "attr" and key.required)
# Bookkeeping datasets under images/ that are not user metadata columns.
CORE_IMAGE_KEYS = tuple(
    key.name.removeprefix("images/")
    for key in SCHEMA
    if key.name.startswith("images/") and "<" not in key.name
)
STR_DTYPE = h5py.string_dtype("utf-8")
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


def key_table(keys: tuple[Key, ...]) -> str:
    """`keys` as a markdown table (key, kind, type, required, meaning)."""
    rows = ["| key | kind | type | required | meaning |", "|---|---|---|---|---|"]
    for key in keys:
        required = "yes" if key.required else ""
        rows.append(f"| `{key.name}` | {key.kind} | {key.type} | {required} | {key.meaning} |")
    return "\n".join(rows)
