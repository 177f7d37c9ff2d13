"""The Lightning DataModule: one store's train/validation streams and the normaliser.

The store is opened once in the training process (`prepare`): layer, blocks, the validation
split (whole blocks, i.e. whole images) and the scale. The streams themselves
(`traitsae.data.stream`) open the file inside each loader worker. Every setting is a constructor
argument; conf/train.yaml (`data:`) holds their defaults.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from traitsae.cluster.signals import ignore_job_signals
from traitsae.config_checks import fraction, integer
from traitsae.data.rings import PREFETCH, BatchLoader
from traitsae.data.store import Store, missing_store_message, tmp_path
from traitsae.data.stream import (
    ActivationStream,
    plan_blocks,
    sample_vectors,
    split_blocks,
)
from traitsae.data.stream_plan import StreamPlan
from traitsae.errors import TraitsaeError
from traitsae.paths import extract_command, store_path

# foreground: the patch vectors the store flags as foreground (images/foreground) only.
TOKENS = ("patches", "cls", "foreground")
# A sample vector this many times longer than the sample's median is an outlier that would set
# the normaliser on its own (extraction marks float16 overflows invalid; other tools may not).
MAX_NORM_RATIO = 1000.0


class ActivationsDataModule(L.LightningDataModule):
    """Train/validation streams of one layer's patch (or CLS) vectors from one store.

    The store is `store` when given, else `<activations_dir>/<dataset>/<split>/<backbone>.h5`;
    d_model comes from the store. `batch_size` is per DDP rank. `scale` (set by `prepare()`)
    makes E||x * scale||^2 = d_model.
    """

    def __init__(
        self,
        *,
        activations_dir: str,
        backbone: str,
        dataset: str,
        split: str,
        store: str | None,
        layer: int,
        tokens: str,
        batch_size: int,
        num_workers: int,
        buffer_vectors: int,
        val_fraction: float,
        val_batch_size: int | None,
        scale_sample: int,
        seed: int,
        allow_incomplete: bool,
        block_images: int | None,
        expected_width: int | None = None,
    ) -> None:
        super().__init__()
        if tokens not in TOKENS:
            raise TraitsaeError(
                f"data.tokens must be one of {', '.join(TOKENS)}, got {tokens!r}: train on patch "
                "vectors (data.tokens=patches), on the foreground patches only "
                "(data.tokens=foreground) or on CLS tokens (data.tokens=cls)."
            )
        self.activations_dir = activations_dir
        self.backbone, self.dataset, self.split = backbone, dataset, split
        self.store_override = store
        self.layer_requested = integer("data.layer", layer)
        self.tokens = tokens
        self.batch_size = integer("data.batch_size", batch_size, minimum=1)
        self.num_workers = integer("data.num_workers", num_workers, minimum=0)
        self.buffer_vectors = integer("data.buffer_vectors", buffer_vectors, minimum=1)
        self.val_fraction = fraction("data.val_fraction", val_fraction)
        self.val_batch_size = (
            self.batch_size
            if val_batch_size is None
            else integer("data.val_batch_size", val_batch_size, minimum=1)
        )
        self.scale_sample = integer("data.scale_sample", scale_sample, minimum=1)
        self.seed = integer("seed", seed)
        self.allow_incomplete = bool(allow_incomplete)
        self.block_images = (
            None if block_images is None else integer("data.block_images", block_images, 1)
        )
        # The configured backbone's width: a store found at the default path must match it.
        self.expected_width = None if expected_width is None else int(expected_width)
        self.prepared = False

    # ---- store discovery -----------------------------------------------------------------
    def resolve_store_path(self) -> Path:
        """The file to read -- a missing store names the extract.py command."""
        if self.store_override:
            path = Path(self.store_override)
            if path.is_dir():
                raise TraitsaeError(
                    f"data.store={path} is a directory; pass the path of an activation store "
                    "(.h5 file written by extract.py)."
                )
        else:
            path = store_path(self.activations_dir, self.dataset, self.split, self.backbone)
        if path.is_file():
            return path
        cmd = extract_command(self.backbone, self.dataset, self.split, self.activations_dir)
        unfinished = tmp_path(path)
        if unfinished.is_file():
            if self.allow_incomplete:
                return unfinished
            hint = "or pass data.allow_incomplete=true to train on the images extracted so far."
            raise TraitsaeError(missing_store_message([path], [cmd], hint))
        raise TraitsaeError(missing_store_message([path], None if self.store_override else [cmd]))

    def prepare(self) -> None:
        """Open the store once in this process: layer, blocks, validation split, scale."""
        if self.prepared:
            return
        path = self.resolve_store_path()
        with Store(path, require_complete=not self.allow_incomplete) as store:
            if not self.store_override:
                self._check_store_backbone(store)
            self.layer = store.resolve_layer(self.layer_requested)
            data = store.tokens(self.layer, "cls" if self.tokens == "cls" else "patches")
            valid_N = np.asarray(store.valid, dtype=bool).copy()  # usable: valid and written
            keep_NP = foreground_flags(store) if self.tokens == "foreground" else None
            complete = store.complete
            chunk = data.chunks[0] if data.chunks else data.shape[0]
            self.store_info = {"backbone": store.backbone, "dataset": store.dataset}
            self.n_images = store.n_images
            self.d_model = store.d_model
            self.vectors_per_image = 1 if self.tokens == "cls" else store.n_patches
        self.store_path = path
        blocks = plan_blocks(self.n_images, self.block_images or chunk)
        used_N = valid_N if keep_NP is None else keep_NP.any(axis=1)
        if not complete or keep_NP is not None:  # no block without a vector to read
            blocks = [b for b in blocks if used_N[b[0] : b[1]].any()]
        train, val = split_blocks(blocks, self.val_fraction, self.seed)
        key = f"{'cls' if self.tokens == 'cls' else 'patches'}/{self.layer}"
        valid = None if valid_N.all() else valid_N
        plan = lambda blocks: StreamPlan(  # noqa: E731
            str(path), key, tuple(blocks), valid, self.d_model, self.vectors_per_image, keep_NP
        )
        self.train_plan, self.val_plan = plan(train), plan(val)
        self.n_train_vectors = int(self.train_plan.block_rows().sum())
        self.n_val_vectors = int(self.val_plan.block_rows().sum())
        if self.n_train_vectors == 0:
            what = "foreground patches (images/foreground)" if keep_NP is not None else key
            raise TraitsaeError(f"store {path} has no valid training vectors ({what}).")
        self.sample = sample_vectors(self.train_plan, self.scale_sample, self.seed)
        check_vectors(self.sample, f"store {path} ({key}), normaliser sample")
        self.median_norm = float(np.median(np.linalg.norm(self.sample.astype(np.float32), axis=1)))
        mean_sq = float(np.mean(np.sum(self.sample.astype(np.float64) ** 2, axis=1)))
        self.scale = math.sqrt(self.d_model / mean_sq) if mean_sq > 0 else 1.0
        self.prepared = True

    def _check_store_backbone(self, store: Store) -> None:
        """A store at the default path of backbone=<name> holds that backbone's activations
        (a store copied or written there by another backbone would train silently wrong)."""
        problems = []
        if store.backbone != self.backbone:
            problems.append(f"was written by backbone {store.backbone!r}, not {self.backbone!r}")
        if self.expected_width is not None and store.d_model != self.expected_width:
            problems.append(
                f"holds vectors of width {store.d_model}, but backbone={self.backbone} has "
                f"width {self.expected_width}"
            )
        if problems:
            raise TraitsaeError(
                f"store {store.path} {' and '.join(problems)}. Train with the backbone that "
                f"wrote it (backbone={store.backbone}), point data.store at the store you mean, "
                "or re-extract this backbone's store with extract.py (extract.overwrite=true)."
            )

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        if self.n_val_vectors:  # fail now, not at the first validation hours later
            self.val_workers()

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataset(self, start_batch: int | None = None) -> ActivationStream:
        """The endless training stream of this rank; `start_batch` defaults to the batches the
        trainer has already trained on (a resumed run continues exactly where it stopped)."""
        rank, world = self._rank_world()
        if start_batch is None:
            trainer = getattr(self, "trainer", None)
            start_batch = (
                0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches
            )
        self._check_streams(self.train_plan, world, "training")
        return ActivationStream(
            self.train_plan, self.batch_size, self.buffer_vectors, self.seed,
            rank=rank, world_size=world, start_batch=start_batch,
        )  # fmt: skip

    def val_dataset(self) -> ActivationStream:
        """One pass over the held-out images, in store order."""
        rank, world = self._rank_world()
        return ActivationStream(
            self.val_plan, self.val_batch_size, self.val_batch_size, self.seed,
            shuffle=False, epochs=1, rank=rank, world_size=world,
        )  # fmt: skip

    def train_dataloader(self) -> BatchLoader:
        return self.loader(self.train_dataset())

    def val_dataloader(self) -> CheckedBatches:
        where = f"store {self.store_path} ({self.val_plan.key}), validation images"
        loader = self.loader(self.val_dataset(), self.val_workers())
        return CheckedBatches(loader, where, self.median_norm)

    def val_workers(self) -> int:
        """Validation's loader workers. A small or unfinished store may hold out fewer blocks
        than there are loader workers: fewer workers then, so that every stream has blocks to
        read (one pass, same vectors)."""
        _, world = self._rank_world()
        n_blocks = len(self.val_plan.blocks)
        if 0 < n_blocks < world:
            raise TraitsaeError(
                f"store {self.store_path} holds out {n_blocks} validation blocks, fewer than the "
                f"{world} DDP ranks that read them. Raise data.val_fraction, lower "
                "data.block_images, or extract more images."
            )
        return min(self.num_workers, n_blocks // world)

    def loader(self, stream: ActivationStream, workers: int | None = None) -> BatchLoader:
        """Batches of `stream`, read by `workers` (default `num_workers`) worker processes."""
        # batch_size=None: the stream yields whole shuffled pieces (no per-vector collation).
        # Its own generator: creating the loader does not draw from the global RNG, so a
        # resumed run's RNG stream (restored from the checkpoint) matches the uninterrupted one.
        workers = self.num_workers if workers is None else workers
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=PREFETCH if workers else None,
            worker_init_fn=ignore_job_signals,  # only this process checkpoints and requeues
            generator=torch.Generator().manual_seed(self.seed),
        )
        return BatchLoader(loader, stream.batch_size)

    def _check_streams(self, plan: StreamPlan, world: int, what: str) -> None:
        n_streams = world * max(1, self.num_workers)
        if len(plan.blocks) < n_streams:
            raise TraitsaeError(
                f"store {self.store_path} splits into {len(plan.blocks)} {what} blocks of "
                f"{self.block_images or 'one HDF5 chunk of'} images, fewer than the {n_streams} "
                f"streams (DDP ranks x data.num_workers) that read them. Lower data.num_workers "
                "or data.block_images, or extract more images."
            )

    def describe(self) -> dict[str, Any]:
        """What the SAE export records about its data."""
        return {
            "store": str(self.store_path),
            "layer": self.layer,
            "tokens": "cls" if self.tokens == "cls" else "patches",
            "foreground": self.tokens == "foreground",  # trained on foreground patches only
            "d_model": self.d_model,
            "scale": self.scale,
            "n_train_vectors": self.n_train_vectors,
            "n_val_vectors": self.n_val_vectors,
            **self.store_info,
        }


def foreground_flags(store: Store) -> np.ndarray:
    """bool [N, P]: the foreground patches of the usable images, for data.tokens=foreground."""
    flags_NP = store.foreground()
    if flags_NP is None:
        raise TraitsaeError(
            f"data.tokens=foreground trains on the patches the store flags as foreground, but "
            f"store {store.path} has no foreground flags (images/foreground). Add them without "
            "re-extracting the activations: rerun the extract.py command that wrote the store "
            "(extract.foreground.rule=auto by default: the dataset's masks, else the border-colour "
            "rule; docs/guide/extract.md); it reads only the images and rewrites the store "
            "through a copy. Or train on every patch with data.tokens=patches."
        )
    return flags_NP


class CheckedBatches:
    """Batches checked as the normaliser sample was (`check_vectors`): held-out vectors with
    inf/NaN or outlier values stop the run instead of turning the validation metrics NaN."""

    def __init__(self, batches: BatchLoader, where: str, median_norm: float) -> None:
        self.batches, self.where, self.median_norm = batches, where, median_norm

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            check_vectors(batch, self.where, self.median_norm)
            yield batch


def check_vectors(
    x_ND: np.ndarray | torch.Tensor, where: str, median_norm: float | None = None
) -> None:
    """Refuse inf/NaN values and outlier vectors (longer than MAX_NORM_RATIO x the median
    length: of `x_ND` itself, or of the normaliser sample when `median_norm` is given)."""
    x = torch.as_tensor(x_ND).float()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise TraitsaeError(
            f"{where} holds non-finite activations: {bad} inf/NaN values in {x.shape[0]} vectors "
            "(float16 overflows beyond 65504). Re-extract the store with extract.py (it marks "
            "such images invalid), or pick a backbone/layer whose activations fit float16."
        )
    norms_N = x.norm(dim=1)
    reference = float(norms_N.median()) if median_norm is None else median_norm
    n_far = int((norms_N > MAX_NORM_RATIO * reference).sum()) if reference > 0 else 0
    if n_far:
        raise TraitsaeError(
            f"{where} holds {n_far} of {x.shape[0]} vectors longer than {MAX_NORM_RATIO:g} x the "
            f"training sample's median length {reference:.4g} (max {float(norms_N.max()):.4g}): "
            "outliers like these would set the normaliser (or the validation metrics) on their "
            "own. Mark those images invalid (images/valid) or re-extract the store."
        )
