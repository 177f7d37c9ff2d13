"""`eval=features`: galleries of latents (top images with patch heat-maps) and firing statistics.

    python evaluate.py eval=features run=<run dir>                      # alive latents, sampled
    python evaluate.py eval=features run=<run dir> eval.latents=[3,17]  # chosen latents
    python evaluate.py eval=features run=<run dir> eval.min_freq=1e-3 eval.max_freq=1e-2

One streaming pass over the store keeps, for every latent, firing counts and a running top-k of
(image score, image row) — memory O(k x d_sae), never the n_images x d_sae matrix. The heat-maps
of the few selected latents' top images are then re-encoded row by row for the figures.
Per latent, its top-k images also give the two axes of the CLIP-SAE write-up's density figure:
the mean score of the top images and the *label entropy* of their class labels (each image
weighted by its score; bits, 0 = all top images of one class). Outputs: features.json,
latents.csv (every latent), frequency.png, density.png, galleries/*.png, index.html.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import figures
from traitsae.evaluation.core.figures import plt
from traitsae.evaluation.core.firing import (
    FiringStats,
    RunningTopK,
    density_figure,
    scan,
)
from traitsae.evaluation.core.foreground import select_patches
from traitsae.evaluation.core.frames import ImageOptions, ImageSource, image_source
from traitsae.evaluation.core.labels import caption_column, image_labels, top_image_summary
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.outputs import write_csv, write_figure, write_json
from traitsae.evaluation.core.report import Card, write_report
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_store, output_dir
from traitsae.evaluation.core.tokens import gather_codes
from traitsae.sae.export import RawSpaceSAE

# Per-latent numbers of latents.csv (every latent) and of the index page's table.
LATENT_COLUMNS = (
    "latent",
    "patch_freq",
    "image_freq",
    "mean_image_score",
    "max_score",
    "mean_top_score",
    "label_entropy",
)


def select_latents(
    stats: FiringStats,
    latents: list[int] | None,
    min_freq: float,
    max_freq: float,
    max_latents: int,
    seed: int,
) -> np.ndarray:
    """Chosen latents as given, else a seeded sample of the latents firing within the range."""
    d_sae = len(stats.patch_fires_S)
    if latents:
        chosen = np.asarray(list(latents), dtype=np.int64)
        bad = chosen[(chosen < 0) | (chosen >= d_sae)]
        if len(bad):
            raise TraitsaeError(
                f"eval.latents has {bad.tolist()} outside the SAE's latents 0..{d_sae - 1}."
            )
        return chosen
    freq_S = stats.patch_freq
    in_range = np.flatnonzero((freq_S > 0) & (freq_S >= min_freq) & (freq_S <= max_freq))
    if len(in_range) > max_latents:
        in_range = np.sort(np.random.default_rng(seed).choice(in_range, max_latents, replace=False))
    return in_range


def frequency_histogram(stats: FiringStats, out_path: Path) -> Path:
    """log10 patch firing frequency of the alive latents; dead/dense counts in the title."""
    freq_S = stats.patch_freq
    alive = freq_S[freq_S > 0]
    fig, ax = plt.subplots(figsize=(5, 3))
    if len(alive):
        ax.hist(np.log10(alive), bins=40, color="#3465a4")
    ax.set_xlabel("log10 firing frequency (fraction of patches)")
    ax.set_ylabel("latents")
    ax.set_title(
        f"{len(alive)} alive, {int((freq_S == 0).sum())} dead, "
        f"{int((freq_S > 1e-2).sum())} with freq > 1e-2",
        fontsize=9,
    )
    fig.tight_layout()
    write_figure(fig, out_path, dpi=90)
    plt.close(fig)
    return out_path


def gallery_figure(
    latent: int,
    rows: np.ndarray,
    values: np.ndarray,
    codes: dict[int, np.ndarray],
    column: int,
    grid: tuple[int, int],
    metadata: Mapping[str, np.ndarray],
    images: ImageSource,
    out_path: Path,
    per_row: int = 8,
) -> Path:
    """The latent's top images, heat-maps overlaid, captioned with label, row and score."""
    label = caption_column(metadata)
    panels = [
        figures.Panel(
            images.load(str(metadata["path"][r])),
            codes[int(r)][:, column].reshape(grid),
            f"{metadata[label][r] + ' ' if label else ''}#{int(r)} max={v:.2f}",
        )
        for r, v in zip(rows, values, strict=True)
    ]
    lines = [("", panels[i : i + per_row]) for i in range(0, max(1, len(panels)), per_row)]
    return figures.plot_panel_rows(lines, out_path, f"latent {latent}: top {len(panels)} images")


def write_latents_csv(
    path: Path, stats: FiringStats, mean_top_S: np.ndarray, entropy_S: np.ndarray
) -> None:
    rows = [
        [
            s,
            f"{stats.patch_freq[s]:.6g}",
            f"{stats.image_freq[s]:.6g}",
            f"{stats.mean_image_max[s]:.6g}",
            f"{stats.image_max_S[s]:.6g}",
            f"{mean_top_S[s]:.6g}",
            f"{entropy_S[s]:.6g}",
        ]
        for s in range(len(stats.patch_fires_S))
    ]
    write_csv(path, LATENT_COLUMNS, rows)


