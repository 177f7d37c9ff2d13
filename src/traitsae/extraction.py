"""extract(cfg): images -> backbone -> resumable HDF5 activation store (traitsae.data.store).

Pipeline of one process: DataLoader workers decode and preprocess images; the main thread runs
the backbone and checks float16 range; a writer thread stores each batch (HDF5 writes overlap the
next forward pass). Progress is committed per batch, so re-running the same command resumes.

Several devices: the image list is cut into `extract.num_shards` contiguous shards, each written
as its own complete store (`<store>.shard-<i>-of-<n>.h5`), then joined into the one store.
Shards are independent jobs: a Slurm array (`extract.shard=$SLURM_ARRAY_TASK_ID`) or, with
`extract.shard=null`, local worker processes (one per entry of `extract.devices`). We chose this
over Lightning predict across DDP ranks because shards share no collective (no barrier hangs when
one device dies), a failed shard reruns alone and resumes, and the join checks every shard's image
range and config before anything is called complete.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from traitsae import __version__
from traitsae.backbones import Backbone, build_backbone, check_backbone_cfg, resolve_layers
from traitsae.data.images import ImageDataset, ImageList, load_image_list
from traitsae.data.store import Store, StoreWriter, read_fingerprint, tmp_path
from traitsae.errors import TraitsaeError
from traitsae.paths import store_path_from_cfg

log = logging.getLogger(__name__)
PRECISIONS = ("32", "bf16-mixed", "16-mixed")


@dataclass
class Job:
    """One store to write: rows [lo, hi) of the split's image list."""

    out: Path
    lo: int
    hi: int
    fingerprint: str
    attrs: dict[str, Any] = field(default_factory=dict)


def extract(cfg: DictConfig) -> Path:
    """Write (or finish, or join) the store of cfg.backbone x cfg.dataset x cfg.split."""
    if cfg.dataset.get("format") == "dictionary":  # generated activations: no images, no backbone
        from traitsae.data.dictionary import write_dictionary_store

        return write_dictionary_store(cfg)
    torch.manual_seed(int(cfg.seed))
    check_extract_cfg(cfg)
    images = load_image_list(cfg.dataset, cfg.split)
    out = store_path_from_cfg(cfg)
    job = make_job(cfg, images, out, 0, len(images))
    if store_is_done(out, job.fingerprint, bool(cfg.extract.overwrite)):
        log.info("store %s is already complete for this configuration; nothing to do.", out)
        return out
    n_shards, shard = int(cfg.extract.num_shards), cfg.extract.get("shard")
    if n_shards == 1:
        run_job(cfg, images, job, resolve_device(cfg.extract.device))
    elif shard is not None:
        path = run_shard(cfg, images, out, int(shard), n_shards, resolve_device(cfg.extract.device))
        log.info(
            "shard %s of %d is complete: %s. Once every shard is, join them into %s by running "
            "the same command with extract.shard=null.", shard, n_shards, path, out,
        )  # fmt: skip
        return path
    else:
        run_local_shards(cfg, images, out, n_shards)
        join_shards(cfg, images, out, n_shards, job)
    report(out)
    return out


def check_extract_cfg(cfg: DictConfig) -> None:
    ex = cfg.extract
    if str(ex.precision) not in PRECISIONS:
        raise TraitsaeError(f"extract.precision={ex.precision!r} is not one of {list(PRECISIONS)}.")
    if int(ex.num_shards) < 1 or (
        ex.get("shard") is not None and not 0 <= int(ex.shard) < int(ex.num_shards)
    ):
        raise TraitsaeError(
            f"extract.shard={ex.get('shard')} / extract.num_shards={ex.num_shards}: need "
            "num_shards >= 1 and 0 <= shard < num_shards (or shard=null to run all shards here)."
        )
    if ex.on_nonfinite not in ("invalid", "error"):
        raise TraitsaeError(
            f"extract.on_nonfinite must be 'invalid' or 'error', got {ex.on_nonfinite!r}."
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- config identity


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The parts of the config that define a store's content, resolved (stored as `config`)."""
    out: dict[str, Any] = {
        key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "dataset")
    }
    # Evaluation-only dataset keys (the discovery contrast pair) do not change activations.
    out["dataset"].pop("contrast", None)
    out.update(split=str(cfg.split), seed=int(cfg.seed))
    out["extract"] = {"precision": str(cfg.extract.precision)}
    return out


def make_job(cfg: DictConfig, images: ImageList, out: Path, lo: int, hi: int) -> Job:
    """The store of rows [lo, hi): its root attrs and the fingerprint that guards resuming."""
    check_backbone_cfg(cfg.backbone)
    layers = resolve_layers(cfg.backbone.layers, int(cfg.backbone.depth), cfg.backbone.name)
    content = resolved_config(cfg)
    content["backbone"]["layers"] = layers
    key = {**content, "n_images": len(images), "rows": [lo, hi]}
    # The fingerprint decides whether an existing file may be resumed: same content, same rows.
    fingerprint = json.dumps(key, sort_keys=True)
    b = cfg.backbone
    side = int(b.image_size) // int(b.patch_size)
    attrs = {
        "backbone": b.name,
        "dataset": cfg.dataset.name,
        "split": cfg.split,
        "d_model": int(b.width),
        "n_patches": side * side,
        "n_prefix_tokens": int(b.n_prefix_tokens),
        "grid": [side, side],
        "layers": layers,
        "depth": int(b.depth),
        "image_size": int(b.image_size),
        "n_images": hi - lo,
        "config": OmegaConf.to_yaml(OmegaConf.create(content)),
        "image_root": str(images.root),
        "traitsae_version": __version__,
    }
    return Job(out, lo, hi, fingerprint, attrs)


