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

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from traitsae.backbones import Backbone
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.causal.forward import (
    ClassProbe,
    build_full_backbone,
    iter_image_batches,
    sae_token_positions,
    split_images,
    train_class_probe,
)
from traitsae.evaluation.core import figures
from traitsae.evaluation.core.figures import plt
from traitsae.evaluation.core.methods import Method, image_scores, sae_scorer
from traitsae.evaluation.core.sources import eval_store, output_dir, resolve_sae
from traitsae.sae.export import RawSpaceSAE

log = logging.getLogger(__name__)
WHERE = ("all", "firing")
RANKS = ("effect", "specificity")
ALPHA_MEANING = {
    "typical": "each edited token's code of latent s raised by alpha * alpha_unit[s], its mean "
    "code over the edited tokens of a target-class image (train split)",
    "code": "each edited token's code of latent s raised by alpha",
}


# ----------------------------------------------------------------------------- the function API


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


def check_latents(latents: Sequence[int], d_sae: int) -> None:
    bad = [s for s in latents if not 0 <= int(s) < d_sae]
    if bad or not latents:
        raise TraitsaeError(
            f"eval.latents={list(latents)}: {'latents ' + str(bad) + ' are' if bad else 'none is'} "
            f"out of range; this SAE has {d_sae} latents, ids 0..{d_sae - 1}."
        )


def check_alphas(alphas: Sequence[float]) -> list[float]:
    values = sorted(float(a) for a in alphas)
    if 0.0 not in values:
        raise TraitsaeError(
            f"eval.alphas={list(alphas)} must include 0 (the unsteered probabilities every other "
            "alpha is compared with), e.g. eval.alphas=[0,2,4,8]."
        )
    return values


# ----------------------------------------------------------------------------- choosing latents


@dataclass
class ClassLatents:
    """What the train store says about every latent for one target class."""

    ranked: list[int]  # the n latents most specific to the class, most specific first
    latent_max_S: np.ndarray  # each latent's largest image score on the split
    specificity_S: np.ndarray  # mean image score in the class minus outside it
    typical_S: np.ndarray  # mean over the class's images of the code averaged over edited tokens


def class_latents(
    sae: RawSpaceSAE, store: Store, classes_N: np.ndarray, target: str, n: int, device: str
) -> ClassLatents:
    """The `n` latents most specific to `target` (mean image score in the class minus outside
    it; image score = max over the edited tokens), and each latent's statistics (ClassLatents)."""

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
    typical_S = scores["mean"][in_class_N].mean(0)
    return ClassLatents([int(s) for s in order], s_NS.max(0), specificity_S, typical_S)


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


