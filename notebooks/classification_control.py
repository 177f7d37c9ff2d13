# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Classification control on the synthetic demo
#
# Are an SAE's latents *causal* for what the model computes downstream? We fit a linear class
# probe on the backbone's final image embedding (train split), add the decoder directions of the
# target class's latents to the residual stream of HELD-OUT images of other classes at the SAE's
# layer, run the remaining blocks, and read the probe. A rise of p(target) is evidence only if
# (1) the probe recognises held-out target images at all, (2) it beats random latents of the
# same firing frequency added at the same norm, and (3) it holds over images (a CI).
#
# This notebook runs exactly `make demo`'s `python evaluate.py eval=steer` (the same config,
# the same `compute_steer`), then looks at each piece. Make the demo first (README: `make demo`),
# or point the parameters at your own run. The demo steers through `backbone=tiny_maxpool`: the
# random tiny ViT whose final embedding is the max over its patch tokens (its CLS token does not
# carry the planted traits on held-out images), with an SAE at block 2 of 4 (`logs/demo/steer-train`).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import traitsae
from traitsae.evaluation.causal.steer import compute_steer
from traitsae.evaluation.causal.steer_options import SteerOptions
from traitsae.evaluation.causal.steer_report import format_result
from traitsae.evaluation.core.options import build_options

# %%
# Paths below are relative to the repository root, where `make demo` writes.
if Path.cwd().name == "notebooks":
    os.chdir(Path.cwd().parent)

# %% tags=["parameters"]
RUN = "logs/demo/steer-train"  # train.py run dir of the demo's steering SAE
ACTIVATIONS = "logs/demo/activations"  # where make demo extracted the train and test stores
DATA_ROOT = "data/synthetic"  # the generated demo dataset
TARGET = "001.Alpha_warbler"  # the class to steer towards
SOURCE = None  # the held-out images to steer (test split): None = every other class, as make demo
ALPHAS = [0, 0.25, 0.5, 1, 2, 4]  # eval=steer's default
OUT = "notebook_outputs/classification_control"

# %% [markdown]
# ## 1. The same run as `eval=steer`

# %%
out = Path(OUT)
out.mkdir(parents=True, exist_ok=True)
overrides = [
    "eval=steer",
    "dataset=synthetic",
    f"dataset.root={Path(DATA_ROOT).resolve()}",
    f"paths.activations_dir={Path(ACTIVATIONS).resolve()}",
    f"run={Path(RUN).resolve()}",
    "split=test",
    f"eval.target_class={TARGET}",
    f"eval.alphas=[{','.join(str(a) for a in ALPHAS)}]",
    *([f"eval.source_class={SOURCE}"] if SOURCE else []),
]
GlobalHydra.instance().clear()
CONF = Path(traitsae.__file__).resolve().parents[2] / "conf"  # the repository's Hydra configs
with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
    cfg = compose("evaluate", overrides=overrides)
steered = compute_steer(cfg, build_options(SteerOptions, cfg))
result = steered.result
print(
    f"SAE on block {result['meta']['layer']} of {result['meta']['backbone']} (depth "
    f"{result['meta']['depth']}); latents {result['latents']} chosen on the train split"
)

# %% [markdown]
# ## 2. Can the probe see the target on held-out images?
# The probe is fitted on the train split; the steered images are the test split's. Before
# reading a curve, compare p(target) on clean held-out target images with p(target) on the
# clean source images: if they do not differ, p(target) does not measure the class on unseen
# images, and `eval=steer` says the curve is no evidence. (With `backbone=tiny`'s CLS read-out,
# the demo's main SAE `logs/demo/train`, it does not: try RUN = "logs/demo/train".)

# %%
readout = result["readout"]
print(
    f"held-out p({TARGET}): {readout['p_target_on_target']:.3f} on clean {TARGET} images vs "
    f"{readout['p_target_on_source']:.3f} on the clean source images; difference "
    f"{readout['difference']:+.3f}, 95% CI [{readout['difference_ci'][0]:+.3f}, "
    f"{readout['difference_ci'][1]:+.3f}]; informative: {readout['informative']}"
)

# %% [markdown]
# ## 3. The curve, the control and the verdict
# alpha is in typical activations: alpha = 1 adds to every patch as much of each latent as a
# typical target image carries (its code averaged over the image's patches). The control
# steers frequency-matched random latents at the same norm; the difference is paired per image.

# %%
print(format_result(result))

# %%
alphas = [p["alpha"] for p in result["curve"]]
fig, ax = plt.subplots(figsize=(4.5, 3.4))
ax.plot(alphas, [p["mean_p_target"] for p in result["curve"]], marker="o", label="target's latents")
ax.fill_between(alphas, *np.array([p["ci"] for p in result["curve"]]).T, alpha=0.2)
ax.plot(alphas, result["control"]["curve"], marker="x", ls="--", label="random latents")
ax.set_xlabel("alpha (typical activations)")
ax.set_ylabel(f"mean p({TARGET.split('.')[-1]})")
ax.legend(fontsize="small")
fig.savefig(out / "curve.png", dpi=100, bbox_inches="tight")
print(f"figure: {out / 'curve.png'}")

# %% [markdown]
# ## 4. The verdict
# Evidence needs all three: the curve rises at every alpha, it beats the random latents at
# every alpha > 0 (the paired CI above 0), and the probe reads the target on held-out images.

# %%
print(f"verdict: {result['verdict']}")
