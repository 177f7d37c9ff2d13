"""The grouped launcher plugin (`hydra/launcher=grouped`), where Hydra looks for it."""
