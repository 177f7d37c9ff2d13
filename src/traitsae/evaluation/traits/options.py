"""The options of eval=cub_traits (conf/eval/cub_traits.yaml) and the methods it compares."""

from __future__ import annotations

from dataclasses import dataclass

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.foreground import check_patches
from traitsae.evaluation.core.methods import (
    check_pool,
)

METHODS = ("sae", "sae_init", "random", "pca", "kmeans", "probe")


UNSUPERVISED = ("sae", "sae_init", "random", "pca", "kmeans")


@dataclass(frozen=True)
class CubTraitsOptions:
    """The `eval.*` options of conf/eval/cub_traits.yaml (defaults and meanings there)."""

    train_split: str
    test_split: str
    attributes_root: str | None  # None: dataset.root
    k: list[int]
    tau: float
    certainty: list[int]
    pool: str
    patches: str
    methods: list[str]
    seeds: list[int]  # null in the YAML: [seed]
    n_samples: int
    kmeans_clusters: int
    n_random: int | None  # None: as many as the SAE has latents
    pca_both_signs: bool
    probe_l2: list[float]
    probe_folds: int
    probe_rounds: int
    probe_max_iter: int
    n_bootstrap: int
    ci_level: float
    seed: int
    block: int
    device: str

    def __post_init__(self) -> None:
        if self.seeds is None:
            object.__setattr__(self, "seeds", [self.seed])
        self.validate()

    def validate(self) -> None:
        check_pool(self.pool)
        check_patches(self.patches)
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise TraitsaeError(
                f"eval.methods must be a non-empty subset of {METHODS}, got {self.methods}."
            )
        if not 0.0 < self.tau <= 1.0:
            raise TraitsaeError(f"eval.tau must be in (0, 1], got {self.tau}.")
        bad = sorted(set(self.certainty) - {1, 2, 3, 4})
        if bad or not self.certainty:
            raise TraitsaeError(
                f"eval.certainty must list CUB certainty ids (1 not visible, 2 guessing, "
                f"3 probably, 4 definitely), got {self.certainty}."
            )
        seeds = self.seeds if isinstance(self.seeds, (list, tuple)) else [self.seeds]
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise TraitsaeError(
                f"eval.seeds must be a list of integers, e.g. eval.seeds=[0,1,2]; got "
                f"{self.seeds!r}."
            )
        object.__setattr__(self, "seeds", list(seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise TraitsaeError(
                f"eval.seeds must be a non-empty list of distinct integers, got {self.seeds}."
            )
        if self.probe_folds < 2 or self.probe_rounds < 0 or not self.probe_l2:
            raise TraitsaeError(
                "eval.probe_folds must be >= 2, eval.probe_rounds >= 0 and eval.probe_l2 a "
                f"non-empty list; got {self.probe_folds}, {self.probe_rounds}, {self.probe_l2}."
            )
