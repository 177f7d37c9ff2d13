"""What every foreign-checkpoint reader shares: the affine SAE it reads into, and safe loading.

Every library's SAE that traitsae loads is, at inference, one affine encoder, one elementwise
or per-row sparsifier and one affine decoder:

    codes = f(W_enc (x * scale - b_dec) + b_enc),    x_hat = (W_dec^T codes + b_dec) / scale

A reader returns a `ForeignSAE` holding those tensors in traitsae's layout (latent-major [S, D]);
`to_traitsae` turns it into the pieces of the `RawSpaceSAE` that traitsae's own exports load as.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from traitsae.errors import TraitsaeError
from traitsae.sae.model import SparseAutoencoder, build_sae

#: Where an evaluation places the SAE: which backbone's activations, which layer, which tokens.
PLACEMENT_KEYS = ("backbone", "layer", "tokens")
PLACEMENT_OVERRIDES = {"backbone": "backbone=<name>", "layer": "data.layer=<n>"}
PLACEMENT_OVERRIDES["tokens"] = "data.tokens=<patches|cls>"


@dataclass
class ForeignSAE:
    """A checkpoint of another library, read into traitsae's inference rule (see module doc).

    `subtracts_b_dec=False`: the library encodes x, not x - b_dec; `to_traitsae` folds
    W_enc b_dec into b_enc so the two agree. `threshold` is a scalar (batchtopk) or one per
    latent [S] (jumprelu); values <= 0 mean ReLU, as in every library read here.
    """

    library: str
    variant: str  # a traitsae variant: relu, topk, batchtopk, jumprelu, matryoshka
    W_enc_SD: Tensor
    b_enc_S: Tensor
    W_dec_SD: Tensor
    b_dec_D: Tensor
    subtracts_b_dec: bool = True
    k: int | None = None
    threshold: Tensor | None = None
    prefixes: list[int] | None = None
    scale: float = 1.0
    version: str | None = None  # the library's version, where the checkpoint records it
    library_variant: str = ""  # the library's own name for the architecture
    placement: dict[str, Any] = field(default_factory=dict)  # backbone/layer/tokens it records
    config: dict[str, Any] = field(default_factory=dict)  # the library's own config, as saved


@dataclass
class Converted:
    """A foreign checkpoint as traitsae's own pieces: what `RawSpaceSAE` is built from."""

    sae: SparseAutoencoder
    scale: float
    meta: dict[str, Any]
    weights_path: Path
    json_path: Path | None


