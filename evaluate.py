"""Evaluate a trained SAE: `python evaluate.py eval=cub_traits run=<run dir>`."""

import hydra
from omegaconf import DictConfig

from traitsae.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from traitsae.evaluation.common import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    main()
