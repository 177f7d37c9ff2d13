"""Stream activation vectors from an HDF5 store into SAE training.

I/O plan (see ENGINEERING.md): the store is cut into *blocks* of whole images aligned with its
HDF5 chunks. Each epoch the blocks are put in a seeded random order shared by every process and
dealt round-robin to the (DDP rank x DataLoader worker) streams, so every vector is read exactly
once per epoch by exactly one stream. A stream reads its blocks whole (sequential I/O), fills a
buffer, permutes it in memory and cuts batches; vectors stay float16 until the GPU/CPU step
casts them. Validation holds out whole blocks, i.e. whole images, never patches of training
images. Memory per worker is bounded by the buffer, whatever the store's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from traitsae.errors import TraitsaeError
from traitsae.paths import extract_command, store_path

# Aim for at least this many blocks per store so small stores still split across streams and
# leave whole images for validation.
MIN_BLOCKS = 32


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to read its share; picklable (no open file handles)."""

    path: str
    key: str  # HDF5 dataset, e.g. "patches/11"
    blocks: tuple[tuple[int, int], ...]  # [start, stop) image ranges
    valid: np.ndarray | None  # bool [N] per image, None = all valid
    d_model: int


def _stream_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


class ActivationStream(IterableDataset):
    """Batches of float16 vectors [batch_size, D] from whole blocks of a store.

    `epochs=None` streams forever (training runs on `max_steps`, so every rank always has a
    next batch and DDP never waits on a rank that ran dry); the partial buffer carries over
    epoch boundaries, so each epoch still yields every vector exactly once. With a finite
    `epochs` the last batch of a stream may be short.
    """

    def __init__(
        self,
        plan: StreamPlan,
        batch_size: int,
        buffer_vectors: int,
        seed: int,
        shuffle: bool = True,
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.batch_size = int(batch_size)
        self.buffer_vectors = max(int(buffer_vectors), self.batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epochs = epochs
        self.start_epoch = 0
        # Set in the main process (Lightning reseeds and forks later): DDP rank and world.
        self.rank = 0
        self.world_size = 1

    def stream_id(self) -> tuple[int, int]:
        """(this stream's id, number of streams) over DDP ranks x DataLoader workers."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * n_workers + worker, self.world_size * n_workers

    def blocks_for(self, epoch: int, stream: int, n_streams: int) -> list[tuple[int, int]]:
        """This stream's blocks in epoch `epoch`: the same seeded order on every process."""
        blocks = list(self.plan.blocks)
        if self.shuffle:
            order = _stream_rng(self.seed, epoch).permutation(len(blocks))
            blocks = [blocks[i] for i in order]
        return blocks[stream::n_streams]

    def __iter__(self) -> Iterator[torch.Tensor]:
        import h5py

        stream, n_streams = self.stream_id()
        # Opened here, inside the worker: an HDF5 handle must never cross a fork.
        with h5py.File(self.plan.path, "r", locking=False) as f:
            data = f[self.plan.key]
            leftover = np.empty((0, self.plan.d_model), dtype=np.float16)
            epoch = self.start_epoch
            while self.epochs is None or epoch < self.start_epoch + self.epochs:
                rng = _stream_rng(self.seed, epoch, stream, 1)
                for buffer in self._fills(data, self.blocks_for(epoch, stream, n_streams)):
                    leftover = yield from self._emit(np.concatenate([leftover, buffer]), rng)
                epoch += 1
            if len(leftover):
                yield torch.from_numpy(leftover)

    def _fills(self, data: Any, blocks: list[tuple[int, int]]) -> Iterator[np.ndarray]:
        """Whole blocks read in order, concatenated into buffers of ~buffer_vectors rows."""
        parts, size = [], 0
        for start, stop in blocks:
            rows = self._read_block(data, start, stop)
            parts.append(rows)
            size += len(rows)
            if size >= self.buffer_vectors:
                yield np.concatenate(parts)
                parts, size = [], 0
        if parts:
            yield np.concatenate(parts)

    def _read_block(self, data: Any, start: int, stop: int) -> np.ndarray:
        block = data[start:stop]  # whole chunk(s): sequential read
        if self.plan.valid is not None:
            keep = self.plan.valid[start:stop]
            if not keep.all():
                block = block[keep]
        return block.reshape(-1, self.plan.d_model)

    def _emit(self, buffer_ND: np.ndarray, rng: np.random.Generator) -> Iterator[torch.Tensor]:
        """Yield full batches of the (shuffled) buffer; return the rows that did not fill one."""
        if self.shuffle:
            # np.take is ~1.7x faster than fancy indexing for a row permutation.
            buffer_ND = np.take(buffer_ND, rng.permutation(len(buffer_ND)), axis=0)
        n_full = len(buffer_ND) // self.batch_size * self.batch_size
        for start in range(0, n_full, self.batch_size):
            yield torch.from_numpy(buffer_ND[start : start + self.batch_size])
        return buffer_ND[n_full:].copy()


def plan_blocks(
    n_images: int, chunk_images: int, min_blocks: int = MIN_BLOCKS
) -> list[tuple[int, int]]:
    """[start, stop) image ranges: HDF5 chunks, halved until there are at least `min_blocks`."""
    size = max(1, int(chunk_images))
    while size > 1 and math.ceil(n_images / size) < min_blocks:
        size = max(1, size // 2)
    return [(start, min(start + size, n_images)) for start in range(0, n_images, size)]


def split_blocks(
    blocks: list[tuple[int, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Hold out whole blocks (so whole images) for validation, chosen by a seeded draw."""
    if val_fraction <= 0 or len(blocks) < 2:
        return blocks, []
    n_val = min(len(blocks) - 1, max(1, round(val_fraction * len(blocks))))
    chosen = set(_stream_rng(seed, 7).choice(len(blocks), size=n_val, replace=False).tolist())
    train = [b for i, b in enumerate(blocks) if i not in chosen]
    val = [b for i, b in enumerate(blocks) if i in chosen]
    return train, val


class ActivationsDataModule(L.LightningDataModule):
    """Train/validation streams of one layer's patch (or CLS) vectors from one store.

    The store is `data.store` when given, else the DESIGN.md path of backbone x dataset x split.
    `batch_size` is per DDP rank. `scale` (set by `prepare()`) makes E||x * scale||^2 = d_model.
    """

    def __init__(
        self,
        activations_dir: str,
        backbone: str,
        dataset: str,
        split: str = "train",
        store: str | None = None,
        layer: int = -1,
        tokens: str = "patches",
        d_model: int | None = None,
        batch_size: int = 4096,
        num_workers: int = 2,
        buffer_vectors: int = 262144,
        val_fraction: float = 0.05,
        val_batch_size: int | None = None,
        scale_sample: int = 16384,
        seed: int = 0,
        allow_incomplete: bool = False,
        block_images: int | None = None,
    ) -> None:
        super().__init__()
        if tokens not in ("patches", "cls"):
            raise TraitsaeError(f"data.tokens must be 'patches' or 'cls', got {tokens!r}.")
        if int(batch_size) < 1:
            raise TraitsaeError(f"data.batch_size must be a positive integer, got {batch_size}.")
        self.activations_dir = activations_dir
        self.backbone, self.dataset, self.split = backbone, dataset, split
        self.store_override = store
        self.layer_requested = int(layer)
        self.tokens = tokens
        self.expected_d_model = d_model
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.buffer_vectors = int(buffer_vectors)
        self.val_fraction = float(val_fraction)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.scale_sample = int(scale_sample)
        self.seed = int(seed)
        self.allow_incomplete = bool(allow_incomplete)
        self.block_images = block_images
        self.prepared = False

    # ---- store discovery -----------------------------------------------------------------
    def resolve_store_path(self) -> tuple[Path, bool]:
        """(path to read, complete?) -- a missing store names the extract.py command."""
        if self.store_override:
            path = Path(self.store_override)
        else:
            path = store_path(self.activations_dir, self.dataset, self.split, self.backbone)
        if path.is_file():
            return path, True
        cmd = extract_command(self.backbone, self.dataset, self.split, self.activations_dir)
        unfinished = path.with_name(path.name + ".tmp")
        if unfinished.is_file():
            if self.allow_incomplete:
                return unfinished, False
            raise TraitsaeError(
                f"activation store {path} is incomplete (extraction stopped; partial file "
                f"{unfinished}). Finish it by re-running:\n  {cmd}\nor pass "
                "data.allow_incomplete=true to train on the images extracted so far."
            )
        hint = "" if self.store_override else f" Make it with:\n  {cmd}"
        raise TraitsaeError(f"activation store {path} does not exist.{hint}")

    def prepare(self) -> None:
        """Open the store once in this process: layer, blocks, validation split, scale."""
        if self.prepared:
            return
        from traitsae.data.store import Store

        path, complete = self.resolve_store_path()
        with Store(path, require_complete=complete and not self.allow_incomplete) as store:
            self._check_width(store)
            self.layer = store.resolve_layer(self.layer_requested)
            data = store.tokens(self.layer, self.tokens)
            valid_N = np.asarray(store.valid, dtype=bool).copy()
            if not complete and "done" in store.file["images"]:
                valid_N &= store.file["images/done"][()]
            chunk = data.chunks[0] if data.chunks else data.shape[0]
            self.store_info = {"backbone": store.backbone, "dataset": store.dataset}
            self.n_images = store.n_images
            self.d_model = store.d_model
            self.vectors_per_image = 1 if self.tokens == "cls" else store.n_patches
        self.store_path = path
        blocks = plan_blocks(self.n_images, self.block_images or chunk)
        if not complete:  # only the prefix of finished rows
            blocks = [b for b in blocks if valid_N[b[0] : b[1]].any()]
        train, val = split_blocks(blocks, self.val_fraction, self.seed)
        key = f"{self.tokens}/{self.layer}"
        valid = None if valid_N.all() else valid_N
        self.train_plan = StreamPlan(str(path), key, tuple(train), valid, self.d_model)
        self.val_plan = StreamPlan(str(path), key, tuple(val), valid, self.d_model)
        self.n_train_vectors = self._count(train, valid_N)
        self.n_val_vectors = self._count(val, valid_N)
        if self.n_train_vectors == 0:
            raise TraitsaeError(f"store {path} has no valid training vectors ({key}).")
        self.sample = self._sample_vectors()
        bad = int((~np.isfinite(self.sample)).sum())
        if bad:
            raise TraitsaeError(
                f"store {path} ({key}) holds non-finite activations: {bad} inf/NaN values in a "
                f"sample of {len(self.sample)} vectors (float16 overflows beyond 65504). "
                "Re-extract with a backbone/layer whose activations fit float16."
            )
        mean_sq = float(np.mean(np.sum(self.sample.astype(np.float64) ** 2, axis=1)))
        self.scale = math.sqrt(self.d_model / mean_sq) if mean_sq > 0 else 1.0
        self.prepared = True

    def _check_width(self, store: Any) -> None:
        if self.expected_d_model is not None and int(self.expected_d_model) != store.d_model:
            raise TraitsaeError(
                f"store {store.path} holds {store.backbone!r} activations of width "
                f"d_model={store.d_model}, but the SAE is configured for d_model="
                f"{self.expected_d_model} (backbone={self.backbone}). Train with the backbone "
                f"that wrote the store (backbone={store.backbone}) or point data.store at a "
                "store of this backbone."
            )

    def _count(self, blocks: list[tuple[int, int]], valid_N: np.ndarray) -> int:
        return int(sum(valid_N[a:b].sum() for a, b in blocks)) * self.vectors_per_image

    def _sample_vectors(self) -> np.ndarray:
        """Up to `scale_sample` training vectors from seeded random blocks (float16 [n, D])."""
        stream = ActivationStream(self.train_plan, self.scale_sample, self.scale_sample, self.seed)
        stream.epochs = 1
        batch = next(iter(stream))
        return batch.numpy()

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataset(self) -> ActivationStream:
        stream = ActivationStream(self.train_plan, self.batch_size, self.buffer_vectors, self.seed)
        stream.rank, stream.world_size = self._rank_world()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.global_step > 0:
            # Resumed run: continue with the data epoch the checkpoint was in (a fresh shuffle).
            seen = trainer.global_step * self.batch_size * stream.world_size
            stream.start_epoch = seen // self.n_train_vectors
        return stream

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader:
        stream = ActivationStream(
            self.val_plan, self.val_batch_size, self.val_batch_size, self.seed, False, epochs=1
        )
        stream.rank, stream.world_size = self._rank_world()
        return self._loader(stream)

    def _loader(self, stream: ActivationStream) -> DataLoader:
        # batch_size=None: the stream yields whole batches (no per-vector collation).
        workers = self.num_workers
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )

    def describe(self) -> dict[str, Any]:
        """What the SAE export records about its data."""
        return {
            "store": str(self.store_path),
            "layer": self.layer,
            "tokens": self.tokens,
            "d_model": self.d_model,
            "scale": self.scale,
            "n_train_vectors": self.n_train_vectors,
            "n_val_vectors": self.n_val_vectors,
            **self.store_info,
        }
