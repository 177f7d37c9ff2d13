"""Explore an SAE in the browser: `python explore.py run=<run dir> dataset=<name> split=<split>`."""

import sys

import hydra
from omegaconf import DictConfig

from evaluate import sae_override_as_path
from traitsae.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf", config_name="explore")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from traitsae.explore.launch import explore

    explore(cfg)


if __name__ == "__main__":
    sys.argv = sae_override_as_path(sys.argv)
    main()
