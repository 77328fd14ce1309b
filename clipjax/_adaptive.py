"""Adaptive clipping: thresholds taken from the parameters or from past gradient norms.

Every clipper here measures the update once (:func:`clipjax._norms.measure`,
one collective under ``axis_name``), computes its threshold from its state,
and scales with the shared rule of :mod:`clipjax._base`. A step whose measured
norm is NaN or inf passes through unscaled, reports ``finite`` False, and
leaves every running statistic of the state (history, moving averages,
warm-up counters) exactly as it was: one bad step cannot poison the
threshold of the steps after it.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _base
from . import _norms
from ._base import ClipStats, Threshold

_F32 = jnp.float32
# ZClip's constant in the denominator of the z-score, as in the reference code.
_ZCLIP_EPS = 1e-6


def _f32(value: jax.typing.ArrayLike) -> jax.Array:
  """A hyperparameter as a float32 array (``inject_hyperparams`` may give bf16)."""
  return jnp.asarray(value).astype(_F32)


def _keep(finite: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  """``new`` when the step was finite, else ``old`` unchanged (bit for bit)."""
  return jnp.where(finite, new, old)


# AGC --------------------------------------------------------------------------


@_base.stats_state("adaptive_grad_clip")
class AdaptiveGradClipState(NamedTuple):
  """State of :func:`adaptive_grad_clip`.

  Its statistics describe the units (rows, filters, ...) of all leaves:
  ``norm`` is the largest ratio ``‖G‖ / max(‖W‖, eps)``, ``threshold`` the
  ``clipping`` factor it is compared with, ``scale`` the smallest factor
  applied to a unit, ``clipped`` whether any unit was rescaled and ``finite``
  whether every unit's gradient norm was finite.
  """

  count: jax.Array  # [] int32, steps taken (read by a scheduled ``clipping``)
  stats: ClipStats


def _reduce_units(squares: list[jax.Array], flags: list[bool], axis_name: _norms.AxisName
                  ) -> list[jax.Array]:
  """Sums per-unit partials over ``axis_name`` with ONE ``psum`` for all of them.

  ``flags[i]`` marks a replicated array: only the device of index 0 contributes it.
  """
  if not squares:
    return squares
  flat = jnp.concatenate([q.ravel() for q in squares])
  shared = np.repeat(np.asarray(flags, bool), [q.size for q in squares])
  flat = jax.lax.psum(_norms.count_once(flat, shared, axis_name), axis_name)
  out, start = [], 0
  for q in squares:
    out.append(flat[start:start + q.size].reshape(q.shape))
    start += q.size
  return out


def adaptive_grad_clip(clipping: Threshold, eps: float = 1e-3,
                       axis: int | tuple[int, ...] | None = None, *,
                       axis_name: _norms.AxisName = None,
                       replicated: Any = None) -> optax.GradientTransformation:
  """Adaptive gradient clipping (AGC): clips each unit relative to its parameter's norm.

  For every unit ``i`` (a slice of a leaf, see :func:`clipjax.unitwise_norm`)
  with gradient ``G_i`` and parameter ``W_i``::

    G_i ← G_i · clipping · max(‖W_i‖, eps) / ‖G_i‖   if ‖G_i‖ / max(‖W_i‖, eps) > clipping
    G_i ← G_i                                         otherwise

  Norms are Frobenius norms accumulated in float32 (float64 under x64); the
  result equals ``optax.adaptive_grad_clip``. A unit whose gradient is zero
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
    replicated: pytree prefix of bools marking leaves that are the same on
      every device of ``axis_name`` (not sharded); they are counted once.

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`AdaptiveGradClipState`. Its ``update`` needs ``params`` and raises
    ``ValueError`` without them.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
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
  _base.check_number("clipping", clipping)
  _base.check_number("eps", eps, allow_schedule=False)

  def init_fn(params):
    del params
    return AdaptiveGradClipState(
        count=jnp.zeros((), jnp.int32),
        stats=_base.initial_stats(_base.initial_threshold(clipping)))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_base.NO_PARAMS_MSG.format(name="adaptive_grad_clip"))
    if state is None:
      state = init_fn(None)
    limit_ratio = _base.resolve(clipping, state.count)
    grads, treedef = jax.tree.flatten(updates)
    grads = [jnp.asarray(g) for g in grads]
    weights = [jnp.asarray(w) for w in treedef.flatten_up_to(params)]
    acc = _norms.accumulation_dtype(grads + weights)
    axes = [_norms.unit_axes(g, axis) for g in grads]
    squares = ([_norms.unit_squares(g, a, acc) for g, a in zip(grads, axes)]
               + [_norms.unit_squares(w, a, acc) for w, a in zip(weights, axes)])
    if axis_name is not None:
      flags = _norms.replicated_mask(updates, replicated)
      squares = _reduce_units(squares, flags + flags, axis_name)
    n = len(grads)
    eps_acc = jnp.asarray(eps).astype(acc)
    ratio_limit = jnp.asarray(limit_ratio).astype(acc)

    def rule(g_sq, w_sq):
      """``(scale, clipped, finite, ‖G‖, max(‖W‖, eps))`` of every unit."""
      g_norm = jnp.sqrt(g_sq)
      w_norm = jnp.maximum(jnp.sqrt(w_sq), eps_acc)
      return _base.scale_rule(g_norm, ratio_limit * w_norm) + (g_norm, w_norm)

    # Each leaf's scale comes from its own per-unit sums, so the rule fuses into
    # that leaf's multiply; slicing the factors out of one vector would cost
    # XLA a kernel per leaf.
    out = [_base.scale_leaf(g, rule(g_sq, w_sq)[0])
           for g, g_sq, w_sq in zip(grads, squares[:n], squares[n:])]

    # The statistics: the same rule once over all units of the tree (a leaf
    # explicitly sharded along its units is summarised on its own: flattening
    # it would need its shards gathered).
    def summary(g_sq, w_sq):
      scale, unit_clipped, unit_finite, g_norm, w_norm = rule(g_sq, w_sq)
      positive = w_norm > 0
      ratio = jnp.where(positive, g_norm / jnp.where(positive, w_norm, jnp.ones((), acc)),
                        jnp.where(g_norm > 0, jnp.inf, 0.0).astype(acc))
      return (jnp.max(ratio, initial=0.0).astype(_F32), jnp.min(scale, initial=1.0).astype(_F32),
              jnp.any(unit_clipped), jnp.all(unit_finite))

    def joined(sums):
      return jnp.concatenate([q.ravel() for q in sums] + [jnp.zeros((0,), acc)])

    pairs = list(zip(squares[:n], squares[n:]))
    alone = [pair for pair in pairs if _norms.is_sharded(pair[0])]
    together = [pair for pair in pairs if not _norms.is_sharded(pair[0])]
    parts = ([summary(joined(g for g, _ in together), joined(w for _, w in together))]
             + [summary(*pair) for pair in alone])
    largest = functools.reduce(jnp.maximum, [p[0] for p in parts])
    smallest_scale = functools.reduce(jnp.minimum, [p[1] for p in parts])
    clipped = functools.reduce(jnp.logical_or, [p[2] for p in parts])
    finite = functools.reduce(jnp.logical_and, [p[3] for p in parts])
    stats = _base.make_stats(largest, limit_ratio, smallest_scale, clipped, finite)
    return (jax.tree.unflatten(treedef, out),
            AdaptiveGradClipState(count=_base.next_count(state.count), stats=stats))

  return optax.GradientTransformation(init_fn, update_fn)


