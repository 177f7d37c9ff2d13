"""Extract ViT activations into an HDF5 store: python extract.py backbone=tiny dataset=synthetic"""

import sys

import hydra
from omegaconf import DictConfig

from traitsae.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf", config_name="extract")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from traitsae.extraction import Interrupted, extract  # here so that --help stays fast

    try:
        extract(cfg)
    except Interrupted as stop:  # during the writing: says how far the store got
        print(f"interrupted: {stop}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # before or after it: nothing half-written
        print(
            "interrupted: stopped by Ctrl-C; run the same command again to go on.", file=sys.stderr
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
