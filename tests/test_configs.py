"""Every option of every config group composes and resolves, for each entry point that uses the
group (in-process Hydra compose: no training, no model weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict

from traitsae.evaluation.registry import get_evaluation

CONF = Path(__file__).resolve().parents[1] / "conf"
ENTRY_POINTS = ("extract", "train", "evaluate")


def groups_of(entry: str) -> list[str]:
    """The config groups in conf/<entry>.yaml's defaults list (and hydra/launcher)."""
    defaults = yaml.safe_load((CONF / f"{entry}.yaml").read_text())["defaults"]
    groups = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    return [g for g in groups if g != "hydra"] + ["hydra/launcher"]


CASES = [
    (entry, group, option.stem)
    for entry in ENTRY_POINTS
    for group in groups_of(entry)
    for option in sorted((CONF / group).glob("*.yaml"))
]


def test_every_group_is_covered() -> None:
    used = {group for _, group, _ in CASES}
    on_disk = {p.parent.relative_to(CONF).as_posix() for p in CONF.glob("*/**/*.yaml")}
    assert on_disk - {"hydra"} <= used  # no group that no entry point composes


@pytest.mark.parametrize(("entry", "group", "option"), CASES)
def test_option_composes_and_resolves(entry: str, group: str, option: str, tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            entry, overrides=[f"{group}={option}", f"hydra.run.dir={tmp_path}"],
            return_hydra_config=True,
        )  # fmt: skip
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    job = {  # every interpolation resolves
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra"
    }
    job["launcher"] = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    for target in _targets(job):  # every component a config names exists
        assert isinstance(get_class(target), type)
    if entry == "evaluate" and group == "eval":
        assert callable(get_evaluation(job["eval"]["name"]).run)  # was: eval.entry


def _targets(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in _targets(value)]
    return []


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [(["sae=topk"], 2e-3), (["sae=matryoshka"], 2e-3), (["sae=relu"], 2e-3),
     (["sae=jumprelu"], 2e-3), (["sae=relu", "optim.lr=0.01"], 0.01)],
)  # fmt: skip
def test_every_variant_trains_at_the_default_lr_and_the_command_line_wins(
    overrides: list[str], lr: float
) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=overrides)
    assert cfg.optim.lr == pytest.approx(lr)
