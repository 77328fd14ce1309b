"""Clipping with fixed or scheduled thresholds: by value, per leaf, global, block RMS."""

from __future__ import annotations

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
from . import _stats
from ._base import ClipStats, Threshold


def _check_thresholds(high_name: str, high: Any, low_name: str, low: Any) -> None:
  _checks.check_number(high_name, high)
  # A floor must be finite: an infinite one would make every nonzero update inf.
  _checks.check_number(low_name, low, allow_none=True, finite=True)
  _checks.check_order(low_name, low, high_name, high)


def _check_norm_arguments(max_norm: Any, min_norm: Any, ord: Any, replicated: Any) -> Any:
  """The checks of the per-leaf and the global norm clipper; returns the checked ``ord``."""
  _check_thresholds("max_norm", max_norm, "min_norm", min_norm)
  ord = _norms.check_ord(ord)
  _layout.check_replicated(replicated)
  return ord


class LeafClipStats(NamedTuple):
  """:class:`ClipStats` of ``clip_by_norm(leaf_stats=True)``, with per-leaf figures."""

  norm: jax.Array  # [] float32, the largest leaf norm
  threshold: jax.Array  # [] float32
  scale: jax.Array  # [] float32, the smallest factor
  clipped: jax.Array  # [] bool, any leaf clipped
  finite: jax.Array  # [] bool
  clipped_fraction: jax.Array  # [] float32, the fraction of tensors clipped
  leaf_norms: dict[str, jax.Array]  # path -> [] float32 ([layers] with a layer axis), pre-clip


def _leaf_norms_by_path(tree: Any, norms: jax.Array, layout: _layout.Layout
                        ) -> dict[str, jax.Array]:
  """Each leaf's norm (one per slice with a layer axis), keyed by its path."""
  paths = _stats.leaf_names(tree)
  return {path: (norms[start] if layer is None else norms[start:start + count]).astype(
      jnp.float32) for path, start, count, layer in zip(paths, layout.starts, layout.counts,
                                                         layout.layers)}


def _per_leaf_stats(norms: jax.Array, high: jax.Array, scales: jax.Array,
                    clipped: jax.Array, finite: jax.Array) -> ClipStats:
  """Statistics of a per-leaf clip, told by its largest leaf norm."""
  if norms.shape[0] == 0:
    return _base.initial_stats(high)
  largest = jnp.argmax(jnp.where(jnp.isnan(norms), jnp.inf, norms))
  return _base.make_stats(jnp.max(norms), high, scales[largest], jnp.any(clipped),
                          jnp.all(finite))


class ClipState(_base.CountState):
  """State of :func:`clipjax.clip`: a step count and the last statistics."""

  __slots__ = ()


@_docs.fill
def clip(max_delta: Threshold, *, min_delta: Threshold | None = None,
         axis_name: _norms.AxisName = None,
         name: str | None = None) -> optax.GradientTransformation:
  """Clips every element's magnitude into ``[min_delta, max_delta]``, keeping its sign.

  ``g ← sign(g) · clamp(|g|, min_delta, max_delta)``, with exact zeros kept at
  zero. Without ``min_delta`` this is ``optax.clip``,
  ``torch.nn.utils.clip_grad_value_`` and Keras' ``clipvalue`` on finite
  elements. NaN and ±inf elements are kept as they are (``optax.clip`` turns
  ±inf into ±max_delta), in the same element-wise pass that clamps the finite
  ones, and the step is reported with ``finite`` False (pair with
  ``optax.apply_if_finite`` or :func:`clipjax.skip_spikes` to skip it). The
  statistics measure the largest magnitude: ``norm = max|g|``,
  ``scale = max_delta / norm`` when it is clipped.

  Args:
    max_delta: the largest magnitude an element may keep: a number, a scalar
      array, or an ``optax.Schedule`` of the step count.
    min_delta: optional smallest magnitude of a nonzero element; smaller ones
      are raised to it.
    axis_name: mapped axis name(s) over which the leaves are sharded. The
      clamp itself is element-wise; the axis makes the statistics global
      (one ``pmax``), so every device reports a non-finite step.
    {name}

  {returns: ClipState}

  {example}
    >>> tx = clipjax.clip(1.0, min_delta=0.01)
    >>> updates, state = tx.update(jnp.array([0.0, 1e-4, -3.0]), tx.init(None))
    >>> updates
    Array([ 0.  ,  0.01, -1.  ], dtype=float32)
    >>> bool(state.stats.clipped)
    True
  """
  _check_thresholds("max_delta", max_delta, "min_delta", min_delta)
  name = _base.check_name(name, "clip")
  needs = _base.needs_state(max_delta, min_delta)

  init_fn = _base.fixed_init(ClipState, name, max_delta)

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, ClipState, lambda: init_fn(None), name=name,
                            needs=needs)
    high = _base.resolve(max_delta, state.clip_count)
    low = _base.resolve(min_delta, state.clip_count)
    largest, smallest = _magnitudes(updates, low is not None, axis_name)
    finite = jnp.isfinite(largest)
    scale, clipped, _ = _base.scale_rule(largest, high)
    if low is not None:
      clipped = clipped | (finite & (smallest < low.astype(largest.dtype)))
    stats = _base.make_stats(largest, high, scale, clipped, finite)
    clamped = jax.tree.map(lambda g: _clamp(jnp.asarray(g), high, low, finite), updates)
    return clamped, ClipState(_base.next_count(state.clip_count), {name: stats})

  return optax.GradientTransformation(init_fn, update_fn)


