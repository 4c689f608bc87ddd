"""Unlearning of language models with any optax transform.

Data flows one way: :mod:`.data` (and :mod:`.synthetic`) -> :mod:`.losses` -> :mod:`.trainer` ->
:mod:`.metrics` -> :mod:`.report`; :mod:`.cli` wires them into the main job
(``dualoptim-unlearn``).
"""

from dualoptim_jax.unlearn.data import QAItem, UnlearningData, load_real_world, load_tofu
from dualoptim_jax.unlearn.losses import UnlearningLoss, make_objective
from dualoptim_jax.unlearn.metrics import evaluate, register_metric
from dualoptim_jax.unlearn.report import write_report
from dualoptim_jax.unlearn.synthetic import synthetic_tofu
from dualoptim_jax.unlearn.trainer import PRESETS, Unlearner, finetune, make_optimizer, unlearn

__all__ = [
  "PRESETS",
  "QAItem",
  "Unlearner",
  "UnlearningData",
  "UnlearningLoss",
  "evaluate",
  "finetune",
  "load_real_world",
  "load_tofu",
  "make_objective",
  "make_optimizer",
  "register_metric",
  "synthetic_tofu",
  "unlearn",
  "write_report",
]
