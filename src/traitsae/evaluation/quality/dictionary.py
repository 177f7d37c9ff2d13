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

from traitsae.data.dictionary import read_truth
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.outputs import write_csv, write_json
from traitsae.evaluation.core.runs import find_runs, run_labels
from traitsae.evaluation.core.sae import load_eval_sae
from traitsae.evaluation.core.sources import output_dir, sae_source
from traitsae.evaluation.quality.dictionary_codes import CodeStreams, true_codes
from traitsae.sae.export import RawSpaceSAE
from traitsae.sae.metrics import FractionOfVarianceUnexplained

log = logging.getLogger(__name__)

RECOVERED_COS = 0.9
FEATURES_ONLY_VECTORS = 65_536  # vectors L0 and FVU are measured on when no true codes are stored
NEEDS_CODES = ("true_l0", "mcc", "f1", "absorption", "absorption_pairs", "splitting",
               "split_parents")  # fmt: skip


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
    stats = CodeStreams(cos_FS, parents_F) if has_codes else None
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
