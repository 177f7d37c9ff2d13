"""Fixtures for the discovery / features / encode / notebook tests.

`planted_store` writes a small store (through the real `create_store`) whose patch activations
carry known directions at known places:
- TRAIT_A (direction 0) on a 2x2 patch block of every group-A image ("alpha"),
- TRAIT_B (direction 1) on another block of every group-B image ("beta"),
- SHARED (direction 2) on a third block of every image of both groups,
over small Gaussian noise. `planted_sae` is a real SAE (`build_sae`) whose first latents read
exactly those directions, so the expected discovery result is known without training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

GRID = (8, 8)
D_MODEL = 16
IMAGE_SIZE = 64
TRAIT_A, TRAIT_B, SHARED = 0, 1, 2
# Top-left patch (row, col) of each planted 2x2 block.
BLOCKS = {TRAIT_A: (1, 5), TRAIT_B: (5, 5), SHARED: (5, 1)}


@dataclass
class PlantedStore:
    path: Path
    image_root: Path
    n_per_group: int


def block_mask(latent: int) -> np.ndarray:
    """[rows, cols] bool: where the direction of `latent` is planted."""
    mask = np.zeros(GRID, dtype=bool)
    r, c = BLOCKS[latent]
    mask[r : r + 2, c : c + 2] = True
    return mask


def planted_store(
    tmp_dir: Path,
    n_per_group: int = 24,
    seed: int = 0,
    *,
    backbone: str = "tiny",
    dataset: str = "synthetic",
    split: str = "test",
    layer: int = 3,
) -> PlantedStore:
    rng = np.random.default_rng(seed)
    n_images = 2 * n_per_group
    in_a_N = np.arange(n_images) < n_per_group
    members = {TRAIT_A: in_a_N, TRAIT_B: ~in_a_N, SHARED: np.ones_like(in_a_N)}
    image_root = tmp_dir / "images"
    paths = [write_image(image_root, i, in_a_N[i]) for i in range(n_images)]
    path = tmp_dir / "activations" / dataset / split / f"{backbone}.h5"
    write_planted(
        path,
        rng,
        members,
        {
            "path": np.array(paths),
            "label": in_a_N.astype(np.int64) ^ 1,
            "species": np.where(in_a_N, "001.Alpha", "002.Beta"),
            "image_id": np.array([str(i + 1) for i in range(n_images)]),
        },
        backbone=backbone,
        dataset=dataset,
        split=split,
        layers=(layer,),
    )
    return PlantedStore(path, image_root, n_per_group)


def write_planted(
    path: Path,
    rng: np.random.Generator,
    members: dict[int, np.ndarray],
    images: dict[str, np.ndarray],
    *,
    backbone: str = "tiny",
    dataset: str = "synthetic",
    split: str = "test",
    layers: tuple[int, ...] = (3,),
) -> None:
    """A store (the real `create_store`) whose images carry direction `latent` on its block
    wherever `members[latent]` (bool [N]) is true, over small Gaussian noise; the same
    activations at every layer of `layers`."""
    from traitsae.data.store import create_store

    n_images, n_patches = len(images["path"]), GRID[0] * GRID[1]
    acts_NPD = rng.normal(0, 0.1, (n_images, n_patches, D_MODEL)).astype(np.float32)
    for latent, members_N in members.items():
        patches = np.flatnonzero(block_mask(latent).ravel())
        strength_N = rng.uniform(2.0, 3.0, n_images)
        acts_NPD[np.ix_(members_N, patches, [latent])] += strength_N[members_N, None, None]
    create_store(
        path,
        patches={layer: acts_NPD for layer in layers},
        cls={layer: acts_NPD.mean(axis=1) for layer in layers},
        images=images,
        attrs={
            "backbone": backbone,
            "dataset": dataset,
            "split": split,
            "depth": max(layers) + 1,
            "grid": list(GRID),
            "image_size": IMAGE_SIZE,
        },
    )


# A small museum-like collection: subspecies -> (images, planted traits). Each subspecies is
# split over two collections (c1, c2) image by image.
COLLECTION = {
    "alpha": (16, (TRAIT_A,)),
    "beta": (16, (TRAIT_B,)),
    "gamma": (20, ()),
    "delta": (16, ()),
    "tiny": (3, ()),
}


def collection_store(
    tmp_dir: Path,
    groups: dict[str, tuple[int, tuple[int, ...]]] | None = None,
    seed: int = 0,
    *,
    layers: tuple[int, ...] = (3,),
) -> PlantedStore:
    """A store of several subspecies (`COLLECTION` by default), each image also in collection
    c1 or c2; SHARED on every image, the listed traits on every image of their subspecies."""
    groups = groups or COLLECTION
    subspecies = np.concatenate([[name] * n for name, (n, _) in groups.items()])
    n_images = len(subspecies)
    members = {
        latent: np.isin(subspecies, [g for g, (_, traits) in groups.items() if latent in traits])
        for latent in (TRAIT_A, TRAIT_B)
    }
    members[SHARED] = np.ones(n_images, dtype=bool)
    image_root = tmp_dir / "images"
    paths = [write_image(image_root, i, bool(members[TRAIT_A][i])) for i in range(n_images)]
    path = tmp_dir / "activations" / "synthetic" / "test" / "tiny.h5"
    write_planted(
        path,
        np.random.default_rng(seed),
        members,
        {
            "path": np.array(paths),
            "subspecies": subspecies,
            "collection": np.array([f"c{1 + i % 2}" for i in range(n_images)]),
            "image_id": np.array([str(i + 1) for i in range(n_images)]),
        },
        layers=layers,
    )
    return PlantedStore(path, image_root, 0)


def write_image(root: Path, i: int, in_a: bool) -> str:
    """A small PNG (relative path, as extraction stores them) tinted by group."""
    rel = Path("001.Alpha" if in_a else "002.Beta") / f"img_{i:03d}.png"
    pixels = np.full(
        (IMAGE_SIZE, IMAGE_SIZE, 3), (90, 140, 90) if in_a else (90, 90, 140), np.uint8
    )
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(root / rel)
    return rel.as_posix()


def planted_sae(
    run_dir: Path,
    store: PlantedStore,
    d_sae: int = 32,
    *,
    layer: int = 3,
    seed: int = 0,
    rows: dict[int, int] | None = None,
    backbone: str = "tiny",
    planted_decoder: bool = False,
) -> Path:
    """Export a real SAE whose latents `rows[direction]` (default: latents 0..2) read the
    planted directions (others: random, from `seed`). `planted_decoder`: their decoder rows
    are those directions too (what replication matches by)."""
    from traitsae.sae.export import save_sae
    from traitsae.sae.model import build_sae

    rows = rows or {TRAIT_A: TRAIT_A, TRAIT_B: TRAIT_B, SHARED: SHARED}
    sae = build_sae(variant="relu", d_model=D_MODEL, d_sae=d_sae)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w_enc_SD = torch.randn(d_sae, D_MODEL, generator=generator) * 0.05
        w_enc_SD[list(rows.values())] = 0
        for direction, row in rows.items():
            w_enc_SD[row, direction] = 1.0
        set_encoder(sae, w_enc_SD, bias_S=torch.full((d_sae,), -0.5))
        if planted_decoder:
            w_dec_SD = torch.randn(d_sae, D_MODEL, generator=generator)
            for direction, row in rows.items():
                w_dec_SD[row] = torch.nn.functional.one_hot(torch.tensor(direction), D_MODEL)
            sae.W_dec.copy_(torch.nn.functional.normalize(w_dec_SD, dim=1))
    save_sae(
        sae,
        run_dir,
        meta={
            "backbone": backbone,
            "dataset": "synthetic",
            "layer": layer,
            "tokens": "patches",
            "d_model": D_MODEL,
            "d_sae": d_sae,
            "variant": "relu",
            "scale": 1.0,
            "store": str(store.path),
            "config": {},
        },
    )
    return run_dir


def set_encoder(sae: torch.nn.Module, w_enc_SD: torch.Tensor, bias_S: torch.Tensor) -> None:
    """Encoder rows = the directions to read; no decoder bias so raw directions stay exact."""
    sae.W_enc.copy_(w_enc_SD)
    sae.b_enc.copy_(bias_S)
    sae.b_dec.zero_()


# ----------------------------------------------------------------------------- the real demo

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_cfg(config_name: str, overrides: list[str], out_dir: Path | None = None) -> DictConfig:
    """A conf/<config_name>.yaml composed in-process; with `out_dir`, Hydra's runtime is set to
    it as inside @hydra.main (output_dir() and HydraConfig.get() then work)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    if out_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out_dir)
        HydraConfig.instance().set_config(cfg)
    return cfg


