"""sparsify (EleutherAI, `eai-sparsify` on PyPI): one folder per hookpoint holding `cfg.json` +
`sae.safetensors` (`encoder.weight` [S, D], `encoder.bias`, `W_dec` [S, D], `b_dec`).

`SparseCoder.encode` = top-k of relu(encoder(x - b_dec)); decode = W_dec^T codes + b_dec. A save
dir of several hookpoints holds one such folder each: point at one of them.
"""

from __future__ import annotations

from pathlib import Path

from traitsae.errors import TraitsaeError
from traitsae.sae.formats.common import (
    ForeignSAE,
    need,
    read_json,
    read_safetensors,
    unknown_variant,
)

NAME = "sparsify"
FILES = "cfg.json + sae.safetensors (one folder per hookpoint)"
KNOWN = "top-k sparse coders without skip connection (activation='topk', transcode=false)"


def find(path: Path) -> Path | None:
    folder = path.parent if path.name in ("cfg.json", "sae.safetensors") else path
    if (folder / "cfg.json").is_file() and (folder / "sae.safetensors").is_file():
        return folder
    hookpoints = (
        sorted(p.parent for p in folder.glob("*/sae.safetensors")) if folder.is_dir() else []
    )
    hookpoints = [p for p in hookpoints if (p / "cfg.json").is_file()]
    if len(hookpoints) == 1:
        return hookpoints[0]
    if len(hookpoints) > 1:
        raise TraitsaeError(
            f"{folder} is a sparsify save dir with {len(hookpoints)} hookpoints "
            f"({', '.join(p.name for p in hookpoints[:6])}); pass one hookpoint folder, e.g. "
            f"sae={hookpoints[0]}."
        )
    return None


def read(folder: Path) -> ForeignSAE:
    cfg = read_json(folder / "cfg.json")
    activation = cfg.get("activation", "topk")
    if activation != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        variant = f"activation={activation}, transcode={cfg.get('transcode', False)}, "
        variant += f"skip_connection={cfg.get('skip_connection', False)}"
        raise unknown_variant(folder / "cfg.json", NAME, variant, KNOWN, cfg.get("version"))
    state = read_safetensors(folder / "sae.safetensors")
    need(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder, NAME)
    return ForeignSAE(
        library=NAME,
        variant="topk",
        W_enc_SD=state["encoder.weight"],
        b_enc_S=state["encoder.bias"],
        W_dec_SD=state["W_dec"],
        b_dec_D=state["b_dec"],
        k=int(cfg["k"]),
        library_variant="SparseCoder topk",
        placement={},  # the hookpoint name is a module path, not a traitsae layer
        config={**cfg, "hookpoint": folder.name},
    )
