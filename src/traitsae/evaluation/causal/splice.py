"""`eval=splice`: does the rest of the model still work on the SAE's reconstruction?

    python evaluate.py eval=splice run=<run dir> dataset=cub split=test

The SAE's backbone runs over the split's images up to block L (the SAE's layer). Block L's output
then takes four forms, and the remaining blocks and the head run on each:
- clean: unchanged;
- spliced: the edited tokens (patches, and CLS when the SAE was trained on it) replaced by the
  SAE's reconstruction;
- mean_ablated: the same tokens replaced by their mean over the split (per token position, from
  the split's store, which holds block L's output);
- zero_ablated: the same tokens set to zero.
Metrics per condition: cosine of the final embedding to the clean one, relative error of the last
block's tokens (||x - x_clean|| / ||x_clean|| per image), accuracy of a class probe fit on clean
final embeddings of the train split, and for CLIP-family backbones zero-shot accuracy from class
names. `recovered = (spliced - ablated) / (clean - ablated)` against `eval.baseline` (mean: the
vision analogue of "loss recovered"); 1 = the SAE loses nothing downstream, 0 = no better than
erasing the layer.

Clean and ablated runs do not depend on the SAE: with `eval.cache` the ablated conditions (and
the probe's clean train embeddings) are kept in `<store>.cache/`, and every further SAE of a
sweep at the same layer runs only clean (the reference of every metric) and spliced.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.backbones import Backbone, Final
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.causal.forward import (
    ABLATIONS,
    BASELINES,
    CONDITIONS,
    ProbeOptions,
    backbone_key,
    build_full_backbone,
    cache_file,
    check_readout_depends,
    iter_image_batches,
    load_cached,
    run_meta,
    sae_token_positions,
    save_cached,
    split_images,
    store_mean_tokens,
    train_class_probe,
)
from traitsae.evaluation.causal.splice_report import metric_rows, write_outputs
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.probes import ClassProbe
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_store, output_dir
from traitsae.sae.export import RawSpaceSAE

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the intervention


def condition_tokens(
    x_BTD: torch.Tensor,
    sae: RawSpaceSAE,
    positions_T: torch.Tensor,
    mean_TD: torch.Tensor | None,
    conditions: tuple[str, ...] = CONDITIONS,
) -> torch.Tensor:
    """Block L's output under each of `conditions`, stacked [len(conditions) * B, T, D] in that
    order (one copy of x, edited in place per condition); only the tokens at `positions_T`
    change. `mean_TD` is needed only for mean_ablated."""
    n_b, _, d = x_BTD.shape
    stack_CBTD = x_BTD.repeat(len(conditions), 1, 1).view(len(conditions), *x_BTD.shape)
    for name, edited_BTD in zip(conditions, stack_CBTD, strict=True):
        if name == "spliced":
            chosen_BKD = x_BTD[:, positions_T]
            recon_RD = sae(chosen_BKD.reshape(-1, d)).to(x_BTD.dtype)
            edited_BTD[:, positions_T] = recon_RD.view(chosen_BKD.shape)
        elif name == "mean_ablated":
            edited_BTD[:, positions_T] = mean_TD[positions_T].to(x_BTD.dtype)
        elif name == "zero_ablated":
            edited_BTD[:, positions_T] = 0
    return stack_CBTD.view(-1, *x_BTD.shape[1:])


@torch.inference_mode()
def splice_batch(
    backbone: Backbone,
    sae: RawSpaceSAE,
    images_BCHW: torch.Tensor,
    layer: int,
    positions_T: torch.Tensor,
    mean_TD: torch.Tensor | None,
    conditions: tuple[str, ...] = CONDITIONS,
) -> dict[str, Final]:
    """The end of the model (last block's tokens, final embedding) under each condition."""
    stack = condition_tokens(
        backbone.tokens_after(images_BCHW, layer), sae, positions_T, mean_TD, conditions
    )
    # One condition at a time: the blocks after L run ~20 % slower per image on the whole stack
    # (its activations outgrow the cache; docs/LOGBOOK.md 2026-12-02).
    return {
        name: backbone.finish_from(tokens_BTD, layer)
        for name, tokens_BTD in zip(conditions, stack.split(images_BCHW.shape[0]), strict=True)
    }


# ----------------------------------------------------------------------------- metrics


@dataclass
class Tally:
    """Per image and condition: the final embedding, its cosine to clean, and the relative error
    of the last block's tokens (per-image arrays, so a cache can hold the ablated conditions)."""

    rows: list[np.ndarray] = field(default_factory=list)
    values: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)

    def add(self, rows_B: np.ndarray, finals: dict[str, Final]) -> None:
        clean = finals["clean"]
        clean_norm_B = clean.tokens_BTD.float().flatten(1).norm(dim=1).clamp_min(1e-12)
        self.rows.append(rows_B)
        for name, final in finals.items():
            cos_B = torch.nn.functional.cosine_similarity(
                final.embedding_BE.float(), clean.embedding_BE.float(), dim=-1
            )
            err_B = (final.tokens_BTD - clean.tokens_BTD).float().flatten(1).norm(dim=1)
            per = self.values.setdefault(name, {"embedding": [], "cosine": [], "rel_error": []})
            per["embedding"].append(final.embedding_BE.float().cpu().numpy())
            per["cosine"].append(cos_B.cpu().numpy())
            per["rel_error"].append((err_B / clean_norm_B).cpu().numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        """{"rows": [N], "<condition>.<embedding|cosine|rel_error>": [N(, E)]}."""
        out = {"rows": np.concatenate(self.rows)}
        for name, per in self.values.items():
            out.update({f"{name}.{key}": np.concatenate(v) for key, v in per.items()})
        return out


def prompt_name(class_name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross' (CUB / ImageFolder folder names)."""
    return re.sub(r"^\d+\.", "", class_name).replace("_", " ").strip()


def zero_shot_accuracy(
    backbone: Backbone, emb_NE: dict[str, np.ndarray], labels_N: np.ndarray, template: str
) -> dict[str, float]:
    """Per condition: fraction of images whose best-matching prompt is their class's."""
    classes = sorted(set(labels_N) - {""})
    text_CE = backbone.text_tower.classifier([template.format(prompt_name(c)) for c in classes])
    truth_N = np.asarray(labels_N, dtype=object)
    out = {}
    for name, e_NE in emb_NE.items():
        best_N = (torch.as_tensor(e_NE) @ text_CE.T).argmax(-1).numpy()
        out[name] = float((np.asarray(classes, dtype=object)[best_N] == truth_N).mean())
    return out


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class SpliceOptions(ProbeOptions):
    """The `eval.*` options of conf/eval/splice.yaml (defaults and meanings there)."""

    tokens: str
    baseline: str
    zero_shot: bool
    prompt: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.baseline not in BASELINES:
            raise TraitsaeError(
                f"eval.baseline must be one of {sorted(BASELINES)} (the ablation recovery is "
                f"measured against), got {self.baseline!r}."
            )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra entry: splice the SAE into its backbone; write splice.json, splice.csv, splice.png."""
    opts = build_options(SpliceOptions, cfg)
    out = output_dir(cfg)  # before any work: an unwritable folder fails now, not after it
    result = compute_splice(cfg, opts)
    write_outputs(result, out)
    return result


def compute_splice(cfg: DictConfig, opts: SpliceOptions) -> dict[str, Any]:
    """splice.json's content: every condition's metrics over the split's images (the caches of
    what does not depend on the SAE are read or filled on the way; no output is written)."""
    device = opts.device
    sae = resolve_sae(cfg).eval().to(device)
    layer = sae.layer
    with eval_store(cfg, sae, cfg.split) as store:
        backbone = build_full_backbone(sae, store, device)
        g = backbone.geometry
        n_tokens = g.n_prefix_tokens + g.n_patches
        positions_T = sae_token_positions(sae, opts.tokens, g.n_prefix_tokens, n_tokens)
        clean = CleanReference(sae, store) if opts.cache else None
        ablations = ablation_cache(sae, store, layer, positions_T) if opts.cache else None
        cached = load_cached(ablations)
        # Only what depends on the SAE must run again: the spliced condition.
        conditions = ("spliced",) + (() if cached else ABLATIONS)
        if clean is None or not clean.load():
            conditions = ("clean", *conditions)
        mean_TD = None if cached else store_mean_tokens(store, layer, n_tokens).to(device)
        images = split_images(cfg, cfg.split, store, opts.class_column)
    check_readout_depends(backbone, sae, images.paths[:4], opts.tokens, "eval=splice")
    probe = train_class_probe(cfg, backbone, sae, opts)
    writer = None
    if clean is not None and "clean" in conditions:
        writer = CleanWriter(clean, (len(images.paths), n_tokens, g.d_model))
    tally = Tally()
    for rows_B, images_BCHW in iter_image_batches(
        backbone, images.paths, opts.batch_size, opts.num_workers, device, desc="splice"
    ):
        finals = splice_batch(backbone, sae, images_BCHW, layer, positions_T, mean_TD, conditions)
        if "clean" not in finals:
            finals["clean"] = clean.final(rows_B, device)
        elif writer is not None:
            writer.add(rows_B, finals["clean"])
        tally.add(rows_B, finals)
    values = tally.arrays()
    if writer is not None:
        writer.finish(values["rows"], values["clean.embedding"])
    if cached:
        values |= ablations_of(cached, values["rows"], ablations)
    elif ablations is not None:
        kept = {k: v for k, v in values.items() if k == "rows" or k.split(".")[0] in ABLATIONS}
        save_cached(ablations, kept)
    result = summarise(cfg, opts, backbone, sae, probe, values, images.classes_N, positions_T)
    result["meta"]["computed"] = list(conditions)
    result["meta"]["from_cache"] = {
        "clean": None if "clean" in conditions else [str(p) for p in clean.paths],
        "ablations": str(ablations) if cached else None,
    }
    return result


class CleanReference:
    """The clean end of the model on a split's images, kept in the store's cache: the final
    embeddings (`final-embeddings-*.npz`: rows, embedding; the file the class probe reads for its
    train split) and the last block's tokens (`final-tokens-*.npy`, float16, [n_images, T, D] by
    dataset position, read memory-mapped). Neither depends on the SAE or its layer."""

    def __init__(self, sae: RawSpaceSAE, store: Store) -> None:
        key = backbone_key(sae, store)
        self.embeddings_path = cache_file(store, "final-embeddings", key)
        self.tokens_path = cache_file(store, "final-tokens", key).with_suffix(".npy")
        self.paths = (self.embeddings_path, self.tokens_path)

    def load(self) -> bool:
        """Open both files; False when either is missing (the clean condition then runs)."""
        cached = load_cached(self.embeddings_path)
        if cached is None or not self.tokens_path.is_file():
            return False
        self.position = {int(row): i for i, row in enumerate(cached["rows"])}
        self.embedding_NE = cached["embedding"]
        self.tokens_NTD = np.load(self.tokens_path, mmap_mode="r")
        return True

    def final(self, rows_B: np.ndarray, device: str) -> Final:
        missing = [int(r) for r in rows_B if int(r) not in self.position]
        if missing:
            raise TraitsaeError(
                f"images {missing[:5]} were unreadable when {self.embeddings_path} was written; "
                f"delete {self.embeddings_path.parent} (or pass eval.cache=false) and rerun."
            )
        as_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device)  # noqa: E731
        embedding_BE = self.embedding_NE[[self.position[int(r)] for r in rows_B]]
        return Final(as_t(self.tokens_NTD[rows_B]), as_t(embedding_BE))


class CleanWriter:
    """Fills the clean tokens file batch by batch (a temporary file, renamed when complete)."""

    def __init__(self, reference: CleanReference, shape: tuple[int, int, int]) -> None:
        self.reference = reference
        path = reference.tokens_path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.tokens_NTD = np.lib.format.open_memmap(
                self.tmp, mode="w+", dtype=np.float16, shape=shape
            )
        except OSError as err:
            log.warning("cannot cache the clean tokens in %s (%s)", self.tmp.parent, err)
            self.tokens_NTD = None

    def add(self, rows_B: np.ndarray, final: Final) -> None:
        if self.tokens_NTD is None:
            return
        tokens_BTD = final.tokens_BTD.float().cpu().numpy()
        if np.abs(tokens_BTD).max() >= 65504:  # beyond float16: no cache rather than inf
            log.warning("clean tokens exceed the float16 range: not cached")
            self.tokens_NTD = None
            self.tmp.unlink(missing_ok=True)
            return
        self.tokens_NTD[rows_B] = tokens_BTD

    def finish(self, rows_N: np.ndarray, embedding_NE: np.ndarray) -> None:
        if self.tokens_NTD is None:
            return
        self.tokens_NTD.flush()
        self.tokens_NTD = None
        os.replace(self.tmp, self.reference.tokens_path)
        save_cached(self.reference.embeddings_path, {"embedding": embedding_NE, "rows": rows_N})


def ablation_cache(sae: RawSpaceSAE, store: Store, layer: int, positions_T: torch.Tensor):
    """The cache file of the ablated conditions at `layer` on `store`'s images (rows included)."""
    key = {
        **backbone_key(sae, store),
        "layer": layer,
        "edited": torch.nonzero(positions_T).flatten().tolist(),
    }
    return cache_file(store, f"splice-L{layer}", key)