# AutoClip ---------------------------------------------------------------------


@_base.stats_state("autoclip")
class AutoclipState(NamedTuple):
  """State of :func:`autoclip`: a ring buffer of the last finite global norms."""

  history: jax.Array  # [history] float32, past global norms; slots >= ``filled`` unused
  position: jax.Array  # [] int32, the slot the next finite norm is written to
  filled: jax.Array  # [] int32, how many slots hold a norm (<= history)
  stats: ClipStats


def _percentile(buffer: jax.Array, filled: jax.Array, percentile: jax.Array) -> jax.Array:
  """The ``percentile``-th percentile (linear interpolation) of ``buffer[:filled]``.

  ``inf`` when the buffer is empty. Same definition as ``numpy.percentile``'s
  default (``method="linear"``).
  """
  size = buffer.shape[0]
  valid = jnp.arange(size, dtype=jnp.int32) < filled
  ordered = jnp.sort(jnp.where(valid, buffer, jnp.inf))
  last = jnp.maximum(filled - 1, 0)
  rank = percentile / 100.0 * last.astype(_F32)
  low = jnp.clip(jnp.floor(rank).astype(jnp.int32), 0, last)
  high = jnp.minimum(low + 1, last)
  fraction = rank - low.astype(_F32)
  a, b = ordered[low], ordered[high]
  value = a + fraction * (b - a)
  return jnp.where(filled > 0, value, jnp.inf)


