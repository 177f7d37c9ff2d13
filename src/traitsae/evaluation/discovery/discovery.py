"""`eval=discovery`: latents specific to one group of images and absent from another.

    python evaluate.py eval=discovery run=<run dir> dataset=butterflies \
        eval.group_a='{species: erato, subspecies: lativita}' \
        eval.group_b='{species: melpomene, subspecies: malleti}' eval.strata=[collection]

1. Groups are filters on the store's per-image metadata (column -> value or list of values);
   `eval.strata` names metadata columns whose combinations are strata (confounds).
2. One streaming pass encodes the images of both groups and keeps each latent's image-level
   score (max over patches; `eval.reduce=mean` also works): [n_a + n_b, d_sae] floats.
3. `discovery_stats.contrast` does the statistics on that matrix: held-out split, AUROC,
   permutation p-values within strata, BH q-values, candidates, confirmation.
4. Each candidate's heat-maps on its top images in its own group are scored by normalised
   entropy and Moran's I; triage score = alpha*specificity + beta*(-entropy) + gamma*Moran's I.
   Within each group: discoveries first, then confirmed candidates, each best triage score first.
5. `discovery_report` writes discovery.json, latents.csv, candidates.csv, figures/*.png and
   index.html into the run's output dir.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import figures, frames, heatmaps
from traitsae.evaluation.core.frames import ImageSource, image_source
from traitsae.evaluation.core.tokens import gather_codes, stream_codes
from traitsae.evaluation.discovery import report as discovery_report
from traitsae.evaluation.discovery.stats import CandidateStats, NullOptions, RankingRule, contrast

# Store columns that are bookkeeping, not metadata to group by.
_NOT_GROUPABLE = ("valid", "index", "error", "done")
_MAX_VALUES_LISTED = 25

# ----------------------------------------------------------------------------- groups


def parse_group(spec: Any, name: str) -> dict[str, list[str]]:
    """`{species: erato, subspecies: [lativita, notabilis]}` -> {column: [allowed values]}."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping) or not spec:
        raise TraitsaeError(
            f"eval.{name} must be a non-empty mapping of metadata column to value(s), e.g. "
            f"eval.{name}='{{species: erato, subspecies: lativita}}'; got {spec!r}."
        )
    group: dict[str, list[str]] = {}
    for column, values in spec.items():
        values = list(values) if isinstance(values, (list, tuple, ListConfig)) else [values]
        if not values:
            raise TraitsaeError(f"eval.{name}.{column} lists no values; give one or a list.")
        group[str(column)] = [str(v) for v in values]
    return group


def _value_counts(values: np.ndarray) -> str:
    counts = Counter(str(v) for v in values).most_common()
    listed = ", ".join(f"{v!r} ({n})" for v, n in counts[:_MAX_VALUES_LISTED])
    more = (
        f", ... and {len(counts) - _MAX_VALUES_LISTED} more"
        if len(counts) > _MAX_VALUES_LISTED
        else ""
    )
    return listed + more


def _column_listing(metadata: Mapping[str, np.ndarray]) -> str:
    valid_N = np.asarray(metadata["valid"], dtype=bool)
    return "; ".join(
        f"{c}: {_value_counts(np.asarray(metadata[c])[valid_N])}"
        for c in sorted(metadata)
        if c not in _NOT_GROUPABLE and c != "path"
    )


def group_mask(
    metadata: Mapping[str, np.ndarray], group: Mapping[str, list[str]], name: str, source: str
) -> np.ndarray:
    """Valid images matching every column of the group; errors list what is available."""
    valid_N = np.asarray(metadata["valid"], dtype=bool)
    mask_N = valid_N.copy()
    for column, allowed in group.items():
        if column not in metadata or column in _NOT_GROUPABLE:
            raise TraitsaeError(
                f"eval.{name} filters on column {column!r}, which store {source} does not have. "
                f"Available metadata columns (values with image counts): "
                f"{_column_listing(metadata)}."
            )
        mask_N &= np.isin(np.asarray(metadata[column]).astype(str), allowed)
    if not mask_N.any():
        listing = "; ".join(
            f"{c}: {_value_counts(np.asarray(metadata[c])[valid_N])}" for c in group
        )
        raise TraitsaeError(
            f"eval.{name}={dict(group)} selects no valid image of store {source}. Values present "
            f"in the filtered columns (with image counts): {listing}."
        )
    return mask_N


