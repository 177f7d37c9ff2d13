"""Export a traitsae SAE to saev's checkpoint layout: `<out>/sae.pt`, a JSON header line (schema
5) then `torch.save(state_dict)`, which saev's own `saev.nn.modeling.load` reads.

    python -m traitsae.sae.formats.saev_export <traitsae run dir> <out dir>
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import torch

from traitsae.errors import TraitsaeError, exit_on_user_error
from traitsae.sae.export import load_sae
from traitsae.sae.formats.saev import CHECKPOINT, SCHEMA
from traitsae.version import __version__

ACTIVATIONS = {"relu": "Relu", "topk": "TopK", "batchtopk": "BatchTopK"}
ACTIVATIONS["matryoshka"] = "BatchTopK"  # saev's Matryoshka is an objective on BatchTopK


def export(source: str | Path, out_dir: str | Path) -> Path:
    """Write the traitsae SAE at `source` as saev's `<out_dir>/sae.pt` (schema 5); returns it.

    saev encodes x without removing b_dec and has no input scale, so both fold into its
    weights: codes and reconstructions stay those of the traitsae SAE on raw activations."""
    sae = load_sae(source)
    variant, inner = sae.variant, sae.sae
    if variant not in ACTIVATIONS:
        raise TraitsaeError(
            f"{source} is a traitsae {variant} SAE; saev has no {variant} activation (it has "
            f"ReLU, TopK, BatchTopK), so it cannot be exported to saev's layout."
        )
    scale = float(sae.scale)
    with torch.no_grad():
        W_enc_SD = inner.W_enc.double() * scale  # pre = W_enc (s x - b_dec) + b_enc
        b_enc_S = inner.b_enc.double() - inner.W_enc.double() @ inner.b_dec.double()
        W_dec_SD = inner.W_dec.double() / scale  # x_hat = (W_dec^T c + b_dec) / s
        b_dec_D = inner.b_dec.double() / scale
    state = {
        "W_dec": W_dec_SD.float().contiguous(),
        "b_dec": b_dec_D.float().contiguous(),
        "W_enc": W_enc_SD.T.float().contiguous(),
        "b_enc": b_enc_S.float().contiguous(),
    }
    kind = ACTIVATIONS[variant]
    if kind == "BatchTopK" and float(inner.activation.threshold) < 0:
        kind = "TopK"  # its threshold was never estimated: traitsae encodes it as TopK
    params: dict[str, Any] = {}
    if variant != "relu":
        params["top_k"] = int(inner.activation.k)
    if kind == "BatchTopK":
        state["activation.threshold"] = inner.activation.threshold.detach().float().clone()
        params["momentum"] = float(inner.activation.momentum) or 0.1
    unit_rows = bool(torch.allclose(W_dec_SD.norm(dim=1), torch.ones(sae.d_sae).double()))
    header = {
        "schema": SCHEMA,
        "cfg": {
            "d_model": sae.d_model,
            "d_sae": sae.d_sae,
            "activation": {"cls": kind, "params": params},
            "normalize_w_dec": unit_rows,
        },
        "commit": "unknown",
        "lib": f"traitsae {__version__}",
        # saev's load reads schema and cfg only; traitsae reads where the SAE belongs from here.
        "traitsae": {key: sae.meta.get(key) for key in ("backbone", "layer", "tokens", "dataset")},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / CHECKPOINT
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(json.dumps(header).encode() + b"\n" + buffer.getvalue())
    tmp.replace(target)
    return target


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m traitsae.sae.formats.saev_export",
        description="Export a traitsae SAE to saev's checkpoint layout (<out>/sae.pt).",
    )
    parser.add_argument("run", help="train.py run dir or its sae.json")
    parser.add_argument("out", help="folder to write sae.pt into")
    args = parser.parse_args(argv)
    print(f"saev checkpoint: {export(args.run, args.out)}")


if __name__ == "__main__":
    main()