def unknown_variant(path: Path, library: str, variant: Any, known: str, version: Any) -> Any:
    """The error for an architecture a reader does not know (raised by the caller)."""
    recorded = f"{library} {version}" if version else f"{library} (version not recorded)"
    return TraitsaeError(
        f"{path}: {recorded} checkpoint with architecture {variant!r}, which traitsae cannot "
        f"load; it reads {known}. Convert it to one of those, or train the SAE with traitsae."
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TraitsaeError(
            f"{path} is not readable JSON ({err}); re-save the checkpoint."
        ) from err
    if not isinstance(data, dict):
        raise TraitsaeError(f"{path} holds {type(data).__name__}, not a JSON object of settings.")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise TraitsaeError(f"{path} is not a readable safetensors file ({err}).") from err


def torch_load_weights_only(source: Path | bytes, name: Path) -> dict[str, Any]:
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary code."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        obj = torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraitsaeError(
            f"{name} is a torch pickle that torch.load(weights_only=True) refuses ({first}): it "
            "holds objects other than tensors and plain containers, which could run code when "
            "unpickled, so traitsae does not load it. Re-save only the weights, e.g. "
            "torch.save(model.state_dict(), path), from the library that wrote it."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise TraitsaeError(f"{name} is not a readable torch checkpoint ({err}).") from err
    if not isinstance(obj, dict):
        raise TraitsaeError(f"{name} holds a {type(obj).__name__}, not a state dict of tensors.")
    return obj


def need(state: dict[str, Any], keys: tuple[str, ...], path: Path, library: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise TraitsaeError(
            f"{path}: {library} checkpoint lacks tensors {missing} (it has {sorted(state)[:8]}); "
            "the file is incomplete or from another library (pass sae_format=<name>)."
        )


def as_float(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def to_traitsae(foreign: ForeignSAE, path: Path, overrides: dict[str, Any]) -> Converted:
    """The traitsae SAE, scale and sae.json-like record that compute what the library computes
    (at fp32 tolerance); `traitsae.load_sae` wraps them in a `RawSpaceSAE`."""
    arch, state = architecture_and_state(foreign, path)
    scale = float(foreign.scale)
    if not math.isfinite(scale) or scale <= 0:
        raise TraitsaeError(
            f"{path}: the {foreign.library} checkpoint's input scale is {foreign.scale!r}; it "
            "must be a finite number > 0 (activations are multiplied by it before encoding, so "
            "0 or NaN makes every code and reconstruction meaningless). Fix the scale in its "
            "config, or load a checkpoint of a run that finished."
        )
    sae = build_sae(**arch)
    sae.load_state_dict(state, strict=True)
    # The files read: inputs an evaluation must not write over.
    config_file = _first_file(path, CONFIG_FILES) if path.is_dir() else None
    meta = record(foreign, path, arch, overrides)
    return Converted(sae, scale, meta, _first_file(path, WEIGHT_FILES), config_file)


def architecture_and_state(
    foreign: ForeignSAE, path: Path
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`build_sae`'s arguments and the state dict of traitsae's SAE, the library's folds done."""
    W_enc_SD, W_dec_SD = as_float(foreign.W_enc_SD), as_float(foreign.W_dec_SD)
    b_enc_S, b_dec_D = as_float(foreign.b_enc_S), as_float(foreign.b_dec_D)
    d_sae, d_model = W_enc_SD.shape
    if (
        W_dec_SD.shape != (d_sae, d_model)
        or b_enc_S.shape != (d_sae,)
        or b_dec_D.shape != (d_model,)
    ):
        raise TraitsaeError(
            f"{path}: {foreign.library} tensors do not fit one SAE: W_enc {list(W_enc_SD.shape)}"
            f" (as [latents, d_model]), W_dec {list(W_dec_SD.shape)}, b_enc "
            f"{list(b_enc_S.shape)}, b_dec {list(b_dec_D.shape)}."
        )
    _check_finite(foreign, path, W_enc_SD, W_dec_SD, b_enc_S, b_dec_D)
    if not foreign.subtracts_b_dec:  # W (x - b) + (c + W b) = W x + c; in float64 so it stays exact
        b_enc_S = (b_enc_S.double() + W_enc_SD.double() @ b_dec_D.double()).float()
    arch: dict[str, Any] = {
        "variant": foreign.variant,
        "d_model": d_model,
        "d_sae": d_sae,
        # Foreign decoders need not have unit rows: traitsae keeps them as saved.
        "unit_norm_decoder": False,
    }
    state = {"W_enc": W_enc_SD, "W_dec": W_dec_SD, "b_enc": b_enc_S, "b_dec": b_dec_D}
    if foreign.variant in ("topk", "batchtopk", "matryoshka"):
        arch["k"] = int(foreign.k or 1)
    if foreign.variant in ("batchtopk", "matryoshka"):
        # Training only (a loaded SAE keeps its threshold): a nominal value, as for JumpReLU.
        arch["threshold_momentum"] = 0.1
        threshold = foreign.threshold if foreign.threshold is not None else torch.tensor(0.0)
        state["activation.threshold"] = as_float(threshold).reshape(()).clamp_min(0.0)
    if foreign.variant == "matryoshka":
        arch["prefixes"] = list(foreign.prefixes or [d_sae])
    if foreign.variant == "jumprelu":
        arch.update(threshold_init=1.0, bandwidth=1e-3)  # training only
        if foreign.threshold is None:
            raise TraitsaeError(f"{path}: {foreign.library} JumpReLU checkpoint has no threshold.")
        theta_S = as_float(foreign.threshold).expand(d_sae)
        # Thresholds <= 0 act as ReLU in every library read here; the smallest normal float
        # keeps log finite (a latent's code then differs only for pre-activations below 1e-38).
        state["activation.log_threshold"] = theta_S.clamp_min(torch.finfo(torch.float32).tiny).log()
    return arch, state


def record(
    foreign: ForeignSAE, path: Path, arch: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """What sae.json records for a traitsae SAE, for this one: where it belongs (the checkpoint's
    metadata, `overrides` winning), its source, sizes and architecture."""
    placement = {key: foreign.placement.get(key) for key in PLACEMENT_KEYS}
    placement.update({k: v for k, v in overrides.items() if v is not None})
    if placement["layer"] is not None:
        placement["layer"] = int(placement["layer"])
    return {
        "format": foreign.library,
        "source": {
            "library": foreign.library,
            "version": foreign.version,
            "architecture": foreign.library_variant or foreign.variant,
            "path": str(path),
            "config": foreign.config,
        },
        **placement,
        "dataset": None,
        "store": None,
        "config": None,
        "variant": foreign.variant,
        "d_model": arch["d_model"],
        "d_sae": arch["d_sae"],
        "scale": float(foreign.scale),
        "normaliser": f"x_normalised = x_raw * scale, as {foreign.library} scales its input",
        "architecture": arch,
    }


def _check_finite(foreign: ForeignSAE, path: Path, *tensors: Tensor) -> None:
    """NaN or inf weights score nothing meaningful: refuse them, as for traitsae's exports."""
    names = ("W_enc", "W_dec", "b_enc", "b_dec")
    named = list(zip(names, tensors, strict=True))
    if foreign.threshold is not None:
        named.append(("threshold", as_float(foreign.threshold)))
    for name, tensor in named:
        n_bad = int((~torch.isfinite(tensor)).sum())
        if n_bad:
            raise TraitsaeError(
                f"{path}: the {foreign.library} checkpoint's {name} holds {n_bad} non-finite "
                f"values (NaN or inf) of {tensor.numel()}; an SAE with them scores nothing "
                "meaningful. Load a checkpoint saved before its training diverged."
            )


WEIGHT_FILES = ("sae_weights.safetensors", "sae.safetensors", "ae.pt", "sae.pt")
CONFIG_FILES = ("cfg.json", "config.json")


def _first_file(path: Path, names: tuple[str, ...]) -> Path:
    if path.is_file():
        return path
    return next((path / n for n in names if (path / n).is_file()), path)


def require_placement(sae: Any, source: Any) -> None:
    """An evaluation needs the SAE's backbone, layer and token kind: name what is missing."""
    missing = [key for key in PLACEMENT_KEYS if sae.meta.get(key) is None]
    if missing:
        library = sae.meta.get("format")
        overrides = " ".join(PLACEMENT_OVERRIDES[key] for key in missing)
        raise TraitsaeError(
            f"the {library} SAE {source} does not record its {', '.join(missing)}, and an "
            f"evaluation needs them to pick the store: pass {overrides} on the command line "
            f"(it records { ({k: sae.meta.get(k) for k in PLACEMENT_KEYS if k not in missing}) })."
        )