def parse_strata(spec: Any) -> list[str]:
    """eval.strata: null, one column name or a list of them."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, (list, tuple, ListConfig)) and all(isinstance(c, str) for c in spec):
        return list(spec)
    raise TraitsaeError(
        f"eval.strata must be a metadata column or a list of them, e.g. eval.strata=[collection]; "
        f"got {spec!r}."
    )


def strata_labels(
    metadata: Mapping[str, np.ndarray], columns: Sequence[str], source: str
) -> np.ndarray | None:
    """One label per store row, e.g. "collection=NHM, camera=D7000"; None without strata."""
    if not columns:
        return None
    missing = [c for c in columns if c not in metadata or c in _NOT_GROUPABLE]
    if missing:
        raise TraitsaeError(
            f"eval.strata names column(s) {missing} that store {source} does not have. Available "
            f"metadata columns (values with image counts): {_column_listing(metadata)}."
        )
    parts = [[f"{c}={v}" for v in np.asarray(metadata[c]).astype(str)] for c in columns]
    return np.array([", ".join(values) for values in zip(*parts, strict=True)])


def describe_group(group: Mapping[str, list[str]]) -> str:
    return ", ".join(f"{col}={'|'.join(vals)}" for col, vals in group.items())


# ----------------------------------------------------------------------------- the pass


@dataclass
class GroupScores:
    """Image-level scores of every latent on the images of both groups."""

    image_index: np.ndarray  # [n] store rows, increasing
    in_a: np.ndarray  # [n] bool (False = group B)
    scores_NS: np.ndarray  # [n, S] float32


def collect_scores(
    store: Any,
    sae: Any,
    mask_a: np.ndarray,
    mask_b: np.ndarray,
    *,
    reduce: str = "max",
    batch_patches: int = 4096,
    device: str = "cpu",
    progress: bool = True,
) -> GroupScores:
    """The single streaming pass over the store: image-level scores of both groups."""
    if reduce not in ("max", "mean"):
        raise TraitsaeError(f"eval.reduce must be 'max' or 'mean', got {reduce!r}.")
    wanted_N = mask_a | mask_b
    index_parts, score_parts = [], []
    with tqdm(
        total=int(wanted_N.sum()), desc="encoding groups", unit="img", disable=not progress
    ) as bar:
        for batch in stream_codes(
            store, sae, wanted_N=wanted_N, batch_patches=batch_patches, device=device
        ):
            codes_BPS = batch.codes_BPS
            pooled_BS = codes_BPS.amax(dim=1) if reduce == "max" else codes_BPS.mean(dim=1)
            index_parts.append(batch.image_index)
            score_parts.append(pooled_BS.cpu().numpy().astype(np.float32))
            bar.update(len(batch.image_index))
    image_index = np.concatenate(index_parts)
    return GroupScores(image_index, mask_a[image_index], np.concatenate(score_parts))


# ----------------------------------------------------------------------------- candidates


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

    def row(self) -> dict[str, Any]:
        """Flat dict: the contract's keys first, then every statistic, then the heat-map lists."""
        stats = asdict(self.stats)
        head = {"rank": self.rank, **{k: stats.pop(k) for k in ("latent", "group")}}
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


HeatMaps = dict[tuple[int, int], np.ndarray]  # (store row, latent) -> [rows, cols] codes


