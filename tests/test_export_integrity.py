"""sae.safetensors + sae.json: written atomically, bound by a digest, checked on load. Every
damaged, mismatched or impossible export is one paragraph naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from traitsae.errors import TraitsaeError
from traitsae.sae.export import load_sae, save_sae
from traitsae.sae.model import build_sae

META = {"backbone": "tiny", "layer": 3, "scale": 0.5, "dataset": "synthetic"}


def _export(run_dir: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_sae(build_sae(variant="topk", d_model=8, d_sae=32, k=4), run_dir, META)


def _edit_json(run_dir: Path, **fields: object) -> None:
    record = json.loads((run_dir / "sae.json").read_text())
    record.update(fields)
    (run_dir / "sae.json").write_text(json.dumps(record))


def test_codes_of_a_loaded_sae_convert_to_numpy(tmp_path: Path) -> None:
    sae = load_sae(_export(tmp_path))
    codes = sae.encode(torch.randn(5, 8))
    assert not codes.requires_grad
    assert codes.numpy().shape == (5, 32) and sae.decode(codes).numpy().shape == (5, 8)


def test_the_export_is_written_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    _export(tmp_path)
    _export(tmp_path, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae.json", "sae.safetensors"]
    assert "weights_sha256" in json.loads((tmp_path / "sae.json").read_text())


def test_weights_from_another_export_are_refused(tmp_path: Path) -> None:
    """What a kill between the two renames of a re-export leaves: new weights, old json."""
    _export(tmp_path / "a", seed=0)
    _export(tmp_path / "b", seed=1)
    (tmp_path / "a" / "sae.safetensors").write_bytes(
        (tmp_path / "b" / "sae.safetensors").read_bytes()
    )
    with pytest.raises(TraitsaeError, match=r"sae\.safetensors is not the weights file .*sae\.json "
                       r"was written with .*weights_sha256.*two exports"):  # fmt: skip
        load_sae(tmp_path / "a")


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path: Path) -> None:
    _export(tmp_path)
    weights = tmp_path / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a low mantissa bit of the last tensor: still a finite, plausible value
    weights.write_bytes(bytes(data))
    with pytest.raises(TraitsaeError, match=r"sae\.safetensors is not the weights file"):
        load_sae(tmp_path)


def test_non_finite_weights_are_refused_with_the_tensor_named(tmp_path: Path) -> None:
    _export(tmp_path)
    weights = tmp_path / "sae.safetensors"
    state = load_file(str(weights))
    state["W_enc"][0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "traitsae-sae"})
    _edit_json(tmp_path, weights_sha256=None)  # an export without a digest: the values decide
    with pytest.raises(TraitsaeError, match=r"sae\.safetensors: tensor 'W_enc' holds 1 non-finite"):
        load_sae(tmp_path)


@pytest.mark.parametrize("scale", [0, -1.5, "abc", None, 1e400])
def test_a_scale_that_is_not_a_positive_number_is_refused(tmp_path: Path, scale: object) -> None:
    _export(tmp_path)
    record = (tmp_path / "sae.json").read_text()
    value = "1e400" if scale == 1e400 else json.dumps(scale)  # 1e400 parses as inf
    (tmp_path / "sae.json").write_text(record.replace('"scale": 0.5', f'"scale": {value}'))
    with pytest.raises(TraitsaeError, match=r"sae\.json: scale = .* is not a finite number > 0"):
        load_sae(tmp_path)


def test_a_damaged_safetensors_header_is_named(tmp_path: Path) -> None:
    _export(tmp_path)
    weights = tmp_path / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12  # inside the JSON header
    weights.write_bytes(bytes(data))
    _edit_json(tmp_path, weights_sha256=None)
    with pytest.raises(TraitsaeError, match=r"sae\.safetensors is not a readable safetensors file"):
        load_sae(tmp_path)


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"architecture": "topk"}, "architecture"),
        ({"architecture": {"variant": "nope", "d_model": 8, "d_sae": 32}}, "architecture"),
        ({"d_sae": "many"}, "d_sae"),
        ({"d_model": -8}, "d_model"),
        ({"weights": "../elsewhere.safetensors"}, "weights"),
        ({"weights": 7}, "weights"),
    ],
)
def test_a_damaged_json_field_is_named(tmp_path: Path, fields: dict, key: str) -> None:
    _export(tmp_path)
    _edit_json(tmp_path, **fields)
    with pytest.raises(TraitsaeError, match=rf"sae\.json: {key} = .* is not "):
        load_sae(tmp_path)


def test_an_architecture_size_that_is_damaged_is_named(tmp_path: Path) -> None:
    _export(tmp_path)
    record = json.loads((tmp_path / "sae.json").read_text())
    record["architecture"]["d_sae"] = "x"
    (tmp_path / "sae.json").write_text(json.dumps(record))
    with pytest.raises(TraitsaeError, match=r"sae\.json: architecture\.d_sae = 'x' is not"):
        load_sae(tmp_path)


def test_an_export_from_before_the_digest_still_loads(tmp_path: Path) -> None:
    _export(tmp_path)
    record = json.loads((tmp_path / "sae.json").read_text())
    del record["weights_sha256"]
    (tmp_path / "sae.json").write_text(json.dumps(record))
    assert load_sae(tmp_path).d_sae == 32
