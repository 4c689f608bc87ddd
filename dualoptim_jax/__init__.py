"""dualoptim_jax: DualOptim and DualOptim+ optimizers for JAX/Optax.

Shared-base + decoupled-delta optimizers for training against several
objectives, above all machine unlearning (Zhong et al., 2025).

The public API is what this module exports: the ready optimizers (aliases),
their ``scale_by_*`` transforms, what a new instance of the mechanism needs
(:class:`Moment`, :data:`Direction`, :data:`StoragePolicy`,
:func:`shared_base_moments`), state storage and the objective schedule. The
multi-device helpers are in :mod:`dualoptim_jax.sharding`, the 8-bit codec in
:mod:`dualoptim_jax.quantize`; the unlearning package
(:mod:`dualoptim_jax.unlearn`, extra ``[unlearn]``) and the models
(:mod:`dualoptim_jax.models`) are imported on their own.
"""

from dualoptim_jax.alias import (
  adamw_8bit,
  dualoptim,
  dualoptim_plus,
  dualoptim_plus_adafactor,
  dualoptim_plus_lion,
  dualoptim_plus_rmsprop,
  dualoptim_plus_sgd,
)
from dualoptim_jax.clipping import clip_by_global_norm
from dualoptim_jax.decoupled import DecoupledState, decoupled
from dualoptim_jax.hyperparams import STATIC_HYPERPARAMS, static_hyperparams
from dualoptim_jax.instances import (
  scale_by_dualoptim_plus_adafactor,
  scale_by_dualoptim_plus_lion,
  scale_by_dualoptim_plus_rmsprop,
  scale_by_dualoptim_plus_sgd,
)
from dualoptim_jax.moments import Direction, Moment, SharedBaseState, shared_base_moments
from dualoptim_jax.quantize import QuantizedArray, state_nbytes
from dualoptim_jax.schedule import alternating
from dualoptim_jax.storage import MomentCodec, StoragePolicy, float_storage, state_storage
from dualoptim_jax.transform import (
  ScaleByObjectiveLearningRateState,
  scale_by_adam_8bit,
  scale_by_dualoptim,
  scale_by_dualoptim_plus,
  scale_by_objective_learning_rate,
)

__version__ = "0.1.0"

__all__ = [
  "STATIC_HYPERPARAMS",
  "DecoupledState",
  "Direction",
  "Moment",
  "MomentCodec",
  "QuantizedArray",
  "ScaleByObjectiveLearningRateState",
  "SharedBaseState",
  "StoragePolicy",
  "adamw_8bit",
  "alternating",
  "clip_by_global_norm",
  "decoupled",
  "dualoptim",
  "dualoptim_plus",
  "dualoptim_plus_adafactor",
  "dualoptim_plus_lion",
  "dualoptim_plus_rmsprop",
  "dualoptim_plus_sgd",
  "float_storage",
  "scale_by_adam_8bit",
  "scale_by_dualoptim",
  "scale_by_dualoptim_plus",
  "scale_by_dualoptim_plus_adafactor",
  "scale_by_dualoptim_plus_lion",
  "scale_by_dualoptim_plus_rmsprop",
  "scale_by_dualoptim_plus_sgd",
  "scale_by_objective_learning_rate",
  "shared_base_moments",
  "state_nbytes",
  "state_storage",
  "static_hyperparams",
]
