"""Steering a class probe through the SAE: add latents' decoder directions at the SAE's layer,
run the remaining blocks, read the probe (the function API eval=steer and the explorer share),
and the latents most specific to a class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from traitsae.backbones import Backbone
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.causal.forward import (
    SplitImages,
    iter_image_batches,
    sae_token_positions,
)
from traitsae.evaluation.causal.steer_options import WHERE, SteerOptions
from traitsae.evaluation.core.methods import Method, image_scores, sae_scorer
from traitsae.evaluation.core.probes import ClassProbe
from traitsae.sae.export import RawSpaceSAE


def steer_tokens(
    x_BTD: torch.Tensor,
    sae: RawSpaceSAE,
    latents: Sequence[int],
    alphas_K: torch.Tensor,
    positions_T: torch.Tensor,
    where: str = "all",
) -> torch.Tensor:
    """Block L's output plus alpha_k * W_dec[latent_k] (raw space) at the edited positions
    (`where="all"`) or only at those where latent k fires on the clean tokens (`"firing"`)."""
    if where not in WHERE:
        raise TraitsaeError(f"eval.where must be one of {WHERE}, got {where!r}.")
    idx = torch.as_tensor(list(latents), dtype=torch.long, device=sae.W_dec.device)
    d_KD = (sae.W_dec[idx] / sae.scale).to(x_BTD.dtype)
    chosen_BPD = x_BTD[:, positions_T]
    w_BPK = alphas_K.to(x_BTD).expand(*chosen_BPD.shape[:2], len(idx))
    if where == "firing":
        n_b, n_p, d = chosen_BPD.shape
        codes_BPK = sae.encode(chosen_BPD.reshape(-1, d))[:, idx].reshape(n_b, n_p, -1)
        w_BPK = w_BPK * (codes_BPK > 0).to(w_BPK)
    steered_BTD = x_BTD.clone()
    steered_BTD[:, positions_T] = chosen_BPD + w_BPK @ d_KD
    return steered_BTD


@torch.inference_mode()
def steered_probabilities(
    backbone: Backbone,
    sae: RawSpaceSAE,
    probe: ClassProbe,
    images_BCHW: torch.Tensor | None,
    latents: Sequence[int],
    alphas: float | Sequence[float],
    where: str = "all",
    tokens: str = "auto",
    layer_tokens_BTD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probe class probabilities [B, C] (order `probe.classes`) after steering `latents` by
    `alphas` (one per latent, or one for all) at the SAE's layer.

    Pass `layer_tokens_BTD = backbone.tokens_after(images, layer)` (then `images_BCHW` may be
    None) to move sliders without re-running the blocks up to the SAE's layer.
    """
    layer = sae.layer
    check_latents(latents, sae.d_sae)
    x_BTD = layer_tokens_BTD
    if x_BTD is None:
        x_BTD = backbone.tokens_after(images_BCHW, layer)
    alphas_K = torch.as_tensor(alphas, dtype=torch.float32).flatten()
    if alphas_K.numel() == 1:
        alphas_K = alphas_K.expand(len(latents))
    if alphas_K.numel() != len(latents):
        raise TraitsaeError(
            f"{alphas_K.numel()} alphas for {len(latents)} latents: give one per latent or one."
        )
    g = backbone.geometry
    positions_T = sae_token_positions(sae, tokens, g.n_prefix_tokens, x_BTD.shape[1])
    steered_BTD = steer_tokens(x_BTD, sae, latents, alphas_K, positions_T.to(x_BTD.device), where)
    return probe.probabilities(backbone.finish_from(steered_BTD, layer).embedding_BE)


@torch.inference_mode()
def changed_patches(
    sae: RawSpaceSAE,
    x_BTD: torch.Tensor,
    latents: Sequence[int],
    n_prefix: int,
    where: str = "all",
) -> torch.Tensor:
    """Bool [B, P]: the patches whose token a steering edit of `latents` changes (every patch
    with `where="all"`; with `"firing"`, those where one of the latents fires on the clean
    token). Patch-token SAEs only (a CLS edit changes no patch)."""
    patches_BPD = x_BTD[:, n_prefix:]
    if where == "all" or sae.tokens == "cls":
        return torch.full(patches_BPD.shape[:2], sae.tokens != "cls", device=x_BTD.device)
    n_b, n_p, d = patches_BPD.shape
    idx = torch.as_tensor(list(latents), dtype=torch.long, device=sae.W_dec.device)
    codes_BPK = sae.encode(patches_BPD.reshape(-1, d))[:, idx].reshape(n_b, n_p, -1)
    return (codes_BPK > 0).any(-1)


