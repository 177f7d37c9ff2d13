"""Portable SAE export: `sae.safetensors` (tensors) + `sae.json` (everything else). No pickle.

`load_sae(path)` returns a `RawSpaceSAE`: the SAE plus its normaliser, working on raw backbone
activations (x_norm = x_raw * scale, chosen so that E||x_norm||^2 = d_model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from traitsae.errors import TraitsaeError
from traitsae.sae.activations import TopK
from traitsae.sae.model import SparseAutoencoder, build_sae
from traitsae.sae.sparse_ops import topk_indices
from traitsae.version import __version__

WEIGHTS_FILE = "sae.safetensors"
JSON_FILE = "sae.json"
FORMAT = "traitsae-sae"
FORMAT_VERSION = 1
REQUIRED_META = ("backbone", "layer", "scale")


class RawSpaceSAE(nn.Module):
    """An SAE with its normaliser applied inside: encode/decode take and give raw activations."""

    def __init__(self, sae: SparseAutoencoder, scale: float, meta: dict[str, Any]) -> None:
        super().__init__()
        self.sae = sae
        self.scale = float(scale)
        self.meta = meta
        self.d_model = sae.d_model
        self.d_sae = sae.d_sae
        self.variant = sae.variant
        # What the SAE was trained on (sae.json), read once; None where meta lacks the key.
        self._layer = None if meta.get("layer") is None else int(meta["layer"])
        self._backbone = None if meta.get("backbone") is None else str(meta["backbone"])
        self._tokens = str(meta.get("tokens") or "patches")
        # The files it was loaded from (set by load_sae): inputs an evaluation must not overwrite.
        self.json_path: Path | None = None
        self.weights_path: Path | None = None

    @property
    def layer(self) -> int:
        """The backbone block whose output the SAE was trained on (sae.json `layer`)."""
        return self._required(self._layer, "layer")

    @property
    def backbone(self) -> str:
        """The backbone name the SAE's activations came from (sae.json `backbone`)."""
        return self._required(self._backbone, "backbone")

    @property
    def tokens(self) -> str:
        """The tokens it was trained on: patches | cls | both (sae.json `tokens`)."""
        return self._tokens

    def _required(self, value: Any, key: str) -> Any:
        if value is None:
            raise TraitsaeError(
                f"this SAE's metadata has no {key!r} (sae.json {self.json_path}); load it with "
                "traitsae.load_sae from a run dir written by train.py."
            )
        return value

    @property
    def W_dec(self) -> Tensor:
        """Decoder directions [S, D] (unit rows; the scalar normaliser does not turn them)."""
        return self.sae.W_dec

    def _check_width(self, x_BD: Tensor) -> None:
        if x_BD.ndim != 2 or x_BD.shape[1] != self.d_model:
            raise TraitsaeError(
                f"SAE trained on {self.meta.get('backbone')!r} layer {self.meta.get('layer')} "
                f"expects activations of shape [B, {self.d_model}], got {list(x_BD.shape)}."
            )

    def encode(self, x_BD: Tensor) -> Tensor:
        """Raw activations [B, D] (any float dtype) -> dense codes [B, S] >= 0."""
        self._check_width(x_BD)
        return self.sae.encode(x_BD.to(self.sae.W_enc.dtype) * self.scale)

    def decode(self, codes_BS: Tensor) -> Tensor:
        """Codes [B, S] -> reconstruction [B, D] in raw activation space."""
        return self.sae.decode(codes_BS) / self.scale

    def forward(self, x_BD: Tensor) -> Tensor:
        """The reconstruction decode(encode(x)). TopK sums only the k active decoder rows: the
        dense decode would be a second GEMM as large as the encoder's, on codes that are zeros."""
        if not isinstance(self.sae.activation, TopK):
            return self.decode(self.encode(x_BD))
        self._check_width(x_BD)
        sae = self.sae
        pre_BS = sae.pre_acts(x_BD.to(sae.W_enc.dtype) * self.scale)
        idx_BK = topk_indices(pre_BS, sae.activation.k)
        codes_BK = pre_BS.gather(1, idx_BK).relu_()
        recon_BD = F.embedding_bag(idx_BK, sae.W_dec, mode="sum", per_sample_weights=codes_BK)
        return (recon_BD + sae.b_dec) / self.scale


