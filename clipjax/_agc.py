"""Adaptive gradient clipping (AGC) and the per-unit norms it is built on."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _base
from . import _checks
from . import _docs
from . import _layout
from . import _norms
from . import _partials
from . import _xla
from ._base import ClipStats, Threshold

Axes = int | tuple[int, ...] | None


class AdaptiveGradClipState(_base.CountState):
  """State of :func:`adaptive_grad_clip`: a step count and the last statistics.

  Its statistics describe the units (rows, filters, ...) of all leaves:
  ``norm`` is the largest ratio ``‖G‖ / max(‖W‖, eps)``, ``threshold`` the
  ``clipping`` factor it is compared with, ``scale`` the smallest factor
  applied to a unit, ``clipped`` whether any unit was rescaled and ``finite``
  whether every unit's gradient norm was finite.
  """

  __slots__ = ()


# Per-unit norms -------------------------------------------------------------------


def unit_axes(x: jax.Array, axis: Axes) -> tuple[int, ...]:
  """The axes :func:`unitwise_norm` reduces for an array of ``x``'s shape."""
  if axis is not None:
    return (axis,) if isinstance(axis, int) else tuple(axis)
  if sum(d != 1 for d in x.shape) <= 1:
    return tuple(range(x.ndim))
  if x.ndim in (2, 3):
    return (0,)
  if x.ndim == 4:
    return (0, 1, 2)
  if x.ndim == 5:
    return (0, 1, 2, 3)
  raise ValueError(
      f"unitwise_norm: x.shape={x.shape} has no default unit axes; pass axis=")


def slice_unit_axes(x: jax.Array, axis: Axes, layer: int | None) -> tuple[int, ...]:
  """The unit axes of ``x``, inferred from the rank of one slice along ``layer`` when given.

  An explicit ``axis`` counts the slice's axes too, so the same ``axis`` serves
  a scanned leaf and its unscanned twin.
  """
  if layer is None:
    return unit_axes(x, axis)
  axes = unit_axes(jax.ShapeDtypeStruct(x.shape[:layer] + x.shape[layer + 1:], x.dtype), axis)
  return tuple(a + (a >= layer) for a in axes)


def unit_squares(x: jax.Array, axes: tuple[int, ...], acc: jnp.dtype,
                 factor: float = 1.0) -> jax.Array:
  """The sum of squares of each unit of ``x * factor`` in ``acc`` (over ``axes``, keepdims)."""
  x = _xla.scaled(x, factor, acc, _xla.to_square)
  return jnp.sum(x * x, axis=axes, keepdims=True)


def _reduce_rows(rows: list[jax.Array], axis_name: _norms.AxisName,
                 shared: Sequence[tuple[Hashable, ...]]) -> list[jax.Array]:
  """Adds every array of ``rows`` over the devices with one collective.

  ``shared`` holds, per array, the axes it is replicated over (counted once).
  """
  sizes = [r.size for r in rows]
  flat = _norms.all_reduce(jnp.concatenate([r.ravel() for r in rows]), axis_name,
                           shared=_norms.shared_masks(shared, axis_name, sizes))
  starts = np.cumsum([0] + sizes)
  return [flat[s:s + r.size].reshape(r.shape) for s, r in zip(starts, rows)]


def unit_norms(leaves: list[jax.Array], axes: list[tuple[int, ...]],
               axis_name: _norms.AxisName = None,
               shared: Sequence[tuple[Hashable, ...]] | None = None) -> list[jax.Array]:
  """The L2 norm of every unit of every leaf (reduced over its ``axes``, with ``keepdims``).

  Overflow-safe as :func:`clipjax.global_norm`, through the rescue of
  ``_partials``: each leaf is read once for its plain unit sums; only when one
  of them overflowed on this device does a local ``lax.cond`` reread the
  leaves on ``x * 2**-k``. With ``axis_name`` the plain and shrunk sums of all
  leaves are added over the devices with one collective, each leaf counted
  once over the axes ``shared`` names for it (those it is replicated over).
  """
  acc = _partials.accumulation_dtype(leaves)
  plain = [unit_squares(x, a, acc) for x, a in zip(leaves, axes)]

  def reread(factor):
    return [unit_squares(x, a, acc, factor) for x, a in zip(leaves, axes)]

  # Sums added over devices are scaled alike on every device; otherwise only roots are taken.
  shrunk, _ = _partials.rescued(plain, reread, acc, 2,
                                overflow=_partials.can_overflow(leaves, acc), underflow=False,
                                summed=axis_name is not None)
  if axis_name is not None and plain:
    flags = list(shared) if shared is not None else [()] * len(leaves)
    rows = _reduce_rows(plain + shrunk, axis_name, flags * 2)
    plain, shrunk = rows[:len(plain)], rows[len(plain):]
  return [_partials.root(p, q, None, 2) for p, q in zip(plain, shrunk)]


