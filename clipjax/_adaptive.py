"""Adaptive clipping: thresholds taken from the history of the gradient norms.

Every clipper here measures the update once (:func:`clipjax._norms.measure`,
one collective under ``axis_name``), computes its threshold from its state,
and scales with the shared rule of :mod:`clipjax._base`. A step whose measured
norm is NaN or inf passes through unscaled and reports ``finite`` False; a
step whose norm is zero stays zero. Either leaves every running statistic of
the state (history, moving averages, warm-up counters) exactly as it was
(:func:`clipjax._base.norm_transform`): one bad step cannot poison the
threshold of the steps after it, and zero steps (frozen or masked
parameters) cannot pull it to 0. Norms enter the float32 state through
:func:`clipjax._base.f32` (a finite float64 norm stays finite); the scale is
computed in the norm's dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _base
from . import _norms
from ._base import ClipStats, Threshold

_F32 = jnp.float32
_TINY = float(jnp.finfo(_F32).tiny)


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
             replicated: Any = None,
             name: str | None = None) -> optax.GradientTransformation:
  """AutoClip: clips the global norm at a percentile of its own recent history.

  With ``‖g‖`` the global L2 norm of the update and ``H`` the global norms of
  the last ``history`` steps with a finite nonzero norm, the current one
  included::

    threshold = percentile(H, percentile)      # linear interpolation
    g ← g · min(1, threshold / ‖g‖)

  The history is a fixed-size ring buffer (``history`` float32 values). A
  step whose norm is NaN or inf is not recorded: the updates pass through
  unscaled, the buffer, its write position and its fill count stay as they
  were. Zero updates stay zero and are not recorded either (recorded, many
  of them would make the threshold 0).

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
    name: the prefix of its statistics in :func:`clipjax.clip_stats`
      (default ``"autoclip"``), to tell apart two transforms of one kind.

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

  def step(norms, state):
    norm = norms.total
    taken = _base.informative(norm)
    length = state.history.shape[0]
    # The threshold reads the history with this step's norm in it (when it is taken).
    buffer = _base.keep(taken, state.history.at[state.position].set(_base.f32(norm)),
                        state.history)
    filled = _base.keep(taken, jnp.minimum(_base.next_count(state.filled), length), state.filled)
    threshold = _percentile(buffer, filled, _base.f32(percentile))
    scale, clipped, finite = _base.scale_rule(norm, threshold)
    return scale, AutoclipState(history=buffer, position=(state.position + 1) % length,
                                filled=filled,
                                stats=_base.make_stats(norm, threshold, scale, clipped, finite))

  return _base.norm_transform(_base.named_state(AutoclipState, name), init_fn, step, axis_name,
                              replicated)


# ZClip ------------------------------------------------------------------------


@_base.stats_state("zclip")
class ZclipState(NamedTuple):
  """State of :func:`zclip`.

  During warm-up ``mean`` and ``var`` hold the mean and (population) variance
  of the norms seen so far; after it, their exponential moving averages.
  """

  mean: jax.Array  # [] float32, μ
  var: jax.Array  # [] float32, σ²
  count: jax.Array  # [] int32, steps with a finite nonzero norm (the warm-up clock)
  stats: ClipStats


_ZCLIP_MODES = ("zscore", "percentile")
_ZCLIP_OPTIONS = ("adaptive_scaling", "mean")


