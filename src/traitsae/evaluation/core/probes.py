"""Every probe the evaluations fit, in one place: many independent L2 logistic regressions
solved jointly with L-BFGS (`fit_logistic`: pooled trait probes, and the patch-level probes of
traits/probes.py built on it; `linear_probes`: standardised, L2 chosen on held-out images) and the
multinomial class probe (`fit_class_probe`: eval=probe on layer activations; `ClassProbe` wraps it
as torch tensors for eval=splice, eval=steer and the explorer's Steer page)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from traitsae.errors import TraitsaeError


def fit_logistic(
    z_ND: torch.Tensor,
    y_NC: torch.Tensor,
    l2_C: torch.Tensor,
    max_iter: int,
    mask_NC: torch.Tensor | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint L-BFGS fit of C independent L2 logistic regressions; returns (w [D, C], b [C]).

    z_ND holds features shared by all columns, or z_NCD one feature vector per image and column
    (the patch-level probes: each trait's own witness patch). mask_NC says which images each
    column is fit on (cross-fitting folds); `init` warm-starts (w, b).
    """
    n_cols = y_NC.shape[1]
    mask_NC = torch.ones_like(y_NC) if mask_NC is None else mask_NC.to(y_NC.dtype)
    n_fit_C = mask_NC.sum(0).clamp_min(1.0)
    if init is None:
        # Start at the base rate so traits with few positives do not begin far from optimum.
        rate_C = ((y_NC * mask_NC).sum(0) / n_fit_C).clamp(1e-4, 1 - 1e-4)
        init = (torch.zeros(z_ND.shape[-1], n_cols), torch.log(rate_C / (1 - rate_C)))
    w_DC = init[0].clone().requires_grad_(True)
    b_C = init[1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w_DC, b_C], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        if z_ND.ndim == 2:
            logits_NC = z_ND @ w_DC + b_C
        else:
            logits_NC = torch.einsum("ncd,dc->nc", z_ND, w_DC) + b_C
        bce_NC = F.binary_cross_entropy_with_logits(logits_NC, y_NC, reduction="none")
        # Sum over columns of (mean BCE + l2 |w|^2): the columns' problems stay independent.
        loss = ((bce_NC * mask_NC).sum(0) / n_fit_C + l2_C * (w_DC**2).sum(0)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w_DC.detach(), b_C.detach()


def linear_probes(
    pooled_ND: np.ndarray,
    labels_NT: np.ndarray,
    l2: float | Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    max_iter: int = 200,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One L2-regularised logistic regression per trait, on raw pooled activations.

    The T problems are independent (the loss is a sum over traits), so they are solved jointly as
    one [D -> T] linear layer with L-BFGS: a few seconds instead of T separate sklearn fits.
    With several `l2` values, each trait gets the one with the lowest loss on a held-out
    `val_fraction` of the images (probes overfit small splits otherwise), then all are refit on
    every image. Features are standardised; the returned (W [T, D], b [T]) act on raw inputs.
    """
    x_ND = torch.from_numpy(np.asarray(pooled_ND, dtype=np.float32))
    y_NT = torch.from_numpy(np.asarray(labels_NT, dtype=np.float32))
    mu_D, sd_D = x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)
    z_ND = (x_ND - mu_D) / sd_D
    grid = [float(v) for v in (l2 if isinstance(l2, Sequence) else [l2])]
    l2_T = torch.full((y_NT.shape[1],), grid[0])
    if len(grid) > 1:
        l2_T = _select_l2(z_ND, y_NT, grid, max_iter, val_fraction, seed)
    w_DT, b_T = fit_logistic(z_ND, y_NT, l2_T, max_iter)
    w_raw_DT = w_DT / sd_D[:, None]
    b_raw_T = b_T - mu_D @ w_raw_DT
    return w_raw_DT.T.contiguous().numpy(), b_raw_T.numpy()


def _select_l2(
    z_ND: torch.Tensor,
    y_NT: torch.Tensor,
    grid: list[float],
    max_iter: int,
    val_fraction: float,
    seed: int,
) -> torch.Tensor:
    """Per-trait L2 weight with the lowest held-out BCE, [T]."""
    perm_N = torch.randperm(z_ND.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * z_ND.shape[0])))
    val, fit = perm_N[:n_val], perm_N[n_val:]
    losses_LT = []
    for value in grid:
        w_DT, b_T = fit_logistic(
            z_ND[fit], y_NT[fit], torch.full((y_NT.shape[1],), value), max_iter
        )
        logits_VT = z_ND[val] @ w_DT + b_T
        losses_LT.append(
            F.binary_cross_entropy_with_logits(logits_VT, y_NT[val], reduction="none").mean(0)
        )
    return torch.tensor(grid)[torch.stack(losses_LT).argmin(0)]


def fit_class_probe(x_ND: np.ndarray, y_N: np.ndarray, C: float, max_iter: int, seed: int):
    """Standardise, then L2 multinomial logistic regression: the class probe every evaluation fits
    (`eval=probe` on layer activations, `eval=splice`/`eval=steer` on final embeddings)."""

    if np.unique(y_N).size < 2:
        raise TraitsaeError(
            "the train split has fewer than 2 classes; a class probe needs 2 or more."
        )
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    )
    return model.fit(x_ND, y_N)


@dataclass
class ClassProbe:
    """Multinomial logistic regression on standardised final embeddings, as torch tensors.

    probabilities(emb_BE) = softmax(((emb - mean) / std) @ weight^T + bias), classes in order.
    """

    classes: list[str]
    mean_E: torch.Tensor
    std_E: torch.Tensor
    weight_CE: torch.Tensor
    bias_C: torch.Tensor

    @classmethod
    def fit(
        cls,
        emb_NE: np.ndarray,
        labels_N: np.ndarray,
        C: float = 1.0,
        max_iter: int = 1000,
        seed: int = 0,
    ) -> ClassProbe:
        """Fit on embeddings and their class names (images without a class are skipped)."""
        labels_N = np.asarray(labels_N, dtype=object)
        keep_N = labels_N != ""
        classes = sorted(set(labels_N[keep_N]))
        index = {name: i for i, name in enumerate(classes)}
        y_N = np.array([index[name] for name in labels_N[keep_N]], dtype=np.int64)
        model = fit_class_probe(emb_NE[keep_N], y_N, C, max_iter, seed)
        scaler, logistic = model[0], model[-1]
        weight, bias = logistic.coef_, logistic.intercept_
        if len(classes) == 2:  # sklearn keeps one row for two classes: p(1) = sigmoid(z)
            weight, bias = np.concatenate([-weight, weight]) / 2, np.array([-bias[0], bias[0]]) / 2
        as_t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        return cls(classes, as_t(scaler.mean_), as_t(scaler.scale_), as_t(weight), as_t(bias))

    def logits(self, emb_BE: torch.Tensor) -> torch.Tensor:
        x_BE = (emb_BE.float().cpu() - self.mean_E) / self.std_E
        return x_BE @ self.weight_CE.T + self.bias_C

    def probabilities(self, emb_BE: torch.Tensor) -> torch.Tensor:
        """[B, E] final embeddings -> [B, C] class probabilities (CPU float32)."""
        return self.logits(emb_BE).softmax(-1)

    def class_index(self, name: str, what: str = "eval.target_class") -> int:
        if name not in self.classes:
            shown = ", ".join(self.classes[:20]) + (" ..." if len(self.classes) > 20 else "")
            raise TraitsaeError(
                f"{what}={name!r} is not a class of the dataset's train split; its "
                f"{len(self.classes)} classes are: {shown}."
            )
        return self.classes.index(name)

    def accuracy(self, emb_NE: np.ndarray | torch.Tensor, labels_N: np.ndarray) -> float:
        """Fraction of images whose most probable class is their own (unseen classes count wrong)."""
        predicted = np.asarray(self.classes, dtype=object)[
            self.logits(torch.as_tensor(emb_NE)).argmax(-1).numpy()
        ]
        return float((predicted == np.asarray(labels_N, dtype=object)).mean())

    def save(self, path: str | Path) -> Path:
        tensors = {
            "mean": self.mean_E,
            "std": self.std_E,
            "weight": self.weight_CE,
            "bias": self.bias_C,
        }
        save_file(tensors, str(path), metadata={"classes": json.dumps(self.classes)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ClassProbe:
        with safe_open(str(path), framework="pt") as f:
            classes = json.loads(f.metadata()["classes"])
            t = {key: f.get_tensor(key) for key in ("mean", "std", "weight", "bias")}
        return cls(classes, t["mean"], t["std"], t["weight"], t["bias"])
