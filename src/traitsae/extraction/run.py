"""One process writes one job: decode -> backbone -> float16 checks -> writer thread -> store.

Interruptions keep every finished row: Ctrl-C, a full disk or a file-size limit end with a
message that says how far the store got, and re-running the same command resumes there.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from traitsae.backbones import Backbone, build_backbone
from traitsae.cluster.signals import ignore_job_signals
from traitsae.data.images import ImageDataset, ImageList
from traitsae.data.images.foreground import ForegroundFlags
from traitsae.data.store import StoreWriter, stored_rows, tmp_path
from traitsae.errors import TraitsaeError
from traitsae.extraction.jobs import Job, image_rows
from traitsae.files import NO_SPACE

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Ctrl-C during extraction; the message says where the store stopped and how to resume."""


def run_job(cfg: DictConfig, images: ImageList, job: Job, device: torch.device) -> Path:
    """Write rows [job.lo, job.hi) of `images` to `job.out`, resuming a partial run."""
    backbone = build_backbone(cfg.backbone).to(device)
    check_job_geometry(job, backbone)
    with resumable(job.out):
        writer = StoreWriter.open(
            job.out,
            attrs=job.attrs,
            images=image_rows(images, job.lo, job.hi),
            fingerprint=job.fingerprint,
            overwrite=bool(cfg.extract.overwrite),
        )
        start, n_rows = writer.first_pending(), writer.n_images
        writer.close()
        if start:
            log.info("resuming %s at image %d of %d", tmp_path(job.out), start, n_rows)
        dataset = ImageDataset(
            images.paths[job.lo : job.hi], backbone.transform, backbone.geometry.image_size,
            foreground=foreground_flags(cfg, job, backbone),
        )  # fmt: skip
        # Fork the decoding workers while no HDF5 file is open: a forked HDF5 handle is unsafe.
        batches = iter(make_loader(cfg, dataset, start, device))
        writer = StoreWriter.resume(job.out)
        try:
            fill_store(cfg, backbone, dataset, batches, writer, start, device)
            return writer.finish()
        finally:
            writer.close()


@contextmanager
def resumable(out: Path) -> Iterator[None]:
    """Turn Ctrl-C and out-of-space write errors into messages naming the rows kept in the
    unfinished store `<out>.tmp` and the rerun that resumes it."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(
            f"stopped by Ctrl-C; {progress(out)}. Run the same command again to resume."
        ) from None
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        raise TraitsaeError(
            f"writing {tmp_path(out)} failed: {NO_SPACE[err.errno]} ({err.strerror}). "
            f"{progress(out).capitalize()}. Free space under {out.parent} (or write elsewhere "
            "with paths.activations_dir=<dir>) and run the same command again: it resumes "
            "where it stopped."
        ) from None


def progress(out: Path) -> str:
    """How far the unfinished store of `out` got, in words."""
    done, total = stored_rows(tmp_path(out))
    if total is None:
        return f"no image was stored yet (no readable {tmp_path(out)})"
    return f"{tmp_path(out)} holds the first {done} of {total} images"


def foreground_flags(cfg: DictConfig, job: Job, backbone: Backbone) -> ForegroundFlags | None:
    """What computes the job's foreground flags in the decoding workers (None: none asked)."""
    if job.foreground is None:
        return None
    size, grid = int(job.attrs["image_size"]), tuple(int(g) for g in job.attrs["grid"])
    return ForegroundFlags.build(job.foreground, cfg.dataset, backbone.transform, size, grid)


def check_job_geometry(job: Job, backbone: Backbone) -> None:
    g = backbone.geometry
    if (g.d_model, g.n_patches) != (job.attrs["d_model"], job.attrs["n_patches"]):
        raise TraitsaeError(
            f"backbone {backbone.name!r} produces {g.n_patches} patches of width {g.d_model}, "
            f"but its config promises {job.attrs['n_patches']} x {job.attrs['d_model']}."
        )


def make_loader(
    cfg: DictConfig, dataset: ImageDataset, start: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """Rows [start, N) in order; `extract.num_workers` processes decode and preprocess."""
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(start, len(dataset))),
        batch_size=int(cfg.extract.batch_size),
        num_workers=int(cfg.extract.num_workers),
        pin_memory=device.type == "cuda",
        shuffle=False,
        worker_init_fn=ignore_job_signals,  # only this process checkpoints and requeues
    )


