"""Clipping at the mean plus a few standard deviations of a rolling window of norms.

:func:`clip_by_rolling_norm` is Levanter's update clipping
(``clip_update_by_historical_norm``): it measures the global norm once
(:func:`clipjax._norms.measure`, one collective under ``axis_name``), clips it
at a threshold read from a ring buffer of the last norms, and records the
unclipped norm. A step whose norm is zero, NaN or inf leaves the buffer as it
was (:func:`clipjax._base.taken_into`).
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
from ._base import ClipStats

_F32 = jnp.float32
# Levanter's floor on the standard deviation: a constant history still leaves some room.
_STD_FLOOR = 1e-6


class ClipByRollingNormState(NamedTuple):
  """State of :func:`clipjax.clip_by_rolling_norm`: a ring buffer of the last unclipped norms."""

  history: jax.Array  # [window] float32, past global norms; slots >= ``filled`` unused
  position: jax.Array  # [] int32, the slot the next norm is written to
  filled: jax.Array  # [] int32, how many slots hold a norm (<= window)
  clip_stats: dict[str, ClipStats]  # {name: the last step's statistics}
  stats = _base.STATS


@_docs.fill
def clip_by_rolling_norm(window: int = 128, sigma_factor: float = 3.0, *,
                         min_history: int | None = None, axis_name: _norms.AxisName = None,
                         replicated: Any = None,
                         name: str | None = None) -> optax.GradientTransformation:
  """Clips the global norm at ``mean + sigma_factor · std`` of the last ``window`` norms.

  Levanter's update clipping (``clip_update_by_historical_norm``). With
  ``‖g‖`` the global L2 norm of the update and ``H`` the unclipped norms of the
  last ``window`` steps before this one::

    threshold = mean(H) + sigma_factor · max(std(H), 1e-6)   if |H| >= min_history, else inf
    g ← g · threshold / max(‖g‖, threshold)
    H ← H + [‖g‖]                                          (the norm before clipping)

  ``std`` is the population standard deviation; the floor lets a constant
  history through with a little room. The norm recorded is the unclipped one,
  so a sustained change of scale enters the window and raises the threshold
  within ``window`` steps. A step whose norm is zero, NaN or inf is not
  recorded and passes through unscaled (``finite`` False when non-finite).

  It works in front of the optimizer (gradient clipping) and behind it, as
  Levanter uses it, on the optimizer's update:
  ``optax.chain(optax.adamw(1e-3), clip_by_rolling_norm())``.

  When to choose it over :func:`clipjax.zclip`: both cut norms far above their
  recent typical value. ZClip keeps exponential moving averages (two numbers
  of state) and records the clipped norm, so a spike barely moves its
  statistics and each spike is scaled by its z-score; this rule keeps an exact
  window (``window`` numbers), records the raw norm, and clips to a fixed
  distance above the mean. Choose it to reproduce Levanter, to clip
  optimizer updates rather than gradients (Adam's normalised updates have a
  steady norm a window describes well), or where a level shift should be
  accepted after ``window`` steps; choose ZClip for gradient spikes in long
  runs whose norm drifts.

  Args:
    window: how many past norms the threshold reads (an int >= 2, static: it
      sets the buffer's length; keep it in ``static_args`` under
      ``optax.inject_hyperparams``). Default 128.
    sigma_factor: how many standard deviations above the mean the threshold
      is (>= 0). Default 3.0.
    min_history: how many norms the window must hold before clipping starts,
      in ``[1, window]``. Default ``max(2, window // 2)``.
    {axis_name}
    {replicated}
    {name}

  {returns: ClipByRollingNormState}

  {example}
    >>> tx = clipjax.clip_by_rolling_norm(window=4, sigma_factor=2.0)
    >>> state = tx.init(None)
    >>> for norm in [1.0, 3.0, 100.0]:  # the third step is clipped to 2 + 2 · 1
    ...   updates, state = tx.update(jnp.array([norm]), state)
    >>> updates, float(state.stats.threshold)
    (Array([4.], dtype=float32), 4.0)
    >>> state.history  # the unclipped norms
    Array([  1.,   3., 100.,   0.], dtype=float32)

  References:
    Levanter's ``clip_update_norm``
    (https://github.com/stanford-crfm/levanter,
    ``src/levanter/optim/clip_update_norm.py``).
  """
  size = _checks.check_int("window", window, minimum=2)
  _checks.check_number("sigma_factor", sigma_factor, allow_schedule=False, finite=True)
  least = None
  if min_history is not None:
    least = _checks.check_int("min_history", min_history, minimum=1)
    if least is not None and size is not None and least > size:
      raise ValueError(f"{min_history=} must be <= {window=}")
  _layout.check_replicated(replicated)
  name = _base.check_name(name, "clip_by_rolling_norm")

  def init_fn(params):
    del params
    if size is None:
      raise ValueError(
          f"clip_by_rolling_norm: window={window!r} is traced at init, but it sets the"
          " buffer's length; pass it as a static argument"
          " (optax.inject_hyperparams(clipjax.clip_by_rolling_norm, static_args='window')).")
    return ClipByRollingNormState(history=jnp.zeros((size,), _F32),
                                  position=jnp.zeros((), jnp.int32),
                                  filled=jnp.zeros((), jnp.int32),
                                  clip_stats={name: _base.initial_stats(
                                      _base.initial_threshold(None))})

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, ClipByRollingNormState, None, name=name,
                            needs=_base.HISTORY_NEEDS)
    norm = _norms.global_norm(updates, axis_name=axis_name, replicated=replicated)
    history, length = jnp.asarray(state.history), state.history.shape[0]
    required = max(2, length // 2) if min_history is None else min_history
    valid = jnp.arange(length, dtype=jnp.int32) < state.filled
    mean, std, unit = _base.window_moments(history, valid, sample=False)
    mean, std = mean * unit, std * unit
    sigma = _base.f32(sigma_factor)
    limit = _base.saturate(mean + sigma * jnp.maximum(std, _STD_FLOOR))
    # "No threshold yet" is the largest value of the norm's dtype: no inf for
    # jax_debug_infs, and no clipping of a finite float64 norm beyond float32's range.
    threshold = jnp.where(state.filled >= required, limit.astype(norm.dtype),
                          jnp.finfo(norm.dtype).max)
    scale, clipped, finite = _base.scale_rule(norm, threshold)
    new = ClipByRollingNormState(
        history=history.at[state.position].set(_base.f32(norm)),
        position=(state.position + 1) % length,
        filled=jnp.minimum(_base.next_count(state.filled), length),
        clip_stats={name: _base.make_stats(norm, threshold, scale, clipped, finite)})
    return (_base.apply_scale(updates, _base.ratio_rule(norm, threshold)),
            _base.taken_into(norm, new, state))

  return optax.GradientTransformation(init_fn, update_fn)
