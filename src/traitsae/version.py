"""The package version, recorded in every store and exported SAE (`traitsae_version`)."""

__version__ = "0.1.0"
