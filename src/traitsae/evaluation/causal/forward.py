"""What `eval=splice` and `eval=steer` share: the SAE's backbone built whole, the images of a
split run through it, and a linear class probe on the model's final image embedding.

The backbone config comes from `sae.json` (the training config's `backbone` node) and must agree
with the store the SAE's activations came from; it is built by `build_backbone`, the builder
extraction uses, without pruning so that the blocks after the SAE's layer and the head run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from traitsae.backbones import Backbone, build_backbone
from traitsae.data.images import ImageDataset, ImageList, load_image_list
from traitsae.data.store import Store, read_fingerprint
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.probes import ClassProbe
from traitsae.evaluation.core.sources import eval_store
from traitsae.sae.export import RawSpaceSAE

log = logging.getLogger(__name__)

# Keys that may differ between the SAE's backbone config and its store's: which blocks were
# stored, and where the weights file lives on this machine.
_FREE_KEYS = ("layers", "weights")
# The runs of the blocks after the SAE's layer that splice compares (and their ablated baselines).
CONDITIONS = ("clean", "spliced", "mean_ablated", "zero_ablated")
ABLATIONS = ("mean_ablated", "zero_ablated")
BASELINES = {"mean": "mean_ablated", "zero": "zero_ablated"}


# ----------------------------------------------------------------------------- the backbone


def backbone_config(sae: RawSpaceSAE, store: Store) -> DictConfig:
    """The SAE's backbone config (`sae.json` -> config.backbone, else the store's), checked
    against the config that wrote `store`; TraitsaeError naming every differing key."""
    stored = (yaml.safe_load(store.config) or {}).get("backbone") if store.config else None
    from_sae = ((sae.meta.get("config") or {}).get("backbone")) or None
    if from_sae and from_sae.get("name") != sae.meta.get("backbone"):
        from_sae = None  # train.py's default group, unused when data.store named another store
    chosen = from_sae or stored
    if not chosen:
        raise TraitsaeError(
            f"neither sae.json ({sae.meta.get('backbone')!r}) nor store {store.path} records the "
            "backbone config (config.backbone), so the backbone cannot be rebuilt; re-extract "
            "the store with extract.py or retrain the SAE with train.py."
        )
    if from_sae and stored:
        differ = {
            key: (from_sae.get(key), stored.get(key))
            for key in sorted(from_sae.keys() | stored.keys())
            if key not in _FREE_KEYS and from_sae.get(key) != stored.get(key)
        }
        if differ:
            detail = "; ".join(
                f"{k}: sae.json {a!r} vs store {b!r}" for k, (a, b) in differ.items()
            )
            raise TraitsaeError(
                f"the backbone in sae.json (config.backbone of {sae.meta.get('backbone')!r}) does "
                f"not match the one that wrote store {store.path} ({detail}). Evaluate the SAE on "
                "stores of the backbone it was trained on (or re-extract them with that backbone)."
            )
    return OmegaConf.create(chosen)


def build_full_backbone(sae: RawSpaceSAE, store: Store, device: str = "cpu") -> Backbone:
    """The SAE's backbone with every block and the head (nothing pruned), on `device`."""
    return build_backbone(backbone_config(sae, store), prune=False).to(device)


# ----------------------------------------------------------------------------- the cache


