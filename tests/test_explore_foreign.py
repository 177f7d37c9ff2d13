"""The explorer on another library's checkpoint that does not record where it belongs
(dictionary_learning): the error names the overrides, the explorer accepts them, and the app
loads that SAE (issue 24: it advised `data.layer=` and then rejected the key)."""

from __future__ import annotations

import numpy as np
import pytest
from discovery_helpers import compose_cfg
from eval_helpers import make_store, planted_activations, planted_split_labels, trait_directions
from explore_helpers import APP, prepare_without_port
from interop_helpers import FIXTURES

from traitsae.errors import TraitsaeError
from traitsae.explore.session import SESSION_ENV, prepare

D_MODEL = 32  # the fixtures' width
DICTIONARY = FIXTURES / "dictionary_learning_autoencoder"


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore_foreign")
    _, test_NT = planted_split_labels(6, 12, 4)
    patches, cls = planted_activations(test_NT, trait_directions(4, D_MODEL), 16, seed=5)
    make_store(root / "acts", "test", np.arange(1, 13), patches, cls)
    return root


def overrides(root, *extra: str) -> list[str]:
    return [
        f"sae_path={DICTIONARY}",
        f"paths.activations_dir={root / 'acts'}",
        "explore.port=1",
        "explore.draw_images=false",
        *extra,
    ]


def test_dictionary_sae_error_names_overrides_the_explorer_accepts(acts, monkeypatch):
    from streamlit.testing.v1 import AppTest

    cfg = compose_cfg("explore", overrides(acts), acts / "explore")
    with pytest.raises(TraitsaeError, match="data.tokens=<patches|cls>"):
        prepare_without_port(cfg, prepare)
    placed = ["backbone=tiny", "data.layer=3", "data.tokens=patches"]
    cfg = compose_cfg("explore", overrides(acts, *placed), acts / "explore")  # keys accepted
    session = prepare_without_port(cfg, prepare)
    monkeypatch.setenv(SESSION_ENV, str(session.save(acts / "explore" / "session.json")))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.dataframe(key="latent_table").value) > 0
    at.sidebar.radio(key="page").set_value("Image").run()  # loads the SAE itself (recon. error)
    assert not at.exception and not at.error, [e.value for e in at.error]
