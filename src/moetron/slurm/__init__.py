"""Slurm jobs from the moetron config: `python -m moetron.slurm render|submit [hydra overrides]`.

`load(overrides)` composes hydra_conf/slurm.yaml (the training config plus a `cluster`), `check_cluster_layout`
proves the job fits the cluster (nodes x ranks per node = PP x DP x TP, then the trainer's own layout check,
config/layout.py), and `render` fills a template of templates/ (srun: one task per rank; torchrun: one per node).
"""

from moetron.slurm.render import TEMPLATES, check_cluster_layout, load, render, trainer_overrides

__all__ = ["TEMPLATES", "check_cluster_layout", "load", "render", "trainer_overrides"]
