"""`eval=discovery`: latents specific to one group of images and absent from another.

    python evaluate.py eval=discovery run=<run dir> dataset=butterflies \
        eval.group_a='{species: erato, subspecies: lativita}' \
        eval.group_b='{species: melpomene, subspecies: malleti}'

1. Groups are filters on the store's per-image metadata (column -> value or list of values).
2. One streaming pass encodes the images of both groups and keeps each latent's image-level
   score (max over patches; `eval.reduce=mean` also works): [n_a + n_b, d_sae] floats.
3. Per latent: firing rate and mean score in each group, AUROC of A vs B (Mann-Whitney, ties
   averaged). Specificity to A is the AUROC, to B it is 1 - AUROC. Eligible for A: fires on at
   least `min_support` of A, specificity >= `min_auroc`, and not dense (firing on >= `dense_rate`
   of both groups). The `n_candidates` most specific eligible latents per group go on.
4. Each candidate's heat-maps on its top images in its own group are scored by normalised
   entropy and Moran's I; triage score = alpha*specificity + beta*(-entropy) + gamma*Moran's I
   orders the candidates (best first within each group).
5. Outputs in the run's output dir: discovery.json, latents.csv (every latent), candidates.csv,
   figures/*.png (top images of the candidate's group over the other group's top images),
   index.html.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from traitsae.errors import TraitsaeError
from traitsae.evaluation import heatmaps
from traitsae.evaluation.encode import gather_codes, stream_codes
from traitsae.evaluation.heatmaps import ImageSource
from traitsae.evaluation.report import Card, write_report

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


def group_mask(
    metadata: Mapping[str, np.ndarray], group: Mapping[str, list[str]], name: str, source: str
) -> np.ndarray:
    """Valid images matching every column of the group; errors list what is available."""
    valid_N = np.asarray(metadata["valid"], dtype=bool)
    columns = sorted(c for c in metadata if c not in _NOT_GROUPABLE)
    mask_N = valid_N.copy()
    for column, allowed in group.items():
        if column not in metadata or column in _NOT_GROUPABLE:
            listing = "; ".join(
                f"{c}: {_value_counts(np.asarray(metadata[c])[valid_N])}"
                for c in columns
                if c != "path"
            )
            raise TraitsaeError(
                f"eval.{name} filters on column {column!r}, which store {source} does not have. "
                f"Available metadata columns (values with image counts): {listing}."
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


# ----------------------------------------------------------------------------- statistics


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
) -> GroupScores:
    """The single streaming pass over the store: image-level scores of both groups."""
    if reduce not in ("max", "mean"):
        raise TraitsaeError(f"eval.reduce must be 'max' or 'mean', got {reduce!r}.")
    index_parts, score_parts = [], []
    for batch in stream_codes(
        store, sae, wanted_N=mask_a | mask_b, batch_patches=batch_patches, device=device
    ):
        pooled_BS = batch.codes_BPS.amax(dim=1) if reduce == "max" else batch.codes_BPS.mean(dim=1)
        index_parts.append(batch.image_index)
        score_parts.append(pooled_BS.cpu().numpy().astype(np.float32))
    image_index = np.concatenate(index_parts)
    return GroupScores(image_index, mask_a[image_index], np.concatenate(score_parts))


def auroc_per_column(
    scores_NS: np.ndarray, positive_N: np.ndarray, block_elements: int = 2**22
) -> np.ndarray:
    """AUROC of every column for positives vs the rest, via the Mann-Whitney U statistic.

    Ties (many latents are exactly 0 on most images) get average ranks, which is what
    sklearn's roc_auc_score computes; all columns at once instead of a loop over latents.
    """
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive_N.sum()), int((~positive_N).sum())
    if n_pos == 0 or n_neg == 0:
        raise TraitsaeError("AUROC needs images in both groups.")
    # Column blocks of ~block_elements ranks bound the float64 temporaries (32 MiB by default).
    step = max(1, block_elements // max(1, len(scores_NS)))
    u_S = (
        np.concatenate(
            [
                rankdata(scores_NS[:, lo : lo + step], axis=0, method="average")[positive_N].sum(
                    axis=0
                )
                for lo in range(0, scores_NS.shape[1], step)
            ]
        )
        - n_pos * (n_pos + 1) / 2
    )
    return u_S / (n_pos * n_neg)


@dataclass
class LatentStats:
    """Per-latent group statistics, arrays of length d_sae."""

    rate_a: np.ndarray
    rate_b: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray
    support_a: np.ndarray  # images of A where the latent fires
    support_b: np.ndarray
    auroc: np.ndarray  # A (positive) vs B


def latent_stats(scores: GroupScores, fire_threshold: float = 0.0) -> LatentStats:
    in_a_N, scores_NS = scores.in_a, scores.scores_NS
    fires_NS = scores_NS > fire_threshold
    support_a, support_b = fires_NS[in_a_N].sum(axis=0), fires_NS[~in_a_N].sum(axis=0)
    return LatentStats(
        rate_a=support_a / in_a_N.sum(),
        rate_b=support_b / (~in_a_N).sum(),
        mean_a=scores_NS[in_a_N].mean(axis=0),
        mean_b=scores_NS[~in_a_N].mean(axis=0),
        support_a=support_a,
        support_b=support_b,
        auroc=auroc_per_column(scores_NS, in_a_N),
    )


@dataclass(frozen=True)
class RankingRule:
    min_support: float = 0.2  # fraction of the own group where the latent must fire
    dense_rate: float = 0.9  # firing on >= this fraction of both groups = dense, excluded
    min_auroc: float = 0.8  # specificity floor
    n_candidates: int = 10  # per group


def dense_latents(stats: LatentStats, rule: RankingRule) -> np.ndarray:
    return (stats.rate_a >= rule.dense_rate) & (stats.rate_b >= rule.dense_rate)


def rank_by_specificity(stats: LatentStats, group: str, rule: RankingRule) -> np.ndarray:
    """Eligible latents for `group` ('a' or 'b'), most specific first (ties: larger rate gap)."""
    spec_S = stats.auroc if group == "a" else 1.0 - stats.auroc
    own_rate, other_rate = (
        (stats.rate_a, stats.rate_b) if group == "a" else (stats.rate_b, stats.rate_a)
    )
    eligible_S = (
        (own_rate >= rule.min_support) & (spec_S >= rule.min_auroc) & ~dense_latents(stats, rule)
    )
    latents = np.flatnonzero(eligible_S)
    order = np.lexsort((-(own_rate - other_rate)[latents], -spec_S[latents]))
    return latents[order][: rule.n_candidates]


# ----------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    rank: int
    latent: int
    group: str
    auroc: float
    specificity: float
    rate_a: float
    rate_b: float
    mean_a: float
    mean_b: float
    support: int
    entropy: float
    morans_i: float
    score: float
    top_images: list[str]
    top_images_other: list[str]
    top_rows: list[int]
    top_rows_other: list[int]
    figure: str = ""


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


def make_candidate(
    group: str,
    latent: int,
    own: np.ndarray,
    other: np.ndarray,
    maps_NRC: np.ndarray,
    stats: LatentStats,
    paths: np.ndarray,
    weights: heatmaps.TriageWeights,
) -> Candidate:
    """One candidate's numbers; `maps_NRC` are its heat-maps on its own group's top images."""
    entropy = float(heatmaps.normalised_entropy(maps_NRC.reshape(len(maps_NRC), -1)).mean())
    moran = float(heatmaps.morans_i(maps_NRC).mean())
    spec = float(stats.auroc[latent] if group == "a" else 1 - stats.auroc[latent])
    support = stats.support_a[latent] if group == "a" else stats.support_b[latent]
    return Candidate(
        rank=0,
        latent=latent,
        group=group,
        auroc=float(stats.auroc[latent]),
        specificity=spec,
        rate_a=float(stats.rate_a[latent]),
        rate_b=float(stats.rate_b[latent]),
        mean_a=float(stats.mean_a[latent]),
        mean_b=float(stats.mean_b[latent]),
        support=int(support),
        entropy=entropy,
        morans_i=moran,
        score=float(heatmaps.triage_score(spec, entropy, moran, weights)),
        top_images=paths[own].tolist(),
        top_images_other=paths[other].tolist(),
        top_rows=own.tolist(),
        top_rows_other=other.tolist(),
    )


def rank_by_score(candidates: list[Candidate]) -> list[Candidate]:
    """Group A's candidates then B's, each best triage score first, ranks from 1."""
    ranked: list[Candidate] = []
    for group in ("a", "b"):
        mine = sorted((c for c in candidates if c.group == group), key=lambda c: -c.score)
        for i, cand in enumerate(mine, start=1):
            cand.rank = i
        ranked.extend(mine)
    return ranked


def build_candidates(
    store: Any,
    sae: Any,
    scores: GroupScores,
    stats: LatentStats,
    rule: RankingRule,
    weights: heatmaps.TriageWeights,
    n_top_images: int,
    device: str = "cpu",
) -> tuple[list[Candidate], dict[int, np.ndarray]]:
    """Pick candidates per group, score their heat-maps, order by triage score.

    Returns the candidates and the codes their figures need: {store row: [P, n_latents]}, columns
    in the order of the sorted unique candidate latents.
    """
    paths = np.asarray(store.metadata["path"]).astype(str)
    plan = []  # (group, latent, own top rows, other group's top rows)
    for group in ("a", "b"):
        own_N = scores.in_a if group == "a" else ~scores.in_a
        for latent in rank_by_specificity(stats, group, rule):
            own = top_rows(scores, int(latent), own_N, n_top_images, positive_only=True)
            other = top_rows(scores, int(latent), ~own_N, n_top_images, positive_only=False)
            if len(own):  # a latent that never fires has no heat-map to judge
                plan.append((group, int(latent), own, other))
    latents = np.array(sorted({latent for _, latent, _, _ in plan}), dtype=np.int64)
    rows = [row for _, _, own, other in plan for row in (*own, *other)]
    codes = gather_codes(store, sae, np.asarray(rows, dtype=np.int64), latents, device)
    column = {int(latent): j for j, latent in enumerate(latents)}
    grid = tuple(int(g) for g in store.grid)
    candidates = [
        make_candidate(
            group,
            latent,
            own,
            other,
            np.stack([codes[int(r)][:, column[latent]].reshape(grid) for r in own]),
            stats,
            paths,
            weights,
        )
        for group, latent, own, other in plan
    ]
    return rank_by_score(candidates), codes


# ----------------------------------------------------------------------------- figures


def candidate_figure(
    cand: Candidate,
    codes: dict[int, np.ndarray],
    latent_column: int,
    grid: tuple[int, int],
    labels: Mapping[str, np.ndarray],
    group_names: Mapping[str, str],
    images: ImageSource,
    out_path: Path,
    scores: GroupScores,
) -> Path:
    """Top images of the candidate's group over the other group's top images, shared scale."""
    score_of = dict(
        zip(scores.image_index.tolist(), scores.scores_NS[:, cand.latent].tolist(), strict=True)
    )
    label_col = heatmaps.caption_column(labels)

    def panels(rows: list[int], paths: list[str]) -> list[heatmaps.Panel]:
        out = []
        for row, path in zip(rows, paths, strict=True):
            tag = f"{labels[label_col][row]} " if label_col else ""
            out.append(
                heatmaps.Panel(
                    images.load(path),
                    codes[row][:, latent_column].reshape(grid),
                    f"{tag}#{row} max={score_of[row]:.2f}",
                )
            )
        return out

    other = "b" if cand.group == "a" else "a"
    title = (
        f"latent {cand.latent}: specific to group {cand.group.upper()} "
        f"(AUROC {cand.auroc:.2f}, rate A {cand.rate_a:.2f} / B {cand.rate_b:.2f}, "
        f"H {cand.entropy:.2f}, I {cand.morans_i:.2f})"
    )
    return heatmaps.plot_panel_rows(
        [
            (
                f"{cand.group.upper()}: {group_names[cand.group]}",
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


# ----------------------------------------------------------------------------- outputs


_CANDIDATE_KEYS = (
    "rank",
    "latent",
    "group",
    "auroc",
    "rate_a",
    "rate_b",
    "mean_a",
    "mean_b",
    "entropy",
    "morans_i",
    "score",
    "top_images",
)


def discovery_json(
    candidates: list[Candidate], groups: Mapping[str, Any], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """DESIGN.md's contract keys first; extra numbers (specificity, support, figure) after."""
    rows = []
    for cand in candidates:
        full = asdict(cand)
        row = {k: full[k] for k in _CANDIDATE_KEYS}
        row.update({k: full[k] for k in ("specificity", "support", "top_images_other", "figure")})
        rows.append(row)
    return {"groups": dict(groups), "candidates": rows, "settings": dict(settings)}


