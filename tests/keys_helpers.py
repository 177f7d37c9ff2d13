"""A generated dataset whose species differ by planted, masked traits, with patch activations
that carry them, and an oracle SAE (latent t fires on trait t; the others are random), for the
eval=key and eval=audit tests.

Every patch that trait t touches gets AMPLITUDE * v_t added to Gaussian noise, so the
class identity of an image is carried by localised traits, exactly as the masks say.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from eval_helpers import AMPLITUDE, BACKBONE, DATASET, LAYER, make_sae, trait_directions
from PIL import Image

from traitsae.data import synthetic
from traitsae.data.images.cub import load_cub
from traitsae.data.images.masks import patch_class_counts, patch_labels
from traitsae.data.store import create_store
from traitsae.paths import store_path

D_MODEL, D_SAE, GRID = 16, 32, (8, 8)
N_TRAITS = len(synthetic.TRAITS)


def mask_of(data: Path, image_path: str) -> np.ndarray:
    """The class-id mask [H, W] of one generated image (0 background, t + 1 trait t)."""
    return np.asarray(Image.open(data / "masks" / image_path.split("/images/")[1]))


def masked_experiment(root: Path, n_species: int = 6, images_per_species: int = 16) -> dict:
    """Generated images and masks, train/test stores of planted activations, an oracle SAE."""
    data = synthetic.generate(
        root / "synthetic", n_species=n_species, images_per_species=images_per_species
    )
    dirs_TD = trait_directions(N_TRAITS, D_MODEL)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        images = load_cub(data, split)
        patches = []
        for path in images.paths:
            counts = patch_class_counts(mask_of(data, path), GRID, N_TRAITS + 1)
            # Every patch a trait touches carries it: no trait is too small to find.
            y_PT = patch_labels(counts, range(1, N_TRAITS + 1), "any")
            acts_PD = rng.standard_normal((GRID[0] * GRID[1], D_MODEL)) + AMPLITUDE * y_PT @ dirs_TD
            patches.append(acts_PD.astype(np.float32))
        patches_NPD = np.stack(patches)
        create_store(
            store_path(root / "activations", DATASET, split, BACKBONE),
            patches={LAYER: patches_NPD},
            cls={LAYER: patches_NPD.mean(1)},
            images={"path": np.array(images.paths, dtype=object), "label": images.labels}
            | {k: np.array(v, dtype=object) for k, v in images.metadata.items()},
            attrs={"backbone": BACKBONE, "dataset": DATASET, "split": split, "depth": LAYER + 1,
                   "grid": list(GRID), "image_size": 64},
        )  # fmt: skip
    run_dir = make_sae(root / "run", D_MODEL, D_SAE, dirs_TD).parent
    return {"root": root, "data": data, "run": run_dir, "directions": dirs_TD}


def overrides(ex: dict, evaluation: str, *extra: str) -> list[str]:
    """evaluate.py overrides for the experiment, with small, fast settings."""
    return [
        f"eval={evaluation}",
        "dataset=synthetic",
        f"run={ex['run']}",
        f"dataset.root={ex['data']}",
        f"paths.activations_dir={ex['root'] / 'activations'}",
        "eval.n_samples=2000",
        "eval.n_bootstrap=200",
        *extra,
    ]
