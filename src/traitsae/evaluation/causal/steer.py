"""`eval=steer`: classification control. Do a class's latents make a classifier see that class?

    python evaluate.py eval=steer run=<run dir> dataset=cub eval.target_class=<class name>

A linear class probe is fit on clean final embeddings of the train split. For images not of the
target class (or `eval.images`), block L's output (L = the SAE's layer) gets
alpha * (decoder direction) of each chosen latent added (in every edited token, or only where
the latent fires), the remaining blocks and the head run, and the probe's class probabilities are
recorded for each alpha. The latents are `eval.latents`, or by default the target class's
`eval.n_latents` latents that the model downstream reads as that class: of the `eval.n_candidates`
latents most specific to it (image-level activation, max over patches, higher in the class than
outside it on the train split), those whose step raises the probe's log p(target) most on the
train split's source images (the derivative at alpha = 0: attribution patching; latents that
lower it are never chosen, so fewer than n_latents may remain).
`eval.rank=specificity` keeps the specificity order alone.

alpha is in units of each latent's typical activation in the target class (`eval.alpha_units=
typical`): latent s's code at every edited token is raised by alpha * unit_s, unit_s = its code
averaged over a target image's edited tokens (mean over the class's train images), so alpha = 1
at every patch gives an image as much of the latent as a typical target image carries. Raising
the code by c adds c * W_dec[s] / scale (raw space) to the token. `alpha_units=code`: unit 1.
`steer.json` records the units (`alpha_unit`) and each latent's largest code (`latent_max`).

The function API (used by the explorer's Steer page) is `steered_probabilities`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from traitsae.backbones import Backbone
from traitsae.errors import TraitsaeError
from traitsae.evaluation.causal.forward import (
    ProbeOptions,
    build_full_backbone,
    iter_image_batches,
    split_images,
    train_class_probe,
)
from traitsae.evaluation.causal.steer_report import write_outputs
from traitsae.evaluation.causal.steering import (
    WHERE,
    ClassLatents,
    check_alphas,
    check_latents,
    class_latents,
    latent_effects,
    steered_probabilities,
)
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.probes import ClassProbe
from traitsae.evaluation.core.sources import eval_store, output_dir, resolve_sae
from traitsae.sae.export import RawSpaceSAE

log = logging.getLogger(__name__)
RANKS = ("effect", "specificity")
ALPHA_MEANING = {
    "typical": "each edited token's code of latent s raised by alpha * alpha_unit[s], its mean "
    "code over the edited tokens of a target-class image (train split)",
    "code": "each edited token's code of latent s raised by alpha",
}


@dataclass(frozen=True)
class SteerOptions(ProbeOptions):
    """The `eval.*` options of conf/eval/steer.yaml (defaults and meanings there)."""

    target_class: str | None
    latents: list[int] | None
    n_latents: int
    n_candidates: int
    rank: str
    alphas: list[float]
    alpha_units: str
    where: str
    tokens: str
    source_class: str | None
    images: list[Any] | None
    max_images: int

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "alphas", check_alphas(as_list(self.alphas)))
        set_(self, "latents", [int(s) for s in as_list(self.latents)] if self.latents else None)
        set_(self, "images", as_list(self.images) if self.images else None)
        if self.where not in WHERE:
            raise TraitsaeError(f"eval.where must be one of {WHERE}, got {self.where!r}.")
        if self.alpha_units not in ALPHA_MEANING:
            raise TraitsaeError(
                f"eval.alpha_units must be one of {sorted(ALPHA_MEANING)}, got "
                f"{self.alpha_units!r}."
            )
        if self.rank not in RANKS:
            raise TraitsaeError(f"eval.rank must be one of {RANKS}, got {self.rank!r}.")
        if self.n_candidates < self.n_latents:
            raise TraitsaeError(
                f"eval.n_candidates={self.n_candidates} must be >= eval.n_latents="
                f"{self.n_latents} (the latents are chosen among the candidates)."
            )
        if self.target_class is None:
            raise TraitsaeError("eval.target_class is required: give a class name as in the store.")


# ----------------------------------------------------------------------------- the function API


# ----------------------------------------------------------------------------- choosing latents


def chosen_images(
    opts: SteerOptions, paths: list[str], classes_N: np.ndarray, target: str
) -> np.ndarray:
    """Dataset positions to steer: `eval.images` (positions or paths), else a seeded sample of
    at most `eval.max_images` images of `eval.source_class` (default: not of the target class)."""
    if opts.images:
        return np.asarray([image_position(item, paths) for item in opts.images])
    return source_sample(classes_N, target, opts.source_class, opts.max_images, opts.seed)


def source_sample(
    classes_N: np.ndarray, target: str, source: str | None, n: int, seed: int
) -> np.ndarray:
    """Sorted positions of a seeded sample of at most `n` images of `source` (None: every class
    but `target`)."""
    others = np.flatnonzero(classes_N == str(source) if source else classes_N != target)
    if others.size == 0:
        raise TraitsaeError(
            f"eval.source_class={source!r} has no images in this split; its classes are "
            f"{sorted(set(classes_N) - {''})[:20]}."
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(others, size=min(n, others.size), replace=False))


def image_position(item: Any, paths: list[str]) -> int:
    """An `eval.images` entry (a position, or a path or its tail) -> its position in `paths`."""
    if isinstance(item, int) and 0 <= item < len(paths):
        return item
    matches = [i for i, p in enumerate(paths) if p == str(item) or p.endswith("/" + str(item))]
    if len(matches) != 1:
        raise TraitsaeError(
            f"eval.images entry {item!r} matches {len(matches)} of the split's {len(paths)} "
            f"images; give a position 0..{len(paths) - 1} or a unique path (e.g. {paths[0]!r})."
        )
    return matches[0]


# ----------------------------------------------------------------------------- the run


def as_list(value: Any) -> list:
    if isinstance(value, ListConfig):
        return list(OmegaConf.to_container(value, resolve=True))
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Steered:
    """What eval=steer found: steer.json's content, the probabilities [A, n, C] behind its
    figures, and the probe they read; nothing is written yet."""

    result: dict[str, Any]
    probs_ANC: np.ndarray
    probe: ClassProbe


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra entry: steer the probe with the latents; steer.json, probe.safetensors, figures."""
    steered = compute_steer(cfg, build_options(SteerOptions, cfg))
    out = output_dir(cfg)
    steered.probe.save(out / "probe.safetensors")
    write_outputs(steered.result, steered.probs_ANC, steered.probe, out)
    return steered.result


