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
# probe on the backbone's final image embedding, then add the decoder directions of one class's
# latents to the residual stream of other images at the SAE's layer, run the remaining blocks,
# and watch the probe change its mind. In the demo, `002.Beta_warbler` lacks one trait of
# `001.Alpha_warbler` (the red crown spot): boosting Alpha's latents in Beta's images should make
# the probe more sure of Alpha. This is `python evaluate.py eval=steer`, step by step, through
# the function API the explorer's Steer page also uses.
#
# Make the demo first (README: `make demo`, which also extracts the test split), or point the
# parameters at your own run.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from traitsae import load_sae
from traitsae.data.images.cub import load_cub
from traitsae.data.store import Store
from traitsae.evaluation.causal.forward import build_full_backbone, final_embeddings
from traitsae.evaluation.causal.steering import class_latents, steered_probabilities
from traitsae.evaluation.core.probes import ClassProbe

# %%
# Paths below are relative to the repository root, where `make demo` writes.
if Path.cwd().name == "notebooks":
    os.chdir(Path.cwd().parent)

# %% tags=["parameters"]
RUN = "logs/demo/train"  # train.py run dir of the demo SAE
DATA_ROOT = "data/synthetic"  # the generated demo dataset
TARGET = "001.Alpha_warbler"  # the class to steer towards
SOURCE = "002.Beta_warbler"  # the images to steer
N_LATENTS = 3
ALPHAS = [0, 0.25, 0.5, 1, 2, 4]
OUT = "notebook_outputs/classification_control"

# %%
out = Path(OUT)
out.mkdir(parents=True, exist_ok=True)
sae = load_sae(RUN)
layer = sae.layer
train_store = Store(sae.meta["store"])  # the store the SAE was trained on (train split)
backbone = build_full_backbone(sae, train_store)  # sae.json's backbone, checked against the store
train, test = (load_cub(DATA_ROOT, split) for split in ("train", "test"))  # the CUB layout
print(
    f"SAE on block {layer} of {backbone.name} (depth {backbone.geometry.depth}); "
    f"{len(train)} train / {len(test)} test images"
)

# %% [markdown]
# ## 1. A class probe on the final embedding
# Logistic regression on the clean final embedding of the train images (the model's own output:
# blocks after the SAE's layer and the head included). The demo's backbone is a random tiny ViT,
# so its final embedding keeps little of the small planted traits: expect a weak probe (chance
# is 1/12); steering is measured against what this probe reads.

# %%
classes_train = np.asarray(train.metadata["species"], dtype=object)
classes_test = np.asarray(test.metadata["species"], dtype=object)
emb_train, rows_train = final_embeddings(backbone, train.paths, 64, 0, "cpu")
emb_test, rows_test = final_embeddings(backbone, test.paths, 64, 0, "cpu")
probe = ClassProbe.fit(emb_train, classes_train[rows_train])
print(
    f"probe accuracy: train {probe.accuracy(emb_train, classes_train[rows_train]):.3f}, "
    f"test {probe.accuracy(emb_test, classes_test[rows_test]):.3f}, chance {1 / len(probe.classes):.3f}"
)

# %% [markdown]
# ## 2. The target class's latents
# Image score of a latent = its largest code over the image's patches; a latent is specific to
# the target when its mean score is higher in the class than outside it (train store). The unit
# of alpha is each latent's typical activation: its code averaged over a target image's patches
# (mean over the class's train images), so that alpha = 1 at every patch gives a source image as
# much of the latent as a typical target image carries. (`eval=steer` goes one step further by
# default, `eval.rank=effect`: of the 32 most specific latents it keeps those whose step raises
# the probe's p(target) most on the train split's source images.)

# %%
found = class_latents(sae, train_store, classes_train, TARGET, N_LATENTS, "cpu")
latents, units = found.ranked, found.typical_S[found.ranked]
print(
    f"top latents of {TARGET}: {latents}; largest codes {np.round(found.latent_max_S[latents], 2)}; "
    f"alpha units {np.round(units, 3)}"
)

# %% [markdown]
# ## 3. Steer
# Block L's output of each source image is computed once; every alpha then only runs the blocks
# after L. alpha * unit is added to each latent's code at every patch.

# %%
source = [p for p, c in zip(test.paths, classes_test, strict=True) if c == SOURCE]
images = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in source])
with torch.inference_mode():
    tokens = backbone.tokens_after(images, layer)
    probs = torch.stack(
        [
            steered_probabilities(
                backbone, sae, probe, None, latents, a * units, layer_tokens_BTD=tokens
            )
            for a in ALPHAS
        ]
    ).numpy()  # [alphas, images, classes]
t = probe.classes.index(TARGET)
s = probe.classes.index(SOURCE)
for a, p in zip(ALPHAS, probs, strict=True):
    print(
        f"alpha {a:5g}: mean p({TARGET}) = {p[:, t].mean():.3f}   mean p({SOURCE}) = {p[:, s].mean():.3f}"
    )

# %% [markdown]
# ## 4. Before and after, for one image

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
for ax, p, title in (
    (axes[0], probs[0, 0], "before (alpha 0)"),
    (axes[1], probs[-1, 0], f"after (alpha {ALPHAS[-1]:g})"),
):
    top = np.argsort(-p)[:4]
    ax.bar(range(4), p[top], color=["tab:orange" if c == t else "tab:blue" for c in top])
    ax.set_xticks(range(4), [probe.classes[c].split(".")[-1] for c in top], fontsize="small")
    ax.set_title(title)
axes[0].set_ylabel("probe probability")
fig.savefig(out / "before_after.png", dpi=100, bbox_inches="tight")
print(f"figure: {out / 'before_after.png'}")
