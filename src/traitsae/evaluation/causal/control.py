"""What makes a steering curve evidence: held-out images, a confidence interval over them, a
control of random latents, and checks that the read-out can show an effect at all.

- `mean_ci`: mean and 95 % t-interval over images (images are the unit of replication).
- `control_latents`: frequency-matched random latents (each chosen latent replaced by one of
  the `pool` latents nearest to it in firing frequency on the train split, never a candidate),
  steered at equal norm (`control_units`: the same raw-space vector length per token as the
  latent it stands in for), so the control differs from the real edit only in its direction.
- `readout_notes`: reasons why the curve cannot show what steering does (a probe that cannot
  tell held-out target images from source images, saturated probabilities, a non-finite value).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from traitsae.sae.export import RawSpaceSAE

CONFIDENCE = 0.95


def mean_ci(values_N: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % t-interval of the mean over the first axis (n >= 2; with
    one value the interval is (nan, nan) and the caller says why)."""
    values_N = np.asarray(values_N, dtype=np.float64)
    mean = float(values_N.mean())
    if values_N.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, values_N.size - 1) * stats.sem(values_N)
    if not np.isfinite(half):  # every value equal: sem 0 -> 0 * t, finite; nan only if inputs are
        half = 0.0
    return mean, mean - float(half), mean + float(half)


def control_latents(
    chosen: Sequence[int],
    frequency_S: np.ndarray,
    exclude: Sequence[int],
    n_sets: int,
    seed: int,
    pool: int = 8,
) -> list[list[int]]:
    """`n_sets` lists of random latents, one per chosen latent, each drawn from the `pool`
    latents closest in firing frequency to the one it replaces (none of `exclude`)."""
    allowed_S = np.ones(frequency_S.size, dtype=bool)
    allowed_S[list(exclude)] = False
    allowed = np.flatnonzero(allowed_S)
    if allowed.size == 0:
        return []
    rng = np.random.default_rng([seed, 11])
    near = {
        s: allowed[np.argsort(np.abs(frequency_S[allowed] - frequency_S[s]), kind="stable")][:pool]
        for s in chosen
    }
    return [[int(rng.choice(near[s])) for s in chosen] for _ in range(n_sets)]


def control_units(
    sae: RawSpaceSAE, chosen: Sequence[int], units_K: np.ndarray, control: Sequence[int]
) -> np.ndarray:
    """Per control latent: the code step whose raw-space vector is as long as the chosen
    latent's (units_K[k] * |W_dec[chosen_k]| / |W_dec[control_k]|)."""
    norms_S = sae.W_dec.detach().float().norm(dim=-1).cpu().numpy()
    return units_K * norms_S[list(chosen)] / np.maximum(norms_S[list(control)], 1e-12)


def readout_notes(
    target: str, p_target_on_target_N: np.ndarray, p_target_on_source_N: np.ndarray
) -> tuple[dict, list[str]]:
    """Whether the probe reads the target on held-out images: mean p(target) on clean target
    images vs clean source images of the steered split, the difference's CI, and why not."""
    notes = []
    summary: dict = {"n_target_images": int(p_target_on_target_N.size)}
    if p_target_on_target_N.size < 2:
        notes.append(
            f"the steered split has {p_target_on_target_N.size} readable image(s) of {target}: "
            "whether the probe recognises held-out target images cannot be checked."
        )
        return summary, notes
    on_target = mean_ci(p_target_on_target_N)
    on_source = mean_ci(p_target_on_source_N)
    gap = Welch(p_target_on_target_N, p_target_on_source_N)
    summary |= {
        "p_target_on_target": on_target[0],
        "p_target_on_source": on_source[0],
        "difference": gap.mean,
        "difference_ci": [gap.low, gap.high],
    }
    summary["informative"] = bool(gap.low > 0)
    if not summary["informative"]:
        notes.append(
            f"the probe does not tell held-out {target} images from the source images: mean "
            f"p({target}) {on_target[0]:.3f} on clean {target} images vs {on_source[0]:.3f} on "
            f"the clean source images (difference {gap.mean:+.3f}, 95 % CI [{gap.low:+.3f}, "
            f"{gap.high:+.3f}]). Its p({target}) does not measure the class on unseen images, so "
            "a change under steering is not evidence that the latents carry the class; use a "
            "backbone whose final embedding separates the classes (a trained one), more train "
            "images, or an SAE at a later layer."
        )
    return summary, notes


class Welch:
    """Difference of two independent means with its 95 % Welch t-interval."""

    def __init__(self, a_N: np.ndarray, b_M: np.ndarray) -> None:
        a_N, b_M = np.asarray(a_N, np.float64), np.asarray(b_M, np.float64)
        self.mean = float(a_N.mean() - b_M.mean())
        va, vb = a_N.var(ddof=1) / a_N.size, b_M.var(ddof=1) / b_M.size
        se = float(np.sqrt(va + vb))
        if se == 0:
            self.low = self.high = self.mean
            return
        dof = (va + vb) ** 2 / (va**2 / (a_N.size - 1) + vb**2 / (b_M.size - 1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, dof)) * se
        self.low, self.high = self.mean - half, self.mean + half


def saturation_note(target: str, p_clean: float) -> list[str]:
    """p(target) already near 1 (or 0 for every alpha) leaves a curve no room to move."""
    if p_clean >= 0.9:
        return [
            f"mean p({target}) is already {p_clean:.3f} on the unsteered source images: the "
            "probe is saturated and a rise cannot show; steer images of another source class."
        ]
    return []


def compare(
    target: str,
    result: dict,
    p_target_AN: np.ndarray,
    control_RAN: np.ndarray | None,
    control_sets: list[list[int]],
    p_target_on_target_N: np.ndarray,
) -> dict:
    """steer.json's evidence: each curve point gets its CI over images, the control's mean
    p(target) and the paired difference (steered - control, per image) with its CI; then the
    read-out check, the verdict and the notes saying why a curve is not evidence."""
    curve = [dict(point) for point in result["curve"]]
    for point, p_N in zip(curve, p_target_AN, strict=True):
        _, low, high = mean_ci(p_N)
        point["ci"] = [low, high]
    control: dict = {"n_sets": len(control_sets), "latents": control_sets}
    if control_RAN is not None:
        control_AN = control_RAN.mean(0)  # per image: the mean over the random sets
        for point, c_N, p_N in zip(curve, control_AN, p_target_AN, strict=True):
            diff, low, high = mean_ci(p_N - c_N)
            point |= {
                "control_mean_p_target": float(c_N.mean()),
                "difference": diff,
                "difference_ci": [low, high],
            }
        control["curve"] = [float(c) for c in control_AN.mean(1)]
    readout, notes = readout_notes(target, p_target_on_target_N, p_target_AN[0])
    notes += saturation_note(target, float(p_target_AN[0].mean()))
    means = [point["mean_p_target"] for point in curve]
    steps = [point for point in curve if point["alpha"] > 0]
    verdict = {
        "monotonic": bool(np.all(np.diff(means) > 0)),
        "beats_control": bool(
            control_RAN is not None and steps and all(p["difference_ci"][0] > 0 for p in steps)
        ),
        "readout_informative": bool(readout.get("informative", False)),
    }
    if p_target_AN.shape[1] < 2:
        notes.append("one steered image: no confidence interval over images.")
    if control_RAN is None:
        notes.append("no random latents left for the control (every latent is a candidate).")
    verdict["evidence"] = bool(verdict["monotonic"] and verdict["beats_control"] and not notes)
    return {
        "curve": curve,
        "control": control,
        "readout": readout,
        "verdict": verdict,
        "notes": notes,
    }
