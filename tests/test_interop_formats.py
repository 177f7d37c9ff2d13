"""Other libraries' checkpoints: traitsae's encode/decode equal the library's own.

The fixtures under tests/fixtures/interop/ were saved, encoded and decoded by each library's own
code (scripts/make_interop_fixtures.py, run by hand in a separate venv; CI never installs the
libraries). Each test loads one with `traitsae.load_sae` and compares on the committed batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import traitsae
from traitsae.errors import TraitsaeError

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
LIBRARIES = ("saelens", "sparsify", "saev", "overcomplete", "dictionary_learning")
# fp32: the libraries and traitsae order the same sums differently (and fold b_dec or a
# decoder-norm rescaling into the encoder), so codes agree to a few float32 ulps of their size.
ATOL, RTOL = 1e-5, 1e-5


def fixture_diffs(name: str) -> tuple[float, float]:
    """(max |codes - library's codes|, max |decode(codes) - library's decode|) on the batch."""
    x_BD = load_file(str(FIXTURES / "inputs.safetensors"))["x"]
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    sae = traitsae.load_sae(FIXTURES / name)
    with torch.no_grad():
        codes_BS, recon_BD = sae.encode(x_BD), sae.decode(expected["codes"])
    torch.testing.assert_close(codes_BS, expected["codes"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(recon_BD, expected["recon"], atol=ATOL, rtol=RTOL)
    return (
        (codes_BS - expected["codes"]).abs().max().item(),
        (recon_BD - expected["recon"]).abs().max().item(),
    )


@pytest.mark.parametrize("entry", MANIFEST["fixtures"], ids=lambda e: e["name"])
def test_encode_decode_equal_the_library_s_own(entry):
    fixture_diffs(entry["name"])
    sae = traitsae.load_sae(FIXTURES / entry["name"])
    assert sae.meta["format"] == entry["library"]  # detected from the files alone
    assert sae.meta["source"]["version"] in (entry["version"], None) or entry["library"] == "saev"
    assert not sae.training and sae.d_model == MANIFEST["d_in"]


def test_every_library_has_fixtures():
    """A library the fixture script could not run would silently drop out of the tests."""
    assert not MANIFEST["skipped"]
    assert {e["library"] for e in MANIFEST["fixtures"]} == set(LIBRARIES)


def test_codes_are_sparse_where_the_variant_says():
    for entry in MANIFEST["fixtures"]:
        codes = load_file(str(FIXTURES / entry["name"] / "expected.safetensors"))["codes"]
        assert 0 < entry["l0"] < MANIFEST["d_sae"], entry["name"]  # no dead or dense fixture
        assert (codes >= 0).all() or entry["library"] == "saev", entry["name"]


def test_placement_from_metadata_and_overrides():
    # SAELens records model and hook (blocks.3.hook_resid_post = block 3's output: layer 3).
    sae = traitsae.load_sae(FIXTURES / "saelens_topk")
    assert (sae.meta["backbone"], sae.meta["layer"], sae.meta["tokens"]) == ("tiny", 3, None)
    # dictionary_learning's trainer config records lm_name and layer.
    sae = traitsae.load_sae(FIXTURES / "dictionary_learning_autoencodertopk")
    assert (sae.meta["backbone"], sae.meta["layer"]) == ("tiny", 3)
    # sparsify records none of them; overrides fill in and win over metadata.
    sae = traitsae.load_sae(FIXTURES / "sparsify_topk", backbone="tiny", layer=2, tokens="cls")
    assert (sae.meta["backbone"], sae.meta["layer"], sae.meta["tokens"]) == ("tiny", 2, "cls")
    assert traitsae.load_sae(FIXTURES / "saelens_topk", layer=5).meta["layer"] == 5


def test_sparsify_save_dir_with_one_hookpoint_loads(tmp_path):
    sae = traitsae.load_sae(FIXTURES / "sparsify_topk")  # the folder above layers.3
    assert sae.meta["source"]["config"]["hookpoint"] == "layers.3"
    for hook in ("layers.3", "layers.4"):
        shutil.copytree(FIXTURES / "sparsify_topk" / "layers.3", tmp_path / hook)
    with pytest.raises(TraitsaeError, match=r"2 hookpoints \(layers.3, layers.4\).*sae=.*layers.3"):
        traitsae.load_sae(tmp_path)
    assert traitsae.load_sae(tmp_path / "layers.4").d_sae == MANIFEST["d_sae"]


# ---------------------------------------------------------------- bad input


def test_folder_matching_no_format_lists_what_was_looked_for(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(TraitsaeError) as err:
        traitsae.load_sae(tmp_path)
    message = str(err.value)
    assert "matches no checkpoint format" in message and "\n" not in message
    for looked_for in ("sae.json", "sae_weights.safetensors", "sae.safetensors", "ae.pt", "sae.pt"):
        assert looked_for in message


def test_ambiguous_folder_needs_sae_format(tmp_path):
    for name in ("saelens_standard", "sparsify_topk/layers.3"):
        for f in (FIXTURES / name).iterdir():
            if f.name != "cfg.json" or name.startswith("saelens"):
                shutil.copy(f, tmp_path / f.name)
    with pytest.raises(
        TraitsaeError, match=r"fits several checkpoint formats \(saelens, sparsify\)"
    ):
        traitsae.load_sae(tmp_path)
    assert traitsae.load_sae(tmp_path, sae_format="saelens").meta["format"] == "saelens"
    with pytest.raises(TraitsaeError, match=r"sae_format='saelenz' is unknown; use one of"):
        traitsae.load_sae(tmp_path, sae_format="saelenz")
    with pytest.raises(TraitsaeError, match=r"sae_format=saev was given, but .* does not hold"):
        traitsae.load_sae(tmp_path, sae_format="saev")


def test_unknown_variant_is_named_with_the_library_version():
    with pytest.raises(
        TraitsaeError,
        match=r"dictionary_learning \(version not recorded\) "
        r"checkpoint with architecture 'GatedAutoEncoder'",
    ):
        traitsae.load_sae(FIXTURES / "dictionary_learning_gatedautoencoder")
    version = next(e["version"] for e in MANIFEST["fixtures"] if e["library"] == "saelens")
    with pytest.raises(
        TraitsaeError,
        match=rf"saelens {version} checkpoint with architecture "
        r"'standard with normalize_activations=layer_norm'",
    ):
        traitsae.load_sae(FIXTURES / "saelens_layer_norm_refused")


class Payload:  # any object that is not a tensor or a plain container
    pass


def test_pickle_that_weights_only_refuses(tmp_path):
    folder = tmp_path / "dl"
    shutil.copytree(FIXTURES / "dictionary_learning_autoencoder", folder)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "extra": Payload()}, folder / "ae.pt")
    with pytest.raises(
        TraitsaeError,
        match=r"ae.pt is a torch pickle that torch.load\("
        r"weights_only=True\) refuses .*state_dict\(\)",
    ):
        traitsae.load_sae(folder)


def test_torn_checkpoint_names_the_missing_tensors(tmp_path):
    folder = tmp_path / "dl"
    shutil.copytree(FIXTURES / "dictionary_learning_autoencodertopk", folder)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "b_dec"}, folder / "ae.pt")
    with pytest.raises(TraitsaeError, match=r"lacks tensors \['b_dec'\]"):
        traitsae.load_sae(folder)


def test_traitsae_exports_still_load_as_before(tmp_path):
    from eval_helpers import make_sae

    json_path = make_sae(tmp_path / "run", 16, 32, variant="topk")
    for path in (tmp_path / "run", json_path, json_path.with_name("sae.safetensors")):
        assert traitsae.load_sae(path).meta["format"] == "traitsae-sae"
    assert traitsae.load_sae(tmp_path / "run", sae_format="traitsae").variant == "topk"
    with pytest.raises(TraitsaeError, match="no exported SAE at"):
        traitsae.load_sae(tmp_path / "missing")


def test_the_files_read_are_recorded_as_inputs():
    """Evaluations refuse to write over an SAE's files: a foreign SAE names them too."""
    sae = traitsae.load_sae(FIXTURES / "saelens_jumprelu")
    assert sae.weights_path == FIXTURES / "saelens_jumprelu" / "sae_weights.safetensors"
    assert sae.json_path == FIXTURES / "saelens_jumprelu" / "cfg.json"
    sae = traitsae.load_sae(FIXTURES / "saev_topk")
    assert sae.weights_path == FIXTURES / "saev_topk" / "checkpoint" / "sae.pt"


def test_non_finite_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "saelens"
    shutil.copytree(FIXTURES / "saelens_standard", folder)
    state = load_file(str(folder / "sae_weights.safetensors"))
    state["b_enc"][3] = float("nan")
    save_file(state, str(folder / "sae_weights.safetensors"))
    with pytest.raises(TraitsaeError, match=r"b_enc holds 1 non-finite values"):
        traitsae.load_sae(folder)


@pytest.mark.parametrize("scale", [0.0, float("nan"), -1.0, float("inf")])
def test_a_foreign_input_scale_that_is_not_a_positive_number_is_refused(scale):
    """Every load path refuses what sae.json's scale check refuses: a foreign checkpoint's scale
    of 0 or NaN used to load and give FVU inf / NaN codes without a word."""
    import dataclasses

    from traitsae.sae.formats import READERS, detect
    from traitsae.sae.formats.common import to_traitsae

    name, location = detect(FIXTURES / "saelens_standard", None)
    foreign = dataclasses.replace(READERS[name].read(location), scale=scale)
    with pytest.raises(TraitsaeError, match=r"input scale is .*must be a finite number > 0"):
        to_traitsae(foreign, location, {})
