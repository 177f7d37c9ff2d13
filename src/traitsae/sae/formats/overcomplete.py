"""overcomplete (KempnerInstitute): `sae.pt` (`torch.save(sae.state_dict())`) + `config.json`.

overcomplete has no save function of its own, and its state dict does not say which class or
top_k built it (nor BatchTopKSAE's running threshold, a plain attribute). So the layout read
here is the state dict plus a `config.json` naming them, as scripts/make_interop_fixtures.py
writes it:

    {"library": "overcomplete", "version": "0.3.0", "class": "TopKSAE",
     "kwargs": {"input_shape": 64, "nb_concepts": 256, "top_k": 8, ...},
     "running_threshold": null}

Read: the default "linear" encoder (pre = W x + b, codes = relu(pre) then the class's
sparsifier) with SAE, TopKSAE, BatchTopKSAE, JumpSAE, and the archetypal RATopKSAE/RAJumpSAE.
The decoder is the dictionary overcomplete fuses when put in eval mode: normalise(weights) *
exp(multiplier), or for the archetypal dictionary (rowstochastic(W) C + Relax clipped to
norm delta) * exp(multiplier). There is no decoder bias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from traitsae.sae.formats.common import (
    ForeignSAE,
    need,
    read_json,
    torch_load_weights_only,
    unknown_variant,
)

NAME = "overcomplete"
FILES = 'sae.pt + config.json with "library": "overcomplete" and the SAE class'
KNOWN = "SAE, TopKSAE, BatchTopKSAE, JumpSAE, RATopKSAE, RAJumpSAE with the 'linear' encoder"
VARIANTS = {
    "SAE": "relu",
    "TopKSAE": "topk",
    "RATopKSAE": "topk",
    "BatchTopKSAE": "batchtopk",
    "JumpSAE": "jumprelu",
    "RAJumpSAE": "jumprelu",
}
ENCODER = ("encoder.final_block.0.weight", "encoder.final_block.0.bias")


def find(path: Path) -> Path | None:
    folder = path.parent if path.name in ("sae.pt", "config.json") else path
    config = folder / "config.json"
    if not ((folder / "sae.pt").is_file() and config.is_file()):
        return None
    try:
        return folder if '"overcomplete"' in config.read_text()[:4096] else None
    except (OSError, UnicodeDecodeError):
        return None


def _normalise(weights_SD: Tensor, how: str) -> Tensor:
    """overcomplete's dictionary normalisations, as applied when the SAE enters eval mode."""
    if how == "l2":
        return weights_SD / (weights_SD.norm(dim=1, keepdim=True) + 1e-8)
    if how == "max_l2":
        return weights_SD / weights_SD.norm(dim=1, keepdim=True).amax(dim=0, keepdim=True)
    if how == "l1":
        return weights_SD / (weights_SD.norm(p=1, dim=1, keepdim=True) + 1e-8)
    if how == "max_l1":
        return weights_SD / weights_SD.norm(p=1, dim=1, keepdim=True).amax(dim=0, keepdim=True)
    if how == "identity":
        return weights_SD
    raise KeyError(how)


def _archetypal(state: dict[str, Tensor], delta: float) -> Tensor:
    """D = (rowstochastic(relu W) C + Relax scaled to norm <= delta) * exp(multiplier)."""
    W_SN = state["dictionary.W"].relu()
    W_SN = W_SN / (W_SN.sum(dim=-1, keepdim=True) + 1e-8)
    relax_SD = state["dictionary.Relax"]
    relax_SD = relax_SD * (delta / relax_SD.norm(dim=-1, keepdim=True)).clamp(max=1)
    return (W_SN @ state["dictionary.C"] + relax_SD) * state["dictionary.multiplier"].exp()


def read(folder: Path) -> ForeignSAE:
    config = read_json(folder / "config.json")
    cls, version = config.get("class"), config.get("version")
    kwargs: dict[str, Any] = config.get("kwargs") or {}
    encoder = kwargs.get("encoder_module") or "linear"
    if cls not in VARIANTS or encoder != "linear":
        raise unknown_variant(
            folder / "config.json", NAME, f"{cls} with encoder_module={encoder!r}", KNOWN, version
        )
    state = torch_load_weights_only(folder / "sae.pt", folder / "sae.pt")
    state = {k: v.double() if torch.is_floating_point(v) else v for k, v in state.items()}
    need(state, ENCODER, folder / "sae.pt", NAME)
    if cls.startswith("RA"):
        need(state, ("dictionary.W", "dictionary.C", "dictionary.Relax"), folder / "sae.pt", NAME)
        dictionary_SD = _archetypal(state, float(kwargs.get("delta", 1.0)))
    else:
        need(state, ("dictionary._weights",), folder / "sae.pt", NAME)
        how = (kwargs.get("dictionary_params") or {}).get("normalization", "l2")
        if not isinstance(how, str) or how not in ("l2", "max_l2", "l1", "max_l1", "identity"):
            raise unknown_variant(
                folder / "config.json", NAME, f"{cls} with normalization={how!r}", KNOWN, version
            )
        multiplier = state.get("dictionary.multiplier", torch.tensor(0.0)).exp()
        dictionary_SD = _normalise(state["dictionary._weights"], how) * multiplier
    variant = VARIANTS[cls]
    W_enc_SD, b_enc_S = state[ENCODER[0]], state[ENCODER[1]]
    nb_concepts = W_enc_SD.shape[0]
    threshold = None
    if variant == "jumprelu":
        need(state, ("thresholds",), folder / "sae.pt", NAME)
        threshold = state["thresholds"].exp()
    elif variant == "batchtopk":
        running = config.get("running_threshold")
        threshold = torch.tensor(float(running) if running is not None else 0.0)
    top_k = kwargs.get("top_k") or max(nb_concepts // 10, 1)  # overcomplete's own default
    # BatchTopKSAE's top_k counts the whole training batch; inference uses the threshold only,
    # and traitsae records k (a per-vector count) capped at the dictionary size.
    top_k = min(int(top_k), nb_concepts)
    return ForeignSAE(
        library=NAME,
        variant=variant,
        W_enc_SD=W_enc_SD,
        b_enc_S=b_enc_S,
        W_dec_SD=dictionary_SD,
        b_dec_D=torch.zeros(W_enc_SD.shape[1]),
        k=int(top_k) if variant in ("topk", "batchtopk") else None,
        threshold=threshold,
        version=version,
        library_variant=str(cls),
        placement={k: config.get(k) for k in ("backbone", "layer", "tokens")},
        config=config,
    )
