"""The token stream over a store, and SAE codes of it.

`iter_valid_tokens` is the one streaming read every evaluation makes: the store's valid images
in whole, chunk-aligned blocks (skipping blocks that hold no wanted image), as float32 on the
device. `stream_codes` encodes those blocks in bounded sub-batches and yields dense codes per
batch of images (the pass of every heat-map evaluation). Nothing of size n_images x d_sae is
ever held by this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.sae.export import RawSpaceSAE

# Read the store in blocks of about this many bytes (rounded to whole HDF5 chunks).
_READ_BLOCK_BYTES = 32 * 2**20


@dataclass
class CodeBatch:
    image_index: np.ndarray  # [B] rows of the store
    codes_BPS: torch.Tensor  # [B, P, S] float32, >= 0


def sae_layer(store: Store, sae: RawSpaceSAE) -> int:
    """The absolute store layer the SAE was trained on; heat-maps need patch tokens."""
    tokens = sae.tokens
    if tokens != "patches":
        raise TraitsaeError(
            f"this SAE was trained on {tokens!r} tokens (sae.json 'tokens'); patch heat-maps, "
            "galleries and sparse patch codes need an SAE trained with data.tokens=patches."
        )
    return store.resolve_layer(sae.layer)


def read_block_rows(dataset: h5py.Dataset) -> int:
    """Images per read: whole chunks along N, about _READ_BLOCK_BYTES per block."""
    row_bytes = int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize
    chunk_rows = dataset.chunks[0] if dataset.chunks else 1
    chunks_per_block = max(1, _READ_BLOCK_BYTES // max(1, row_bytes * chunk_rows))
    return chunk_rows * chunks_per_block


def images_per_batch(n_patches: int, batch_patches: int) -> int:
    return max(1, batch_patches // max(1, n_patches))


def iter_valid_tokens(
    store: Store,
    layer: int,
    tokens: str = "patches",
    block: int | None = None,
    device: str = "cpu",
    keep: np.ndarray | None = None,
    *,
    desc: str | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The one streaming read of a store: (store rows [B], float32 activations [B, P, D] on
    `device`; P = 1 for CLS tokens) of the valid (and `keep`) images in store order, `block`
    images per read (default: whole HDF5 chunks, about _READ_BLOCK_BYTES). With `desc`, a
    progress bar (images/s) on stderr names the pass."""

    block = block or read_block_rows(store.tokens(layer, tokens))
    wanted_N = np.asarray(store.valid, dtype=bool) if keep is None else store.valid & keep
    bar = tqdm(total=int(wanted_N.sum()), desc=desc, unit="img", disable=desc is None, leave=False)
    with bar:
        for rows_B, acts in store.iter_valid(layer, tokens=tokens, block=block, keep=keep):
            acts_BPD = torch.from_numpy(np.ascontiguousarray(acts)).to(device, torch.float32)
            yield rows_B, acts_BPD[:, None, :] if acts_BPD.ndim == 2 else acts_BPD
            bar.update(len(rows_B))


@torch.inference_mode()
def encode_patches(
    sae: RawSpaceSAE, acts_BPD: np.ndarray | torch.Tensor, device: str
) -> torch.Tensor:
    """Dense codes [B, P, S] of raw patch activations [B, P, D]."""
    n_images, n_patches, d_model = acts_BPD.shape
    x_ND = (
        torch.as_tensor(np.ascontiguousarray(acts_BPD))
        if isinstance(acts_BPD, np.ndarray)
        else acts_BPD
    )
    codes_NS = sae.encode(x_ND.to(device).float().reshape(-1, d_model))
    return codes_NS.reshape(n_images, n_patches, -1).float()


def stream_codes(
    store: Store,
    sae: RawSpaceSAE,
    *,
    wanted_N: np.ndarray | None = None,
    batch_patches: int = 4096,
    device: str = "cpu",
    desc: str | None = None,
) -> Iterator[CodeBatch]:
    """One streaming pass: codes of every valid (and wanted) image, in store order (with
    `desc`, a progress bar naming the pass)."""
    layer = sae_layer(store, sae)
    per_batch = images_per_batch(store.n_patches, batch_patches)
    for index_B, acts_BPD in iter_valid_tokens(
        store, layer, device=device, keep=wanted_N, desc=desc
    ):
        for lo in range(0, len(index_B), per_batch):
            yield CodeBatch(
                index_B[lo : lo + per_batch],
                encode_patches(sae, acts_BPD[lo : lo + per_batch], device),
            )


def gather_codes(
    store: Store,
    sae: RawSpaceSAE,
    image_index: np.ndarray,
    latents: np.ndarray,
    device: str = "cpu",
) -> dict[int, np.ndarray]:
    """Codes of a few chosen images restricted to chosen latents: {image: [P, len(latents)]}.

    Used after the streaming pass to draw heat-maps of top images; rows are read one by one in
    increasing order (fancy indexing is slower in h5py), so keep the image list short.
    """
    dataset = store.patches(sae_layer(store, sae))
    latents_L = torch.as_tensor(np.asarray(latents, dtype=np.int64))
    out: dict[int, np.ndarray] = {}
    for image in sorted({int(i) for i in image_index}):
        codes_1PS = encode_patches(sae, dataset[image : image + 1], device)
        out[image] = codes_1PS[0][:, latents_L.to(codes_1PS.device)].cpu().numpy()
    return out


# Per-block working set of the widest method, [B, P, M] float32; bounds memory whatever M is.
BLOCK_BUDGET_BYTES = 256 * 2**20


def valid_rows(store: Store) -> np.ndarray:
    """Indices of the store's valid images (store order)."""
    return np.flatnonzero(np.asarray(store.metadata["valid"], dtype=bool))


def tokens_per_image(store: Store, tokens: str) -> int:
    return 1 if tokens == "cls" else int(store.n_patches)


def images_per_block(store: Store, tokens: str, widest: int) -> int:
    per_image = tokens_per_image(store, tokens) * max(widest, store.d_model) * 4
    return max(1, min(1024, BLOCK_BUDGET_BYTES // per_image))
