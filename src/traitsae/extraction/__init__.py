"""extract(cfg): images -> backbone -> resumable HDF5 activation store (traitsae.data.store).

Pipeline of one process (`run.py`): DataLoader workers decode and preprocess images; the main
thread runs the backbone and checks float16 range; a writer thread stores each batch (HDF5 writes
overlap the next forward pass). Progress is committed per batch, so re-running the same command
resumes; `jobs.py` decides whether an existing file is this configuration's. Several devices:
contiguous shard stores joined into one (`shards.py`). One extraction per store at a time
(`traitsae.locks`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from traitsae.data.dictionary import write_dictionary_store
from traitsae.data.images import ImageList, load_image_list
from traitsae.data.store import Store, config_difference, store_is_done
from traitsae.data.store.schema import printable
from traitsae.errors import TraitsaeError
from traitsae.extraction.foreground import ensure_foreground
from traitsae.extraction.jobs import configured_foreground, image_rows, make_job
from traitsae.extraction.run import AsyncWriter, Interrupted, encode_batch, resumable, run_job
from traitsae.extraction.shards import (
    join_shards,
    run_local_shards,
    shard_bounds,
    shard_jobs,
    shard_path,
)
from traitsae.locks import store_lock
from traitsae.paths import store_path_from_cfg

log = logging.getLogger(__name__)
PRECISIONS = ("32", "bf16-mixed", "16-mixed")

__all__ = [
    "AsyncWriter",
    "Interrupted",
    "config_difference",
    "encode_batch",
    "extract",
    "image_rows",
    "make_job",
]


def extract(cfg: DictConfig) -> Path:
    """Write (or finish, or join) the store of cfg.backbone x cfg.dataset x cfg.split."""
    if cfg.dataset.get("format") == "dictionary":  # generated activations: no images, no backbone
        return write_dictionary_store(cfg)
    torch.manual_seed(int(cfg.seed))
    check_extract_cfg(cfg)
    images = load_image_list(cfg.dataset, cfg.split)
    out = store_path_from_cfg(cfg)
    job = make_job(cfg, images, out, 0, len(images))
    if store_is_done(out, job.fingerprint, bool(cfg.extract.overwrite)):
        if not ensure_foreground(cfg, out, job.foreground):
            log.info("store %s is already complete for this configuration; nothing to do.", out)
        return out
    n_shards, shard = int(cfg.extract.num_shards), cfg.extract.get("shard")
    if n_shards == 1:
        with store_lock(out):
            run_job(cfg, images, job, resolve_device(cfg.extract.device))
    elif shard is not None:
        return extract_shard(cfg, images, out, int(shard), n_shards)
    else:
        make = lambda path, lo, hi: make_job(cfg, images, path, lo, hi)  # noqa: E731
        shards = shard_jobs(out, len(images), n_shards, make)
        with store_lock(out):
            run_local_shards(
                shards, shard_devices(cfg, n_shards), _shard_worker, (shard_config(cfg),),
                threads=max(1, torch.get_num_threads() // n_shards),
            )  # fmt: skip
            with resumable(out):
                join_shards(job, image_rows(images, 0, len(images)), shards)
    ensure_foreground(cfg, out, job.foreground)  # a resumed store begun without them
    report(out)
    return out


def extract_shard(cfg: DictConfig, images: ImageList, out: Path, shard: int, n_shards: int) -> Path:
    """Write shard `shard` of `n_shards` of the store `out` as its own complete store."""
    lo, hi = shard_bounds(len(images), shard, n_shards)
    job = make_job(cfg, images, shard_path(out, shard, n_shards), lo, hi)
    with store_lock(job.out):
        if not store_is_done(job.out, job.fingerprint, bool(cfg.extract.overwrite)):
            run_job(cfg, images, job, resolve_device(cfg.extract.device))
    log.info(
        "shard %d of %d is complete: %s. Once every shard is, the same command with "
        "extract.shard=null joins them into %s.", shard, n_shards, job.out, out,
    )  # fmt: skip
    return job.out


def check_extract_cfg(cfg: DictConfig) -> None:
    """Every extract.* option, checked before any image is read (one clear error each)."""
    ex = cfg.extract
    if str(ex.precision) not in PRECISIONS:
        raise TraitsaeError(f"extract.precision={ex.precision!r} is not one of {list(PRECISIONS)}.")
    for key, low in (("batch_size", 1), ("num_workers", 0), ("write_queue", 1), ("num_shards", 1)):
        value = ex.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TraitsaeError(
                f"extract.{key}={value!r} must be an integer >= {low} (conf/extract.yaml)."
            )
    if ex.get("shard") is not None and not (
        isinstance(ex.shard, int) and 0 <= ex.shard < ex.num_shards
    ):
        raise TraitsaeError(
            f"extract.shard={ex.get('shard')} / extract.num_shards={ex.num_shards}: need "
            "0 <= shard < num_shards (or shard=null to run all shards here)."
        )
    if ex.on_nonfinite not in ("invalid", "error"):
        raise TraitsaeError(
            f"extract.on_nonfinite must be 'invalid' or 'error', got {ex.on_nonfinite!r}."
        )
    if ex.get("shard") is not None or int(ex.num_shards) == 1:
        resolve_device(ex.device)
    for device in ex.get("devices") or ():
        resolve_device(device, key="extract.devices")
    configured_foreground(cfg)


def resolve_device(device: str, key: str = "extract.device") -> torch.device:
    """`auto` (cuda when available, else cpu) or a torch device that exists on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise TraitsaeError(
            f"{key}={device!r} is not a device; use auto, cpu, cuda or cuda:<index>."
        ) from None
    if resolved.type == "cuda":
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= n_gpu:
            raise TraitsaeError(
                f"{key}={device!r}, but this machine has {n_gpu} CUDA device(s)"
                f"{'' if n_gpu else ' (or torch was built without CUDA)'}; use "
                f"{key}=cpu or auto{f', or cuda:0..cuda:{n_gpu - 1}' if n_gpu else ''}."
            )
    elif resolved.type != "cpu" and not _available(resolved):
        raise TraitsaeError(f"{key}={device!r} is not available on this machine; use cpu or auto.")
    return resolved


