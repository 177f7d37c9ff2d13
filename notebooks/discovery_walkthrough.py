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
from traitsae.evaluation.core import frames, heatmaps
from traitsae.evaluation.core.tokens import gather_codes
from traitsae.evaluation.discovery import discovery, groups
from traitsae.evaluation.discovery import stats as discovery_stats
from traitsae.evaluation.discovery.candidates import build_candidates, candidate_figure

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
mask_a = groups.group_mask(store.metadata, GROUP_A, "group_a", str(store.path))
mask_b = groups.group_mask(store.metadata, GROUP_B, "group_b", str(store.path))
print(f"group A: {mask_a.sum()} images, group B: {mask_b.sum()} images")

# %% [markdown]
# ## 2. One pass: image-level scores
# A latent's score on an image is its max over the image's patches: a matrix [images, latents].

# %%
scores = discovery.collect_scores(store, sae, mask_a, mask_b)
print(f"score matrix: {scores.scores_NS.shape[0]} images x {scores.scores_NS.shape[1]} latents")

# %% [markdown]
# ## 3. Statistics on the score matrix
# `discovery_stats.contrast` holds half of each group out, ranks latents on the other half by
# AUROC (specificity: 1 = fires more on every A image than on any B image), gives each tested
# latent a permutation p-value (group labels shuffled) and a Benjamini-Hochberg q-value, and
# re-tests the candidates on the held-out half. With 12 images per group the halves are tiny:
# read the verdicts.

# %%
rule = discovery_stats.RankingRule(n_candidates=5)
result = discovery_stats.contrast(
    scores.scores_NS, scores.in_a, rule, discovery_stats.NullOptions(), progress=False
)
print(f"{result.summary['tested']} latents tested, {result.summary['n_dense']} dense")
for group, words in result.summary["verdict"].items():
    print(f"group {group.upper()}: {words}")
for cand in result.table():
    print(
        f"{cand['group']} latent {cand['latent']:>4}: AUROC {cand['auroc']:.2f}, "
        f"q {cand['q_value']:.2g}, held-out AUROC {cand['confirm_auroc']:.2f}, "
        f"confirmed {cand['confirmed']}"
    )

# %% [markdown]
# ## 4. Candidates and their heat-maps
# Each candidate's heat-maps on its top images are scored by normalised entropy (low = narrow)
# and Moran's I (high = coherent); triage score = alpha*specificity + beta*(-entropy) +
# gamma*Moran's I. Discoveries come first, then confirmed candidates, then the rest.

# %%
candidates, maps = build_candidates(
    store, sae, scores, result.candidates, heatmaps.TriageWeights(), n_top_images=6
)
top = next(c for c in candidates if c.stats.group == "a")
print(f"top candidate for A: latent {top.stats.latent}, triage score {top.score:.2f}")

# %%
names = {"a": groups.describe_group(GROUP_A), "b": groups.describe_group(GROUP_B)}
images = frames.store_image_source(store, IMAGE_ROOT)
figure = candidate_figure(
    top, maps, store.metadata, names, images, scores, out / "top_candidate.png"
)
display(Image(filename=str(figure)))

# %% [markdown]
# ## 5. Is it the planted trait?
# The demo saved each image's trait masks (in raw image pixels). Framed like the backbone framed
# the image and reduced to the patches the trait touches, they tell how much of the top latent's
# heat-map sits on the crown spot rather than on the rest of the bird.

# %%
if MASK_TRAIT is not None and (Path(IMAGE_ROOT) / "trait_masks.npz").exists():
    from traitsae.data.synthetic import load_trait_masks

    image_ids, masks_NTHW = load_trait_masks(IMAGE_ROOT)
    position = {int(i): n for n, i in enumerate(image_ids)}
    top_codes = gather_codes(store, sae, np.array(top.top_rows), np.array([top.stats.latent]))
    for row in top.top_rows:
        mask_HW = masks_NTHW[position[int(store.metadata["image_id"][row])], MASK_TRAIT]
        on_trait_RC = heatmaps.patch_mask(images.frame.mask(mask_HW), store.grid)
        heat_RC = top_codes[row][:, 0].reshape(store.grid)
        print(
            f"image {row}: {heatmaps.mass_inside(heat_RC, on_trait_RC):.0%} of the heat-map "
            "inside the planted trait"
        )
store.close()
