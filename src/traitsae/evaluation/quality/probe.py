"""`eval=probe`: what does the SAE lose? Class linear-probe accuracy on original activations vs
on the SAE's reconstructions (e.g. CUB species).

Features per image: the CLS token, or the mean of its patch tokens (each patch reconstructed by
the SAE before pooling). A multinomial logistic regression is fit on the train split and scored
on the test split, once on original features and once on reconstructions; the probe fit on
originals is also applied to reconstructions (does the SAE keep what that probe reads?).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.core.outputs import write_json
from traitsae.evaluation.core.probes import fit_class_probe
from traitsae.evaluation.core.sae import resolve_sae
from traitsae.evaluation.core.sources import eval_stores, output_dir
from traitsae.evaluation.core.tokens import images_per_block, iter_valid_tokens
from traitsae.sae.export import RawSpaceSAE

FEATURES = ("auto", "cls", "pooled")


@dataclass(frozen=True)
class ProbeDeltaOptions:
    """The `eval.*` options of conf/eval/probe.yaml (defaults and meanings there)."""

    train_split: str
    test_split: str
    features: str
    C: float
    max_iter: int
    seed: int
    device: str


def run(cfg: DictConfig) -> dict[str, Any]:
    """Hydra entry: fit probes on the train split, report accuracies on the test split."""
    opts = build_options(ProbeDeltaOptions, cfg)
    device = opts.device
    sae = resolve_sae(cfg).to(device)
    features = resolve_features(opts.features, sae)
    stores = eval_stores(cfg, sae, [opts.train_split, opts.test_split])
    try:
        train, test = (image_features(sae, store, features, device) for store in stores)
    finally:
        for store in stores:
            store.close()
    result = probe_accuracies(train, test, opts.C, opts.max_iter, opts.seed)
    result["features"] = features
    result["layer"] = sae.layer
    out = output_dir(cfg)
    write_json(out / "probe.json", result)
    print(format_result(result))
    print(f"probe: outputs in {out}")
    return result


def resolve_features(features: str, sae: RawSpaceSAE) -> str:
    """`auto`: the tokens the SAE was trained on (cls -> cls, patches -> pooled patches)."""
    if features not in FEATURES:
        raise TraitsaeError(f"eval.features must be one of {FEATURES}, got {features!r}.")
    if features != "auto":
        return features
    return "cls" if sae.tokens == "cls" else "pooled"


@torch.no_grad()
def image_features(
    sae: RawSpaceSAE, store: Store, features: str, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """{'original': [N, D], 'reconstructed': [N, D], 'label': [N]} for valid, labelled images."""
    layer = sae.layer
    tokens = "cls" if features == "cls" else "patches"
    block = images_per_block(store, tokens, sae.d_sae)
    labels_all = np.asarray(store.metadata["label"])
    orig, rec, labels = [], [], []
    for rows_B, acts_BPD in iter_valid_tokens(store, layer, tokens, block, device):
        n_b, n_p, d = acts_BPD.shape
        x_hat_BPD = sae.decode(sae.encode(acts_BPD.reshape(n_b * n_p, d))).reshape(n_b, n_p, d)
        orig.append(acts_BPD.mean(1).cpu().numpy())  # CLS: n_p = 1, the mean is the token
        rec.append(x_hat_BPD.mean(1).cpu().numpy())
        labels.append(labels_all[rows_B])
    label_N = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
    keep_N = label_N >= 0
    if keep_N.sum() == 0:
        raise TraitsaeError(
            f"store {store.path} has no valid images with a class label (images/label >= 0); "
            "eval=probe needs a labelled dataset such as dataset=cub."
        )
    return {
        "original": np.concatenate(orig)[keep_N],
        "reconstructed": np.concatenate(rec)[keep_N],
        "label": label_N[keep_N],
    }


def probe_accuracies(
    train: dict[str, np.ndarray], test: dict[str, np.ndarray], C: float, max_iter: int, seed: int
) -> dict[str, Any]:
    """Test accuracy of probes on originals, on reconstructions, and originals' probe on recs."""
    on_orig = fit_class_probe(train["original"], train["label"], C, max_iter, seed)
    on_rec = fit_class_probe(train["reconstructed"], train["label"], C, max_iter, seed)
    acc_orig = float(on_orig.score(test["original"], test["label"]))
    acc_rec = float(on_rec.score(test["reconstructed"], test["label"]))
    return {
        "n_train": int(train["label"].size),
        "n_test": int(test["label"].size),
        "n_classes": int(np.unique(train["label"]).size),
        "accuracy_original": acc_orig,
        "accuracy_reconstructed": acc_rec,
        "accuracy_drop": acc_orig - acc_rec,
        "accuracy_original_probe_on_reconstructed": float(
            on_orig.score(test["reconstructed"], test["label"])
        ),
        # Predicting the train split's most frequent class: what a probe reading nothing scores.
        "chance": float((test["label"] == np.bincount(train["label"]).argmax()).mean()),
    }


def format_result(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"class probe on {result['features']} features of layer {result['layer']} "
            f"({result['n_classes']} classes, {result['n_train']} train / {result['n_test']} test images)",
            f"  accuracy on original activations      {result['accuracy_original']:.3f}",
            f"  accuracy on SAE reconstructions       {result['accuracy_reconstructed']:.3f}",
            f"  drop                                  {result['accuracy_drop']:+.3f}",
            f"  original probe on reconstructions     {result['accuracy_original_probe_on_reconstructed']:.3f}",
            f"  chance (train's majority class)       {result['chance']:.3f}",
        ]
    )
