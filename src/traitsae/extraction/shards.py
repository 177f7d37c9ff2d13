"""Several devices: the image list cut into contiguous shards, each its own complete store
(`<store>.shard-<i>-of-<n>.h5`), then joined into the one store.

Shards are independent jobs -- a Slurm array (`extract.shard=$SLURM_ARRAY_TASK_ID`) or local
worker processes, one per device. We chose this over Lightning predict across DDP ranks because
shards share no collective (no barrier hangs when one device dies), a failed shard reruns alone
and resumes, and the join checks every shard's image range and config before anything is called
complete. Everything a function needs is passed in: the jobs (paths, rows, fingerprints) are made
by the caller from the config.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.data.store import Store, StoreWriter, read_fingerprint
from traitsae.errors import TraitsaeError
from traitsae.extraction.jobs import Job


def shard_bounds(n_images: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Contiguous, near-equal rows [lo, hi) of shard `shard`."""
    edges = np.linspace(0, n_images, n_shards + 1).round().astype(int)
    return int(edges[shard]), int(edges[shard + 1])


def shard_path(out: Path, shard: int, n_shards: int) -> Path:
    return out.with_name(f"{out.stem}.shard-{shard:03d}-of-{n_shards:03d}{out.suffix}")


def shard_jobs(out: Path, n_images: int, n_shards: int, make: Callable[..., Job]) -> list[Job]:
    """The job of every shard; `make(path, lo, hi)` builds one (attrs, fingerprint)."""
    return [
        make(shard_path(out, shard, n_shards), *shard_bounds(n_images, shard, n_shards))
        for shard in range(n_shards)
    ]


def is_complete(job: Job) -> bool:
    """A complete store of this job exists (finished earlier or by a separate shard job)."""
    return job.out.exists() and read_fingerprint(job.out) == job.fingerprint


def run_local_shards(
    jobs: Sequence[Job],
    devices: Sequence[str],
    worker: Callable[..., None],
    worker_args: tuple,
    threads: int,
) -> None:
    """One spawned process per unfinished shard (CUDA needs spawn), shard i on devices[i];
    `worker(*worker_args, shard, device, threads)` writes shard `shard`. A failed shard fails
    the run, naming it; finished shards are kept."""
    ctx = mp.get_context("spawn")
    procs = []
    for shard, (job, device) in enumerate(zip(jobs, devices, strict=True)):
        if is_complete(job):
            continue
        args = (*worker_args, shard, device, threads)
        proc = ctx.Process(target=worker, args=args, name=f"extract-shard-{shard}")
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


def join_shards(job: Job, images: Mapping[str, Any], shards: Sequence[Job]) -> Path:
    """Copy the complete shard stores, checked, into `job.out` (whose `images/` columns are
    `images`); shards are deleted afterwards."""
    for shard in shards:
        check_shard(shard)
    attrs = dict(job.attrs)
    if not all(same_foreground(shard) for shard in shards):
        attrs.pop("foreground", None)  # no flags now: the caller adds them afterwards
    writer = StoreWriter.open(
        job.out, attrs=attrs, images=images, fingerprint=job.fingerprint, overwrite=True
    )
    try:
        for shard in shards:
            with Store(shard.out) as store:
                for batch in shard_blocks(store, shard.lo):
                    writer.write(*batch)
        writer.finish()
    finally:
        writer.close()
    for shard in shards:
        shard.out.unlink()
    return job.out


def same_foreground(shard: Job) -> bool:
    """The shard store holds foreground flags of the job's rule."""
    with Store(shard.out) as store:
        return store.has_foreground and store.foreground_rule == shard.attrs.get("foreground")


def check_shard(expected: Job) -> None:
    path = expected.out
    if not is_complete(expected):
        raise TraitsaeError(
            f"shard store {path} is missing or was written with another configuration; run "
            "its shard job again (extract.shard=<i>) before joining."
        )
    with Store(path) as store:
        if not np.array_equal(store.metadata["index"], np.arange(expected.lo, expected.hi)):
            raise TraitsaeError(
                f"shard store {path} does not hold rows {expected.lo}..{expected.hi}."
            )


def shard_blocks(store: Store, lo: int, block: int = 1024) -> Iterator[tuple]:
    """A shard store's rows as writer batches at their global position (foreground flags
    included when the shard has them)."""
    meta = store.metadata
    flags_NP = store.foreground()
    for start in range(0, store.n_images, block):
        stop = min(start + block, store.n_images)
        patches = {layer: store.patches(layer)[start:stop] for layer in store.layers}
        cls = {layer: store.cls(layer)[start:stop] for layer in store.layers}
        errors = {lo + i: meta["error"][i] for i in range(start, stop) if meta["error"][i]}
        flags = None if flags_NP is None else flags_NP[start:stop]
        yield lo + start, patches, cls, meta["valid"][start:stop], errors, flags
