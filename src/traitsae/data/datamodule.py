"""Stream activation vectors from an HDF5 store into SAE training.

I/O plan (see ENGINEERING.md): the store is cut into *blocks* of whole images aligned with its
HDF5 chunks. Each epoch the blocks are put in a seeded random order shared by every process and
dealt round-robin to the (DDP rank x DataLoader worker) streams, so every vector is read exactly
once per epoch by exactly one stream. A stream reads its blocks whole (sequential I/O), fills a
buffer, permutes it in memory into shared-memory output buffers that the training process
receives without a copy, and cuts them into batches there; vectors stay float16 until the step
casts them on its device. Validation holds out whole blocks, i.e. whole images, never patches of
training images. Memory per worker is bounded by the buffer (a read buffer plus a small ring of
output buffers), whatever the store's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
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
        """Shuffled buffers [n * batch_size, D] (the last of a finite stream may be ragged);
        `iter_batches` cuts them. One item per buffer keeps DataLoader IPC to a minimum."""
        import h5py

        stream, n_streams = self.stream_id()
        ring = _BufferRing(self.plan.d_model, shared=get_worker_info() is not None)
        # Opened here, inside the worker: an HDF5 handle must never cross a fork.
        with h5py.File(self.plan.path, "r", locking=False) as f:
            data = f[self.plan.key]
            per_image = data.shape[1] if data.ndim == 3 else 1
            largest = max((b - a for a, b in self.plan.blocks), default=0) * per_image
            # One read buffer per stream, reused: memory stays bounded whatever the store's size.
            buf_ND = np.empty((self.buffer_vectors + largest, self.plan.d_model), np.float16)
            n_rows, epoch = 0, self.start_epoch
            rng = _stream_rng(self.seed, epoch, stream, 1)
            while self.epochs is None or epoch < self.start_epoch + self.epochs:
                rng = _stream_rng(self.seed, epoch, stream, 1)
                for start, stop in self.blocks_for(epoch, stream, n_streams):
                    n_rows += self._read_block(data, start, stop, buf_ND[n_rows:])
                    if n_rows >= self.buffer_vectors:
                        out_ND, n_rows = self._shuffle(buf_ND, n_rows, rng, ring)
                        yield out_ND
                # Epoch end: emit what is buffered; only a ragged < batch_size rest carries over.
                if n_rows >= self.batch_size:
                    out_ND, n_rows = self._shuffle(buf_ND, n_rows, rng, ring)
                    yield out_ND
                epoch += 1
            if n_rows:
                yield self._shuffle(buf_ND, n_rows, rng, ring, final=True)[0]

    def _read_block(self, data: Any, start: int, stop: int, dest_ND: np.ndarray) -> int:
        """Read images [start, stop) straight into `dest` (whole chunks, no temporary);
        drop invalid images; returns the number of vectors written."""
        n_vectors = (stop - start) * (data.shape[1] if data.ndim == 3 else 1)
        target = dest_ND[:n_vectors].reshape((stop - start, *data.shape[1:]))
        data.read_direct(target, source_sel=np.s_[start:stop])
        if self.plan.valid is None or self.plan.valid[start:stop].all():
            return n_vectors
        kept = target[self.plan.valid[start:stop]].reshape(-1, self.plan.d_model)
        dest_ND[: len(kept)] = kept
        return len(kept)

    def _shuffle(
        self,
        buf_ND: np.ndarray,
        n_rows: int,
        rng: np.random.Generator,
        ring: _BufferRing,
        final: bool = False,
    ) -> tuple[torch.Tensor, int]:
        """The buffer's first `n_rows`, permuted, as whole batches -> (out, leftover count);
        the rows that do not fill a batch move to the buffer's front for the next round."""
        order = rng.permutation(n_rows) if self.shuffle else np.arange(n_rows)
        n_out = n_rows if final else n_rows // self.batch_size * self.batch_size
        out_ND = ring.next(n_out)
        # One gather pass; np.take with out= and mode="clip" does not buffer.
        np.take(buf_ND[:n_rows], order[:n_out], axis=0, out=out_ND.numpy(), mode="clip")
        rest = n_rows - n_out
        buf_ND[:rest] = buf_ND[order[n_out:n_rows]]
        return out_ND, rest


# Output buffers a stream cycles through. A buffer is rewritten only after RING_SIZE - 1 newer
# ones were produced; the DataLoader keeps at most PREFETCH buffers per worker queued and the
# trainer holds one (plus one prefetched batch), so a batch is never rewritten while in use.
PREFETCH = 2
RING_SIZE = PREFETCH + 3


class _BufferRing:
    """Reused float16 output buffers. In a DataLoader worker they live in shared memory, so
    buffers reach the training process as handles (no copy) and, being reused, cost no fresh
    page faults (first-touch of new memory costs more than the shuffle itself)."""

    def __init__(self, d_model: int, shared: bool) -> None:
        self.d_model = d_model
        self.shared = shared
        self.buffers: list[torch.Tensor] = []

    def next(self, n_rows: int) -> torch.Tensor:
        if len(self.buffers) == RING_SIZE and self.buffers[0].shape[0] == n_rows:
            self.buffers.append(self.buffers.pop(0))
            return self.buffers[-1]
        self.buffers.append(self._allocate(n_rows))
        if len(self.buffers) > RING_SIZE:
            self.buffers.pop(0)
        return self.buffers[-1]

    def _allocate(self, n_rows: int) -> torch.Tensor:
        if not self.shared:
            return torch.empty((n_rows, self.d_model), dtype=torch.float16)
        storage = torch.UntypedStorage._new_shared(n_rows * self.d_model * 2)
        return torch.empty(0, dtype=torch.float16).set_(storage, 0, (n_rows, self.d_model))


def iter_batches(buffers: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Cut shuffled buffers into batches (views, no copy)."""
    for buf_ND in buffers:
        for start in range(0, len(buf_ND), batch_size):
            yield buf_ND[start : start + batch_size]


class BatchLoader:
    """What Lightning iterates: a DataLoader over shuffled buffers, cut into batches."""

    def __init__(self, loader: DataLoader, batch_size: int) -> None:
        self.loader = loader
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter_batches(self.loader, self.batch_size)


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
        buffer_vectors: int = 32768,
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
        return next(iter(stream))[: self.scale_sample].numpy().copy()

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

    def train_dataloader(self) -> BatchLoader:
        return self._loader(self.train_dataset())

    def val_dataloader(self) -> BatchLoader:
        stream = ActivationStream(
            self.val_plan, self.val_batch_size, self.val_batch_size, self.seed, False, epochs=1
        )
        stream.rank, stream.world_size = self._rank_world()
        return self._loader(stream)

    def _loader(self, stream: ActivationStream) -> BatchLoader:
        # batch_size=None: the stream yields whole shuffled buffers (no per-vector collation).
        workers = self.num_workers
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=PREFETCH if workers else None,
        )
        return BatchLoader(loader, stream.batch_size)

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
