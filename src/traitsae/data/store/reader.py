"""`Store(path)`: the read-only view every later stage uses; the schema is checked on open."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from traitsae.data.store.schema import REQUIRED_ATTRS, decode_text, read_text, tmp_path
from traitsae.errors import TraitsaeError


class Store:
    """Read-only view of one activation store. Use as a context manager or call `close()`.

    `valid` (and `metadata["valid"]`) are the *usable* rows: images that were readable, whose
    activations are finite, and that extraction has written (`images/done`). Readers use only
    those, whichever path names the store (an unfinished `.tmp` included). A store written by
    another tool may leave out `images/valid`, `done`, `error`, `index` and `label`: all rows
    are then usable, indexed in order and unlabelled.
    """

    def __init__(self, path: str | Path, require_complete: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TraitsaeError(missing_store_message([self.path]))
        try:
            self.file = h5py.File(self.path, "r", locking=False)
        except OSError as err:
            raise TraitsaeError(
                f"{self.path} is not a readable HDF5 file ({err}); re-extract it with extract.py "
                "(add extract.overwrite=true to replace it)."
            ) from err
        try:
            self._read_attrs()
            self._check_schema(require_complete)
        except BaseException:
            self.file.close()
            raise
        self._metadata: dict[str, np.ndarray] | None = None
        # bool [N, P]: the patches the image-level scores pool over (None: all of them); an
        # evaluation's choice, set by `traitsae.evaluation.core.foreground.select_patches`.
        self.patch_mask: np.ndarray | None = None

    def _read_attrs(self) -> None:
        attrs = self.file.attrs
        missing = [key for key in REQUIRED_ATTRS if key not in attrs]
        groups = [g for g in ("patches", "cls", "images") if g not in self.file]
        if missing or groups:
            raise TraitsaeError(
                f"{self.path} is not a traitsae activation store: it lacks root attrs {missing} "
                f"and groups {groups} (schema: docs/guide/store.md). Write stores with "
                "extract.py or traitsae.data.store.create_store."
            )
        self.backbone: str = decode_text(attrs["backbone"])
        self.dataset: str = decode_text(attrs["dataset"])
        self.split: str = decode_text(attrs["split"])
        self.d_model: int = int(attrs["d_model"])
        self.n_patches: int = int(attrs["n_patches"])
        self.n_prefix_tokens: int = int(attrs.get("n_prefix_tokens", 1))
        self.grid: tuple[int, int] = tuple(int(g) for g in attrs["grid"])  # (rows, cols)
        self.layers: list[int] = [int(layer) for layer in attrs["layers"]]
        self.depth: int = int(attrs["depth"])
        self.image_size: int = int(attrs.get("image_size", 0))
        self.complete: bool = bool(attrs.get("complete", False))
        self.config: str = decode_text(attrs.get("config", ""))
        # How `images/foreground` was made (JSON; "" when the store has no flags or another
        # tool wrote them without saying).
        self.foreground_rule: str = decode_text(attrs.get("foreground", ""))
        self.metadata_columns: list[str] = [
            decode_text(c) for c in attrs.get("metadata_columns", [])
        ]

    def _check_schema(self, require_complete: bool) -> None:
        """Every dataset the schema promises, with the shapes the attrs promise."""
        if not self.layers:
            raise TraitsaeError(f"store {self.path} holds no layers (root attr layers is empty).")
        # Without the attr, the rows of whichever of these datasets exists (and must agree).
        sources = [self.file.get(f"patches/{self.layers[0]}"), self.file.get("images/path")]
        rows = [d.shape[0] for d in sources if isinstance(d, h5py.Dataset) and d.ndim]
        self.n_images: int = int(self.file.attrs.get("n_images", rows[0] if rows else 0))
        n, p, d = self.n_images, self.n_patches, self.d_model
        expected = {f"patches/{layer}": (n, p, d) for layer in self.layers}
        expected.update({f"cls/{layer}": (n, d) for layer in self.layers})
        expected["images/path"] = (n,)
        for key in ("index", "label", "valid", "error", "done", *self.metadata_columns):
            if key in self.file["images"] or key in self.metadata_columns:
                expected[f"images/{key}"] = (n,)
        if "foreground" in self.file["images"]:
            expected["images/foreground"] = (n, p)
        for key, shape in expected.items():
            data = self.file.get(key)
            if not isinstance(data, h5py.Dataset) or data.shape != shape:
                found = "is missing" if data is None else f"has shape {getattr(data, 'shape', '?')}"
                raise TraitsaeError(
                    f"store {self.path}: dataset {key} {found}, but the root attrs (n_images={n}, "
                    f"n_patches={p}, d_model={d}, layers={self.layers}) promise shape {shape}. "
                    "The file does not follow the store schema (docs/guide/store.md); "
                    "re-extract it with extract.py."
                )
        if require_complete and not self.complete:
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
    def has_foreground(self) -> bool:
        """The store holds foreground flags (`images/foreground`)."""
        return "foreground" in self.file["images"]

    def foreground(self) -> np.ndarray | None:
        """bool [N, P]: True where a patch is foreground (patches in `patches/<L>` order); None
        when the store has no flags. Rows of unusable images are all False."""
        if not self.has_foreground:
            return None
        return np.asarray(self.file["images/foreground"][()], dtype=bool) & self.valid[:, None]

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """index, path, label, valid (usable rows), error, and every metadata column, read once."""
        if self._metadata is None:
            images, n = self.file["images"], self.n_images
            read = lambda key, default: images[key][()] if key in images else default  # noqa: E731
            usable_N = read("valid", np.ones(n, bool)) & read("done", np.ones(n, bool))
            meta: dict[str, np.ndarray] = {
                "index": read("index", np.arange(n, dtype=np.int64)),
                "label": read("label", np.full(n, -1, dtype=np.int64)),
                "valid": np.asarray(usable_N, dtype=bool),
                "error": np.full(n, "", dtype=object),
            }
            for key in ("path", "error", *self.metadata_columns):
                if key in images:
                    meta[key] = read_text(images[key])
            self._metadata = meta
        return self._metadata

    @property
    def valid(self) -> np.ndarray:
        """bool [N]: the usable rows (see the class docstring)."""
        return self.metadata["valid"]

    def restrict(self, keep_N: np.ndarray) -> None:
        """Use only the rows of `keep_N` (bool [N]) from now on, in this view (the file is not
        touched): e.g. the images with a foreground patch when scores pool over those."""
        self.metadata["valid"] = self.valid & np.asarray(keep_N, dtype=bool)

    def iter_blocks(
        self, layer: int, tokens: str = "patches", block: int = 256
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, float16 rows [b, P, D] or [b, D]) in order, `block` images at a time
        (every row, usable or not: see `iter_valid`)."""
        dataset = self.tokens(layer, tokens)
        for start in range(0, self.n_images, block):
            yield start, dataset[start : start + block]

    def iter_valid(
        self, layer: int, tokens: str = "patches", block: int = 256, keep: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (store rows [b], float16 rows [b, P, D] or [b, D]) of the usable images (and of
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


def read_fingerprint(path: str | Path) -> str | None:
    """The config fingerprint a store (or unfinished store) was written with; None if unreadable."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return decode_text(f.attrs.get("fingerprint", ""))
    except OSError:
        return None


def stored_rows(path: str | Path) -> tuple[int, int | None]:
    """(rows written, total rows) of a store or unfinished store; (0, None) if unreadable."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            done_N = f["images/done"][()] if "done" in f["images"] else None
            total = int(f.attrs["n_images"])
    except (OSError, KeyError):
        return 0, None
    if done_N is None:
        return total, total
    pending = np.flatnonzero(~done_N)
    return int(pending[0]) if pending.size else total, total


def missing_store_message(
    paths: Sequence[str | Path], commands: Sequence[str] | None = None, hint: str = ""
) -> str:
    """The whole error for stores that do not exist or are incomplete: each path, how far an
    incomplete one got, and the extract.py command that makes or finishes it (`commands[i]`
    for `paths[i]`); `hint` (another way out) ends the message."""
    states, incomplete = [], []
    for path in map(Path, paths):
        tmp = tmp_path(path)
        if tmp.is_file():
            done, total = stored_rows(tmp)
            got = f"the first {done} of {total} images" if total is not None else "no image yet"
            states.append(f"{path} is incomplete (extraction stopped; {tmp} holds {got})")
            incomplete.append(path)
        else:
            states.append(f"{path} does not exist")
    one = len(states) == 1
    verb = "finish" if len(incomplete) == len(states) else "make"
    message = f"activation store{'' if one else 's'} {'; '.join(states)}."
    if commands:
        lines = "\n".join(f"  {cmd}" for cmd in commands)
        message += f" {verb.capitalize()} {'it' if one else 'them'} with:\n{lines}"
    else:
        message += (
            f" Write {'it' if one else 'them'} with extract.py (rerunning the command that "
            "stopped finishes an incomplete store)."
        )
    return f"{message}\n{hint}" if hint else message
