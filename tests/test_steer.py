"""eval=steer: classification control on the demo, the steering edit itself, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from causal_helpers import ALPHA, BETA, evaluate_cfg

from traitsae.errors import TraitsaeError
from traitsae.evaluation.causal.steer import run
from traitsae.evaluation.causal.steering import steer_tokens
from traitsae.evaluation.core.probes import ClassProbe


class _Sae(torch.nn.Module):
    """Just what steering reads: decoder rows, the normaliser, an encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.W_dec = torch.eye(3)
        self.scale = 2.0

    def encode(self, x_RD: torch.Tensor) -> torch.Tensor:
        return x_RD.clamp_min(0)


@pytest.mark.parametrize("where", ["all", "firing"])
def test_steer_tokens_adds_scaled_decoder_rows(where):
    x_BTD = torch.tensor([[[9.0, 9, 9], [1, -1, 0], [-1, 1, 0]]])  # CLS, then two patches
    positions_T = torch.tensor([False, True, True])
    out = steer_tokens(x_BTD, _Sae(), [0, 1], torch.tensor([2.0, 4.0]), positions_T, where)
    step = torch.tensor([1.0, 2.0, 0.0])  # (2 * e0 + 4 * e1) / scale
    assert torch.equal(out[:, 0], x_BTD[:, 0])  # CLS untouched
    if where == "all":
        torch.testing.assert_close(out[0, 1:], x_BTD[0, 1:] + step)
    else:  # patch 1 fires latent 0 only, patch 2 latent 1 only
        torch.testing.assert_close(out[0, 1], x_BTD[0, 1] + torch.tensor([1.0, 0, 0]))
        torch.testing.assert_close(out[0, 2], x_BTD[0, 2] + torch.tensor([0.0, 2, 0]))


def test_probe_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 4)).astype(np.float32)
    labels = np.where(emb[:, 0] > 0, "b", "a").astype(object)
    probe = ClassProbe.fit(emb, labels)
    assert probe.classes == ["a", "b"] and probe.accuracy(emb, labels) > 0.9
    loaded = ClassProbe.load(probe.save(tmp_path / "probe.safetensors"))
    p = probe.probabilities(torch.as_tensor(emb))
    torch.testing.assert_close(loaded.probabilities(torch.as_tensor(emb)), p)
    torch.testing.assert_close(p.sum(-1), torch.ones(40))


def test_boosting_alpha_latents_in_beta_images_raises_p_alpha(tmp_path):
    """Beta lacks Alpha's red crown spot; Alpha's top latents, added to Beta's images at block 1,
    make the probe (on the final embedding) more sure of Alpha at every step of the default
    alphas (conf/eval/steer.yaml)."""
    cfg = evaluate_cfg(
        "steer", tmp_path, ["split=test", f"eval.target_class={ALPHA}", f"eval.source_class={BETA}"]
    )
    alphas = list(cfg.eval.alphas)
    assert alphas[0] == 0 and alphas[-1] >= 4
    result = run(cfg)
    p_target = [point["mean_p_target"] for point in result["curve"]]
    assert [point["alpha"] for point in result["curve"]] == alphas
    assert all(np.diff(p_target) > 0), p_target
    assert p_target[-1] > p_target[0] + 0.2
    assert len(result["latents"]) == 3 and result["n_images"] == 12
    selection = result["selection"]
    assert selection["rank"] == "effect" and set(result["latents"]) <= set(selection["candidates"])
    assert all(s > 0 for s in selection["specificity"])  # the target class's latents
    by_effect = sorted(selection["effect"], reverse=True)[:3]
    assert [
        selection["effect"][selection["candidates"].index(s)] for s in result["latents"]
    ] == by_effect
    assert {image["class"] for image in result["images"]} == {BETA}
    assert len(result["images"]) == 12 * len(alphas) and len(result["images"][0]["top5"]) == 5
    assert json.loads((tmp_path / "steer.json").read_text())["curve"] == result["curve"]
    for name in ("steer_before_after.png", "steer_curve.png", "probe.safetensors"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.target_class=003.Nope", "003.Nope.* is not a class .*001.Alpha_warbler"),
        ("eval.latents=[5,99999]", r"latents \[99999\] are out of range; this SAE has 512"),
        ("eval.alphas=[1,2]", r"must include 0"),
        ("eval.where=everywhere", "eval.where must be one of"),
        ("eval.rank=magic", "eval.rank must be one of"),
        ("eval.alpha_units=volts", "eval.alpha_units must be one of"),
        ("eval.n_candidates=2", r"eval.n_candidates=2 must be >= eval.n_latents=3"),
    ],
)
def test_bad_steer_input(tmp_path, override, message):
    cfg = evaluate_cfg("steer", tmp_path, [f"eval.target_class={ALPHA}", override])
    with pytest.raises(TraitsaeError, match=message):
        run(cfg)


def test_cli_bad_alphas_exit_2_with_one_paragraph(tmp_path):
    """Through evaluate.py: `error: <one paragraph>` on stderr, exit status 2, no traceback."""
    import os
    import subprocess
    import sys

    from causal_helpers import demo_root

    root, repo = demo_root(), Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(repo / "evaluate.py"),
            "eval=steer",
            f"paths.root_dir={root}",
            f"run={root / 'train'}",
            f"eval.target_class={ALPHA}",
            "eval.alphas=[1,2]",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", MPLBACKEND="Agg"),
        cwd=repo,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: eval.alphas=[1, 2] must include 0" in proc.stderr
    assert "Traceback" not in proc.stderr
