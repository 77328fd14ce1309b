"""The shared pieces of every clipper: statistics, thresholds, the scale rule, apply.

A norm-based clipper measures (``_norms``), decides a scale here with
:func:`scale_rule`, and applies it with :func:`apply_scale`. Adaptive clippers
only compute a threshold from their state before calling the same rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import optax

from . import _checks
from . import _layout
from . import _norms
from . import _xla

# What every threshold argument accepts: a Python number, a JAX scalar (traced
# values included, for optax.inject_hyperparams) or an optax.Schedule of the step
# count. Annotations are strings (PEP 563), so signatures read "Threshold".
Threshold = float | int | jax.Array | Callable[[jax.Array], jax.typing.ArrayLike]

_STATE_NAMES: dict[type, str] = {}
_T = TypeVar("_T", bound=type)


def stats_state(name: str) -> Callable[[_T], _T]:
  """Registers a state class whose ``stats`` field :func:`clipjax.clip_stats` reports.

  ``name`` is the transform's public name, used as the prefix of its statistics.
  """

  def register(cls: _T) -> _T:
    _STATE_NAMES[cls] = name
    return cls

  return register


_NAMED: dict[tuple[type, str], type] = {}


def named_state(cls: _T, name: str | None) -> _T:
  """The state class of a transform called ``name`` (``name=`` of every transform).

  ``cls`` itself for ``None`` or its registered name; otherwise a subclass of
  it, registered with ``name``, made once per ``(cls, name)`` so that states
  built with the same name have the same pytree type.
  """
  if name is None or name == _STATE_NAMES[cls]:
    return cls
  if not isinstance(name, str) or not name or "/" in name:
    raise ValueError(f"{name=} must be a non-empty string without '/'")
  if (cls, name) not in _NAMED:
    named = type(cls.__name__, (cls,), {"__slots__": (), "__module__": cls.__module__,
                                         "__qualname__": cls.__qualname__})
    _STATE_NAMES[named] = name
    _NAMED[cls, name] = named
  return _NAMED[cls, name]


def state_name(node: Any) -> str | None:
  """The transform name of a registered state, else ``None``."""
  return _STATE_NAMES.get(type(node))


class ClipStats(NamedTuple):
  """What a clipper did on its last step, kept in its state for logging.

  ``clipped`` is True when the updates were rescaled (down to ``threshold``, or
  up to a ``min_*`` floor); ``scale`` is the factor applied (for per-leaf and
  element-wise clippers, the smallest one); ``norm`` is the measured quantity
  compared with ``threshold`` (for per-leaf clippers, the largest leaf norm).
  """

  norm: jax.Array  # [] float32, pre-clip
  threshold: jax.Array  # [] float32, the threshold in force at this step
  scale: jax.Array  # [] float32, 1.0 when untouched
  clipped: jax.Array  # [] bool
  finite: jax.Array  # [] bool, False when the measured norm was NaN or inf


class CountState(NamedTuple):
  """The state of a clipper without memory: a step count and the last statistics.

  Each such clipper's state class subclasses it (``ClipState``,
  ``ClipByNormState``, ...), so that ``clip_stats`` tells them apart.
  """

  count: jax.Array  # [] int32, steps taken (read by a scheduled threshold)
  stats: ClipStats


def count_state(name: str, class_name: str, module: str) -> type:
  """A :class:`CountState` subclass named ``class_name``, registered as transform ``name``."""
  cls = type(class_name, (CountState,), {
      "__slots__": (), "__module__": module, "__qualname__": class_name,
      "__doc__": f"State of :func:`clipjax.{name}`: a step count and the last statistics."})
  return stats_state(name)(cls)


def initial_stats(threshold: jax.typing.ArrayLike = 0.0) -> ClipStats:
  """Statistics before the first step: nothing measured, nothing clipped."""
  return ClipStats(
      norm=jnp.zeros((), jnp.float32),
      threshold=f32(threshold),
      scale=jnp.ones((), jnp.float32),
      clipped=jnp.zeros((), jnp.bool_),
      finite=jnp.ones((), jnp.bool_),
  )


def make_stats(norm: jax.Array, threshold: jax.typing.ArrayLike, scale: jax.Array,
               clipped: jax.Array, finite: jax.Array) -> ClipStats:
  """Statistics of one step, cast to the dtypes the state keeps (see :func:`f32`)."""
  return ClipStats(
      norm=f32(norm),
      threshold=f32(threshold),
      scale=f32(scale),
      clipped=jnp.asarray(clipped, jnp.bool_),
      finite=jnp.asarray(finite, jnp.bool_),
  )


# Thresholds -----------------------------------------------------------------



def resolve(value: Threshold | None, count: jax.Array) -> jax.Array | None:
  """The threshold in force at step ``count``: a schedule is evaluated at it."""
  if value is None:
    return None
  if callable(value):
    return jnp.asarray(value(count))
  return jnp.asarray(value)


def initial_threshold(value: Threshold | None) -> jax.Array:
  """The threshold at step 0, as float32, for a fresh state."""
  threshold = resolve(value, jnp.zeros((), jnp.int32))
  if threshold is None:
    return jnp.full((), jnp.inf, jnp.float32)
  return threshold.astype(jnp.float32)


def next_count(count: jax.Array) -> jax.Array:
  return optax.safe_increment(count)


# Decide and apply -------------------------------------------------------------


def scale_rule(norm: jax.Array, max_norm: jax.typing.ArrayLike | None,
               min_norm: jax.typing.ArrayLike | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The factor that brings ``norm`` into ``[min_norm, max_norm]``.

  ``scale = max_norm / norm`` when ``norm > max_norm``; ``min_norm / norm`` when
  ``0 < norm < min_norm`` (and that factor is finite in the norm's dtype); else 1.
  A zero norm keeps scale 1 (zero stays zero, whatever the thresholds, with no
  0/0); a NaN or inf norm keeps scale 1 (the updates pass through and
  ``finite`` is False). Works elementwise, so ``norm`` may hold one norm per
  leaf.

  Returns:
    ``(scale, clipped, finite)``, shaped like ``norm``.
  """
  finite = jnp.isfinite(norm)
  positive = norm > 0
  safe = jnp.where(positive & finite, norm, jnp.ones((), norm.dtype))
  one = jnp.ones((), norm.dtype)
  scale = one
  # Each quotient's numerator is also taken where it is selected, so an unselected
  # inf threshold (max_norm=inf: no clipping) cannot give inf·0 = NaN derivatives.
  if min_norm is not None:
    low = jnp.asarray(min_norm).astype(norm.dtype)
    # Lift only where the factor low / norm is representable (norm >= low / max):
    # a norm below that (e.g. 1e-38 lifted to 4) passes through like zero.
    liftable = norm * jnp.asarray(jnp.finfo(norm.dtype).max, norm.dtype) >= low
    lift = positive & (norm < low) & liftable
    scale = jnp.where(lift, jnp.where(lift, low, one) / safe, scale)
  if max_norm is not None:
    high = jnp.asarray(max_norm).astype(norm.dtype)
    cut = norm > high
    scale = jnp.where(cut, jnp.where(cut, high, one) / safe, scale)
  scale = jnp.where(finite, scale, one)
  clipped = finite & (scale != one)
  return jnp.broadcast_to(scale, norm.shape), clipped, finite


