"""OpenCLIP vision towers (OpenAI CLIP ViT-B/16, BioCLIP)."""

from __future__ import annotations

from typing import Any

import open_clip
import torch

from traitsae.backbones.base import Backbone, Geometry
from traitsae.backbones.weights import init_kwargs, load_or_explain, local_weights
from traitsae.errors import TraitsaeError


class OpenClipViT(Backbone):
    # The stages of open_clip's VisionTransformer.forward, cut apart (its blocks are batch-first).
    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.trunk._embeds(images_BCHW)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.trunk.transformer.resblocks

    def head(self, tokens_BTD: torch.Tensor) -> torch.Tensor:
        pooled_BD, _ = self.trunk._pool(tokens_BTD)
        return pooled_BD if self.trunk.proj is None else pooled_BD @ self.trunk.proj


class TextTower:
    """The CLIP text encoder of a backbone (kept on the CPU; zero-shot classifiers are built once)."""

    def __init__(self, model: torch.nn.Module, tokenizer_name: str) -> None:
        self.model = model
        self.tokenizer_name = tokenizer_name

    @torch.inference_mode()
    def classifier(self, prompts: list[str]) -> torch.Tensor:
        """Unit text embeddings [C, E] of `prompts` (zero-shot class c scores emb @ row c)."""
        tokenizer = open_clip.get_tokenizer(
            self.tokenizer_name, context_length=int(self.model.context_length)
        )
        text_CE = self.model.encode_text(tokenizer(prompts)).float()
        return torch.nn.functional.normalize(text_CE, dim=-1)


def model_name(cfg: Any) -> tuple[str, str | None]:
    """(open_clip model name, pretrained tag) of a backbone config."""
    weights = local_weights(cfg.get("weights"), cfg.name)
    checkpoint = str(cfg.checkpoint)
    if weights is not None and weights.is_dir():
        # A downloaded hf-hub model folder (open_clip_config.json + weights).
        return f"local-dir:{weights}", None
    if weights is not None:
        return str(cfg.get("arch") or checkpoint), str(weights)
    if cfg.get("pretrained"):
        return checkpoint, None if checkpoint.startswith("hf-hub:") else str(cfg.pretrained)
    return str(cfg.get("arch") or checkpoint), None


def create_openclip_model(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """(CLIP model, eval preprocessing) of a backbone config."""
    weights = local_weights(cfg.get("weights"), cfg.name)
    kwargs = init_kwargs(cfg)
    checkpoint = str(cfg.checkpoint)
    name, tag = model_name(cfg)

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
    if not getattr(visual.transformer, "batch_first", True):
        raise TraitsaeError(
            f"backbone {cfg.name!r}: open_clip built a sequence-first transformer; traitsae runs "
            "its blocks batch-first (open_clip >= 2.24 default). Upgrade open_clip."
        )
    geometry = Geometry(
        depth=len(visual.transformer.resblocks),
        d_model=int(visual.transformer.width),
        image_size=int(visual.image_size[0]),
        patch_size=int(visual.patch_size[0]),
        n_prefix_tokens=1,
    )
    backbone = OpenClipViT(cfg.name, visual, geometry, cfg.layers, preprocess)
    backbone.text_tower = TextTower(model, model_name(cfg)[0])
    return backbone
