"""The one interface every backbone family implements (see `Backbone`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from traitsae.errors import TraitsaeError


@dataclass(frozen=True)
class Geometry:
    """What the store needs to know about a backbone's token layout."""

    depth: int  # number of transformer blocks
    d_model: int  # residual-stream width
    image_size: int  # square input side in pixels
    patch_size: int
    n_prefix_tokens: int  # CLS + registers, in front of the patches

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def n_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols


def resolve_layers(layers: Sequence[int], depth: int, name: str) -> list[int]:
    """Absolute, sorted, unique block indices; negative indices count from the end."""
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence) or not all(
        isinstance(layer, int) and not isinstance(layer, bool) for layer in layers
    ):
        raise TraitsaeError(
            f"backbone.layers={layers!r} for {name!r} must be a list of block indices, e.g. "
            "backbone.layers=[-1] or 'backbone.layers=[-2,-1]' (negative = from the end)."
        )
    if len(layers) == 0:
        raise TraitsaeError(
            f"backbone.layers is empty for {name!r}; give e.g. backbone.layers=[-2]."
        )
    resolved = []
    for layer in layers:
        absolute = int(layer) + depth if int(layer) < 0 else int(layer)
        if not 0 <= absolute < depth:
            raise TraitsaeError(
                f"backbone.layers contains {layer}, out of range for backbone {name!r} of depth "
                f"{depth}: use 0..{depth - 1} or -{depth}..-1 (-1 = last block)."
            )
        resolved.append(absolute)
    return sorted(set(resolved))


class Backbone(nn.Module):
    """A frozen ViT trunk returning the residual stream after chosen blocks.

    `forward(images_BCHW)` -> (patches {L: [B, P, D]}, cls {L: [B, D]}) for each absolute layer L
    in `self.layers`; `self.transform` maps a PIL image to the model's input tensor [C, H, W]
    using the model's own preprocessing (size, mean, std).
    """

    def __init__(
        self,
        name: str,
        trunk: nn.Module,
        geometry: Geometry,
        layers: Sequence[int],
        transform: Callable,
    ) -> None:
        super().__init__()
        self.name = name
        self.trunk = trunk.eval().requires_grad_(False)
        self.geometry = geometry
        self.layers = resolve_layers(layers, geometry.depth, name)
        self.transform = transform

    def intermediates(self, images_BCHW: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer in `self.layers`: (patches [B, P, D], prefix tokens [B, n_prefix, D])."""
        raise NotImplementedError

    @torch.inference_mode()
    def forward(
        self, images_BCHW: torch.Tensor
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        outputs = self.intermediates(images_BCHW)
        patches = {layer: p_BPD for layer, (p_BPD, _) in zip(self.layers, outputs, strict=True)}
        # CLS is the first prefix token in both timm and open_clip (registers follow it).
        cls = {
            layer: pre_BKD[:, 0] for layer, (_, pre_BKD) in zip(self.layers, outputs, strict=True)
        }
        return patches, cls
