"""Unlearning and fine-tuning loops that drive any optax transform on a Flax NNX language model.

The model is any ``nnx.Module`` whose ``__call__(input_ids)`` returns logits ``(B, T, V)``. Its
``nnx.Param`` variables are trained functionally: they are split off once, updated by a jitted
step that donates parameters and optimizer state, and merged into a new module on request, so the
module passed in is never modified (the main job reuses one fine-tuned model for every run).

Modes (DualOptim, Zhong et al. 2025, Sec. 4):

* ``joint`` -- every update descends ``c_f L_f(forget batch) + c_r L_r(retain batch)``; the
  transform's ``update`` is called without ``objective``.
* ``alternate`` -- ``F_f`` forget updates on ``c_f L_f``, then ``F_r`` retain updates on
  ``c_r L_r``, repeated (:func:`dualoptim_jax.alternating`; defaults 1 and 5); update ``n`` passes
  ``objective=k`` (0 forget, 1 retain) to ``tx.update``, which is how DualOptim keeps per-objective
  state and per-objective learning rates (``lr_scales``). Plain optax transforms ignore it.

The six optimizer settings of the paper are the rows of :data:`PRESETS`; :func:`make_optimizer`
builds one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gc
import inspect
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import dualoptim_jax as dj
from dualoptim_jax.unlearn import memory
from dualoptim_jax.unlearn.jsonable import float_or_nan
from dualoptim_jax.unlearn.losses import UnlearningLoss, masked_nll
from dualoptim_jax.unlearn.paths import path_name
from dualoptim_jax.unlearn.placement import Placement

__all__ = [
  "Preset",
  "PRESETS",
  "decays",
  "full_precision",
  "update_stability",
  "decay_mask",
  "learning_rate_schedule",
  "make_optimizer",
  "optimizer_config",
  "step_size",
  "LossHistory",
  "Unlearner",
  "UnlearnResult",
  "CheckpointedRun",
  "run_config",
  "unlearn",
  "FinetuneResult",
  "finetune",
]

Batch = Mapping[str, Any]
FORGET, RETAIN = 0, 1


# ------------------------------------------------------------------------------------------------
# Optimizer presets.


@dataclasses.dataclass(frozen=True)
class Preset:
  """One optimizer setting of the paper's Table 1.

  Attributes:
    mode: ``"joint"`` or ``"alternate"``.
    optimizer: ``"adamw"`` (one shared Adam state), ``"dualoptim"`` or ``"dualoptim_plus"``.
    state_bits: 32, or 8 for block-wise quantized optimizer states.
    description: one line for docs and reports.
  """

  mode: str
  optimizer: str
  state_bits: int
  description: str


PRESETS: dict[str, Preset] = {
  "joint": Preset("joint", "adamw", 32, "AdamW on c_f L_f + c_r L_r, one update per step"),
  "alternate": Preset(
    "alternate",
    "adamw",
    32,
    "AdamW with one shared state, alternating F_f forget / F_r retain updates",
  ),
  "dualoptim": Preset(
    "alternate",
    "dualoptim",
    32,
    "DualOptim: a separate Adam state per objective, alternating updates",
  ),
  "dualoptim_8bit": Preset("alternate", "dualoptim", 8, "DualOptim with 8-bit optimizer states"),
  "dualoptim_plus": Preset(
    "alternate",
    "dualoptim_plus",
    32,
    "DualOptim+: shared base moments + per-objective deltas, alternating",
  ),
  "dualoptim_plus_8bit": Preset(
    "alternate", "dualoptim_plus", 8, "DualOptim+ with 8-bit optimizer states"
  ),
}


def full_precision(preset: str) -> str:
  """The 32-bit preset of ``preset``'s method: ``dualoptim`` for ``dualoptim_8bit``, itself for a
  32-bit preset."""
  spec = PRESETS[preset]
  key = (spec.mode, spec.optimizer, 32)
  return next(n for n, p in PRESETS.items() if (p.mode, p.optimizer, p.state_bits) == key)


def decays(name: str) -> bool:
  """Whether the recipe decays the parameter named ``name`` (:func:`~dualoptim_jax.unlearn.paths.
  path_name`): not biases and not normalisation scales, as the Hugging Face ``Trainer`` decides
  (``get_decay_parameter_names``: no ``bias``, no ``*norm*`` module)."""
  parts = name.lower().split(".")
  return parts[-1] != "bias" and not any("norm" in part for part in parts)


def decay_mask(params: Any) -> Any:
  """The weight-decay mask of ``params``: :func:`decays` of each leaf's name."""
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_name(path)), params)