def _available(device: torch.device) -> bool:
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


# ----------------------------------------------------------------------------- local shards


def shard_devices(cfg: DictConfig, n_shards: int) -> list[str]:
    devices = cfg.extract.get("devices")
    if not devices:
        n_gpu = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(n_gpu)] if n_gpu else ["cpu"]
    return [str(devices[i % len(devices)]) for i in range(n_shards)]


def shard_config(cfg: DictConfig) -> dict:
    """What a shard process needs, resolved here (paths.output_dir refers to this Hydra run)."""
    container = {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        for key in ("backbone", "dataset", "extract")
    }
    container.update(
        split=cfg.split, seed=cfg.seed, paths={"activations_dir": cfg.paths.activations_dir}
    )
    return container


def _shard_worker(container: dict, shard: int, device: str, threads: int) -> None:
    """Body of one local shard process: the `extract.shard=<shard>` job on `device`."""
    torch.set_num_threads(threads)
    cfg = OmegaConf.create(container)
    cfg.extract.device = device
    try:
        images = load_image_list(cfg.dataset, cfg.split)
        extract_shard(cfg, images, store_path_from_cfg(cfg), shard, int(cfg.extract.num_shards))
    except (TraitsaeError, Interrupted) as err:
        print(f"error: shard {shard}: {err}", flush=True)
        raise SystemExit(2) from None


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
            log.warning(
                "invalid image %s: %s", printable(meta["path"][i]), printable(meta["error"][i])
            )
        if len(invalid) > max_listed:
            log.warning("... and %d more invalid images (images/valid, images/error in the store)",
                        len(invalid) - max_listed)  # fmt: skip
        flags_NP = store.foreground()
        if flags_NP is not None:
            empty = np.flatnonzero(meta["valid"] & ~flags_NP.any(axis=1))
            log.info(
                "foreground: %.1f%% of the valid images' patches (%s)",
                100 * flags_NP[meta["valid"]].mean() if meta["valid"].any() else 0.0,
                store.foreground_rule,
            )  # fmt: skip
            if len(empty):
                log.warning(
                    "%d valid images have no foreground patch (no mask, an empty mask, or nothing "
                    "apart from the background colour): data.tokens=foreground streams none of "
                    "their vectors and eval.patches=foreground skips them; first: %s",
                    len(empty), ", ".join(printable(meta["path"][i]) for i in empty[:5]),
                )  # fmt: skip
