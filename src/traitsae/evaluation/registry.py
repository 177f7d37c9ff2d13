"""Every evaluation by its `eval.name`: the one table `evaluate.py` dispatches through.

A new evaluation is a folder beside the others (its `run(cfg)` entry point and its conf/eval
YAML) and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from traitsae.errors import TraitsaeError
from traitsae.evaluation.bench import bench
from traitsae.evaluation.causal import splice, steer
from traitsae.evaluation.causal.steer_options import SteerOptions
from traitsae.evaluation.discovery import discovery
from traitsae.evaluation.keys import audit, key
from traitsae.evaluation.latents import encode, features
from traitsae.evaluation.quality import dictionary, health, probe
from traitsae.evaluation.segments import segments
from traitsae.evaluation.specimens import traits_table
from traitsae.evaluation.traits import cub_traits
from traitsae.evaluation.traits.options import CubTraitsOptions


@dataclass(frozen=True)
class Evaluation:
    name: str
    run: Callable[[DictConfig], Any]  # Hydra entry: the composed config -> the task's result
    options: type  # its frozen options dataclass, built from cfg.eval by core.options


EVALUATIONS: dict[str, Evaluation] = {
    e.name: e
    for e in (
        Evaluation("cub_traits", cub_traits.run, CubTraitsOptions),
        Evaluation("discovery", discovery.run, discovery.DiscoveryOptions),
        Evaluation("segments", segments.run, segments.SegmentsOptions),
        Evaluation("splice", splice.run, splice.SpliceOptions),
        Evaluation("steer", steer.run, SteerOptions),
        Evaluation("health", health.run, health.HealthOptions),
        Evaluation("dictionary", dictionary.run, dictionary.DictionaryOptions),
        Evaluation("probe", probe.run, probe.ProbeDeltaOptions),
        Evaluation("features", features.run, features.FeaturesOptions),
        Evaluation("encode", encode.run, encode.EncodeOptions),
        Evaluation("key", key.run, key.KeyOptions),
        Evaluation("audit", audit.run, audit.AuditOptions),
        Evaluation("bench", bench.run, bench.BenchOptions),
        Evaluation("traits_table", traits_table.run, traits_table.TraitsTableOptions),
    )
}


def get_evaluation(name: str) -> Evaluation:
    """The evaluation registered as `name`; an unknown name lists the known ones."""
    if name not in EVALUATIONS:
        raise TraitsaeError(
            f"eval.name={name!r} is not a registered evaluation; the known ones are "
            f"{', '.join(sorted(EVALUATIONS))} (pass eval=<name>, e.g. eval=cub_traits)."
        )
    return EVALUATIONS[name]


def run_evaluation(cfg: DictConfig) -> Any:
    """Run the evaluation named by `cfg.eval.name` (conf/eval/<name>.yaml) on `cfg`."""
    return get_evaluation(str(cfg.eval.name)).run(cfg)
