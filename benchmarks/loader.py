"""Shuffled streaming (ActivationsDataModule, 2 workers) vs plain sequential reading, same file.

    python benchmarks/loader.py [--images 6000 --patches 196 --d-model 384 --workers 0 1 2]

Writes a float16 store (0.9 GB by default) in a temp dir (or reads --store), then in the same
process times:
- sequential: h5py reads of consecutive whole chunks in file order, in this process;
- shuffled:   the training DataLoader (seeded chunk order, in-buffer permutation, sharded over
              workers, batches handed back to this process) over --epochs epochs, timed from
              the end of the first to the last batch (worker start-up and shut-down excluded:
              an endless training stream pays them once per run).
Both read every training vector; the page cache is warmed first so both see the same storage.
The store is large enough that each timed window lasts a few hundred ms: on a 0.3 GB store the
windows were ~90 ms and scheduler noise on 2 shared cores swung single runs by 2x. Each
repetition times sequential reading and then the loader at every worker count, so drifts in
machine load hit all alike. Reported: the best repetition of each (as timeit does: other
processes on shared cores only ever slow a run down) and the median.
Target (the issue's): shuffled with 2 workers >= 0.8 x sequential vectors/s.

    python benchmarks/loader.py --foreground 0.5

Also times `data.tokens=foreground` side by side (same store, same repetitions): every image
gets foreground flags, a centred disc of about that fraction of its patches (a specimen on its
background), and the loader streams only those. Reported: its vectors/s over the all-patch
loader's at the same worker count (target >= 0.9).

    python benchmarks/loader.py --out-of-core [--dir DIR] [--keep]

Out of core: a store of at least 1.5x this machine's RAM (768-wide fp16 vectors, 196 a image),
written slab by slab into --dir and deleted afterwards (unless --keep or --store). Before each
timed pass the file leaves the page cache (`echo 3 > /proc/sys/vm/drop_caches`, or
posix_fadvise(DONTNEED) on the file where that is not permitted), so every pass reads the disk:
- sequential: whole chunks in file order;
- shuffled:   the training loader with 0, 1, 2 workers (timed from its first batch);
each over the first --limit-gb (6) GB of an epoch: a whole epoch is minutes a pass on slow disks,
and none of it is cached when a pass starts.
A sampler records the peak memory of the loader's processes: private and shared memory (buffers,
output rings) apart from the mapped store's page cache (file-backed, reclaimed by the kernel).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np


def disc_flags(n_images: int, n_patches: int, fraction: float) -> np.ndarray:
    """bool [N, P]: a centred disc of about `fraction` of each image's patch grid."""
    side = int(round(math.sqrt(n_patches)))
    yy, xx = np.mgrid[:side, :side] + 0.5 - side / 2
    radius = side * math.sqrt(fraction / math.pi)
    disc_P = ((yy**2 + xx**2) <= radius**2).ravel()
    return np.broadcast_to(np.pad(disc_P, (0, n_patches - disc_P.size)), (n_images, n_patches))


def make_store(
    path: Path, n_images: int, n_patches: int, d_model: int, foreground: float | None = None
) -> Path:
    from traitsae.data.store import create_store

    rng = np.random.default_rng(0)
    acts = np.empty((n_images, n_patches, d_model), np.float16)
    for start in range(0, n_images, 500):  # in slabs: no float32 copy of the whole store
        slab = acts[start : start + 500]
        slab[:] = rng.standard_normal(slab.shape, dtype=np.float32)
    return create_store(
        path,
        patches={11: acts},
        cls={11: acts[:, 0]},
        images={
            "path": np.array([f"{i}.jpg" for i in range(n_images)]),
            **({} if foreground is None else {"foreground": disc_flags(n_images, n_patches, foreground)}),
        },
        attrs={"backbone": "bench", "dataset": "bench", "split": "train", "depth": 12},
    )  # fmt: skip


