"""Training: `train(cfg)` fits one SAE, `train_group(jobs)` the jobs of a sweep on one stream.

- `config`: the training config checked up front;
- `recipe`: the run itself (data module, SAE module, fit, export);
- `trainer`: the Lightning side (trainer node, callbacks, loggers, console, CPU settings, fit);
- `resume`: exact resume (`ResumeState`, which checkpoint a run resumes from);
- grouped sweeps (`hydra/launcher=grouped`): `grouping` decides which jobs share a stream,
  `group_module` trains several SAE modules on each batch, `group_checkpoints` keeps each job's
  part of the state in its own job dir, `group_train` runs a group.
"""

from traitsae.training.group_train import train_group
from traitsae.training.recipe import train

__all__ = ["train", "train_group"]
