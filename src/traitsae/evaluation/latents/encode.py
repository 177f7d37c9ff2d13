"""`eval=encode`: a store's sparse SAE codes written to HDF5 (format: core/codes.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from traitsae.evaluation.core.codes import check_output, write_sparse_codes
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_store, output_dir, sae_source


@dataclass(frozen=True)
class EncodeOptions:
    """The `eval.*` options of conf/eval/encode.yaml (defaults and meanings there)."""

    split: str
    output: str
    overwrite: bool
    dtype: str
    batch_patches: int
    device: str


def run(cfg: DictConfig) -> Path:
    """`python evaluate.py eval=encode run=<run dir>`: write the store's sparse codes."""
    opts = build_options(EncodeOptions, cfg)
    sae = resolve_sae(cfg)
    sae.eval().to(opts.device)
    with eval_store(cfg, sae, opts.split) as store:
        out = Path(opts.output)
        if not out.is_absolute():
            out = output_dir(cfg) / out
        inputs = [store.path, sae.json_path, sae.weights_path]
        check_output(out, inputs, overwrite=opts.overwrite)
        write_sparse_codes(
            store,
            sae,
            out,
            sae_source=sae_source(cfg),
            batch_patches=opts.batch_patches,
            dtype=opts.dtype,
            device=opts.device,
        )
    print(f"sparse codes of {store.path} -> {out}")
    return out
