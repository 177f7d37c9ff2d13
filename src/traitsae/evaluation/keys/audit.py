"""`eval=audit`: of the latents a method proposes for a metadata column, how many are real,
localised traits? (the propose-audit protocol of saev's paper, arXiv 2511.17735)

    python evaluate.py eval=audit run=<train run dir> eval.class_column=species

1. Propose (train split, pooled scores; `Proposer`): `eval.propose=classifier` ranks the
   directions in the order they enter a multinomial L1-logistic path for `eval.class_column`
   (`sparse.l1_path`); `discovery` by discovery's specificity, the largest one-vs-rest AUROC
   over the classes (stratified by `eval.strata`).
2. Audit (test split, held-out images with masks): a direction is grounded when its best-class
   patch AP against the mask classes is >= `eval.tau` (`grounding`).
3. Yield(B) for B in `eval.budgets`, its AUC, percentile bootstrap CIs over the audited images,
   for the SAE, its initialisation and the random / PCA / k-means directions.
4. Null (SAE): the labels shuffled within strata, re-proposed and re-audited `eval.n_permutations`
   times: the null's yields and a one-sided p-value of the observed yield AUC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig

from traitsae.data.images.masks import RULES, load_mask_layout
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.methods import POOLS, Method, image_scores, valid_rows
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.patches import FRAMES, SplitPatches, collect_patches, store_frame
from traitsae.evaluation.core.ranks import centred_ranks, comparable_pairs, stratum_codes
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_stores, output_dir
from traitsae.evaluation.keys import grounding, sparse
from traitsae.evaluation.keys.audit_report import format_table, write_outputs
from traitsae.evaluation.keys.key import check_budgets
from traitsae.evaluation.keys.pooled import (
    METHODS,
    class_ids,
    class_names,
    column_values,
    fit_methods,
)
from traitsae.evaluation.keys.results import AuditResult, MethodAudit
from traitsae.sae.export import RawSpaceSAE

PROPOSERS = ("classifier", "discovery")


@dataclass(frozen=True)
class AuditOptions:
    """The options of conf/eval/audit.yaml (meanings and defaults documented there)."""

    train_split: str
    test_split: str
    class_column: str
    classes: list[str] | None
    strata: list[str] | None
    propose: str
    pool: str
    methods: list[str]
    budgets: list[int]
    tau: float
    patch_rule: str
    frame: str
    max_images: int | None
    n_cs: int
    c_decades: float
    path_tol: float
    path_max_iter: int
    n_samples: int
    n_directions: int | None
    n_permutations: int
    n_bootstrap: int
    ci_level: float
    seed: int
    device: str

    def __post_init__(self) -> None:
        checks = [
            (0.0 < self.tau <= 1.0, f"eval.tau={self.tau} must be in (0, 1]: a direction is "
             "grounded when its best-class patch AP reaches tau, and an AP lies in [0, 1]"),
            (self.propose in PROPOSERS, f"eval.propose must be one of {PROPOSERS}, got {self.propose!r}"),
            (self.pool in POOLS, f"eval.pool must be one of {POOLS}, got {self.pool!r}"),
            (bool(self.methods) and "sae" in self.methods and set(self.methods) <= set(METHODS),
             f"eval.methods must list sae and any of {METHODS}, got {self.methods}"),
            (bool(self.budgets) and min(self.budgets) >= 1,
             f"eval.budgets must be a non-empty list of positive integers, got {self.budgets}"),
            (self.patch_rule in RULES, f"eval.patch_rule must be one of {RULES}"),
            (self.frame in FRAMES, f"eval.frame must be one of {FRAMES}"),
            (self.n_permutations >= 0, "eval.n_permutations must be >= 0 (0 = no null)"),
            (self.n_cs >= 2, f"eval.n_cs must be >= 2, got {self.n_cs}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise TraitsaeError(f"{message} (conf/eval/audit.yaml documents every option).")

    def path(self) -> sparse.PathSettings:
        return sparse.PathSettings(
            self.n_cs, self.c_decades, self.path_tol, self.path_max_iter, self.seed
        )


# ---------------------------------------------------------------- entry point


def run(cfg: DictConfig) -> AuditResult:
    """Hydra entry: compute, write audit.json / CSV / PNG, print a short table."""
    opts = build_options(AuditOptions, cfg)
    layout = mask_layout(cfg)
    sae = resolve_sae(cfg).to(opts.device).eval()
    if sae.tokens != "patches":
        raise TraitsaeError(
            "eval=audit grounds latents patch by patch, but this SAE was trained on CLS tokens "
            "(data.tokens=cls); audit an SAE trained with data.tokens=patches."
        )
    train_store, test_store = eval_stores(cfg, sae, [opts.train_split, opts.test_split])
    try:
        patches = collect_patches(
            test_store,
            layout,
            sae.layer,
            frame=store_frame(test_store, opts.frame),
            rule=opts.patch_rule,
            image_root=cfg.dataset.get("root"),
            max_images=opts.max_images,
            seed=opts.seed,
        )
        class_names_C = [layout.classes[i] for i in layout.class_ids]
        result = compute_audit(sae, train_store, patches, class_names_C, opts)
    finally:
        train_store.close()
        test_store.close()
    out = output_dir(cfg)
    write_outputs(result, out)
    print(format_table(result))
    print(f"audit: outputs in {out}")
    return result


def mask_layout(cfg: DictConfig):
    """The dataset's segmentation masks; without them there is nothing to audit against."""
    if cfg.dataset.get("format") == "synthetic" and cfg.dataset.get("root"):
        from traitsae.data.synthetic import ensure_synthetic

        ensure_synthetic(cfg.dataset.root, seed=int(cfg.dataset.get("seed", 0)))
    try:
        return load_mask_layout(cfg.dataset)
    except TraitsaeError as err:
        raise TraitsaeError(
            f"eval=audit checks each proposed latent against segmentation masks of the test "
            f"split, so it needs a dataset with masks: {err}"
        ) from err


