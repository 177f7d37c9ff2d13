"""Tiny stores, attribute files and SAEs with planted traits, for the evaluation tests.

Each trait t has a unit direction v_t in activation space; an image carrying t has one random
patch shifted by AMPLITUDE * v_t on top of Gaussian noise. An "oracle" SAE whose first T encoder
rows are the v_t (with a threshold above the noise) must then find every trait.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from traitsae.data.store import create_store
from traitsae.paths import store_path
from traitsae.sae.export import save_sae
from traitsae.sae.model import build_sae

BACKBONE = "tiny"
DATASET = "synthetic"
LAYER = 3
AMPLITUDE = 6.0


@dataclass
class Planted:
    directions_TD: np.ndarray  # [T, D] unit trait directions
    names: list[str]


def trait_directions(n_traits: int, d_model: int, seed: int = 0) -> np.ndarray:
    q_DD, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d_model, d_model)))
    return q_DD[:n_traits].astype(np.float32)  # orthonormal rows


def write_attribute_files(
    root: Path,
    names: list[str],
    image_ids: np.ndarray,
    present_NT: np.ndarray,
    certainty: int = 4,
    extra_fields: bool = True,
) -> Path:
    """attributes.txt + attributes/image_attribute_labels.txt in the CUB layout."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "attributes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names, 1)))
    lines = []
    for i, image_id in enumerate(image_ids):
        for t in range(len(names)):
            line = f"{image_id} {t + 1} {int(present_NT[i, t])} {certainty} 3.5"
            # The official file has some lines with an extra field: parsers must cope.
            if extra_fields and (i + t) % 7 == 0:
                line += " 0"
            lines.append(line + "\n")
    (root / "attributes").mkdir(exist_ok=True)
    (root / "attributes" / "image_attribute_labels.txt").write_text("".join(lines))
    return root


def planted_activations(
    present_NT: np.ndarray, directions_TD: np.ndarray, n_patches: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(patches [N, P, D], cls [N, D]) with each present trait planted on one random patch."""
    rng = np.random.default_rng(seed)
    n_images, n_traits = present_NT.shape
    d_model = directions_TD.shape[1]
    patches_NPD = rng.standard_normal((n_images, n_patches, d_model)).astype(np.float32)
    for i, t in zip(*np.nonzero(present_NT), strict=True):
        patches_NPD[i, rng.integers(n_patches)] += AMPLITUDE * directions_TD[t]
    cls_ND = patches_NPD.mean(axis=1) + 0.1 * rng.standard_normal((n_images, d_model))
    return patches_NPD, cls_ND.astype(np.float32)


def make_store(
    activations_dir: Path,
    split: str,
    image_ids: np.ndarray,
    patches_NPD: np.ndarray,
    cls_ND: np.ndarray,
    labels_N: np.ndarray | None = None,
    valid_N: np.ndarray | None = None,
    backbone: str = BACKBONE,
    layer: int = LAYER,
) -> Path:
    """A complete store at the standard store path for (backbone, synthetic, split)."""
    n_images = len(image_ids)
    images = {
        "path": np.array([f"img_{i}.png" for i in image_ids], dtype=object),
        "label": np.zeros(n_images, dtype=np.int64) if labels_N is None else labels_N,
        "image_id": np.array([str(i) for i in image_ids], dtype=object),
        "species": np.array(["s"] * n_images, dtype=object),
    }
    if valid_N is not None:
        images["valid"] = valid_N
    path = store_path(activations_dir, DATASET, split, backbone)
    side = int(np.sqrt(patches_NPD.shape[1]))
    return create_store(
        path,
        patches={layer: patches_NPD},
        cls={layer: cls_ND},
        images=images,
        attrs={
            "backbone": backbone,
            "dataset": DATASET,
            "split": split,
            "depth": layer + 1,
            "grid": [side, patches_NPD.shape[1] // side],
        },
    )


def make_sae(
    run_dir: Path,
    d_model: int,
    d_sae: int,
    directions_TD: np.ndarray | None = None,
    threshold: float = 3.0,
    variant: str = "relu",
    backbone: str = BACKBONE,
    layer: int = LAYER,
    seed: int = 0,
    tokens: str = "patches",
) -> Path:
    """Export an SAE; with directions, its first T latents fire on exactly those directions."""
    torch.manual_seed(seed)
    sae = build_sae(variant=variant, d_model=d_model, d_sae=d_sae, k=min(8, d_sae))
    if directions_TD is not None:
        with torch.no_grad():
            n = directions_TD.shape[0]
            sae.W_enc[:n] = torch.from_numpy(directions_TD)
            sae.W_dec[:n] = torch.from_numpy(directions_TD)
            sae.b_enc[:n] = -threshold
    meta = {
        "backbone": backbone,
        "dataset": DATASET,
        "layer": layer,
        "tokens": tokens,
        "scale": 1.0,
    }
    return save_sae(sae, run_dir, meta)


def planted_split_labels(
    n_train: int, n_test: int, n_traits: int, rate: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random 0/1 labels [N, T] for a train and a test split, every trait present in both."""
    rng = np.random.default_rng(seed)
    train_NT = rng.random((n_train, n_traits)) < rate
    test_NT = rng.random((n_test, n_traits)) < rate
    train_NT[0], test_NT[0] = True, True
    return train_NT, test_NT


def planted_experiment(
    root: Path,
    n_train: int = 120,
    n_test: int = 120,
    n_traits: int = 6,
    d_model: int = 16,
    n_patches: int = 16,
    d_sae: int = 32,
    absent_traits: tuple[int, ...] = (),
    rate: float = 0.25,
) -> dict[str, Path | np.ndarray | list[str]]:
    """CUB attribute files, train/test stores and an oracle SAE under `root`."""
    names = [f"has_trait_{t}::colour" for t in range(n_traits)]
    train_NT, test_NT = planted_split_labels(n_train, n_test, n_traits, rate)
    for t in absent_traits:  # traits nobody has: must be skipped and listed
        train_NT[:, t] = test_NT[:, t] = False
    ids_train = np.arange(1, n_train + 1)
    ids_test = np.arange(n_train + 1, n_train + n_test + 1)
    dirs_TD = trait_directions(n_traits, d_model)
    cub_root = write_attribute_files(
        root / "cub", names, np.r_[ids_train, ids_test], np.r_[train_NT, test_NT]
    )
    acts = root / "activations"
    for split, ids, labels_NT, seed in (
        ("train", ids_train, train_NT, 1),
        ("test", ids_test, test_NT, 2),
    ):
        patches, cls = planted_activations(labels_NT, dirs_TD, n_patches, seed)
        species_N = labels_NT[:, 0].astype(np.int64)  # two "species": with / without trait 0
        make_store(acts, split, ids, patches, cls, labels_N=species_N)
    sae_json = make_sae(root / "run", d_model, d_sae, dirs_TD)
    return {
        "cub_root": cub_root,
        "activations": acts,
        "sae_json": sae_json,
        "run_dir": sae_json.parent,
        "names": names,
        "train_NT": train_NT,
        "test_NT": test_NT,
    }


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_evaluate(overrides: list[str], out_dir: Path):
    """evaluate.yaml composed in-process, with Hydra's runtime output dir set to `out_dir`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("evaluate", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def experiment_overrides(ex: dict, *extra: str) -> list[str]:
    """Overrides pointing evaluate.py at a planted experiment; small, fast settings."""
    return [
        f"run={ex['run_dir']}",
        f"dataset.root={ex['cub_root']}",
        f"paths.activations_dir={ex['activations']}",
        *extra,
    ]