def _json_safe(value: Any) -> Any:
    """Plain JSON types (OmegaConf containers and numpy/torch scalars included)."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def save_sae(sae: SparseAutoencoder, run_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write `sae.safetensors` + `sae.json` into `run_dir`; returns the json path.

    `meta` must name `backbone`, `layer` and `scale`; it should also give `dataset`, `tokens`,
    `store` and `config` (the training config). Sizes and variant come from the SAE itself.
    """
    missing = [key for key in REQUIRED_META if meta.get(key) is None]
    if missing:
        raise TraitsaeError(
            f"save_sae needs meta keys {list(REQUIRED_META)}; missing {missing}. Pass e.g. "
            "meta={'backbone': 'tiny', 'layer': 3, 'scale': 1.0, 'dataset': 'synthetic', ...}."
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    arch = sae.architecture()
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "traitsae_version": __version__,
        "weights": WEIGHTS_FILE,
        "dataset": None,
        "tokens": "patches",
        "store": None,
        "config": None,
        **_json_safe(meta),
        "variant": sae.variant,
        "d_model": sae.d_model,
        "d_sae": sae.d_sae,
        "scale": float(meta["scale"]),
        "normaliser": "x_normalised = x_raw * scale (E||x_normalised||^2 = d_model)",
        "architecture": arch,
    }
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    save_file(tensors, str(run_dir / WEIGHTS_FILE), metadata={"format": FORMAT})
    json_path = run_dir / JSON_FILE
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    return json_path


def _resolve_json(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / JSON_FILE
    elif path.suffix == ".safetensors":
        path = path.with_name(JSON_FILE)
    if not path.is_file():
        raise TraitsaeError(
            f"no exported SAE at {path}: pass a train.py run dir (it holds {JSON_FILE} and "
            f"{WEIGHTS_FILE} once training finished) or the path of a {JSON_FILE}."
        )
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> RawSpaceSAE:
    """Load an exported SAE (run dir, sae.json or sae.safetensors path) in eval mode."""
    json_path = _resolve_json(path)
    try:
        record = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise TraitsaeError(f"{json_path} is not valid JSON ({err}); re-export the SAE.") from err
    if record.get("format") != FORMAT or "architecture" not in record:
        raise TraitsaeError(
            f"{json_path} is not a traitsae SAE export (expected format {FORMAT!r} with an "
            "'architecture' entry); point at the sae.json written by train.py."
        )
    weights_path = json_path.with_name(record.get("weights", WEIGHTS_FILE))
    if not weights_path.is_file():
        raise TraitsaeError(f"{json_path} names weights {weights_path}, which does not exist.")
    state = load_file(str(weights_path), device=str(device))
    _check_sizes(record, state, json_path, weights_path)
    sae = build_sae(**record["architecture"])
    try:
        sae.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TraitsaeError(
            f"weights in {weights_path} do not match the architecture in {json_path} "
            f"({record['architecture']}): {err}"
        ) from err
    model = RawSpaceSAE(sae.to(device), record["scale"], record)
    model.json_path, model.weights_path = json_path, weights_path
    return model.eval()


def _check_sizes(
    record: dict[str, Any], state: dict[str, Tensor], json_path: Path, weights_path: Path
) -> None:
    """sae.json's d_model/d_sae (top level and architecture) must match the weights' shapes."""
    if "b_dec" not in state or "b_enc" not in state:
        raise TraitsaeError(
            f"{weights_path} holds no SAE weights (tensors b_enc and b_dec missing; it has "
            f"{sorted(state)[:6]}); re-export the SAE with train.py."
        )
    actual = {"d_model": state["b_dec"].shape[0], "d_sae": state["b_enc"].shape[0]}
    for where, values in (("", record), ("architecture.", record["architecture"])):
        for key, size in actual.items():
            if key in values and int(values[key]) != size:
                raise TraitsaeError(
                    f"{json_path} says {where}{key}={values[key]}, but the weights in "
                    f"{weights_path} have {key}={size}: the two files do not belong together. "
                    "Re-export the SAE with train.py, or restore the sae.json written with "
                    "these weights."
                )
