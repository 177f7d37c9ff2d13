"""OpenCLIP vision towers (OpenAI CLIP ViT-B/16, BioCLIP)."""

from __future__ import annotations

from typing import Any

import torch

from traitsae.backbones.base import Backbone, Geometry
from traitsae.backbones.weights import init_kwargs, load_or_explain, local_weights


class OpenClipViT(Backbone):
    def intermediates(self, images_BCHW: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = self.trunk.forward_intermediates(
            images_BCHW,
            indices=self.layers,
            output_fmt="NLC",
            intermediates_only=True,
            output_extra_tokens=True,
        )
        return list(zip(out["image_intermediates"], out["image_intermediates_prefix"], strict=True))


def create_openclip_model(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """(CLIP model, eval preprocessing) of a backbone config."""
    import open_clip

    weights = local_weights(cfg.get("weights"), cfg.name)
    kwargs = init_kwargs(cfg)
    checkpoint = str(cfg.checkpoint)
    if weights is not None and weights.is_dir():
        # A downloaded hf-hub model folder (open_clip_config.json + weights).
        name, tag = f"local-dir:{weights}", None
    elif weights is not None:
        name, tag = str(cfg.get("arch") or checkpoint), str(weights)
    elif cfg.get("pretrained"):
        name, tag = checkpoint, None if checkpoint.startswith("hf-hub:") else str(cfg.pretrained)
    else:
        name, tag = str(cfg.get("arch") or checkpoint), None

    def build() -> tuple[torch.nn.Module, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("init_seed", 0)))
            load = tag is not None or name.startswith(("hf-hub:", "local-dir:"))
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag, load_weights=load, **kwargs
            )
        return model, preprocess

    if weights is None and not cfg.get("pretrained"):
        return build()
    return load_or_explain(
        build, cfg.name, str(weights or f"{checkpoint} ({cfg.get('pretrained')})")
    )


def build_openclip(cfg: Any) -> OpenClipViT:
    model, preprocess = create_openclip_model(cfg)
    visual = model.visual
    geometry = Geometry(
        depth=len(visual.transformer.resblocks),
        d_model=int(visual.transformer.width),
        image_size=int(visual.image_size[0]),
        patch_size=int(visual.patch_size[0]),
        n_prefix_tokens=1,
    )
    return OpenClipViT(cfg.name, visual, geometry, cfg.layers, preprocess)