def autoclip(percentile: float = 10.0, history: int = 1024, *,
             axis_name: _norms.AxisName = None,
             replicated: Any = None) -> optax.GradientTransformation:
  """AutoClip: clips the global norm at a percentile of its own recent history.

  With ``‖g‖`` the global L2 norm of the update and ``H`` the global norms of
  the last ``history`` finite steps, the current one included::

    threshold = percentile(H, percentile)      # linear interpolation
    g ← g · min(1, threshold / ‖g‖)

  The history is a fixed-size ring buffer (``history`` float32 values). A
  step whose norm is NaN or inf is not recorded: the updates pass through
  unscaled, the buffer, its write position and its fill count stay as they
  were. Zero updates are recorded (a norm of 0) and stay zero.

  Args:
    percentile: which percentile of the history is the threshold, in
      ``[0, 100]``. Default 10.0, as in the paper: about 90% of the steps are
      clipped, to a norm typical of the smaller ones.
    history: how many past norms to keep (>= 1). Default 1024; the paper keeps
      every norm since the start of training. The buffer length is read from
      the state, so under ``optax.inject_hyperparams`` the value given at
      ``init`` is the one that counts.
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      global norm is taken over all shards with one collective.
    replicated: pytree prefix of bools marking leaves that are the same on
      every device of ``axis_name``; they are counted once.

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`AutoclipState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> tx = clipjax.autoclip(percentile=50.0, history=4)
    >>> state = tx.init(None)
    >>> for norm in [1.0, 2.0, 3.0, 40.0]:
    ...   updates, state = tx.update(jnp.array([norm]), state)
    >>> updates, float(state.stats.threshold)  # the median of 1, 2, 3 and 40
    (Array([2.5], dtype=float32), 2.5)

  References:
    Seetharaman, Wichern, Pardo and Le Roux, `AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks <https://arxiv.org/abs/2007.14469>`_,
    2020.
  """
  _base.check_number("percentile", percentile, minimum=0.0, maximum=100.0,
                     allow_schedule=False)
  size = _base.check_int("history", history, minimum=1)

  def init_fn(params):
    del params
    if size is None:
      raise ValueError(
          f"autoclip: history={history!r} is traced at init, but it sets the buffer's"
          " length; pass it as a static argument"
          " (optax.inject_hyperparams(clipjax.autoclip, static_args='history')).")
    return AutoclipState(
        history=jnp.zeros((size,), _F32),
        position=jnp.zeros((), jnp.int32),
        filled=jnp.zeros((), jnp.int32),
        stats=_base.initial_stats(jnp.inf))

  def update_fn(updates, state, params=None):
    del params
    norm = _norms.measure(updates, 2, axis_name=axis_name, replicated=replicated).total
    finite = jnp.isfinite(norm)
    length = state.history.shape[0]
    recorded = state.history.at[state.position].set(norm.astype(_F32))
    buffer = _keep(finite, recorded, state.history)
    filled = _keep(finite, jnp.minimum(_base.next_count(state.filled), length), state.filled)
    position = _keep(finite, (state.position + 1) % length, state.position)
    threshold = _percentile(buffer, filled, _f32(percentile))
    scale, clipped, finite = _base.scale_rule(norm, threshold)
    stats = _base.make_stats(norm, threshold, scale, clipped, finite)
    return _base.apply_scale(updates, scale), AutoclipState(
        history=buffer, position=position, filled=filled, stats=stats)

  return optax.GradientTransformation(init_fn, update_fn)


