"""traitsae: sparse autoencoders on vision-transformer activations, for trait discovery."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from traitsae.version import __version__

if TYPE_CHECKING:
    from traitsae.sae.export import load_sae


def __getattr__(name: str) -> Any:
    # Lazy: `import traitsae` must stay cheap (torch/timm imports cost seconds).
    if name == "load_sae":
        from traitsae.sae.export import load_sae

        return load_sae
    raise AttributeError(name)


__all__ = ["__version__", "load_sae"]
