"""Backbones: stored layers equal a plain forward hook on the same model (timm and open_clip)."""

from __future__ import annotations

import time

import pytest
import torch
from extract_helpers import backbone_cfg, hooked_residual_stream

from traitsae.backbones import build_backbone
from traitsae.backbones.openclip_vit import create_openclip_model
from traitsae.backbones.timm_vit import create_timm_model
from traitsae.errors import TraitsaeError

# A small OpenCLIP model (random init) standing in for ViT-B-16: same code path, 32 px input.
TINY_CLIP = {
    "family": "open_clip", "checkpoint": "ViT-B-16", "arch": "ViT-B-16", "pretrained": False,
    "image_size": 32, "patch_size": 8, "width": 48, "depth": 3, "n_prefix_tokens": 1,
    "model_kwargs": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 3, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    },
}  # fmt: skip


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layers", [[-1], [0, -2]])
def test_timm_matches_forward_hook(layers):
    cfg = backbone_cfg("tiny", layers=layers)
    backbone = build_backbone(cfg)
    x = _images(64)
    patches, cls = backbone(x)
    reference = create_timm_model(cfg).eval()  # same seed -> same weights, not pruned
    hooked = hooked_residual_stream(reference.blocks, lambda: reference(x), backbone.layers)
    assert backbone.layers == sorted(layer % 4 for layer in layers)
    for layer in backbone.layers:
        assert patches[layer].shape == (3, 64, 64) and cls[layer].shape == (3, 64)
        torch.testing.assert_close(patches[layer], hooked[layer][:, 1:], rtol=0, atol=1e-5)
        torch.testing.assert_close(cls[layer], hooked[layer][:, 0], rtol=0, atol=1e-5)
    assert len(backbone.trunk.blocks) == max(backbone.layers) + 1  # later blocks pruned


def test_timm_registers_are_split_off():
    kwargs = {
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "reg_tokens": 4,
        "no_embed_class": True,
    }
    cfg = backbone_cfg(
        "tiny", width=32, depth=2, n_prefix_tokens=5, model_kwargs=kwargs, layers=[-1]
    )
    backbone = build_backbone(cfg)
    assert backbone.geometry.n_prefix_tokens == 5
    x = _images(64, 2)
    patches, cls = backbone(x)
    reference = create_timm_model(cfg).eval()
    hooked = hooked_residual_stream(reference.blocks, lambda: reference(x), [1])
    torch.testing.assert_close(patches[1], hooked[1][:, 5:], rtol=0, atol=1e-5)
    torch.testing.assert_close(cls[1], hooked[1][:, 0], rtol=0, atol=1e-5)


def test_open_clip_matches_forward_hook():
    cfg = backbone_cfg("clip", **TINY_CLIP, layers=[1, -1])
    backbone = build_backbone(cfg)
    assert backbone.geometry.grid == (4, 4) and backbone.layers == [1, 2]
    x = _images(32)
    patches, cls = backbone(x)
    model, _ = create_openclip_model(cfg)
    visual = model.visual.eval()
    hooked = hooked_residual_stream(visual.transformer.resblocks, lambda: visual(x), [1, 2])
    for layer in (1, 2):
        assert patches[layer].shape == (3, 16, 48)
        torch.testing.assert_close(patches[layer], hooked[layer][:, 1:], rtol=0, atol=1e-5)
        torch.testing.assert_close(cls[layer], hooked[layer][:, 0], rtol=0, atol=1e-5)


def test_preprocessing_comes_from_the_model():
    clip = build_backbone(backbone_cfg("clip", **TINY_CLIP))
    text = repr(clip.transform)
    assert "0.4814" in text and "32" in text  # OpenAI CLIP mean, the model's image size
    tiny = build_backbone(backbone_cfg("tiny"))
    assert "Resize(size=64" in repr(tiny.transform)  # crop_pct=1.0: 64 px images stay whole


def test_local_weights_file(tmp_path):
    source = create_timm_model(backbone_cfg("tiny", init_seed=7))
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    loaded = create_timm_model(backbone_cfg("tiny", weights=str(tmp_path / "tiny.pth")))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(TraitsaeError, match="does not exist"):
        create_timm_model(backbone_cfg("tiny", weights=str(tmp_path / "missing.pth")))


def test_open_clip_local_weights_file(tmp_path):
    cfg = backbone_cfg("clip", **TINY_CLIP, init_seed=5)
    source, _ = create_openclip_model(cfg)
    torch.save(source.state_dict(), tmp_path / "clip.pt")
    loaded, _ = create_openclip_model(
        backbone_cfg("clip", **TINY_CLIP, weights=str(tmp_path / "clip.pt"))
    )
    assert torch.equal(source.visual.conv1.weight, loaded.visual.conv1.weight)


@pytest.mark.parametrize("name", ["dinov2_small", "clip", "bioclip"])
def test_offline_without_weights_fails_fast_and_clearly(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    started = time.monotonic()
    with pytest.raises(TraitsaeError) as info:
        build_backbone(backbone_cfg(name))
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "backbone.weights=<path>" in message and "HF_HUB_OFFLINE" in message
    assert backbone_cfg(name).checkpoint in message


def test_bad_backbone_configs():
    with pytest.raises(TraitsaeError, match="out of range .* depth 4"):
        build_backbone(backbone_cfg("tiny", layers=[4]))
    with pytest.raises(TraitsaeError, match="unknown backbone family"):
        build_backbone(backbone_cfg("tiny", family="jax"))
    with pytest.raises(
        TraitsaeError, match="does not match its config .*width: config 32 vs model 64"
    ):
        build_backbone(backbone_cfg("tiny", width=32))


def test_no_network_without_offline_flag_fails_within_seconds(tmp_path):
    """HF_HUB_OFFLINE unset and the hub unreachable (an endpoint that never resolves):
    huggingface_hub alone retries for about a minute (measured: 50 s for dinov2_small); the
    probe makes each build fail in seconds."""
    import json
    import os
    import subprocess
    import sys

    script = """
import json, time
import open_clip, timm  # imported before the clock starts: only the build is timed
from extract_helpers import backbone_cfg
from traitsae.backbones import build_backbone
from traitsae.errors import TraitsaeError
out = {}
for name in ("dinov2_small", "bioclip"):
    started = time.monotonic()
    try:
        build_backbone(backbone_cfg(name))
    except TraitsaeError as err:
        out[name] = [time.monotonic() - started, str(err)]
print(json.dumps(out))
"""
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(HF_HOME=str(tmp_path), HF_ENDPOINT="https://hub.invalid", HTTPS_PROXY="")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == {"dinov2_small", "bioclip"}
    for name, (seconds, message) in results.items():
        assert seconds < 15, (name, seconds)
        assert "is unreachable" in message and "backbone.weights=<path>" in message, message
