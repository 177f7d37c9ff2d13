"""Sparse autoencoders: model family, activations, sparsity penalties, training module, export."""

from traitsae.sae.export import RawSpaceSAE, load_sae, save_sae
from traitsae.sae.model import VARIANTS, SAEOutput, SparseAutoencoder, build_sae

__all__ = [
    "VARIANTS",
    "RawSpaceSAE",
    "SAEOutput",
    "SparseAutoencoder",
    "build_sae",
    "load_sae",
    "save_sae",
]