# ---------------------------------------------------------------- computation


def compute_audit(
    sae: RawSpaceSAE,
    train_store: Store,
    patches: SplitPatches,
    mask_classes: list[str],
    opts: AuditOptions,
) -> AuditResult:
    """Propose on the train split, audit on the masked test patches; writes nothing."""
    budgets = check_budgets(
        opts.budgets, sae.d_sae, f"the SAE ({sae.d_sae} latents)", "eval.budgets"
    )
    rows = valid_rows(train_store)
    values = column_values(train_store, opts.class_column, rows, "eval.class_column")
    names = class_names(values, opts.classes, train_store, opts.class_column)
    y_N = class_ids(values, names)
    codes_N = strata_codes(train_store, rows, opts.strata)
    keep_N = y_N >= 0
    y_N, codes_N = y_N[keep_N], codes_N[keep_N]
    methods = fit_methods(
        sae,
        train_store,
        list(opts.methods),
        pool=opts.pool,
        n_samples=opts.n_samples,
        n_directions=opts.n_directions,
        seed=opts.seed,
        device=opts.device,
    )
    pooled, _ = image_scores(
        train_store, sae.layer, methods, sae.tokens, opts.device, "pooling train"
    )
    per_image = patches.acts_RD.shape[0] // max(1, len(patches.rows_N))
    notes: list[str] = []
    audits, null = {}, {}
    for name, method in methods.items():
        x_NS = pooled[name][keep_N]
        usable = [b for b in budgets if b <= method.n_directions]
        if len(usable) < len(budgets):
            notes.append(f"{name}: {method.n_directions} directions, budgets above left out.")
        if not usable:
            continue
        proposer = Proposer(x_NS, codes_N, opts, max(usable))
        ranking = proposer.rank(y_N)
        ap_S, cls_S = grounding.ground_all(
            method.scorer, method.n_directions, patches.acts_RD, patches.labels_RC, opts.device
        )
        audits[name] = audit_method(name, method, ranking, ap_S, cls_S, patches, per_image,
                                    usable, mask_classes, opts, notes)  # fmt: skip
        if name == "sae" and opts.n_permutations:
            null = permutation_null(proposer, y_N, codes_N, ap_S, usable, ranking, opts)
    return AuditResult(audits, null, notes, meta(opts, names, train_store, patches, sae, keep_N))


def strata_codes(store: Store, rows: np.ndarray, columns: list[str] | None) -> np.ndarray:
    """One int per image naming its stratum (the combination of the `columns` values)."""
    if not columns:
        return np.zeros(len(rows), dtype=np.int64)
    parts = [column_values(store, c, rows, "eval.strata") for c in columns]
    labels_N = np.array(["\x1f".join(v) for v in zip(*parts, strict=True)])
    return stratum_codes(labels_N, len(labels_N))


class Proposer:
    """Ranks a method's directions for a labelling of the train images, best proposal first.

    What does not depend on the labels (standardised scores, within-stratum ranks) is computed
    once, so the permutation null re-proposes cheaply. `classifier`: order of entry into the L1
    path (stopping once `n_max` directions are active); `discovery`: the largest one-vs-rest
    stratified AUROC over the classes (discovery's specificity, for every class at once).
    """

    def __init__(self, x_NS: np.ndarray, codes_N: np.ndarray, opts: AuditOptions, n_max: int):
        self.opts, self.n_max, self.codes_N = opts, n_max, codes_N
        if opts.propose == "classifier":
            (self.z_NS,) = sparse.standardise(x_NS)
        else:
            self.ranks_NS = centred_ranks(x_NS, codes_N)

    def rank(self, y_N: np.ndarray) -> np.ndarray:
        if self.opts.propose == "classifier":
            path = sparse.l1_path(self.z_NS, y_N, self.opts.path(), stop_at=self.n_max)
            return path.entry_order()
        classes = np.unique(y_N)
        onehot_CN = (y_N[None] == classes[:, None]).astype(np.float64)
        pairs_C = np.array([comparable_pairs(row.astype(bool), self.codes_N) for row in onehot_CN])
        auroc_CS = 0.5 + (onehot_CN @ self.ranks_NS) / np.maximum(pairs_C, 1)[:, None]
        return np.argsort(-auroc_CS.max(axis=0), kind="stable")