def _magnitudes(updates: Any, smallest: bool, axis_name: _norms.AxisName
                ) -> tuple[jax.Array, jax.Array | None]:
  """The largest magnitude of the tree and, when asked, the smallest nonzero one."""
  if not smallest:
    return _norms.global_norm(updates, float("inf"), axis_name=axis_name), None
  largest = _norms.global_norm(updates, float("inf"))
  least = _smallest_nonzero(updates, largest.dtype)
  if axis_name is not None:
    # One collective for both: the max of -smallest is -(the min).
    both = _norms.all_reduce(jnp.stack([largest, -least]), axis_name, maximum=True)
    largest, least = both[0], -both[1]
  return largest, least


def _clamp(g: jax.Array, high: jax.Array, low: jax.Array | None, finite: jax.Array
           ) -> jax.Array:
  """One leaf with finite magnitudes clamped into ``[low, high]``; NaN and ±inf kept.

  One element-wise pass: ``clamp`` keeps NaN, and where the step is not
  ``finite`` an infinite element is selected back, so ``optax.apply_if_finite``
  and ``skip_spikes`` still see the step as non-finite. (Where ``finite``, no
  element is infinite; reading it also orders the pass after the reduction
  that reads the same, donated, leaf: XLA CPU copies every leaf otherwise.)
  """
  top = high.astype(g.dtype)
  if low is None:
    out = jnp.clip(g, -top, top)
  else:
    magnitude = jnp.clip(jnp.abs(g), low.astype(g.dtype), top)
    out = jnp.where(g == 0, g, jnp.sign(g) * magnitude)
  return jnp.where(finite | jnp.isfinite(g), out, g)


def _smallest_nonzero(updates: Any, dtype: jnp.dtype) -> jax.Array:
  """The smallest nonzero magnitude in the tree (the dtype's maximum when there is none).

  The maximum, not inf, so that healthy input makes no inf for jax_debug_infs:
  no finite magnitude is above it, and a floor below it is never crossed.
  """
  largest = jnp.asarray(jnp.finfo(dtype).max, dtype)
  smallest = largest
  for g in jax.tree.leaves(updates):
    magnitude = jnp.abs(jnp.asarray(g)).astype(dtype)
    if magnitude.size:
      smallest = jnp.minimum(smallest, jnp.min(jnp.where(magnitude > 0, magnitude, largest)))
  return smallest


class ClipByNormState(_base.CountState):
  """State of :func:`clipjax.clip_by_norm`: a step count and the last statistics."""

  __slots__ = ()


