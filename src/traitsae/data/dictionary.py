"""`dataset=dictionary`: a store of synthetic activations whose features are known.

Shaped like SynthSAEBench: `n_features` unit directions in `d_model` dimensions (more features
than dimensions: superposition); each vector is a sparse non-negative combination of them plus a
shared bias and Gaussian noise. Firing follows
- Zipf-like frequencies: feature i fires with probability proportional to rank_i^-zipf_exponent,
  scaled so that a vector holds `mean_active` features on average;
- correlation: a Gaussian copula with a low-rank factor (`correlation_rank`, strength
  `correlation`) decides which independent features and parents fire together;
- hierarchy: `n_parents` parents with `children_per_parent` children each; a child fires only
  when its parent does, and at most one child per parent (mutually exclusive, probability
  `child_fire_prob` that one does).
Magnitudes are |N(magnitude_mean, magnitude_sd)|.

The store is written through the real `StoreWriter` at the standard store path (one layer, 0;
`patches_per_image` vectors per "image"), so train.py streams it unchanged. The truth lives in
the store under `ground_truth/` (`TRUTH_KEYS`: the feature directions, their parents and
frequencies, the bias, and the true codes of the first `truth_images` images as CSR).
The dictionary depends only on `seed`; the vectors on `seed` and the split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import sparse
from scipy.special import ndtri
from tqdm.auto import tqdm

from traitsae.data.store import StoreWriter, store_is_done
from traitsae.data.store.schema import Key
from traitsae.errors import TraitsaeError
from traitsae.paths import store_path_from_cfg
from traitsae.version import __version__

log = logging.getLogger(__name__)

TRUTH_GROUP = "ground_truth"
# What a dictionary store adds to the store schema (docs/guide/store.md lists them too).
TRUTH_KEYS: tuple[Key, ...] = (
    Key("ground_truth/features", "dataset", "float32 [F, D]", True, "the F unit feature directions (all eval=dictionary needs: MMCS, recovered)"),
    Key("ground_truth/parents", "dataset", "int64 [F]", False, "each feature's parent (-1: none); adds recovered by kind and absorption by decoder geometry"),
    Key("ground_truth/frequency", "dataset", "float64 [F]", False, "each feature's firing probability"),
    Key("ground_truth/bias", "dataset", "float32 [D]", False, "the bias every vector shares"),
    Key("ground_truth/codes_indptr", "dataset", "int64 [T + 1]", False, "CSR row pointer of the true codes of the first T vectors (the codes add MCC, F1, absorption, splitting)"),
    Key("ground_truth/codes_indices", "dataset", "int32 [nnz]", False, "CSR feature index of each true code"),
    Key("ground_truth/codes_values", "dataset", "float32 [nnz]", False, "CSR magnitude of each true code"),
    Key("truth_vectors", "attr", "int", False, "T, the vectors whose true codes are stored (an attr of `ground_truth/`; with the codes)"),
)  # fmt: skip
# Vectors generated per write: a few MiB of float16 rows.
CHUNK_VECTORS = 8192


@dataclass(frozen=True)
class DictionarySpec:
    """The generator's settings (conf/dataset/dictionary.yaml holds the defaults)."""

    n_features: int
    d_model: int
    n_parents: int
    children_per_parent: int
    child_fire_prob: float
    mean_active: float
    zipf_exponent: float
    correlation_rank: int
    correlation: float
    magnitude_mean: float
    magnitude_sd: float
    noise_sd: float
    bias_norm: float
    n_images: int
    patches_per_image: int
    truth_images: int
    seed: int

    @classmethod
    def from_cfg(cls, dataset: DictConfig, split: str) -> DictionarySpec:
        keys = {k: v for k, v in OmegaConf.to_container(dataset, resolve=True).items()}
        images = keys.pop("images")
        if split not in images:
            raise TraitsaeError(
                f"dataset=dictionary has no image count for split={split!r}: dataset.images is "
                f"{images}. Add one, e.g. 'dataset.images.{split}=256'."
            )
        fields = {name: keys[name] for name in cls.__dataclass_fields__ if name in keys}
        spec = cls(n_images=int(images[split]), **fields)
        spec.check()
        return spec

    def check(self) -> None:
        n_hier = self.n_parents * (1 + self.children_per_parent)
        problems = []
        if self.d_model < 1 or self.n_features < 1:
            problems.append(f"d_model={self.d_model} and n_features={self.n_features} must be >= 1")
        if n_hier > self.n_features:
            problems.append(
                f"n_parents x (1 + children_per_parent) = {n_hier} exceeds n_features="
                f"{self.n_features}"
            )
        if not 0 < self.mean_active < self.n_features:
            problems.append(f"mean_active={self.mean_active} must be in (0, n_features)")
        if not 0 <= self.correlation < 1 or not 0 <= self.child_fire_prob <= 1:
            problems.append("correlation must be in [0, 1) and child_fire_prob in [0, 1]")
        if self.n_images < 1 or self.patches_per_image < 1:
            problems.append("dataset.images.<split> and patches_per_image must be >= 1")
        if problems:
            raise TraitsaeError(
                "dataset=dictionary is misconfigured: " + "; ".join(problems) + ". Fix the "
                "dataset.* overrides (defaults in conf/dataset/dictionary.yaml)."
            )