def galleries(
    store: Store,
    sae: RawSpaceSAE,
    stats: FiringStats,
    topk: RunningTopK,
    chosen: np.ndarray,
    images: ImageSource,
    out: Path,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One PNG per chosen latent; returns their rows for features.json / index.html."""
    meta = store.metadata
    paths = np.asarray(meta["path"]).astype(str)
    grid = tuple(int(g) for g in store.grid)
    tops = {int(lat): topk.top(int(lat)) for lat in chosen}
    needed = np.concatenate([r for r, _ in tops.values()] or [np.zeros(0, np.int64)])
    codes = gather_codes(store, sae, needed, chosen, device)
    entries = []
    for column, latent in enumerate(
        tqdm([int(lat) for lat in chosen], desc="galleries", unit="latent", leave=False)
    ):
        rows, values = tops[latent]
        entry = {
            "latent": latent,
            "patch_freq": float(stats.patch_freq[latent]),
            "image_freq": float(stats.image_freq[latent]),
            "mean_image_score": float(stats.mean_image_max[latent]),
            "max_score": float(stats.image_max_S[latent]),
            "top_images": paths[rows].tolist(),
            "top_scores": values.tolist(),
            "figure": "",
        }
        if len(rows):
            rel = Path("galleries") / f"latent_{latent:05d}.png"
            gallery_figure(latent, rows, values, codes, column, grid, meta, images, out / rel)
            entry["figure"] = rel.as_posix()
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class FeaturesOptions(ImageOptions):
    """The `eval.*` options of conf/eval/features.yaml (defaults and meanings there)."""

    split: str
    latents: list[int] | None
    min_freq: float
    max_freq: float
    max_latents: int
    top_k: int
    pool: str
    patches: str
    batch_patches: int
    seed: int
    device: str


@dataclass
class FeaturesResult:
    """One scan of a store: firing statistics, top images, the chosen latents and their
    density-figure axes; nothing is written yet."""

    stats: FiringStats
    topk: RunningTopK
    chosen: np.ndarray  # latent ids to draw galleries of
    mean_top_S: np.ndarray  # [S] mean score of each latent's top images
    entropy_S: np.ndarray  # [S] label entropy (bits) of each latent's top images


def compute_features(store: Store, sae: RawSpaceSAE, opts: FeaturesOptions) -> FeaturesResult:
    select_patches(store, opts.patches, sae)  # eval.patches: pool over foreground patches?
    stats, topk = scan(
        store, sae, opts.top_k, batch_patches=opts.batch_patches, device=opts.device, pool=opts.pool
    )
    chosen = select_latents(
        stats,
        list(opts.latents) if opts.latents else None,
        opts.min_freq,
        opts.max_freq,
        opts.max_latents,
        opts.seed,
    )
    mean_top_S, entropy_S = top_image_summary(
        topk.values_KS.numpy().T, topk.rows_KS.numpy().T, image_labels(store.metadata)
    )
    return FeaturesResult(stats, topk, chosen, mean_top_S, entropy_S)


def write_features(
    out: Path, store: Store, sae: RawSpaceSAE, found: FeaturesResult, opts: FeaturesOptions
) -> dict[str, Any]:
    """Galleries, density and frequency figures, features.json, latents.csv, index.html."""
    stats = found.stats
    entries = galleries(
        store, sae, stats, found.topk, found.chosen, image_source(store, opts), out, opts.device
    )
    title = f"{stats.n_images} images"
    figures.save(
        density_figure(stats.patch_freq, found.mean_top_S, found.entropy_S, title),
        out / "density.png",
    )
    for entry in entries:
        entry["mean_top_score"] = float(found.mean_top_S[entry["latent"]])
        entry["label_entropy"] = float(found.entropy_S[entry["latent"]])
    result = {
        "n_images": stats.n_images,
        "n_patches": stats.n_patches,
        "patches": "all" if store.patch_mask is None else "foreground",
        "d_sae": len(stats.patch_fires_S),
        "n_dead": int((stats.patch_freq == 0).sum()),
        "n_dense": int((stats.patch_freq > 1e-2).sum()),
        "store": str(store.path),
        "latents": entries,
    }
    write_json(out / "features.json", result)
    write_latents_csv(out / "latents.csv", stats, found.mean_top_S, found.entropy_S)
    frequency_histogram(stats, out / "frequency.png")
    write_features_index(out, result)
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python evaluate.py eval=features run=<run dir>`."""
    opts = build_options(FeaturesOptions, cfg)
    sae = resolve_sae(cfg)
    sae.eval().to(opts.device)
    out = output_dir(cfg)
    with eval_store(cfg, sae, opts.split) as store:
        result = write_features(out, store, sae, compute_features(store, sae, opts), opts)
    print(
        f"{len(result['latents'])} latent galleries ({result['n_dead']} dead of "
        f"{result['d_sae']}): {out / 'index.html'}"
    )
    return result


def write_features_index(out: Path, result: dict[str, Any]) -> Path:
    columns = list(LATENT_COLUMNS)
    rows = [{**e, "anchor": f"latent-{e['latent']}"} for e in result["latents"]]
    cards = [
        Card(
            heading=f"latent {e['latent']}",
            anchor=f"latent-{e['latent']}",
            figure=out / e["figure"] if e["figure"] else None,
            numbers={k: e[k] for k in columns[1:]},
            note="" if e["figure"] else "never fires on this store",
        )
        for e in result["latents"]
    ]
    freq_card = Card(
        heading="firing frequency",
        anchor="frequency",
        figure=out / "frequency.png",
        numbers={"dead": result["n_dead"], "dense": result["n_dense"], "d_sae": result["d_sae"]},
    )
    density_card = Card(
        heading="density vs mean activation",
        anchor="density",
        figure=out / "density.png",
        numbers={},
        note="colour: label entropy (bits) of each latent's top images, weighted by score",
    )
    intro = (
        f"Top images per latent by image score on {result['n_images']} images "
        f"({result['n_patches']} patches), patch heat-maps overlaid. Every latent's numbers: "
        "latents.csv."
    )
    return write_report(
        out / "index.html",
        "Latent galleries",
        intro,
        [
            ("Firing frequency", [], [], [freq_card, density_card]),
            ("Latents", columns, rows, cards),
        ],
        link_column="latent",
    )