def zclip(alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
          max_norm: Threshold | None = None, *, mode: str = "zscore",
          clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
          skip_update_on_spike: bool = False, eps: float = 1e-6,
          axis_name: _norms.AxisName = None,
          replicated: Any = None,
          name: str | None = None) -> optax.GradientTransformation:
  """ZClip: clips global-norm spikes detected by a z-score against moving statistics.

  The first ``warmup_steps`` finite nonzero global norms pass unclipped; their mean
  and population variance initialise ``μ`` and ``σ²``. After that, with
  ``σ = sqrt(σ²)`` and ``z = (‖g‖ − μ) / (σ + eps)``, a spike is scaled to
  norm ``ĝ`` and the statistics follow the effective norm::

    mode="zscore", clip_option="adaptive_scaling" (default), if z > z_thresh:
        ĝ = clip_factor · (μ + (z_thresh² / z) · σ)
    mode="zscore", clip_option="mean", if z > z_thresh:
        ĝ = μ
    mode="percentile", if ‖g‖ > μ + z_thresh · σ:
        ĝ = μ + z_thresh · σ
    otherwise ĝ = ‖g‖
    μ ← α·μ + (1 − α)·ĝ
    σ² ← α·σ² + (1 − α)·(ĝ − μ)²                     (with the new μ)

  With the default mode, the bigger the spike, the lower its clipped norm.
  With ``skip_update_on_spike`` a spike leaves ``μ`` and ``σ²`` as they were.
  With ``max_norm`` the output norm is also capped at ``max_norm`` on every
  step, warm-up included; the cap does not enter the statistics. A step whose
  norm is NaN, inf or zero passes through unscaled and changes neither ``μ``,
  ``σ²`` nor the warm-up count (an all-zero warm-up would leave μ = σ = 0 and
  clip every later update to 0). The statistics report as ``threshold`` the
  norm the update was clipped to, or, when it was not, the norm above which
  it would have been (capped by ``max_norm``; ``max_norm`` or inf during
  warm-up).

  The options and rules are those of the authors' reference code
  (``ZClip(alpha, z_thresh, max_grad_norm, eps, warmup_steps, mode,
  clip_option, clip_factor, skip_update_on_spike)``), with two differences in
  the defaults: the reference caps the norm at ``max_grad_norm=1.0``, here
  ``max_norm=None`` applies no cap; and the reference's ``clip_factor``
  multiplies the whole adaptive threshold (its code; its docstring says the
  ``z_thresh·σ`` term), as here.

  Args:
    alpha: the moving averages' decay, in ``[0, 1)``. Default 0.97.
    z_thresh: the z-score above which a norm is a spike (> 0). Default 2.5.
    warmup_steps: how many finite nonzero steps initialise the statistics (>= 1).
      Default 25.
    max_norm: optional hard cap on the global norm (a number, scalar array or
      ``optax.Schedule`` of the finite-step count); ``None`` (default) for none.
    mode: ``"zscore"`` (default) clips spikes by their z-score;
      ``"percentile"`` clips every norm above ``μ + z_thresh·σ`` to it.
    clip_option: in ``"zscore"`` mode, ``"adaptive_scaling"`` (default) or
      ``"mean"`` (spikes are clipped to ``μ``).
    clip_factor: multiplies the adaptive threshold (> 0). Default 1.0.
    skip_update_on_spike: leave ``μ`` and ``σ²`` unchanged on a spike.
    eps: added to ``σ`` in the z-score (>= 0). Default 1e-6.
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      global norm is taken over all shards with one collective.
    replicated: pytree prefix of bools marking leaves that are the same on
      every device of ``axis_name``; they are counted once.
    name: the prefix of its statistics in :func:`clipjax.clip_stats`
      (default ``"zclip"``), to tell apart two transforms of one kind.

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
  _base.check_number("clip_factor", clip_factor, strict_min=True, allow_schedule=False)
  _base.check_number("eps", eps, allow_schedule=False)
  _base.check_choice("mode", mode, _ZCLIP_MODES)
  _base.check_choice("clip_option", clip_option, _ZCLIP_OPTIONS)
  _base.check_choice("skip_update_on_spike", skip_update_on_spike, (False, True))

  def init_fn(params):
    del params
    return ZclipState(mean=jnp.zeros((), _F32), var=jnp.zeros((), _F32),
                      count=jnp.zeros((), jnp.int32),
                      stats=_base.initial_stats(_base.initial_threshold(max_norm)))

  # The rule runs in the norm's dtype (float64 under x64, so a norm beyond
  # float32's range is still clipped); the state keeps float32.
  def thresholds(x, mean, var, warm):
    """(whether ``x`` is a spike; the norm it is clipped to; the norm reported as ``threshold``)."""
    zt, e = _base.f32(z_thresh).astype(x.dtype), _base.f32(eps).astype(x.dtype)
    std = _norms.safe_sqrt(var)
    if mode == "percentile":
      bound = mean + zt * std
      spike, target = ~warm & (x > bound), bound
    else:
      bound = mean + zt * (std + e)
      z = (x - mean) / (std + e)
      spike = ~warm & (z > zt)
      factor = _base.f32(clip_factor).astype(x.dtype)
      target = mean if clip_option == "mean" else (
          factor * (mean + zt * zt / jnp.where(spike, z, 1.0) * std))
    return spike, target, jnp.where(warm, jnp.inf, jnp.where(spike, target, bound))

  def moments(x, g_hat, mean, var, count, warm):
    """The next ``(μ, σ²)``: Welford's running values in warm-up, then EMAs of ``ĝ``."""
    a = _base.f32(alpha).astype(x.dtype)
    k = (count + 1).astype(x.dtype)
    delta = x - mean
    warm_mean = mean + delta / k
    warm_var = var + (delta * (x - warm_mean) - var) / k
    ema_mean = a * mean + (1.0 - a) * g_hat
    ema_var = a * var + (1.0 - a) * jnp.square(g_hat - ema_mean)
    return (_base.saturate(_base.f32(jnp.where(warm, warm_mean, ema_mean))),
            _base.saturate(_base.f32(jnp.where(warm, warm_var, ema_var))))

  def step(norms, state):
    x = norms.total
    mean, var = state.mean.astype(x.dtype), state.var.astype(x.dtype)
    warm = state.count < jnp.maximum(jnp.asarray(warmup_steps).astype(jnp.int32), 1)
    spike, target, boundary = thresholds(x, mean, var, warm)
    adaptive = jnp.where(spike, target, jnp.inf)
    high = adaptive
    cap = _base.resolve(max_norm, state.count)
    if cap is not None:
      high = jnp.minimum(adaptive, cap.astype(x.dtype))
      boundary = jnp.minimum(boundary, cap.astype(x.dtype))
    scale, clipped, finite = _base.scale_rule(x, high)
    new_mean, new_var = moments(x, jnp.minimum(x, adaptive), mean, var, state.count, warm)
    if skip_update_on_spike:
      new_mean = jnp.where(spike, state.mean, new_mean)
      new_var = jnp.where(spike, state.var, new_var)
    mean, var = new_mean, new_var
    return scale, ZclipState(mean=mean, var=var, count=_base.next_count(state.count),
                             stats=_base.make_stats(x, boundary, scale, clipped, finite))

  return _base.norm_transform(_base.named_state(ZclipState, name), init_fn, step, axis_name,
                              replicated)