@dataclass
class Dictionary:
    """The ground truth: directions, hierarchy, firing probabilities, copula factor, bias."""

    features_FD: np.ndarray
    parents_F: np.ndarray  # parent feature of each child, -1 elsewhere
    frequency_F: np.ndarray  # marginal firing probability
    base_prob_F: np.ndarray  # copula firing probability (independent features and parents)
    child_prob_F: np.ndarray  # P(this child | its parent fires)
    factor_RF: np.ndarray  # unit columns: the shared Gaussian factor of the copula
    bias_D: np.ndarray


def make_dictionary(spec: DictionarySpec) -> Dictionary:
    """The dictionary of `spec.seed` (the same for every split)."""
    rng = np.random.default_rng([spec.seed, 0])
    F = spec.n_features
    features_FD = rng.standard_normal((F, spec.d_model))
    features_FD /= np.linalg.norm(features_FD, axis=1, keepdims=True)
    parents_F = np.full(F, -1, dtype=np.int64)
    n_par, cpp = spec.n_parents, spec.children_per_parent
    for p in range(n_par):  # features [0, n_par) are parents, their children follow
        parents_F[n_par + p * cpp : n_par + (p + 1) * cpp] = p
    is_child = parents_F >= 0
    # Zipf weights in a random rank order, so frequency is not tied to the feature index.
    weight_F = (rng.permutation(F) + 1.0) ** -spec.zipf_exponent
    child_prob_F = np.zeros(F)
    for p in range(n_par):
        kids = np.flatnonzero(parents_F == p)
        child_prob_F[kids] = spec.child_fire_prob * weight_F[kids] / weight_F[kids].sum()
    base_prob_F = np.where(is_child, 0.0, weight_F)
    # Scale so that E[active] = sum of base probabilities + parents' chance of one child.
    bonus_F = np.zeros(F)
    bonus_F[:n_par] = spec.child_fire_prob if cpp else 0.0
    scale = 1.0
    for _ in range(50):  # fixed point: probabilities are capped at 0.5
        probs = np.minimum(base_prob_F * scale, 0.5)
        expected = float((probs * (1 + bonus_F)).sum())
        scale *= spec.mean_active / max(expected, 1e-12)
    base_prob_F = np.minimum(base_prob_F * scale, 0.5)
    frequency_F = base_prob_F.copy()
    frequency_F[is_child] = base_prob_F[parents_F[is_child]] * child_prob_F[is_child]
    factor_RF = rng.standard_normal((max(spec.correlation_rank, 1), F))
    factor_RF /= np.linalg.norm(factor_RF, axis=0, keepdims=True)
    bias_D = rng.standard_normal(spec.d_model)
    bias_D *= spec.bias_norm / np.linalg.norm(bias_D)
    return Dictionary(
        features_FD, parents_F, frequency_F, base_prob_F, child_prob_F, factor_RF, bias_D
    )


