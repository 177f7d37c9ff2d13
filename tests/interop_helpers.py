"""Fixtures of other libraries' checkpoints, for the interop and bench tests."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

import traitsae

FIXTURES = Path(__file__).parent / "fixtures" / "interop"


def saelens_layout(run: Path, out: Path) -> Path:
    """A traitsae SAE in SAELens's layout (the keys its save_model writes, as the fixtures made
    by SAELens itself show): a standard SAE, b_dec removed from the input."""
    sae = traitsae.load_sae(run).sae
    out.mkdir(parents=True)
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(out / "sae_weights.safetensors"),
    )
    reference = json.loads((FIXTURES / "saelens_standard" / "cfg.json").read_text())
    cfg = {**reference, "d_in": sae.d_model, "d_sae": sae.d_sae, "apply_b_dec_to_input": True}
    (out / "cfg.json").write_text(json.dumps(cfg))
    return out
