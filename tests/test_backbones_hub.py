"""The real `pretrained=true` / `hf-hub:` loading paths, offline, from a fake Hugging Face cache.

Each test writes tiny weights (the architecture shrunk by config overrides) into a hub cache
laid out as huggingface_hub expects (`models--<org>--<name>/refs/main` naming a snapshot that
holds the files), points huggingface_hub at it, and builds the backbone through build_backbone:
timm's and open_clip's own download-or-cache code runs, finds the files, and loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from extract_helpers import backbone_cfg
from safetensors.torch import save_file

from traitsae.backbones import build_backbone
from traitsae.backbones.openclip_vit import create_openclip_model
from traitsae.backbones.timm_vit import create_timm_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_TIMM = {"image_size": 28, "width": 32, "depth": 2}  # 2 x 2 patches of 14 px
TINY_TIMM_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2}
VISION = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16}
TEXT = {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}
TINY_CLIP = {"image_size": 32, "patch_size": 16, "width": 32, "depth": 2, "layers": [-1]}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub (offline, as in the whole suite) reads."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put(cache: Path, repo: str, files: dict[str, dict | dict[str, torch.Tensor]]) -> None:
    """Write `files` (json dicts or tensor dicts) into the cached snapshot of `repo`."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        if name.endswith(".json"):
            (snapshot / name).write_text(json.dumps(content))
        else:
            tensors = {k: v.detach().contiguous().clone() for k, v in content.items()}
            save_file(tensors, str(snapshot / name))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("dinov2", {}),
        ("dinov2_small", {}),
        ("dinov2_reg", {"reg_tokens": 4}),
    ],
)
def test_timm_pretrained_from_the_hub_cache(hub_cache, name, extra):
    kwargs = {**TINY_TIMM_KWARGS, **extra}
    random = backbone_cfg(name, **TINY_TIMM, model_kwargs=kwargs, pretrained=False, init_seed=3)
    source = create_timm_model(random)
    put(hub_cache, f"timm/{random.checkpoint}", {"model.safetensors": source.state_dict()})
    cfg = backbone_cfg(name, **TINY_TIMM, model_kwargs=kwargs, layers=[-1])  # pretrained: true
    assert cfg.pretrained is True
    backbone = build_backbone(cfg, prune=False)
    _same_weights(backbone.trunk, source)  # init_seed 0 would give other weights: these loaded
    x = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        final = backbone.finish_from(backbone.tokens_after(x, 1), 1)
        torch.testing.assert_close(final.embedding_BE, source.eval()(x), rtol=0, atol=1e-5)


def _tiny_clip(name: str, **overrides):
    model_kwargs = {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT}
    return backbone_cfg(name, **TINY_CLIP, model_kwargs=model_kwargs, **overrides)


def test_clip_openai_tag_from_the_hub_cache(hub_cache):
    random = _tiny_clip("clip", pretrained=None, init_seed=4)
    source, _ = create_openclip_model(random)
    repo = "timm/vit_base_patch16_clip_224.openai"  # where open_clip keeps the `openai` weights
    put(hub_cache, repo, {"open_clip_model.safetensors": source.state_dict()})
    backbone = build_backbone(_tiny_clip("clip"), prune=False)  # pretrained: openai
    _same_weights(backbone.trunk, source.visual)
    assert backbone.text_tower.classifier(["a photo of a bird."]).shape == (1, 16)


def test_bioclip_hf_hub_from_the_hub_cache(hub_cache):
    random = _tiny_clip("bioclip", checkpoint="ViT-B-16", pretrained=None, init_seed=5)
    source, _ = create_openclip_model(random)
    config = {
        "model_cfg": {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    put(
        hub_cache,
        "imageomics/bioclip",
        {"open_clip_config.json": config, "open_clip_model.safetensors": source.state_dict()},
    )
    cfg = backbone_cfg(
        "bioclip", **TINY_CLIP, model_kwargs={}
    )  # checkpoint hf-hub:imageomics/bioclip
    backbone = build_backbone(cfg, prune=False)
    _same_weights(backbone.trunk, source.visual)
    assert "0.25" in repr(backbone.transform)  # the preprocessing came from the cached config
    text_CE = backbone.text_tower.classifier(
        ["a photo of a Heliconius erato.", "a photo of a moth."]
    )
    assert text_CE.shape == (2, 16)
    torch.testing.assert_close(text_CE.norm(dim=-1), torch.ones(2))
