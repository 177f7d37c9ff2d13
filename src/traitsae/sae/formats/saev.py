"""saev (OSU-NLP-Group): one file, usually `checkpoint/sae.pt`: a JSON header line, then
`torch.save(state_dict)`. Read it, and export a traitsae SAE into it.

Two header generations exist, and their encoders differ:
- legacy (saev <= 0.1.0, the released checkpoints): the header is the flat config (`d_vit`,
  `exp_factor`, ...); ReLU of W_enc^T (x - b_dec) + b_enc.
- schema 1-5 (`{"schema": n, "cfg": {...}, "lib": version}`): ReLU, TopK or BatchTopK of
  W_enc^T x + b_enc (no b_dec subtraction), as saev's current `load` + `encode` compute.
  Matryoshka is a training objective there: its checkpoints are one of these.
saev's TopK keeps the k largest pre-activations even when negative; traitsae's codes are >= 0,
so the two differ only on vectors with fewer than k positive pre-activations.
saev normalises activations in its data loader (`scale_mean`/`scale_norm`); the checkpoint does
not record that, so the SAE is read as working on the activations it is given.

Export to this layout: traitsae.sae.formats.saev_export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from traitsae.sae.formats.common import (
    ForeignSAE,
    need,
    read_json,
    torch_load_weights_only,
    unknown_variant,
)

NAME = "saev"
FILES = "sae.pt (or any file) starting with a JSON header line, then a torch state dict"
KNOWN = "Relu, TopK and BatchTopK activations (legacy and schema 1-5 headers)"
CHECKPOINT = "sae.pt"
SCHEMA = 5  # the newest header schema saev writes (and traitsae exports)
TOKENS = {"content": "patches", "special": "cls"}  # saev's token kinds -> traitsae's


def find(path: Path) -> Path | None:
    for candidate in (path, path / CHECKPOINT, path / "checkpoint" / CHECKPOINT):
        if candidate.is_file() and _header_bytes(candidate) is not None:
            return candidate
    return None


def _header_bytes(path: Path) -> bytes | None:
    """The first line, when it is a JSON object followed by a torch zip archive."""
    try:
        with open(path, "rb") as fd:
            line = fd.readline(1 << 20)
            magic = fd.read(2)
    except OSError:
        return None
    return line if line.startswith(b"{") and magic == b"PK" else None


def read(path: Path) -> ForeignSAE:
    with open(path, "rb") as fd:
        header = json.loads(fd.readline())
        state = torch_load_weights_only(fd.read(), path)
    need(state, ("W_enc", "b_enc", "W_dec", "b_dec"), path, NAME)
    placement, config = _placement(path, header)
    common: dict[str, Any] = {
        "library": NAME,
        "W_enc_SD": state["W_enc"].T,  # saev stores W_enc as [d_model, d_sae]
        "b_enc_S": state["b_enc"],
        "W_dec_SD": state["W_dec"],
        "b_dec_D": state["b_dec"],
        "placement": placement,
        "config": config,
    }
    if "schema" not in header:  # legacy: ReLU with b_dec removed from the input
        return ForeignSAE(variant="relu", library_variant="Relu (legacy header)", **common)
    version = header.get("lib")
    schema = header["schema"]
    cfg = header.get("cfg") or {}
    activation = cfg.get("activation")
    if isinstance(activation, dict):
        name, params = activation.get("cls"), activation.get("params") or {}
    else:  # schema 1, format A: the header's cls names the activation
        name, params = header.get("cls"), cfg
    if not isinstance(schema, int) or not 1 <= schema <= SCHEMA:
        raise unknown_variant(path, NAME, f"header schema {schema}", KNOWN, version)
    common.update(subtracts_b_dec=False, version=version, library_variant=str(name))
    if name == "Relu":
        return ForeignSAE(variant="relu", **common)
    if name == "TopK":
        return ForeignSAE(variant="topk", k=int(params.get("top_k", 32)), **common)
    if name == "BatchTopK":
        threshold = state.get("activation.threshold", torch.tensor(0.0))
        k = int(params.get("top_k", 32))
        return ForeignSAE(variant="batchtopk", k=k, threshold=threshold, **common)
    raise unknown_variant(path, NAME, name, KNOWN, version)


def _placement(path: Path, header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Backbone/layer/tokens: a traitsae export records them in its header; a saev run records
    layer and token kind in `config.json` beside the checkpoint (train_data)."""
    if isinstance(header.get("traitsae"), dict):
        return dict(header["traitsae"]), header
    config_path = path.with_name("config.json")
    if not config_path.is_file():
        return {}, header
    config = read_json(config_path)
    data = config.get("train_data") or {}
    layer = data.get("layer")
    return {
        "layer": layer if isinstance(layer, int) and layer >= 0 else None,
        "tokens": TOKENS.get(data.get("tokens")),
    }, {"header": header, "run_config": config}
