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
    if (
        isinstance(layers, str | bytes)
        or not isinstance(layers, Sequence)
        or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers)
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
    """A frozen ViT trunk, run as three stages: `embed` -> `blocks` -> `head`.

    `forward(images_BCHW)` -> (patches {L: [B, P, D]}, cls {L: [B, D]}) for each absolute layer L
    in `self.layers` (what extraction stores); `self.transform` maps a PIL image to the model's
    input tensor [C, H, W] using the model's own preprocessing (size, mean, std).

    Interventions (splicing an SAE in, steering) cut the same stages at block L:
    `tokens_after(images, L)` is the residual stream after block L (prefix tokens first, then
    patches), `finish_from(tokens, L)` runs blocks L+1.. and the head on (edited) tokens. A family
    implements `embed` (patch + position embeddings, prefix tokens, pre-norm), `blocks` and
    `head` (final norm, pooling, projection); everything else is shared.
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
        # build_backbone(prune=True) sets it: no blocks after max(layers), no head.
        self.pruned = False
        # CLIP families: a TextTower (zero-shot classifiers from prompts); None otherwise.
        self.text_tower = None

    # ----------------------------------------------------------------- what a family implements
    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images -> the tokens entering block 0 [B, T, D] (T = prefix tokens + patches)."""
        raise NotImplementedError

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, each [B, T, D] -> [B, T, D]."""
        raise NotImplementedError

    def head(self, tokens_BTD: torch.Tensor) -> torch.Tensor:
        """The last block's output -> the model's final image embedding [B, E]."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def intermediates(self, images_BCHW: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer in `self.layers`: (patches [B, P, D], prefix tokens [B, n_prefix, D])."""
        k = self.geometry.n_prefix_tokens
        x_BTD, out = self.embed(images_BCHW), []
        for index, block in enumerate(self.blocks[: self.layers[-1] + 1]):
            x_BTD = block(x_BTD)
            if index in self.layers:
                out.append((x_BTD[:, k:], x_BTD[:, :k]))
        return out

    def tokens_after(self, images_BCHW: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual stream after block `layer` [B, T, D] (prefix tokens, then patches)."""
        layer = self._check_cut(layer)
        x_BTD = self.embed(images_BCHW)
        for block in self.blocks[: layer + 1]:
            x_BTD = block(x_BTD)
        return x_BTD

    def finish_from(self, tokens_BTD: torch.Tensor, layer: int) -> Final:
        """Run blocks after `layer` on `tokens_BTD` (block `layer`'s output, maybe edited), then
        the head: the last block's tokens and the final embedding."""
        layer = self._check_cut(layer)
        if self.pruned:
            raise TraitsaeError(
                f"backbone {self.name!r} was built with prune=True (blocks after its stored layers "
                "and the head removed); build it with build_backbone(cfg, prune=False) to run "
                "it to the end."
            )
        x_BTD = tokens_BTD
        for block in self.blocks[layer + 1 :]:
            x_BTD = block(x_BTD)
        return Final(tokens_BTD=x_BTD, embedding_BE=self.head(x_BTD))

    def _check_cut(self, layer: int) -> int:
        (absolute,) = resolve_layers([layer], self.geometry.depth, self.name)
        return absolute

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


@dataclass(frozen=True)
class Final:
    """What the end of the model gives for a batch."""

    tokens_BTD: torch.Tensor  # the last block's output (raw residual stream, before the head)
    embedding_BE: torch.Tensor  # the model's image embedding (timm: pooled; CLIP: projected)