def check_latents(latents: Sequence[int], d_sae: int) -> None:
    bad = [s for s in latents if not 0 <= int(s) < d_sae]
    if bad or not latents:
        raise TraitsaeError(
            f"eval.latents={list(latents)}: {'latents ' + str(bad) + ' are' if bad else 'none is'} "
            f"out of range; this SAE has {d_sae} latents, ids 0..{d_sae - 1}."
        )


@dataclass
class ClassLatents:
    """What the train store says about every latent for one target class."""

    ranked: list[int]  # up to n latents most specific to the class (specificity > 0), most first
    latent_max_S: np.ndarray  # each latent's largest image score on the split
    specificity_S: np.ndarray  # mean image score in the class minus outside it
    typical_S: np.ndarray  # mean over the class's images of the code averaged over edited tokens
    frequency_S: np.ndarray  # fraction of the split's images on which the latent fires


def class_latents(
    sae: RawSpaceSAE, store: Store, classes_N: np.ndarray, target: str, n: int, device: str
) -> ClassLatents:
    """The `n` latents most specific to `target` (mean image score in the class minus outside
    it, > 0; image score = max over the edited tokens), and each latent's statistics."""

    tokens = "cls" if sae.tokens == "cls" else "patches"
    methods = {
        pool: Method(pool, sae_scorer(sae), sae.d_sae, pool=pool) for pool in ("max", "mean")
    }
    scores, rows = image_scores(store, sae.layer, methods, tokens, device)
    s_NS = scores["max"]
    in_class_N = classes_N[rows] == target
    if not in_class_N.any() or in_class_N.all():
        raise TraitsaeError(
            f"eval.target_class={target!r}: the train store {store.path} has "
            f"{int(in_class_N.sum())} valid images of it out of {len(rows)}; ranking its latents "
            "needs images in and out of the class."
        )
    specificity_S = s_NS[in_class_N].mean(0) - s_NS[~in_class_N].mean(0)
    order = np.argsort(-specificity_S, kind="stable")[:n]
    # A latent no more active in the class than outside it is not the class's, and one that never
    # fires on it has no typical activation (the unit of alpha): never a candidate.
    order = order[specificity_S[order] > 0]
    if order.size == 0:
        raise TraitsaeError(
            f"eval.target_class={target!r}: no latent of this SAE is more active on its images "
            f"than on the others (train store {store.path}); nothing to steer with."
        )
    typical_S = scores["mean"][in_class_N].mean(0)
    frequency_S = (s_NS > 0).mean(0)
    return ClassLatents([int(s) for s in order], s_NS.max(0), specificity_S, typical_S, frequency_S)


def latent_effects(
    backbone: Backbone,
    sae: RawSpaceSAE,
    probe: ClassProbe,
    x_BTD: torch.Tensor,
    latents: Sequence[int],
    target_index: int,
    where: str = "all",
    tokens: str = "auto",
) -> np.ndarray:
    """d mean log p(target) / d alpha_k at alpha = 0 for each latent k, on block L's output
    `x_BTD` of some images: how much steering by latent k raises the probe's belief in the
    target, to first order (one backward pass through the blocks after L and the head)."""
    g = backbone.geometry
    positions_T = sae_token_positions(sae, tokens, g.n_prefix_tokens, x_BTD.shape[1])
    alphas_K = torch.zeros(len(latents), device=x_BTD.device, requires_grad=True)
    with torch.enable_grad():
        steered_BTD = steer_tokens(
            x_BTD.detach(), sae, latents, alphas_K, positions_T.to(x_BTD.device), where
        )
        embedding_BE = backbone.finish_from(steered_BTD, sae.layer).embedding_BE
        log_p_B = probe.logits(embedding_BE).log_softmax(-1)[:, target_index]
        (grad_K,) = torch.autograd.grad(log_p_B.mean(), alphas_K)
    return grad_K.cpu().numpy()


# ----------------------------------------------------------------------------- choosing latents


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


@dataclass
class Chosen:
    """The latents to steer with, what alpha = 1 adds to each one's code, and why they."""

    latents: list[int]
    units_K: np.ndarray
    selection: dict[str, Any]


def choose_latents(
    opts: SteerOptions,
    backbone: Backbone,
    sae: RawSpaceSAE,
    probe: ClassProbe,
    found: ClassLatents,
    train: SplitImages,
) -> Chosen:
    """`eval.latents`, or the target's latents by `eval.rank` (effect: of the candidates, those
    whose step raises log p(target) most on the TRAIN split's source images, so the steered
    images stay held out; specificity: the most specific), with their alpha units."""
    target, given = opts.target_class, opts.latents
    selection: dict[str, Any] = {"rank": "given" if given else opts.rank}
    if given:
        check_latents(given, sae.d_sae)
        latents = given
    elif opts.rank == "specificity":
        latents = found.ranked
    else:
        ranked = found.ranked
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
    return Chosen(latents, alpha_units(opts, found, latents), selection)


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
