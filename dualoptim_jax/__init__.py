"""dualoptim_jax: DualOptim and DualOptim+ optimizers for JAX/Optax.

Shared-base + decoupled-delta optimizers for training against several
objectives, above all machine unlearning (Zhong et al., 2025).
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
from dualoptim_jax.decoupled import DecoupledState, decoupled
from dualoptim_jax.instances import (
  scale_by_dualoptim_plus_adafactor,
  scale_by_dualoptim_plus_lion,
  scale_by_dualoptim_plus_rmsprop,
  scale_by_dualoptim_plus_sgd,
)
from dualoptim_jax.moments import (
  Moment,
  MomentCodec,
  SharedBaseState,
  float_storage,
  shared_base_moments,
)
from dualoptim_jax.quantize import (
  QuantizedArray,
  dequantize_blockwise,
  dynamic_map,
  quantize_blockwise,
  state_nbytes,
)
from dualoptim_jax.schedule import alternating
from dualoptim_jax.storage import STATIC_HYPERPARAMS, state_storage, static_hyperparams
from dualoptim_jax.transform import (
  ScaleByObjectiveLearningRateState,
  scale_by_adam_8bit,
  scale_by_dualoptim,
  scale_by_dualoptim_plus,
  scale_by_objective_learning_rate,
)

__version__ = "0.1.0"

__all__ = [
  "DecoupledState",
  "Moment",
  "MomentCodec",
  "QuantizedArray",
  "STATIC_HYPERPARAMS",
  "ScaleByObjectiveLearningRateState",
  "SharedBaseState",
  "adamw_8bit",
  "alternating",
  "decoupled",
  "dequantize_blockwise",
  "dualoptim",
  "dualoptim_plus",
  "dualoptim_plus_adafactor",
  "dualoptim_plus_lion",
  "dualoptim_plus_rmsprop",
  "dualoptim_plus_sgd",
  "dynamic_map",
  "float_storage",
  "quantize_blockwise",
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