def chosen_images(
    ev: DictConfig, paths: list[str], classes_N: np.ndarray, target: str, seed: int
) -> np.ndarray:
    """Dataset positions to steer: `eval.images` (positions or paths), else a seeded sample of
    at most `eval.max_images` images of `eval.source_class` (default: not of the target class)."""
    if ev.get("images"):
        return np.asarray([image_position(item, paths) for item in as_list(ev.images)])
    return source_sample(classes_N, target, ev.get("source_class"), int(ev.max_images), seed)


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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra entry: steer the probe with the latents; steer.json, probe.safetensors, figures."""

    ev, device = cfg.eval, str(cfg.device)
    alphas = check_alphas(as_list(ev.alphas))
    if str(ev.where) not in WHERE:
        raise TraitsaeError(f"eval.where must be one of {WHERE}, got {ev.where!r}.")
    if str(ev.alpha_units) not in ALPHA_MEANING:
        raise TraitsaeError(
            f"eval.alpha_units must be one of {sorted(ALPHA_MEANING)}, got {ev.alpha_units!r}."
        )
    if str(ev.rank) not in RANKS:
        raise TraitsaeError(f"eval.rank must be one of {RANKS}, got {ev.rank!r}.")
    if int(ev.n_candidates) < int(ev.n_latents):
        raise TraitsaeError(
            f"eval.n_candidates={ev.n_candidates} must be >= eval.n_latents={ev.n_latents} (the "
            "latents are chosen among the candidates)."
        )
    if ev.get("target_class") is None:
        raise TraitsaeError("eval.target_class is required: give a class name as in the store.")
    target = str(ev.target_class)
    sae = resolve_sae(cfg).eval().to(device)
    with eval_store(cfg, sae, str(ev.train_split)) as train_store:
        backbone = build_full_backbone(sae, train_store, device)
        train = split_images(cfg, str(ev.train_split), train_store, str(ev.class_column))
        if target not in set(train.classes_N):
            known = sorted(set(train.classes_N) - {""})
            raise TraitsaeError(
                f"eval.target_class={target!r} is not a class of dataset {cfg.dataset.name} "
                f"(column {ev.class_column!r} of split {ev.train_split}); it has {len(known)}: "
                f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}."
            )
        n_ranked = int(ev.n_candidates) if ev.rank == "effect" else int(ev.n_latents)
        found = class_latents(sae, train_store, train.classes_N, target, n_ranked, device)
    ranked = found.ranked
    given = [int(s) for s in as_list(ev.latents)] if ev.get("latents") else None
    if given is not None:
        check_latents(given, sae.d_sae)
    with eval_store(cfg, sae, cfg.split) as store:
        images = split_images(cfg, cfg.split, store, str(ev.class_column))
    probe = train_class_probe(cfg, backbone, sae, str(ev.train_split), str(ev.class_column))
    selection = {"rank": "given" if given else str(ev.rank)}
    if given:
        latents = given
    elif ev.rank == "specificity":
        latents = ranked
    else:
        # Ranked on the train split's source images: the steered images stay held out.
        rows = source_sample(
            train.classes_N, target, ev.get("source_class"), int(ev.max_images), int(cfg.seed)
        )
        effect_K = mean_effects(cfg, backbone, sae, probe, [train.paths[i] for i in rows], ranked)
        effect_K = effect_K * alpha_units(ev, found, ranked)  # per unit of alpha
        order = [i for i in np.argsort(-effect_K, kind="stable") if effect_K[i] > 0]
        if not order:
            raise TraitsaeError(
                f"none of the {len(ranked)} latents most specific to {target!r} raises the "
                f"probe's p({target}) when added (effects {np.round(effect_K, 4).tolist()}); "
                "raise eval.n_candidates, or give eval.rank=specificity or eval.latents=[...]."
            )
        latents = [ranked[i] for i in order[: int(ev.n_latents)]]
        selection |= {"candidates": ranked, "effect": [float(e) for e in effect_K]}
    selection["specificity"] = [float(found.specificity_S[s]) for s in latents]
    units_K = alpha_units(ev, found, latents)
    picked = chosen_images(ev, images.paths, images.classes_N, target, int(cfg.seed))
    probs_ANC, rows_N = steer_images(
        cfg, backbone, sae, probe, [images.paths[i] for i in picked], latents, alphas, units_K
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
        "train_split": str(ev.train_split),
        "where": str(ev.where),
        "tokens": str(ev.tokens),
        "alpha_units": str(ev.alpha_units),
        "alpha_means": ALPHA_MEANING[str(ev.alpha_units)],
    }
    out = output_dir(cfg)
    probe.save(out / "probe.safetensors")
    write_outputs(result, probs_ANC, probe, out)
    return result


def alpha_units(ev: DictConfig, found: ClassLatents, latents: list[int]) -> np.ndarray:
    """What alpha = 1 adds to each latent's code at every edited token [K]."""
    if ev.alpha_units == "code":
        return np.ones(len(latents))
    units_K = found.typical_S[latents].astype(np.float64)
    if (units_K <= 0).any():
        silent = [s for s, u in zip(latents, units_K, strict=True) if u <= 0]
        raise TraitsaeError(
            f"latents {silent} never fire on images of {ev.target_class!r} (train split), so "
            "their typical activation, the unit of alpha, is 0; give eval.alpha_units=code or "
            "other eval.latents."
        )
    return units_K


