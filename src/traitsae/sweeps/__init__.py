"""Grouped sweeps: the jobs of a `train.py -m` sweep that share their data train in one process.

`grouping` decides which jobs can share a stream, `module` trains several SAE modules on each
batch, `checkpoints` keeps each job's part of the state in its own job dir, `train` runs a group,
and the Hydra launcher (`hydra_plugins.traitsae_grouped_launcher`) ties it to `-m`.
"""