def apply_scale(updates: Any, scales: Any, layout: _layout.Layout | None = None) -> Any:
  """Multiplies each leaf by its scale; the result keeps the leaf's dtype.

  ``scales`` is a scalar (one factor for the whole tree); or a sequence with
  one entry per leaf in ``jax.tree.leaves`` order (a scalar, or with a
  ``layout`` that gives the leaf a layer axis, a vector of one factor per
  slice); or a vector of one factor per tensor. Half-precision leaves are
  multiplied in float32 and cast back, so a small factor cannot underflow in
  float16 before it is applied.
  """
  leaves, treedef = jax.tree.flatten(updates)
  leaves = [jnp.asarray(g) for g in leaves]
  if not isinstance(scales, (list, tuple)) and jnp.ndim(scales) == 0:
    return jax.tree.unflatten(treedef, [scale_leaf(g, scales) for g in leaves])
  if not isinstance(scales, (list, tuple)):
    scales = _per_leaf_scales(scales, layout, len(leaves))
  layers = layout.layers if layout is not None else (None,) * len(leaves)
  out = []
  for g, scale, layer in zip(leaves, scales, layers, strict=True):
    if layer is not None:
      shape = [1] * g.ndim
      shape[layer] = g.shape[layer]
      scale = jnp.reshape(scale, shape)
    out.append(scale_leaf(g, scale))
  return jax.tree.unflatten(treedef, out)