@_docs.fill
def clip_by_norm(max_norm: Threshold, *, min_norm: Threshold | None = None,
                 ord: int | float = 2, axis_name: _norms.AxisName = None,
                 replicated: Any = None, layer_axis: Any = None,
                 leaf_stats: bool = False,
                 name: str | None = None) -> optax.GradientTransformation:
  """Clips each leaf (tensor) to norm at most ``max_norm``, independently.

  ``g_i ← g_i · max_norm / max(‖g_i‖, max_norm)``, the ``tf.clip_by_norm`` /
  Keras ``clipnorm`` rule applied to every leaf. With ``min_norm``, a leaf
  with ``0 < ‖g_i‖ < min_norm`` is scaled up to ``min_norm``; zero leaves stay
  zero. A leaf whose norm is NaN or inf passes through unchanged. The
  statistics describe the leaf with the largest norm.

  Args:
    max_norm: the largest norm a leaf may keep: a number, a scalar array, or an
      ``optax.Schedule`` of the step count.
    min_norm: optional floor for nonzero leaf norms (``<= max_norm``).
    ord: ``1``, ``2`` or ``jnp.inf``.
    axis_name: mapped axis name(s) over which the leaves are sharded; each
      leaf's norm is then taken over all its shards, with one collective for
      all leaves.
    replicated: pytree prefix of bools marking leaves that are the same on
      every device of ``axis_name``.
    layer_axis: pytree prefix of ``int | None``: a leaf with a layer axis
      (a scanned model's stacked layers, e.g. ``0`` for ``nnx.scan``) counts
      as one tensor per slice along that axis, so it is clipped exactly like
      the unscanned model. The axis must not be sharded over ``axis_name``.
    {name}
    leaf_stats: also keep each leaf's norm and the fraction of tensors clipped
      (:class:`LeafClipStats`); :func:`clipjax.clip_stats` reports them by
      path, as ``"clip_by_norm/leaf_norms/<path>"`` and
      ``"clip_by_norm/clipped_fraction"``. ``init`` then needs the parameters.

  {returns: ClipByNormState}

  {example}
    >>> tx = clipjax.clip_by_norm(1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["a"], updates["b"]
    (Array([0.6, 0.8], dtype=float32), Array([0.3, 0.4], dtype=float32))
  """
  ord = _check_norm_arguments(max_norm, min_norm, ord, replicated)
  name = _base.check_name(name, "clip_by_norm")
  needs = _base.needs_state(max_norm, min_norm)

  def init_fn(params):
    stats = _base.initial_stats(_base.initial_threshold(max_norm))
    if leaf_stats:
      stats = _initial_leaf_stats(stats, params, layer_axis)
    return _base.first_state(ClipByNormState, name, stats)

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, ClipByNormState, lambda: init_fn(updates),
                            name=name, needs=needs)
    high = _base.resolve(max_norm, state.clip_count)
    low = _base.resolve(min_norm, state.clip_count)
    norms = _norms.measure(updates, ord, axis_name=axis_name, replicated=replicated,
                           small=low is not None, layer_axis=layer_axis)
    scales, clipped, finite = _base.scale_rule(norms.leaves, high, low)
    stats = _per_leaf_stats(norms.leaves, high, scales, clipped, finite)
    if leaf_stats:
      stats = LeafClipStats(*stats, clipped_fraction=jnp.mean(clipped.astype(jnp.float32)),
                            leaf_norms=_leaf_norms_by_path(updates, norms.leaves, norms.layout))
    # Each leaf's factor from its own norm: the rule fuses into that leaf's multiply.
    factors = [_base.ratio_rule(norm, high, low) for norm in norms.per_leaf]
    return (_base.apply_scale(updates, factors, norms.layout),
            ClipByNormState(_base.next_count(state.clip_count), {name: stats}))

  return optax.GradientTransformation(init_fn, update_fn)


def _initial_leaf_stats(stats: ClipStats, params: Any, layer_axis: Any) -> LeafClipStats:
  """``clip_by_norm(leaf_stats=True)``'s statistics before the first step: every norm 0."""
  if params is None:
    raise ValueError("clip_by_norm(leaf_stats=True): init needs the parameters (a tree of"
                     " the updates' structure) to name the leaves")
  layout = _layout.layout(params, layer_axis)
  zeros = jnp.zeros((sum(layout.counts),), jnp.float32)
  return LeafClipStats(*stats, clipped_fraction=jnp.zeros((), jnp.float32),
                       leaf_norms=_leaf_norms_by_path(params, zeros, layout))


class ClipByGlobalNormState(_base.CountState):
  """State of :func:`clipjax.clip_by_global_norm`: a step count and the last statistics."""

  __slots__ = ()