def mean_effects(
    cfg: DictConfig,
    backbone: Backbone,
    sae: RawSpaceSAE,
    probe: ClassProbe,
    paths: list[str],
    latents: list[int],
) -> np.ndarray:
    """`latent_effects` averaged over the readable images of `paths` [K]."""
    ev, layer = cfg.eval, sae.layer
    t = probe.class_index(str(ev.target_class))
    total_K, n = np.zeros(len(latents)), 0
    for _, images_BCHW in iter_image_batches(
        backbone, paths, int(ev.batch_size), int(ev.num_workers), str(cfg.device), desc="rank"
    ):
        with torch.no_grad():
            x_BTD = backbone.tokens_after(images_BCHW, layer)
        effect_K = latent_effects(
            backbone, sae, probe, x_BTD, latents, t, str(ev.where), str(ev.tokens)
        )
        total_K += effect_K * len(x_BTD)
        n += len(x_BTD)
    if n == 0:
        raise TraitsaeError("none of the source images of the train split could be read.")
    return total_K / n


@torch.inference_mode()
def steer_images(
    cfg: DictConfig,
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
    ev, layer = cfg.eval, sae.layer
    probs, rows = [], []
    for rows_B, images_BCHW in iter_image_batches(
        backbone, paths, int(ev.batch_size), int(ev.num_workers), str(cfg.device), desc="steer"
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
                        str(ev.where),
                        str(ev.tokens),
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


def write_outputs(result: dict[str, Any], probs_ANC: np.ndarray, probe: ClassProbe, out) -> None:

    (out / "steer.json").write_text(json.dumps(result, indent=2) + "\n")
    figures.save(before_after_figure(result, probs_ANC, probe), out / "steer_before_after.png")
    figures.save(curve_figure(result), out / "steer_curve.png")
    print(format_result(result))
    print(f"steer: outputs in {out}")


def before_after_figure(
    result: dict[str, Any], probs_ANC: np.ndarray, probe: ClassProbe, n_top: int = 4
):
    """The classification-control figure: one image's top classes before (alpha 0) and after
    (the largest alpha) steering."""
    alphas = [p["alpha"] for p in result["curve"]]
    before, after = probs_ANC[alphas.index(0.0), 0], probs_ANC[-1, 0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    target = result["target_class"]
    for ax, probs_C, title in (
        (axes[0], before, "before (alpha = 0)"),
        (axes[1], after, f"after (alpha = {alphas[-1]:g})"),
    ):
        top = np.argsort(-probs_C, kind="stable")[:n_top]
        names = [probe.classes[c] for c in top]
        colours = ["tab:orange" if n == target else "tab:blue" for n in names]
        ax.bar(range(n_top), probs_C[top], color=colours)
        ax.set_xticks(range(n_top), [n.replace("_", "\n") for n in names], fontsize="small")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("probe probability")
    first = result["images"][0]
    fig.suptitle(
        f"{first['path'].rsplit('/', 1)[-1]} ({first['class']}): latents {result['latents']} -> {target}"
    )
    return fig


def curve_figure(result: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    alphas = [p["alpha"] for p in result["curve"]]
    ax.plot(
        alphas, [p["mean_p_target"] for p in result["curve"]], marker="o", label="mean p(target)"
    )
    ax.plot(
        alphas, [p["frac_top1_target"] for p in result["curve"]], marker="s", label="top-1 = target"
    )
    ax.set_xlabel("alpha (added code)")
    ax.set_ylim(0, 1)
    ax.set_title(f"steering to {result['target_class']} ({result['n_images']} images)")
    ax.legend(fontsize="small")
    return fig


def format_result(result: dict[str, Any]) -> str:
    lines = [
        f"steering {result['n_images']} images to {result['target_class']!r} with latents "
        f"{result['latents']}",
        f"  {'alpha':>8s} {'mean p(target)':>15s} {'top-1 = target':>15s} {'mean p(own)':>12s}",
    ]
    for p in result["curve"]:
        own = "—" if p["mean_p_own_class"] is None else f"{p['mean_p_own_class']:.3f}"
        lines.append(
            f"  {p['alpha']:8.3g} {p['mean_p_target']:15.3f} {p['frac_top1_target']:15.3f} {own:>12s}"
        )
    return "\n".join(lines)
