"""Running on a cluster: signals in loader workers, Slurm jobs that the launchers watch, and the
sbatch script of a multi-node DDP run."""
