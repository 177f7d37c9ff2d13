"""SAELens: a folder with `cfg.json` + `sae_weights.safetensors` (`SAE.save_model`).

Tensors: `W_enc` [D, S], `b_enc`, `W_dec` [S, D], `b_dec`, plus `threshold` [S] (jumprelu) or
`topk_threshold` (a batchtopk training checkpoint). The encoder subtracts b_dec only when
`apply_b_dec_to_input`; a TopK SAE with `rescale_acts_by_decoder_norm` ranks pre-activations
times ||W_dec row|| and divides codes by it again before decoding (folded into the weights
here: the codes are the library's own). `normalize_activations`: "none", or
"expected_average_only_in" / "covariance_whitening", which SAELens folds into the weights when
it saves an inference SAE and does not apply at run time (so neither does traitsae); the
per-vector rescalings ("constant_norm_rescale", "layer_norm") are not one linear map, and such
SAEs are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from traitsae.sae.formats.common import (
    ForeignSAE,
    need,
    read_json,
    read_safetensors,
    unknown_variant,
)

NAME = "saelens"
WEIGHTS = "sae_weights.safetensors"
FILES = f"cfg.json + {WEIGHTS}"
FOLDED = ("none", "expected_average_only_in", "covariance_whitening")  # no run-time transform
KNOWN = (
    "architectures standard, topk, jumprelu, batchtopk and matryoshka_batchtopk with "
    f"normalize_activations in {FOLDED}"
)
RESIDUAL_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)$")


def find(path: Path) -> Path | None:
    folder = path.parent if path.name in ("cfg.json", WEIGHTS) else path
    if (folder / "cfg.json").is_file() and (folder / WEIGHTS).is_file():
        return folder
    return None


def read(folder: Path) -> ForeignSAE:
    cfg = read_json(folder / "cfg.json")
    metadata = cfg.get("metadata") or {}
    version = metadata.get("sae_lens_version") or cfg.get("sae_lens_version")
    architecture = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations", "none")
    if norm is not None and norm not in FOLDED:
        raise unknown_variant(
            folder / "cfg.json",
            NAME,
            f"{architecture} with normalize_activations={norm}",
            KNOWN,
            version,
        )
    state = read_safetensors(folder / WEIGHTS)
    need(state, ("W_enc", "b_enc", "W_dec", "b_dec"), folder / WEIGHTS, NAME)
    W_enc_SD, b_enc_S, W_dec_SD = state["W_enc"].T.double(), state["b_enc"].double(), state["W_dec"]
    common: dict[str, Any] = {
        "library": NAME,
        "b_dec_D": state["b_dec"],
        "subtracts_b_dec": bool(cfg.get("apply_b_dec_to_input", True)),
        "version": version,
        "library_variant": str(architecture),
        "placement": _placement(cfg),
        "config": cfg,
    }
    if architecture == "standard":
        return ForeignSAE(
            variant="relu", W_enc_SD=W_enc_SD, b_enc_S=b_enc_S, W_dec_SD=W_dec_SD, **common
        )
    if architecture == "jumprelu":  # relu(pre) * (pre > threshold)
        need(state, ("threshold",), folder / WEIGHTS, NAME)
        return ForeignSAE(
            variant="jumprelu",
            W_enc_SD=W_enc_SD,
            b_enc_S=b_enc_S,
            W_dec_SD=W_dec_SD,
            threshold=state["threshold"],
            **common,
        )
    if architecture in ("topk", "batchtopk", "matryoshka_batchtopk"):
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms_S = W_dec_SD.double().norm(dim=1)
            W_enc_SD, b_enc_S = W_enc_SD * norms_S[:, None], b_enc_S * norms_S
            W_dec_SD = W_dec_SD.double() / norms_S[:, None]
        k = int(cfg.get("k", 100))
        if architecture == "topk":
            return ForeignSAE(
                variant="topk", W_enc_SD=W_enc_SD, b_enc_S=b_enc_S, W_dec_SD=W_dec_SD, k=k, **common
            )
        # A training checkpoint: at inference SAELens thresholds at topk_threshold (it saves an
        # inference SAE as jumprelu with that threshold on every latent).
        threshold = state.get("topk_threshold", torch.tensor(0.0))
        sizes = cfg.get("matryoshka_widths") or []
        return ForeignSAE(
            variant="matryoshka" if sizes else "batchtopk",
            W_enc_SD=W_enc_SD,
            b_enc_S=b_enc_S,
            W_dec_SD=W_dec_SD,
            k=k,
            threshold=threshold,
            prefixes=[int(s) for s in sizes] or None,
            **common,
        )
    raise unknown_variant(folder / "cfg.json", NAME, architecture, KNOWN, version)


def _placement(cfg: dict[str, Any]) -> dict[str, Any]:
    """Backbone = the model SAELens hooked; layer from a residual-stream hook name
    (blocks.N.hook_resid_post is block N's output, traitsae's layer N; resid_pre is N - 1)."""
    metadata = cfg.get("metadata") or {}
    hook = metadata.get("hook_name") or cfg.get("hook_name") or ""
    match = RESIDUAL_HOOK.search(hook)
    layer = None
    if match:
        layer = int(match.group(1)) - (match.group(2) == "pre")
        layer = layer if layer >= 0 else None
    return {"backbone": metadata.get("model_name") or cfg.get("model_name"), "layer": layer}
