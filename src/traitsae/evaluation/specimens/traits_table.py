"""`eval=traits_table`: the specimen x trait table, one row per image x latent.

    python evaluate.py eval=traits_table run=<run dir> eval.discovery=<discovery output dir>
    python evaluate.py eval=traits_table run=<run dir> eval.latents=[3,17]   # or eval.latents=all

The latents are `eval.latents`, or those of a discovery run chosen by `eval.select` (default:
its confirmed discoveries). One streaming pass over the store encodes every valid image; each
row carries the image's metadata columns and the numbers of `measures.measure` over the image's
foreground patches (`images/foreground` of the store, or every patch: `eval.foreground`).
Outputs: traits_table.csv, traits_table.parquet (`eval.parquet`), traits_table.json (what was
measured: the latents and where they came from, the foreground source, the columns).
Columns: docs/guide/traits_table.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.outputs import replacing, write_csv, write_json
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_store, output_dir
from traitsae.evaluation.core.tokens import stream_codes
from traitsae.evaluation.specimens.measures import MEASURES, measure
from traitsae.sae.export import RawSpaceSAE

SELECT = ("confirmed", "discoveries", "candidates")
FOREGROUND = ("auto", "flags", "all")
FOREGROUND_KEY = "images/foreground"  # bool [N, P], patches row-major (docs/guide/store.md)
ID_COLUMNS = ("image", "index", "path", "label")  # then the metadata columns, then latent


@dataclass(frozen=True)
class TraitsTableOptions:
    """The `eval.*` options of conf/eval/traits_table.yaml (defaults and meanings there)."""

    split: str
    latents: Any
    discovery: str | None
    select: str
    foreground: str
    fire_threshold: float
    parquet: bool
    batch_patches: int
    device: str

    def __post_init__(self) -> None:
        if self.select not in SELECT:
            raise TraitsaeError(f"eval.select must be one of {SELECT}, got {self.select!r}.")
        if self.foreground not in FOREGROUND:
            raise TraitsaeError(
                f"eval.foreground must be one of {FOREGROUND}, got {self.foreground!r}."
            )


# ----------------------------------------------------------------------------- latents


def discovery_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A discovery run's discovery.json (the output dir or the file itself)."""
    path = Path(path)
    file = path / "discovery.json" if path.is_dir() else path
    if not file.is_file():
        raise TraitsaeError(
            f"eval.discovery={path}: no discovery.json there. Pass the output dir of an "
            "`evaluate.py eval=discovery` run (it holds discovery.json) or the file itself."
        )
    try:
        data = json.loads(file.read_text())
        candidates = data["candidates"]
        assert isinstance(candidates, list)
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as err:
        raise TraitsaeError(
            f"eval.discovery: {file} is not the discovery.json of an eval=discovery run (no "
            f"'candidates' list: {err!r}); re-run eval=discovery or pass eval.latents=[...]."
        ) from None
    return file, data


def chosen(candidate: dict[str, Any], select: str) -> bool:
    """`confirmed`: discoveries (q <= alpha) confirmed on the held-out images; `discoveries`:
    q <= alpha; `candidates`: every candidate the report lists."""
    if select == "candidates":
        return True
    if select == "discoveries":
        return bool(candidate.get("discovery"))
    return bool(candidate.get("discovery")) and candidate.get("confirmed") is True


