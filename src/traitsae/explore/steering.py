"""The Steer page's model side: the SAE's whole backbone, a class probe, and eval=steer's
`steered_probabilities` for one image at a time (no Streamlit here).

The probe is an eval=steer `probe.safetensors` of this SAE when the session found one (trained
on the train split), else one fitted once on the explored split's images (final embeddings,
classes from `species`, else `label`) and saved in the session's cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from traitsae.errors import TraitsaeError
from traitsae.evaluation.causal.forward import (
    build_full_backbone,
    final_embeddings,
    iter_image_batches,
)
from traitsae.evaluation.causal.steering import steered_probabilities
from traitsae.evaluation.core.frames import resolve_image_path
from traitsae.evaluation.core.probes import ClassProbe


def class_names(metadata: dict[str, np.ndarray]) -> np.ndarray:
    """The class of every store image as a string ('' = none): species, else the label."""
    if "species" in metadata:
        return np.asarray(metadata["species"]).astype(str)
    labels = np.asarray(metadata["label"])
    return np.where(labels >= 0, labels.astype(str), "")


class Steering:
    """Backbone + probe for one ExplorerData; class probabilities under latent edits."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.device = data.session.device
        self.backbone = build_full_backbone(data.sae, data.store, self.device).eval()
        self.classes_N = class_names(data.metadata)
        source = data.session.probe or str(Path(data.session.cache_dir) / "probe.safetensors")
        if not Path(source).is_file():
            self.fit_probe().save(source)
        self.probe = ClassProbe.load(source)
        self.probe_source = source
        self._tokens: dict[int, torch.Tensor] = {}

    def image_path(self, row: int) -> str:
        return str(resolve_image_path(str(self.data.paths[row]), self.data.session.image_root))

    def fit_probe(self) -> Any:
        """A probe on the final embeddings of the explored split's valid images."""
        rows = self.data.rows_V
        emb_NE, done = final_embeddings(
            self.backbone, [self.image_path(int(r)) for r in rows], 32, 0, self.device
        )
        labels = self.classes_N[rows[done]]
        if len(set(labels) - {""}) < 2:
            raise TraitsaeError(
                f"store {self.data.store.path} has fewer than 2 classes (species or label): the "
                "Steer page needs a class probe; run eval=steer for this SAE to make one."
            )
        return ClassProbe.fit(emb_NE, labels)

    @torch.inference_mode()
    def layer_tokens(self, row: int) -> torch.Tensor:
        """Block L's output tokens [1, T, D] of one image (kept: sliders re-use them)."""
        if row not in self._tokens:
            batches = iter_image_batches(self.backbone, [self.image_path(row)], 1, 0, self.device)
            found = next(batches, None)
            if found is None:
                raise TraitsaeError(f"image {self.image_path(row)} could not be read.")
            layer = self.data.sae.layer
            self._tokens[row] = self.backbone.tokens_after(found[1], layer)
        return self._tokens[row]

    def probabilities(
        self, row: int, latents: list[int], alphas: list[float], where: str = "all"
    ) -> np.ndarray:
        """[C] probe probabilities (order `probe.classes`) with each latent's code raised by
        its alpha in every edited token (`where="all"`) or where it fires (`"firing"`)."""
        if not latents:
            latents, alphas = [0], [0.0]  # no edit: the clean probabilities
        probs_1C = steered_probabilities(
            self.backbone,
            self.data.sae,
            self.probe,
            None,
            latents,
            alphas,
            where,
            "auto",
            self.layer_tokens(row),
        )
        return probs_1C[0].numpy()