@_docs.fill
def unitwise_norm(x: jax.typing.ArrayLike, axis: Axes = None) -> jax.Array:
  """The L2 norm of each unit of ``x``, broadcast back to ``x``'s shape.

  A unit is a slice of ``x`` along ``axis``. With ``axis=None`` the reduction
  axes follow optax's layer conventions: scalars and vectors are one unit,
  rank 2 and 3 reduce axis 0 (``(in, out)`` kernels), rank 4 reduces
  ``(0, 1, 2)`` (HWIO convolutions), rank 5 ``(0, 1, 2, 3)``. The sum of
  squares accumulates in float32 (float64 under x64), overflow-safe as
  :func:`clipjax.global_norm`; the result has the accumulation dtype.

  Args:
    x: an array.
    axis: the axis or axes to reduce; ``None`` infers them from the rank.

  Returns:
    An array of ``x``'s shape holding each element's unit norm.

  {example}
    >>> clipjax.unitwise_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]))
    Array([[5., 1.],
           [5., 1.]], dtype=float32)
  """
  x = jnp.asarray(x)
  return jnp.broadcast_to(unit_norms([x], [unit_axes(x, axis)])[0], x.shape)


# AGC ------------------------------------------------------------------------------


class _Units(NamedTuple):
  """AGC's decision for every unit of one leaf (arrays of the unit sums' shape)."""

  factor: _base.Ratio  # applied to the unit's gradient: limit·max(‖W‖, eps) / ‖G‖, or 1
  clipped: jax.Array  # bool
  finite: jax.Array  # bool, the unit's gradient norm is finite
  ratio: jax.Array  # ‖G‖ / max(‖W‖, eps)