def sample_codes(
    spec: DictionarySpec, truth: Dictionary, n: int, rng: np.random.Generator
) -> sparse.csr_matrix:
    """True codes of `n` vectors as a CSR matrix [n, F] float32 (row-major, sorted columns)."""
    F = spec.n_features
    rho = spec.correlation
    z_NF = rng.standard_normal((n, F), dtype=np.float32)
    if rho > 0:
        shared_NR = rng.standard_normal((n, truth.factor_RF.shape[0]), dtype=np.float32)
        z_NF *= np.float32(np.sqrt(1 - rho))
        z_NF += np.float32(np.sqrt(rho)) * (shared_NR @ truth.factor_RF.astype(np.float32))
    with np.errstate(divide="ignore"):
        cut_F = ndtri(truth.base_prob_F).astype(np.float32)  # -inf where the probability is 0
    fires_NF = z_NF < cut_F  # N(0, 1) marginals: feature f fires with probability base_prob_F
    n_par, cpp = spec.n_parents, spec.children_per_parent
    if n_par and cpp:
        # One uniform per (vector, parent) picks at most one child among the parent's children.
        u_NP = rng.random((n, n_par), dtype=np.float32)
        probs_PC = truth.child_prob_F[n_par : n_par + n_par * cpp].reshape(n_par, cpp)
        upper_PC = probs_PC.cumsum(1).astype(np.float32)
        pick_NP = (u_NP[:, :, None] >= upper_PC[None]).sum(2)  # cpp means "no child"
        chosen_NP = (pick_NP < cpp) & fires_NF[:, :n_par]
        rows, parents = np.nonzero(chosen_NP)
        fires_NF[rows, n_par + parents * cpp + pick_NP[rows, parents]] = True
    rows, cols = np.nonzero(fires_NF)
    magnitude = np.abs(spec.magnitude_mean + spec.magnitude_sd * rng.standard_normal(len(rows)))
    return sparse.csr_matrix((magnitude.astype(np.float32), (rows, cols)), shape=(n, F))


def fingerprint(spec: DictionarySpec, split: str) -> str:
    return json.dumps({"dictionary": spec.__dict__, "split": split}, sort_keys=True)


def write_dictionary_store(cfg: DictConfig) -> Path:
    """Generate the `dataset=dictionary` store of `cfg.split` at the standard store path."""
    spec = DictionarySpec.from_cfg(cfg.dataset, str(cfg.split))
    out = store_path_from_cfg(cfg)
    key = fingerprint(spec, str(cfg.split))
    if store_is_done(out, key, bool(cfg.extract.overwrite)):
        log.info("store %s is already complete for this configuration; nothing to do.", out)
        return out
    truth = make_dictionary(spec)
    P = spec.patches_per_image
    attrs: dict[str, Any] = {
        "backbone": str(cfg.backbone.name),
        "dataset": str(cfg.dataset.name),
        "split": str(cfg.split),
        "d_model": spec.d_model,
        "n_patches": P,
        "n_prefix_tokens": 0,
        "grid": [1, P],
        "layers": [0],
        "depth": 1,
        "image_size": 0,
        "n_images": spec.n_images,
        "config": OmegaConf.to_yaml(cfg.dataset),
        "image_root": "",
        "traitsae_version": __version__,
    }
    names = np.array([f"dictionary/{cfg.split}/{i}" for i in range(spec.n_images)], dtype=object)
    writer = StoreWriter.open(
        out,
        attrs=attrs,
        images={"index": np.arange(spec.n_images), "path": names},
        fingerprint=key,
        overwrite=bool(cfg.extract.overwrite),
    )
    try:
        _write_truth(writer.file, spec, truth, str(cfg.split))
        _write_vectors(writer, spec, truth, str(cfg.split), bool(cfg.extract.progress))
    finally:
        writer.close()
    path = StoreWriter.resume(out).finish()
    log.info(
        "wrote %s: %d vectors of %d dims from %d features (%d parents), ground truth in %s/",
        path, spec.n_images * P, spec.d_model, spec.n_features, spec.n_parents, TRUTH_GROUP,
    )  # fmt: skip
    return path


def _split_rng(spec: DictionarySpec, split: str, start: int) -> np.random.Generator:
    # Each block of images has its own stream, so a resumed run writes the same vectors.
    return np.random.default_rng(
        [spec.seed, 1, int.from_bytes(split.encode()[:8], "little"), start]
    )


def _write_truth(file: h5py.File, spec: DictionarySpec, truth: Dictionary, split: str) -> None:
    if TRUTH_GROUP in file:  # resumed run: written before the first row
        return
    group = file.create_group(TRUTH_GROUP)
    group.create_dataset("features", data=truth.features_FD.astype(np.float32))
    group.create_dataset("parents", data=truth.parents_F)
    group.create_dataset("frequency", data=truth.frequency_F)
    group.create_dataset("bias", data=truth.bias_D.astype(np.float32))
    n_truth = min(spec.truth_images, spec.n_images)
    F = spec.n_features
    blocks = [codes for _, codes, _ in _code_blocks(spec, truth, split, 0, n_truth)]
    codes = sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, F))
    group.create_dataset("codes_indptr", data=codes.indptr.astype(np.int64))
    group.create_dataset("codes_indices", data=codes.indices.astype(np.int32))
    group.create_dataset("codes_values", data=codes.data.astype(np.float32))
    group.attrs["truth_vectors"] = n_truth * spec.patches_per_image
    file.flush()


