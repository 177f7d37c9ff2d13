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
Pairs and parents enter the counts only when their feature fires on >= `min_support` vectors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
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

RECOVERED_COS = 0.9
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
    true_l0: float
    fvu: float
    mmcs: float
    recovered: float
    recovered_parents: float | None
    recovered_children: float | None
    recovered_others: float | None
    mcc: float
    f1: float
    absorption: int
    absorption_pairs: int
    splitting: int
    split_parents: int


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
        scores = score_sae(sae, Path(store), opts.min_support, opts.batch)
        results.append(DictionaryScores(run=str(run_dir), label=label, **scores))
    write_outputs(results, output_dir(cfg))
    for r in results:
        print(
            f"{r.label:<36} L0 {r.l0:6.2f}  MMCS {r.mmcs:.3f}  recovered {r.recovered:6.1%}"
            f"{_kinds_text(r)}  "
            f"MCC {r.mcc:.3f}  F1 {r.f1:.3f}  absorbed {r.absorption}/{r.absorption_pairs}  "
            f"split {r.splitting}/{r.split_parents}"
        )
    return results


def write_outputs(results: list[DictionaryScores], out: Path) -> None:
    """dictionary.json (one run: the scores at top level; a sweep: {"runs": [...]}) + CSV."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    payload = rows[0] if len(rows) == 1 else {"runs": rows}
    write_json(out / "dictionary.json", payload)
    write_csv(out / "dictionary.csv", list(rows[0]), rows)


def _kinds_text(r: DictionaryScores) -> str:
    if r.recovered_children is None:
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


@torch.no_grad()
def score_sae(sae: RawSpaceSAE, store_path: Path, min_support: int = 10, batch: int = 8192) -> dict:
    """Every score of the module docstring for one SAE (raw-space `load_sae` module)."""
    with Store(store_path) as store:
        truth = read_truth(store)
        n_images = truth["truth_vectors"] // store.n_patches
        x_ND = np.asarray(store.patches(0)[:n_images], dtype=np.float32)
    x_ND = torch.from_numpy(x_ND.reshape(-1, x_ND.shape[-1]))
    features_FD = torch.from_numpy(truth["features"])
    if features_FD.shape[1] != sae.d_model:
        raise TraitsaeError(
            f"store {store_path} holds {features_FD.shape[1]}-dim features but the SAE has "
            f"d_model={sae.meta['d_model']}; score it on the dictionary store it was trained on."
        )
    cos_FS = _unit_rows(features_FD) @ _unit_rows(sae.W_dec.detach().cpu()).T
    best_F = cos_FS.max(1).values
    parents_F = torch.from_numpy(truth["parents"])
    stats = _Streams(cos_FS, parents_F)
    fvu = FractionOfVarianceUnexplained(features_FD.shape[1])
    indptr, indices, values = truth["codes_indptr"], truth["codes_indices"], truth["codes_values"]
    for lo in range(0, x_ND.shape[0], batch):
        hi = min(lo + batch, x_ND.shape[0])
        codes_NS = sae.encode(x_ND[lo:hi]).float().cpu()
        fvu.update(sae.decode(codes_NS).float().cpu(), x_ND[lo:hi])
        true_NF = torch.zeros(hi - lo, features_FD.shape[0])
        a, b = int(indptr[lo]), int(indptr[hi])
        rows = np.repeat(np.arange(hi - lo), np.diff(indptr[lo : hi + 1]))
        true_NF[rows, indices[a:b]] = torch.from_numpy(values[a:b])
        stats.update(true_NF, codes_NS)
    return {
        "variant": str(sae.meta.get("variant", "")),
        "d_sae": int(cos_FS.shape[1]),
        "store": str(store_path),
        "n_vectors": int(x_ND.shape[0]),
        "l0": stats.l0(),
        "true_l0": stats.true_l0(),
        "fvu": float(fvu.compute()),
        "mmcs": float(best_F.mean()),
        "recovered": float((best_F > RECOVERED_COS).double().mean()),
        **recovered_by_kind(best_F, parents_F),
        "mcc": stats.mcc(),
        "f1": stats.f1(),
        **stats.absorption(min_support),
        **stats.splitting(min_support),
    }


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
        self.active_sum = 0.0
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
        self.active_sum += float(fires_NS.sum())
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

    def l0(self) -> float:
        return self.active_sum / max(self.n, 1)

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
