"""Train runs to evaluate: one run dir, or every job of a sweep dir, and their short labels."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from traitsae.errors import TraitsaeError
from traitsae.sae.formats import is_checkpoint


def find_runs(target: str | Path) -> list[Path]:
    """The run dirs (or sae.json files) to measure: one (another library's checkpoint too), or
    every sweep job holding an sae.json."""
    target = Path(target)
    if target.is_file() or (target / "sae.json").is_file() or is_checkpoint(target):
        return [target]
    if not target.is_dir():
        raise TraitsaeError(f"{target} is neither a train run dir, a sweep dir nor an sae.json.")
    runs = [p.parent for p in target.glob("*/sae.json")]
    if not runs:
        raise TraitsaeError(
            f"{target} holds no sae.json, and none of its subdirectories do: pass a finished "
            "train.py run dir, or a multirun sweep dir whose jobs finished (each writes sae.json)."
        )
    # Sweep jobs are numbered 0, 1, ..., 10: sort numerically where possible.
    return sorted(
        runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def run_overrides(run_dir: Path) -> dict[str, str]:
    """A run's Hydra overrides (from .hydra/overrides.yaml) as key -> value, hydra.* left out."""
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = (str(o).split("=", 1) for o in OmegaConf.load(path) if not str(o).startswith("hydra."))
    return {p[0].lstrip("+~"): p[1] if len(p) > 1 else "" for p in pairs}


def short_names(keys: list[str]) -> dict[str, str]:
    """key -> its last dotted part (`sae.k` -> `k`), or more parts where that is ambiguous."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[-depth:])
            clash = [k for k in keys if k != key and ".".join(k.split(".")[-depth:]) == name]
            if not clash:
                break
        names[key] = name
    return names


def swept_overrides(runs: list[Path]) -> list[dict[str, str]]:
    """Per run: the overrides whose value differs across `runs`, under short names. A single
    run (nothing differs) keeps all its overrides."""
    overrides = [run_overrides(r) for r in runs]
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    if len(runs) > 1:
        keys = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    names = short_names(keys)
    return [{names[k]: o.get(k, "") for k in keys} for o in overrides]


def run_labels(runs: list[Path]) -> list[str]:
    """Short labels that tell the runs apart (`k=16 sae=topk`), else their directory names."""
    labels = [" ".join(f"{k}={v}" for k, v in o.items()) for o in swept_overrides(runs)]
    return [
        label or (r if r.is_dir() else r.parent).name for label, r in zip(labels, runs, strict=True)
    ]