def store_is_done(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when `out` is a complete store of this config; error or delete when it differs."""
    if not out.exists():
        return False
    existing = read_fingerprint(out)
    if existing == fingerprint:
        with Store(out, require_complete=False) as store:
            if store.complete:
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


def config_difference(old: str | None, new: str) -> str:
    """Human summary of how two fingerprints differ: `key: old -> new` for each changed key."""
    try:
        before, after = _flatten(json.loads(old or "")), _flatten(json.loads(new))
    except json.JSONDecodeError:
        return "the existing file carries no traitsae fingerprint"
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return "; ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys) or "no difference"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(
            _flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}")
        )
    return flat


# ----------------------------------------------------------------------------- one process


def run_job(cfg: DictConfig, images: ImageList, job: Job, device: torch.device) -> Path:
    """Write rows [job.lo, job.hi) of `images` to `job.out`, resuming a partial run."""
    backbone = build_backbone(cfg.backbone).to(device)
    check_job_geometry(job, backbone)
    writer = StoreWriter.open(
        job.out,
        attrs=job.attrs,
        images=image_rows(images, job.lo, job.hi),
        n_patches=int(job.attrs["n_patches"]),
        d_model=int(job.attrs["d_model"]),
        fingerprint=job.fingerprint,
        overwrite=bool(cfg.extract.overwrite),
    )
    start, n_rows = writer.first_pending(), writer.n_images
    writer.close()
    if start:
        log.info("resuming %s at image %d of %d", tmp_path(job.out), start, n_rows)
    dataset = ImageDataset(
        images.paths[job.lo : job.hi], backbone.transform, backbone.geometry.image_size
    )
    # Fork the decoding workers while no HDF5 file is open: a forked HDF5 handle is unsafe.
    batches = iter(make_loader(cfg, dataset, start, device))
    writer = StoreWriter.resume(job.out)
    try:
        fill_store(cfg, backbone, dataset, batches, writer, start, device)
        return writer.finish()
    finally:
        writer.close()


def image_rows(images: ImageList, lo: int, hi: int) -> dict[str, np.ndarray]:
    """The images/ columns of rows [lo, hi): index (global position), path, label, metadata."""
    rows: dict[str, np.ndarray] = {"index": np.arange(lo, hi, dtype=np.int64)}
    for key, values in images.store_images().items():
        dtype = np.int64 if key == "label" else object
        rows[key] = np.asarray(values, dtype=dtype)[lo:hi]
    return rows


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
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(dataset), initial=start, unit="img", desc=f"extract {backbone.name}",
        disable=not cfg.extract.progress, dynamic_ncols=True,
    )  # fmt: skip
    with AsyncWriter(writer, int(cfg.extract.write_queue)) as sink, bar:
        for batch in batches:
            sink.put(encode_batch(cfg, backbone, batch, dataset, device))
            bar.update(len(batch["index"]))


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
) -> tuple[int, dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray, dict[int, str]]:
    """Forward one batch; returns (start row, patches, cls, valid, errors) ready for the writer."""
    index_B = batch["index"].numpy()
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
    return int(index_B[0]), patches_np, cls_np, valid_B, errors


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
        self.queue.put(None)
        self.thread.join()
        self._raise()


# ----------------------------------------------------------------------------- shards


def shard_bounds(n_images: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Contiguous, near-equal rows [lo, hi) of shard `shard`."""
    edges = np.linspace(0, n_images, n_shards + 1).round().astype(int)
    return int(edges[shard]), int(edges[shard + 1])


def shard_path(out: Path, shard: int, n_shards: int) -> Path:
    return out.with_name(f"{out.stem}.shard-{shard:03d}-of-{n_shards:03d}{out.suffix}")


def run_shard(
    cfg: DictConfig, images: ImageList, out: Path, shard: int, n_shards: int, device: torch.device
) -> Path:
    """Write shard `shard` of `n_shards` as its own complete store (skip when already done)."""
    lo, hi = shard_bounds(len(images), shard, n_shards)
    job = make_job(cfg, images, shard_path(out, shard, n_shards), lo, hi)
    if store_is_done(job.out, job.fingerprint, bool(cfg.extract.overwrite)):
        return job.out
    return run_job(cfg, images, job, device)


def shard_is_complete(
    cfg: DictConfig, images: ImageList, out: Path, shard: int, n_shards: int
) -> bool:
    lo, hi = shard_bounds(len(images), shard, n_shards)
    job = make_job(cfg, images, shard_path(out, shard, n_shards), lo, hi)
    return job.out.exists() and read_fingerprint(job.out) == job.fingerprint


def shard_devices(cfg: DictConfig, n_shards: int) -> list[str]:
    devices = cfg.extract.get("devices")
    if not devices:
        n_gpu = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(n_gpu)] if n_gpu else ["cpu"]
    return [str(devices[i % len(devices)]) for i in range(n_shards)]


