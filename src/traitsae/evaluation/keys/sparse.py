"""Sparse classifiers on a pooled matrix: the L1-logistic path, keys of n latents, and trees.

All fits are scikit-learn's: `LogisticRegression` (multinomial; L1 with the saga solver along a
path of C, warm-started from the previous C, which changes the path's speed, not its solutions)
and `DecisionTreeClassifier`. Features are standardised on the train split for the logistic
fits (an L1 penalty is scale-dependent); trees split raw scores so thresholds read in latent units.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.svm import l1_min_c
from sklearn.tree import DecisionTreeClassifier


@dataclass(frozen=True)
class PathSettings:
    """The grid of C (n_cs values over c_decades decades from the first C with a latent) and
    the saga solver's tolerance and iterations."""

    n_cs: int
    c_decades: float
    tol: float
    max_iter: int
    seed: int


@dataclass
class L1Path:
    cs: np.ndarray  # [P] increasing
    coef_PKS: np.ndarray  # [P, K, S] (K = 1 for two classes)
    intercept_PK: np.ndarray  # [P, K]

    @property
    def active_PS(self) -> np.ndarray:
        """bool [P, S]: latents with a non-zero weight for any class at each C."""
        return (self.coef_PKS != 0).any(axis=1)

    def entry_order(self) -> np.ndarray:
        """Latents in the order they enter the path (first C where active; at one C, the larger
        weight first); latents that never enter are left out."""
        active_PS = self.active_PS
        entered_S = active_PS.any(axis=0)
        first_S = np.where(entered_S, active_PS.argmax(axis=0), len(self.cs))
        size_S = np.abs(
            self.coef_PKS[np.minimum(first_S, len(self.cs) - 1), :, np.arange(active_PS.shape[1])]
        ).max(axis=1)
        order = np.lexsort((-size_S, first_S))
        return order[entered_S[order]]


def standardise(train_NS: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Centre and scale by the train split's mean and sd (a constant column is only centred)."""
    mean_S = train_NS.mean(axis=0)
    sd_S = train_NS.std(axis=0)
    sd_S = np.where(sd_S > 0, sd_S, 1.0)
    return [((x - mean_S) / sd_S).astype(np.float64) for x in (train_NS, *others)]


def c_grid(z_NS: np.ndarray, y_N: np.ndarray, settings: PathSettings) -> np.ndarray:
    """n_cs values of C, log-spaced over c_decades above the smallest C that activates a latent
    (that C itself is left out: at it the fit is empty up to the solver's tolerance)."""
    c_min = l1_min_c(z_NS, y_N, loss="log")
    return c_min * np.logspace(0, settings.c_decades, settings.n_cs + 1)[1:]


def l1_logistic(c: float, settings: PathSettings, warm_start: bool = False) -> LogisticRegression:
    """The estimator of one point of the path (tests call it directly)."""
    return LogisticRegression(
        C=c,
        l1_ratio=1.0,
        solver="saga",
        tol=settings.tol,
        max_iter=settings.max_iter,
        random_state=settings.seed,
        warm_start=warm_start,
    )


def l1_path(
    z_NS: np.ndarray, y_N: np.ndarray, settings: PathSettings, stop_at: int | None = None
) -> L1Path:
    """L1-logistic fits along the grid of C; with `stop_at`, stop once that many are active."""
    cs = c_grid(z_NS, y_N, settings)
    model = l1_logistic(float(cs[0]), settings, warm_start=True)
    coefs, intercepts = [], []
    with warnings.catch_warnings():
        # saga at a loose tolerance may stop at max_iter on the largest C; the path still ranks.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            model.set_params(C=float(c)).fit(z_NS, y_N)
            coefs.append(model.coef_.copy())
            intercepts.append(model.intercept_.copy())
            if stop_at is not None and (model.coef_ != 0).any(axis=0).sum() >= stop_at:
                break
    return L1Path(cs[: len(coefs)], np.stack(coefs), np.stack(intercepts))


def path_predictions(path: L1Path, z_NS: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Predicted classes [P, N] of every fit of the path."""
    logits_PNK = np.einsum("ns,pks->pnk", z_NS, path.coef_PKS) + path.intercept_PK[:, None]
    if path.coef_PKS.shape[1] == 1:  # two classes: one logit for the second
        return classes[(logits_PNK[..., 0] > 0).astype(int)]
    return classes[logits_PNK.argmax(axis=2)]


def refit_correct(
    z_train_NS: np.ndarray,
    y_train_N: np.ndarray,
    z_test_NS: np.ndarray,
    y_test_N: np.ndarray,
    latents: np.ndarray,
    c: float,
    max_iter: int,
) -> np.ndarray:
    """bool [N_test]: an L2 multinomial logistic fit on `latents` only, right per test image."""
    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit(z_train_NS[:, latents], y_train_N)
    return model.predict(z_test_NS[:, latents]) == y_test_N


def dense_probe_correct(
    z_train_ND: np.ndarray,
    y_train_N: np.ndarray,
    z_test_ND: np.ndarray,
    y_test_N: np.ndarray,
    cs: list[float],
    max_iter: int,
    seed: int,
) -> tuple[np.ndarray, float]:
    """The dense probe: an L2 multinomial fit on every raw feature, C by 3-fold CV on train."""
    model = LogisticRegression(max_iter=max_iter, random_state=seed)
    smallest_class = int(np.bincount(y_train_N).min())
    if smallest_class >= 2 and len(cs) > 1:
        search = GridSearchCV(model, {"C": list(cs)}, cv=min(3, smallest_class))
        model = search.fit(z_train_ND, y_train_N).best_estimator_
    else:
        model.set_params(C=cs[0]).fit(z_train_ND, y_train_N)
    return model.predict(z_test_ND) == y_test_N, float(model.C)


def fit_tree(
    x_train_NS: np.ndarray, y_train_N: np.ndarray, max_depth: int, min_leaf: int, seed: int
) -> DecisionTreeClassifier:
    return DecisionTreeClassifier(
        max_depth=max_depth, min_samples_leaf=min_leaf, random_state=seed
    ).fit(x_train_NS, y_train_N)


def tree_json(tree: DecisionTreeClassifier, class_names: list[str]) -> dict[str, Any]:
    """The fitted tree as nested couplets: a split names its latent and threshold; `low` holds
    the images with score <= threshold, `high` the others; a leaf names its class."""
    t = tree.tree_
    names = [class_names[int(c)] for c in tree.classes_]

    def node(i: int, depth: int) -> dict[str, Any]:
        counts = t.value[i][0] * t.n_node_samples[i] / max(t.value[i][0].sum(), 1e-12)
        common = {
            "node": int(i),
            "depth": depth,
            "n_train": int(t.n_node_samples[i]),
            "class_counts": {
                n: int(round(v)) for n, v in zip(names, counts, strict=True) if round(v) > 0
            },
        }
        if t.children_left[i] == -1:
            return {**common, "leaf": True, "class": names[int(np.argmax(t.value[i][0]))]}
        return {
            **common,
            "leaf": False,
            "latent": int(t.feature[i]),
            "threshold": float(t.threshold[i]),
            "low": node(int(t.children_left[i]), depth + 1),
            "high": node(int(t.children_right[i]), depth + 1),
        }

    return node(0, 0)


def splits_of(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The split nodes of a tree_json, breadth-first (the root, then its children, ...)."""
    out, queue = [], [node]
    while queue:
        current = queue.pop(0)
        if not current["leaf"]:
            out.append(current)
            queue += [current["low"], current["high"]]
    return out
