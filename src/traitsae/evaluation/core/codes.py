"""The sparse-codes file: its writer (streamed, renamed when complete) and its reader.

Sparse-code file (`codes.h5`, CSR over patch rows, one row per patch of each valid image):
- `codes/indptr` int64 [R + 1], `codes/indices` int32 [nnz], `codes/values` float [nnz]
- `rows/image` int64 [R] (row of the image in the store), `rows/patch` int32 [R],
  `rows/row`, `rows/col` int16 [R] (patch coordinates on the grid)
- `images/first_row` int64 [N] (first CSR row of each store image, -1 for invalid images) and a
  copy of every `images/<col>` metadata dataset of the store
- attrs: d_sae, n_patches, grid, layer, backbone, dataset, split, store, sae, complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from scipy.sparse import csr_matrix
from tqdm.auto import tqdm

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.tokens import stream_codes
from traitsae.sae.export import RawSpaceSAE

# ----------------------------------------------------------------------------- eval=encode


def check_output(out: Path, inputs: list[Path | None], overwrite: bool) -> None:
    """Refuse to write over an input of this run, or over any existing file unless asked."""
    if out.is_dir():
        raise TraitsaeError(f"eval.output={out} is a directory; name the file to write.")
    if any(p is not None and out.resolve() == Path(p).resolve() for p in inputs):
        raise TraitsaeError(
            f"eval.output={out} is an input of this evaluation (the activation store or the SAE "
            "it reads); writing there would destroy it. Choose another eval.output."
        )
    if out.exists() and not overwrite:
        raise TraitsaeError(
            f"eval.output={out} already exists. Pass eval.overwrite=true to replace it, or "
            "choose another eval.output."
        )


def write_sparse_codes(
    store: Store,
    sae: RawSpaceSAE,
    out: Path,
    *,
    sae_source: str = "",
    batch_patches: int = 4096,
    dtype: str = "float16",
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Stream the store through the SAE and append CSR rows to `out`, through a temporary file
    of its own next to `out` that is renamed when complete (a missing folder is created)."""
    if dtype not in ("float16", "float32"):
        raise TraitsaeError(f"eval.dtype must be float16 or float32, got {dtype!r}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as err:
        raise TraitsaeError(
            f"eval.output={out}: cannot create a file in {out.parent} ({err.strerror or err}); "
            "choose an eval.output in a writable folder."
        ) from None
    os.close(fd)
    tmp = Path(name)
    try:
        _write_codes(store, sae, tmp, sae_source, batch_patches, dtype, device, progress)
        tmp.replace(out)
    except OSError as err:  # a full disk or a file-size limit: nothing half-written is kept
        raise TraitsaeError(
            f"writing the codes to {out} failed ({err.strerror or err}); is the disk of "
            f"{out.parent} full? Free space or choose another eval.output; nothing was written."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_codes(
    store: Store,
    sae: RawSpaceSAE,
    tmp: Path,
    sae_source: str,
    batch_patches: int,
    dtype: str,
    device: str,
    progress: bool,
) -> None:
    meta = store.metadata
    valid_N = np.asarray(meta["valid"], dtype=bool)
    grid_rows, grid_cols = (int(g) for g in store.grid)
    n_patches = store.n_patches
    # Before HDF5 holds anything: a header it cannot flush crashes the interpreter on close.
    check_room(tmp, sum(np.asarray(v).nbytes for v in meta.values()) + 8 * valid_N.size)
    with h5py.File(tmp, "w") as f:
        _write_header(f, store, sae, meta, valid_N, sae_source)
        writer = _CsrWriter(f, dtype)
        patch_P = np.arange(n_patches, dtype=np.int32)
        bar = tqdm(total=int(valid_N.sum()), unit="img", desc="sparse codes", disable=not progress)
        for batch in stream_codes(store, sae, batch_patches=batch_patches, device=device):
            n_images = len(batch.image_index)
            bar.update(n_images)
            check_room(tmp, batch_bytes(batch.codes_BPS, dtype))
            writer.append(batch.codes_BPS.reshape(n_images * n_patches, -1))
            f["rows/image"].resize((writer.n_rows,))
            f["rows/image"][-n_images * n_patches :] = np.repeat(batch.image_index, n_patches)
            for name, values in (
                ("patch", patch_P),
                ("row", patch_P // grid_cols),
                ("col", patch_P % grid_cols),
            ):
                ds = f[f"rows/{name}"]
                ds.resize((writer.n_rows,))
                ds[-n_images * n_patches :] = np.tile(values, n_images)
        bar.close()
        f.attrs["grid"] = [grid_rows, grid_cols]
        f.attrs["complete"] = True


# HDF5 writes whole chunks (the CSR indices' are 1 MiB): keep this much beyond a batch's bytes.
ROOM_MARGIN = 8 << 20


def batch_bytes(codes_BPS: torch.Tensor, dtype: str) -> int:
    """What one batch adds to the codes file: CSR values and indices, and the row tables."""
    nnz = int((codes_BPS != 0).sum())
    return nnz * (4 + np.dtype(dtype).itemsize) + codes_BPS.shape[0] * codes_BPS.shape[1] * 24


def check_room(tmp: Path, n_bytes: int) -> None:
    """Refuse to write `n_bytes` (plus HDF5's chunk margin) that the disk or the process's
    file-size limit cannot hold, before HDF5 tries: its failed writes can crash the process."""
    import resource
    import shutil

    room = shutil.disk_usage(tmp.parent).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        room = min(room, soft - tmp.stat().st_size)
    if n_bytes + ROOM_MARGIN > room:
        raise OSError(28, f"{n_bytes + ROOM_MARGIN} bytes needed, {max(room, 0)} available")


def _write_header(
    f: h5py.File, store: Store, sae: RawSpaceSAE, meta: dict, valid_N: np.ndarray, sae_source: str
) -> None:
    first_row_N = np.where(valid_N, (np.cumsum(valid_N) - 1) * store.n_patches, -1)
    f.create_dataset("images/first_row", data=first_row_N.astype(np.int64))
    for col, values in meta.items():
        values = np.asarray(values)
        if values.dtype.kind in "UO":
            f.create_dataset(
                f"images/{col}", data=values.astype(object), dtype=h5py.string_dtype("utf-8")
            )
        else:
            f.create_dataset(f"images/{col}", data=values)
    for name, dtype in (
        ("image", np.int64),
        ("patch", np.int32),
        ("row", np.int16),
        ("col", np.int16),
    ):
        f.create_dataset(
            f"rows/{name}", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 16,)
        )
    f.attrs.update(
        {
            "d_sae": int(sae.d_sae),
            "n_patches": int(store.n_patches),
            "layer": sae.layer,
            "backbone": str(store.backbone),
            "dataset": str(store.dataset),
            "split": str(store.split),
            "store": str(store.path),
            "sae": sae_source,
            "complete": False,
        }
    )


class _CsrWriter:
    """Appends dense code rows to resizable CSR datasets without holding earlier rows."""

    def __init__(self, f: h5py.File, dtype: str) -> None:
        self.indptr = f.create_dataset(
            "codes/indptr", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(1 << 16,)
        )
        self.indices = f.create_dataset(
            "codes/indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,)
        )
        self.values = f.create_dataset(
            "codes/values", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 18,)
        )
        self.n_rows = 0
        self.nnz = 0

    def append(self, codes_RS: torch.Tensor) -> None:
        rows_R, cols_R = torch.nonzero(codes_RS > 0, as_tuple=True)
        counts_R = torch.bincount(rows_R, minlength=codes_RS.shape[0]).cpu().numpy()
        new_nnz = self.nnz + len(cols_R)
        self.indices.resize((new_nnz,))
        self.values.resize((new_nnz,))
        self.indices[self.nnz :] = cols_R.cpu().numpy().astype(np.int32)
        self.values[self.nnz :] = codes_RS[rows_R, cols_R].cpu().numpy()
        self.indptr.resize((self.n_rows + len(counts_R) + 1,))
        self.indptr[self.n_rows + 1 :] = self.nnz + np.cumsum(counts_R)
        self.n_rows += len(counts_R)
        self.nnz = new_nnz


class SparseCodes:
    """Read side of `codes.h5`: query codes without re-running the SAE.

    >>> codes = SparseCodes("codes.h5")
    >>> codes.latent_map(image=3, latent=17)     # [rows, cols] heat-map
    >>> codes.csr()                              # scipy.sparse.csr_matrix [R, d_sae]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise TraitsaeError(
                f"sparse-code file {self.path} does not exist; write it with "
                "python evaluate.py eval=encode run=<run dir>."
            )
        self.file = h5py.File(self.path, "r")
        if "codes/indptr" not in self.file or not self.file.attrs.get("complete", False):
            raise TraitsaeError(
                f"{self.path} is not a complete traitsae sparse-code file "
                "(missing codes/indptr or complete=False); re-run eval=encode."
            )
        self.d_sae = int(self.file.attrs["d_sae"])
        self.n_patches = int(self.file.attrs["n_patches"])
        self.grid = tuple(int(g) for g in self.file.attrs["grid"])
        self.indptr = self.file["codes/indptr"][:]
        self.first_row = self.file["images/first_row"][:]

    def metadata(self, column: str) -> np.ndarray:
        values = self.file[f"images/{column}"]
        return values.asstr()[:] if values.dtype.kind == "O" else values[:]

    def image_codes(self, image: int) -> np.ndarray:
        """Dense codes [P, d_sae] of one store image."""
        first = int(self.first_row[image])
        if first < 0:
            raise TraitsaeError(f"image {image} is marked invalid in the store: it has no codes.")
        lo, hi = self.indptr[first], self.indptr[first + self.n_patches]
        dense_PS = np.zeros((self.n_patches, self.d_sae), dtype=np.float32)
        rows = np.repeat(
            np.arange(self.n_patches), np.diff(self.indptr[first : first + self.n_patches + 1])
        )
        dense_PS[rows, self.file["codes/indices"][lo:hi]] = self.file["codes/values"][lo:hi]
        return dense_PS

    def latent_map(self, image: int, latent: int) -> np.ndarray:
        return self.image_codes(image)[:, latent].reshape(self.grid)

    def csr(self) -> Any:
        return csr_matrix(
            (
                self.file["codes/values"][:].astype(np.float32),
                self.file["codes/indices"][:],
                self.indptr,
            ),
            shape=(len(self.indptr) - 1, self.d_sae),
        )

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SparseCodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