def ablations_of(
    cached: dict[str, np.ndarray], rows_N: np.ndarray, path: Any
) -> dict[str, np.ndarray]:
    """The ablated conditions' arrays of a cache written for the same images."""
    if not np.array_equal(cached["rows"], rows_N):
        raise TraitsaeError(
            f"the splice cache {path} was written for {len(cached['rows'])} readable images, "
            f"this run read {len(rows_N)}: some images changed readability. Delete {path} (or "
            "pass eval.cache=false) and rerun."
        )
    return {k: v for k, v in cached.items() if k.split(".")[0] in ABLATIONS}


def summarise(
    cfg: DictConfig,
    opts: SpliceOptions,
    backbone: Backbone,
    sae: RawSpaceSAE,
    probe: ClassProbe,
    values: dict[str, np.ndarray],
    classes_N: np.ndarray,
    positions_T: torch.Tensor,
) -> dict[str, Any]:
    labels_N = classes_N[values["rows"]]
    embeddings = {c: values[f"{c}.embedding"] for c in CONDITIONS}
    metrics = {
        "embedding_cosine": {c: float(values[f"{c}.cosine"].mean()) for c in CONDITIONS},
        "token_relative_error": {c: float(values[f"{c}.rel_error"].mean()) for c in CONDITIONS},
        "probe_accuracy": {c: probe.accuracy(embeddings[c], labels_N) for c in CONDITIONS},
    }
    if backbone.text_tower is not None and opts.zero_shot:
        metrics["zero_shot_accuracy"] = zero_shot_accuracy(
            backbone, embeddings, labels_N, opts.prompt
        )
    k = backbone.geometry.n_prefix_tokens
    return {
        "metrics": metric_rows(metrics, opts.baseline),
        "meta": run_meta(cfg, backbone, sae, opts.train_split)
        | {
            "n_images": len(labels_N),
            "n_probe_classes": len(probe.classes),
            "edited_tokens": {
                "cls": bool(positions_T[0]),
                "patches": bool(positions_T[k:].all()),
                "registers": False,
            },
            "baseline": BASELINES[opts.baseline],
            "recovered": "(spliced - baseline) / (clean - baseline)",
        },
    }