def sequential(
    path: Path, key: str, blocks: list[tuple[int, int]], limit: float = math.inf
) -> tuple[int, float]:
    """Whole chunks in file order (up to `limit` vectors): (vectors, seconds)."""
    start, n = time.perf_counter(), 0
    with h5py.File(path, "r") as f:
        data = f[key]
        for a, b in blocks:
            n += data[a:b].reshape(-1, data.shape[-1]).shape[0]
            if n >= limit:
                break
    return n, time.perf_counter() - start


def shuffled(dm, epochs: int) -> tuple[int, int, float]:
    from traitsae.data.stream import ActivationStream

    """Steady state of the training loader: from the end of its first epoch to the arrival of
    the last batch. Worker start-up (fork, first touch of the buffers) and shut-down (joining
    the workers) are excluded, as in an endless training stream, which pays them once per run.
    Returns (all vectors, vectors timed, seconds)."""
    stream = ActivationStream(
        dm.train_plan, dm.batch_size, dm.buffer_vectors, dm.seed, epochs=epochs
    )
    total, mark, last = 0, None, 0.0
    for batch in dm.loader(stream):
        total += batch.shape[0]
        last = time.perf_counter()
        if mark is None and total >= dm.n_train_vectors:
            mark = (total, last)
    return total, total - mark[0], last - mark[1]


# ----------------------------------------------------------------------------- out of core


def write_big_store(path: Path, n_images: int, n_patches: int, d_model: int) -> Path:
    """A store too large for memory, written slab by slab (one random slab repeated: float16
    activations do not compress, so the contents do not change the I/O)."""
    from traitsae.data.store import StoreWriter

    slab_NPD = np.random.default_rng(0).standard_normal((256, n_patches, d_model), np.float32)
    slab_NPD = slab_NPD.astype(np.float16)
    side = int(round(np.sqrt(n_patches)))
    attrs = {
        "backbone": "bench", "dataset": "bench", "split": "train", "d_model": d_model,
        "n_patches": n_patches, "n_prefix_tokens": 1, "layers": [11], "n_images": n_images,
        "grid": [side, side], "depth": 12, "image_size": 0, "config": "",
    }  # fmt: skip
    images = {"path": np.array([f"{i}.jpg" for i in range(n_images)], dtype=object)}
    writer = StoreWriter.open(path, attrs=attrs, images=images, fingerprint="", overwrite=True)
    try:
        for lo in range(0, n_images, len(slab_NPD)):
            part = slab_NPD[: min(len(slab_NPD), n_images - lo)]
            writer.write(lo, {11: part}, {11: part[:, 0]}, np.ones(len(part), bool))
        return writer.finish()
    finally:
        writer.close()


def evict(path: Path) -> str:
    """Drop the store's pages from the page cache; returns how."""
    os.sync()  # dirty pages are not dropped
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "echo 3 > /proc/sys/vm/drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "posix_fadvise(POSIX_FADV_DONTNEED) (drop_caches not permitted)"


class PeakMemory:
    """Samples this process and its children (the loader workers) every 100 ms: the peak of
    their summed proportional set sizes (PSS: a page shared by n processes counts 1/n in each,
    so the sum is the memory they hold), private + shared memory (buffers, output rings) apart
    from mapped files (the store's page cache, reclaimed by the kernel, and the libraries)."""

    def __init__(self) -> None:
        self.private = self.mapped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            private, mapped = pss()
            self.private, self.mapped = max(self.private, private), max(self.mapped, mapped)