def demo_sae(root: Path, steps: int = 600, layer: int = 1) -> Path:
    """extract -> train on `dataset=synthetic backbone=tiny` (train split), all under `root`.

    Returns the train run dir; the demo dataset is generated on first use by the extraction.
    Layer 1 of the randomly initialised tiny ViT: its later blocks mix every patch with the
    image mean through near-uniform random attention, which gives many latents a "species
    context" that competes with the planted, local traits (measured: the top candidate sat on
    the planted trait in 2 of 3 seeds at layer -1, in every seed tried at layer 1).
    """
    from traitsae.extraction import extract
    from traitsae.training import train

    extract(
        compose_cfg(
            "extract",
            [
                f"paths.root_dir={root}",
                "split=train",
                f"backbone.layers=[{layer}]",
                "extract.num_workers=0",
                "extract.progress=false",
            ],
            root / "extract",
        )
    )
    run_dir = root / "train"
    train(
        compose_cfg(
            "train",
            [
                f"paths.root_dir={root}",
                f"data.layer={layer}",
                f"trainer.max_steps={steps}",
                "data.num_workers=0",
                "data.batch_size=1024",
                "trainer.enable_progress_bar=false",
                "sae.expansion=8",
                "sae.k=8",
                "optim.lr=4e-4",  # the demo's settings (Makefile); the default suits larger data
            ],
            run_dir,
        )
    )
    return run_dir


# ----------------------------------------------------------------------------- notebooks

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, parameters: dict, workdir: Path) -> nbformat.NotebookNode:
    """Execute notebooks/<name>.py headless, with a cell of `parameters` injected right after
    the cell tagged "parameters" (papermill's convention); returns the executed notebook."""
    import jupytext
    from nbclient import NotebookClient

    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    tagged = [
        i
        for i, cell in enumerate(notebook.cells)
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    assert tagged, f"{name}.py has no cell tagged 'parameters'"
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return notebook


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook's code cells printed."""
    return "\n".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
