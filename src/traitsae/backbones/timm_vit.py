"""timm VisionTransformers (DINOv2, DINOv2 with registers, the tiny demo ViT)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config

from traitsae.backbones.base import Backbone, Geometry
from traitsae.backbones.weights import init_kwargs, load_or_explain, local_weights


class TimmViT(Backbone):
    # The stages of timm's VisionTransformer.forward_features / forward_head, cut apart.
    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        m = self.trunk
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images_BCHW))))

    @property
    def blocks(self) -> torch.nn.Sequential:
        return self.trunk.blocks

    def head(self, tokens_BTD: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_head(self.trunk.norm(tokens_BTD))


def create_timm_model(cfg: Any) -> torch.nn.Module:
    """The timm model of a backbone config (weights as configured, classifier removed)."""
    weights = local_weights(cfg.get("weights"), cfg.name)
    pretrained = bool(cfg.get("pretrained", True)) or weights is not None
    kwargs = dict(img_size=int(cfg.image_size), num_classes=0, **init_kwargs(cfg))
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))

    def build() -> torch.nn.Module:
        # A fixed seed makes randomly initialised backbones (tiny, benchmarks) reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("init_seed", 0)))
            return timm.create_model(cfg.checkpoint, pretrained=pretrained, **kwargs)

    if not pretrained:
        return build()
    return load_or_explain(build, cfg.name, str(weights or cfg.checkpoint))


def build_timm(cfg: Any) -> TimmViT:
    model = create_timm_model(cfg)
    size = int(cfg.image_size)
    overrides = {"input_size": (3, size, size)}
    if cfg.get("crop_pct") is not None:  # e.g. 1.0: the whole image, pixels map onto the grid
        overrides["crop_pct"] = float(cfg.crop_pct)
    data_cfg = resolve_data_config(overrides, model=model)
    geometry = Geometry(
        depth=len(model.blocks),
        d_model=int(model.embed_dim),
        image_size=size,
        patch_size=int(model.patch_embed.patch_size[0]),
        n_prefix_tokens=int(model.num_prefix_tokens),
    )
    return TimmViT(cfg.name, model, geometry, cfg.layers, create_transform(**data_cfg))
