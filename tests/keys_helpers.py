"""A generated dataset whose species differ by planted, masked traits, with patch activations
that carry them, and an oracle SAE (latent t fires on trait t; the others are random), for the
eval=key and eval=audit tests.

Every patch that trait t touches gets AMPLITUDE * v_t added to Gaussian noise, so the
class identity of an image is carried by localised traits, exactly as the masks say.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
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
    return {
        "root": root,
        "data": data,
        "run": oracle_sae(root / "run", dirs_TD),
        "directions": dirs_TD,
    }


def oracle_sae(run_dir: Path, dirs_TD: np.ndarray) -> Path:
    """Latent t fires on trait t; the other latents are random directions orthogonal to every
    trait, firing on the noise: distractors a key must pass over."""
    from safetensors.torch import load_file, save_file

    sae_json = make_sae(run_dir, D_MODEL, D_SAE, dirs_TD)
    weights_path = run_dir / "sae.safetensors"
    weights = load_file(weights_path)
    q_DD, _ = np.linalg.qr(
        np.c_[dirs_TD.T, np.random.default_rng(1).standard_normal((D_MODEL, D_MODEL))]
    )
    noise_RD = np.random.default_rng(2).standard_normal((D_SAE - N_TRAITS, D_MODEL - N_TRAITS))
    rows_RD = noise_RD @ q_DD[:, N_TRAITS:].T  # in the complement of the trait directions
    rows_RD /= np.linalg.norm(rows_RD, axis=1, keepdims=True)
    for key in ("W_enc", "W_dec"):
        w = weights[key].numpy().copy()
        if w.shape == (D_SAE, D_MODEL):
            w[N_TRAITS:] = rows_RD
        else:
            w[:, N_TRAITS:] = rows_RD.T
        weights[key] = torch.from_numpy(w)
    save_file(weights, weights_path, metadata={"format": "traitsae-sae"})
    record = json.loads(sae_json.read_text())  # the export vouches for its weights by digest
    record["weights_sha256"] = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    sae_json.write_text(json.dumps(record, indent=2) + "\n")
    return sae_json.parent


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
