"""`eval=key`: can a few latents identify the class of an image, the way a field guide does?

    python evaluate.py eval=key run=<train run dir> eval.class_column=species

On pooled scores (max over patches by default) of the train split, per method (the SAE, the SAE
at initialisation, random, PCA, k-means directions; `pooled`):
- the multinomial L1-logistic path: held-out accuracy against the number of latents with a
  non-zero weight, one point per C (`sparse.l1_path`);
- keys of exactly n latents (eval.n_latents): the first n latents to enter the path, refit by an
  L2 logistic regression on those alone, so methods compare at equal numbers of latents; SAE
  minus each other method is a paired bootstrap difference over test images;
- a decision tree of depth <= eval.max_depth: the key a biologist reads, split by split;
and the dense probe on every raw dimension (mean-pooled) as the ceiling. Accuracies are on the
test split, with percentile bootstrap CIs over its images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.frames import ImageOptions, image_source
from traitsae.evaluation.core.methods import POOLS, valid_rows
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.precision import paired_difference
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_stores, output_dir
from traitsae.evaluation.keys import sparse
from traitsae.evaluation.keys.key_report import format_table, write_outputs
from traitsae.evaluation.keys.pooled import (
    DENSE,
    METHODS,
    Pooled,
    class_labels,
    fit_methods,
    pooled_scores,
)
from traitsae.evaluation.keys.results import Accuracy, KeyResult, MethodKey
from traitsae.sae.export import RawSpaceSAE


@dataclass(frozen=True)
class KeyOptions(ImageOptions):
    """The options of conf/eval/key.yaml (meanings and defaults documented there)."""

    train_split: str
    test_split: str
    class_column: str
    classes: list[str] | None
    pool: str
    methods: list[str]
    n_latents: list[int]
    n_cs: int
    c_decades: float
    path_tol: float
    path_max_iter: int
    refit_c: float
    probe_cs: list[float]
    max_iter: int
    max_depth: int
    min_leaf: int
    n_samples: int
    n_directions: int | None
    n_top_images: int
    n_bootstrap: int
    ci_level: float
    seed: int
    device: str

    def __post_init__(self) -> None:
        checks = [
            (self.pool in POOLS, f"eval.pool must be one of {POOLS}, got {self.pool!r}"),
            (
                bool(self.methods) and "sae" in self.methods and set(self.methods) <= set(METHODS),
                f"eval.methods must list sae and any of {METHODS}, got {self.methods}",
            ),
            (
                bool(self.n_latents) and min(self.n_latents) >= 1,
                f"eval.n_latents must be a non-empty list of positive integers, got "
                f"{self.n_latents}",
            ),
            (self.n_cs >= 2, f"eval.n_cs must be >= 2, got {self.n_cs}"),
            (self.max_depth >= 1, f"eval.max_depth must be >= 1, got {self.max_depth}"),
            (self.min_leaf >= 1, f"eval.min_leaf must be >= 1, got {self.min_leaf}"),
            (0 < self.ci_level < 1, f"eval.ci_level must be in (0, 1), got {self.ci_level}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TraitsaeError(f"{message} (conf/eval/key.yaml documents every option).")

    def path(self) -> sparse.PathSettings:
        return sparse.PathSettings(
            self.n_cs, self.c_decades, self.path_tol, self.path_max_iter, self.seed
        )


def check_budgets(budgets: list[int], width: int, what: str, option: str) -> list[int]:
    """Budgets sorted and deduplicated; one above the number of latents is an error."""
    budgets = sorted({int(b) for b in budgets})
    if budgets[-1] > width:
        raise TraitsaeError(
            f"{option}={budgets} asks for {budgets[-1]} latents but {what} has only {width}; "
            f"pass budgets up to {width}, e.g. {option}=[{', '.join(str(b) for b in budgets if b <= width) or 1}]."
        )
    return budgets


# ---------------------------------------------------------------- entry point


def run(cfg: DictConfig) -> KeyResult:
    """Hydra entry: compute, write key.json / CSV / PNG / key.html, print a short table."""
    opts = build_options(KeyOptions, cfg)
    sae = resolve_sae(cfg).to(opts.device).eval()
    train_store, test_store = eval_stores(cfg, sae, [opts.train_split, opts.test_split])
    try:
        result = compute_key(sae, train_store, test_store, opts)
        out = output_dir(cfg)
        images = image_source(train_store, opts)
        write_outputs(result, out, train_store, sae, images, opts.device)
    finally:
        train_store.close()
        test_store.close()
    print(format_table(result))
    print(f"key: outputs in {out} (the drawn key: {out / 'key.html'})")
    return result


# ---------------------------------------------------------------- computation


def accuracy(correct_N: np.ndarray, opts: KeyOptions) -> Accuracy:
    return Accuracy.of(correct_N, opts.n_bootstrap, opts.seed, opts.ci_level)


def compute_key(
    sae: RawSpaceSAE, train_store: Store, test_store: Store, opts: KeyOptions
) -> KeyResult:
    """Every method's path, keys and tree on already opened stores; writes nothing."""
    budgets = check_budgets(
        opts.n_latents, sae.d_sae, f"the SAE ({sae.d_sae} latents)", "eval.n_latents"
    )
    labels = class_labels(
        train_store,
        test_store,
        valid_rows(train_store),
        valid_rows(test_store),
        opts.class_column,
        opts.classes,
    )
    methods = fit_methods(
        sae,
        train_store,
        [*opts.methods, *DENSE],
        pool=opts.pool,
        n_samples=opts.n_samples,
        n_directions=opts.n_directions,
        seed=opts.seed,
        device=opts.device,
    )
    pooled = pooled_scores(sae, methods, train_store, test_store, opts.device)
    fit_N, held_N = labels.train_N >= 0, labels.test_N >= 0
    if not held_N.any():
        raise TraitsaeError(
            f"no test image of store {test_store.path} belongs to one of the classes "
            f"{labels.names} of eval.class_column={labels.column!r}; nothing to score the key on."
        )
    y_train, y_test = labels.train_N[fit_N], labels.test_N[held_N]
    notes = []
    if (~held_N).any():
        notes.append(
            f"{int((~held_N).sum())} test images of classes absent from the train split (or "
            "eval.classes) are left out."
        )
    keys = {}
    for name in opts.methods:
        x_train, x_test = pooled.train[name][fit_N], pooled.test[name][held_N]
        keys[name] = method_key(name, x_train, y_train, x_test, y_test, budgets, labels.names,
                                   opts, notes)  # fmt: skip
    add_top_rows(keys["sae"].tree, pooled, fit_N, opts.n_top_images)
    dense = dense_ceiling(pooled, fit_N, held_N, y_train, y_test, opts)
    return KeyResult(
        keys,
        dense,
        differences(keys, budgets, opts),
        notes,
        {
            "options": asdict(opts),
            "classes": labels.names,
            "class_column": labels.column,
            "n_train": int(fit_N.sum()),
            "n_test": int(held_N.sum()),
            "train_store": str(train_store.path),
            "test_store": str(test_store.path),
            "sae": {
                k: sae.meta.get(k) for k in ("backbone", "dataset", "layer", "variant", "d_sae")
            },
        },
    )