def fill_store(
    cfg: DictConfig,
    backbone: Backbone,
    dataset: ImageDataset,
    batches: Iterator[dict[str, Any]],
    writer: StoreWriter,
    start: int,
    device: torch.device,
) -> None:
    """Run the backbone over the remaining batches and hand each one to the writer thread."""
    # A bar redraws its line with `\r`: in a log file (a Slurm job's .out) that is thousands of
    # lines; there a line per tenth of the images says as much.
    show = bool(cfg.extract.progress)
    bar = tqdm(
        total=len(dataset), initial=start, unit="img", desc=f"extract {backbone.name}",
        disable=not (show and sys.stderr.isatty()), dynamic_ncols=True,
    )  # fmt: skip
    tenth, done = max(1, len(dataset) // 10), start
    with AsyncWriter(writer, int(cfg.extract.write_queue)) as sink, bar:
        for batch in batches:
            sink.put(encode_batch(cfg, backbone, batch, dataset, device))
            n = len(batch["index"])
            bar.update(n)
            if show and bar.disable and (done + n) // tenth > done // tenth:
                log.info("extracted %d of %d images", done + n, len(dataset))
            done += n


def autocast(cfg: DictConfig, device: torch.device) -> Any:
    precision = str(cfg.extract.precision)
    if precision == "32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def encode_batch(
    cfg: DictConfig,
    backbone: Backbone,
    batch: dict[str, Any],
    dataset: ImageDataset,
    device: torch.device,
) -> tuple[
    int, dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray, dict[int, str], np.ndarray | None
]:
    """Forward one batch; returns (start row, patches, cls, valid, errors, foreground flags
    [B, P] or None) ready for the writer."""
    index_B = batch["index"].numpy()
    for reason in batch.get("foreground_error", ()):
        if reason:  # a mask that does not fit its image: stop before anything is written
            raise TraitsaeError(reason)
    images_BCHW = batch["image"].to(device, non_blocking=True)
    with autocast(cfg, device):
        patches, cls = backbone(images_BCHW)
    # Cast first: values beyond the float16 range become inf, so one finiteness check on the
    # float16 copy finds both overflow and NaN/inf from the model.
    patches16 = {layer: p_BPD.to(torch.float16) for layer, p_BPD in patches.items()}
    cls16 = {layer: c_BD.to(torch.float16) for layer, c_BD in cls.items()}
    valid_B = batch["ok"].numpy().astype(bool)
    errors: dict[int, str] = {}
    if not valid_B.all():
        errors = {int(index_B[row]): str(batch["error"][row]) for row in np.flatnonzero(~valid_B)}
    for layer in backbone.layers:
        if all_finite(patches16[layer]) and all_finite(cls16[layer]):
            continue  # the common case: one reduction, no per-image count
        counts_B = nonfinite_counts(patches16[layer], cls16[layer])
        for row in np.flatnonzero((counts_B > 0) & valid_B):
            i = int(index_B[row])
            reason = (
                f"{counts_B[row]} non-finite or float16-overflowing activations at layer {layer}"
            )
            if cfg.extract.on_nonfinite == "error":
                raise TraitsaeError(
                    f"image {dataset.paths[i]} (row {i}): {reason}. Use extract.precision=32, "
                    "or extract.on_nonfinite=invalid to mark such images invalid and continue."
                )
            valid_B[row], errors[i] = False, errors.get(i, reason)
    patches_np = {layer: t.cpu().numpy() for layer, t in patches16.items()}
    cls_np = {layer: t.cpu().numpy() for layer, t in cls16.items()}
    if not valid_B.all():
        # Invalid rows are zero-filled: no blank-image or overflowing values reach the store.
        for arr in (*patches_np.values(), *cls_np.values()):
            arr[~valid_B] = 0
    flags_BP = None
    if "foreground" in batch:
        flags_BP = np.asarray(batch["foreground"], dtype=bool) & valid_B[:, None]
    return int(index_B[0]), patches_np, cls_np, valid_B, errors, flags_BP


def all_finite(acts: torch.Tensor) -> bool:
    """No NaN or inf in `acts`: one min/max pass (NaN propagates through both).

    On CPU, float16 `aminmax` is ~15x faster than `isfinite(...).all()`, and faster than a range
    check on the model's float32 output (a strided view of the token tensor: 2x standalone, up
    to 6x right after the forward pass).
    """
    low, high = torch.aminmax(acts)
    return bool((low > -torch.inf) & (high < torch.inf))


def nonfinite_counts(patches16_BPD: torch.Tensor, cls16_BD: torch.Tensor) -> np.ndarray:
    """Per image: number of non-finite float16 activations (counted only when there are any)."""
    finite_B = torch.isfinite(patches16_BPD).flatten(1).all(1) & torch.isfinite(cls16_BD).all(1)
    counts_B = np.zeros(len(finite_B), dtype=np.int64)
    if not bool(finite_B.all()):
        bad = lambda t: (~torch.isfinite(t)).flatten(1).sum(1).cpu().numpy()
        counts_B = bad(patches16_BPD) + bad(cls16_BD)
    return counts_B


class AsyncWriter:
    """A thread that writes batches while the main thread computes the next one.

    The bounded queue applies back-pressure (memory stays at a few batches); an exception in the
    thread is re-raised in the main thread at the next `put` or on exit.
    """

    def __init__(self, writer: StoreWriter, max_pending: int) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as err:  # noqa: BLE001 -- re-raised in the main thread
                    self.error = err

    def put(self, item: tuple) -> None:
        self._raise()
        self.queue.put(item)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> AsyncWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The queued batches are written before the store closes, even when a (second) Ctrl-C
        # arrives meanwhile: closing the file under the writer thread could lose committed rows.
        interrupted, ended = False, False
        while self.thread.is_alive():
            try:
                if not ended:
                    self.queue.put(None)
                    ended = True
                self.thread.join()
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt
        self._raise()