# AdaGC ------------------------------------------------------------------------


@_base.stats_state("adagc")
class AdagcState(NamedTuple):
  """State of :func:`adagc`.

  ``gamma[i]`` is γ_i of tensor ``i``: the leaves in ``jax.tree.leaves``
  order, a leaf with a layer axis one tensor per slice. It is inf until the
  tensor's first nonzero gradient.
  """

  gamma: jax.Array  # [n_tensors] float32, per-tensor reference norms γ_i
  count: jax.Array  # [] int32, steps with a finite nonzero norm (the warm-up clock)
  stats: ClipStats


def adagc(lambda_abs: float = 1.0, lambda_rel: float = 1.05, beta: float = 0.98,
          warmup_steps: int = 100, *, axis_name: _norms.AxisName = None,
          replicated: Any = None, layer_axis: Any = None,
          name: str | None = None) -> optax.GradientTransformation:
  """AdaGC: per-tensor clipping at a moving average of each tensor's own clipped norm.

  During the first ``warmup_steps`` steps with a finite nonzero global norm
  the update is clipped to
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
  NaN, inf or zero passes through unscaled and changes neither γ nor the
  warm-up count. The statistics report the global norm as ``norm``; as
  ``threshold`` the largest global norm the update could come out with
  (``lambda_abs`` during warm-up, ``sqrt(Σ_i (lambda_rel·γ_i)²)`` after);
  as ``scale`` the smallest factor applied to a tensor.

  Args:
    lambda_abs: the global-norm threshold during warm-up (> 0). Default 1.0.
    lambda_rel: how far above its γ_i a tensor's norm may go (> 0).
      Default 1.05.
    beta: the decay of the moving averages γ_i, in ``[0, 1)``. Default 0.98.
    warmup_steps: how many finite nonzero steps use global clipping (>= 0).
      Default 100.
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      per-tensor and global norms are taken over all shards with one
      collective.
    replicated: pytree prefix of bools marking leaves that are the same on
      every device of ``axis_name``; they are counted once.
    layer_axis: pytree prefix of ``int | None``: a leaf with a layer axis
      (a scanned model's stacked layers) holds one tensor, with its own γ,
      per slice along that axis. Give ``init`` the same tree structure.
    name: the prefix of its statistics in :func:`clipjax.clip_stats`
      (default ``"adagc"``), to tell apart two transforms of one kind.

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
    n = sum(_norms.layout(params, layer_axis).counts)
    return AdagcState(gamma=jnp.full((n,), jnp.inf, _F32), count=jnp.zeros((), jnp.int32),
                      stats=_base.initial_stats(_base.f32(lambda_abs)))

  def tracked(gamma, leaf_norms, clipped_norms, warm):
    """The next γ: the smallest clipped norm in warm-up, then its EMA; zero norms skip."""
    b = _base.f32(beta)
    clipped_norms = _base.f32(clipped_norms)
    moving = jnp.where(jnp.isfinite(gamma),
                       _base.saturate(b * gamma + (1.0 - b) * clipped_norms), clipped_norms)
    new = jnp.where(warm, jnp.minimum(gamma, clipped_norms), moving)
    return jnp.where(leaf_norms > 0, new, gamma)

  def step(norms, state):
    if state.gamma.shape != norms.leaves.shape:
      raise ValueError(
          f"adagc: the state tracks {state.gamma.shape[0]} tensors but the updates have"
          f" {norms.leaves.shape[0]} leaves; call init with the parameters (a tree of the"
          " updates' structure).")
    # The scales are computed in the norms' dtype (float64 under x64), so a norm
    # beyond float32's range is still clipped.
    leaf_norms, acc = norms.leaves, norms.leaves.dtype
    warm = state.count < jnp.asarray(warmup_steps).astype(jnp.int32)
    lam_abs = _base.f32(lambda_abs)
    global_scale, _, finite = _base.scale_rule(norms.total, lam_abs.astype(acc))
    relative = _base.f32(lambda_rel) * state.gamma  # inf for a tensor without history: not clipped
    leaf_scales, _, _ = _base.scale_rule(leaf_norms, relative.astype(acc))
    scales = jnp.where(warm, global_scale, leaf_scales)
    scales = jnp.where(finite, scales, jnp.ones((), acc))
    bound = _norms.global_norm(relative.astype(acc))  # overflow-safe, like every norm
    threshold = jnp.where(warm, lam_abs.astype(acc), bound)
    stats = _base.make_stats(norms.total, threshold, jnp.min(scales, initial=1.0),
                             finite & jnp.any(scales != 1.0), finite)
    gamma = tracked(state.gamma, leaf_norms, scales * leaf_norms, warm)
    return (scales, norms.layout), AdagcState(gamma=gamma, count=_base.next_count(state.count),
                                              stats=stats)

  return _base.norm_transform(_base.named_state(AdagcState, name), init_fn, step, axis_name,
                              replicated, layer_axis, per_leaf=True)


# Quantile tracking ------------------------------------------------------------


@_base.stats_state("quantile_clip")
class QuantileClipState(NamedTuple):
  """State of :func:`quantile_clip`."""

  clip_norm: jax.Array  # [] float32, C: the threshold of the next step
  stats: ClipStats


def quantile_clip(target_quantile: float = 0.9, learning_rate: float = 0.2,
                  initial_norm: float = 1.0, *, axis_name: _norms.AxisName = None,
                  replicated: Any = None,
                  name: str | None = None) -> optax.GradientTransformation:
  """Clips the global norm at a running estimate of its ``target_quantile``-quantile.

  The geometric quantile update of Andrew et al., applied to the global L2
  norm of each step::

    g ← g · min(1, C / ‖g‖)
    C ← C · exp(−learning_rate · (1[‖g‖ ≤ C] − target_quantile))

  ``C`` rises when a norm is above it and falls when below, and settles where
  a fraction ``target_quantile`` of the norms is at most ``C``: in the long
  run about ``1 − target_quantile`` of the steps are clipped. The state is one
  number. A step whose norm is NaN or inf passes through unscaled and leaves
  ``C`` unchanged; a zero update stays zero and leaves ``C`` unchanged too
  (counted as below ``C``, zero steps would shrink it to 0 for good). ``C``
  stays within float32's normal range.

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
    name: the prefix of its statistics in :func:`clipjax.clip_stats`
      (default ``"quantile_clip"``), to tell apart two transforms of one kind.

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
  _base.check_number("learning_rate", learning_rate, strict_min=True, allow_schedule=False,
                     finite=True)
  _base.check_number("initial_norm", initial_norm, strict_min=True, allow_schedule=False,
                     finite=True)

  def init_fn(params):
    del params
    return QuantileClipState(clip_norm=_base.f32(initial_norm),
                             stats=_base.initial_stats(_base.f32(initial_norm)))

  def step(norms, state):
    norm, c = norms.total, state.clip_norm
    scale, clipped, finite = _base.scale_rule(norm, c.astype(norm.dtype))
    below = (norm <= c.astype(norm.dtype)).astype(_F32)
    moved = c * jnp.exp(-_base.f32(learning_rate) * (below - _base.f32(target_quantile)))
    # C stays a positive, finite float32: at 0 or inf it could never move again.
    moved = _base.saturate(jnp.maximum(moved, _TINY))
    return scale, QuantileClipState(clip_norm=moved,
                                    stats=_base.make_stats(norm, c, scale, clipped, finite))

  return _base.norm_transform(_base.named_state(QuantileClipState, name), init_fn, step,
                              axis_name, replicated)
