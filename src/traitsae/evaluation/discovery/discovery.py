"""`eval=discovery`: latents specific to one group of images and absent from another.

    python evaluate.py eval=discovery run=<run dir> dataset=butterflies \
        eval.group_a='{species: erato, subspecies: lativita}' \
        eval.group_b='{species: melpomene, subspecies: malleti}' eval.strata=[collection]

1. Groups are filters on the store's per-image metadata (column -> value or list of values);
   `eval.strata` names metadata columns whose combinations are strata (confounds).
2. One streaming pass encodes the images of both groups and keeps each latent's image-level
   score (max over patches; `eval.pool=mean` also works): [n_a + n_b, d_sae] floats.
3. `discovery_stats.contrast` does the statistics on that matrix: held-out split, AUROC,
   permutation p-values within strata, BH q-values, candidates, confirmation.
4. Each candidate's heat-maps on its top images in its own group are scored by normalised
   entropy and Moran's I; triage score = alpha*specificity + beta*(-entropy) + gamma*Moran's I.
   Within each group: discoveries first, then confirmed candidates, each best triage score first.
5. `discovery_report` writes discovery.json, latents.csv, candidates.csv, figures/*.png and
   index.html into the run's output dir.
"""

from __future__ import annotations

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
from traitsae.evaluation.core.sources import eval_store, output_dir
from traitsae.evaluation.core.tokens import stream_codes
from traitsae.evaluation.discovery import report as discovery_report
from traitsae.evaluation.discovery.candidates import (
    Candidate,
    GroupScores,
    HeatMaps,
    build_candidates,
    candidate_figure,
)
from traitsae.evaluation.discovery.groups import (
    describe_group,
    group_mask,
    parse_group,
    parse_strata,
    strata_labels,
)
from traitsae.evaluation.discovery.stats import Contrast, NullOptions, RankingRule, contrast
from traitsae.sae.export import RawSpaceSAE

# ----------------------------------------------------------------------------- groups


# ----------------------------------------------------------------------------- the pass


def collect_scores(
    store: Store,
    sae: RawSpaceSAE,
    mask_a: np.ndarray,
    mask_b: np.ndarray,
    *,
    pool: str = "max",
    batch_patches: int = 4096,
    device: str = "cpu",
    progress: bool = True,
) -> GroupScores:
    """The single streaming pass over the store: image-level scores of both groups."""
    check_pool(pool)
    wanted_N = mask_a | mask_b
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
    image_index = np.concatenate(index_parts)
    return GroupScores(image_index, mask_a[image_index], np.concatenate(score_parts))


# ----------------------------------------------------------------------------- candidates


# ----------------------------------------------------------------------------- figures


# ----------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class DiscoveryOptions(ImageOptions):
    """The `eval.*` options of conf/eval/discovery.yaml (defaults and meanings there)."""

    split: str
    group_a: Any
    group_b: Any
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


def configured_groups(cfg: DictConfig, opts: DiscoveryOptions) -> dict[str, Any]:
    """eval.group_a / eval.group_b, defaulting to the dataset's own contrast pair
    (`dataset.contrast: {group_a: {...}, group_b: {...}}`, e.g. the demo's Alpha vs Beta)."""
    contrast_pair = OmegaConf.to_container(cfg.dataset.get("contrast") or {}, resolve=True)
    return {name: getattr(opts, name) or contrast_pair.get(name) for name in ("group_a", "group_b")}


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python evaluate.py eval=discovery run=<run dir> eval.group_a=... eval.group_b=...`."""
    opts = build_options(DiscoveryOptions, cfg)
    groups = configured_groups(cfg, opts)
    group_a, group_b = (parse_group(spec, name) for name, spec in groups.items())
    sae = resolve_sae(cfg)
    sae.eval().to(opts.device)
    out = output_dir(cfg)
    with eval_store(cfg, sae, opts.split) as store:
        select_patches(store, opts.patches, sae)  # eval.patches: pool over foreground patches?
        result = discover(
            store,
            sae,
            group_a,
            group_b,
            opts.rule(),
            heatmaps.TriageWeights(**opts.weights),
            out,
            null=opts.null(),
            strata=parse_strata(opts.strata),
            n_top_images=opts.n_top_images,
            pool=opts.pool,
            fire_threshold=opts.fire_threshold,
            batch_patches=opts.batch_patches,
            device=opts.device,
            images=image_source(store, opts),
        )
    print(f"\ndiscovery report: {out / 'index.html'}")
    return result


@dataclass
class Discovery:
    """Everything eval=discovery found on one store; nothing is written yet."""

    result: Contrast
    scores: GroupScores
    candidates: list[Candidate]
    maps: HeatMaps  # the candidates' heat-maps on their top images
    names: dict[str, str]
    groups: dict[str, Any]
    settings: dict[str, Any]


def compute_discovery(
    store: Store,
    sae: RawSpaceSAE,
    group_a: dict[str, list[str]],
    group_b: dict[str, list[str]],
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
) -> Discovery:
    """The groups' image scores, the contrast and the triaged candidates of an open store."""
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
        store, sae, mask_a, mask_b, pool=pool, batch_patches=batch_patches, device=device
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
        "pool": pool,
        "patches": "all" if store.patch_mask is None else "foreground",
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
    return Discovery(result, scores, candidates, maps, names, groups, settings)


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
    """compute_discovery (its keyword `options` too) on an open store, then every output into
    `out`; returns the JSON."""
    found = compute_discovery(
        store, sae, group_a, group_b, rule, weights, null=null or NullOptions(), **options
    )
    out.mkdir(parents=True, exist_ok=True)
    for cand in found.candidates:
        rel = Path("figures") / f"{cand.stats.group}_{cand.rank:02d}_latent{cand.stats.latent}.png"
        candidate_figure(
            cand, found.maps, store.metadata, found.names, images, found.scores, out / rel
        )
        cand.figure = rel.as_posix()
    return discovery_report.write_outputs(
        out, found.candidates, found.result, found.groups, found.settings
    )
