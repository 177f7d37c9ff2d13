"""The explorer on a store of >= 1 M patches: how long it takes to open and to answer.

    .venv/bin/python benchmarks/explore.py [--images 4096 --grid 16 --d-model 64 --d-sae 16384]

Writes (once, into --workdir) a random float16 store (default 4096 images x 256 patches =
1,048,576 patches), a random TopK SAE with 16,384 latents and one small PNG per image, then makes
the sparse codes with the real eval=encode writer. A random SAE on random activations fires
uniformly, the worst case for the image-level index (every latent on about half of the images).

Timed, in this one process, with Streamlit's AppTest driving the real app script:
- building the cached index from the codes (first launch only);
- opening the app once codes and index exist (first script run: loads codes, table, page);
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


def prepare(workdir: Path, args: argparse.Namespace):
    """Store, SAE, images and codes in `workdir` (reused when present); returns the Session."""
    from traitsae.data.store import Store
    from traitsae.evaluation.encode import write_sparse_codes
    from traitsae.explore.session import Session
    from traitsae.sae.export import load_sae

    store_path, run_dir = workdir / "bench.h5", workdir / "sae"
    codes, cache = workdir / "codes.h5", workdir / "cache"
    if not codes.exists():
        bench = discovery_benchmark()
        bench.make_store(store_path, args.images, args.grid, args.d_model)
        bench.make_sae(run_dir, args.d_model, args.d_sae, args.k)
        write_images(workdir / "images", args.images, args.grid * 8)
        start = time.perf_counter()
        with Store(store_path) as store:
            write_sparse_codes(store, load_sae(run_dir), codes)
        print(f"codes made once (eval=encode's writer): {time.perf_counter() - start:.1f} s")
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

    os.environ[SESSION_ENV] = str(path)
    at = AppTest.from_file(str(APP), default_timeout=600)
    results: list[tuple[str, float]] = []
    print("app (AppTest, the real script):")
    timed("open: first page once codes and index exist", at.run, results)
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
    for row in (17, 2049):
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
