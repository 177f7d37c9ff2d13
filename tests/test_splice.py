"""eval=splice: the backbone cut at block L equals a forward hook that swaps block L's output
(timm and open_clip), the four conditions edit only the chosen tokens, and the demo end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from causal_helpers import evaluate_cfg
from extract_helpers import backbone_cfg
from test_backbones import TINY_CLIP
from test_backbones_hub import hub_cache  # noqa: F401 (the fixture)

from traitsae.backbones import build_backbone
from traitsae.backbones.openclip_vit import create_openclip_model
from traitsae.backbones.timm_vit import create_timm_model
from traitsae.evaluation.causal.splice import CONDITIONS, condition_tokens
from traitsae.evaluation.causal.splice_report import recovered


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


def _edit(x_BTD: torch.Tensor) -> torch.Tensor:
    """Some edit of block L's output: patch tokens scaled and shifted, prefix kept."""
    out = x_BTD.clone()
    out[:, 1:] = 0.5 * out[:, 1:] + 0.3
    return out


def _hooked(blocks, layer: int, run, last: int):
    """The reference: the library's own forward with block `layer`'s output swapped by a hook;
    returns (model output, the last block's output)."""
    captured = {}
    swap = blocks[layer].register_forward_hook(lambda _m, _i, out: _edit(out))
    keep = blocks[last].register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
    try:
        with torch.inference_mode():
            return run(), captured["x"]
    finally:
        swap.remove()
        keep.remove()


