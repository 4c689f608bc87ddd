"""Checkpoints of unlearning runs with orbax: exact resume, any mesh, named mismatches.

A checkpoint (one orbax step directory, named by the number of updates done) holds three items:

* ``arrays`` -- the parameters and the whole optimizer state (step counters, per-objective
  counts, bases, deltas, 8-bit codes and block scales), stored as flat dicts of readable names
  (``params/layers.0.self_attn.q_proj.kernel``, ``opt_state/0.deltas.1.0.layers.0...codes``) so
  any pytree -- NamedTuple states, ``nnx.State``, empty optax states -- round-trips, and a
  mismatch can be reported by name;
* ``state`` -- JSON: the update count, both batch iterators' ``state_dict()`` (the data order:
  their seeds and positions) and the loss history so far;
* ``fingerprint`` -- JSON: the configuration the run was started with (model config, optimizer
  preset and hyperparameters, loss, schedule; see :func:`fingerprint`).

Restoring reads the arrays straight onto the shardings of the run that restores (orbax reads each
device's slice), so a run saved on ``fsdp=8`` resumes on ``data=2,fsdp=4`` or on one device.
Before any array is read, the fingerprint and then every array's name, shape and dtype are
compared with the restoring run; a difference raises :class:`CheckpointMismatchError` naming it::

    checkpoint was written for preset 'dualoptim_plus' but this run uses 'dualoptim'
    param 'layers.0.self_attn.q_proj.kernel' has shape (64, 64) in the checkpoint but (128, 128) in this run

Exact resume: the optimizer step is a deterministic function of (params, optimizer state, batch),
the batch a function of the iterators' positions, and the objective of the update count
(:func:`dualoptim_jax.alternating`), so a run killed at any point and resumed from its last
checkpoint -- also mid-cycle of the forget/retain schedule -- ends bit-identical to an
uninterrupted one (on the same mesh; see ``tests/test_checkpoint.py``).

Integrity: every array's checksum (:mod:`dualoptim_jax.unlearn.integrity`) is written with the
checkpoint and verified on restore; a damaged checkpoint (a flipped byte in an array file, an
unreadable ``_sharding`` file) raises :class:`CheckpointCorruptError` naming it, and
:func:`run_with_checkpoints` then resumes from the newest intact one, saying so in one line.

Saving is asynchronous (orbax writes in a background thread while training goes on; the arrays
are copied first, since the next step donates them) and atomic: a run killed while writing leaves
no partial step behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dualoptim_jax.unlearn import integrity
from dualoptim_jax.unlearn.integrity import CheckpointCorruptError
from dualoptim_jax.unlearn.jsonable import jsonable
from dualoptim_jax.unlearn.paths import named_leaves
from dualoptim_jax.unlearn.trainer import LossHistory, Unlearner

__all__ = [
  "CheckpointMismatchError",
  "CheckpointCorruptError",
  "fingerprint",
  "fingerprint_mismatches",
  "named_leaves",
  "Checkpointer",
  "save_unlearner",
  "restore_unlearner",
  "run_with_checkpoints",
  "RunCheckpointer",
  "save_params",
  "load_params",
]

_ITEMS = ("arrays", "state", "fingerprint")
_CHECKSUMS = "array_checksums"  # the key of the arrays' checksums in the JSON state
# What an array group is called in messages.
_GROUP_LABEL = {"params": "param", "opt_state": "optimizer state", "rng": "RNG state"}


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by a run with another model or optimizer configuration."""


# ------------------------------------------------------------------------------------------------
# Fingerprints.


def fingerprint(
  *,
  model: Any = None,
  preset: str | None = None,
  optimizer: Mapping[str, Any] | None = None,
  loss: Mapping[str, Any] | None = None,
  schedule: Mapping[str, Any] | None = None,
  **extra: Any,
) -> dict[str, Any]:
  """The configuration a checkpoint is tied to, as JSON data.

  Restoring compares it key by key with the restoring run's; anything that changes what the
  saved arrays mean belongs here. What may legitimately change on resume (the mesh, the number
  of updates still to run, progress bars) does not.

  Args:
    model: the model config (e.g. a :class:`~dualoptim_jax.models.llama.LlamaConfig`).
    preset: the optimizer preset name (:data:`~dualoptim_jax.unlearn.trainer.PRESETS`).
    optimizer: its hyperparameters (learning rate, scales, weight decay, state bits, ...).
    loss: the objective (name, coefficients, beta).
    schedule: the update schedule (mode, forget and retain steps, ...).
    **extra: any other section (data, seed, ...).
  """
  sections = dict(
    model=model, preset=preset, optimizer=optimizer, loss=loss, schedule=schedule, **extra
  )
  return {k: jsonable(v) for k, v in sections.items() if v is not None}