@_docs.fill
def clip_by_global_norm(max_norm: Threshold, *, min_norm: Threshold | None = None,
                        ord: int | float = 2, axis_name: _norms.AxisName = None,
                        replicated: Any = None,
                        name: str | None = None) -> optax.GradientTransformation:
  """Clips the whole update tree to global norm at most ``max_norm``.

  ``g ← g · max_norm / max(‖g‖, max_norm)`` with ``‖g‖`` the norm of all
  leaves together, accumulated in float32 (overflow-safe for float16 and
  bfloat16). ``ord=2`` matches ``optax.clip_by_global_norm`` and
  ``torch.nn.utils.clip_grad_norm_``. With ``min_norm``, a nonzero update
  whose norm is below ``min_norm`` is scaled up to it (a floor against
  vanishing updates). A zero update stays zero, even with ``max_norm=0``; a
  NaN or inf norm leaves the updates unscaled with ``finite`` False.

  Args:
    max_norm: the largest global norm: a number, a scalar array (traced values
      work with ``optax.inject_hyperparams``), or an ``optax.Schedule``.
    min_norm: optional floor for a nonzero global norm (``<= max_norm``).
    ord: ``1``, ``2`` or ``jnp.inf``.
    axis_name: mapped axis name(s) over which the leaves are sharded
      (``shard_map``, ``pmap``); the norm is global over them, with one
      ``psum`` (``pmax`` for inf) per update.
    {replicated}
    {name}

  {returns: ClipByGlobalNormState}

  {example}
    >>> tx = clipjax.clip_by_global_norm(1.0)
    >>> grads = {"w": jnp.full((1000,), 300.0, jnp.float16)}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> round(float(clipjax.global_norm(updates)), 3), updates["w"].dtype
    (1.0, dtype('float16'))
    >>> round(float(state.stats.norm), 1), bool(state.stats.clipped)
    (9486.8, True)

  References:
    Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent
    neural networks <https://arxiv.org/abs/1211.5063>`_, 2013.
  """
  ord = _check_norm_arguments(max_norm, min_norm, ord, replicated)
  name = _base.check_name(name, "clip_by_global_norm")
  needs = _base.needs_state(max_norm, min_norm)

  init_fn = _base.fixed_init(ClipByGlobalNormState, name, max_norm)

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, ClipByGlobalNormState, lambda: init_fn(None),
                            name=name, needs=needs)
    high = _base.resolve(max_norm, state.clip_count)
    low = _base.resolve(min_norm, state.clip_count)
    norm = _norms.measure(updates, ord, axis_name=axis_name, replicated=replicated,
                          small=low is not None, per_leaf=False).total
    scale, clipped, finite = _base.scale_rule(norm, high, low)
    stats = _base.make_stats(norm, high, scale, clipped, finite)
    return (_base.apply_scale(updates, _base.ratio_rule(norm, high, low)),
            ClipByGlobalNormState(_base.next_count(state.clip_count), {name: stats}))

  return optax.GradientTransformation(init_fn, update_fn)


class ClipByBlockRmsState(_base.CountState):
  """State of :func:`clipjax.clip_by_block_rms`: a step count and the last statistics."""

  __slots__ = ()


@_docs.fill
def clip_by_block_rms(threshold: Threshold, *, axis_name: _norms.AxisName = None,
                      replicated: Any = None,
                      layer_axis: Any = None,
                      name: str | None = None) -> optax.GradientTransformation:
  """Clips each leaf (block) to root-mean-square at most ``threshold``.

  ``g_i ← g_i / max(1, rms(g_i) / threshold)`` with
  ``rms(g_i) = ‖g_i‖₂ / sqrt(size_i)``, as ``optax.clip_by_block_rms``, with
  the mean of squares accumulated in float32 and no NaN for a zero block
  (even with ``threshold=0``). The statistics describe the block with the
  largest RMS.

  Args:
    threshold: the largest RMS of a block: a number, a scalar array, or an
      ``optax.Schedule``.
    axis_name: mapped axis name(s) over which the leaves are sharded; each
      block's RMS is then taken over all its shards (one ``psum`` for all
      blocks), and a sharded block's size is its local size times the number
      of devices.
    replicated: pytree prefix of bools marking blocks that are the same on
      every device of ``axis_name`` (counted once, at their local size).
    layer_axis: pytree prefix of ``int | None``: a leaf with a layer axis
      (a scanned model's stacked layers, e.g. ``0`` for ``nnx.scan``) counts
      as one block per slice along that axis, so it is clipped exactly like
      the unscanned model. The axis must not be sharded over ``axis_name``.
    {name}

  {returns: ClipByBlockRmsState}

  {example}
    >>> tx = clipjax.clip_by_block_rms(1.0)
    >>> updates, _ = tx.update([jnp.array([3.0, -3.0, 3.0, -3.0])], tx.init(None))
    >>> updates[0]
    Array([ 1., -1.,  1., -1.], dtype=float32)
  """
  _checks.check_number("threshold", threshold)
  _layout.check_replicated(replicated)
  name = _base.check_name(name, "clip_by_block_rms")
  needs = _base.needs_state(threshold)

  init_fn = _base.fixed_init(ClipByBlockRmsState, name, threshold)

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, ClipByBlockRmsState, lambda: init_fn(None),
                            name=name, needs=needs)
    high = _base.resolve(threshold, state.clip_count)
    norms = _norms.measure(updates, 2, axis_name=axis_name, replicated=replicated,
                           layer_axis=layer_axis)
    sizes = np.maximum(norms.sizes, 1)
    rms = norms.leaves / jnp.sqrt(jnp.asarray(sizes, norms.leaves.dtype))
    scales, clipped, finite = _base.scale_rule(rms, high)
    factors = [_base.ratio_rule(norm / jnp.sqrt(jnp.asarray(sizes[start], norm.dtype)), high)
               for norm, start in zip(norms.per_leaf, norms.layout.starts)]
    stats = _per_leaf_stats(rms, high, scales, clipped, finite)
    return (_base.apply_scale(updates, factors, norms.layout),
            ClipByBlockRmsState(_base.next_count(state.clip_count), {name: stats}))

  return optax.GradientTransformation(init_fn, update_fn)