def latents_from_discovery(
    path: str | Path, select: str, d_sae: int
) -> tuple[list[int], list[dict[str, Any]]]:
    """The chosen latents (first appearance order) and where each came from."""
    file, data = discovery_json(path)
    ran_on = (data.get("settings") or {}).get("d_sae")
    if ran_on is not None and int(ran_on) != d_sae:
        raise TraitsaeError(
            f"eval.discovery: {file} was computed on an SAE with {ran_on} latents, but this run's "
            f"SAE has {d_sae}; pass the discovery run of this SAE (run=...)."
        )
    candidates = data["candidates"]
    picked = [c for c in candidates if chosen(c, select)]
    if not picked:
        counts = {s: sum(chosen(c, s) for c in candidates) for s in SELECT}
        raise TraitsaeError(
            f"eval.discovery: {file} has no latent to tabulate with eval.select={select} "
            f"({counts['candidates']} candidates, {counts['discoveries']} discoveries at "
            f"q <= {data.get('alpha', 'alpha')}, {counts['confirmed']} of them confirmed on the "
            "held-out images). Pass eval.select=discoveries or eval.select=candidates to take "
            "weaker evidence, or name latents with eval.latents=[...]."
        )
    keys = ("pair", "group", "rank", "auroc", "q_value", "discovery", "confirmed")
    sources = [{"latent": int(c["latent"])} | {k: c[k] for k in keys if k in c} for c in picked]
    return list(dict.fromkeys(s["latent"] for s in sources)), sources


def resolve_latents(opts: TraitsTableOptions, d_sae: int) -> tuple[list[int], list[dict]]:
    """`eval.latents` when given (`all`: every latent), else the discovery run's; range-checked."""
    if opts.latents == "all":
        return list(range(d_sae)), [{"latent": s, "given": True} for s in range(d_sae)]
    if opts.latents:
        if not isinstance(opts.latents, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in opts.latents
        ):
            raise TraitsaeError(
                f"eval.latents must be a list of latent indices, e.g. eval.latents=[3,17], or "
                f"all; got {opts.latents!r}."
            )
        latents = list(dict.fromkeys(opts.latents))
        sources = [{"latent": s, "given": True} for s in latents]
    elif opts.discovery:
        latents, sources = latents_from_discovery(opts.discovery, opts.select, d_sae)
    else:
        raise TraitsaeError(
            "eval=traits_table needs latents: pass eval.discovery=<output dir of an "
            "eval=discovery run> (its confirmed discoveries are taken) or eval.latents=[...]."
        )
    bad = [s for s in latents if not 0 <= s < d_sae]
    if bad:
        raise TraitsaeError(
            f"eval.latents has {bad}, outside this SAE's latents 0..{d_sae - 1}"
            + (f" (from {opts.discovery})." if not opts.latents else ".")
        )
    return latents, sources


# ----------------------------------------------------------------------------- foreground


def foreground_flags(store: Store, mode: str) -> tuple[np.ndarray, str]:
    """bool [N, P]: the patches each image's numbers are taken over, and a sentence saying so."""
    flags_NP = store.foreground() if mode != "all" else None
    if flags_NP is not None:
        rule = f", rule {store.foreground_rule}" if store.foreground_rule else ""
        return flags_NP, f"foreground patches ({FOREGROUND_KEY} of the store{rule})"
    if mode == "flags":
        raise TraitsaeError(
            f"eval.foreground=flags, but store {store.path} has no {FOREGROUND_KEY}. Add them "
            "without re-extracting the activations: rerun the extract.py command that wrote the "
            "store (extract.foreground.rule=auto: the dataset's masks, else the border-colour "
            "rule; docs/guide/extract.md). Or pass eval.foreground=all to measure over every patch."
        )
    note = (
        "every patch (eval.foreground=all)"
        if mode == "all"
        else f"every patch: store {store.path} has no {FOREGROUND_KEY} (rerun its extract.py "
        "command to add foreground flags and measure over the specimen only)"
    )
    return np.ones((store.n_images, store.n_patches), dtype=bool), note


# ----------------------------------------------------------------------------- the table


def metadata_columns(store: Store) -> dict[str, np.ndarray]:
    """The per-image columns of the table, a metadata column named like another column renamed
    `meta_<name>`."""
    meta = store.metadata
    taken = {*ID_COLUMNS, "latent", *MEASURES}
    columns = {"index": meta["index"], "path": meta["path"], "label": meta["label"]}
    for name in store.metadata_columns:
        columns[f"meta_{name}" if name in taken else name] = meta[name]
    return columns


