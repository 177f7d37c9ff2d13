"""The explorer on a store of >= 1 M patches: how long it takes to open and to answer.

    .venv/bin/python benchmarks/explore.py [--images 4096 --grid 16 --d-model 64 --d-sae 16384]

Writes (once, into --workdir) a random float16 store (default 4096 images x 256 patches =
1,048,576 patches), a random TopK SAE with 16,384 latents, one small PNG per image, and a
codes.h5 in eval=encode's format whose k=32 latents per patch are drawn with Zipf-distributed
frequencies (real SAEs span decades of firing frequency; a random SAE on random data fires
uniformly, and encoding 1 M patches x 16,384 latents takes tens of minutes on 2 shared cores,
which is eval=encode's cost, not the explorer's). The Image page's reconstruction error still
runs the real SAE on the store.

Timed (wall and CPU = process time, since the machine is shared: a wall figure far above its
CPU figure is time spent waiting for a core):
- building the cached index from the codes and framing the first page's pictures (first launch
  only; explore.py does both in the terminal before serving);
- the real server process (`python -m traitsae.explore.server`, what explore.py starts) until
  Streamlit answers its health check: its imports and preload, once codes and index exist;
- in a second fresh process, with Streamlit's AppTest driving the real app script: imports,
  preload, the first page view, then (after the background warm-up that loads torch and the SAE
  has finished, timed too) the interactions: choosing latents (gallery of 16 heat-maps +
  histogram) in the number box and by a click on the density scatter, sorting and filtering
  the table, the Image page (pick images, choose patches by a box and one by one), a search by
  example with three galleries;
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
import sys
import tempfile
import threading
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
    from traitsae.evaluation.core import codes
    from traitsae.sae.export import load_sae

    rng = np.random.default_rng(0)
    with Store(store_path) as store, h5py.File(path, "w") as f:
        meta = store.metadata
        valid_N = np.asarray(meta["valid"], dtype=bool)
        codes._write_header(f, store, load_sae(run_dir), meta, valid_N, str(run_dir))
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


def make_inputs(workdir: Path, args: argparse.Namespace) -> None:
    """Store, SAE, images and codes in `workdir` (reused when present)."""
    if not (workdir / "codes.h5").exists():
        bench = discovery_benchmark()
        bench.make_store(workdir / "bench.h5", args.images, args.grid, args.d_model)
        bench.make_sae(workdir / "sae", args.d_model, args.d_sae, args.k)
        write_images(workdir / "images", args.images, args.grid * 8)
        write_codes(workdir / "codes.h5", workdir / "bench.h5", workdir / "sae", args.d_sae, args.k)


class Clock:
    """Wall and CPU (this process's time on all its threads) since the last lap."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        spent = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return spent


def report(label: str, wall: float, cpu: float) -> None:
    print(f"  {label:<58} {wall:6.2f} s wall {cpu:6.2f} s CPU", flush=True)


def timed(label: str, action, results: list) -> None:
    clock = Clock()
    at = action()
    wall, cpu = clock.lap()
    assert not at.exception and not at.error, (label, at.exception, [e.value for e in at.error])
    results.append((label, wall, cpu))
    report(label, wall, cpu)


def load() -> str:
    return subprocess.getoutput("uptime").split("load average:")[-1].strip()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process and of its live children (the Streamlit server)."""
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in (pid, *map(int, children)):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def launch(workdir: Path, label: str) -> Path:
    """`python explore.py` on the benchmark store until it prints the URL (the server answers).

    The store is linked where explore.py looks for it (dataset=synthetic, backbone bench); the
    codes are passed with explore.codes. Returns the session.json explore.py wrote.
    """
    from explore_helpers import ServedSession

    from traitsae.explore.session import free_port

    port = free_port()
    link = workdir / "activations" / "synthetic" / "test" / "bench.h5"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(workdir / "bench.h5")
    run_dir = workdir / "explore_run"
    command = [
        sys.executable,
        str(HERE.parent / "explore.py"),
        f"run={workdir / 'sae'}",
        f"paths.activations_dir={workdir / 'activations'}",
        f"explore.codes={workdir / 'codes.h5'}",
        f"explore.image_root={workdir / 'images'}",
        "explore.resize_mode=stretch",
        f"explore.port={port}",
        "explore.browser=false",
        "dataset.contrast.group_a={species: erato}",
        "dataset.contrast.group_b={species: melpomene}",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
    )
    try:
        for line in proc.stdout:
            if line.startswith("traitsae explorer at"):
                wall, cpu = time.perf_counter() - start, cpu_seconds(proc.pid)
                report(f"{label}: URL printed", wall, cpu)
                session = ServedSession(port)
                images = sum(len(e.imgs.imgs) for e in session.run() if e.HasField("imgs"))
                shown, cpu_shown = time.perf_counter() - start, cpu_seconds(proc.pid)
                session.close()
                report(f"{label}: first page sent ({images} pictures; websocket)", shown, cpu_shown)
                break
        else:
            raise AssertionError(f"explore.py exited with status {proc.wait()}")
    finally:
        proc.terminate()  # serve() stops its Streamlit child on the way out
        proc.wait()
    return run_dir / "session.json"


def app_run(session_path: Path, n_images: int) -> None:
    """Fresh process: what the server process does (imports, preload), then the page views."""
    clock = Clock()
    from streamlit.testing.v1 import AppTest

    from traitsae.explore import server

    steps = [("imports (streamlit, the Latents page's libraries)", *clock.lap())]
    server.preload(str(session_path))
    steps.append(("preload (codes, indexes, latent table, first gallery)", *clock.lap()))
    torch_before = "torch" in sys.modules
    from explore_helpers import select_on_chart

    from traitsae.explore.draw import DENSITY_PICK, PATCH_BOX, PATCH_PICK
    from traitsae.explore.session import SESSION_ENV

    os.environ[SESSION_ENV] = str(session_path)
    at = AppTest.from_file(str(APP), default_timeout=600)
    # AppTest's first run scans every installed package for Streamlit components (~1 s); the
    # real server does that at its start, timed above. Do it here on an empty script.
    empty = AppTest.from_string("").run()
    at._bidi_component_manager = empty._bidi_component_manager
    clock.lap()
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    steps.append(("first page view (Latents, gallery of 16)", *clock.lap()))
    for step in steps:
        report(*step)
    _, walls, cpus = zip(*steps, strict=True)
    report(f"open (sum; torch imported before the view: {torch_before})", sum(walls), sum(cpus))
    for thread in threading.enumerate():
        if thread.name == "explore-warm-up":
            thread.join()
    report("background warm-up (a pause, then torch, SAE, other pages)", *clock.lap())

    results: list = []
    table = at.dataframe(key="latent_table").value
    alive = table[table["patches firing"] > 0].latent.to_numpy()
    for latent in alive[1:4]:
        timed(
            f"Latents: choose latent {latent} (16 heat-maps)",
            at.number_input(key="latent").set_value(int(latent)).run,
            results,
        )
    timed(
        f"Latents: click latent {alive[10]} on the density scatter",
        lambda: select_on_chart(at, "density", {DENSITY_PICK: [{"latent": int(alive[10])}]}),
        results,
    )
    timed(
        "Latents: sort by label mix",
        at.selectbox(key="sort_by").set_value("label mix (bits)").run,
        results,
    )
    timed(
        "Latents: lower-activation band",
        at.radio(key="band").set_value("middle").run,
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
    box = {PATCH_BOX: {"col": [4, 8], "row": [4, 8]}}
    timed(
        "Image: choose a 4x4 box of patches",
        lambda: select_on_chart(at, "patch_grid_1999", box),
        results,
    )
    picks = {PATCH_PICK: [{"patch": p} for p in (3, 40, 200)]}
    timed(
        "Image: click 3 patches one by one",
        lambda: select_on_chart(at, "patch_grid_1999", picks),
        results,
    )
    timed(
        "Search: open the page",
        at.sidebar.radio(key="page").set_value("Search by example").run,
        results,
    )
    at.multiselect(key="pos_rows").set_value([0, 2, 4, 6, 8])
    timed(
        "Search: 5 positives vs 5 negatives (3 galleries of 8)",
        at.multiselect(key="neg_rows").set_value([1, 3, 5, 7, 9]).run,
        results,
    )
    walls = [wall for _, wall, _ in results]
    cpus = [cpu for _, _, cpu in results]
    print(
        f"interactions: median {np.median(walls):.2f} s wall / {np.median(cpus):.2f} s CPU, "
        f"max {max(walls):.2f} s wall / {max(cpus):.2f} s CPU "
        f"({sum(w < 1 for w in walls)}/{len(walls)} under 1 s wall)"
    )
    compare: list = []
    timed(
        f"Compare groups: discovery ranking, {n_images} images (analysis)",
        at.sidebar.radio(key="page").set_value("Compare groups").run,
        compare,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of the app process {peak:.1f} GiB")


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
    parser.add_argument("--app-run", action="store_true", help=argparse.SUPPRESS)  # the child
    parser.add_argument("--session", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))  # explore_helpers: AppTest and websocket drivers
    if args.app_run:
        app_run(args.session, args.images)
        return
    print(platform.processor() or "", subprocess.getoutput("lscpu | grep 'Model name'"))
    print("load average (1, 5, 15 min):", load())

    args.workdir.mkdir(parents=True, exist_ok=True)
    make_inputs(args.workdir, args)
    n_patches = args.images * args.grid**2
    print(
        f"store: {args.images} images x {args.grid**2} patches = {n_patches:,} patches, "
        f"d_model {args.d_model}; SAE: TopK d_sae {args.d_sae}, k {args.k}; codes "
        f"{os.path.getsize(args.workdir / 'codes.h5') / 2**20:.0f} MiB"
    )
    shutil.rmtree(args.workdir / "explore_run", ignore_errors=True)
    print(
        f"python explore.py until it prints the URL (wall; CPU of it and its server); load {load()}"
    )
    launch(args.workdir, "first launch")  # + index build, first pictures framed
    path = launch(args.workdir, "later launch")  # codes, index, pictures cached
    print("the app in a fresh process (Streamlit AppTest), as the server process runs it:")
    command = [sys.executable, __file__, "--app-run", "--workdir", str(args.workdir)]
    subprocess.run([*command, "--images", str(args.images), "--session", str(path)], check=True)
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
