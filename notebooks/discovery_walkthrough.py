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
# # Trait discovery, step by step, on the synthetic demo
#
# In the demo (`dataset=synthetic`), species `001.Alpha_warbler` and `002.Beta_warbler` differ by
# exactly one planted trait (a red crown spot, present in Alpha only) and share others (a wing
# band, a breast spot). Discovery should rank a latent that lights up the crown spot first and
# should not rank the shared traits. This notebook runs the steps of `eval=discovery` one by one
# and checks the answer against the planted trait masks.
#
# Make the demo SAE first (README: `make demo`), or point the parameters at your own run.

# %%
import os
from pathlib import Path

import numpy as np
from IPython.display import Image, display

from traitsae import load_sae
from traitsae.data.store import Store
from traitsae.evaluation import discovery, heatmaps
from traitsae.evaluation.encode import gather_codes

# %%
# Paths below are relative to the repository root, where `make demo` writes.
if Path.cwd().name == "notebooks":
    os.chdir(Path.cwd().parent)

# %% tags=["parameters"]
RUN = "logs/demo/train"  # train.py run dir of the demo SAE
STORE = None  # None = the store recorded in sae.json
IMAGE_ROOT = "data/synthetic"  # the generated demo dataset (also holds trait_masks.npz)
GROUP_A = {"species": ["001.Alpha_warbler"]}
GROUP_B = {"species": ["002.Beta_warbler"]}
MASK_TRAIT = 0  # index of the planted trait that tells A from B (None: skip the mask check)
OUT = "notebook_outputs/discovery_walkthrough"

# %%
out = Path(OUT)
out.mkdir(parents=True, exist_ok=True)
sae = load_sae(RUN)
store = Store(STORE or sae.meta["store"])
print(store)

# %% [markdown]
# ## 1. Groups from metadata
# A group is a filter on the store's per-image metadata columns (any column, several values).

# %%
mask_a = discovery.group_mask(store.metadata, GROUP_A, "group_a", str(store.path))
mask_b = discovery.group_mask(store.metadata, GROUP_B, "group_b", str(store.path))
print(f"group A: {mask_a.sum()} images, group B: {mask_b.sum()} images")

# %% [markdown]
# ## 2. One pass: image-level scores, then per-latent statistics
# A latent's score on an image is its max over the image's patches. AUROC of A vs B measures
# specificity: 1 = fires more on every A image than on any B image.

# %%
scores = discovery.collect_scores(store, sae, mask_a, mask_b)
stats = discovery.latent_stats(scores)
rule = discovery.RankingRule(n_candidates=5)
dense = discovery.dense_latents(stats, rule)
print(f"{scores.scores_NS.shape[1]} latents, {dense.sum()} dense (firing on most images of both)")
for name, values in (("AUROC", stats.auroc), ("rate A", stats.rate_a), ("rate B", stats.rate_b)):
    print(
        f"{name:>7}: " + " ".join(f"{q:.2f}" for q in np.quantile(values, [0, 0.25, 0.5, 0.75, 1]))
    )

# %% [markdown]
# ## 3. Candidates and their heat-maps
# The most specific latents with enough support are scored by their heat-maps: normalised entropy
# (low = narrow) and Moran's I (high = coherent); triage score = alpha*AUROC + beta*(-entropy) +
# gamma*Moran's I.

# %%
candidates, codes = discovery.build_candidates(
    store, sae, scores, stats, rule, heatmaps.TriageWeights(), n_top_images=6
)
discovery.print_summary(candidates, {"a": str(GROUP_A), "b": str(GROUP_B)})
top = next(c for c in candidates if c.group == "a")

# %%
latents = sorted({c.latent for c in candidates})
names = {"a": discovery.describe_group(GROUP_A), "b": discovery.describe_group(GROUP_B)}
images = heatmaps.store_image_source(store, IMAGE_ROOT)
figure = discovery.candidate_figure(
    top,
    codes,
    latents.index(top.latent),
    store.grid,
    store.metadata,
    names,
    images,
    out / "top_candidate.png",
    scores,
)
display(Image(filename=str(figure)))

# %% [markdown]
# ## 4. Is it the planted trait?
# The demo saved each image's trait masks (in raw image pixels). Framed like the backbone framed
# the image and reduced to the patches the trait touches, they tell how much of the top latent's
# heat-map sits on the crown spot rather than on the rest of the bird.

# %%
if MASK_TRAIT is not None and (Path(IMAGE_ROOT) / "trait_masks.npz").exists():
    from traitsae.data.synthetic import load_trait_masks

    image_ids, masks_NTHW = load_trait_masks(IMAGE_ROOT)
    position = {int(i): n for n, i in enumerate(image_ids)}
    top_codes = gather_codes(store, sae, np.array(top.top_rows), np.array([top.latent]))
    for row in top.top_rows:
        mask_HW = masks_NTHW[position[int(store.metadata["image_id"][row])], MASK_TRAIT]
        on_trait_RC = heatmaps.patch_mask(images.frame.mask(mask_HW), store.grid)
        heat_RC = top_codes[row][:, 0].reshape(store.grid)
        print(
            f"image {row}: {heatmaps.mass_inside(heat_RC, on_trait_RC):.0%} of the heat-map "
            "inside the planted trait"
        )
store.close()
