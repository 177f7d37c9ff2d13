"""Evaluate a trained SAE: `python evaluate.py eval=cub_traits run=<run dir>` (or sae=<sae.json>)."""

import sys

import hydra
from omegaconf import DictConfig

from traitsae.errors import exit_on_user_error


def sae_override_as_path(argv: list[str]) -> list[str]:
    """`sae=<sae.json>` is a file here, but `sae` is also train.py's config group in conf/.

    Hydra would look `sae=...` up in conf/sae/, so it is passed on as `sae_path=...`.
    """
    return [
        "sae_path=" + arg.removeprefix("sae=") if arg.startswith("sae=") else arg for arg in argv
    ]


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from traitsae.evaluation.registry import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    sys.argv = sae_override_as_path(sys.argv)
    main()
