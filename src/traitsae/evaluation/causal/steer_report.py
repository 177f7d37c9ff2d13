"""What eval=steer writes: steer.json, the before/after and curve figures, the printed summary."""

from __future__ import annotations

from typing import Any

import numpy as np

from traitsae.evaluation.core import figures
from traitsae.evaluation.core.figures import plt
from traitsae.evaluation.core.outputs import write_json
from traitsae.evaluation.core.probes import ClassProbe


def write_outputs(result: dict[str, Any], probs_ANC: np.ndarray, probe: ClassProbe, out) -> None:
    write_json(out / "steer.json", result)
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
    means = [p["mean_p_target"] for p in result["curve"]]
    ax.plot(alphas, means, marker="o", label="mean p(target)")
    if all(p.get("ci") and np.isfinite(p["ci"]).all() for p in result["curve"]):
        ax.fill_between(
            alphas,
            [p["ci"][0] for p in result["curve"]],
            [p["ci"][1] for p in result["curve"]],
            alpha=0.2,
        )
    if "curve" in result.get("control", {}):
        ax.plot(alphas, result["control"]["curve"], marker="x", ls="--", label="control (random)")
    ax.plot(
        alphas, [p["frac_top1_target"] for p in result["curve"]], marker="s", label="top-1 = target"
    )
    ax.set_xlabel("alpha (typical activations added)")
    ax.set_ylim(0, 1)
    ax.set_title(f"steering to {result['target_class']} ({result['n_images']} images)")
    ax.legend(fontsize="small")
    return fig


def format_result(result: dict[str, Any]) -> str:
    control = result.get("control", {})
    lines = [
        f"steering {result['n_images']} held-out images to {result['target_class']!r} with "
        f"latents {result['latents']}; control: {control.get('n_sets', 0)} sets of "
        "frequency-matched random latents at equal norm",
        f"  {'alpha':>8s} {'mean p(target) [95% CI]':>26s} {'control':>8s} "
        f"{'difference [95% CI]':>26s} {'top-1':>6s} {'p(own)':>7s}",
    ]
    for p in result["curve"]:
        own = "n/a" if p["mean_p_own_class"] is None else f"{p['mean_p_own_class']:.3f}"
        ci = fmt_ci(p["mean_p_target"], p.get("ci"))
        ctrl = f"{p['control_mean_p_target']:.3f}" if "control_mean_p_target" in p else "n/a"
        diff = fmt_ci(p["difference"], p["difference_ci"], "+") if "difference" in p else "n/a"
        lines.append(
            f"  {p['alpha']:8.3g} {ci:>26s} {ctrl:>8s} {diff:>26s} "
            f"{p['frac_top1_target']:6.3f} {own:>7s}"
        )
    verdict = result.get("verdict", {})
    if verdict:
        lines.append(
            f"  rises at every alpha: {verdict['monotonic']}; beats the control at every alpha "
            f"> 0: {verdict['beats_control']}; probe reads the target on held-out images: "
            f"{verdict['readout_informative']}"
        )
    lines += [f"  note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def fmt_ci(mean: float, ci: list[float] | None, sign: str = "") -> str:
    if not ci or not np.isfinite(ci).all():
        return f"{mean:{sign}.3f} [CI n/a]"
    return f"{mean:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


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
    """steer.json's curve and per-image top classes from the probabilities [A, n, C]."""
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
        "latent_max": [float(latent_max[s]) for s in latents],
        "n_images": int(len(rows_N)),
        "curve": curve,
        "images": per_image,
    }