def cache_file(store: Store, kind: str, key: dict[str, Any]) -> Path:
    """`<store>.cache/<kind>-<hash>.npz`: results that depend on the backbone and the store's
    images but not on the SAE (clean embeddings, ablations), computed once for every SAE of a
    sweep. The hash covers `key`, the store's fingerprint and its file's size and mtime, so a
    re-extracted store or another backbone config never reads a stale file."""

    stat = store.path.stat()
    ident = {
        "store": str(store.path.resolve()),
        "fingerprint": read_fingerprint(store.path),
        "file": [stat.st_size, stat.st_mtime_ns],
        **key,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    return store.path.with_name(store.path.name + ".cache") / f"{kind}-{digest[:16]}.npz"


def load_cached(path: Path | None) -> dict[str, np.ndarray] | None:
    if path is None or not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def save_cached(path: Path | None, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (a reader never sees half a file); an unwritable folder only warns."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the cache %s (%s); the next run recomputes it", path, err)


def backbone_key(sae: RawSpaceSAE, store: Store) -> dict[str, Any]:
    """What the backbone's outputs depend on: its config, except which blocks were stored."""
    config = OmegaConf.to_container(backbone_config(sae, store), resolve=True)
    return {k: v for k, v in config.items() if k != "layers"}


# ----------------------------------------------------------------------------- images


@dataclass
class SplitImages:
    """The images of one split, in store order, with their class names."""

    images: ImageList
    classes_N: np.ndarray  # object [N]: class name per image ('' = none)

    @property
    def paths(self) -> list[str]:
        return self.images.paths


def split_images(cfg: DictConfig, split: str, store: Store, class_column: str) -> SplitImages:
    """The split's image list (the loader extraction uses), checked to be the store's images."""
    images = load_image_list(cfg.dataset, split)
    if len(images) != store.n_images:
        raise TraitsaeError(
            f"dataset {cfg.dataset.name} split {split} lists {len(images)} images but store "
            f"{store.path} holds {store.n_images}: the store is stale; re-extract it with "
            "extract.py ... extract.overwrite=true."
        )
    if class_column not in images.metadata:
        raise TraitsaeError(
            f"eval.class_column={class_column!r} is not a metadata column of dataset "
            f"{cfg.dataset.name}; it has {sorted(images.metadata)}."
        )
    return SplitImages(images, np.asarray(images.metadata[class_column], dtype=object))


def iter_image_batches(
    backbone: Backbone,
    paths: Sequence[str],
    batch_size: int,
    num_workers: int = 0,
    device: str = "cpu",
    desc: str = "images",
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(dataset positions [B], preprocessed images [B, C, H, W]) of the readable images."""
    dataset = ImageDataset(list(paths), backbone.transform, backbone.geometry.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    with tqdm(total=len(dataset), desc=desc, unit="img", leave=False) as bar:
        for batch in loader:
            ok_B = batch["ok"].numpy().astype(bool)
            bar.update(len(ok_B))
            if ok_B.any():
                yield batch["index"].numpy()[ok_B], batch["image"][ok_B].to(device)


@torch.inference_mode()
def final_embeddings(
    backbone: Backbone, paths: Sequence[str], batch_size: int, num_workers: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Clean final embeddings [n, E] float32 and their dataset positions [n] (readable images)."""
    rows, embeddings = [], []
    last = backbone.geometry.depth - 1
    for rows_B, images_BCHW in iter_image_batches(
        backbone, paths, batch_size, num_workers, device, desc="clean embeddings"
    ):
        final = backbone.finish_from(backbone.tokens_after(images_BCHW, last), last)
        embeddings.append(final.embedding_BE.float().cpu().numpy())
        rows.append(rows_B)
    if not rows:
        raise TraitsaeError("none of the images could be read; check dataset.root.")
    return np.concatenate(embeddings), np.concatenate(rows)


# ----------------------------------------------------------------------------- the class probe


@dataclass(frozen=True)
class ProbeOptions:
    """The class probe on clean final embeddings that eval=splice and eval=steer read (their
    conf/eval YAML holds these keys)."""

    train_split: str
    class_column: str
    C: float
    max_iter: int
    batch_size: int
    num_workers: int
    cache: bool
    seed: int
    device: str

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise TraitsaeError(f"eval.batch_size must be >= 1, got {self.batch_size}.")


def train_class_probe(
    cfg: DictConfig, backbone: Backbone, sae: RawSpaceSAE, opts: ProbeOptions
) -> ClassProbe:
    """The class probe on clean final embeddings of the train split's images."""
    with eval_store(cfg, sae, opts.train_split) as store:
        train = split_images(cfg, opts.train_split, store, opts.class_column)
        cache = cache_file(store, "final-embeddings", backbone_key(sae, store))
    cached = load_cached(cache) if opts.cache else None
    if cached is not None:
        emb_NE, rows_N = cached["embedding"], cached["rows"]
    else:
        emb_NE, rows_N = final_embeddings(
            backbone, train.paths, opts.batch_size, opts.num_workers, opts.device
        )
        if opts.cache:
            save_cached(cache, {"embedding": emb_NE, "rows": rows_N})
    labels_N = train.classes_N[rows_N]
    if len(set(labels_N) - {""}) < 2:
        raise TraitsaeError(
            f"the {opts.train_split} split of dataset {cfg.dataset.name} has fewer than 2 classes "
            f"in column {opts.class_column!r}; a class probe needs 2 or more."
        )
    return ClassProbe.fit(emb_NE, labels_N, opts.C, opts.max_iter, opts.seed)


def sae_token_positions(
    sae: RawSpaceSAE, tokens: str, n_prefix: int, n_tokens: int
) -> torch.Tensor:
    """Bool [T]: the token positions of block L's output that the SAE edits.

    `tokens`: auto (what the SAE was trained on), patches, cls, or both (patches and CLS);
    registers (prefix tokens after CLS) are never edited.
    """
    if tokens == "auto":
        tokens = "cls" if sae.tokens == "cls" else "patches"
    if tokens not in ("patches", "cls", "both"):
        raise TraitsaeError(f"eval.tokens must be auto, patches, cls or both; got {tokens!r}.")
    positions_T = torch.zeros(n_tokens, dtype=torch.bool)
    if tokens in ("patches", "both"):
        positions_T[n_prefix:] = True
    if tokens in ("cls", "both"):
        positions_T[0] = True
    return positions_T


def store_mean_tokens(store: Store, layer: int, n_tokens: int) -> torch.Tensor:
    """[T, D] mean of block `layer`'s output over the store's valid images (CLS at position 0,
    patches after the prefix; registers are not stored and stay zero: they are never edited)."""
    mean_TD = torch.zeros(n_tokens, store.d_model, dtype=torch.float64)
    n_valid = int(np.asarray(store.valid).sum())
    if n_valid == 0:
        raise TraitsaeError(f"store {store.path} has no valid images to average.")
    for tokens, rows in (("patches", slice(store.n_prefix_tokens, None)), ("cls", 0)):
        total = torch.zeros(mean_TD[rows].shape, dtype=torch.float64)
        for _, acts in store.iter_valid(layer, tokens=tokens):
            total += torch.from_numpy(np.asarray(acts, dtype=np.float64)).sum(0)
        mean_TD[rows] = total / n_valid
    return mean_TD.float()


def readout_name(backbone: Backbone) -> str:
    """How the backbone's final embedding is read from the last block's tokens, in words."""
    pool = getattr(backbone.trunk, "global_pool", None)
    if pool in ("avg", "avgmax", "max"):
        return f"the patch tokens pooled ({pool}) after the final norm"
    if pool == "map":
        return "attention pooling over the tokens"
    return "the CLS token after the final norm (and projection)"


@torch.inference_mode()
def check_readout_depends(
    backbone: Backbone, sae: RawSpaceSAE, paths: Sequence[str], tokens: str, what: str
) -> None:
    """Refuse a vacuous causal test: the final embedding must change when the edited tokens of
    block L's output are zeroed (measured on the first readable of `paths`). It does not when
    no block after L mixes patches into a CLS read-out (an SAE on patches at the last block)."""
    found = next(iter_image_batches(backbone, list(paths), len(paths), desc="read-out check"), None)
    if found is None:
        return  # no readable image: the run itself says so
    layer, g = sae.layer, backbone.geometry
    x_BTD = backbone.tokens_after(found[1], layer)
    positions_T = sae_token_positions(sae, tokens, g.n_prefix_tokens, x_BTD.shape[1])
    zeroed_BTD = x_BTD.clone()
    zeroed_BTD[:, positions_T.to(x_BTD.device)] = 0
    clean_BE = backbone.finish_from(x_BTD, layer).embedding_BE.float()
    ablated_BE = backbone.finish_from(zeroed_BTD, layer).embedding_BE.float()
    change = float((ablated_BE - clean_BE).norm() / clean_BE.norm().clamp_min(1e-12))
    if change > 1e-6:
        return
    edited = "CLS" if bool(positions_T[0]) and not bool(positions_T[1:].any()) else "patch"
    raise TraitsaeError(
        f"{what} would be vacuous: the SAE sits at block {layer} of {backbone.name}'s "
        f"{g.depth} (index {g.depth - 1} is the last), it edits the {edited} tokens, and the "
        f"model's final embedding is read from {readout_name(backbone)}: zeroing every edited "
        f"token changes that embedding by {change:.1e} (relative), so no edit can change what the "
        "probe reads and every condition would score the same. Choose an SAE trained at an "
        "earlier layer (train.py data.layer=<L> with L < the last block, extracted with "
        "backbone.layers=[L]), or eval.tokens=cls / both to edit the read-out token itself."
    )


def run_meta(cfg: DictConfig, backbone: Backbone, sae: RawSpaceSAE, train_split: str) -> dict:
    """What a causal run edited and read: the `meta` block splice.json and steer.json share."""
    return {
        "sae": str(cfg.get("sae_path") or cfg.get("run")),
        "backbone": backbone.name,
        "layer": sae.layer,
        "depth": backbone.geometry.depth,
        "dataset": cfg.dataset.name,
        "split": str(cfg.split),
        "train_split": train_split,
    }
