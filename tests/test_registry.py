"""The evaluation registry and the options pattern: every conf/eval YAML names a registered
evaluation, an unknown name lists the known ones, and an options field missing from the YAML is
an error naming the file (the YAML is the only source of defaults)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.options import build_options
from traitsae.evaluation.registry import EVALUATIONS, get_evaluation

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval"
OPTIONS = {name: e.options for name, e in EVALUATIONS.items()}


def eval_group(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    return raw.get("eval", raw) if "# @package _global_" in path.read_text() else raw


def test_every_yaml_is_registered_and_every_evaluation_has_a_yaml():
    names = {eval_group(p)["name"] for p in CONF.glob("*.yaml")}
    assert names == set(EVALUATIONS)
    for p in CONF.glob("*.yaml"):
        assert "entry" not in eval_group(p)  # the registry replaced the string dispatch


def test_unknown_evaluation_lists_the_known_ones():
    with pytest.raises(TraitsaeError, match="cub_traits, dictionary, discovery"):
        get_evaluation("nope")


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_yaml_sets_every_option(name: str):
    """Each options field is a key of its YAML (or the top-level device/seed)."""
    group = eval_group(CONF / f"{name}.yaml")
    top = {"device", "seed"}
    missing = [f.name for f in fields(OPTIONS[name]) if f.name not in group and f.name not in top]
    assert not missing, f"conf/eval/{name}.yaml lacks {missing}"


def test_missing_option_names_the_yaml():
    @dataclass(frozen=True)
    class Needs:
        k: int
        tau: float

    cfg = OmegaConf.create({"eval": {"name": "demo", "k": 3}})
    with pytest.raises(TraitsaeError, match=r"conf/eval/demo.yaml sets no eval.tau"):
        build_options(Needs, cfg)
    assert build_options(
        Needs, OmegaConf.create({"eval": {"name": "d", "k": 3, "tau": 0.5}})
    ) == Needs(3, 0.5)