def compute_table(
    store: Store,
    sae: RawSpaceSAE,
    latents: list[int],
    foreground_NP: np.ndarray,
    *,
    fire_threshold: float = 0.0,
    batch_patches: int = 4096,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Columns of the table (image-major: every latent of image 1, then of image 2, ...)."""
    latents_L = torch.as_tensor(latents, dtype=torch.long, device=device)
    rows_parts: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in MEASURES}
    for batch in stream_codes(store, sae, batch_patches=batch_patches, device=device):
        codes_BPL = batch.codes_BPS.index_select(2, latents_L)
        fg_BP = torch.from_numpy(foreground_NP[batch.image_index])
        for key, values_BL in measure(codes_BPL, fg_BP, store.grid, fire_threshold).items():
            parts[key].append(values_BL.ravel())
        rows_parts.append(batch.image_index)
    image_N = np.concatenate(rows_parts) if rows_parts else np.zeros(0, np.int64)
    n_latents = len(latents)
    columns: dict[str, np.ndarray] = {"image": np.repeat(image_N, n_latents)}
    columns |= {k: np.repeat(v[image_N], n_latents) for k, v in metadata_columns(store).items()}
    columns["latent"] = np.tile(np.asarray(latents, np.int64), len(image_N))
    columns |= {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    for count in ("n_foreground", "n_fires"):
        columns[count] = columns[count].astype(np.int64)
    return columns


def _cell(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.6g}"
    return value.item() if isinstance(value, np.generic) else value


def write_table(out: Path, columns: dict[str, np.ndarray], parquet: bool) -> list[Path]:
    names = list(columns)
    csv_path = write_csv(
        out / "traits_table.csv",
        names,
        [[_cell(v) for v in row] for row in zip(*columns.values(), strict=True)],
    )
    if not parquet:
        return [csv_path]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            k: pa.array(v, from_pandas=True) if v.dtype.kind == "f" else pa.array(v.tolist())
            for k, v in columns.items()
        }
    )
    path = out / "traits_table.parquet"
    with replacing(path, "wb") as f:
        pq.write_table(table, f)
    return [csv_path, path]


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python evaluate.py eval=traits_table run=<run dir> eval.discovery=<dir>`."""
    opts = build_options(TraitsTableOptions, cfg)
    sae = resolve_sae(cfg)
    latents, sources = resolve_latents(opts, int(sae.d_sae))
    sae.eval().to(opts.device)
    out = output_dir(cfg)
    with eval_store(cfg, sae, opts.split) as store:
        foreground_NP, foreground_note = foreground_flags(store, opts.foreground)
        columns = compute_table(
            store,
            sae,
            latents,
            foreground_NP,
            fire_threshold=opts.fire_threshold,
            batch_patches=opts.batch_patches,
            device=opts.device,
        )
        grid, image_size, store_path = list(store.grid), store.image_size, str(store.path)
    files = write_table(out, columns, opts.parquet)
    no_fg = int((columns["n_foreground"][:: max(1, len(latents))] == 0).sum())
    data = {
        "latents": latents,
        "sources": sources,
        "n_images": int(len(columns["image"]) // max(1, len(latents))),
        "n_rows": int(len(columns["image"])),
        "images_without_foreground": no_fg,
        "foreground": foreground_note,
        "grid": grid,
        "image_size": image_size,
        "store": store_path,
        "columns": list(columns),
        "files": [f.name for f in files],
        "options": asdict(opts),
    }
    write_json(out / "traits_table.json", data)
    print(f"measured over {foreground_note}")
    if no_fg:
        print(f"{no_fg} images have no foreground patch: their measures are empty (NaN).")
    print(f"{data['n_rows']} rows ({data['n_images']} images x {len(latents)} latents): {files[0]}")
    return data