def build_candidates(
    store: Any,
    sae: Any,
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


# ----------------------------------------------------------------------------- figures


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
    label_col = frames.caption_column(labels)

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


# ----------------------------------------------------------------------------- entry point


def configured_groups(cfg: DictConfig) -> dict[str, Any]:
    """eval.group_a / eval.group_b, defaulting to the dataset's own contrast pair
    (`dataset.contrast: {group_a: {...}, group_b: {...}}`, e.g. the demo's Alpha vs Beta)."""
    contrast_pair = cfg.dataset.get("contrast") or {}
    return {name: cfg.eval.get(name) or contrast_pair.get(name) for name in ("group_a", "group_b")}


def null_options(cfg: DictConfig) -> NullOptions:
    keys = ("n_permutations", "max_permutations", "alpha", "confirm", "min_group")
    return NullOptions(**{k: cfg.eval[k] for k in keys}, seed=int(cfg.seed))


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python evaluate.py eval=discovery run=<run dir> eval.group_a=... eval.group_b=...`."""
    from traitsae.evaluation.core.sources import eval_store, output_dir, resolve_sae

    group_a, group_b = (parse_group(spec, name) for name, spec in configured_groups(cfg).items())
    rule = RankingRule(
        **{k: cfg.eval[k] for k in ("min_support", "dense_rate", "min_auroc", "n_candidates")}
    )
    null = null_options(cfg)
    strata = parse_strata(cfg.eval.get("strata"))
    weights = heatmaps.TriageWeights(**OmegaConf.to_container(cfg.eval.weights, resolve=True))
    sae = resolve_sae(cfg)
    sae.eval().to(cfg.device)
    out = output_dir(cfg)
    with eval_store(cfg, sae, cfg.eval.get("split") or cfg.split) as store:
        result = discover(
            store,
            sae,
            group_a,
            group_b,
            rule,
            weights,
            out,
            null=null,
            strata=strata,
            n_top_images=int(cfg.eval.n_top_images),
            reduce=str(cfg.eval.reduce),
            fire_threshold=float(cfg.eval.fire_threshold),
            batch_patches=int(cfg.eval.batch_patches),
            device=str(cfg.device),
            images=image_source(cfg, store),
        )
    print(f"\ndiscovery report: {out / 'index.html'}")
    return result


def discover(
    store: Any,
    sae: Any,
    group_a: dict[str, list[str]],
    group_b: dict[str, list[str]],
    rule: RankingRule,
    weights: heatmaps.TriageWeights,
    out: Path,
    *,
    null: NullOptions | None = None,
    strata: Sequence[str] = (),
    n_top_images: int = 6,
    reduce: str = "max",
    fire_threshold: float = 0.0,
    batch_patches: int = 4096,
    device: str = "cpu",
    images: ImageSource,
) -> dict[str, Any]:
    """The whole evaluation on an open store; writes every output into `out`."""
    null = null or NullOptions()
    metadata = store.metadata
    mask_a = group_mask(metadata, group_a, "group_a", str(store.path))
    mask_b = group_mask(metadata, group_b, "group_b", str(store.path))
    if (overlap := int((mask_a & mask_b).sum())) > 0:
        raise TraitsaeError(
            f"eval.group_a={group_a} and eval.group_b={group_b} share {overlap} "
            "images; the groups must be disjoint to contrast them."
        )
    names = {"a": describe_group(group_a), "b": describe_group(group_b)}
    strata_all = strata_labels(metadata, strata, str(store.path))
    scores = collect_scores(
        store, sae, mask_a, mask_b, reduce=reduce, batch_patches=batch_patches, device=device
    )
    result = contrast(
        scores.scores_NS,
        scores.in_a,
        rule,
        null,
        strata_N=None if strata_all is None else strata_all[scores.image_index],
        fire_threshold=fire_threshold,
        names=names,
    )
    candidates, maps = build_candidates(
        store, sae, scores, result.candidates, weights, n_top_images, device
    )
    settings = {
        **asdict(rule),
        "weights": asdict(weights),
        "reduce": reduce,
        "fire_threshold": fire_threshold,
        "n_top_images": n_top_images,
        "strata": list(strata),
        "seed": null.seed,
        "d_sae": int(scores.scores_NS.shape[1]),
        "store": str(store.path),
    }
    groups = {
        g: {"filter": spec, "name": names[g], "n_images": int(mask.sum())}
        for g, spec, mask in (("a", group_a, mask_a), ("b", group_b, mask_b))
    }
    out.mkdir(parents=True, exist_ok=True)
    for cand in candidates:
        rel = Path("figures") / f"{cand.stats.group}_{cand.rank:02d}_latent{cand.stats.latent}.png"
        candidate_figure(cand, maps, metadata, names, images, scores, out / rel)
        cand.figure = rel.as_posix()
    return discovery_report.write_outputs(out, candidates, result, groups, settings)