def method_key(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    budgets: list[int],
    class_names: list[str],
    opts: KeyOptions,
    notes: list[str],
) -> MethodKey:
    """The path, the keys of n latents and the tree of one method's pooled scores."""
    z_train, z_test = sparse.standardise(x_train, x_test)
    path = sparse.l1_path(z_train, y_train, opts.path())
    correct_PN = sparse.path_predictions(path, z_test, np.unique(y_train)) == y_test
    path_rows = [
        {"c": float(c), "n_latents": int(n), **asdict(accuracy(ok_N, opts))}
        for c, n, ok_N in zip(path.cs, path.active_PS.sum(axis=1), correct_PN, strict=True)
    ]
    order = path.entry_order()
    correct: dict[str, np.ndarray] = {}
    budget_rows = []
    for n in budgets:
        if n > len(order):
            notes.append(
                f"{name}: only {len(order)} of {x_train.shape[1]} directions enter the L1 path, "
                f"so there is no key of {n}; raise eval.c_decades to extend the path."
            )
            continue
        ok_N = sparse.refit_correct(z_train, y_train, z_test, y_test, order[:n], opts.refit_c,
                                    opts.max_iter)  # fmt: skip
        correct[f"n={n}"] = ok_N
        budget_rows.append(
            {"n_latents": n, **asdict(accuracy(ok_N, opts)), "latents": order[:n].tolist()}
        )
    tree = sparse.fit_tree(x_train, y_train, opts.max_depth, opts.min_leaf, opts.seed)
    correct["tree"] = tree.predict(x_test) == y_test
    tree_doc = sparse.tree_json(tree, class_names)
    return MethodKey(
        name,
        int(x_train.shape[1]),
        path_rows,
        budget_rows,
        tree_doc,
        accuracy(correct["tree"], opts),
        sorted({s["latent"] for s in sparse.splits_of(tree_doc)}),
        correct,
    )


def add_top_rows(tree: dict[str, Any], pooled: Pooled, fit_N: np.ndarray, n_top: int) -> None:
    """Each split of the SAE's tree gets its latent's top train images (store rows, scores)."""
    rows_N, scores_NS = pooled.rows_train[fit_N], pooled.train["sae"][fit_N]
    for split in sparse.splits_of(tree):
        values_N = scores_NS[:, split["latent"]]
        top = np.argsort(-values_N, kind="stable")[:n_top]
        split["top_rows"] = rows_N[top].tolist()
        split["top_scores"] = values_N[top].tolist()


def dense_ceiling(
    pooled: Pooled,
    fit_N: np.ndarray,
    held_N: np.ndarray,
    y_train: np.ndarray,
    y_test: np.ndarray,
    opts: KeyOptions,
) -> dict[str, Any]:
    x_train = np.concatenate([pooled.train[name][fit_N] for name in DENSE], axis=1)
    x_test = np.concatenate([pooled.test[name][held_N] for name in DENSE], axis=1)
    z_train, z_test = sparse.standardise(x_train, x_test)
    ok_N, c = sparse.dense_probe_correct(
        z_train, y_train, z_test, y_test, opts.probe_cs, opts.max_iter, opts.seed
    )
    return {"n_dimensions": int(z_train.shape[1]), "c": c, **asdict(accuracy(ok_N, opts))}


def differences(
    methods: dict[str, MethodKey], budgets: list[int], opts: KeyOptions
) -> list[dict[str, Any]]:
    """SAE minus each other method, per key size and for the tree: paired over test images."""
    rows = []
    sae = methods["sae"]
    for name, other in methods.items():
        if name == "sae":
            continue
        for key in [*(f"n={n}" for n in budgets), "tree"]:
            if key in sae.correct and key in other.correct:
                diff = paired_difference(
                    sae.correct[key].astype(float),
                    other.correct[key].astype(float),
                    opts.n_bootstrap,
                    opts.seed,
                    opts.ci_level,
                    "images",
                )
                rows.append({"method": name, "key": key} | diff)
    return rows