def pss() -> tuple[int, int]:
    """(anonymous + shmem, file-backed) PSS in bytes of this process and its children."""
    me = os.getpid()
    private = mapped = 0
    for pid in [me, *_children(me)]:
        fields = _rollup(pid)
        private += fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)
        mapped += fields.get("Pss_File", 0)
    return private, mapped


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rollup(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return {}
    return {
        key: int(rest.split()[0]) * 1024
        for key, _, rest in (line.partition(":") for line in lines)
        if rest.strip().endswith("kB")
    }


def out_of_core(args: argparse.Namespace) -> None:
    from traitsae.data.rings import PIECE_BYTES, RING_SIZE

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    n_patches, d_model = 196, 768
    n_images = math.ceil(1.5 * ram / (n_patches * d_model * 2))
    folder = Path(tempfile.mkdtemp(prefix="traitsae-ooc-", dir=args.dir))
    try:
        path = args.store
        if path is None:
            start = time.perf_counter()
            path = write_big_store(folder / "big.h5", n_images, n_patches, d_model)
            print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
        size = path.stat().st_size
        print(f"store {size / 1e9:.1f} GB = {size / ram:.2f} x RAM ({ram / 2**30:.1f} GiB)")
        dm = datamodule(path, 0, args.batch, args.buffer, str(folder))
        blocks = sorted(dm.train_plan.blocks)
        gbps = dm.d_model * 2 / 1e9
        # Every pass reads the first `limit` vectors of an epoch from disk: the whole epoch
        # takes minutes a pass on slow disks, and nothing of it is cached at its start.
        limit = min(dm.n_train_vectors, args.limit_gb * 1e9 / (dm.d_model * 2))
        print(f"each pass: the first {limit * dm.d_model * 2 / 1e9:.1f} GB of an epoch")
        how = evict(path)
        n, seconds = sequential(path, dm.train_plan.key, blocks, limit)
        seq = n / seconds
        print(f"page cache emptied before each pass by {how}")
        print(f"sequential      : {seq:12,.0f} v/s ({seq * gbps:5.2f} GB/s), {seconds:.0f} s")
        for workers in args.workers:
            dm_w = datamodule(path, workers, args.batch, args.buffer, str(folder))
            evict(path)
            base_private, base_mapped = pss()  # the interpreter, torch, h5py: before the loader
            with PeakMemory() as peak:
                total, timed, seconds = one_epoch(dm_w, limit)
            assert total >= limit
            rate = timed / seconds
            # Per stream: 8 bytes per buffered vector (the mapped buffer keeps positions), and
            # a ring of RING_SIZE output pieces.
            buffered = args.buffer + int(dm.train_plan.block_rows().max())
            bound = max(1, workers) * (buffered * 8 + RING_SIZE * PIECE_BYTES)
            print(
                f"shuffled ({workers} w) : {rate:12,.0f} v/s ({rate * gbps:5.2f} GB/s) ratio "
                f"{rate / seq:.2f}; memory above the {base_private / 2**30:.2f} GiB before the "
                f"loader: private+shared {(peak.private - base_private) / 2**30:.2f} GiB (the "
                f"configured buffers and rings: {bound / 2**30:.2f} GiB), mapped "
                f"{(peak.mapped - base_mapped) / 2**30:.2f} GiB (store page cache)"
            )
    finally:
        if not args.keep:
            shutil.rmtree(folder)


def one_epoch(dm, limit: float = math.inf) -> tuple[int, int, float]:
    """The training loader's first epoch (up to `limit` vectors), timed from its first batch:
    (vectors, vectors timed, seconds)."""
    from traitsae.data.stream import ActivationStream

    stream = ActivationStream(dm.train_plan, dm.batch_size, dm.buffer_vectors, dm.seed, epochs=1)
    total, first, last = 0, None, 0.0
    for batch in dm.loader(stream):
        total += batch.shape[0]
        last = time.perf_counter()
        first = first or (total, last)
        if total >= limit:
            break
    return total, total - first[0], last - first[1]


def datamodule(path: Path, workers: int, batch: int, buffer: int, tmp: str):
    from traitsae.data.datamodule import ActivationsDataModule

    dm = ActivationsDataModule(
        activations_dir=tmp, backbone="bench", dataset="bench", split="train", store=str(path),
        layer=-1, tokens="patches", batch_size=batch, num_workers=workers,
        buffer_vectors=buffer, val_fraction=0.0, val_batch_size=None, scale_sample=1024, seed=0,
        allow_incomplete=False, block_images=None,
    )  # fmt: skip
    dm.prepare()
    return dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--patches", type=int, default=196)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--buffer", type=int, default=131072, help="shuffle buffer (vectors)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="loader epochs per repetition")
    parser.add_argument("--out-of-core", action="store_true", help="a store of 1.5x RAM, cold")
    parser.add_argument("--dir", type=Path, default=None, help="where the big store goes")
    parser.add_argument("--keep", action="store_true", help="keep the big store afterwards")
    parser.add_argument("--limit-gb", type=float, default=6.0, help="GB read a pass (cold)")
    parser.add_argument(
        "--foreground", type=float, default=None,
        help="also time data.tokens=foreground, flags covering this fraction of each image",
    )  # fmt: skip
    args = parser.parse_args()
    if args.out_of_core:
        if args.workers == [2]:
            args.workers = [0, 1, 2]
        return out_of_core(args)

    from traitsae.data.datamodule import ActivationsDataModule

    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or make_store(
            Path(tmp) / "bench.h5", args.images, args.patches, args.d_model, args.foreground
        )
        variants = [(w, t) for w in args.workers for t in ("patches", "foreground")]
        variants = [v for v in variants if args.foreground is not None or v[1] == "patches"]
        dms = {
            (w, tokens): ActivationsDataModule(
                activations_dir=tmp,
                backbone="bench",
                dataset="bench",
                split="train",
                store=str(path),
                layer=-1,
                tokens=tokens,
                batch_size=args.batch,
                num_workers=w,
                buffer_vectors=args.buffer,
                val_fraction=0.0,
                val_batch_size=None,
                scale_sample=1024,
                seed=0,
                allow_incomplete=False,
                block_images=None,
            )  # fmt: skip
            for w, tokens in variants
        }
        for dm in dms.values():
            dm.prepare()
        dm = dms[args.workers[0], "patches"]
        blocks = sorted(dm.train_plan.blocks)
        size_gb = dm.n_train_vectors * dm.d_model * 2 / 1e9
        sequential(path, dm.train_plan.key, blocks)  # warm the page cache
        seq: list[float] = []
        shuf: dict[tuple[int, str], list[float]] = {v: [] for v in dms}
        for _ in range(args.reps):  # interleaved so load drifts hit every variant alike
            n_seq, t_seq = sequential(path, dm.train_plan.key, blocks)
            assert n_seq == dm.n_train_vectors
            seq.append(n_seq / t_seq)
            for v, dm_v in dms.items():
                total, n_shuf, t_shuf = shuffled(dm_v, args.epochs)
                # every vector exactly once per epoch
                assert total == dm_v.n_train_vectors * args.epochs
                shuf[v].append(n_shuf / t_shuf)
        print(
            f"store: {dm.n_train_vectors:,} vectors x {dm.d_model} fp16 ({size_gb:.2f} GB), "
            f"{len(blocks)} blocks; shuffle buffer {args.buffer:,} vectors; {args.reps} reps"
        )
        gbps = dm.d_model * 2 / 1e9
        best_seq, median_seq = max(seq), float(np.median(seq))
        print(f"{'':15}  {'best of reps':>26}  {'median':>26}")
        print(f"sequential     : {best_seq:12,.0f} v/s ({best_seq * gbps:5.2f} GB/s)        "
              f"{median_seq:12,.0f} v/s ({median_seq * gbps:5.2f} GB/s)")  # fmt: skip
        for (w, tokens), rates in shuf.items():
            best, median = max(rates), float(np.median(rates))
            if tokens == "patches":
                target = "  (target >= 0.8 at 2 workers)" if w == 2 else ""
                print(
                    f"shuffled ({w} w) : {best:12,.0f} v/s ratio {best / best_seq:.2f}          "
                    f"{median:12,.0f} v/s ratio {median / median_seq:.2f}{target}"
                )
                continue
            all_rates = shuf[w, "patches"]
            share = dms[w, tokens].n_train_vectors / dm.n_train_vectors
            print(
                f"foreground ({w} w, {share:.0%} of the vectors): {best:12,.0f} v/s, "
                f"{best / max(all_rates):.2f} x all patches (best); "
                f"{median / float(np.median(all_rates)):.2f} x (median)  (target >= 0.9)"
            )


if __name__ == "__main__":
    main()
