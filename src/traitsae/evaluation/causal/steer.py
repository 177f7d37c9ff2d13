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
from omegaconf import DictConfig

from traitsae.backbones import Backbone
from traitsae.errors import TraitsaeError
from traitsae.evaluation.causal.control import compare, control_latents, control_units
from traitsae.evaluation.causal.forward import (
    SplitImages,
    build_full_backbone,
    check_readout_depends,
    iter_image_batches,
    run_meta,
    split_images,
    train_class_probe,
)
from traitsae.evaluation.causal.steer_options import ALPHA_MEANING, SteerOptions
from traitsae.evaluation.causal.steer_report import summarise, write_outputs
from traitsae.evaluation.causal.steering import (
    changed_patches,
    choose_latents,
    class_latents,
    source_sample,
    steered_probabilities,
)
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.probes import ClassProbe
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_store, output_dir
from traitsae.sae.export import RawSpaceSAE

log = logging.getLogger(__name__)


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


@dataclass
class Steered:
    """What eval=steer found: steer.json's content, the probabilities [A, n, C] behind its
    figures, the probe they read, and per steered image the patches the edit changed [n, P]."""

    result: dict[str, Any]
    probs_ANC: np.ndarray
    probe: ClassProbe
    changed_NP: np.ndarray


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra entry: steer the probe with the latents; steer.json, probe.safetensors, figures."""
    opts = build_options(SteerOptions, cfg)
    out = output_dir(cfg)  # before any work: an unwritable folder fails now, not after it
    steered = compute_steer(cfg, opts)
    steered.probe.save(out / "probe.safetensors")
    write_outputs(steered.result, steered.probs_ANC, steered.probe, out)
    return steered.result


def compute_steer(cfg: DictConfig, opts: SteerOptions) -> Steered:
    """Fit the probe on the train split, choose the latents there, steer held-out images of the
    other classes with them and with frequency-matched random latents at equal norm (cfg: the
    SAE and stores)."""
    device, target = opts.device, opts.target_class
    if str(cfg.split) == opts.train_split:
        raise TraitsaeError(
            f"split={cfg.split} is eval.train_split, the images the probe is fitted and the "
            "latents are chosen on: a steering curve on them measures the fit, not the model. "
            "Steer held-out images: split=test (extract it first), or another eval.train_split."
        )
    sae = resolve_sae(cfg).eval().to(device)
    with eval_store(cfg, sae, opts.train_split) as train_store:
        backbone = build_full_backbone(sae, train_store, device)
        train = split_images(cfg, opts.train_split, train_store, opts.class_column)
        check_class(cfg, opts, train.classes_N)
        n_ranked = opts.n_candidates if opts.rank == "effect" else opts.n_latents
        found = class_latents(sae, train_store, train.classes_N, target, n_ranked, device)
    with eval_store(cfg, sae, cfg.split) as store:
        images = split_images(cfg, cfg.split, store, opts.class_column)
    picked = chosen_images(opts, images.paths, images.classes_N, target)
    check_readout_depends(
        backbone, sae, [images.paths[i] for i in picked[:4]], opts.tokens, "eval=steer"
    )
    probe = train_class_probe(cfg, backbone, sae, opts)
    chosen = choose_latents(opts, backbone, sae, probe, found, train)
    paths = [images.paths[i] for i in picked]
    probs_ANC, rows_N, changed_NP = steer_images(
        opts, backbone, sae, probe, paths, chosen.latents, chosen.units_K
    )
    rows_N = picked[rows_N]
    t = probe.class_index(target)
    sets = control_latents(
        chosen.latents,
        found.frequency_S,
        chosen.selection.get("candidates", chosen.latents),
        opts.n_control,
        opts.seed,
    )
    control_RAN = (
        np.stack(
            [
                steer_images(
                    opts,
                    backbone,
                    sae,
                    probe,
                    [images.paths[i] for i in rows_N],
                    lat,
                    control_units(sae, chosen.latents, chosen.units_K, lat),
                    desc="control",
                )[0][:, :, t]
                for lat in sets
            ]
        )
        if sets
        else None
    )
    on_target_N = clean_p_target(opts, backbone, probe, images, t)
    result = summarise(
        probe, target, chosen.latents, found.latent_max_S, opts.alphas, probs_ANC, rows_N, images
    )
    result |= compare(target, result, probs_ANC[:, :, t], control_RAN, sets, on_target_N)
    result["selection"] = chosen.selection
    result["alpha_unit"] = [float(u) for u in chosen.units_K]
    result["meta"] = run_meta(cfg, backbone, sae, opts.train_split) | {
        "where": opts.where,
        "tokens": opts.tokens,
        "alpha_units": opts.alpha_units,
        "alpha_means": ALPHA_MEANING[opts.alpha_units],
    }
    return Steered(result, probs_ANC, probe, changed_NP)


def check_class(cfg: DictConfig, opts: SteerOptions, classes_N: np.ndarray) -> None:
    if opts.target_class not in set(classes_N):
        known = sorted(set(classes_N) - {""})
        raise TraitsaeError(
            f"eval.target_class={opts.target_class!r} is not a class of dataset "
            f"{cfg.dataset.name} (column {opts.class_column!r} of split {opts.train_split}); it "
            f"has {len(known)}: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}."
        )


@torch.inference_mode()
def clean_p_target(
    opts: SteerOptions, backbone: Backbone, probe: ClassProbe, images: SplitImages, t: int
) -> np.ndarray:
    """p(target) of the probe on the steered split's clean images of the target class [n]."""
    rows = source_sample_of(images.classes_N, opts.target_class, opts.max_images, opts.seed)
    last = backbone.geometry.depth - 1
    out = []
    for _, images_BCHW in iter_image_batches(
        backbone,
        [images.paths[i] for i in rows],
        opts.batch_size,
        opts.num_workers,
        opts.device,
        desc="target images",
    ):
        final = backbone.finish_from(backbone.tokens_after(images_BCHW, last), last)
        out.append(probe.probabilities(final.embedding_BE)[:, t].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def source_sample_of(classes_N: np.ndarray, name: str, n: int, seed: int) -> np.ndarray:
    """A seeded sample of at most `n` positions of class `name` (empty when it has none)."""
    rows = np.flatnonzero(classes_N == name)
    rng = np.random.default_rng([seed, 3])
    return np.sort(rng.choice(rows, size=min(n, rows.size), replace=False))


@torch.inference_mode()
def steer_images(
    opts: SteerOptions,
    backbone: Backbone,
    sae: RawSpaceSAE,
    probe: ClassProbe,
    paths: list[str],
    latents: list[int],
    units_K: np.ndarray,
    desc: str = "steer",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities [A, n, C] for each alpha and readable image, those images' positions [n],
    and the patches the edit changed [n, P]; latent k's code is raised by alpha * units_K[k]."""
    layer, k = sae.layer, backbone.geometry.n_prefix_tokens
    probs, rows, changed = [], [], []
    for rows_B, images_BCHW in iter_image_batches(
        backbone, paths, opts.batch_size, opts.num_workers, opts.device, desc=desc
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
                    for alpha in opts.alphas
                ]
            ).numpy()
        )
        rows.append(rows_B)
        changed.append(changed_patches(sae, x_BTD, latents, k, opts.where).cpu().numpy())
    if not rows:
        raise TraitsaeError("none of the images to steer could be read; check dataset.root.")
    probs_ANC = np.concatenate(probs, axis=1)
    bad_A = ~np.isfinite(probs_ANC).all(axis=(1, 2))
    if bad_A.any():
        raise TraitsaeError(
            f"steering latents {latents} by alpha {np.asarray(opts.alphas)[bad_A].tolist()} "
            "gives non-finite probabilities (the edited tokens overflow); give smaller "
            "eval.alphas."
        )
    return probs_ANC, np.concatenate(rows), np.concatenate(changed)