# ZClip ------------------------------------------------------------------------


@_base.stats_state("zclip")
class ZclipState(NamedTuple):
  """State of :func:`zclip`.

  During warm-up ``mean`` and ``var`` hold the mean and (population) variance
  of the norms seen so far; after it, their exponential moving averages.
  """

  mean: jax.Array  # [] float32, μ
  var: jax.Array  # [] float32, σ²
  count: jax.Array  # [] int32, finite steps seen (the warm-up clock; NaN steps do not count)
  stats: ClipStats


def zclip(alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
          max_norm: Threshold | None = None, *, axis_name: _norms.AxisName = None,
          replicated: Any = None) -> optax.GradientTransformation:
  """ZClip: clips global-norm spikes detected by a z-score against moving statistics.

  The first ``warmup_steps`` finite global norms pass unclipped; their mean
  and population variance initialise ``μ`` and ``σ²``. After that, with
  ``σ = sqrt(σ²)``::

    z = (‖g‖ − μ) / (σ + 1e-6)
    ĝ = μ + (z_thresh² / z) · σ   if z > z_thresh   (g is scaled to norm ĝ)
    ĝ = ‖g‖                       otherwise
    μ ← α·μ + (1 − α)·ĝ
    σ² ← α·σ² + (1 − α)·(ĝ − μ)²                     (with the new μ)

  The bigger the spike, the lower its clipped norm. With ``max_norm`` the
  output norm is also capped at ``max_norm`` on every step, warm-up included;
  the cap does not enter the statistics (as in the reference code). A step
  whose norm is NaN or inf passes through unscaled and changes neither
  ``μ``, ``σ²`` nor the warm-up count. The statistics report as
  ``threshold`` the norm the update was clipped to, or, when it was not, the
  norm above which it would have been (``μ + z_thresh·(σ + 1e-6)``, capped by
  ``max_norm``; ``max_norm`` or inf during warm-up).

  Args:
    alpha: the moving averages' decay, in ``[0, 1)``. Default 0.97.
    z_thresh: the z-score above which a norm is a spike (> 0). Default 2.5.
    warmup_steps: how many finite steps initialise the statistics (>= 1).
      Default 25.
    max_norm: optional hard cap on the global norm (a number, scalar array or
      ``optax.Schedule`` of the finite-step count); ``None`` (default) for none.
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      global norm is taken over all shards with one collective.
    replicated: pytree prefix of bools marking leaves that are the same on
      every device of ``axis_name``; they are counted once.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ZclipState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> tx = clipjax.zclip(warmup_steps=4)
    >>> state = tx.init(None)
    >>> for norm in [0.9, 1.1, 0.9, 1.1, 100.0]:
    ...   updates, state = tx.update(jnp.array([norm]), state)
    >>> round(float(updates[0]), 4)  # the spike (z ≈ 990) is brought to μ + (2.5² / z)·σ
    1.0006

  References:
    Kumar, Owen, Chowdhury and Güra, `ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training <https://arxiv.org/abs/2504.02507>`_, 2025.
  """
  _base.check_number("alpha", alpha, minimum=0.0, maximum=1.0, strict_max=True,
                     allow_schedule=False)
  _base.check_number("z_thresh", z_thresh, strict_min=True, allow_schedule=False)
  _base.check_int("warmup_steps", warmup_steps, minimum=1)
  _base.check_number("max_norm", max_norm, allow_none=True)

  def init_fn(params):
    del params
    return ZclipState(mean=jnp.zeros((), _F32), var=jnp.zeros((), _F32),
                      count=jnp.zeros((), jnp.int32),
                      stats=_base.initial_stats(_base.initial_threshold(max_norm)))

  def update_fn(updates, state, params=None):
    del params
    norm = _norms.measure(updates, 2, axis_name=axis_name, replicated=replicated).total
    finite = jnp.isfinite(norm)
    x = norm.astype(_F32)
    a, zt = _f32(alpha), _f32(z_thresh)
    warm = state.count < jnp.maximum(jnp.asarray(warmup_steps).astype(jnp.int32), 1)
    std = jnp.sqrt(state.var)
    z = (x - state.mean) / (std + _ZCLIP_EPS)
    spike = ~warm & (z > zt)
    target = state.mean + zt * zt / jnp.where(spike, z, 1.0) * std
    adaptive = jnp.where(spike, target, jnp.inf)
    boundary = jnp.where(warm, jnp.inf, jnp.where(spike, target,
                                                  state.mean + zt * (std + _ZCLIP_EPS)))
    cap = _base.resolve(max_norm, state.count)
    if cap is None:
      high = adaptive
    else:
      high = jnp.minimum(adaptive, cap.astype(_F32))
      boundary = jnp.minimum(boundary, cap.astype(_F32))
    scale, clipped, finite = _base.scale_rule(norm, high.astype(norm.dtype))

    # Warm-up: running mean and population variance (Welford).
    k = (state.count + 1).astype(_F32)
    delta = x - state.mean
    warm_mean = state.mean + delta / k
    warm_var = state.var + (delta * (x - warm_mean) - state.var) / k
    # After warm-up: moving averages of the adaptively clipped norm.
    g_hat = jnp.minimum(x, adaptive)
    ema_mean = a * state.mean + (1.0 - a) * g_hat
    ema_var = a * state.var + (1.0 - a) * jnp.square(g_hat - ema_mean)
    new = ZclipState(
        mean=_keep(finite, jnp.where(warm, warm_mean, ema_mean), state.mean),
        var=_keep(finite, jnp.where(warm, warm_var, ema_var), state.var),
        count=_keep(finite, _base.next_count(state.count), state.count),
        stats=_base.make_stats(norm, boundary, scale, clipped, finite))
    return _base.apply_scale(updates, scale), new

  return optax.GradientTransformation(init_fn, update_fn)


