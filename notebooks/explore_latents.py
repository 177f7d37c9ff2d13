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
# # Exploring a trained SAE's latents
#
# What the latents of one SAE look like on one activation store:
# 1. how often each latent fires (dead and dense latents stand out in the histogram),
# 2. galleries: each latent's top images with its patch heat-map overlaid,
# 3. search by region: pick a place on an image and find the latents that fire there.
#
# The sparse codes are written once with `eval=encode`'s writer and then queried without
# running the SAE again. Set the parameters below (or let the test suite inject them).

# %%
import os
from pathlib import Path

import numpy as np
from IPython.display import Image, display

from traitsae import load_sae
from traitsae.data.store import Store
from traitsae.evaluation.core import figures, firing, frames
from traitsae.evaluation.core.codes import SparseCodes, write_sparse_codes
from traitsae.evaluation.latents import features

# %%
# Paths below are relative to the repository root, where `make demo` writes.
if Path.cwd().name == "notebooks":
    os.chdir(Path.cwd().parent)

# %% tags=["parameters"]
RUN = "logs/demo/train"  # a train.py run dir (holds sae.json), or a path to sae.json
STORE = None  # activation store (.h5); None = the store recorded in sae.json
IMAGE_ROOT = None  # directory the store's image paths are relative to (dataset.root)
IMAGE_SIZE = None  # backbone input size; None = the store's image_size
OUT = "notebook_outputs/explore_latents"
TOP_K = 8  # images per gallery
N_GALLERIES = 4
QUERY_IMAGE = 0  # store row of the image to search in
QUERY_REGION = (0, 2, 0, 2)  # patch rows [r0, r1) and cols [c0, c1) of the region

# %%
out = Path(OUT)
out.mkdir(parents=True, exist_ok=True)
sae = load_sae(RUN)
store = Store(STORE or sae.meta["store"])
images = frames.store_image_source(store, IMAGE_ROOT, IMAGE_SIZE)
print(store)
print(f"SAE: {sae.d_sae} latents, trained on layer {sae.layer} of {sae.backbone}")

# %% [markdown]
# ## 1. Firing frequency
# One streaming pass over the store counts how often each latent fires and keeps every latent's
# top images on the fly.

# %%
stats, topk = firing.scan(store, sae, TOP_K)
display(Image(filename=str(features.frequency_histogram(stats, out / "frequency.png"))))
freq = stats.patch_freq
print(
    f"dead: {(freq == 0).sum()}, firing on > 1% of patches: {(freq > 1e-2).sum()}, "
    f"median frequency of the alive: {np.median(freq[freq > 0]):.2e}"
)

# %% [markdown]
# ## 2. Galleries
# The latents with the strongest single activation, each with its top images.

# %%
strongest = np.argsort(-stats.image_max_S)[:N_GALLERIES]
entries = features.galleries(store, sae, stats, topk, strongest, images, out)
for entry in entries:
    print(f"latent {entry['latent']}: fires on {entry['image_freq']:.1%} of images")
    if entry["figure"]:
        display(Image(filename=str(out / entry["figure"])))

# %% [markdown]
# ## 3. Search latents by an image region
# Sparse codes of the whole store go to `codes.h5` once; a query then reads one image's codes.
# Latents are ranked by how much more they fire inside the region than elsewhere on the image.

# %%
codes_path = write_sparse_codes(store, sae, out / "codes.h5")
codes = SparseCodes(codes_path)
rows, cols = codes.grid
r0, r1, c0, c1 = QUERY_REGION
dense_RCS = codes.image_codes(QUERY_IMAGE).reshape(rows, cols, -1)
inside_RC = np.zeros((rows, cols), dtype=bool)
inside_RC[r0:r1, c0:c1] = True
contrast_S = dense_RCS[inside_RC].mean(axis=0) - dense_RCS[~inside_RC].mean(axis=0)
found = [int(s) for s in np.argsort(-contrast_S)[:3] if contrast_S[s] > 0]
print(f"latents firing in region {QUERY_REGION} of image {QUERY_IMAGE}: {found}")

# %%
path = str(codes.metadata("path")[QUERY_IMAGE])
region_panel = figures.Panel(images.load(path), inside_RC.astype(float), "query region")
latent_panels = [
    figures.Panel(images.load(path), codes.latent_map(QUERY_IMAGE, s), f"latent {s}") for s in found
]
figure = figures.plot_panel_rows(
    [("query", [region_panel, *latent_panels])],
    out / "region_query.png",
    f"image {QUERY_IMAGE}: {path}",
)
display(Image(filename=str(figure)))
for entry in features.galleries(
    store, sae, stats, topk, np.array(found, dtype=np.int64), images, out
):
    if entry["figure"]:
        display(Image(filename=str(out / entry["figure"])))
codes.close()
store.close()
