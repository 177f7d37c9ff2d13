"""Replication of discovery candidates in other SAEs (`eval.replicates=[<run>, ...]` or a
sweep dir): is a candidate a property of the images, or an accident of one SAE's seed?

1. Each candidate latent of the SAE under test is matched to the replicate latent whose
   decoder direction has the largest cosine with its own. A match needs cosine >=
   max(eval.match_cosine, chance): 0.7 by default (cos^2 >= 0.49: about half of one direction
   lies along the other), and never below `chance_cosine`, the 99.9 % quantile of the best
   cosine an unrelated random direction reaches among the replicate's d_sae latents in d_model
   dimensions (about 0.19 for d_model 768 and 16k latents, but 0.8 for a 16-dim toy).
2. The matched latent is re-tested on the candidate's own contrast, on the held-out
   confirmation images (the candidate was chosen on the selection images, which would favour
   it): its AUROC and a one-sided permutation p in the candidate's direction.
3. BH over every (candidate, replicate) re-test of the run together; a candidate replicates in
   a replicate when it has a match there and that q <= alpha.

Replicates of the same backbone at another width or layer are allowed (noted: a latent may
split or merge across widths, and directions of other layers are compared in the same
residual space); another backbone is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from scipy.stats import beta

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.runs import find_runs, run_labels
from traitsae.evaluation.core.sae import load_eval_sae
from traitsae.evaluation.discovery.candidates import Candidate, GroupScores
from traitsae.evaluation.discovery.evidence import direction, directional_test
from traitsae.evaluation.discovery.null import NullOptions, bh_qvalues
from traitsae.evaluation.discovery.stats import Contrast
from traitsae.sae.export import RawSpaceSAE

CHANCE_QUANTILE = 0.999


@dataclass
class Replicate:
    """Another SAE to replicate candidates in, with what makes a match there."""

    label: str
    path: str
    sae: RawSpaceSAE
    threshold: float  # cosine a match needs: max(eval.match_cosine, chance_cosine)
    chance_cosine: float
    note: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "replicate": self.label,
            "path": self.path,
            "backbone": self.sae.backbone,
            "layer": self.sae.layer,
            "d_sae": self.sae.d_sae,
            "chance_cosine": self.chance_cosine,
            "threshold": self.threshold,
            "note": self.note,
        }


def chance_cosine(d_model: int, d_sae: int, quantile: float = CHANCE_QUANTILE) -> float:
    """The `quantile` of max_j cos(u, w_j) for a random unit u against d_sae random unit w_j in
    d_model dims. cos^2 of two random unit vectors ~ Beta(1/2, (d_model - 1)/2) and the sign is
    symmetric, so P(cos >= t) = P(cos^2 >= t^2) / 2 for t > 0, and the d_sae draws are
    independent: P(max < t) = (1 - P(cos >= t))^d_sae."""
    tail = -math.expm1(math.log(quantile) / d_sae)  # P(cos >= t) for one latent
    return float(math.sqrt(beta.isf(2 * tail, 0.5, (d_model - 1) / 2)))


def replicate_paths(spec: Any) -> list[Path]:
    """eval.replicates: a run dir, sae.json, another library's checkpoint or a sweep dir, or a
    list of them."""
    if spec is None:
        return []
    entries = [spec] if isinstance(spec, (str, Path)) else spec
    if not isinstance(entries, (list, tuple, ListConfig)):
        raise TraitsaeError(
            f"eval.replicates must be a run dir, a sweep dir or a list of them, e.g. "
            f"eval.replicates=[runs/seed1,runs/seed2]; got {spec!r}."
        )
    paths = []
    for entry in entries:
        if not Path(str(entry)).exists():
            raise TraitsaeError(
                f"eval.replicates names {entry}, which does not exist. Give train.py run dirs "
                "(holding sae.json), sae.json files or a sweep dir of other SAEs trained on the "
                "same backbone (other seeds, widths or layers)."
            )
        paths.extend(find_runs(str(entry)))
    return paths


def load_replicates(
    cfg: DictConfig, spec: Any, main: RawSpaceSAE, match_cosine: float
) -> list[Replicate]:
    """The replicate SAEs (loaded like the SAE under test), the SAE under test itself left out;
    another backbone is an error, another width or layer a note."""
    if not 0 < match_cosine <= 1:
        raise TraitsaeError(
            f"eval.match_cosine={match_cosine} must be in (0, 1]: the decoder cosine a "
            "replicate latent needs to count as the candidate's match (default 0.7)."
        )
    main_json = main.json_path.resolve() if main.json_path else None
    loaded = []
    for path in replicate_paths(spec):
        sae = load_eval_sae(cfg, path)
        if main_json is not None and sae.json_path and sae.json_path.resolve() == main_json:
            continue  # a sweep dir holding the SAE under test: it would match itself
        loaded.append((path, sae))
    labels = run_labels([path for path, _ in loaded])
    replicates = []
    for (path, sae), label in zip(loaded, labels, strict=True):
        if sae.backbone != main.backbone or sae.d_model != main.d_model:
            raise TraitsaeError(
                f"eval.replicates: {path} was trained on {sae.backbone!r} activations "
                f"(d_model {sae.d_model}), the SAE under test on {main.backbone!r} (d_model "
                f"{main.d_model}); decoder directions of different backbones live in "
                "different spaces and cannot be matched. Give replicates of the same backbone."
            )
        notes = []
        if sae.layer != main.layer:
            notes.append(
                f"layer {sae.layer}, not {main.layer}: directions are compared across layers of "
                "the residual stream, a looser match than across seeds"
            )
        if sae.d_sae != main.d_sae:
            notes.append(
                f"width {sae.d_sae}, not {main.d_sae}: a latent may split or merge across widths, "
                "so the best match may carry only part of the candidate"
            )
        chance = chance_cosine(sae.d_model, sae.d_sae)
        replicates.append(
            Replicate(label, str(path), sae, max(match_cosine, chance), chance, "; ".join(notes))
        )
    return replicates


def match_latents(
    main: RawSpaceSAE, replicate: RawSpaceSAE, latents: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """For each latent of `main`: the replicate latent with the largest decoder cosine, and
    that cosine."""
    with torch.no_grad():
        mine_CD = torch.nn.functional.normalize(main.W_dec[list(latents)].float().cpu(), dim=1)
        theirs_SD = torch.nn.functional.normalize(replicate.W_dec.float().cpu(), dim=1)
        best_C, match_C = (mine_CD @ theirs_SD.T).max(dim=1)  # [C, S'] -> [C]
    return match_C.numpy(), best_C.numpy().astype(np.float64)


ImageScores = tuple[np.ndarray, np.ndarray]  # (store rows [U] increasing, scores [U, S'])


def replicate_candidates(
    replicates: Sequence[Replicate],
    main: RawSpaceSAE,
    found: Sequence[tuple[list[Candidate], GroupScores, Contrast]],
    replicate_scores: Callable[[Replicate], ImageScores],
    null: NullOptions,
) -> None:
    """Match and re-test every candidate of every contrast in every replicate; sets each
    candidate's `replicates`, `replicated_in` and `n_replicates` (module docstring)."""
    if not replicates:
        return
    for candidates, _, _ in found:
        for cand in candidates:
            cand.replicates, cand.n_replicates = [], len(replicates)
    for r, rep in enumerate(replicates):
        rows_U, scores_US = replicate_scores(rep)
        for k, (candidates, scores, result) in enumerate(found):
            if not candidates:
                continue
            # The held-out images the candidates were not chosen on (all of them without one).
            part_N = ~result.selection_N if null.confirm > 0 else np.ones_like(scores.in_a)
            positions = np.searchsorted(rows_U, scores.image_index[part_N])
            match_C, cosine_C = match_latents(main, rep.sae, [c.stats.latent for c in candidates])
            codes_N = result.codes_N if result.codes_N is not None else np.zeros(len(part_N), int)
            auroc_C, p_C = directional_test(
                scores_US[positions][:, match_C],
                scores.in_a[part_N],
                codes_N[part_N],
                direction([c.stats for c in candidates]),
                null,
                np.random.default_rng([null.seed, k, r, 1]),
            )
            for j, cand in enumerate(candidates):
                assert cand.replicates is not None
                cand.replicates.append(
                    {
                        "replicate": rep.label,
                        "latent": int(match_C[j]),
                        "cosine": float(cosine_C[j]),
                        "matched": bool(cosine_C[j] >= rep.threshold),
                        "auroc": float(auroc_C[j]),
                        "p_value": None if np.isnan(p_C[j]) else float(p_C[j]),
                        "q_value": None,
                        "replicated": None,
                    }
                )
    replication_fdr([c for candidates, _, _ in found for c in candidates], null)


def replication_fdr(candidates: Sequence[Candidate], null: NullOptions) -> None:
    """BH over the re-tests of matched latents of all candidates and replicates together;
    without a null (n_permutations=0) nothing is called replicated."""
    tests = [
        t
        for cand in candidates
        for t in cand.replicates or []
        if t["matched"] and t["p_value"] is not None
    ]
    q_T = bh_qvalues(np.array([t["p_value"] for t in tests]))
    for test, q in zip(tests, q_T, strict=True):
        test["q_value"], test["replicated"] = float(q), bool(q <= null.alpha)
    for cand in candidates:
        if null.n_permutations:
            for test in cand.replicates or []:
                test["replicated"] = bool(test["replicated"])
            cand.replicated_in = sum(t["replicated"] for t in cand.replicates or [])