@pytest.mark.parametrize("layer", [0, 2])
def test_timm_splice_matches_a_hooked_forward(layer):
    cfg = backbone_cfg("tiny")
    backbone = build_backbone(cfg, prune=False)
    x = _images(64)
    with torch.inference_mode():
        final = backbone.finish_from(_edit(backbone.tokens_after(x, layer)), layer)
        clean = backbone.finish_from(backbone.tokens_after(x, layer), layer)
    reference = create_timm_model(cfg).eval()
    embedding, last_tokens = _hooked(reference.blocks, layer, lambda: reference(x), 3)
    torch.testing.assert_close(final.embedding_BE, embedding, rtol=0, atol=1e-5)
    torch.testing.assert_close(final.tokens_BTD, last_tokens, rtol=0, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(clean.embedding_BE, reference(x), rtol=0, atol=1e-5)
    assert not torch.allclose(final.embedding_BE, clean.embedding_BE)


def test_open_clip_splice_matches_a_hooked_forward():
    cfg = backbone_cfg("clip", **TINY_CLIP)
    backbone = build_backbone(cfg, prune=False)
    x = _images(32)
    with torch.inference_mode():
        final = backbone.finish_from(_edit(backbone.tokens_after(x, 1)), 1)
    model, _ = create_openclip_model(cfg)
    visual = model.visual.eval()
    embedding, last_tokens = _hooked(visual.transformer.resblocks, 1, lambda: visual(x), 2)
    assert embedding.shape == (3, 16)  # the projected CLIP image embedding
    torch.testing.assert_close(final.embedding_BE, embedding, rtol=0, atol=1e-5)
    torch.testing.assert_close(final.tokens_BTD, last_tokens, rtol=0, atol=1e-5)


def test_pruned_backbone_refuses_to_finish():
    backbone = build_backbone(backbone_cfg("tiny", layers=[1]))
    with pytest.raises(Exception, match="prune=False"):
        backbone.finish_from(backbone.tokens_after(_images(64, 1), 1), 1)


def test_conditions_edit_only_the_chosen_tokens():
    x_BTD = torch.randn(2, 5, 3)
    positions_T = torch.tensor([False, True, True, False, True])
    mean_TD = torch.arange(15.0).reshape(5, 3)
    sae = torch.nn.Identity()
    stack = condition_tokens(x_BTD, lambda v: 2 * v, positions_T, mean_TD)
    variants = dict(zip(CONDITIONS, stack.split(2), strict=True))
    assert stack.shape == (8, 5, 3)
    for name, v_BTD in variants.items():
        torch.testing.assert_close(v_BTD[:, ~positions_T], x_BTD[:, ~positions_T], msg=name)
    torch.testing.assert_close(variants["spliced"][:, positions_T], 2 * x_BTD[:, positions_T])
    torch.testing.assert_close(
        variants["mean_ablated"][:, positions_T], mean_TD[positions_T].expand(2, -1, -1)
    )
    assert variants["zero_ablated"][:, positions_T].abs().sum() == 0
    # A cached run stacks only the conditions it needs, in the order asked for.
    two = condition_tokens(x_BTD, lambda v: 2 * v, positions_T, None, ("spliced", "clean"))
    torch.testing.assert_close(two, torch.cat([variants["spliced"], x_BTD]))
    assert sae(x_BTD) is x_BTD
    assert recovered(1.0, 0.8, 0.0) == pytest.approx(0.8) and recovered(0.0, 0.1, 0.5) == 0.8
    assert recovered(0.3, 0.2, 0.3) is None


def test_splice_on_the_demo(tmp_path):
    import shutil

    from traitsae.evaluation.causal.splice import run

    cfg = evaluate_cfg("splice", tmp_path, ["split=test"])
    cache_dir = Path(cfg.paths.activations_dir) / "synthetic" / "test" / "tiny.h5.cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    result = run(cfg)
    assert result["meta"]["computed"] == list(CONDITIONS)
    assert result["meta"]["from_cache"] == {"clean": None, "ablations": None}
    rows = {r["metric"]: r for r in result["metrics"]}
    assert set(rows) == {"embedding_cosine", "token_relative_error", "probe_accuracy"}  # no CLIP
    cos, err = rows["embedding_cosine"], rows["token_relative_error"]
    assert cos["clean"] == pytest.approx(1.0) and err["clean"] == 0.0
    # The SAE's reconstruction keeps the downstream model closer to clean than erasing block 1.
    assert cos["spliced"] > cos["mean_ablated"] and err["spliced"] < err["mean_ablated"]
    assert 0.0 < cos["recovered"] <= 1.0 and 0.0 < err["recovered"] <= 1.0
    assert result["meta"]["edited_tokens"] == {"cls": False, "patches": True, "registers": False}
    assert json.loads((tmp_path / "splice.json").read_text()) == result
    assert (tmp_path / "splice.csv").read_text().startswith("metric,clean,spliced,mean_ablated")
    assert (tmp_path / "splice.png").stat().st_size > 0
    # A second SAE of a sweep (here: the same one again) reads clean and ablated results from
    # the cache and runs only its spliced pass: the same numbers (clean tokens kept in float16).
    again = run(evaluate_cfg("splice", tmp_path / "again", ["split=test"]))
    assert again["meta"]["computed"] == ["spliced"]
    cached = again["meta"]["from_cache"]
    assert cached["ablations"].startswith(str(cache_dir / "splice-L1-"))
    assert [Path(p).parent for p in cached["clean"]] == [cache_dir, cache_dir]
    for row, first in zip(again["metrics"], result["metrics"], strict=True):
        assert row == pytest.approx(first, abs=1e-3), row["metric"]
    # Other edited tokens are other ablations: those run again, clean still comes from the cache.
    both = run(evaluate_cfg("splice", tmp_path / "both", ["split=test", "eval.tokens=both"]))
    assert both["meta"]["computed"] == ["spliced", "mean_ablated", "zero_ablated"]
    assert both["metrics"][0]["mean_ablated"] != result["metrics"][0]["mean_ablated"]
    assert both["metrics"][0]["clean"] == pytest.approx(1.0)


def test_backbone_in_sae_json_must_match_the_store(tmp_path):
    import shutil

    from traitsae.errors import TraitsaeError
    from traitsae.evaluation.causal.splice import run

    cfg = evaluate_cfg("splice", tmp_path / "out", ["split=test"])
    run_dir = tmp_path / "run"
    shutil.copytree(cfg.run, run_dir)
    meta = json.loads((run_dir / "sae.json").read_text())
    meta["config"]["backbone"]["init_seed"] = 7  # other random weights than the store's
    (run_dir / "sae.json").write_text(json.dumps(meta))
    cfg.run = str(run_dir)
    with pytest.raises(TraitsaeError, match="init_seed: sae.json 7 vs store 0"):
        run(cfg)


def test_zero_shot_rows_of_a_tiny_bioclip_from_the_hub_cache(hub_cache, tmp_path):  # noqa: F811
    """eval=splice end to end on a tiny BioCLIP loaded through the real hf-hub path: the clean
    zero-shot accuracy equals open_clip's own encode_image / encode_text on the same images."""
    import numpy as np
    import open_clip
    from discovery_helpers import compose_cfg
    from PIL import Image
    from test_backbones_hub import TEXT, VISION, put

    from traitsae.data.images import load_image_list
    from traitsae.evaluation.causal.splice import run
    from traitsae.extraction import extract
    from traitsae.sae.export import save_sae
    from traitsae.sae.model import build_sae

    source, _ = create_openclip_model(
        backbone_cfg(
            "bioclip",
            checkpoint="ViT-B-16",
            pretrained=None,
            init_seed=5,
            model_kwargs={"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT},
        )
    )
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT}}
    put(
        hub_cache,
        "imageomics/bioclip",
        {"open_clip_config.json": config, "open_clip_model.safetensors": source.state_dict()},
    )
    tiny = ["backbone=bioclip", "backbone.image_size=32", "backbone.patch_size=16"]
    tiny += ["backbone.width=32", "backbone.depth=2", "backbone.layers=[0]"]
    for split in ("train", "test"):
        overrides = [f"paths.root_dir={tmp_path}", f"split={split}", *tiny]
        overrides += ["extract.num_workers=0", "extract.progress=false"]
        extract(compose_cfg("extract", overrides, tmp_path / f"extract-{split}"))
    torch.manual_seed(0)
    meta = {"backbone": "bioclip", "dataset": "synthetic", "layer": 0, "tokens": "patches"}
    meta |= {"d_model": 32, "d_sae": 64, "variant": "topk", "scale": 1.0, "config": {}}
    save_sae(build_sae("topk", 32, 64, 4), tmp_path / "run", meta)
    out = tmp_path / "splice"
    cfg = compose_cfg(
        "evaluate",
        [f"paths.root_dir={tmp_path}", "eval=splice", f"run={tmp_path / 'run'}", "split=test"],
        out,
    )
    result = run(cfg)
    rows = {r["metric"]: r for r in result["metrics"]}
    zero_shot = rows["zero_shot_accuracy"]

    # The reference: open_clip's own model and tokenizer on the test images, no traitsae code.
    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:imageomics/bioclip")
    images = load_image_list(cfg.dataset, "test")
    labels = np.asarray(images.metadata["species"], dtype=object)
    classes = sorted(set(labels))
    prompts = [f"a photo of a {c.split('.', 1)[1].replace('_', ' ')}." for c in classes]
    with torch.inference_mode():
        text_CE = model.encode_text(open_clip.tokenize(prompts, context_length=8))
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images.paths])
        image_NE = model.encode_image(pixels)
    best_N = (image_NE @ torch.nn.functional.normalize(text_CE, dim=-1).T).argmax(-1).numpy()
    expected = float((np.asarray(classes, dtype=object)[best_N] == labels).mean())
    assert zero_shot["clean"] == pytest.approx(expected, abs=1e-12)  # the same argmax per image
    assert result["meta"]["n_images"] == len(labels) and len(classes) >= 2
    for condition in CONDITIONS:
        assert 0.0 <= zero_shot[condition] <= 1.0
    gap = zero_shot["clean"] - zero_shot["mean_ablated"]
    if abs(gap) > 1e-12:
        assert zero_shot["recovered"] == pytest.approx(
            (zero_shot["spliced"] - zero_shot["mean_ablated"]) / gap
        )
    assert "zero_shot_accuracy" in (out / "splice.csv").read_text()


