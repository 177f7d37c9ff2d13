"""`eval=encode`: a store's sparse SAE codes written to HDF5 (format: core/codes.py)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from traitsae.evaluation.core.codes import check_output, write_sparse_codes
from traitsae.evaluation.core.sources import eval_store, output_dir, resolve_sae, sae_source


def run(cfg: DictConfig) -> Path:
    """`python evaluate.py eval=encode run=<run dir>`: write the store's sparse codes."""

    sae = resolve_sae(cfg)
    sae.eval().to(cfg.device)
    split = cfg.eval.get("split") or cfg.split
    with eval_store(cfg, sae, split) as store:
        out = Path(cfg.eval.get("output") or "codes.h5")
        if not out.is_absolute():
            out = output_dir(cfg) / out
        inputs = [store.path, sae.json_path, sae.weights_path]
        check_output(out, inputs, overwrite=bool(cfg.eval.overwrite))
        write_sparse_codes(
            store,
            sae,
            out,
            sae_source=sae_source(cfg),
            batch_patches=int(cfg.eval.batch_patches),
            dtype=str(cfg.eval.dtype),
            device=cfg.device,
        )
    print(f"sparse codes of {store.path} -> {out}")
    return out