# AdaGC ------------------------------------------------------------------------


@_base.stats_state("adagc")
class AdagcState(NamedTuple):
  """State of :func:`adagc`.

  ``gamma[i]`` is γ_i of leaf ``i`` (in ``jax.tree.leaves`` order); inf until
  the leaf's first nonzero gradient.
  """

  gamma: jax.Array  # [n_leaves] float32, per-tensor reference norms γ_i
  count: jax.Array  # [] int32, finite steps seen (the warm-up clock; NaN steps do not count)
  stats: ClipStats


def adagc(lambda_abs: float = 1.0, lambda_rel: float = 1.05, beta: float = 0.98,
          warmup_steps: int = 100, *, axis_name: _norms.AxisName = None,
          replicated: Any = None) -> optax.GradientTransformation:
  """AdaGC: per-tensor clipping at a moving average of each tensor's own clipped norm.

  During the first ``warmup_steps`` finite steps the update is clipped to
  global norm ``lambda_abs`` and each tensor (leaf) ``i`` tracks the smallest
  norm it came out with. After warm-up each tensor is clipped on its own::

    warm-up:  ĝ = g · min(1, lambda_abs / ‖g‖),   γ_i ← min(γ_i, ‖ĝ_i‖)
    after:    ĝ_i = g_i · min(1, lambda_rel · γ_i / ‖g_i‖),
              γ_i ← β·γ_i + (1 − β)·‖ĝ_i‖

  A zero gradient carries no scale, so a tensor whose gradient is exactly
  zero leaves its γ_i unchanged (in the paper's rule a zero norm during
  warm-up would set γ_i = 0 and zero that tensor for the rest of training);
  a tensor that has had no nonzero gradient yet (γ_i = inf) is not clipped,
  and its first nonzero ``‖ĝ_i‖`` becomes γ_i. A step whose global norm is
  NaN or inf passes through unscaled and changes neither γ nor the warm-up
  count. The statistics report the global norm as ``norm``; as
  ``threshold`` the largest global norm the update could come out with
  (``lambda_abs`` during warm-up, ``sqrt(Σ_i (lambda_rel·γ_i)²)`` after);
  as ``scale`` the smallest factor applied to a tensor.

  Args:
    lambda_abs: the global-norm threshold during warm-up (> 0). Default 1.0.
    lambda_rel: how far above its γ_i a tensor's norm may go (> 0).
      Default 1.05.
    beta: the decay of the moving averages γ_i, in ``[0, 1)``. Default 0.98.
    warmup_steps: how many finite steps use global clipping (>= 0).
      Default 100.
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      per-tensor and global norms are taken over all shards with one
      collective.
    replicated: pytree prefix of bools marking leaves that are the same on
      every device of ``axis_name``; they are counted once.

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`AdagcState`.
    Its ``init`` needs the parameters (or any tree of the updates' structure).

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 1.0])}
    >>> tx = clipjax.adagc(lambda_abs=1.0, lambda_rel=1.0, warmup_steps=1)
    >>> state = tx.init(grads)
    >>> _, state = tx.update(grads, state)  # warm-up: global clip to norm 1
    >>> state.gamma.round(4)  # each tensor's norm after the global clip
    Array([0.9806, 0.1961], dtype=float32)
    >>> updates, state = tx.update({"a": jnp.array([6.0, 8.0]), "b": jnp.array([0.0, 0.1])},
    ...                            state)
    >>> updates["a"].round(4), updates["b"]  # "a" clipped to γ_a, "b" below γ_b
    (Array([0.5883, 0.7845], dtype=float32), Array([0. , 0.1], dtype=float32))

  References:
    Wang, Li, Chen, Zeng, Yang, Yu, Ma and Shen, `AdaGC: Improving Training
    Stability for Large Language Model Pretraining
    <https://arxiv.org/abs/2502.11034>`_, 2025.
  """
  _base.check_number("lambda_abs", lambda_abs, strict_min=True, allow_schedule=False)
  _base.check_number("lambda_rel", lambda_rel, strict_min=True, allow_schedule=False)
  _base.check_number("beta", beta, minimum=0.0, maximum=1.0, strict_max=True,
                     allow_schedule=False)
  _base.check_int("warmup_steps", warmup_steps, minimum=0)

  def init_fn(params):
    n = len(jax.tree.leaves(params))
    return AdagcState(gamma=jnp.full((n,), jnp.inf, _F32), count=jnp.zeros((), jnp.int32),
                      stats=_base.initial_stats(_f32(lambda_abs)))

  def update_fn(updates, state, params=None):
    del params
    n = len(jax.tree.leaves(updates))
    if state.gamma.shape != (n,):
      raise ValueError(
          f"adagc: the state tracks {state.gamma.shape[0]} tensors but the updates have"
          f" {n} leaves; call init with the parameters (a tree of the updates' structure).")
    norms = _norms.measure(updates, 2, axis_name=axis_name, replicated=replicated)
    leaf_norms = norms.leaves.astype(_F32)
    gamma = state.gamma
    warm = state.count < jnp.asarray(warmup_steps).astype(jnp.int32)
    lam_abs, lam_rel, b = _f32(lambda_abs), _f32(lambda_rel), _f32(beta)

    global_scale, _, finite = _base.scale_rule(norms.total, lam_abs.astype(norms.total.dtype))
    relative = lam_rel * gamma  # inf for a tensor without history: not clipped
    leaf_scales, _, _ = _base.scale_rule(leaf_norms, relative)
    scales = jnp.where(warm, global_scale.astype(_F32), leaf_scales)
    scales = jnp.where(finite, scales, jnp.ones((), _F32))

    clipped_norms = scales * leaf_norms
    seen = jnp.isfinite(gamma)
    moving = jnp.where(seen, b * gamma + (1.0 - b) * clipped_norms, clipped_norms)
    tracked = jnp.where(warm, jnp.minimum(gamma, clipped_norms), moving)
    tracked = jnp.where(leaf_norms > 0, tracked, gamma)

    bound = jnp.sqrt(jnp.sum(jnp.square(relative)))
    threshold = jnp.where(warm, lam_abs, bound)
    clipped = finite & jnp.any(scales != 1.0)
    smallest = jnp.min(scales, initial=1.0)
    stats = _base.make_stats(norms.total, threshold, smallest, clipped, finite)
    new = AdagcState(gamma=_keep(finite, tracked, gamma),
                     count=_keep(finite, _base.next_count(state.count), state.count),
                     stats=stats)
    return _base.apply_scale(updates, scales), new

  return optax.GradientTransformation(init_fn, update_fn)