def write_latents_csv(path: Path, stats: LatentStats, rule: RankingRule) -> None:
    """Every latent's group statistics, one row each (the numbers behind the ranking)."""
    table = {
        "latent": np.arange(len(stats.auroc)),
        **{name: np.asarray(values) for name, values in asdict(stats).items()},
        "dense": dense_latents(stats, rule),
    }
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table)
        writer.writerows(zip(*(column.tolist() for column in table.values()), strict=True))


def write_candidates_csv(path: Path, candidates: list[Candidate]) -> None:
    columns = [
        "group",
        "rank",
        "latent",
        "auroc",
        "specificity",
        "rate_a",
        "rate_b",
        "mean_a",
        "mean_b",
        "support",
        "entropy",
        "morans_i",
        "score",
        "figure",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for cand in candidates:
            writer.writerow(asdict(cand))


def write_index(
    path: Path,
    candidates: list[Candidate],
    group_names: Mapping[str, str],
    sizes: Mapping[str, int],
    out_dir: Path,
) -> Path:
    columns = [
        "rank",
        "latent",
        "score",
        "auroc",
        "rate_a",
        "rate_b",
        "entropy",
        "morans_i",
        "support",
    ]
    sections = []
    for group in ("a", "b"):
        mine = [c for c in candidates if c.group == group]
        rows = [{**asdict(c), "anchor": f"{group}-{c.rank}"} for c in mine]
        cards = [
            Card(
                heading=f"{group.upper()} #{c.rank}: latent {c.latent}",
                anchor=f"{group}-{c.rank}",
                figure=out_dir / c.figure if c.figure else None,
                numbers={k: getattr(c, k) for k in columns[2:]},
            )
            for c in mine
        ]
        sections.append(
            (
                f"Specific to {group.upper()}: {group_names[group]} ({sizes[group]} images)",
                columns,
                rows,
                cards,
            )
        )
    intro = (
        "Latents ranked by triage score = alpha*specificity + beta*(-entropy) + "
        "gamma*Moran's I. Each figure shows the latent's patch heat-map on its top images "
        "in its own group (upper row) and in the other group (lower row), on one colour "
        "scale. Full numbers: discovery.json, candidates.csv, latents.csv."
    )
    return write_report(path, "Trait discovery", intro, sections, link_column="latent")


def print_summary(candidates: list[Candidate], group_names: Mapping[str, str]) -> None:
    for group in ("a", "b"):
        print(f"\ncandidates specific to {group.upper()} = {group_names[group]}")
        print(
            f"{'rank':>4} {'latent':>6} {'score':>6} {'auroc':>6} {'rate_a':>6} {'rate_b':>6} "
            f"{'entropy':>7} {'moran':>6}"
        )
        for c in (c for c in candidates if c.group == group):
            print(
                f"{c.rank:>4} {c.latent:>6} {c.score:>6.3f} {c.auroc:>6.3f} {c.rate_a:>6.2f} "
                f"{c.rate_b:>6.2f} {c.entropy:>7.3f} {c.morans_i:>6.3f}"
            )


# ----------------------------------------------------------------------------- entry point


def image_source(cfg: DictConfig, store: Any) -> ImageSource:
    """Figure images per eval.draw_images / image_root / image_size / resize_mode."""
    if not cfg.eval.get("draw_images", True):
        return ImageSource(root=None, frame=None)
    return heatmaps.store_image_source(
        store,
        cfg.eval.get("image_root"),
        cfg.eval.get("image_size"),
        str(cfg.eval.get("resize_mode", "backbone")),
    )


def configured_groups(cfg: DictConfig) -> dict[str, Any]:
    """eval.group_a / eval.group_b, defaulting to the dataset's own contrast pair
    (`dataset.contrast: {group_a: {...}, group_b: {...}}`, e.g. the demo's Alpha vs Beta)."""
    contrast = cfg.dataset.get("contrast") or {}
    return {name: cfg.eval.get(name) or contrast.get(name) for name in ("group_a", "group_b")}


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python evaluate.py eval=discovery run=<run dir> eval.group_a=... eval.group_b=...`."""
    from traitsae.evaluation.common import eval_store, output_dir, resolve_sae

    group_a, group_b = (parse_group(spec, name) for name, spec in configured_groups(cfg).items())
    rule = RankingRule(
        **{k: cfg.eval[k] for k in ("min_support", "dense_rate", "min_auroc", "n_candidates")}
    )
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
    n_top_images: int = 6,
    reduce: str = "max",
    fire_threshold: float = 0.0,
    batch_patches: int = 4096,
    device: str = "cpu",
    images: ImageSource,
) -> dict[str, Any]:
    """The whole evaluation on an open store; writes every output into `out`."""
    metadata = store.metadata
    mask_a = group_mask(metadata, group_a, "group_a", str(store.path))
    mask_b = group_mask(metadata, group_b, "group_b", str(store.path))
    if (overlap := int((mask_a & mask_b).sum())) > 0:
        raise TraitsaeError(
            f"eval.group_a={group_a} and eval.group_b={group_b} share {overlap} "
            "images; the groups must be disjoint to contrast them."
        )
    scores = collect_scores(
        store, sae, mask_a, mask_b, reduce=reduce, batch_patches=batch_patches, device=device
    )
    stats = latent_stats(scores, fire_threshold)
    candidates, codes = build_candidates(
        store, sae, scores, stats, rule, weights, n_top_images, device
    )
    names = {"a": describe_group(group_a), "b": describe_group(group_b)}
    grid = tuple(int(g) for g in store.grid)
    latents = sorted({c.latent for c in candidates})
    out.mkdir(parents=True, exist_ok=True)
    for cand in candidates:
        rel = Path("figures") / f"{cand.group}_{cand.rank:02d}_latent{cand.latent}.png"
        candidate_figure(
            cand,
            codes,
            latents.index(cand.latent),
            grid,
            metadata,
            names,
            images,
            out / rel,
            scores,
        )
        cand.figure = rel.as_posix()
    sizes = {"a": int(mask_a.sum()), "b": int(mask_b.sum())}
    groups = {
        g: {"filter": spec, "name": names[g], "n_images": sizes[g]}
        for g, spec in (("a", group_a), ("b", group_b))
    }
    settings = {
        **asdict(rule),
        "weights": asdict(weights),
        "reduce": reduce,
        "fire_threshold": fire_threshold,
        "n_top_images": n_top_images,
        "d_sae": int(scores.scores_NS.shape[1]),
        "store": str(store.path),
        "n_dense": int(dense_latents(stats, rule).sum()),
    }
    result = discovery_json(candidates, groups, settings)
    (out / "discovery.json").write_text(json.dumps(result, indent=2))
    write_latents_csv(out / "latents.csv", stats, rule)
    write_candidates_csv(out / "candidates.csv", candidates)
    write_index(out / "index.html", candidates, names, sizes, out)
    print_summary(candidates, names)
    return result


def describe_group(group: Mapping[str, list[str]]) -> str:
    return ", ".join(f"{col}={'|'.join(vals)}" for col, vals in group.items())
