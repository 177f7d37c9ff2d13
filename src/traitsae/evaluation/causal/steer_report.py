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
