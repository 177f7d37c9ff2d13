"""Train an SAE on stored activations: `python train.py sae=topk backbone=dinov2 dataset=cub`."""

import hydra
from omegaconf import DictConfig

from traitsae.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from traitsae.training import train  # lazy: keeps `--help` and config errors fast

    train(cfg)


if __name__ == "__main__":
    main()