def run_local_shards(cfg: DictConfig, images: ImageList, out: Path, n_shards: int) -> None:
    """One spawned process per shard (CUDA needs spawn); a failed shard fails the run clearly."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    # Only what a shard needs, resolved here (paths.output_dir refers to this Hydra run).
    container = {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        for key in ("backbone", "dataset", "extract")
    }
    container.update(
        split=cfg.split, seed=cfg.seed, paths={"activations_dir": cfg.paths.activations_dir}
    )
    procs = []
    for shard, device in enumerate(shard_devices(cfg, n_shards)):
        if shard_is_complete(cfg, images, out, shard, n_shards):
            continue  # finished by an earlier run or a separate shard job
        args = (container, shard, n_shards, device, max(1, torch.get_num_threads() // n_shards))
        proc = ctx.Process(target=_shard_worker, args=args, name=f"extract-shard-{shard}")
        proc.start()
        procs.append(proc)
    failed = []
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            failed.append(f"{proc.name} (exit code {proc.exitcode})")
    if failed:
        raise TraitsaeError(
            f"extraction failed in {', '.join(failed)} (see the messages above). Finished shards "
            "are kept: re-run the same command to resume only what is missing."
        )


def _shard_worker(container: dict, shard: int, n_shards: int, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    cfg = OmegaConf.create(container)
    try:
        images = load_image_list(cfg.dataset, cfg.split)
        run_shard(cfg, images, store_path_from_cfg(cfg), shard, n_shards, torch.device(device))
    except TraitsaeError as err:
        print(f"error: shard {shard}: {err}", flush=True)
        raise SystemExit(2) from None


def join_shards(cfg: DictConfig, images: ImageList, out: Path, n_shards: int, job: Job) -> Path:
    """Copy the complete shard stores, checked, into `out`; shards are deleted afterwards."""
    shards = []
    for shard in range(n_shards):
        lo, hi = shard_bounds(len(images), shard, n_shards)
        expected = make_job(cfg, images, shard_path(out, shard, n_shards), lo, hi)
        shards.append((check_shard(expected), lo))
    writer = StoreWriter.open(
        out, attrs=job.attrs, images=image_rows(images, 0, len(images)), n_patches=int(job.attrs["n_patches"]),
        d_model=int(job.attrs["d_model"]), fingerprint=job.fingerprint, overwrite=True,
    )  # fmt: skip
    try:
        for path, lo in shards:
            with Store(path) as store:
                for start, patches, cls, valid, errors in shard_blocks(store, lo):
                    writer.write(start, patches, cls, valid, errors)
        writer.finish()
    finally:
        writer.close()
    for path, _ in shards:
        path.unlink()
    return out


def check_shard(expected: Job) -> Path:
    path = expected.out
    if not path.exists() or read_fingerprint(path) != expected.fingerprint:
        raise TraitsaeError(
            f"shard store {path} is missing or was written with another configuration; run "
            "its shard job again (extract.shard=<i>) before joining."
        )
    with Store(path) as store:
        index = store.metadata["index"]
        if not np.array_equal(index, np.arange(expected.lo, expected.hi)):
            raise TraitsaeError(
                f"shard store {path} does not hold rows {expected.lo}..{expected.hi}."
            )
    return path


def shard_blocks(
    store: Store, lo: int, block: int = 1024
) -> Iterator[tuple[int, dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray, dict[int, str]]]:
    """A shard store's rows as writer batches at their global position."""
    meta = store.metadata
    for start in range(0, store.n_images, block):
        stop = min(start + block, store.n_images)
        patches = {layer: store.patches(layer)[start:stop] for layer in store.layers}
        cls = {layer: store.cls(layer)[start:stop] for layer in store.layers}
        errors = {lo + i: meta["error"][i] for i in range(start, stop) if meta["error"][i]}
        yield lo + start, patches, cls, meta["valid"][start:stop], errors


# ----------------------------------------------------------------------------- report


def report(out: Path, max_listed: int = 20) -> None:
    """Log what was written and every invalid image (path and reason)."""
    with Store(out) as store:
        meta = store.metadata
        invalid = np.flatnonzero(~meta["valid"])
        log.info(
            "wrote %s: %d images, layers %s, %d patches x %d dims, %d invalid",
            out, store.n_images, store.layers, store.n_patches, store.d_model, len(invalid),
        )  # fmt: skip
        for i in invalid[:max_listed]:
            log.warning("invalid image %s: %s", meta["path"][i], meta["error"][i])
        if len(invalid) > max_listed:
            log.warning("... and %d more invalid images (images/valid, images/error in the store)",
                        len(invalid) - max_listed)  # fmt: skip
