"""dictionary_learning (saprmarks): a folder with `ae.pt` (a torch state dict) + `config.json`.

`config.json["trainer"]["dict_class"]` names the SAE class. Its trainer folds any activation
normalisation into the biases before saving, so the saved SAE works on raw activations.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from traitsae.sae.formats.common import (
    ForeignSAE,
    need,
    read_json,
    torch_load_weights_only,
    unknown_variant,
)

NAME = "dictionary_learning"
FILES = "ae.pt + config.json whose trainer names a dict_class"
KNOWN = (
    "AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, "
    "JumpReluAutoEncoder"
)


def find(path: Path) -> Path | None:
    folder = path.parent if path.name in ("ae.pt", "config.json") else path
    if (folder / "ae.pt").is_file() and (folder / "config.json").is_file():
        return folder
    return None


def _unit_decoder(W_enc_SD: Tensor, b_enc_S: Tensor, W_dec_SD: Tensor) -> tuple[Tensor, ...]:
    """AutoEncoder.from_pretrained (normalize_decoder=True) gives the decoder unit rows and
    scales each latent's encoder row and bias by the old norm: same reconstructions, codes
    in units of a unit decoder direction. Do as it does, so the codes are the library's."""
    norms_S = W_dec_SD.norm(dim=1)
    if torch.allclose(norms_S, torch.ones_like(norms_S)):
        return W_enc_SD, b_enc_S, W_dec_SD
    return W_enc_SD * norms_S[:, None], b_enc_S * norms_S, W_dec_SD / norms_S[:, None]


def read(folder: Path) -> ForeignSAE:
    config = read_json(folder / "config.json")
    trainer = config.get("trainer") or {}
    dict_class = trainer.get("dict_class")
    version = config.get("version") or trainer.get("version")
    state = torch_load_weights_only(folder / "ae.pt", folder / "ae.pt")
    where = folder / "ae.pt"
    placement = {"backbone": trainer.get("lm_name"), "layer": trainer.get("layer")}
    common = {
        "library": NAME,
        "version": version,
        "library_variant": str(dict_class),
        "placement": placement,
        "config": config,
    }
    if dict_class == "AutoEncoder":  # relu(enc(x - bias)); dec(f) + bias
        need(state, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), where, NAME)
        W_enc_SD, b_enc_S, W_dec_SD = _unit_decoder(
            state["encoder.weight"], state["encoder.bias"], state["decoder.weight"].T
        )
        return ForeignSAE(
            variant="relu",
            W_enc_SD=W_enc_SD,
            b_enc_S=b_enc_S,
            W_dec_SD=W_dec_SD,
            b_dec_D=state["bias"],
            **common,
        )
    if dict_class == "AutoEncoderNew":  # relu(enc(x)); dec(f) with its own bias
        need(
            state, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"), where, NAME
        )
        return ForeignSAE(
            variant="relu",
            W_enc_SD=state["encoder.weight"],
            b_enc_S=state["encoder.bias"],
            W_dec_SD=state["decoder.weight"].T,
            b_dec_D=state["decoder.bias"],
            subtracts_b_dec=False,
            **common,
        )
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        need(state, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), where, NAME)
        k = int(state["k"]) if "k" in state else int(trainer["k"])
        # AutoEncoderTopK.encode keeps the top k per vector; BatchTopKSAE.encode applies its
        # threshold (relu(pre) > threshold; a threshold of -1, never estimated, keeps all > 0).
        topk = dict_class == "AutoEncoderTopK"
        return ForeignSAE(
            variant="topk" if topk else "batchtopk",
            W_enc_SD=state["encoder.weight"],
            b_enc_S=state["encoder.bias"],
            W_dec_SD=state["decoder.weight"].T,
            b_dec_D=state["b_dec"],
            k=k,
            threshold=None if topk else state["threshold"],
            **common,
        )
    if dict_class == "MatryoshkaBatchTopKSAE":
        need(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), where, NAME)
        sizes = [int(s) for s in state.get("group_sizes", trainer.get("group_sizes") or [])]
        prefixes = [sum(sizes[: i + 1]) for i in range(len(sizes))] or None
        return ForeignSAE(
            variant="matryoshka",
            W_enc_SD=state["W_enc"].T,
            b_enc_S=state["b_enc"],
            W_dec_SD=state["W_dec"],
            b_dec_D=state["b_dec"],
            k=int(state["k"]) if "k" in state else int(trainer["k"]),
            threshold=state["threshold"],
            prefixes=prefixes,
            **common,
        )
    if dict_class == "JumpReluAutoEncoder":  # relu(pre * (pre > threshold)), pre = x W_enc + b_enc
        need(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), where, NAME)
        return ForeignSAE(
            variant="jumprelu",
            W_enc_SD=state["W_enc"].T,
            b_enc_S=state["b_enc"],
            W_dec_SD=state["W_dec"],
            b_dec_D=state["b_dec"],
            subtracts_b_dec=bool(trainer.get("apply_b_dec_to_input", False)),
            threshold=state["threshold"],
            **common,
        )
    raise unknown_variant(folder / "config.json", NAME, dict_class, KNOWN, version)