def learning_rate_schedule(
  learning_rate: optax.ScalarOrSchedule, warmup_steps: int = 0, decay_steps: int | None = None
) -> optax.ScalarOrSchedule:
  """The Hugging Face ``Trainer``'s linear schedule: 0 -> ``learning_rate`` over ``warmup_steps``,
  then linearly to 0 at update ``decay_steps``; a constant when ``decay_steps`` is None (and a
  schedule passed in is kept as it is)."""
  if callable(learning_rate) or decay_steps is None:
    return learning_rate
  if warmup_steps < 0 or decay_steps <= warmup_steps:
    raise ValueError(f"need 0 <= warmup_steps < decay_steps, got {warmup_steps}, {decay_steps}")
  decay = optax.linear_schedule(learning_rate, 0.0, decay_steps - warmup_steps)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(
  preset: str,
  learning_rate: optax.ScalarOrSchedule,
  *,
  forget_lr_scale: float = 1.0,
  retain_lr_scale: float = 1.0,
  weight_decay: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  max_grad_norm: float = 1.0,
  warmup_steps: int = 0,
  decay_steps: int | None = None,
  careful_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """The whole per-update transform of a :data:`PRESETS` entry under one recipe.

  Every preset is ``clip_by_global_norm(max_grad_norm)`` (skipped at 0) -> its moments with
  ``(b1, b2, eps)`` (Adam for ``joint`` / ``alternate``, one Adam state per objective for
  ``dualoptim``, shared base + deltas with base decays ``(b1, b2)`` for ``dualoptim_plus``) ->
  decoupled weight decay on the parameters :func:`decays` names (not biases, not norm scales) ->
  the learning rate, linear warm-up and decay (:func:`learning_rate_schedule`) times
  ``lr_scales[k]`` for objective k. The defaults are the authors' DualOptim+ release
  (``forget.py``: Adam ``(0.9, 0.95)`` for every method) run by the Hugging Face ``Trainer``
  (clipping at 1.0, linear decay, no decay on biases and norms). So, fed one objective's gradient
  stream, ``joint``, ``alternate`` and ``dualoptim`` make the same updates (tested).

  Args:
    preset: a key of :data:`PRESETS`.
    learning_rate: base learning rate ``eta`` (float or schedule of the update count).
    forget_lr_scale, retain_lr_scale: alternating presets update objective k with
      ``eta * scale_k``; ``joint`` has one learning rate and ignores them.
    weight_decay: decoupled weight decay.
    b1, b2, eps: Adam's decays and denominator term (every preset).
    max_grad_norm: global-norm clipping of each update's gradient; 0 turns it off.
    warmup_steps, decay_steps: the linear schedule; ``decay_steps=None`` keeps ``eta`` constant
      (:func:`unlearn` sets it to the run's number of updates).
    careful_rounding: DualOptim+ only: the rounding-careful evaluation of the combined second
      moment (``dualoptim_jax.dualoptim_plus(careful_rounding=True)``).
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
  if max_grad_norm < 0:
    raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {max_grad_norm}")
  spec = PRESETS[preset]
  lr = learning_rate_schedule(learning_rate, warmup_steps, decay_steps)
  scales = (float(forget_lr_scale), float(retain_lr_scale))
  clip = [dj.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
  if spec.optimizer == "adamw":
    step = (
      optax.scale_by_learning_rate(lr)
      if spec.mode == "joint"
      else dj.scale_by_objective_learning_rate(lr, lr_scales=scales, num_objectives=2)
    )
    return optax.chain(
      *clip,
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, decay_mask),
      step,
    )
  kwargs: dict[str, Any] = dict(
    weight_decay=weight_decay,
    mask=decay_mask,
    num_objectives=2,
    lr_scales=scales,
    state_bits=spec.state_bits,
  )
  if spec.optimizer == "dualoptim":
    moments = dj.dualoptim(lr, b1, b2, eps, **kwargs)
  else:
    if careful_rounding:  # passed only when asked, so the option needs a build that has it
      kwargs["careful_rounding"] = True
    moments = dj.dualoptim_plus(lr, b1, b2, b1, b2, eps, **kwargs)
  return optax.chain(*clip, moments)


def step_size(config: Mapping[str, Any], update: int, objective: int | None) -> float:
  """The learning rate update ``update`` of objective ``objective`` runs with under
  :func:`make_optimizer` ``**config`` (:func:`optimizer_config`): what stability is measured in."""
  lr = learning_rate_schedule(
    config["learning_rate"], config["warmup_steps"], config["decay_steps"]
  )
  value = float(lr(update) if callable(lr) else lr)  # pyright: ignore[reportArgumentType]
  if PRESETS[config["preset"]].mode == "joint" or objective is None:
    return value
  return value * float(config["forget_lr_scale" if objective == FORGET else "retain_lr_scale"])


def optimizer_config(preset: str, learning_rate: Any, **settings: Any) -> dict[str, Any]:
  """Everything :func:`make_optimizer` builds from these arguments, defaults filled in, as data.

  ``{"preset", "optimizer", "state_bits", "learning_rate", ...}``: what a report records and a
  checkpoint's fingerprint compares. Read off :func:`make_optimizer`'s signature, so a setting
  added there appears here without being named twice.
  """
  bound = inspect.signature(make_optimizer).bind(preset, learning_rate, **settings)
  bound.apply_defaults()
  spec = PRESETS[preset]
  return {"optimizer": spec.optimizer, "state_bits": spec.state_bits, **bound.arguments}


_cached_optimizer = functools.lru_cache(maxsize=32)(make_optimizer)


# ------------------------------------------------------------------------------------------------
# The functional core: params split off an NNX module, a jitted step per loss.

# XLA:CPU inserts defensive copies of donated buffers that region-analysis copy insertion proves
# unneeded: on SmolLM2-135M's DualOptim+ step it cuts the temporaries from 0.71 to 0.55 GiB
# (benchmarks/README.md, "The real-LM pipeline"). Other backends compile with their defaults.
_CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def _compiler_options() -> dict[str, Any] | None:
  return _CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


def update_stability(updates: Any, step_size: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(max |u|, number of elements with |u| > 10 step_size)`` over every leaf of ``updates``.

  One variadic reduction per leaf computes both: with two separate reductions XLA:CPU kept
  ``|u|`` as a parameter-sized array beside the updates (temporaries of SmolLM2's 2-block
  DualOptim+ step: 4.6x the parameters' bytes, 3.0x this way; benchmarks/README.md).
  """

  def leaf(u: jax.Array) -> tuple[jax.Array, jax.Array]:
    magnitude = jnp.abs(u.astype(jnp.float32)).ravel()
    over = (magnitude > 10 * step_size).astype(jnp.int32)
    both = lambda x, y: (jnp.maximum(x[0], y[0]), x[1] + y[1])
    return jax.lax.reduce((magnitude, over), (jnp.float32(0), jnp.int32(0)), both, (0,))

  pairs = [leaf(u) for u in jax.tree.leaves(updates)]
  return jnp.max(jnp.stack([p[0] for p in pairs])), jnp.sum(jnp.stack([p[1] for p in pairs]))


def _compiled_update(
  graphdef: Any,
  tx: optax.GradientTransformationExtraArgs,
  loss: Callable,
  tx_kwargs: tuple[tuple[str, Any], ...],
  placement: Placement | None,
) -> Callable:
  """The jitted update ``(params, opt_state, rest, ref_params, batches, step_size) -> (params,
  opt_state, aux, stats)``; ``stats = (max |update|, number of elements with |update| >
  10 step_size)``, the stability record (:class:`Unlearner`).

  The arguments name the program (:func:`_program`): ``loss(apply_fn, ref_apply_fn, batches) ->
  (loss, aux)`` must be hashable (a module-level function or a frozen dataclass); ``placement`` is
  None on one device.
  """

  def apply_fn(params, rest):
    return lambda ids: nnx.merge(graphdef, params, rest)(ids)

  def update(params, opt_state, rest, ref_params, batches, step_size):
    def total(p):
      ref_fn = None if ref_params is None else apply_fn(ref_params, rest)
      return loss(apply_fn(p, rest), ref_fn, batches)

    (_, aux), grads = jax.value_and_grad(total, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, **dict(tx_kwargs))
    params = optax.apply_updates(params, updates)
    if placement is not None:
      params, opt_state = placement.constrain(params, opt_state)
    return params, opt_state, aux, update_stability(updates, step_size)

  return jax.jit(update, donate_argnums=(0, 1), compiler_options=_compiler_options())


_PROGRAMS: dict[tuple[Any, ...], Any] = {}
# A compiled step is large, and JAX's own caches keep a jitted function's lowering and executables
# for as long as the function lives (the 8-bit DualOptim+ step of SmolLM2-135M: 1.7 GiB of
# executable plus 1.8 GiB of lowering; docs/smollm2.md). So the bound holds the jitted functions
# too, and a program it drops is freed. A sweep makes one program per (preset, swept value,
# objective) and a run needs at most two (forget and retain), so two are kept: a run does not hold
# the previous run's programs too (the default SmolLM2 job held 8-bit DualOptim's two, 0.8 GiB,
# through the float32 DualOptim+ run, its peak). Dropped ones come back from JAX's persistent
# compilation cache (the job's default) when a later run needs them (seed-major order: the next
# seed). Least recently used goes first.
_MAX_PROGRAMS = 2


def _program(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
  """The program kept under ``key``, made by ``make()`` the first time (and after eviction)."""
  return _programs([(key, make)])[0]


def _programs(
  entries: Sequence[tuple[tuple[Any, ...], Callable[[], Any]]],
  finish: Callable[[Any], Any] | None = None,
) -> list[Any]:
  """The programs kept under the entries' keys; the missing ones are made by their ``make()``,
  then, with ``finish``, turned into what is kept by ``finish(made)`` in threads, concurrently.

  ``Lowered.compile()`` releases the GIL and XLA:CPU leaves cores idle while it compiles, so
  compiles overlap: the 8-bit DualOptim+ forget and retain steps of SmolLM2-135M took 57.8 s
  one after the other and 41.0 s together on a 2-core VM. Lowering traces Python: it stays in
  this thread.
  """
  keys = [key for key, _ in entries]
  missing = {key: make for key, make in entries if key not in _PROGRAMS}
  for key in keys:
    if key in _PROGRAMS:
      _PROGRAMS[key] = _PROGRAMS.pop(key)  # now the most recently used
  if missing:
    others = [key for key in _PROGRAMS if key not in missing and key not in keys]
    while others and len(_PROGRAMS) + len(missing) > _MAX_PROGRAMS:
      _PROGRAMS.pop(others.pop(0))
    # Compiling takes gigabytes in small blocks that glibc keeps after they are freed: give
    # back what earlier steps left before, and the compiler's own after. 8-bit DualOptim+ of
    # SmolLM2: resident after its first step 8.1 -> 6.4 GiB, peak over three steps 9.3 -> 7.7.
    gc.collect()
    memory.release_freed_memory()
    made = [make() for make in missing.values()]
    if finish is not None and len(made) > 1:
      with concurrent.futures.ThreadPoolExecutor(len(made)) as pool:
        made = list(pool.map(finish, made))
    elif finish is not None:
      made = [finish(made[0])]
    _PROGRAMS.update(zip(missing, made))
    memory.release_freed_memory()
  return [_PROGRAMS[key] for key in keys]


def _executables(steps: Sequence[tuple[tuple[Any, ...], tuple[Any, ...]]]) -> list[Any]:
  """The steps :func:`_compiled_update` of each ``(program, args)`` (its arguments), compiled
  for the shapes of ``args`` (arrays or ``jax.ShapeDtypeStruct``s); the missing ones compile
  concurrently.

  One compile per distinct program and shapes, shared by every run (preset, seed) that needs
  it; compiling from shapes lets a run compile before it allocates its optimizer state. Only the
  executable is kept: the jitted function, and with it JAX's lowering, goes once it is compiled.
  """

  def entry(program: tuple[Any, ...], args: tuple[Any, ...]):
    leaves, treedef = jax.tree.flatten(args)
    shapes = tuple((tuple(np.shape(x)), np.result_type(x.dtype)) for x in leaves)

    def lower():
      abstract = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
      return _compiled_update(*program).lower(*jax.tree.unflatten(treedef, abstract))

    return (program, treedef, shapes), lower

  return _programs([entry(*step) for step in steps], finish=lambda lowered: lowered.compile())


class _Core:
  """Parameters and optimizer state of one module under one transform.

  With a ``mesh`` (:func:`dualoptim_jax.unlearn.placement.make_mesh`) the parameters are sharded by their
  annotations, the optimizer state like its parameters and batch rows over the devices; without
  one everything stays on the default device. The step is the same code either way.
  """

  def __init__(
    self,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: Any = None,
    *,
    donate_model: bool = False,
  ):
    self.placement = Placement(mesh)
    self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if donate_model and mesh is None:
      # The model's own buffers become the trainer's (the first step donates them): one copy
      # of the model less. The caller must not use ``model`` afterwards.
      self.source_params, self.params = None, params
    else:
      self.source_params = params  # the caller's arrays: never donated
      self.params = self.placement.params(params)  # own buffers: every step donates them
    self.rest = self.placement.replicate(rest)
    self.tx = (
      tx
      if isinstance(tx, optax.GradientTransformationExtraArgs)
      else optax.with_extra_args_support(tx)
    )
    # Made at the first step, after that step's program is compiled, so that XLA's compile-time
    # memory and the optimizer state are not held at the same time (or on first access).
    self._opt_state: Any = None

  @property
  def opt_state(self) -> Any:
    if self._opt_state is None:
      self._opt_state = self.placement.init(self.tx, self.params)
    return self._opt_state

  @opt_state.setter
  def opt_state(self, value: Any) -> None:
    self._opt_state = value

  def step(
    self,
    loss: Callable,
    tx_kwargs: tuple[tuple[str, Any], ...],
    ref_params: Any,
    batches: Any,
    step_size: float = math.nan,
  ) -> tuple[Any, tuple[jax.Array, jax.Array]]:
    """One update on ``loss`` (see :func:`_compiled_update`); returns its aux and stats."""
    mesh = self.placement.mesh
    batches, size = self.placement.batch(batches), jnp.float32(step_size)
    if mesh is not None:  # sharded layouts: jit places and compiles
      # The state first: making it completes the placement, which keys the program (its hash
      # must not change while it is a key).
      state = self.opt_state
      program = (self.graphdef, self.tx, loss, tx_kwargs, self.placement)
      update = _program(program, lambda: _compiled_update(*program))
      self.params, self.opt_state, aux, stats = update(
        self.params, state, self.rest, ref_params, batches, size
      )
      return aux, stats
    [run] = self._executables([(loss, tx_kwargs, batches)], ref_params, size)
    self.params, self._opt_state, aux, stats = run(
      self.params, self.opt_state, self.rest, ref_params, batches, size
    )
    return aux, stats

  def _executables(self, steps: Sequence[tuple[Any, ...]], ref_params: Any, size: Any) -> list:
    # Compiled first, the state allocated after: XLA's compile-time memory and the optimizer
    # state are not held at the same time.
    state = self._opt_state
    if state is None:
      state = jax.eval_shape(self.tx.init, self.params)
    return _executables(
      [
        (
          (self.graphdef, self.tx, loss, tx_kwargs, None),
          (self.params, state, self.rest, ref_params, batches, size),
        )
        for loss, tx_kwargs, batches in steps
      ]
    )

  def prepare(self, steps: Sequence[tuple[Any, ...]], ref_params: Any) -> None:
    """Compiles the programs of ``steps`` (``(loss, tx_kwargs, batches)``) now, concurrently;
    on a mesh jit compiles at the first call instead."""
    if self.placement.mesh is None:
      self._executables(steps, ref_params, np.float32(0))

  def export(self) -> nnx.Module:
    """A new module holding a copy of the current parameters."""
    return nnx.merge(self.graphdef, jax.tree.map(jnp.copy, self.params), self.rest)

  def release(self) -> nnx.Module:
    """A module holding the current parameters themselves (no copy); the core is done after."""
    model = nnx.merge(self.graphdef, self.params, self.rest)
    self.params = self._opt_state = None
    return model


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
  return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------------
# Unlearning.


class LossHistory(NamedTuple):
  """Per-update losses (unweighted); ``nan`` where a loss was not computed.

  ``objective`` is 0 (forget update), 1 (retain update) or -1 (joint update). Built from rows
  ``(update, objective, forget, retain)`` by :meth:`from_rows` only; :meth:`rows` gives them back.
  """

  update: np.ndarray  # int64 (N,)
  objective: np.ndarray  # int64 (N,)
  forget: np.ndarray  # float64 (N,)
  retain: np.ndarray  # float64 (N,)

  @classmethod
  def from_rows(cls, rows: Sequence[Sequence[Any]]) -> LossHistory:
    """From ``[update, objective, forget, retain]`` rows; a ``None`` loss (JSON) reads as NaN."""
    cols = list(zip(*rows)) if rows else [(), (), (), ()]
    losses = lambda col: np.asarray([float_or_nan(v) for v in col], np.float64)
    return cls(
      np.asarray(cols[0], np.int64), np.asarray(cols[1], np.int64), losses(cols[2]), losses(cols[3])
    )

  def rows(self) -> list[list[Any]]:
    """``[update, objective, forget, retain]`` per update (NaN where not computed)."""
    return [
      [int(u), int(k), float(f), float(r)]
      for u, k, f, r in zip(self.update, self.objective, self.forget, self.retain)
    ]

  def series(self) -> dict[str, list[tuple[int, float]]]:
    """``{"forget": [(update, loss), ...], "retain": [...]}`` without the ``nan`` entries."""
    out = {}
    for name in ("forget", "retain"):
      values = getattr(self, name)
      keep = ~np.isnan(values)
      out[name] = [(int(u), float(v)) for u, v in zip(self.update[keep], values[keep])]
    return out


@dataclasses.dataclass(frozen=True)
class _ObjectiveLoss:
  """The loss of one kind of update: ``which`` = 0 (forget), 1 (retain) or None (joint, with
  ``batches = (forget, retain)``); returns (weighted loss to descend, unweighted losses). Frozen
  and hashable, so equal objectives share a compiled step."""

  loss: UnlearningLoss
  which: int | None

  def __call__(self, fn, ref_fn, batches):
    obj = self.loss
    if self.which == FORGET:
      lf = obj.forget_loss(fn, ref_fn, batches)
      return obj.forget_coef * lf, {"forget": lf}
    if self.which == RETAIN:
      lr = obj.retain_loss(fn, ref_fn, batches)
      return obj.retain_coef * lr, {"retain": lr}
    lf = obj.forget_loss(fn, ref_fn, batches[0])
    lr = obj.retain_loss(fn, ref_fn, batches[1])
    return obj.forget_coef * lf + obj.retain_coef * lr, {"forget": lf, "retain": lr}


class Unlearner:
  """Runs an :class:`~dualoptim_jax.unlearn.losses.UnlearningLoss` with an optax transform.

  Args:
    model: the model to unlearn (not modified; see :attr:`model`).
    loss: from :func:`~dualoptim_jax.unlearn.losses.make_objective`.
    tx: any optax transform; in ``alternate`` mode it receives ``objective=k``.
    mode: ``"joint"`` or ``"alternate"``.
    forget_steps, retain_steps: ``F_f``, ``F_r`` >= 1 of the alternating schedule.
    ref_model: frozen reference for NPO / DPO / KL; default: ``model`` as it is now.
    mesh: a ``('data', 'fsdp')`` mesh (:func:`dualoptim_jax.unlearn.placement.make_mesh`) to train
      FSDP-sharded on; None: the default device.
    donate_model: train ``model``'s own parameter buffers instead of a copy (one device): one
      copy of the model less in memory, and ``model`` is unusable after the first step. A loss
      with a reference then needs ``ref_model``.
    step_size: ``(update, objective) -> learning rate`` of ``tx`` (:func:`step_size`), for the
      stability record :attr:`stability`: the largest ``|update| / learning rate`` of any element
      in any update, and how many elements moved more than 10 learning rates (summed over
      updates). Without it both are None.

  The state to checkpoint for an exact resume is :meth:`state_dict` plus the two batch
  iterators' ``state_dict()`` (:mod:`dualoptim_jax.unlearn.checkpoint` does both with orbax).
  """

  def __init__(
    self,
    model: nnx.Module,
    loss: UnlearningLoss,
    tx: optax.GradientTransformation,
    *,
    mode: str = "alternate",
    forget_steps: int = 1,
    retain_steps: int = 5,
    ref_model: nnx.Module | None = None,
    mesh: Any = None,
    step_size: Callable[[int, int | None], float] | None = None,
    donate_model: bool = False,
  ):
    if mode not in ("joint", "alternate"):
      raise ValueError(f"mode must be 'joint' or 'alternate', got {mode!r}")
    if donate_model and loss.needs_reference and ref_model is None:
      raise ValueError(f"{loss.name} needs ref_model when the model is donated")
    self.schedule = dj.alternating(forget_steps, retain_steps)  # validates the frequencies
    self.loss = loss
    self.mode = mode
    self.forget_steps, self.retain_steps = forget_steps, retain_steps
    self._core = _Core(model, tx, mesh, donate_model=donate_model)
    self.ref_params = None
    if loss.needs_reference:
      ref = self._core.source_params if ref_model is None else nnx.state(ref_model, nnx.Param)
      self.ref_params = self._core.placement.like_params(ref)
    self.update_count = 0
    self._rows: list[list[Any]] = []  # LossHistory rows of every update so far
    self._step_size = step_size
    self._largest_ratio, self._over = 0.0, 0

  def objective_at(self, update: int) -> int | None:
    """0 / 1 for the forget / retain objective of update ``update``; None in joint mode."""
    return None if self.mode == "joint" else int(self.schedule(update))

  def _objective_step(self, k: int | None, forget: Any, retain: Any) -> tuple[Any, ...]:
    """``(loss, tx_kwargs, batches)`` of a step on objective ``k`` (None: joint)."""
    if k is None:
      return _ObjectiveLoss(self.loss, None), (), (forget, retain)
    return _ObjectiveLoss(self.loss, k), (("objective", k),), forget if k == FORGET else retain

  def prepare(self, forget_batch: Batch, retain_batch: Batch, num_updates: int) -> None:
    """Compiles now, concurrently, the step programs of the next ``num_updates`` updates, for
    batches shaped like these (arrays or ``jax.ShapeDtypeStruct``s); :meth:`run` does it when
    its iterators can ``peek()``. Without it each program compiles at its first update, and
    the second one's compile-time memory comes on top of the optimizer state."""
    cycle = self.forget_steps + self.retain_steps
    count = min(num_updates, cycle)
    objectives = {self.objective_at(u) for u in range(self.update_count, self.update_count + count)}
    steps = [
      self._objective_step(k, forget_batch, retain_batch)
      for k in sorted(objectives, key=lambda k: -1 if k is None else k)
    ]
    self._core.prepare(steps, self.ref_params)

  def step(
    self, forget_batches: Iterator[Batch], retain_batches: Iterator[Batch]
  ) -> dict[str, float]:
    """One optimizer update, drawing the batches it needs; returns its unweighted losses."""
    k = self.objective_at(self.update_count)
    size = math.nan if self._step_size is None else self._step_size(self.update_count, k)
    forget = next(forget_batches) if k != RETAIN else None
    retain = next(retain_batches) if k != FORGET else None
    loss, tx_kwargs, batches = self._objective_step(k, forget, retain)
    aux, (largest, over) = self._core.step(loss, tx_kwargs, self.ref_params, batches, size)
    losses = {name: float(v) for name, v in aux.items()}
    if size > 0:  # NaN (no step_size) and a zero learning rate (warm-up start) say nothing
      self._largest_ratio = max(self._largest_ratio, float(largest) / size)
      self._over += int(over)
    self._rows.append(
      [
        self.update_count,
        -1 if k is None else k,
        losses.get("forget", math.nan),
        losses.get("retain", math.nan),
      ]
    )
    self.update_count += 1
    return losses

  def run(
    self,
    forget_batches: Iterator[Batch],
    retain_batches: Iterator[Batch],
    num_updates: int,
    *,
    progress: bool = True,
    desc: str = "unlearn",
    on_update: Callable[[int, dict[str, float]], None] | None = None,
  ) -> LossHistory:
    """``num_updates`` calls of :meth:`step`, with a progress bar showing both losses.

    ``on_update(update, losses)`` runs after each update (e.g. to checkpoint). Returns the
    history of these updates (:attr:`history` has every update since the start).
    """
    if num_updates < 0:
      raise ValueError(f"num_updates must be >= 0, got {num_updates}")
    peek = [getattr(it, "peek", None) for it in (forget_batches, retain_batches)]
    if num_updates and peek[0] and peek[1]:
      self.prepare(peek[0](), peek[1](), num_updates)
    first = len(self._rows)
    last = {"forget": math.nan, "retain": math.nan}
    with _progress(num_updates, desc, progress) as bar:
      for _ in range(num_updates):
        update = self.update_count
        losses = self.step(forget_batches, retain_batches)
        last.update(losses)
        bar.set_postfix(
          forget=f"{last['forget']:.4g}", retain=f"{last['retain']:.4g}", refresh=False
        )
        bar.update()
        if on_update is not None:
          on_update(update, losses)
    return LossHistory.from_rows(self._rows[first:])

  @property
  def stability(self) -> dict[str, Any]:
    """``{"max_update_ratio": largest |update| / learning rate, "elements_over_10x_lr": count}``
    over every update so far (None without ``step_size``)."""
    if self._step_size is None:
      return {"max_update_ratio": None, "elements_over_10x_lr": None}
    return {"max_update_ratio": self._largest_ratio, "elements_over_10x_lr": self._over}

  @property
  def history(self) -> LossHistory:
    """The losses of every update since the start (restored ones included)."""
    return LossHistory.from_rows(self._rows)

  @property
  def model(self) -> nnx.Module:
    """A new module with the current parameters."""
    return self._core.export()

  def release(self) -> nnx.Module:
    """The trained model, holding the trainer's own buffers (no copy); the runner is done."""
    return self._core.release()

  @property
  def params(self) -> Any:
    return self._core.params

  @property
  def opt_state(self) -> Any:
    """The live optimizer state (donated to the next step: copy what you keep)."""
    return self._core.opt_state

  def state_dict(self) -> dict[str, Any]:
    """``{"params", "opt_state", "update", "history"}``: what a checkpoint needs besides the batch
    iterators (``history``: :meth:`LossHistory.rows` of every update so far).

    The arrays are copies: the live ones are donated to the next step.
    """
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return {
      "params": copy(self._core.params),
      "opt_state": copy(self._core.opt_state),
      "update": self.update_count,
      "history": [list(r) for r in self._rows],
      "stability": [self._largest_ratio, self._over],
    }

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Resumes from :meth:`state_dict` (arrays are copied, so the caller's stay valid)."""
    for name in ("params", "opt_state"):
      mine, theirs = jax.tree.structure(getattr(self._core, name)), jax.tree.structure(state[name])
      if mine != theirs:
        raise ValueError(
          f"cannot resume: saved {name} do not match this model/optimizer "
          f"({theirs.num_leaves} leaves saved, {mine.num_leaves} expected)"
        )
    self._core.params = self._core.placement.put(state["params"], "params")
    self._core.opt_state = self._core.placement.put(state["opt_state"], "opt_state")
    self.update_count = int(state["update"])
    self._rows = LossHistory.from_rows(state.get("history", [])).rows()
    self._largest_ratio, self._over = state.get("stability", (0.0, 0))


class CheckpointedRun(Protocol):
  """What :func:`unlearn` needs of a ``checkpointer`` (e.g.
  :class:`dualoptim_jax.unlearn.checkpoint.RunCheckpointer`): it drives the run itself."""

  def run(
    self,
    unlearner: Unlearner,
    forget_batches: Iterator[Batch],
    retain_batches: Iterator[Batch],
    num_updates: int,
    *,
    config: Mapping[str, Any],
    progress: bool,
    desc: str,
  ) -> LossHistory:
    """Runs ``unlearner`` to ``num_updates`` updates in all; ``config`` is the run's
    :func:`run_config`. Returns the history of every update."""
    ...


class UnlearnResult(NamedTuple):
  model: nnx.Module
  history: LossHistory
  config: dict[str, Any]  # run_config: preset, optimizer, loss and schedule settings
  stability: dict[str, Any]  # Unlearner.stability: largest |update| / lr, elements over 10 lr


def run_config(
  preset: str,
  loss: UnlearningLoss,
  forget_steps: int,
  retain_steps: int,
  optimizer: Mapping[str, Any],
) -> dict[str, Any]:
  """The settings that make an unlearning run what it is, besides the model and the data."""
  return {
    "preset": preset,
    "optimizer": dict(optimizer),
    "loss": loss,
    "schedule": {
      "mode": PRESETS[preset].mode,
      "forget_steps": forget_steps,
      "retain_steps": retain_steps,
    },
  }


def unlearn(
  model: nnx.Module,
  loss: UnlearningLoss,
  forget_batches: Iterator[Batch],
  retain_batches: Iterator[Batch],
  *,
  preset: str = "dualoptim_plus",
  learning_rate: optax.ScalarOrSchedule = 1e-5,
  num_updates: int,
  forget_steps: int = 1,
  retain_steps: int = 5,
  ref_model: nnx.Module | None = None,
  progress: bool = True,
  mesh: Any = None,
  checkpointer: CheckpointedRun | None = None,
  donate_model: bool = False,
  **optimizer_settings: Any,
) -> UnlearnResult:
  """Unlearns with a named preset: :func:`make_optimizer` + :class:`Unlearner` + ``run``.

  ``optimizer_settings`` are :func:`make_optimizer`'s keywords (``forget_lr_scale``,
  ``weight_decay``, ...); ``decay_steps`` defaults to ``num_updates`` (the learning rate decays
  linearly to 0 over the run, as the Hugging Face ``Trainer`` does). With a ``checkpointer`` (:class:`~dualoptim_jax.unlearn.checkpoint.
  RunCheckpointer`) the run saves and resumes through it. Returns a new model, the loss history
  and the run's settings (:func:`run_config`); ``model`` is left as it was, unless
  ``donate_model`` (see :class:`Unlearner`).
  """
  optimizer_settings.setdefault("decay_steps", num_updates)
  # The same transform object for the same settings: runs that differ only in seed share compiled steps.
  try:
    tx = _cached_optimizer(preset, typing.cast(Any, learning_rate), **optimizer_settings)
  except TypeError:  # an unhashable learning rate (e.g. an array): build a fresh transform
    tx = make_optimizer(preset, learning_rate, **optimizer_settings)
  settings = optimizer_config(preset, learning_rate, **optimizer_settings)
  config = run_config(preset, loss, forget_steps, retain_steps, settings)
  runner = Unlearner(
    model,
    loss,
    tx,
    mode=PRESETS[preset].mode,
    forget_steps=forget_steps,
    retain_steps=retain_steps,
    ref_model=ref_model,
    mesh=mesh,
    step_size=functools.partial(step_size, settings),
    donate_model=donate_model,
  )
  if checkpointer is None:
    history = runner.run(
      forget_batches, retain_batches, num_updates, progress=progress, desc=preset
    )
  else:
    history = checkpointer.run(
      runner,
      forget_batches,
      retain_batches,
      num_updates,
      config=config,
      progress=progress,
      desc=preset,
    )
  stability = runner.stability
  return UnlearnResult(runner.release(), history, config, stability)


# ------------------------------------------------------------------------------------------------
# Plain fine-tuning.


class FinetuneResult(NamedTuple):
  model: nnx.Module
  losses: np.ndarray  # float64 (num_steps,): the answer-token NLL of each step's batch


def _nll_loss(fn, ref_fn, batch):
  del ref_fn
  loss = masked_nll(fn(batch["input_ids"]), batch["input_ids"], batch["answer_mask"])
  return loss, loss


def finetune(
  model: nnx.Module,
  batches: Iterator[Batch],
  tx: optax.GradientTransformation,
  num_steps: int,
  *,
  progress: bool = True,
  desc: str = "fine-tune",
  mesh: Any = None,
  donate_model: bool = False,
) -> FinetuneResult:
  """Fine-tunes on the answer-token NLL (the TOFU fine-tuning loss): the "TOFU-tuned" model on
  all QA, or the retain-only model on the retain set. Returns a new model; ``model`` is unchanged
  unless ``donate_model`` (then its buffers are trained, see :class:`Unlearner`). ``mesh``:
  train FSDP-sharded on it.
  """
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}")
  core = _Core(model, tx, mesh, donate_model=donate_model)
  losses = np.empty(num_steps, np.float64)
  with _progress(num_steps, desc, progress) as bar:
    for i in range(num_steps):
      losses[i] = float(core.step(_nll_loss, (), None, next(batches))[0])
      bar.set_postfix(nll=f"{losses[i]:.4g}", refresh=False)
      bar.update()
  return FinetuneResult(core.release(), losses)
