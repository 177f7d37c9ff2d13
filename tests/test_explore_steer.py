"""The Steer page runs eval=steer's own `compute_steer` on the explorer's SAE and dataset: on the
second CUB-layout set (causal_helpers.second_root: SAE at block 2 of 4, where steering works) the
page shows the CLI's numbers: the curve rising over alpha, the control, the latents chosen by
measured effect, a held-out image of another class with its probabilities before and after."""

from __future__ import annotations

import numpy as np
import pytest
from causal_helpers import second_cfg, second_root
from discovery_helpers import compose_cfg
from explore_helpers import APP, prepare_without_port

from traitsae.explore.session import SESSION_ENV, prepare

pytestmark = pytest.mark.slow
TARGET = "003.Gamma_warbler"


@pytest.fixture(scope="module")
def session_path(tmp_path_factory):
    root, out = second_root(), tmp_path_factory.mktemp("explore_steer")
    overrides = [f"run={root / 'train'}", f"paths.root_dir={root}", "dataset.seed=7"]
    cfg = compose_cfg("explore", [*overrides, "explore.port=1"], out)
    return prepare_without_port(cfg, prepare).save(out / "session.json")


def test_steer_config_is_the_cli_s(session_path):
    from traitsae.explore.session import Session
    from traitsae.explore.steering import held_out_split, steer_config

    session = Session.load(session_path)
    cfg = steer_config(session, TARGET, None)
    cli = second_cfg("steer", session_path.parent / "cli", [f"eval.target_class={TARGET}"])
    assert held_out_split(session) == "test" == cfg.split  # never the probe's train split
    for key in ("n_latents", "n_candidates", "rank", "alphas", "n_control", "train_split"):
        assert cfg.eval[key] == cli.eval[key], key
    assert cfg.eval.target_class == TARGET and cfg.run == cli.run


def test_steer_page_shows_the_rising_curve_and_its_control(session_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from traitsae.explore.session import Session
    from traitsae.explore.steering import run_steer

    monkeypatch.setenv(SESSION_ENV, str(session_path))
    at = AppTest.from_file(str(APP), default_timeout=600).run()
    at.sidebar.radio(key="page").set_value("Steer").run()
    at.selectbox(key="steer_target").set_value(TARGET).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.button(key="steer_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    words = " ".join(m.value for m in at.markdown)
    assert "rises at every alpha: **yes**" in words and "beats random latents" in words
    assert "**alpha** = 1 adds" in words
    chosen = at.dataframe[0].value
    expected = run_steer(Session.load(session_path), TARGET, None)  # the CLI's function
    assert chosen.latent.tolist() == expected.result["latents"]
    selection = expected.result["selection"]
    effects = dict(zip(selection["candidates"], selection["effect"], strict=True))
    assert (chosen["effect on log p(target) per alpha"] > 0).all()
    np.testing.assert_allclose(
        chosen["effect on log p(target) per alpha"], [effects[s] for s in chosen.latent]
    )
    # One held-out image of another class: p(target) clean and at the largest alpha.
    shown = next(m.value for m in at.markdown if m.value.startswith(f"p({TARGET})"))
    probs = expected.probs_ANC[:, 0, expected.probe.classes.index(TARGET)]
    assert f"clean **{probs[0]:.3f}**" in shown and f"**{probs[-1]:.3f}**" in shown
    assert expected.result["images"][0]["class"] != TARGET