# Quantile tracking ------------------------------------------------------------


@_base.stats_state("quantile_clip")
class QuantileClipState(NamedTuple):
  """State of :func:`quantile_clip`."""

  clip_norm: jax.Array  # [] float32, C: the threshold of the next step
  stats: ClipStats


def quantile_clip(target_quantile: float = 0.9, learning_rate: float = 0.2,
                  initial_norm: float = 1.0, *, axis_name: _norms.AxisName = None,
                  replicated: Any = None) -> optax.GradientTransformation:
  """Clips the global norm at a running estimate of its ``target_quantile``-quantile.

  The geometric quantile update of Andrew et al., applied to the global L2
  norm of each step::

    g ← g · min(1, C / ‖g‖)
    C ← C · exp(−learning_rate · (1[‖g‖ ≤ C] − target_quantile))

  ``C`` rises when a norm is above it and falls when below, and settles where
  a fraction ``target_quantile`` of the norms is at most ``C``: in the long
  run about ``1 − target_quantile`` of the steps are clipped. The state is one
  number. A step whose norm is NaN or inf passes through unscaled and leaves
  ``C`` unchanged; a zero update stays zero (and counts as below ``C``).

  Args:
    target_quantile: the quantile of the norms to track, in ``(0, 1)``.
      Default 0.9.
    learning_rate: the step of the geometric update (> 0). Default 0.2, the
      value Andrew et al. recommend.
    initial_norm: ``C`` at the first step (> 0). Default 1.0.
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      global norm is taken over all shards with one collective.
    replicated: pytree prefix of bools marking leaves that are the same on
      every device of ``axis_name``; they are counted once.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`QuantileClipState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> tx = clipjax.quantile_clip(target_quantile=0.5, learning_rate=0.2)
    >>> updates, state = tx.update(jnp.array([3.0, 4.0]), tx.init(None))
    >>> updates, float(state.stats.threshold)  # clipped at C = 1
    (Array([0.6, 0.8], dtype=float32), 1.0)
    >>> round(float(state.clip_norm), 6)  # C · exp(0.2 · 0.5): the norm was above C
    1.105171

  References:
    Andrew, Thakkar, McMahan and Ramaswamy, `Differentially Private Learning
    with Adaptive Clipping <https://arxiv.org/abs/1905.03871>`_, 2021.
  """
  _base.check_number("target_quantile", target_quantile, minimum=0.0, maximum=1.0,
                     strict_min=True, strict_max=True, allow_schedule=False)
  _base.check_number("learning_rate", learning_rate, strict_min=True, allow_schedule=False)
  _base.check_number("initial_norm", initial_norm, strict_min=True, allow_schedule=False)

  def init_fn(params):
    del params
    return QuantileClipState(clip_norm=_f32(initial_norm),
                             stats=_base.initial_stats(_f32(initial_norm)))

  def update_fn(updates, state, params=None):
    del params
    norm = _norms.measure(updates, 2, axis_name=axis_name, replicated=replicated).total
    c = state.clip_norm
    scale, clipped, finite = _base.scale_rule(norm, c.astype(norm.dtype))
    below = (norm.astype(_F32) <= c).astype(_F32)
    moved = c * jnp.exp(-_f32(learning_rate) * (below - _f32(target_quantile)))
    stats = _base.make_stats(norm, c, scale, clipped, finite)
    return _base.apply_scale(updates, scale), QuantileClipState(
        clip_norm=_keep(finite, moved, c), stats=stats)

  return optax.GradientTransformation(init_fn, update_fn)
