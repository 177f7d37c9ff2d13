"""Pooled image scores of the SAE and of the directions it must beat, and the class labels.

Every method scores an image by pooling (`pool`: max or mean over its tokens) one score per
direction: the SAE's latents, the same SAE at initialisation (`sae_init`), random unit
directions, PCA components (both signs), k-means centroids, all fit on the train split's token
sample; `DENSE` is the raw activations mean- and max-pooled (the dense probe's features).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import directions
from traitsae.evaluation.core.methods import Method, image_scores, linear_scorer, sae_scorer
from traitsae.sae.export import RawSpaceSAE

METHODS = ("sae", "sae_init", "random", "pca", "kmeans")
# The dense probe's features: every raw dimension, mean- and max-pooled over the tokens.
DENSE = {"dense_mean": "mean", "dense_max": "max"}
_BOOKKEEPING = ("valid", "index", "error", "done", "path")


@dataclass(frozen=True)
class Pooled:
    """[N, M] pooled scores per method on the train and test split, and the store rows."""

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    rows_train: np.ndarray  # [N_train] store rows of the train matrices
    rows_test: np.ndarray


@dataclass(frozen=True)
class Labels:
    """Class ids of the images (-1: not one of the classes), and the class names."""

    column: str
    names: list[str]
    train_N: np.ndarray  # [N_train] int64
    test_N: np.ndarray  # [N_test] int64


def column_listing(metadata: dict[str, np.ndarray], rows: np.ndarray, top: int = 8) -> str:
    """`column: 'value' (count), ...` for every metadata column, to name what is available."""
    parts = []
    for column in sorted(c for c in metadata if c not in _BOOKKEEPING):
        counts = Counter(str(v) for v in np.asarray(metadata[column])[rows]).most_common()
        shown = ", ".join(f"{v!r} ({n})" for v, n in counts[:top])
        parts.append(f"{column}: {shown}{', ...' if len(counts) > top else ''}")
    return "; ".join(parts)


def column_values(store: Store, column: str, rows: np.ndarray, option: str) -> np.ndarray:
    """The values of one metadata column on `rows`, as strings; a clear error if it is absent."""
    metadata = store.metadata
    if column not in metadata or column in _BOOKKEEPING:
        raise TraitsaeError(
            f"{option}={column!r} is not a metadata column of store {store.path}. Its columns "
            f"(values with image counts): {column_listing(metadata, rows)}. Pass one of them, "
            f"e.g. {option}=species."
        )
    return np.asarray(metadata[column]).astype(str)[rows]


def class_names(
    values_N: np.ndarray, classes: list[str] | None, store: Store, column: str
) -> list[str]:
    """The classes of a run: those of the (train) split, or `classes`; at least two present."""
    present = sorted(set(values_N))
    names = [str(c) for c in classes] if classes else present
    absent = [c for c in names if c not in present]
    if absent or len(names) < 2:
        counts = ", ".join(f"{v!r} ({n})" for v, n in Counter(values_N).most_common(12))
        why = f"eval.classes lists {absent}, absent from" if absent else "fewer than two classes in"
        raise TraitsaeError(
            f"eval.class_column={column!r}: {why} the train split (store {store.path}: "
            f"{counts}). Separating classes needs at least two: choose a column with several "
            "values (or list two or more of its values in eval.classes)."
        )
    return names


def class_ids(values_N: np.ndarray, names: list[str]) -> np.ndarray:
    """int64 [N]: the index of each value in `names`, -1 for values not among them."""
    index = {name: i for i, name in enumerate(names)}
    return np.array([index.get(v, -1) for v in values_N], dtype=np.int64)


def class_labels(
    train_store: Store,
    test_store: Store,
    rows_train: np.ndarray,
    rows_test: np.ndarray,
    column: str,
    classes: list[str] | None,
) -> Labels:
    """Class ids from `column` for both splits; the classes are those of the train split (or
    `classes`), and at least two of them must be present there."""
    train_values = column_values(train_store, column, rows_train, "eval.class_column")
    test_values = column_values(test_store, column, rows_test, "eval.class_column")
    names = class_names(train_values, classes, train_store, column)
    return Labels(column, names, class_ids(train_values, names), class_ids(test_values, names))


def build_methods(
    sae: RawSpaceSAE,
    sample: directions.TrainSample,
    names: list[str],
    pool: str,
    seed: int,
    n_directions: int | None,
    device: str,
) -> dict[str, Method]:
    """Token scorers of `names` (METHODS and DENSE), baselines fit on the sample."""
    d_model = sample.tokens_SD.shape[1]
    d_sae = sae.d_sae
    width = n_directions or d_sae
    methods: dict[str, Method] = {}
    for name in names:
        if name == "sae":
            methods[name] = Method(name, sae_scorer(sae), d_sae, pool)
        elif name == "sae_init":
            init = directions.untrained_sae(sae, sample.tokens_SD, seed)
            methods[name] = Method(name, sae_scorer(init), d_sae, pool)
        elif name in DENSE:
            methods[name] = Method(name, lambda x_RD: x_RD, d_model, DENSE[name])
        else:
            if name == "random":
                dirs_MD = directions.random_directions(d_model, width, seed)
            elif name == "pca":
                dirs_MD = directions.pca_directions(sample.tokens_SD, True, seed)
            elif name == "kmeans":
                k = min(width, sample.tokens_SD.shape[0])
                dirs_MD = directions.kmeans_directions(sample.tokens_SD, k, seed)
            else:
                raise TraitsaeError(f"eval.methods: unknown method {name!r}; use {METHODS}.")
            scorer = linear_scorer(torch.from_numpy(dirs_MD).to(device))
            methods[name] = Method(name, scorer, dirs_MD.shape[0], pool)
    return methods


def fit_methods(
    sae: RawSpaceSAE,
    train_store: Store,
    names: list[str],
    *,
    pool: str,
    n_samples: int,
    n_directions: int | None,
    seed: int,
    device: str,
) -> dict[str, Method]:
    """The methods' token scorers, baselines fit on a token sample of the train split."""
    sample = directions.sample_train_activations(
        train_store, sae.layer, sae.tokens, n_samples, seed
    )
    return build_methods(sae, sample, names, pool, seed, n_directions, device)


def pooled_scores(
    sae: RawSpaceSAE, methods: dict[str, Method], train_store: Store, test_store: Store, device: str
) -> Pooled:
    """One pass per split: every method's pooled scores on the valid images of both."""
    train, rows_train = image_scores(
        train_store, sae.layer, methods, sae.tokens, device, "pooling train"
    )
    test, rows_test = image_scores(
        test_store, sae.layer, methods, sae.tokens, device, "pooling test"
    )
    return Pooled(train, test, rows_train, rows_test)