def test_cache_file_follows_the_store_and_the_key(tmp_path):
    import os
    from types import SimpleNamespace

    import numpy as np

    from traitsae.evaluation.causal.forward import cache_file, load_cached, save_cached

    store = SimpleNamespace(path=tmp_path / "tiny.h5")
    store.path.write_bytes(b"not hdf5")  # no fingerprint: the file's size and mtime still count
    path = cache_file(store, "splice-L1", {"layer": 1})
    assert path.parent == tmp_path / "tiny.h5.cache" and path.name.startswith("splice-L1-")
    assert cache_file(store, "splice-L1", {"layer": 1}) == path
    assert cache_file(store, "splice-L1", {"layer": 2}) != path
    assert load_cached(path) is None and load_cached(None) is None
    save_cached(path, {"rows": np.arange(3)})
    assert load_cached(path)["rows"].tolist() == [0, 1, 2]
    assert not list(path.parent.glob(".*.tmp"))
    os.utime(store.path, ns=(1, 1))  # a rewritten store: another file
    assert cache_file(store, "splice-L1", {"layer": 1}) != path


@pytest.mark.parametrize("variant", ["topk", "relu"])
def test_reconstruction_equals_decode_of_encode(variant):
    """RawSpaceSAE.forward decodes TopK from its k active rows: the same as the dense decode."""
    from traitsae.sae.export import RawSpaceSAE
    from traitsae.sae.model import build_sae

    torch.manual_seed(0)
    sae = RawSpaceSAE(build_sae(variant, 24, 96, 5).eval(), scale=0.7, meta={})
    with torch.no_grad():
        sae.sae.b_dec.normal_()
        sae.sae.b_enc.normal_()
    x_RD = torch.randn(50, 24)
    with torch.inference_mode():
        torch.testing.assert_close(sae(x_RD), sae.decode(sae.encode(x_RD)), rtol=0, atol=1e-5)
        assert not torch.allclose(sae(x_RD), x_RD)


