"""The explorer on a store of >= 1 M patches: how long it takes to open and to answer.

    .venv/bin/python benchmarks/explore.py [--images 4096 --grid 16 --d-model 64 --d-sae 16384]

Writes (once, into --workdir) a random float16 store (default 4096 images x 256 patches =
1,048,576 patches), a random TopK SAE with 16,384 latents, one small PNG per image, and a
codes.h5 in eval=encode's format whose k=32 latents per patch are drawn with Zipf-distributed
frequencies (real SAEs span decades of firing frequency; a random SAE on random data fires
uniformly, and encoding 1 M patches x 16,384 latents takes tens of minutes on 2 shared cores,
which is eval=encode's cost, not the explorer's). The Image page's reconstruction error still
runs the real SAE on the store.

Timed, in this one process, with Streamlit's AppTest driving the real app script:
- building the cached index from the codes (first launch only);
- opening the app once codes and index exist: the server process's preload (imports of the
  pages' libraries, codes into memory; before the URL is announced), then the first page view;
- interactions: choosing latents (gallery of 16 heat-maps + histogram), sorting and filtering
  the table, switching to the Image page and picking images and regions, a search by example;
- Compare groups (a full discovery ranking of two groups, an analysis rather than a click).
Targets (issue 11): open < 15 s once codes exist, each interaction < 1 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "src" / "traitsae" / "explore" / "app.py"


def discovery_benchmark():
    """benchmarks/discovery.py, for its store and SAE makers (same random data)."""
    spec = importlib.util.spec_from_file_location("bench_discovery", HERE / "discovery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_images(root: Path, n_images: int, size: int) -> None:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        pixels = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((size, size)).save(root / f"img_{i}.png")


def write_codes(path: Path, store_path: Path, run_dir: Path, d_sae: int, k: int) -> None:
    """codes.h5 as eval=encode writes it, with k Zipf-drawn distinct latents per patch."""
    import h5py

    from traitsae.data.store import Store
    from traitsae.evaluation import encode
    from traitsae.sae.export import load_sae

    rng = np.random.default_rng(0)
    with Store(store_path) as store, h5py.File(path, "w") as f:
        meta = store.metadata
        valid_N = np.asarray(meta["valid"], dtype=bool)
        encode._write_header(f, store, load_sae(run_dir), meta, valid_N, str(run_dir))
        n_rows = int(valid_N.sum()) * store.n_patches
        p_S = 1.0 / np.arange(1, d_sae + 1) ** 1.1
        latent_RK = np.sort(
            rng.choice(d_sae, size=(n_rows, k), p=p_S / p_S.sum()).astype(np.int32), axis=1
        )
        keep_RK = np.ones_like(latent_RK, dtype=bool)
        keep_RK[:, 1:] = latent_RK[:, 1:] != latent_RK[:, :-1]  # a latent once per patch
        indptr = np.concatenate([[0], np.cumsum(keep_RK.sum(axis=1))])
        values = rng.exponential(1.0, int(indptr[-1])).astype(np.float16) + np.float16(0.01)
        patch_R = np.tile(np.arange(store.n_patches), n_rows // store.n_patches)
        columns = {
            "rows/image": np.repeat(np.flatnonzero(valid_N), store.n_patches),
            "rows/patch": patch_R.astype(np.int32),
            "rows/row": (patch_R // store.grid[1]).astype(np.int16),
            "rows/col": (patch_R % store.grid[1]).astype(np.int16),
        }
        for name, values_R in columns.items():
            del f[name]
            f.create_dataset(name, data=values_R)
        f.create_dataset("codes/indptr", data=indptr.astype(np.int64))
        f.create_dataset("codes/indices", data=latent_RK[keep_RK])
        f.create_dataset("codes/values", data=values)
        f.attrs["grid"] = [int(g) for g in store.grid]
        f.attrs["complete"] = True


def prepare(workdir: Path, args: argparse.Namespace):
    """Store, SAE, images and codes in `workdir` (reused when present); returns the Session."""
    from traitsae.explore.session import Session

    store_path, run_dir = workdir / "bench.h5", workdir / "sae"
    codes, cache = workdir / "codes.h5", workdir / "cache"
    if not codes.exists():
        bench = discovery_benchmark()
        bench.make_store(store_path, args.images, args.grid, args.d_model)
        bench.make_sae(run_dir, args.d_model, args.d_sae, args.k)
        write_images(workdir / "images", args.images, args.grid * 8)
        write_codes(codes, store_path, run_dir, args.d_sae, args.k)
    return Session(
        sae=str(run_dir),
        store=str(store_path),
        codes=str(codes),
        cache_dir=str(cache),
        dataset="bench",
        split="test",
        image_root=str(workdir / "images"),
        resize_mode="stretch",
        contrast={"group_a": {"species": "erato"}, "group_b": {"species": "melpomene"}},
    )


def timed(label: str, action, results: list) -> None:
    start = time.perf_counter()
    at = action()
    seconds = time.perf_counter() - start
    assert not at.exception and not at.error, (label, at.exception, [e.value for e in at.error])
    results.append((label, seconds))
    print(f"  {label:<52} {seconds:6.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=16, help="patch grid side (P = grid^2)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "traitsae_bench_explore"
    )
    args = parser.parse_args()
    print(platform.processor() or "", subprocess.getoutput("lscpu | grep 'Model name'"))
    print("load:", subprocess.getoutput("uptime"))

    start = time.perf_counter()
    import streamlit  # noqa: F401
    import torch

    from traitsae.explore.data import Codes, load_or_build_index
    from traitsae.explore.session import SESSION_ENV

    print(f"imports (streamlit, torch, traitsae): {time.perf_counter() - start:.1f} s")
    torch.set_flush_denormal(True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    session = prepare(args.workdir, args)
    path = session.save(args.workdir / "session.json")
    n_patches = args.images * args.grid**2
    print(
        f"store: {args.images} images x {args.grid**2} patches = {n_patches:,} patches, "
        f"d_model {args.d_model}; SAE: TopK d_sae {args.d_sae}, k {args.k}; codes "
        f"{os.path.getsize(session.codes) / 2**20:.0f} MiB"
    )

    shutil.rmtree(Path(session.cache_dir) / "index", ignore_errors=True)
    start = time.perf_counter()
    index = load_or_build_index(Path(session.cache_dir), Codes(Path(session.codes)))
    print(
        f"index built once (first launch): {time.perf_counter() - start:.1f} s, "
        f"{len(index.img_score):,} image-level entries"
    )
    del index

    from streamlit.testing.v1 import AppTest

    from traitsae.explore.server import preload

    start = time.perf_counter()
    preload(str(path))
    print(
        f"server start once codes and index exist (page imports, codes, table inputs): "
        f"{time.perf_counter() - start:.1f} s"
    )
    os.environ[SESSION_ENV] = str(path)
    at = AppTest.from_file(str(APP), default_timeout=600)
    results: list[tuple[str, float]] = []
    print("app (AppTest, the real script):")
    timed("open: first page view", at.run, results)
    table = at.dataframe(key="latent_table").value
    alive = table[table.patch_freq > 0].latent.to_numpy()
    for latent in alive[:3]:
        timed(
            f"Latents: choose latent {latent} (16 heat-maps)",
            at.number_input(key="latent").set_value(int(latent)).run,
            results,
        )
    timed(
        "Latents: sort by label entropy",
        at.selectbox(key="sort_by").set_value("label_entropy").run,
        results,
    )
    timed("Latents: hide dead latents", at.checkbox(key="hide_dead").check().run, results)
    lo, hi = at.slider(key="window_log10_freq").value
    timed(
        "Latents: log-frequency window",
        at.slider(key="window_log10_freq").set_value((lo, (lo + hi) / 2)).run,
        results,
    )
    timed("Image: open the page", at.sidebar.radio(key="page").set_value("Image").run, results)
    for row in (17, 1999):  # the select box lists the first 2000 matches
        timed(f"Image: pick image {row}", at.selectbox(key="image_row").set_value(row).run, results)
    timed("Image: choose a region", at.slider(key="region_rows").set_value((4, 8)).run, results)
    timed(
        "Search: open the page",
        at.sidebar.radio(key="page").set_value("Search by example").run,
        results,
    )
    at.multiselect(key="pos_rows").set_value([0, 2, 4, 6, 8])
    timed(
        "Search: 5 positives vs 5 negatives",
        at.multiselect(key="neg_rows").set_value([1, 3, 5, 7, 9]).run,
        results,
    )
    clicks = [s for label, s in results[1:]]
    print(
        f"interactions: median {np.median(clicks):.2f} s, max {max(clicks):.2f} s "
        f"({sum(s < 1 for s in clicks)}/{len(clicks)} under 1 s)"
    )
    compare = []
    timed(
        f"Compare groups: discovery ranking, {args.images} images (analysis)",
        at.sidebar.radio(key="page").set_value("Compare groups").run,
        compare,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.1f} GiB; load after: {subprocess.getoutput('uptime')}")


if __name__ == "__main__":
    main()
