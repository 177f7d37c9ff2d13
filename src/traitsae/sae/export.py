"""Portable SAE export: `sae.safetensors` (tensors) + `sae.json` (everything else). No pickle.

`load_sae(path)` returns a `RawSpaceSAE`: the SAE plus its normaliser, working on raw backbone
activations (x_norm = x_raw * scale, chosen so that E||x_norm||^2 = d_model). It also reads the
checkpoints of other SAE libraries (SAELens, sparsify, saev, overcomplete, dictionary_learning):
see traitsae.sae.formats.

The pair is written atomically (each file through a temporary file and a rename) and bound
together: sae.json records the sha256 of the weights file, checked on load, so a kill between
the two renames, a byte flipped on disk or files from two exports are an error, never scored.
`check_export` is the load-time integrity check (see its docstring).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn
from torch.nn import functional as F

from traitsae.errors import TraitsaeError
from traitsae.files import atomic_write
from traitsae.sae.activations import TopK
from traitsae.sae.formats import load_foreign
from traitsae.sae.model import VARIANTS, SparseAutoencoder, build_sae
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
    weights = save(tensors, metadata={"format": FORMAT})
    record["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    # Weights first, then the json that vouches for them: a kill in between leaves a pair whose
    # digest disagrees (refused on load), and a rerun of the same command writes both again.
    atomic_write(run_dir / WEIGHTS_FILE, lambda file: file.write(weights))
    json_path = run_dir / JSON_FILE
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(json_path, lambda file: file.write(text.encode()))
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


def _traitsae_json(path: Path) -> Path | None:
    """The sae.json a path names, when it is a traitsae export (not another library's)."""
    if path.is_dir():
        return path / JSON_FILE if (path / JSON_FILE).is_file() else None
    if path.suffix == ".safetensors":
        return path.with_name(JSON_FILE) if path.with_name(JSON_FILE).is_file() else None
    other_libraries = ("cfg.json", "config.json")
    return path if path.suffix == ".json" and path.name not in other_libraries else None


def load_sae(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    sae_format: str | None = None,
    backbone: str | None = None,
    layer: int | None = None,
    tokens: str | None = None,
) -> RawSpaceSAE:
    """Load an SAE in eval mode: a traitsae export (run dir, sae.json or sae.safetensors path)
    or another library's checkpoint, detected from its files (`sae_format` names the library
    when they are ambiguous). For those, backbone/layer/tokens fill in (and override) what the
    checkpoint records of where the SAE belongs. Parameters come frozen (`requires_grad_(True)`
    to fine-tune); `check_export` vouches for a traitsae pair first."""
    foreign = sae_format is not None or _traitsae_json(Path(path)) is None
    if sae_format != "traitsae" and Path(path).exists() and foreign:
        placement = {"backbone": backbone, "layer": layer, "tokens": tokens}
        loaded = load_foreign(path, sae_format, **placement)
        model = RawSpaceSAE(loaded.sae.to(device), loaded.scale, loaded.meta)
        model.weights_path, model.json_path = loaded.weights_path, loaded.json_path
        return model.eval().requires_grad_(False)
    json_path = _resolve_json(path)
    record, state = check_export(json_path)
    weights_path = json_path.with_name(record["weights"])
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
    # Frozen: a loaded SAE reads activations, and codes without an autograd graph convert
    # straight to numpy (gradients with respect to inputs or edits still flow).
    return model.eval().requires_grad_(False)


def check_export(json_path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sae.json and its weights, checked: every field load_sae uses has a valid value (format,
    weights, scale finite and > 0, architecture sizes), the weights file is the one sae.json
    names (its sha256, when recorded), parses as safetensors, holds finite tensors only and
    matches the recorded sizes. Each failure is one paragraph naming the file and the key."""
    record = _read_record(json_path)
    weights_path = json_path.with_name(record["weights"])
    if not weights_path.is_file():
        raise TraitsaeError(f"{json_path} names weights {weights_path}, which does not exist.")
    expected = record.get("weights_sha256")
    if expected is not None and _sha256(weights_path) != expected:
        raise TraitsaeError(
            f"{weights_path} is not the weights file {json_path} was written with (its sha256 "
            f"differs from weights_sha256 = {str(expected)[:16]}...): the file changed on disk, "
            "or the pair comes from two exports (one interrupted between its two files). Re-run "
            "the train.py command of this run dir to export both again, or restore the pair."
        )
    state = _read_weights(weights_path)
    _check_sizes(record, state, json_path, weights_path)
    return record, state


def _read_record(json_path: Path) -> dict[str, Any]:
    try:
        record = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraitsaeError(f"{json_path} is not valid JSON ({err}); re-export the SAE.") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise TraitsaeError(
            f"{json_path} is not a traitsae SAE export (expected format {FORMAT!r} with an "
            "'architecture' entry); point at the sae.json written by train.py."
        )
    record.setdefault("weights", WEIGHTS_FILE)
    architecture = record.get("architecture")

    def bad(key: str, value: Any, expected: str) -> TraitsaeError:
        return TraitsaeError(
            f"{json_path}: {key} = {value!r} is not {expected}; the file was edited or "
            "damaged. Re-run the train.py command of its run dir to export it again."
        )

    if not isinstance(architecture, dict) or architecture.get("variant") not in VARIANTS:
        raise bad("architecture", architecture, f"an SAE architecture (variant one of {VARIANTS})")
    for key in ("d_model", "d_sae"):
        for where, values in (("", record), ("architecture.", architecture)):
            value = values.get(key)
            if key in values and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise bad(where + key, value, "a positive integer")
    weights = record["weights"]
    if not isinstance(weights, str) or not weights or Path(weights).name != weights:
        raise bad("weights", weights, "a file name next to it")
    scale = record.get("scale")
    valid = isinstance(scale, int | float) and not isinstance(scale, bool)
    if not valid or not math.isfinite(scale) or scale <= 0:
        raise bad("scale", scale, "a finite number > 0 (x_normalised = x_raw * scale)")
    return record


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _read_weights(weights_path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a damaged header or a non-finite value is named."""
    try:
        state = load_file(weights_path)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise TraitsaeError(
            f"{weights_path} is not a readable safetensors file ({err}): its header is damaged "
            "or the file is cut short. Re-run the train.py command of its run dir to export "
            "it again."
        ) from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() and not _all_finite(tensor):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise TraitsaeError(
                f"{weights_path}: tensor {name!r} holds {n_bad} non-finite values (NaN or inf) "
                f"of {tensor.numel()}; an SAE with them scores nothing meaningful. Re-export it "
                "from a checkpoint trained without divergence."
            )
    return state


def _all_finite(tensor: Tensor) -> bool:
    """No NaN or inf: one min/max pass (NaN propagates through both), ~10x faster on CPU than
    `isfinite(...).all()`."""
    low, high = torch.aminmax(tensor)
    return bool((low > -torch.inf) & (high < torch.inf))


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
