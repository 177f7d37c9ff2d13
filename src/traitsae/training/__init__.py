"""Training: `train(cfg)` fits one SAE, `train_group(jobs)` the jobs of a sweep on one stream.

- `recipe`: the one recipe: `train_group` sets up, fits and exports; `train` is a group of one;
- `config`: the training config checked up front;
- `trainer`: the Lightning side (trainer node, callbacks, loggers, console, CPU settings, fit);
- `resume`: exact resume (`ResumeState`, which checkpoint a run resumes from);
- grouped sweeps (`hydra/launcher=grouped`): `grouping` decides which jobs share a stream,
  `group_module` trains several SAE modules on each batch, `group_checkpoints` keeps each job's
  part of the state in its own job dir.
"""

from traitsae.training.recipe import train, train_group

__all__ = ["train", "train_group"]