def _code_blocks(spec: DictionarySpec, truth: Dictionary, split: str, lo: int, hi: int):
    """(first image, codes [b * P, F], noise [b * P, D]) per block of images in [lo, hi)."""
    block = max(1, CHUNK_VECTORS // spec.patches_per_image)
    P = spec.patches_per_image
    for start in range(lo - lo % block, hi, block):
        stop = min(start + block, spec.n_images)
        rng = _split_rng(spec, split, start)
        codes_NF = sample_codes(spec, truth, (stop - start) * P, rng)
        noise_ND = rng.standard_normal((codes_NF.shape[0], spec.d_model), dtype=np.float32)
        rows = slice(max(lo - start, 0) * P, (min(stop, hi) - start) * P)
        yield max(start, lo), codes_NF[rows], noise_ND[rows]


def _write_vectors(
    writer: Any, spec: DictionarySpec, truth: Dictionary, split: str, progress: bool
) -> None:
    first = writer.first_pending()
    features_FD = truth.features_FD.astype(np.float32)
    bar = tqdm(total=spec.n_images, initial=first, unit="img", desc="dictionary store",
               disable=not progress)  # fmt: skip
    for start, codes_NF, noise_ND in _code_blocks(spec, truth, split, first, spec.n_images):
        acts_ND = codes_NF @ features_FD + truth.bias_D + spec.noise_sd * noise_ND  # sparse @ dense
        acts_BPD = acts_ND.astype(np.float16).reshape(-1, spec.patches_per_image, spec.d_model)
        writer.write(start, {0: acts_BPD}, {0: acts_BPD[:, 0]}, np.ones(len(acts_BPD), bool))
        bar.update(len(acts_BPD))
    bar.close()


# Only `features` is required: `parents` adds the hierarchy's scores, the true codes (CSR + the
# `truth_vectors` attr, all or none) the scores that need to know which feature fired where.
CODE_KEYS = ("codes_indptr", "codes_indices", "codes_values", "truth_vectors")


def read_truth(store: Any) -> dict[str, np.ndarray]:
    """The ground truth of an open dictionary `Store`: `features` always; `parents`, `frequency`,
    `bias` and the true codes (`codes_*`, `truth_vectors`) where the store holds them."""
    if TRUTH_GROUP not in store.file or "features" not in store.file[TRUTH_GROUP]:
        raise TraitsaeError(
            f"store {store.path} has no {TRUTH_GROUP}/features (it holds {store.backbone} "
            f"activations of {store.dataset}), so there is nothing to score the SAE against: "
            "eval=dictionary needs a store written by `python extract.py dataset=dictionary`, or "
            f"one with the true feature directions as {TRUTH_GROUP}/features (float [F, D]). "
            "Pass data.store=<such a store>, or evaluate an SAE trained on one."
        )
    group = store.file[TRUTH_GROUP]
    truth = {key: group[key][()] for key in group}
    if "truth_vectors" in group.attrs:
        truth["truth_vectors"] = int(group.attrs["truth_vectors"])
    held = [key for key in CODE_KEYS if key in truth]
    if held and len(held) < len(CODE_KEYS):
        raise TraitsaeError(
            f"store {store.path}: {TRUTH_GROUP}/ holds {held} but lacks "
            f"{[k for k in CODE_KEYS if k not in truth]}: the true codes are all of "
            f"{list(CODE_KEYS)} (truth_vectors an attr of {TRUTH_GROUP}/) or none of them "
            "(docs/guide/store.md); write the missing ones or delete the others."
        )
    features = np.asarray(truth["features"])
    if features.ndim != 2 or not np.isfinite(features).all() or (features**2).sum(1).min() == 0:
        raise TraitsaeError(
            f"store {store.path}: {TRUTH_GROUP}/features must be finite, non-zero rows [F, D]; "
            f"got shape {features.shape}."
        )
    parents = truth.get("parents")
    if parents is not None and (
        np.shape(parents) != (features.shape[0],)
        or ((parents < -1) | (parents >= features.shape[0])).any()
    ):
        raise TraitsaeError(
            f"store {store.path}: {TRUTH_GROUP}/parents must hold one feature index or -1 per "
            f"feature ({features.shape[0]}); got shape {np.shape(parents)}."
        )
    return truth