def compute_steer(cfg: DictConfig, opts: SteerOptions) -> Steered:
    """Fit the probe, choose the latents, steer the chosen images (cfg: the SAE and stores)."""
    device, alphas = opts.device, opts.alphas
    target = opts.target_class
    sae = resolve_sae(cfg).eval().to(device)
    with eval_store(cfg, sae, opts.train_split) as train_store:
        backbone = build_full_backbone(sae, train_store, device)
        train = split_images(cfg, opts.train_split, train_store, opts.class_column)
        if target not in set(train.classes_N):
            known = sorted(set(train.classes_N) - {""})
            raise TraitsaeError(
                f"eval.target_class={target!r} is not a class of dataset {cfg.dataset.name} "
                f"(column {opts.class_column!r} of split {opts.train_split}); it has {len(known)}: "
                f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}."
            )
        n_ranked = opts.n_candidates if opts.rank == "effect" else opts.n_latents
        found = class_latents(sae, train_store, train.classes_N, target, n_ranked, device)
    ranked = found.ranked
    given = opts.latents
    if given is not None:
        check_latents(given, sae.d_sae)
    with eval_store(cfg, sae, cfg.split) as store:
        images = split_images(cfg, cfg.split, store, opts.class_column)
    probe = train_class_probe(cfg, backbone, sae, opts)
    selection = {"rank": "given" if given else opts.rank}
    if given:
        latents = given
    elif opts.rank == "specificity":
        latents = ranked
    else:
        # Ranked on the train split's source images: the steered images stay held out.
        rows = source_sample(train.classes_N, target, opts.source_class, opts.max_images, opts.seed)
        effect_K = mean_effects(opts, backbone, sae, probe, [train.paths[i] for i in rows], ranked)
        effect_K = effect_K * alpha_units(opts, found, ranked)  # per unit of alpha
        order = [i for i in np.argsort(-effect_K, kind="stable") if effect_K[i] > 0]
        if not order:
            raise TraitsaeError(
                f"none of the {len(ranked)} latents most specific to {target!r} raises the "
                f"probe's p({target}) when added (effects {np.round(effect_K, 4).tolist()}); "
                "raise eval.n_candidates, or give eval.rank=specificity or eval.latents=[...]."
            )
        latents = [ranked[i] for i in order[: opts.n_latents]]
        selection |= {"candidates": ranked, "effect": [float(e) for e in effect_K]}
    selection["specificity"] = [float(found.specificity_S[s]) for s in latents]
    units_K = alpha_units(opts, found, latents)
    picked = chosen_images(opts, images.paths, images.classes_N, target)
    probs_ANC, rows_N = steer_images(
        opts, backbone, sae, probe, [images.paths[i] for i in picked], latents, alphas, units_K
    )
    rows_N = picked[rows_N]
    result = summarise(
        probe, target, latents, found.latent_max_S, alphas, probs_ANC, rows_N, images
    )
    result["selection"] = selection
    result["alpha_unit"] = [float(u) for u in units_K]
    result["meta"] = {
        "sae": str(cfg.get("sae_path") or cfg.get("run")),
        "backbone": backbone.name,
        "layer": sae.layer,
        "dataset": cfg.dataset.name,
        "split": str(cfg.split),
        "train_split": opts.train_split,
        "where": opts.where,
        "tokens": opts.tokens,
        "alpha_units": opts.alpha_units,
        "alpha_means": ALPHA_MEANING[opts.alpha_units],
    }
    return Steered(result, probs_ANC, probe)