def _flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(_flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def fingerprint_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """One line per difference between two fingerprints (empty if they agree)."""
  a, b = _flatten_config(saved), _flatten_config(current)
  lines = []
  for key in sorted(set(a) | set(b), key=lambda k: (k.count("."), k)):
    if key not in b:
      lines.append(f"checkpoint was written with {key} {a[key]!r}, which this run does not set")
    elif key not in a:
      lines.append(f"checkpoint has no {key} but this run uses {b[key]!r}")
    elif a[key] != b[key]:
      lines.append(f"checkpoint was written for {key} {a[key]!r} but this run uses {b[key]!r}")
  return lines


# ------------------------------------------------------------------------------------------------
# Arrays by name.


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of a tree of arrays (what to restore onto)."""

  def one(x):
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree.map(one, tree)


def _group_mismatches(label: str, saved: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
  lines = []
  for names, where in (
    ([k for k in target if k not in saved], "in this run but not in the checkpoint"),
    ([k for k in saved if k not in target], "in the checkpoint but not in this run"),
  ):
    if len(names) <= 3:
      lines += [f"{label} {k!r} is {where}" for k in names]
    else:
      shown = ", ".join(repr(k) for k in names[:3])
      lines.append(f"{len(names)} {label} arrays are {where}, e.g. {shown}")
  for k in (k for k in target if k in saved):
    s_shape, m_shape = tuple(saved[k].shape), tuple(target[k].shape)
    if s_shape != m_shape:
      lines.append(f"{label} {k!r} has shape {s_shape} in the checkpoint but {m_shape} in this run")
    elif np.dtype(saved[k].dtype) != np.dtype(target[k].dtype):
      lines.append(
        f"{label} {k!r} has dtype {np.dtype(saved[k].dtype)} in the checkpoint but "
        f"{np.dtype(target[k].dtype)} in this run"
      )
  return lines


def _shape_mismatches(
  saved: Mapping[str, Mapping[str, Any]], target: Mapping[str, Mapping[str, Any]], limit: int = 8
) -> list[str]:
  """Differences in array names, shapes and dtypes, parameters first, at most ``limit`` per group.

  When parameters differ, the optimizer state's differences (the same ones, once per moment)
  are only counted.
  """
  order = sorted(
    set(saved) | set(target),
    key=lambda g: (list(_GROUP_LABEL).index(g) if g in _GROUP_LABEL else len(_GROUP_LABEL), g),
  )
  lines: list[str] = []
  for group in order:
    label = _GROUP_LABEL.get(group, group)
    if group not in target:
      lines.append(f"the checkpoint holds {label} arrays, which this run does not have")
      continue
    if group not in saved:
      lines.append(f"the checkpoint holds no {label} arrays, which this run needs")
      continue
    found = _group_mismatches(label, saved[group], target[group])
    if found and lines and group == "opt_state":
      lines.append(f"(and {len(found)} optimizer state arrays that follow from the parameters)")
      continue
    lines += found[:limit]
    if len(found) > limit:
      lines.append(f"... and {len(found) - limit} more {label} differences")
  return lines


# ------------------------------------------------------------------------------------------------
# The checkpointer.


class Checkpointer:
  """An orbax ``CheckpointManager`` for one run: arrays, JSON state and a fingerprint.

  Args:
    directory: where the step directories go (created if missing).
    fingerprint: the run's configuration (:func:`fingerprint`); saved with every checkpoint and
      compared on restore.
    every: save after every ``every`` updates (:meth:`should_save`); None: only when forced
      (the end of a run).
    keep: how many of the latest checkpoints to keep (None: all).
    async_save: write in a background thread (orbax's default); saves are atomic either way.

  Example::

      with Checkpointer(path, fingerprint=fingerprint(preset="dualoptim_plus"), every=50) as ckpt:
          ckpt.save(50, {"params": params, "opt_state": opt_state}, {"update": 50})
          arrays, state, step = ckpt.restore({"params": params, "opt_state": opt_state})
  """

  def __init__(
    self,
    directory: str | Path,
    *,
    fingerprint: Mapping[str, Any],
    every: int | None = None,
    keep: int | None = 3,
    async_save: bool = True,
  ):
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
      raise ValueError(f"every must be an int >= 1 or None, got {every!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
    self.directory = Path(directory).expanduser().resolve()
    self.fingerprint = jsonable(dict(fingerprint))
    self.every = every
    self.keep = keep
    options = ocp.CheckpointManagerOptions(
      # Every save is forced: when to save is decided by should_save (and the end of a run).
      save_decision_policy=ocp.checkpoint_managers.SpecificStepsPolicy(steps=()),
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # leftovers of a run killed while writing
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_names=_ITEMS,
      item_handlers={
        "arrays": ocp.StandardCheckpointHandler(),
        "state": ocp.JsonCheckpointHandler(),
        "fingerprint": ocp.JsonCheckpointHandler(),
      },
    )

  # -- steps
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """True every ``every`` updates."""
    return self.every is not None and step > 0 and step % self.every == 0

  # -- save
  def save(
    self,
    step: int,
    arrays: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    *,
    force: bool = False,
  ) -> bool:
    """Saves ``arrays`` (groups of pytrees, e.g. ``{"params", "opt_state"}``) and JSON ``state``.

    Saves if ``force`` or :meth:`should_save`; a step already on disk is not written again.
    The arrays are copied before the call returns, so the caller may donate them. Returns
    whether a checkpoint was started.
    """
    if not (force or self.should_save(step)) or step in self._manager.all_steps():
      return False
    # Copies: orbax reads the arrays in the background while the next step donates the live ones.
    named = {
      group: {k: jnp.copy(v) for k, v in named_leaves(tree).items()}
      for group, tree in arrays.items()
    }
    state = {**jsonable(dict(state or {})), _CHECKSUMS: integrity.checksums(named)}
    self._manager.save(
      step,
      force=True,
      args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(named),
        state=ocp.args.JsonSave(state),
        fingerprint=ocp.args.JsonSave(self.fingerprint),
      ),
    )
    return True

  # -- restore
  def check(self, like: Mapping[str, Any], step: int | None = None) -> int:
    """Raises :class:`CheckpointMismatchError` unless checkpoint ``step`` (default: latest) fits.

    ``like`` has the restoring run's array groups (arrays or ``ShapeDtypeStruct``). Returns the
    step checked.
    """
    step = self._step(step)
    with self._reading(step):
      saved_fp = self._manager.restore(
        step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())
      )
    lines = fingerprint_mismatches(saved_fp["fingerprint"], self.fingerprint)
    if not lines:
      with self._reading(step):
        metadata = self._manager.item_metadata(step)["arrays"]
        saved = {g: dict(tree) for g, tree in metadata.items()}
      target = {g: named_leaves(_abstract(tree)) for g, tree in like.items()}
      lines = _shape_mismatches(saved, target)
    if lines:
      raise CheckpointMismatchError(
        f"cannot restore {self.directory / str(step)} into this run:\n  " + "\n  ".join(lines)
      )
    return step

  def restore(
    self, like: Mapping[str, Any], step: int | None = None
  ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Reads checkpoint ``step`` (default: the latest) onto ``like``'s structure and shardings.

    Args:
      like: the restoring run's array groups, e.g. ``{"params": params, "opt_state": state}``:
        arrays (their shardings are used, so the arrays land on the current mesh) or
        ``jax.ShapeDtypeStruct`` with ``sharding``.
      step: which checkpoint; None for the latest.

    Returns:
      ``(arrays, state, step)``: the array groups with ``like``'s pytree structures, the JSON
      state and the step restored.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      CheckpointMismatchError: see :meth:`check`.
      CheckpointCorruptError: the checkpoint's files cannot be read, or an array does not match
        the checksum written at save time.
    """
    step = self.check(like, step)
    targets, treedefs = {}, {}
    for group, tree in like.items():
      abstract = _abstract(tree)
      targets[group] = named_leaves(abstract)
      treedefs[group] = jax.tree.structure(abstract)
    with self._reading(step):
      out = self._manager.restore(
        step,
        args=ocp.args.Composite(
          arrays=ocp.args.StandardRestore(targets), state=ocp.args.JsonRestore()
        ),
      )
    state = dict(out["state"])
    damaged = integrity.mismatches(state.pop(_CHECKSUMS, {}), integrity.checksums(out["arrays"]))
    if damaged:
      group, name = damaged[0]
      more = f" (and {len(damaged) - 1} more arrays)" if len(damaged) > 1 else ""
      raise CheckpointCorruptError(
        f"checkpoint {self.directory / str(step)} is damaged: {_GROUP_LABEL.get(group, group)} "
        f"{name!r}{more} does not match the checksum written at save time"
      )
    arrays = {g: treedefs[g].unflatten([out["arrays"][g][k] for k in targets[g]]) for g in targets}
    return arrays, state, step

  def restore_intact(
    self, like: Mapping[str, Any], log=print
  ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """:meth:`restore` of the newest checkpoint that is not damaged.

    Each damaged checkpoint is reported with one line through ``log`` and deleted (it could
    not be resumed from, and the resumed run writes that step again).

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      CheckpointCorruptError: every checkpoint is damaged.
      CheckpointMismatchError: the newest intact checkpoint belongs to another configuration.
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    reasons = []
    for i, step in enumerate(reversed(steps)):
      try:
        return self.restore(like, step)
      except CheckpointCorruptError as e:
        older = steps[-i - 2] if i + 1 < len(steps) else None
        then = "no older checkpoint left" if older is None else f"trying update {older}"
        log(f"{e}; deleted it, {then}")
        reasons.append(str(e))
        self._manager.delete(step)
    raise CheckpointCorruptError(
      f"every checkpoint in {self.directory} is damaged:\n  " + "\n  ".join(reasons)
    )

  @contextlib.contextmanager
  def _reading(self, step: int):
    """Turns a failure inside orbax's readers into a :class:`CheckpointCorruptError`."""
    try:
      yield
    except (CheckpointMismatchError, CheckpointCorruptError):
      raise
    except Exception as e:  # noqa: BLE001 (orbax, tensorstore and JSON raise many kinds)
      raise CheckpointCorruptError(
        f"checkpoint {self.directory / str(step)} is damaged: its files cannot be read "
        f"({integrity.describe_error(e)})"
      ) from e

  def _step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (steps: {steps})")
    return step

  # -- lifetime
  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------------------------
# Unlearning runs.


def _arrays(unlearner: Unlearner) -> dict[str, Any]:
  return {"params": unlearner.params, "opt_state": unlearner.opt_state}


def save_unlearner(
  ckpt: Checkpointer,
  unlearner: Unlearner,
  forget_batches: Any,
  retain_batches: Any,
  *,
  force: bool = False,
) -> bool:
  """Checkpoints an :class:`~dualoptim_jax.unlearn.trainer.Unlearner` at its update count.

  Saves params, optimizer state, both iterators' positions and the loss history so far.
  Returns whether a checkpoint was started.
  """
  step = unlearner.update_count
  if not (force or ckpt.should_save(step)):
    return False
  state = unlearner.state_dict()
  json_state = {
    "update": step,
    "forget_batches": forget_batches.state_dict(),
    "retain_batches": retain_batches.state_dict(),
    "history": state["history"],
    "stability": state["stability"],
  }
  return ckpt.save(step, _arrays(unlearner), json_state, force=force)


def restore_unlearner(
  ckpt: Checkpointer,
  unlearner: Unlearner,
  forget_batches: Any,
  retain_batches: Any,
  step: int | None = None,
) -> None:
  """Loads a checkpoint into ``unlearner`` (onto its mesh) and the iterators."""
  arrays, state, _ = ckpt.restore(_arrays(unlearner), step)
  _load(unlearner, forget_batches, retain_batches, arrays, state)


def _load(unlearner, forget_batches, retain_batches, arrays, state) -> None:
  unlearner.load_state_dict(
    {
      **arrays,
      "update": state["update"],
      "history": state.get("history", []),
      "stability": state.get("stability", (0.0, 0)),
    }
  )
  forget_batches.load_state_dict(state["forget_batches"])
  retain_batches.load_state_dict(state["retain_batches"])


def run_with_checkpoints(
  unlearner: Unlearner,
  forget_batches: Any,
  retain_batches: Any,
  num_updates: int,
  ckpt: Checkpointer,
  *,
  resume: bool = False,
  progress: bool = True,
  desc: str = "unlearn",
  log=print,
) -> LossHistory:
  """:meth:`Unlearner.run` to ``num_updates`` updates in all, checkpointing as it goes.

  Saves every ``ckpt.every`` updates and after the last one. With ``resume``, starts from the
  latest checkpoint in ``ckpt.directory`` (if any): the result, parameters and loss history,
  is then that of the uninterrupted run. Without ``resume`` the directory must hold no
  checkpoint, so an earlier run is never overwritten by accident.

  Returns:
    The loss history of all ``num_updates`` updates (restored rows included).
  """
  latest = ckpt.latest_step()
  if latest is not None:
    if not resume:
      raise FileExistsError(
        f"{ckpt.directory} already holds checkpoints (latest: update {latest}); resume from it "
        "(--resume) or choose another checkpoint directory"
      )
    if latest > num_updates:
      raise ValueError(
        f"the latest checkpoint in {ckpt.directory} is at update {latest}, past the "
        f"{num_updates} updates of this run"
      )
    arrays, state, step = ckpt.restore_intact(
      _arrays(unlearner), log=lambda msg: log(f"[{desc}] {msg}")
    )
    _load(unlearner, forget_batches, retain_batches, arrays, state)
    log(f"[{desc}] resumed from {ckpt.directory} at update {step} of {num_updates}")

  def on_update(update: int, losses: Mapping[str, float]) -> None:
    del update, losses
    save_unlearner(ckpt, unlearner, forget_batches, retain_batches)

  unlearner.run(
    forget_batches,
    retain_batches,
    num_updates - unlearner.update_count,
    progress=progress,
    desc=desc,
    on_update=on_update,
  )
  save_unlearner(ckpt, unlearner, forget_batches, retain_batches, force=True)
  ckpt.wait()
  return unlearner.history


class RunCheckpointer:
  """Orbax checkpoints for :func:`~dualoptim_jax.unlearn.trainer.unlearn`'s ``checkpointer=``.

  ``unlearn(..., checkpointer=RunCheckpointer(directory, every=50))`` saves every ``every``
  updates and at the end, keeping the last ``keep``; with ``resume`` it continues from the latest
  checkpoint in ``directory``. The fingerprint is the run's settings (preset, optimizer, loss,
  schedule; from ``unlearn``), the model's config and ``fingerprint_extra`` (e.g. the seed and
  what the starting model was built from).
  """

  def __init__(
    self,
    directory: str | Path,
    *,
    every: int | None = None,
    keep: int | None = 3,
    resume: bool = False,
    fingerprint_extra: Mapping[str, Any] | None = None,
    log=print,
  ):
    self.directory = directory
    self.every, self.keep, self.resume = every, keep, resume
    self.fingerprint_extra = dict(fingerprint_extra or {})
    self.log = log

  def run(
    self,
    unlearner: Unlearner,
    forget_batches: Any,
    retain_batches: Any,
    num_updates: int,
    *,
    config: Mapping[str, Any],
    progress: bool = True,
    desc: str = "unlearn",
  ) -> LossHistory:
    model = unlearner.model
    fp = fingerprint(
      model=getattr(model, "config", type(model).__name__), **config, **self.fingerprint_extra
    )
    with Checkpointer(self.directory, fingerprint=fp, every=self.every, keep=self.keep) as ckpt:
      return run_with_checkpoints(
        unlearner,
        forget_batches,
        retain_batches,
        num_updates,
        ckpt,
        resume=self.resume,
        progress=progress,
        desc=desc,
        log=self.log,
      )


# ------------------------------------------------------------------------------------------------
# Model parameters on their own (the main job's cache of fine-tuned models).


def save_params(model: nnx.Module, path: str | Path) -> None:
  """Writes the module's ``nnx.Param`` arrays to the orbax checkpoint ``path`` (atomically),
  by :func:`named_leaves` name."""
  path = Path(path).expanduser().resolve()
  named = named_leaves(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, named)
    ckptr.wait_until_finished()


def load_params(model: nnx.Module, path: str | Path) -> None:
  """Loads :func:`save_params` output into ``model`` in place.

  Raises:
    CheckpointMismatchError: naming the parameters whose names, shapes or dtypes differ.
  """
  path = Path(path).expanduser().resolve()
  state = nnx.state(model, nnx.Param)
  target = named_leaves(_abstract(state))
  with ocp.StandardCheckpointer() as ckptr:
    saved_meta = dict(ckptr.metadata(path).item_metadata)
    lines = _shape_mismatches({"params": saved_meta}, {"params": target})
    if lines:
      raise CheckpointMismatchError(f"cannot load {path} into this model:\n  " + "\n  ".join(lines))
    saved = ckptr.restore(path, target)
  leaves = [saved[name] for name in named_leaves(state)]
  nnx.update(model, jax.tree.structure(state).unflatten(leaves))