def _per_leaf_scales(scales: jax.Array, layout: _layout.Layout | None, n: int) -> list[jax.Array]:
  """A ``[n_tensors]`` vector of factors cut into each leaf's part."""
  # Computed once: otherwise XLA fuses the whole vector's rule into every leaf.
  scales = _xla.materialized(jnp.asarray(scales))
  if layout is None:
    return [scales[i] for i in range(n)]
  return [scales[start] if layer is None else scales[start:start + count]
          for start, count, layer in zip(layout.starts, layout.counts, layout.layers)]


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32 for half-precision floats, the dtype itself otherwise."""
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(dtype)


def scale_leaf(leaf: jax.Array, scale: jax.Array) -> jax.Array:
  """``leaf * scale`` computed in at least float32, returned in ``leaf.dtype``."""
  compute = compute_dtype(leaf.dtype)
  if compute == leaf.dtype:
    return leaf * jnp.asarray(scale).astype(leaf.dtype)
  return (leaf.astype(compute) * jnp.asarray(scale).astype(compute)).astype(leaf.dtype)


# The transform shells -----------------------------------------------------------


def _state_needed(name: str) -> str:
  return (f"{name}: state=None is not accepted here, because the result depends on the"
          " state; thread it through: state = tx.init(params), then"
          " updates, state = tx.update(grads, state, params) on every step")


# (updates, max threshold, min threshold or None, params) -> (updates, stats)
Rule = Callable[[Any, jax.Array, jax.Array | None, Any], tuple[Any, ClipStats]]


def threshold_transform(state_cls: type, rule: Rule, high: Threshold,
                        low: Threshold | None = None,
                        init_stats: Callable[[Any, ClipStats], Any] | None = None
                        ) -> optax.GradientTransformation:
  """A clipper whose state is a step count and its last statistics.

  Each ``update`` resolves the thresholds at the step count (evaluating a
  schedule), applies ``rule`` and advances the count. ``state_cls`` is a
  NamedTuple with the fields ``count`` and ``stats``, registered with
  :func:`stats_state`. ``init_stats(params, stats)`` extends the initial
  statistics when the rule keeps more. ``state=None`` is accepted when no
  threshold is a schedule (the result cannot depend on the state, and optax's
  own tests call stateless clippers that way); with a schedule it raises
  ``ValueError``.
  """
  name = _STATE_NAMES.get(state_cls, state_cls.__name__)
  stateless = not (_checks.is_schedule(high) or _checks.is_schedule(low))

  def init_fn(params):
    stats = initial_stats(initial_threshold(high))
    return state_cls(count=jnp.zeros((), jnp.int32),
                     stats=stats if init_stats is None else init_stats(params, stats))

  def update_fn(updates, state, params=None):
    _checks.check_updates(updates, name)
    if state is None:
      if not stateless:
        raise ValueError(_state_needed(name) + " (a scheduled threshold reads its step count)")
      state = init_fn(None)
    updates, stats = rule(updates, resolve(high, state.count), resolve(low, state.count),
                          params)
    return updates, state_cls(count=next_count(state.count), stats=stats)

  return optax.GradientTransformation(init_fn, update_fn)


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def f32(value: jax.typing.ArrayLike) -> jax.Array:
  """``value`` as float32, for a state or a hyperparameter; a finite value stays finite.

  Every norm that enters a float32 state (statistics, histories, moving
  averages) passes here. A finite value beyond float32's range (a float64 norm
  under x64) is clamped to ±float32 max rather than becoming inf; NaN and inf
  are kept. Hyperparameters pass here too (``inject_hyperparams`` may give bf16).
  """
  value = jnp.asarray(value)
  if jnp.issubdtype(value.dtype, jnp.floating) and jnp.finfo(value.dtype).bits > 32:
    value = jnp.where(jnp.isfinite(value), jnp.clip(value, -_F32_MAX, _F32_MAX), value)
  return value.astype(jnp.float32)


def saturate(value: jax.Array) -> jax.Array:
  """A float32 running statistic computed from finite inputs, held in the finite range.

  Moving averages and variances of norms near float32's maximum can round or
  square past it; an inf there would stop the clipper for good, so it is
  clamped to ±float32 max. NaN is kept.
  """
  return jnp.clip(value, -_F32_MAX, _F32_MAX)


def keep(taken: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  """``new`` when the step is taken into the statistics, else ``old`` unchanged (bit for bit)."""
  return jnp.where(taken, new, old)


# (norms of the update, state) -> (scale, next state); the scale is a scalar, or
# ``(one per tensor, layout)``.
_Step = Callable[[_norms.Norms, Any], tuple[Any, Any]]


def informative(norm: jax.Array) -> jax.Array:
  """Whether a step's global norm may enter running statistics: finite and nonzero.

  A NaN or inf norm would poison them; a zero norm (a frozen or masked step)
  says nothing about the scale of the gradients, and counting it would pull
  an adaptive threshold towards 0, where it would zero every later update.
  """
  return jnp.isfinite(norm) & (norm > 0)


def norm_transform(state_cls: type, init_fn: Callable[[Any], Any], step: _Step,
                   axis_name: _norms.AxisName, replicated: Any, layer_axis: Any = None,
                   per_leaf: bool = False) -> optax.GradientTransformation:
  """A clipper whose threshold comes from its state and the L2 norms of the update.

  ``step`` decides the scale and the next state. When the global norm is not
  :func:`informative` (zero, NaN or inf), every field of the state but
  ``stats`` is kept as it was, bit for bit. The state must be threaded
  through: ``state=None`` raises ``ValueError``. States are returned as
  ``state_cls`` (the class :func:`named_state` gives, registered with the
  transform's name). A ``step`` that reads per-tensor norms asks for them with
  ``per_leaf``.
  """
  _layout.check_replicated(replicated)
  name = _STATE_NAMES[state_cls]

  def init(params):
    return state_cls(*init_fn(params))

  def update_fn(updates, state, params=None):
    del params
    _checks.check_updates(updates, name)
    if state is None:
      raise ValueError(_state_needed(name) + " (it keeps running statistics)")
    norms = _norms.measure(updates, 2, axis_name=axis_name, replicated=replicated,
                           layer_axis=layer_axis, per_leaf=per_leaf)
    scale, new = step(norms, state)
    taken = informative(norms.total)
    kept = {field: keep(taken, getattr(new, field), getattr(state, field))
            for field in new._fields if field != "stats"}
    scale, layout = scale if isinstance(scale, tuple) else (scale, None)
    return apply_scale(updates, scale, layout), state_cls(*new._replace(**kept))

  return optax.GradientTransformation(init, update_fn)


NO_PARAMS_MSG = (
    "{name} needs the current parameters: call update(updates, state, params)"
    " (inside optax.chain the params are passed on to every transform)."
)