def alpha_units(opts: SteerOptions, found: ClassLatents, latents: list[int]) -> np.ndarray:
    """What alpha = 1 adds to each latent's code at every edited token [K]."""
    if opts.alpha_units == "code":
        return np.ones(len(latents))
    units_K = found.typical_S[latents].astype(np.float64)
    if (units_K <= 0).any():
        silent = [s for s, u in zip(latents, units_K, strict=True) if u <= 0]
        raise TraitsaeError(
            f"latents {silent} never fire on images of {opts.target_class!r} (train split), so "
            "their typical activation, the unit of alpha, is 0; give eval.alpha_units=code or "
            "other eval.latents."
        )
    return units_K


def mean_effects(
    opts: SteerOptions,
    backbone: Backbone,
    sae: RawSpaceSAE,
    probe: ClassProbe,
    paths: list[str],
    latents: list[int],
) -> np.ndarray:
    """`latent_effects` averaged over the readable images of `paths` [K]."""
    layer = sae.layer
    t = probe.class_index(opts.target_class)
    total_K, n = np.zeros(len(latents)), 0
    for _, images_BCHW in iter_image_batches(
        backbone, paths, opts.batch_size, opts.num_workers, opts.device, desc="rank"
    ):
        with torch.no_grad():
            x_BTD = backbone.tokens_after(images_BCHW, layer)
        effect_K = latent_effects(backbone, sae, probe, x_BTD, latents, t, opts.where, opts.tokens)
        total_K += effect_K * len(x_BTD)
        n += len(x_BTD)
    if n == 0:
        raise TraitsaeError("none of the source images of the train split could be read.")
    return total_K / n


@torch.inference_mode()
def steer_images(
    opts: SteerOptions,
    backbone: Backbone,
    sae: RawSpaceSAE,
    probe: ClassProbe,
    paths: list[str],
    latents: list[int],
    alphas: list[float],
    units_K: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [A, n, C] for each alpha and readable image, and those images' positions;
    latent k's code is raised by alpha * units_K[k]."""
    layer = sae.layer
    probs, rows = [], []
    for rows_B, images_BCHW in iter_image_batches(
        backbone, paths, opts.batch_size, opts.num_workers, opts.device, desc="steer"
    ):
        x_BTD = backbone.tokens_after(images_BCHW, layer)
        probs.append(
            torch.stack(
                [
                    steered_probabilities(
                        backbone,
                        sae,
                        probe,
                        None,
                        latents,
                        (alpha * units_K).tolist(),
                        opts.where,
                        opts.tokens,
                        x_BTD,
                    )
                    for alpha in alphas
                ]
            ).numpy()
        )
        rows.append(rows_B)
    return np.concatenate(probs, axis=1), np.concatenate(rows)


def summarise(
    probe: ClassProbe,
    target: str,
    latents: list[int],
    latent_max: np.ndarray,
    alphas: list[float],
    probs_ANC: np.ndarray,
    rows_N: np.ndarray,
    images: Any,
) -> dict[str, Any]:
    t = probe.class_index(target)
    classes = np.asarray(probe.classes, dtype=object)
    own_N = np.array(
        [probe.classes.index(c) if c in probe.classes else -1 for c in images.classes_N[rows_N]]
    )
    curve = []
    for a, probs_NC in zip(alphas, probs_ANC, strict=True):
        own_p_N = np.where(own_N >= 0, probs_NC[np.arange(len(own_N)), own_N.clip(0)], np.nan)
        curve.append(
            {
                "alpha": a,
                "mean_p_target": float(probs_NC[:, t].mean()),
                "frac_top1_target": float((probs_NC.argmax(1) == t).mean()),
                "mean_p_own_class": float(np.nanmean(own_p_N)) if (own_N >= 0).any() else None,
            }
        )
    per_image = []
    for a, probs_NC in zip(alphas, probs_ANC, strict=True):
        for i, row in enumerate(rows_N):
            top_5 = np.argsort(-probs_NC[i], kind="stable")[:5]
            per_image.append(
                {
                    "path": images.paths[row],
                    "class": str(images.classes_N[row]),
                    "alpha": a,
                    "top5": [[str(classes[c]), float(probs_NC[i, c])] for c in top_5],
                }
            )
    return {
        "target_class": target,
        "latents": latents,
        "latent_max": [float(latent_max[s]) for s in latents] if latent_max is not None else None,
        "n_images": int(len(rows_N)),
        "curve": curve,
        "images": per_image,
    }
