"""What eval=key and eval=audit compute (typed results), shared by the computation and the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from traitsae.evaluation.core.precision import bootstrap_ci


@dataclass
class Accuracy:
    """Held-out accuracy with a percentile bootstrap CI over test images."""

    accuracy: float
    ci_low: float
    ci_high: float
    n_test: int

    @classmethod
    def of(cls, correct_N: np.ndarray, n_boot: int, seed: int, level: float) -> Accuracy:
        correct_N = np.asarray(correct_N, dtype=np.float64)
        low, high = bootstrap_ci(correct_N, n_boot, seed, level)
        return cls(float(correct_N.mean()), low, high, int(correct_N.size))


@dataclass
class MethodKey:
    """One method's path, keys of n latents and tree (per-image correctness kept for pairs)."""

    method: str
    n_directions: int
    path: list[dict[str, Any]]
    budgets: list[dict[str, Any]]
    tree: dict[str, Any]
    tree_accuracy: Accuracy
    tree_latents: list[int]
    correct: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        del row["correct"]
        return row


@dataclass
class KeyResult:
    """Everything key.json holds."""

    methods: dict[str, MethodKey]
    dense: dict[str, Any]
    differences: list[dict[str, Any]]
    notes: list[str]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "methods": {name: m.to_json() for name, m in self.methods.items()},
            "dense_probe": self.dense,
            "differences": self.differences,
            "notes": self.notes,
            "meta": self.meta,
        }


@dataclass
class MethodAudit:
    """One method's proposals, their grounding and its yield curve (CIs over audited images)."""

    method: str
    n_directions: int
    yields: list[dict[str, Any]]  # per budget: budget, yield, ci_low, ci_high, n_grounded
    auc: float
    auc_ci: tuple[float, float]
    n_proposed: int
    n_grounded_all: int  # grounded directions among all of the method's (the ranking's ceiling)
    proposals: list[dict[str, Any]]  # top max(budgets): rank, direction, best_ap, class, grounded


@dataclass
class AuditResult:
    """Everything audit.json holds."""

    methods: dict[str, MethodAudit]
    null: dict[str, Any]
    notes: list[str]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "methods": {name: asdict(m) for name, m in self.methods.items()},
            "null": self.null,
            "notes": self.notes,
            "meta": self.meta,
        }
