"""ZClip: a z-score test of each gradient norm against its moving mean and variance.

The reference implementation's options (``mode``, ``clip_option``,
``clip_factor``, ``skip_update_on_spike``) are kept under their names. As
every adaptive clipper, it measures the update once, and a step whose norm is
zero, NaN or inf leaves the running statistics as they were
(:func:`clipjax._base.taken_into`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _base
from . import _checks
from . import _docs
from . import _layout
from . import _norms
from . import _partials
from ._base import ClipStats, Threshold

_F32 = jnp.float32


class ZclipState(NamedTuple):
  """State of :func:`zclip`.

  During warm-up ``mean`` and ``var`` hold the mean and (population) variance
  of the norms seen so far; after it, their exponential moving averages.
  """

  mean: jax.Array  # [] float32, μ
  var: jax.Array  # [] float32, σ²
  warmup_count: jax.Array  # [] int32, steps with a finite nonzero norm (the warm-up clock)
  clip_stats: dict[str, ClipStats]  # {name: the last step's statistics}
  stats = _base.STATS


_ZCLIP_MODES = ("zscore", "percentile")
_ZCLIP_OPTIONS = ("adaptive_scaling", "mean")


@_docs.fill
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
  it would have been (capped by ``max_norm``; ``max_norm`` or float32's
  maximum, no threshold, during warm-up).

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
    {axis_name}
    {replicated}
    {name}

  {returns: ZclipState}

  {example}
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
  _checks.check_number("alpha", alpha, minimum=0.0, maximum=1.0, strict_max=True,
                     allow_schedule=False)
  _checks.check_number("z_thresh", z_thresh, strict_min=True, allow_schedule=False)
  _checks.check_int("warmup_steps", warmup_steps, minimum=1)
  _checks.check_number("max_norm", max_norm, allow_none=True)
  _checks.check_number("clip_factor", clip_factor, strict_min=True, allow_schedule=False)
  _checks.check_number("eps", eps, allow_schedule=False)
  _checks.check_choice("mode", mode, _ZCLIP_MODES)
  _checks.check_choice("clip_option", clip_option, _ZCLIP_OPTIONS)
  _checks.check_choice("skip_update_on_spike", skip_update_on_spike, (False, True))

  _layout.check_replicated(replicated)
  name = _base.check_name(name, "zclip")
  needs = _base.HISTORY_NEEDS

  def init_fn(params):
    del params
    return ZclipState(mean=jnp.zeros((), _F32), var=jnp.zeros((), _F32),
                      warmup_count=jnp.zeros((), jnp.int32),
                      clip_stats={name: _base.initial_stats(_base.initial_threshold(max_norm))})

  # The rule runs in the norm's dtype (float64 under x64, so a norm beyond
  # float32's range is still clipped); the state keeps float32.
  def thresholds(x, mean, var, warm):
    """(whether ``x`` is a spike; the norm it is clipped to; the norm reported as ``threshold``)."""
    zt, e = _base.f32(z_thresh).astype(x.dtype), _base.f32(eps).astype(x.dtype)
    std = _partials.safe_sqrt(var)
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
    # No threshold in warm-up: the largest finite value, not an inf for jax_debug_infs.
    none = jnp.asarray(jnp.finfo(x.dtype).max, x.dtype)
    return spike, target, jnp.where(warm, none, jnp.where(spike, target, bound))

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

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, ZclipState, None, name=name, needs=needs)
    x = _norms.global_norm(updates, axis_name=axis_name, replicated=replicated)
    count = jnp.asarray(state.warmup_count)
    mean, var = jnp.asarray(state.mean).astype(x.dtype), jnp.asarray(state.var).astype(x.dtype)
    warm = count < jnp.maximum(jnp.asarray(warmup_steps).astype(jnp.int32), 1)
    spike, target, boundary = thresholds(x, mean, var, warm)
    adaptive = jnp.where(spike, target, jnp.finfo(x.dtype).max)
    high = adaptive
    cap = _base.resolve(max_norm, count)
    if cap is not None:
      high = jnp.minimum(adaptive, cap.astype(x.dtype))
      boundary = jnp.minimum(boundary, cap.astype(x.dtype))
    scale, clipped, finite = _base.scale_rule(x, high)
    new_mean, new_var = moments(x, jnp.minimum(x, adaptive), mean, var, count, warm)
    if skip_update_on_spike:
      new_mean = jnp.where(spike, state.mean, new_mean)
      new_var = jnp.where(spike, state.var, new_var)
    stats = _base.make_stats(x, boundary, scale, clipped, finite)
    new = ZclipState(mean=new_mean, var=new_var, warmup_count=_base.next_count(count),
                     clip_stats={name: stats})
    return _base.apply_scale(updates, _base.ratio_rule(x, high)), _base.taken_into(x, new, state)

  return optax.GradientTransformation(init_fn, update_fn)
