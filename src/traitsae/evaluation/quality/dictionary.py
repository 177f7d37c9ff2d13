"""`eval=dictionary`: score SAEs against the known features of a `dataset=dictionary` store.

    python evaluate.py eval=dictionary run=<train run dir | sweep dir> [data.store=<store>]

The store is the one the SAE was trained on (sae.json `store`) unless `data.store` names another
generated with the same dictionary. The scores, on the store's first `truth_vectors` vectors
(whose true codes the store keeps):
- `mmcs`: mean over true features of the best decoder cosine; `recovered`: fraction > 0.9;
  `recovered_parents`, `recovered_children`, `recovered_others`: the same fraction among the
  hierarchy's parents, its children and the features outside it (null where there are none).
- `mcc`: mean Pearson correlation of true feature activations with SAE latent activations,
  features and latents matched one-to-one by the Hungarian algorithm on those correlations.
- `f1`: feature-detection F1 as SynthSAEBench defines it: each latent is matched to the true
  feature its decoder row is most similar to (|cos|); "latent fires" predicts "feature fires";
  F1 per latent, averaged over all latents (dead ones score 0).
- `absorption`: (parent, child) pairs whose parent latent (the best decoder match of the parent)
  fires on >= 50 % of the vectors where the parent is active without a child, but on < 50 % of
  those where this child is active: the child's latent absorbed the parent there.
- `splitting`: parents detected by >= 2 latents, each with decoder cosine > 0.5 to the parent
  and precision >= 0.9 for it (it fires only when the parent does): one feature split in parts.
- `absorption_cos` (needs only the features and their parents): mean over (parent, child) pairs
  of cos(decoder row of the child's best latent, parent) - cos(child, parent): how far the
  latent that stands for the child has turned towards its parent (about 0 without absorption;
  a latent that absorbed the parent points along child + parent).
Pairs and parents enter the counts only when their feature fires on >= `min_support` vectors.

Only `ground_truth/features` is required. Without `parents` the hierarchy's scores are null;
without the true codes MMCS, recovered, absorption_cos, L0 and FVU (on the first
`FEATURES_ONLY_VECTORS` vectors) are scored, and `skipped` names each metric left out and why.
The store must hold the dictionary the SAE was trained on (`check_same_dictionary`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig
from scipy.optimize import linear_sum_assignment

from traitsae.data.dictionary import read_truth
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.outputs import write_csv, write_json
from traitsae.evaluation.core.runs import find_runs, run_labels
from traitsae.evaluation.core.sae import load_eval_sae
from traitsae.evaluation.core.sources import output_dir, sae_source
from traitsae.sae.export import RawSpaceSAE
from traitsae.sae.metrics import FractionOfVarianceUnexplained

log = logging.getLogger(__name__)

RECOVERED_COS = 0.9
FEATURES_ONLY_VECTORS = 65_536  # vectors L0 and FVU are measured on when no true codes are stored
NEEDS_CODES = ("true_l0", "mcc", "f1", "absorption", "absorption_pairs", "splitting",
               "split_parents")  # fmt: skip
SPLIT_COS = 0.5
SPLIT_PRECISION = 0.9
ABSORBED_RECALL = 0.5


@dataclass
class DictionaryScores:
    run: str
    label: str
    variant: str
    d_sae: int
    store: str
    n_vectors: int
    l0: float
    fvu: float
    mmcs: float
    recovered: float
    recovered_parents: float | None
    recovered_children: float | None
    recovered_others: float | None
    absorption_cos: float | None
    true_l0: float | None
    mcc: float | None
    f1: float | None
    absorption: int | None
    absorption_pairs: int | None
    splitting: int | None
    split_parents: int | None
    skipped: dict[str, str]  # metric -> why it is null


@dataclass(frozen=True)
class DictionaryOptions:
    """The `eval.*` options of conf/eval/dictionary.yaml (defaults and meanings there)."""

    min_support: int
    batch: int
    device: str


def run(cfg: DictConfig) -> list[DictionaryScores]:
    """Hydra entry: score one run, or every run of a sweep dir."""
    opts = build_options(DictionaryOptions, cfg)
    runs = find_runs(sae_source(cfg))
    labels = run_labels(runs)
    results = []
    for run_dir, label in zip(runs, labels, strict=True):
        sae = load_eval_sae(cfg, run_dir, device=opts.device)
        store = (cfg.get("data") or {}).get("store") or sae.meta.get("store")
        if not store:
            raise TraitsaeError(
                f"{run_dir}: sae.json names no store; pass data.store=<dictionary store>."
            )
        check_same_dictionary(sae, Path(store), run_dir)
        scores = score_sae(sae, Path(store), opts.min_support, opts.batch)
        results.append(DictionaryScores(run=str(run_dir), label=label, **scores))
    write_outputs(results, output_dir(cfg))
    for r in results:
        print(format_scores(r))
    return results


# The dataset keys the feature directions depend on (traitsae.data.dictionary.make_dictionary).
DIRECTION_KEYS = ("seed", "n_features", "d_model")


def check_same_dictionary(sae: RawSpaceSAE, store_path: Path, run_dir: Path) -> None:
    """Refuse to score an SAE against another dictionary than the one it was trained on (another
    seed's store passed as data.store): the features of the training store (sae.json `store`),
    or, when it is gone, the dictionary keys of both configs, must match."""
    trained_on = sae.meta.get("store")
    if not trained_on or Path(trained_on).resolve() == store_path.resolve():
        return
    with Store(store_path) as store:
        scored_FD = read_truth(store)["features"]
        scored_cfg = (yaml.safe_load(store.config or "") or {}).get("dataset") or {}
    if Path(trained_on).is_file():
        with Store(Path(trained_on)) as store:
            if "ground_truth/features" in store.file:
                own_FD = store.file["ground_truth/features"][()]
                same = own_FD.shape == scored_FD.shape and np.allclose(own_FD, scored_FD, atol=1e-6)
                if not same:
                    raise TraitsaeError(
                        _other_dictionary(run_dir, trained_on, store_path, "its features differ")
                    )
                return
    own_cfg = (sae.meta.get("config") or {}).get("dataset") or {}
    differ = [
        k
        for k in DIRECTION_KEYS
        if k in own_cfg and k in scored_cfg and own_cfg[k] != scored_cfg[k]
    ]
    if differ:
        detail = ", ".join(f"{k} {own_cfg[k]!r} vs {scored_cfg[k]!r}" for k in differ)
        raise TraitsaeError(_other_dictionary(run_dir, trained_on, store_path, detail))
    if not all(k in own_cfg and k in scored_cfg for k in DIRECTION_KEYS):
        log.warning(
            "%s was trained on %s, which is gone, and the configs do not say which dictionary "
            "either store holds: scoring against %s unverified",
            run_dir,
            trained_on,
            store_path,
        )


def _other_dictionary(run_dir: Path, trained_on: str, store_path: Path, detail: str) -> str:
    return (
        f"{run_dir} was trained on the dictionary of {trained_on}, but data.store={store_path} "
        f"holds another one ({detail}): its scores would measure nothing. Score it on a store "
        "of the same dictionary (python extract.py dataset=dictionary with the same "
        "dataset.seed, n_features and d_model; any split), or leave data.store unset."
    )


def write_outputs(results: list[DictionaryScores], out: Path) -> None:
    """dictionary.json (one run: the scores at top level; a sweep: {"runs": [...]}) + CSV."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    payload = rows[0] if len(rows) == 1 else {"runs": rows}
    write_json(out / "dictionary.json", payload)
    write_csv(out / "dictionary.csv", list(rows[0]), rows)


def format_scores(r: DictionaryScores) -> str:
    """One line per SAE; a metric left out reads n/a, and the reasons follow."""

    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    line = (
        f"{r.label:<36} L0 {r.l0:6.2f}  MMCS {r.mmcs:.3f}  recovered {r.recovered:6.1%}"
        f"{_kinds_text(r)}  MCC {num(r.mcc, '.3f')}  F1 {num(r.f1, '.3f')}  "
        f"absorbed {num(r.absorption, 'd')}/{num(r.absorption_pairs, 'd')}  "
        f"split {num(r.splitting, 'd')}/{num(r.split_parents, 'd')}  "
        f"absorption cos {num(r.absorption_cos, '+.3f')}"
    )
    reasons: dict[str, list[str]] = {}
    for metric, why in r.skipped.items():
        reasons.setdefault(why, []).append(metric)
    return line + "".join(f"\n  n/a: {', '.join(m)}: {why}" for why, m in reasons.items())


def _kinds_text(r: DictionaryScores) -> str:
    if r.recovered_children is None or r.recovered_parents is None:
        return ""
    return (
        f" (parents {r.recovered_parents:.1%}, children {r.recovered_children:.1%}, "
        f"others {r.recovered_others:.1%})"
    )


def recovered_by_kind(best_F: torch.Tensor, parents_F: torch.Tensor) -> dict[str, float | None]:
    """Fraction of features with best decoder cosine > 0.9 among the hierarchy's parents, its
    children (`parents_F` >= 0) and the others; None for a kind the dictionary lacks."""
    ok_F = best_F > RECOVERED_COS
    is_child_F = parents_F >= 0
    is_parent_F = torch.zeros_like(is_child_F)
    is_parent_F[parents_F[is_child_F]] = True
    kinds = {"parents": is_parent_F, "children": is_child_F, "others": ~(is_parent_F | is_child_F)}
    return {
        f"recovered_{kind}": float(ok_F[mask].double().mean()) if bool(mask.any()) else None
        for kind, mask in kinds.items()
    }


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(w.double(), dim=1)


def absorption_cos(cos_FS: torch.Tensor, features_FD: torch.Tensor, parents_F: torch.Tensor):
    """Mean over (parent, child) pairs of cos(W_dec[child's best latent], parent) minus
    cos(child, parent) [decoder geometry only]; None without pairs."""
    child = torch.nonzero(parents_F >= 0).squeeze(1)
    if child.numel() == 0:
        return None
    unit_FD = _unit_rows(features_FD)
    parent = parents_F[child]
    latent = cos_FS[child].argmax(1)
    turned = cos_FS[parent, latent] - (unit_FD[child] * unit_FD[parent]).sum(1)
    return float(turned.mean())


@torch.no_grad()
def score_sae(sae: RawSpaceSAE, store_path: Path, min_support: int = 10, batch: int = 8192) -> dict:
    """Every score of the module docstring for one SAE (raw-space `load_sae` module) that the
    store's ground truth allows; the others are None and named in `skipped`."""
    with Store(store_path) as store:
        truth = read_truth(store)
        has_codes = "codes_indptr" in truth
        n_vectors = truth["truth_vectors"] if has_codes else FEATURES_ONLY_VECTORS
        n_images = -(-n_vectors // store.n_patches)
        x_ND = np.asarray(store.patches(0)[:n_images], dtype=np.float32)
    x_ND = torch.from_numpy(x_ND.reshape(-1, x_ND.shape[-1])[:n_vectors])
    features_FD = torch.from_numpy(np.asarray(truth["features"], dtype=np.float32))
    if features_FD.shape[1] != sae.d_model:
        raise TraitsaeError(
            f"store {store_path} holds {features_FD.shape[1]}-dim features but the SAE has "
            f"d_model={sae.meta['d_model']}; score it on the dictionary store it was trained on."
        )
    cos_FS = _unit_rows(features_FD) @ _unit_rows(sae.W_dec.detach().cpu()).T
    best_F = cos_FS.max(1).values
    has_parents = "parents" in truth
    parents_F = torch.from_numpy(np.asarray(truth.get("parents", np.full(len(best_F), -1))))
    stats = _Streams(cos_FS, parents_F) if has_codes else None
    fvu = FractionOfVarianceUnexplained(features_FD.shape[1])
    n_active = 0.0
    for lo in range(0, x_ND.shape[0], batch):
        hi = min(lo + batch, x_ND.shape[0])
        codes_NS = sae.encode(x_ND[lo:hi]).float().cpu()
        fvu.update(sae.decode(codes_NS).float().cpu(), x_ND[lo:hi])
        n_active += float((codes_NS > 0).sum())
        if stats is not None:
            stats.update(true_codes(truth, lo, hi, features_FD.shape[0]), codes_NS)
    scores = {
        "variant": str(sae.meta.get("variant", "")),
        "d_sae": int(cos_FS.shape[1]),
        "store": str(store_path),
        "n_vectors": int(x_ND.shape[0]),
        "l0": n_active / max(x_ND.shape[0], 1),
        "fvu": float(fvu.compute()),
        "mmcs": float(best_F.mean()),
        "recovered": float((best_F > RECOVERED_COS).double().mean()),
        **recovered_by_kind(best_F, parents_F),
        "absorption_cos": absorption_cos(cos_FS, features_FD, parents_F),
        "skipped": {},
    }
    if not has_parents:
        scores |= {"recovered_parents": None, "recovered_children": None}
        why = "the store holds no ground_truth/parents (the hierarchy)"
        scores["skipped"] |= {k: why for k in ("recovered_parents", "recovered_children",
                                                "absorption_cos")}  # fmt: skip
    if stats is None:
        why = (
            "the store holds no true codes (ground_truth/codes_*): which feature fires on which "
            "vector is unknown"
        )
        scores |= dict.fromkeys(NEEDS_CODES)
        scores["skipped"] |= dict.fromkeys(NEEDS_CODES, why)
        return scores
    return scores | {
        "true_l0": stats.true_l0(),
        "mcc": stats.mcc(),
        "f1": stats.f1(),
        **stats.absorption(min_support),
        **stats.splitting(min_support),
    }


def true_codes(truth: dict, lo: int, hi: int, n_features: int) -> torch.Tensor:
    """The true codes [hi - lo, F] of vectors lo..hi from the store's CSR."""
    indptr, indices, values = truth["codes_indptr"], truth["codes_indices"], truth["codes_values"]
    true_NF = torch.zeros(hi - lo, n_features)
    a, b = int(indptr[lo]), int(indptr[hi])
    rows = np.repeat(np.arange(hi - lo), np.diff(indptr[lo : hi + 1]))
    true_NF[rows, indices[a:b]] = torch.from_numpy(values[a:b])
    return true_NF


class _Streams:
    """Running sums over the scored vectors, all [F] / [S] / [F, S] float64."""

    def __init__(self, cos_FS: torch.Tensor, parents_F: torch.Tensor) -> None:
        F, S = cos_FS.shape
        self.n = 0
        self.parents_F = parents_F
        self.match_S = cos_FS.abs().argmax(0)  # SynthSAEBench: feature of each latent
        self.parent_latent_F = cos_FS.argmax(1)  # best latent of each feature
        self.split_cand_FS = cos_FS > SPLIT_COS
        self.sum_t = torch.zeros(F, dtype=torch.float64)
        self.sum_tt = torch.zeros(F, dtype=torch.float64)
        self.sum_c = torch.zeros(S, dtype=torch.float64)
        self.sum_cc = torch.zeros(S, dtype=torch.float64)
        self.sum_tc = torch.zeros(F, S, dtype=torch.float64)
        self.tp_S = torch.zeros(S, dtype=torch.float64)
        self.fires_S = torch.zeros(S, dtype=torch.float64)
        self.active_F = torch.zeros(F, dtype=torch.float64)
        self.fires_with_FS = torch.zeros(F, S, dtype=torch.float64)  # latent fires & feature on
        # absorption: parent latent firing with child c on / parent alone
        self.parent_hits_F = torch.zeros(F, dtype=torch.float64)
        self.alone_F = torch.zeros(F, dtype=torch.float64)
        self.alone_hits_F = torch.zeros(F, dtype=torch.float64)
        self.true_active_sum = 0.0

    def update(self, true_NF: torch.Tensor, codes_NS: torch.Tensor) -> None:
        t, c = true_NF.double(), codes_NS.double()
        on_NF, fires_NS = true_NF > 0, codes_NS > 0
        self.n += t.shape[0]
        self.sum_t += t.sum(0)
        self.sum_tt += t.pow(2).sum(0)
        self.sum_c += c.sum(0)
        self.sum_cc += c.pow(2).sum(0)
        self.sum_tc += t.T @ c
        self.tp_S += (fires_NS & on_NF[:, self.match_S]).sum(0)
        self.fires_S += fires_NS.sum(0)
        self.active_F += on_NF.sum(0)
        self.fires_with_FS += on_NF.double().T @ fires_NS.double()
        self.true_active_sum += float(on_NF.sum())
        # per feature f: does the latent matched to f's parent fire (child pairs)?
        child = self.parents_F >= 0
        parent_fires_NF = fires_NS[:, self.parent_latent_F[self.parents_F.clamp_min(0)]]
        self.parent_hits_F[child] += (on_NF & parent_fires_NF)[:, child].sum(0).double()
        # per parent p: vectors where p is on and none of its children is
        n_kids_on = torch.zeros(on_NF.shape[0], on_NF.shape[1], dtype=torch.int64)
        n_kids_on.index_add_(1, self.parents_F[child], on_NF[:, child].long())
        alone_NF = on_NF & (n_kids_on == 0)
        own_fires_NF = fires_NS[:, self.parent_latent_F]
        self.alone_F += alone_NF.sum(0)
        self.alone_hits_F += (alone_NF & own_fires_NF).sum(0)

    def true_l0(self) -> float:
        return self.true_active_sum / max(self.n, 1)

    def mcc(self) -> float:
        n = max(self.n, 1)
        cov_FS = self.sum_tc / n - torch.outer(self.sum_t / n, self.sum_c / n)
        sd_F = (self.sum_tt / n - (self.sum_t / n) ** 2).clamp_min(0).sqrt()
        sd_S = (self.sum_cc / n - (self.sum_c / n) ** 2).clamp_min(0).sqrt()
        denom = torch.outer(sd_F, sd_S)
        corr_FS = torch.where(denom > 0, cov_FS / denom.clamp_min(1e-300), torch.zeros_like(cov_FS))
        rows, cols = linear_sum_assignment(corr_FS.numpy(), maximize=True)
        matched = np.zeros(corr_FS.shape[0])  # features left unmatched (F > S) score 0
        matched[rows] = corr_FS.numpy()[rows, cols]
        return float(matched.mean())

    def f1(self) -> float:
        positives_S = self.active_F[self.match_S]
        precision = torch.where(self.fires_S > 0, self.tp_S / self.fires_S.clamp_min(1), 0.0)
        recall = torch.where(positives_S > 0, self.tp_S / positives_S.clamp_min(1), 0.0)
        total = precision + recall
        f1_S = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-300), 0.0)
        return float(f1_S.mean())

    def absorption(self, min_support: int) -> dict[str, int]:
        child = torch.nonzero(self.parents_F >= 0).squeeze(1)
        parent = self.parents_F[child]
        ok = (self.active_F[child] >= min_support) & (self.alone_F[parent] >= min_support)
        recall_child = self.parent_hits_F[child] / self.active_F[child].clamp_min(1)
        recall_alone = self.alone_hits_F[parent] / self.alone_F[parent].clamp_min(1)
        absorbed = ok & (recall_alone >= ABSORBED_RECALL) & (recall_child < ABSORBED_RECALL)
        return {"absorption": int(absorbed.sum()), "absorption_pairs": int(ok.sum())}

    def splitting(self, min_support: int) -> dict[str, int]:
        parents = torch.unique(self.parents_F[self.parents_F >= 0])
        precision_FS = self.fires_with_FS / self.fires_S.clamp_min(1)
        split = 0
        supported = parents[self.active_F[parents] >= min_support]
        for p in supported.tolist():
            detectors = self.split_cand_FS[p] & (precision_FS[p] >= SPLIT_PRECISION)
            split += int(detectors.sum() >= 2)
        return {"splitting": split, "split_parents": int(supported.numel())}
