"""`eval=discovery`: latents specific to one group of images and absent from another.

    python evaluate.py eval=discovery run=<run dir> dataset=butterflies \
        eval.group_a='{species: erato, subspecies: lativita}' \
        eval.group_b='{species: melpomene, subspecies: malleti}' eval.strata=[collection]
    python evaluate.py eval=discovery run=<run dir> eval.pairs=pairs.csv \
        eval.replicates=[<run seed 1>,<run seed 2>]

1. Groups are filters on the store's per-image metadata (column -> value or list of values);
   `eval.pairs` lists many pairs of groups (pairs.py); `eval.strata` names metadata columns
   whose combinations are strata (confounds).
2. One streaming pass encodes the images of every group and keeps each latent's image-level
   score (max over patches; `eval.pool=mean` also works): [images, d_sae] floats.
3. `stats.contrasts` does the statistics of every pair on that matrix: held-out split, AUROC,
   permutation p-values within strata, BH q-values over all pairs x latents together,
   candidates, confirmation (BH over all pairs' candidates together).
4. Each candidate's heat-maps on its top images in its own group are scored by normalised
   entropy and Moran's I; triage score = alpha*specificity + beta*(-entropy) + gamma*Moran's I.
   Within each group: discoveries first, then confirmed candidates, each best triage score first.
5. `eval.replicates`: each candidate matched and re-tested in other SAEs (replicates.py).
6. `discovery_report` writes discovery.json, latents.csv, candidates.csv, figures/*.png and
   index.html into the run's output dir (with eval.pairs: one folder pairs/<pair>/ each, and an
   index over the pairs).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import heatmaps
from traitsae.evaluation.core.foreground import patch_keep, select_patches
from traitsae.evaluation.core.frames import ImageOptions, ImageSource, image_source
from traitsae.evaluation.core.methods import check_pool, pool_tokens
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import check_store_matches_sae, eval_store, output_dir
from traitsae.evaluation.core.tokens import stream_codes
from traitsae.evaluation.discovery import pairs_report
from traitsae.evaluation.discovery import report as discovery_report
from traitsae.evaluation.discovery.candidates import (
    GroupScores,
    build_candidates,
    candidate_figure,
)
from traitsae.evaluation.discovery.groups import parse_strata, strata_labels
from traitsae.evaluation.discovery.pairs import Discovery, Pair, configured_pairs, pair_masks
from traitsae.evaluation.discovery.replicates import (
    Replicate,
    load_replicates,
    replicate_candidates,
)
from traitsae.evaluation.discovery.stats import (
    ContrastInput,
    NullOptions,
    RankingRule,
    Skipped,
    contrasts,
)
from traitsae.sae.export import RawSpaceSAE

# ----------------------------------------------------------------------------- the pass


def collect_image_scores(
    store: Store,
    sae: RawSpaceSAE,
    wanted_N: np.ndarray,
    *,
    pool: str = "max",
    batch_patches: int = 4096,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The single streaming pass over the store: (store rows [U] increasing, image-level scores
    [U, S] float32) of the wanted valid images."""
    check_pool(pool)
    index_parts, score_parts = [], []
    with tqdm(
        total=int(wanted_N.sum()), desc="encoding groups", unit="img", disable=not progress
    ) as bar:
        for batch in stream_codes(
            store, sae, wanted_N=wanted_N, batch_patches=batch_patches, device=device
        ):
            codes_BPS = batch.codes_BPS
            pooled_BS = pool_tokens(codes_BPS, pool, patch_keep(store, batch.image_index))
            index_parts.append(batch.image_index)
            score_parts.append(pooled_BS.cpu().numpy().astype(np.float32))
            bar.update(len(batch.image_index))
    if not index_parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, sae.d_sae), dtype=np.float32)
    return np.concatenate(index_parts), np.concatenate(score_parts)


def collect_scores(
    store: Store, sae: RawSpaceSAE, mask_a: np.ndarray, mask_b: np.ndarray, **options: Any
) -> GroupScores:
    """Image-level scores of both groups of one pair (`collect_image_scores`' options)."""
    image_index, scores_NS = collect_image_scores(store, sae, mask_a | mask_b, **options)
    return GroupScores(image_index, mask_a[image_index], scores_NS)


def pair_scores(
    rows_U: np.ndarray, scores_US: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray
) -> GroupScores:
    """One pair's rows of the scores of all pairs' images."""
    keep_U = (mask_a | mask_b)[rows_U]
    rows = rows_U[keep_U]
    return GroupScores(rows, mask_a[rows], scores_US[keep_U])