def audit_method(
    name: str,
    method: Method,
    ranking: np.ndarray,
    ap_S: np.ndarray,
    cls_S: np.ndarray,
    patches: SplitPatches,
    per_image: int,
    budgets: list[int],
    mask_classes: list[str],
    opts: AuditOptions,
    notes: list[str],
) -> MethodAudit:
    grounded_S = ap_S >= opts.tau
    yields_B = grounding.yield_curve(ranking, grounded_S, budgets)
    top = ranking[: budgets[-1]]
    if len(top) < budgets[-1]:
        notes.append(
            f"{name}: the proposer ranked only {len(top)} directions; the missing proposals up "
            f"to {budgets[-1]} count as not grounded (raise eval.c_decades to extend the path)."
        )
    scores_RB = grounding.patch_scores(method.scorer, patches.acts_RD, top, opts.device)
    low_B, high_B, auc_ci = grounding.bootstrap_yields(
        scores_RB, patches.labels_RC, cls_S[top], per_image, budgets, opts.tau, opts.n_bootstrap,
        opts.seed, opts.ci_level,
    )  # fmt: skip
    hits = np.cumsum(grounded_S[top])
    return MethodAudit(
        method=name,
        n_directions=method.n_directions,
        yields=[
            {
                "budget": b,
                "yield": float(y),
                "ci_low": float(lo),
                "ci_high": float(hi),
                "n_grounded": int(hits[min(b, len(hits)) - 1]) if len(hits) else 0,
            }
            for b, y, lo, hi in zip(budgets, yields_B, low_B, high_B, strict=True)
        ],  # fmt: skip
        auc=grounding.yield_auc(yields_B, budgets),
        auc_ci=auc_ci,
        n_proposed=int(len(ranking)),
        n_grounded_all=int(grounded_S.sum()),
        proposals=[
            {
                "rank": r,
                "direction": int(s),
                "best_ap": float(ap_S[s]),
                "best_class": mask_classes[int(cls_S[s])],
                "grounded": bool(grounded_S[s]),
            }
            for r, s in enumerate(top, start=1)
        ],  # fmt: skip
    )


def permutation_null(
    proposer: Proposer,
    y_N: np.ndarray,
    codes_N: np.ndarray,
    ap_S: np.ndarray,
    budgets: list[int],
    ranking: np.ndarray,
    opts: AuditOptions,
) -> dict[str, Any]:
    """Labels shuffled within strata, re-proposed, re-audited (grounding does not depend on the
    labels, so re-auditing is a look-up): the null's yields and the p-value of the observed AUC."""
    rng = np.random.default_rng([opts.seed, 27])
    grounded_S = ap_S >= opts.tau

    def statistic(ranking: np.ndarray) -> tuple[float, float, np.ndarray]:
        yields_B = grounding.yield_curve(ranking, grounded_S, budgets)
        top = ranking[: budgets[-1]]
        return grounding.yield_auc(yields_B, budgets), float(ap_S[top].mean()), yields_B

    auc, mean_ap, _ = statistic(ranking)
    draws, yields_nB = [], []
    for _ in range(opts.n_permutations):
        shuffled = grounding.permute_within(y_N, codes_N, rng)
        null_auc, null_ap, yields_B = statistic(proposer.rank(shuffled))
        draws.append((null_auc, null_ap))
        yields_nB.append(yields_B)
    yields_nB = np.array(yields_nB)
    return {
        "n_permutations": opts.n_permutations,
        "strata": opts.strata or [],
        "observed_auc": auc,
        "observed_mean_ap": mean_ap,
        "p_value": grounding.permutation_pvalue((auc, mean_ap), draws),
        "null_auc": [d[0] for d in draws],
        "null_yields_mean": dict(zip(map(str, budgets), yields_nB.mean(0).tolist(), strict=True)),
        "null_yields_q95": dict(
            zip(map(str, budgets), np.quantile(yields_nB, 0.95, axis=0).tolist(), strict=True)
        ),
    }


def meta(
    opts: AuditOptions,
    names: list[str],
    train_store: Store,
    patches: SplitPatches,
    sae: RawSpaceSAE,
    keep_N: np.ndarray,
) -> dict[str, Any]:
    return {
        "options": asdict(opts),
        "classes": names,
        "n_train": int(keep_N.sum()),
        "n_audited_images": int(len(patches.rows_N)),
        "n_audited_patches": int(patches.acts_RD.shape[0]),
        "n_images_without_mask": int(patches.n_without_mask),
        "train_store": str(train_store.path),
        "audit_store": patches.store_path,
        "sae": {k: sae.meta.get(k) for k in ("backbone", "dataset", "layer", "variant", "d_sae")},
    }
