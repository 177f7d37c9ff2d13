"""Extraction throughput vs a bare backbone forward loop over the same decoded batches.

    .venv/bin/python benchmarks/extract.py                       # tiny and random dinov2_small
    .venv/bin/python benchmarks/extract.py --backbone tiny --images 2048

Both loops see identical, already decoded batches in memory, so the ratio isolates what
extraction adds on top of the forward pass: float16 range checks, device->host copies, the writer
thread and the HDF5 writes (target: ratio >= 0.9). Runs alternate (bare, extraction, bare, ...);
the ratio uses the fastest run of each (as timeit does: other processes on the shared cores only
ever slow a run down), the median ratio is printed too. End-to-end throughput with DataLoader
decoding is printed for information.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from traitsae.backbones import build_backbone  # noqa: E402
from traitsae.data.images import ImageDataset, load_image_list  # noqa: E402
from traitsae.data.store import StoreWriter  # noqa: E402
from traitsae.extraction import AsyncWriter, encode_batch, extract, image_rows, make_job  # noqa: E402
from traitsae.paths import store_path_from_cfg  # noqa: E402

DEFAULTS = {"tiny": (4096, 64), "dinov2_small": (96, 16)}  # images, batch size


def compose_cfg(backbone: str, tmp: Path, batch_size: int, precision: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(
            config_name="extract",
            overrides=[
                f"backbone={backbone}",
                "backbone.pretrained=false",  # random weights: same compute, no download
                f"paths.root_dir={tmp}",
                f"extract.batch_size={batch_size}",
                f"extract.precision={precision}",
                "extract.progress=false",
                "extract.num_workers=1",
            ],
        )
    return cfg


def decoded_batches(cfg, backbone, n_images: int) -> tuple[list[dict], list[str]]:
    """`n_images` images (the demo images, cycled), decoded once and kept in memory."""
    images = load_image_list(cfg.dataset, cfg.split)
    paths = [images.paths[i % len(images)] for i in range(n_images)]
    dataset = ImageDataset(paths, backbone.transform, backbone.geometry.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(cfg.extract.batch_size))
    return list(loader), paths


def time_bare(backbone, batches) -> tuple[float, float]:
    """(wall, process CPU) seconds of a forward loop whose outputs are dropped."""
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        backbone(batch["image"])
    return time.perf_counter() - start, time.process_time() - cpu


def time_extraction(cfg, backbone, batches, n_images: int, out: Path) -> tuple[float, float]:
    """The extraction path (encode_batch + writer thread + HDF5) over the same batches."""
    images = load_image_list(cfg.dataset, cfg.split)
    images.paths = [images.paths[i % len(images)] for i in range(n_images)]
    images.labels = images.labels[[i % len(images.labels) for i in range(n_images)]]
    images.metadata = {}
    job = make_job(cfg, images, out, 0, n_images)
    if out.exists():
        out.unlink()
    writer = StoreWriter.open(
        out, attrs=job.attrs, images=image_rows(images, 0, n_images),
        fingerprint=job.fingerprint, overwrite=True,
    )  # fmt: skip
    dataset = ImageDataset(images.paths, backbone.transform, backbone.geometry.image_size)
    device = torch.device("cpu")
    start, cpu = time.perf_counter(), time.process_time()
    with AsyncWriter(writer, int(cfg.extract.write_queue)) as sink:
        for batch in batches:
            sink.put(encode_batch(cfg, backbone, batch, dataset, device))
    writer.finish()
    return time.perf_counter() - start, time.process_time() - cpu


def bench(name: str, n_images: int, batch_size: int, repeats: int, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(name, Path(tmp), batch_size, precision)
        backbone = build_backbone(cfg.backbone)
        batches, _ = decoded_batches(cfg, backbone, n_images)
        time_bare(backbone, batches[:2])  # warm-up
        time_extraction(
            cfg,
            backbone,
            batches[:2],
            len(batches[0]["index"]) * min(2, len(batches)),
            Path(tmp) / "w.h5",
        )
        bare, full = [], []
        for r in range(repeats):
            bare.append(time_bare(backbone, batches))
            full.append(time_extraction(cfg, backbone, batches, n_images, Path(tmp) / f"b{r}.h5"))
        with open_dict(cfg):
            cfg.dataset.name = "bench"  # end to end on the demo split, with DataLoader decoding
        start = time.perf_counter()
        extract(cfg)
        n_split = len(load_image_list(cfg.dataset, cfg.split))
        e2e = n_split / (time.perf_counter() - start)
        size = store_path_from_cfg(cfg).stat().st_size
    bare_wall, bare_cpu = zip(*bare, strict=True)
    full_wall, full_cpu = zip(*full, strict=True)
    bare_ips, full_ips = n_images / min(bare_wall), n_images / min(full_wall)
    median_ratio = statistics.median(b / f for b, f in zip(bare_wall, full_wall, strict=True))
    # CPU seconds are far less sensitive to other processes than wall time on shared cores.
    cpu_ratio = statistics.median(bare_cpu) / statistics.median(full_cpu)
    return {
        "backbone": name, "precision": precision, "images": n_images, "batch_size": batch_size,
        "bare_img_per_s": round(bare_ips, 1), "extraction_img_per_s": round(full_ips, 1),
        "ratio": round(full_ips / bare_ips, 3), "median_paired_ratio": round(median_ratio, 3),
        "cpu_time_ratio": round(cpu_ratio, 3),
        "runs_bare_s": [round(t, 3) for t in bare_wall],
        "runs_extraction_s": [round(t, 3) for t in full_wall],
        "end_to_end_img_per_s_with_decoding": round(e2e, 1), "demo_store_bytes": size,
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--backbone", action="append", choices=sorted(DEFAULTS))
    parser.add_argument("--images", type=int, help="images per timed run (default per backbone)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    args = parser.parse_args()
    for name in args.backbone or list(DEFAULTS):
        n_images, batch_size = DEFAULTS[name]
        result = bench(
            name,
            args.images or n_images,
            args.batch_size or batch_size,
            args.repeats,
            args.precision,
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