def _paired(updates: Any, params: Any) -> tuple[list[jax.Array], list[jax.Array], Any]:
  """The gradient and parameter leaves, checked to have one structure and equal shapes."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
  try:
    weights = treedef.flatten_up_to(params)
  except (ValueError, TypeError) as err:
    raise ValueError(
        "adaptive_grad_clip: params must have the structure of the updates;"
        f" updates: {treedef}, params: {jax.tree.structure(params)}") from err
  grads = [jnp.asarray(g) for _, g in paths]
  weights = [jnp.asarray(w) for w in weights]
  for (path, _), g, w in zip(paths, grads, weights):
    if g.shape != w.shape:
      raise ValueError(
          f"adaptive_grad_clip: at {jax.tree_util.keystr(path) or 'the root'} the update has"
          f" shape {g.shape} but the parameter has shape {w.shape}")
  return grads, weights, treedef


def _decide(g_norm: jax.Array, w_norm: jax.Array, limit: jax.Array, eps: jax.Array) -> _Units:
  """Scales each unit with ``‖G‖ / max(‖W‖, eps) > limit`` down to that ratio."""
  w_norm = jnp.maximum(w_norm, eps)
  factor = _base.ratio_rule(g_norm, limit * w_norm)
  finite = jnp.isfinite(g_norm)
  clipped = finite & (factor.num / factor.den != 1.0)
  positive = w_norm > 0
  # A zero weight (eps=0) gives inf for a nonzero gradient, else 0. The inf is g/0
  # where it is chosen, not a constant, so healthy input makes none (jax_debug_infs).
  zero, one = jnp.zeros((), g_norm.dtype), jnp.ones((), g_norm.dtype)
  ratio = g_norm / jnp.where(positive, w_norm, jnp.where(g_norm > 0, zero, one))
  ratio = jnp.where(positive | (g_norm > 0), ratio, zero)
  return _Units(factor, clipped, finite, ratio)


def _summary(g_norms: list[jax.Array], w_norms: list[jax.Array], limit: jax.Array,
             eps: jax.Array, threshold: Threshold) -> ClipStats:
  """The statistics of all units of the tree: the largest ratio, the smallest scale.

  The rule runs once more on the concatenated unit norms, so the statistics
  are four reductions for the whole tree: four per leaf made the compile time
  grow several times faster than the tree (benchmarks/RESULTS.md). A leaf
  explicitly sharded along its units is summarised on its own: concatenating
  it would gather its shards (``_layout.joined``).
  """
  units = [_decide(g, w, limit, eps) for g, w in _layout.joined(g_norms, w_norms)]

  def fold(op, values, initial):
    return functools.reduce(op, values, jnp.asarray(initial))

  f32 = jnp.float32
  largest = fold(jnp.maximum, [jnp.max(u.ratio, initial=0.0).astype(f32) for u in units], 0.0)
  smallest = fold(jnp.minimum, [jnp.min(u.factor.num / u.factor.den, initial=1.0).astype(f32) for u in units], 1.0)
  clipped = fold(jnp.logical_or, [jnp.any(u.clipped) for u in units], False)
  finite = fold(jnp.logical_and, [jnp.all(u.finite) for u in units], True)
  return _base.make_stats(largest, threshold, smallest, clipped, finite)


@_docs.fill
def adaptive_grad_clip(clipping: Threshold, eps: float = 1e-3, axis: Axes = None, *,
                       axis_name: _norms.AxisName = None, replicated: Any = None,
                       layer_axis: Any = None,
                       name: str | None = None) -> optax.GradientTransformation:
  """Adaptive gradient clipping (AGC): clips each unit relative to its parameter's norm.

  For every unit ``i`` (a slice of a leaf, see :func:`clipjax.unitwise_norm`)
  with gradient ``G_i`` and parameter ``W_i``::

    G_i ← G_i · clipping · max(‖W_i‖, eps) / ‖G_i‖   if ‖G_i‖ / max(‖W_i‖, eps) > clipping
    G_i ← G_i                                         otherwise

  Norms are Frobenius norms accumulated in float32 (float64 under x64) and
  overflow-safe (a float32 gradient of 1e20 is clipped); the result equals
  ``optax.adaptive_grad_clip``. A unit whose gradient is zero
  stays zero; a unit whose gradient norm is NaN or inf passes through
  unscaled (``finite`` False). The statistics in the state report the largest
  ratio ``‖G_i‖ / max(‖W_i‖, eps)`` as ``norm`` and ``clipping`` as
  ``threshold``.

  Args:
    clipping: the largest allowed ratio of a unit's gradient norm to its
      parameter norm: a number, a scalar array, or an ``optax.Schedule``.
      Brock et al. use 0.01 for batch size 4096 and larger values for smaller
      batches.
    eps: the smallest parameter norm used, so that zero-initialised units
      (biases) can still move. Default 1e-3.
    axis: the axis or axes a unit is reduced over, for every leaf; ``None``
      (default) infers them from the rank as :func:`clipjax.unitwise_norm`.
      Pass it as a static argument to ``optax.inject_hyperparams``.
    axis_name: mapped axis name(s) over which leaves are sharded *along their
      unit axes* (every device holds a slice of every unit, e.g. an
      ``(in, out)`` kernel sharded along ``in``). The per-unit partial sums of
      gradients and parameters are then added over the devices with one
      ``psum`` for the whole tree. With ``axis=None`` the unit axes are
      inferred from each device's local shard: pass ``axis`` when a shard has
      a dimension of size 1 that the full leaf does not.
    {replicated}
    layer_axis: pytree prefix of ``int | None``: a leaf with a layer axis
      (a scanned model's stacked layers) is clipped slice by slice, its unit
      axes inferred from the rank of one slice (an ``(layers, in, out)``
      kernel has units over ``in`` per layer), exactly like the unscanned
      model.
    {name}

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`AdaptiveGradClipState`. Its ``update`` needs ``params`` and raises
    ``ValueError`` without them, or when their structure or a leaf's shape
    differs from the updates'.

  {example}
    >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 2.0]])}  # unit (column) norms 5 and 2
    >>> grads = {"w": jnp.array([[0.3, 3.0], [0.4, 4.0]])}  # unit norms 0.5 and 5
    >>> tx = clipjax.adaptive_grad_clip(0.5)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"]  # column 0 passes (0.5 / 5 <= 0.5); column 1 is scaled to 0.5 * 2
    Array([[0.3, 0.6],
           [0.4, 0.8]], dtype=float32)
    >>> float(state.stats.norm), bool(state.stats.clipped)  # the largest ratio, 5 / 2
    (2.5, True)

  References:
    Brock, De, Smith and Simonyan, `High-Performance Large-Scale Image
    Recognition Without Normalization <https://arxiv.org/abs/2102.06171>`_,
    2021.
  """
  _checks.check_number("clipping", clipping)
  _checks.check_number("eps", eps, allow_schedule=False)
  _layout.check_replicated(replicated)
  name = _base.check_name(name, "adaptive_grad_clip")
  needs = _base.needs_state(clipping)

  init_fn = _base.fixed_init(AdaptiveGradClipState, name, clipping)

  def update_fn(updates, state, params=None):
    state = _base.state_for(updates, state, AdaptiveGradClipState, lambda: init_fn(None),
                            name=name, needs=needs)
    if params is None:
      raise ValueError(_base.NO_PARAMS_MSG.format(name="adaptive_grad_clip"))
    limit = _base.resolve(clipping, state.clip_count)
    grads, weights, treedef = _paired(updates, params)
    layers = _layout.layout(updates, layer_axis).layers
    axes = [slice_unit_axes(g, axis, layer) for g, layer in zip(grads, layers)]
    shared = (_layout.replicated_axes(updates, replicated, axis_name)
              + _layout.replicated_axes(treedef.unflatten(weights), replicated, axis_name))
    norms = unit_norms(grads + weights, axes * 2, axis_name, shared)
    acc = _partials.accumulation_dtype(grads + weights)
    high, floor = limit.astype(acc), jnp.asarray(eps).astype(acc)
    g_norms, w_norms = norms[:len(grads)], norms[len(grads):]
    out = [_base.scale_leaf(g, _decide(gn, wn, high, floor).factor)
           for g, gn, wn in zip(grads, g_norms, w_norms)]
    stats = _summary(g_norms, w_norms, high, floor, limit)
    return (jax.tree.unflatten(treedef, out),
            AdaptiveGradClipState(_base.next_count(state.clip_count), {name: stats}))

  return optax.GradientTransformation(init_fn, update_fn)