# ----------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class DiscoveryOptions(ImageOptions):
    """The `eval.*` options of conf/eval/discovery.yaml (defaults and meanings there)."""

    split: str
    group_a: Any
    group_b: Any
    pairs: Any
    replicates: Any
    match_cosine: float
    strata: Any
    pool: str
    patches: str
    fire_threshold: float
    n_permutations: int
    max_permutations: int
    alpha: float
    confirm: float
    min_group: int
    min_support: float
    dense_rate: float
    min_auroc: float
    n_candidates: int
    n_top_images: int
    weights: dict[str, float]
    batch_patches: int
    seed: int
    device: str

    def rule(self) -> RankingRule:
        return RankingRule(self.min_support, self.dense_rate, self.min_auroc, self.n_candidates)

    def null(self) -> NullOptions:
        keys = ("n_permutations", "max_permutations", "alpha", "confirm", "min_group", "seed")
        return NullOptions(**{k: getattr(self, k) for k in keys})


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python evaluate.py eval=discovery run=<run dir> eval.group_a=... eval.group_b=...`, or
    `eval.pairs=<csv>`; `eval.replicates=[...]` adds replication."""
    opts = build_options(DiscoveryOptions, cfg)
    default = OmegaConf.to_container(cfg.dataset.get("contrast") or {}, resolve=True)
    pairs, from_file = configured_pairs(opts.pairs, opts.group_a, opts.group_b, default)
    sae = resolve_sae(cfg)
    sae.eval().to(opts.device)
    replicates = load_replicates(cfg, opts.replicates, sae, opts.match_cosine)
    for rep in replicates:
        rep.sae.eval().to(opts.device)
        if rep.note:
            print(f"replicate {rep.label} ({rep.path}): {rep.note}")
    out = output_dir(cfg)
    with eval_store(cfg, sae, opts.split) as store:
        select_patches(store, opts.patches, sae)  # eval.patches: pool over foreground patches?
        for rep in replicates:
            check_store_matches_sae(store, rep.sae)
        common = dict(
            null=opts.null(),
            strata=parse_strata(opts.strata),
            n_top_images=opts.n_top_images,
            pool=opts.pool,
            fire_threshold=opts.fire_threshold,
            batch_patches=opts.batch_patches,
            device=opts.device,
            images=image_source(store, opts),
            replicates=replicates,
        )
        rule, weights = opts.rule(), heatmaps.TriageWeights(**opts.weights)
        if from_file:
            result = discover_pairs(store, sae, pairs, rule, weights, out, **common)
        else:
            (pair,) = pairs
            result = discover(store, sae, pair.a, pair.b, rule, weights, out, **common)
    print(f"\ndiscovery report: {out / 'index.html'}")
    return result


@dataclass
class Discoveries:
    """Every pair of one run, and the settings they share."""

    pairs: list[Discovery]
    settings: dict[str, Any]
    replicates: list[Replicate]


def pair_seed(pair: Pair, seed: int) -> int | list[int] | None:
    """The entropy of a pair's random generator: the run's seed for a single pair (as before
    pairs existed), else seed and the pair's name, so a pair's split and shuffles do not change
    when other lines of the pairs file do."""
    return None if not pair.where else [seed, zlib.crc32(pair.name.encode())]


def compute_pairs(
    store: Store,
    sae: RawSpaceSAE,
    pairs: Sequence[Pair],
    rule: RankingRule,
    weights: heatmaps.TriageWeights,
    *,
    null: NullOptions,
    strata: Sequence[str] = (),
    n_top_images: int = 6,
    pool: str = "max",
    fire_threshold: float = 0.0,
    batch_patches: int = 4096,
    device: str = "cpu",
    skip_untestable: bool = False,
    replicates: Sequence[Replicate] = (),
) -> Discoveries:
    """The pairs' image scores (one pass), their contrasts under one FDR, the triaged
    candidates of each, and their replication."""
    metadata, source = store.metadata, str(store.path)
    masks = [pair_masks(metadata, pair, source) for pair in pairs]
    strata_all = strata_labels(metadata, strata, source)
    wanted_N = np.logical_or.reduce([m for ab in masks for m in ab])
    encode = dict(pool=pool, batch_patches=batch_patches, device=device)
    rows_U, scores_US = collect_image_scores(store, sae, wanted_N, **encode)
    scores = [pair_scores(rows_U, scores_US, *ab) for ab in masks]
    items = [
        ContrastInput(
            s.scores_NS,
            s.in_a,
            None if strata_all is None else strata_all[s.image_index],
            pair.names(),
            pair_seed(pair, null.seed),
        )
        for pair, s in zip(pairs, scores, strict=True)
    ]
    results = contrasts(
        items, rule, null, fire_threshold=fire_threshold, skip_untestable=skip_untestable
    )
    found = []
    for pair, (mask_a, mask_b), s, result in zip(pairs, masks, scores, results, strict=True):
        groups = {
            g: {"filter": spec, "name": pair.names()[g], "n_images": int(mask.sum())}
            for g, spec, mask in (("a", pair.a, mask_a), ("b", pair.b, mask_b))
        }
        if isinstance(result, Skipped):
            found.append(Discovery(pair, groups, skipped=result.reason))
            continue
        candidates, maps = build_candidates(
            store, sae, s, result.candidates, weights, n_top_images, device
        )
        for cand in candidates:
            cand.pair = pair.name if pair.where else None
        found.append(Discovery(pair, groups, result, s, candidates, maps))
    tested = [d for d in found if d.result is not None]
    if not tested:
        reasons = " ".join(
            f"{d.pair.where or d.pair.name} ({d.pair.name}): {d.skipped}" for d in found
        )
        raise TraitsaeError(
            f"every pair was skipped, none could be tested. {reasons} Widen the groups, lower "
            "eval.min_group or eval.confirm, or drop eval.strata."
        )

    def replicate_scores(rep: Replicate) -> tuple[np.ndarray, np.ndarray]:
        return collect_image_scores(store, rep.sae, wanted_N, **encode)

    replicate_candidates(
        replicates,
        sae,
        [(d.candidates, d.scores, d.result) for d in tested],
        replicate_scores,
        null,
    )
    settings = {
        **asdict(rule),
        "weights": asdict(weights),
        "pool": pool,
        "patches": "all" if store.patch_mask is None else "foreground",
        "fire_threshold": fire_threshold,
        "n_top_images": n_top_images,
        "strata": list(strata),
        "seed": null.seed,
        "d_sae": int(scores_US.shape[1]),
        "store": source,
    }
    return Discoveries(found, settings, list(replicates))


def draw_figures(found: Discovery, out: Path, images: ImageSource, store: Store) -> None:
    """Each candidate's figure into out/figures/; its path (relative to out) on the candidate."""
    assert found.scores is not None
    for cand in found.candidates:
        rel = Path("figures") / f"{cand.stats.group}_{cand.rank:02d}_latent{cand.stats.latent}.png"
        candidate_figure(
            cand, found.maps, store.metadata, found.names, images, found.scores, out / rel
        )
        cand.figure = rel.as_posix()


def replication_settings(
    replicates: Sequence[Replicate], null: NullOptions
) -> dict[str, Any] | None:
    if not replicates:
        return None
    return {
        "replicates": [r.summary() for r in replicates],
        "retested_on": "held-out confirmation images"
        if null.confirm > 0
        else "all images of the pair (eval.confirm=0: the images the candidate was chosen on)",
    }


def discover(
    store: Store,
    sae: RawSpaceSAE,
    group_a: dict[str, list[str]],
    group_b: dict[str, list[str]],
    rule: RankingRule,
    weights: heatmaps.TriageWeights,
    out: Path,
    *,
    images: ImageSource,
    null: NullOptions | None = None,
    **options: Any,
) -> dict[str, Any]:
    """One pair (compute_pairs' keyword `options` too) on an open store, then every output
    into `out`; returns the JSON."""
    null = null or NullOptions()
    found = compute_pairs(
        store, sae, [Pair("a_vs_b", group_a, group_b)], rule, weights, null=null, **options
    )
    (one,) = found.pairs
    assert one.result is not None
    out.mkdir(parents=True, exist_ok=True)
    draw_figures(one, out, images, store)
    settings = {**found.settings}
    if replication := replication_settings(found.replicates, null):
        settings["replication"] = replication
    return discovery_report.write_outputs(out, one.candidates, one.result, one.groups, settings)


def discover_pairs(
    store: Store,
    sae: RawSpaceSAE,
    pairs: Sequence[Pair],
    rule: RankingRule,
    weights: heatmaps.TriageWeights,
    out: Path,
    *,
    images: ImageSource,
    null: NullOptions | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Every pair under one FDR (compute_pairs' keyword `options` too); each tested pair's
    outputs into out/pairs/<pair>/, the pairs' index, figure and tables into `out`; returns
    the top-level JSON."""
    null = null or NullOptions()
    found = compute_pairs(
        store, sae, pairs, rule, weights, null=null, skip_untestable=True, **options
    )
    settings = {**found.settings}
    if replication := replication_settings(found.replicates, null):
        settings["replication"] = replication
    for one in found.pairs:
        if one.result is None:
            continue
        pair_out = out / "pairs" / one.pair.name
        pair_out.mkdir(parents=True, exist_ok=True)
        draw_figures(one, pair_out, images, store)
        print(f"\n=== pair {one.pair.name} ===")
        discovery_report.write_outputs(
            pair_out, one.candidates, one.result, one.groups, settings, title=one.pair.name
        )
    return pairs_report.write_pairs_outputs(out, found.pairs, null, settings)
