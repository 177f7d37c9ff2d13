"""Discovery candidates: the chosen latents' heat-maps on their top images, scored for
triage (entropy, Moran's I) and put in evidence order, and the figure of each."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.data.store import Store
from traitsae.evaluation.core import figures, heatmaps
from traitsae.evaluation.core.frames import ImageSource
from traitsae.evaluation.core.labels import caption_column
from traitsae.evaluation.core.tokens import gather_codes
from traitsae.evaluation.discovery.ranking import CandidateStats
from traitsae.sae.export import RawSpaceSAE


@dataclass
class GroupScores:
    """Image-level scores of every latent on the images of both groups."""

    image_index: np.ndarray  # [n] store rows, increasing
    in_a: np.ndarray  # [n] bool (False = group B)
    scores_NS: np.ndarray  # [n, S] float32


HeatMaps = dict[tuple[int, int], np.ndarray]  # (store row, latent) -> [rows, cols] codes


@dataclass
class Candidate:
    """A candidate's statistics plus what its heat-maps say, and where they are drawn."""

    stats: CandidateStats
    entropy: float
    morans_i: float
    score: float  # triage score
    top_rows: list[int]  # store rows of its top images in its own group
    top_rows_other: list[int]  # ... and in the other group
    top_images: list[str]
    top_images_other: list[str]
    rank: int = 0
    figure: str = ""
    pair: str | None = None  # the pair of eval.pairs it belongs to (None: a single pair)
    replicates: list[dict[str, Any]] | None = None  # its match in each replicate SAE
    replicated_in: int | None = None  # replicates where it replicated (matched, q <= alpha)
    n_replicates: int | None = None

    def row(self) -> dict[str, Any]:
        """Flat dict: the contract's keys first, then every statistic, then the heat-map lists
        (and, where eval.replicates ran, the replication)."""
        stats = asdict(self.stats)
        head = {"rank": self.rank, **{k: stats.pop(k) for k in ("latent", "group")}}
        if self.pair is not None:
            head = {"pair": self.pair, **head}
        replication = (
            {
                "replicated_in": self.replicated_in,
                "n_replicates": self.n_replicates,
                "replicates": self.replicates,
            }
            if self.replicates is not None
            else {}
        )
        numbers = {k: stats.pop(k) for k in ("auroc", "rate_a", "rate_b", "mean_a", "mean_b")}
        triage = {"entropy": self.entropy, "morans_i": self.morans_i, "score": self.score}
        return {
            **head,
            **numbers,
            **triage,
            "top_images": self.top_images,
            **stats,
            "top_images_other": self.top_images_other,
            "figure": self.figure,
            **replication,
        }


def top_rows(
    scores: GroupScores, latent: int, in_group_N: np.ndarray, k: int, positive_only: bool
) -> np.ndarray:
    """Store rows of the k highest-scoring images of one group for one latent."""
    values_n = scores.scores_NS[in_group_N, latent]
    rows_n = scores.image_index[in_group_N]
    order = np.argsort(-values_n, kind="stable")[:k]
    if positive_only:
        order = order[values_n[order] > 0]
    return rows_n[order]


def evidence_order(candidates: list[Candidate]) -> list[Candidate]:
    """Group A's candidates then B's; within each, discoveries first, then confirmed ones,
    each best triage score first; ranks from 1."""
    ranked: list[Candidate] = []
    for group in ("a", "b"):
        mine = sorted(
            (c for c in candidates if c.stats.group == group),
            key=lambda c: (not c.stats.discovery, not c.stats.confirmed, -c.score),
        )
        for i, cand in enumerate(mine, start=1):
            cand.rank = i
        ranked.extend(mine)
    return ranked


def build_candidates(
    store: Store,
    sae: RawSpaceSAE,
    scores: GroupScores,
    chosen: Sequence[CandidateStats],
    weights: heatmaps.TriageWeights,
    n_top_images: int,
    device: str = "cpu",
) -> tuple[list[Candidate], HeatMaps]:
    """Score the chosen latents' heat-maps on their top images (over all images of the groups)
    and put them in evidence order; also returns the heat-maps the figures draw.
    A latent that never fires in its own group has no heat-map to judge and is dropped."""
    paths = np.asarray(store.metadata["path"]).astype(str)
    plan = []  # (stats, own top rows, other group's top rows)
    for stats in chosen:
        own_N = scores.in_a if stats.group == "a" else ~scores.in_a
        own = top_rows(scores, stats.latent, own_N, n_top_images, positive_only=True)
        other = top_rows(scores, stats.latent, ~own_N, n_top_images, positive_only=False)
        if len(own):
            plan.append((stats, own, other))
    latents = sorted({stats.latent for stats, _, _ in plan})
    rows = np.array([row for _, own, other in plan for row in (*own, *other)], dtype=np.int64)
    codes = gather_codes(store, sae, rows, np.array(latents, dtype=np.int64), device)
    grid = tuple(int(g) for g in store.grid)
    maps: HeatMaps = {
        (row, latent): codes[row][:, j].reshape(grid)
        for row in codes
        for j, latent in enumerate(latents)
    }
    candidates = []
    for stats, own, other in plan:
        maps_NRC = np.stack([maps[int(r), stats.latent] for r in own])
        entropy = float(heatmaps.normalised_entropy(maps_NRC.reshape(len(own), -1)).mean())
        moran = float(heatmaps.morans_i(maps_NRC).mean())
        candidates.append(
            Candidate(
                stats=stats,
                entropy=entropy,
                morans_i=moran,
                score=float(heatmaps.triage_score(stats.specificity, entropy, moran, weights)),
                top_rows=own.tolist(),
                top_rows_other=other.tolist(),
                top_images=paths[own].tolist(),
                top_images_other=paths[other].tolist(),
            )
        )
    return evidence_order(candidates), maps


def candidate_figure(
    cand: Candidate,
    maps: HeatMaps,
    labels: Mapping[str, np.ndarray],
    group_names: Mapping[str, str],
    images: ImageSource,
    scores: GroupScores,
    out_path: Path,
) -> Path:
    """Top images of the candidate's group over the other group's top images, shared scale."""
    stats = cand.stats
    score_of = dict(
        zip(scores.image_index.tolist(), scores.scores_NS[:, stats.latent].tolist(), strict=True)
    )
    label_col = caption_column(labels)

    def panels(rows: list[int], paths: list[str]) -> list[figures.Panel]:
        return [
            figures.Panel(
                images.load(path),
                maps[row, stats.latent],
                f"{labels[label_col][row] + ' ' if label_col else ''}#{row} "
                f"max={score_of[row]:.2f}",
            )
            for row, path in zip(rows, paths, strict=True)
        ]

    other = "b" if stats.group == "a" else "a"
    evidence = "" if stats.q_value is None else f", q {stats.q_value:.2g}"
    if stats.confirmed is not None:
        evidence += ", confirmed" if stats.confirmed else ", not confirmed"
    title = (
        f"latent {stats.latent}: specific to group {stats.group.upper()} "
        f"(AUROC {stats.auroc:.2f}{evidence}, rate A {stats.rate_a:.2f} / B {stats.rate_b:.2f}, "
        f"H {cand.entropy:.2f}, I {cand.morans_i:.2f})"
    )
    return figures.plot_panel_rows(
        [
            (
                f"{stats.group.upper()}: {group_names[stats.group]}",
                panels(cand.top_rows, cand.top_images),
            ),
            (
                f"{other.upper()}: {group_names[other]}",
                panels(cand.top_rows_other, cand.top_images_other),
            ),
        ],
        out_path,
        title,
    )