def _png_paths(tmp_path: Path, n: int = 2) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize(
    ("layer", "tokens", "vacuous"), [(3, "auto", True), (3, "cls", False), (1, "auto", False)]
)
def test_a_causal_test_that_cannot_change_the_read_out_is_refused(tmp_path, layer, tokens, vacuous):
    """An SAE on patch tokens at the tiny ViT's last block (index 3) with its CLS read-out: no
    later block mixes the edited patches into the CLS token, so splice and steer would score
    every condition the same (they used to, with exit 0 and `recovered —`)."""
    from types import SimpleNamespace

    from traitsae.errors import TraitsaeError
    from traitsae.evaluation.causal.forward import check_readout_depends

    backbone = build_backbone(backbone_cfg("tiny"), prune=False)
    sae = SimpleNamespace(layer=layer, tokens="patches")
    paths = _png_paths(tmp_path)
    if not vacuous:
        check_readout_depends(backbone, sae, paths, tokens, "eval=splice")
        return
    with pytest.raises(TraitsaeError) as err:
        check_readout_depends(backbone, sae, paths, tokens, "eval=splice")
    message = str(err.value)
    assert "eval=splice would be vacuous: the SAE sits at block 3" in message
    assert "CLS token after the final norm" in message and "earlier layer" in message
    assert "eval.tokens=cls" in message and "\n" not in message


def test_recovered_is_never_a_bare_dash():
    from traitsae.evaluation.causal.splice import metric_rows
    from traitsae.evaluation.causal.splice_report import format_result

    same = {"clean": 0.5, "spliced": 0.5, "mean_ablated": 0.5, "zero_ablated": 0.5}
    rows = metric_rows({"probe_accuracy": same}, "mean")
    assert rows[0]["recovered"] is None and "nothing to recover" in rows[0]["recovered_why"]
    text = format_result({"metrics": rows})
    assert "—" not in text and "probe_accuracy: recovered n/a: clean and mean_ablated" in text
