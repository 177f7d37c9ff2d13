"""Where things live on disk: the store path convention shared by extract, train and evaluate,
and the one message for a store that is not there (yet)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig


def store_path(activations_dir: str | Path, dataset: str, split: str, backbone: str) -> Path:
    """`${paths.activations_dir}/${dataset.name}/${split}/${backbone.name}.h5`."""
    return Path(activations_dir) / dataset / split / f"{backbone}.h5"


def store_path_from_cfg(
    cfg: DictConfig, split: str | None = None, backbone: str | None = None
) -> Path:
    return store_path(
        cfg.paths.activations_dir,
        cfg.dataset.name,
        split or cfg.split,
        backbone or cfg.backbone.name,
    )


def extract_command(backbone: str, dataset: str, split: str, activations_dir: str | Path) -> str:
    """The exact command that writes (or finishes) a store of the path convention."""
    return (
        f"python extract.py backbone={backbone} dataset={dataset} split={split} "
        f"paths.activations_dir={activations_dir}"
    )


def missing_store_message(
    paths: Sequence[str | Path], commands: Sequence[str] | None = None, hint: str = ""
) -> str:
    """The whole error for stores that do not exist or are incomplete: each path, how far an
    incomplete one got, and the extract.py command that makes or finishes it (`commands[i]`
    for `paths[i]`); `hint` (another way out) ends the message."""
    from traitsae.data.store import stored_rows, tmp_path

    states, incomplete = [], []
    for path in map(Path, paths):
        tmp = tmp_path(path)
        if tmp.is_file():
            done, total = stored_rows(tmp)
            got = f"the first {done} of {total} images" if total is not None else "no image yet"
            states.append(f"{path} is incomplete (extraction stopped; {tmp} holds {got})")
            incomplete.append(path)
        else:
            states.append(f"{path} does not exist")
    one = len(states) == 1
    verb = "finish" if len(incomplete) == len(states) else "make"
    message = f"activation store{'' if one else 's'} {'; '.join(states)}."
    if commands:
        lines = "\n".join(f"  {cmd}" for cmd in commands)
        message += f" {verb.capitalize()} {'it' if one else 'them'} with:\n{lines}"
    else:
        message += (
            f" Write {'it' if one else 'them'} with extract.py (rerunning the command that "
            "stopped finishes an incomplete store)."
        )
    return f"{message}\n{hint}" if hint else message


def hydra_output_dir() -> Path:
    """Hydra's output dir for this job (run dir or sweep subdir); cwd is never changed."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
