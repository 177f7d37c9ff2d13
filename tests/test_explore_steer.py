"""The Steer page on a real extraction of the demo (tiny ViT, block 1) with a random SAE: its
numbers are eval=steer's, and with no edit they are the probe on the model's own embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from discovery_helpers import compose_cfg
from eval_helpers import make_sae
from explore_helpers import APP, prepare_without_port

from traitsae.explore.session import SESSION_ENV, prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from traitsae.explore.data import ExplorerData
    from traitsae.extraction import extract

    root = tmp_path_factory.mktemp("steer")
    extract(
        compose_cfg(
            "extract",
            [
                f"paths.root_dir={root}",
                "split=train",
                "backbone.layers=[1]",
                "extract.num_workers=0",
                "extract.progress=false",
            ],
            root / "extract",
        )
    )
    make_sae(root / "run", d_model=64, d_sae=64, layer=1, variant="topk")
    overrides = [f"run={root / 'run'}", f"paths.root_dir={root}", "split=train", "explore.port=1"]
    cfg = compose_cfg("explore", overrides, root / "explore")
    session = prepare_without_port(cfg, prepare)
    return session, session.save(root / "explore" / "session.json"), ExplorerData(session)


def test_unsteered_probabilities_are_the_probe_on_the_final_embedding(demo):
    from traitsae.evaluation.causal.forward import iter_image_batches
    from traitsae.explore.steering import Steering

    _, _, data = demo
    model = Steering(data)
    row = int(data.rows_V[5])
    (_, image_1CHW), *_ = list(iter_image_batches(model.backbone, [model.image_path(row)], 1))
    last = model.backbone.geometry.depth - 1
    with torch.inference_mode():
        final = model.backbone.finish_from(model.backbone.tokens_after(image_1CHW, last), last)
        expected_C = model.probe.probabilities(final.embedding_BE)[0].numpy()
    clean_C = model.probabilities(row, [], [])
    np.testing.assert_allclose(clean_C, expected_C, rtol=1e-4, atol=1e-6)
    assert clean_C.sum() == pytest.approx(1.0, abs=1e-5)
    steered_C = model.probabilities(row, [0, 1], [8.0, 8.0])
    assert np.abs(steered_C - clean_C).max() > 1e-4  # the edit reaches the probe
    assert model.probabilities(row, [0, 1], [0.0, 0.0]) == pytest.approx(clean_C, abs=1e-6)


def test_steer_page_shows_eval_steer_probabilities(demo, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from traitsae.explore.steering import Steering

    _, path, data = demo
    monkeypatch.setenv(SESSION_ENV, str(path))
    at = AppTest.from_file(str(APP), default_timeout=300).run()
    at.sidebar.radio(key="page").set_value("Steer").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    latents = at.multiselect(key=f"steer_latents_{at.selectbox(key='steer_target').value}").value
    assert len(latents) == 3
    slider = at.slider(key=f"alpha_{latents[0]}")
    alpha = float(slider.max) / 2  # inside the slider's range (scaled by the latent's max score)
    slider.set_value(alpha).run()
    shown = at.dataframe[0].value
    row = int(at.selectbox(key="steer_row").value)
    model = Steering(data)
    expected = model.probabilities(row, latents, [alpha, 0.0, 0.0])
    np.testing.assert_allclose(shown.steered, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(shown.clean, model.probabilities(row, [], []), rtol=1e-4, atol=1e-6)
    assert any("p(" in m.value and "steered" in m.value for m in at.markdown)
