"""Skipping spike steps: a wrapper that drops an update whose gradient norm or loss is an outlier.

:func:`skip_spikes` is the rule of OLMo-core's ``SkipStepOptimizer`` and
Levanter's skip-step wrapper as an optax wrapper: it measures the global norm
once (:func:`clipjax._norms.measure`, one collective under ``axis_name``),
compares it and the loss with a rolling window of the steps it took, and
either runs the inner transformation or returns zeros and leaves every piece
of state as it was.
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

_F32 = jnp.float32


class SkipStats(NamedTuple):
  """What :func:`skip_spikes` measured and decided on its last step, for logging.

  :func:`clipjax.clip_stats` reports the fields as ``"skip_spikes/<field>"``.
  """

  norm: jax.Array  # [] float32, global L2 norm of the incoming updates
  loss: jax.Array  # [] float32, the loss passed as ``value=``; NaN when none was
  threshold: jax.Array  # [] float32, the norm above which the step is skipped; inf for none
  skipped: jax.Array  # [] bool
  skips: jax.Array  # [] int32, steps skipped since ``init``


class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`. A skipped step leaves every field but ``skips``,
  ``consecutive`` and ``stats`` bit for bit as it was."""

  inner: Any  # the inner transformation's state
  norms: jax.Array  # [window] float32, global norms of the last taken steps (ring buffer)
  losses: jax.Array  # [window] float32, their losses; NaN where none was given
  position: jax.Array  # [] int32, the slot the next taken step is written to
  filled: jax.Array  # [] int32, how many slots hold a taken step (<= window)
  consecutive: jax.Array  # [] int32, spike skips in a row (non-finite steps not counted)
  skips: jax.Array  # [] int32, steps skipped since ``init``
  clip_stats: dict[str, SkipStats]  # {name: the last step's statistics}
  stats = _base.STATS


def _initial_stats() -> SkipStats:
  return SkipStats(norm=jnp.zeros((), _F32), loss=jnp.full((), jnp.nan, _F32),
                   threshold=jnp.full((), jnp.inf, _F32), skipped=jnp.zeros((), jnp.bool_),
                   skips=jnp.zeros((), jnp.int32))


def _check_arguments(inner: Any, sigma_factor: Any, window: Any, min_history: Any,
                     max_norm: Any, max_consecutive: Any) -> int | None:
  """Validates the concrete arguments; returns the window length (``None`` if traced)."""
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"skip_spikes: inner={inner!r} must be an optax.GradientTransformation"
        " (for optax.MultiSteps, pass its .gradient_transformation())")
  _checks.check_number("sigma_factor", sigma_factor, strict_min=True, allow_schedule=False)
  size = _checks.check_int("window", window, minimum=2)
  if min_history is not None:
    least = _checks.check_int("min_history", min_history, minimum=1)
    if least is not None and size is not None and least > size:
      raise ValueError(f"{min_history=} must be <= {window=}")
  _checks.check_number("max_norm", max_norm, allow_none=True, allow_schedule=False)
  if max_consecutive is not None:
    _checks.check_int("max_consecutive", max_consecutive, minimum=1)
  return size


def _loss_of(value: Any) -> jax.Array | None:
  """The loss passed as ``value=``, as a float32 scalar; ``None`` when none was passed."""
  if value is None:
    return None
  if jnp.shape(value) != ():
    raise ValueError(f"skip_spikes: value= must be a scalar loss, got shape {jnp.shape(value)}")
  return jnp.asarray(value).astype(_F32)


def _mean_std(buffer: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean and sample standard deviation of ``buffer[valid]``, and how many values that is.

  The values are divided by their largest magnitude first, so their squares
  cannot overflow float32. A single value has standard deviation 0.
  """
  count = jnp.sum(valid.astype(jnp.int32))
  n = count.astype(_F32)
  largest = jnp.max(jnp.where(valid, jnp.abs(buffer), 0.0))
  unit = jnp.where(largest > 0, largest, 1.0)
  x = jnp.where(valid, buffer / unit, 0.0)
  mean = jnp.sum(x) / jnp.maximum(n, 1.0)
  deviation = jnp.where(valid, x - mean, 0.0)
  variance = jnp.sum(deviation * deviation) / jnp.maximum(n - 1.0, 1.0)
  return mean * unit, jnp.sqrt(variance) * unit, count


def _limit(buffer: jax.Array, valid: jax.Array, sigma: jax.Array,
           min_history: int | jax.Array) -> jax.Array:
  """``mean + sigma · std`` of the valid values; inf while fewer than ``min_history``."""
  mean, std, count = _mean_std(buffer, valid)
  return jnp.where(count >= min_history, mean + sigma * std, jnp.inf)


def _record(state: SkipSpikesState, norm: jax.Array, loss: jax.Array, taken: jax.Array
            ) -> dict[str, jax.Array]:
  """The window after the step: a taken step's norm and loss enter it, else it is kept."""
  length = state.norms.shape[0]
  return dict(
      norms=jnp.where(taken, state.norms.at[state.position].set(norm), state.norms),
      losses=jnp.where(taken, state.losses.at[state.position].set(loss), state.losses),
      position=jnp.where(taken, (state.position + 1) % length, state.position),
      filled=jnp.where(taken, jnp.minimum(optax.safe_increment(state.filled), length),
                       state.filled))


def _select(skipped: jax.Array, inner_updates: Any, new_inner: Any, old_inner: Any
            ) -> tuple[Any, Any]:
  """Zeros and the old inner state on a skipped step, else the inner results.

  ``jnp.zeros_like`` reads only shapes and dtypes, so a NaN in the inner
  result cannot reach the zeros; the state is selected leaf by leaf, bit exact.
  """
  updates = jax.tree.map(lambda u: jnp.where(skipped, jnp.zeros_like(u), u), inner_updates)
  kept = jax.tree.map(lambda new, old: jnp.where(skipped, old, new), new_inner, old_inner)
  return updates, kept


@_docs.fill
def skip_spikes(inner: optax.GradientTransformation, *, sigma_factor: float = 6.0,
                window: int = 128, min_history: int | None = None,
                max_norm: float | None = None, max_consecutive: int | None = None,
                axis_name: _norms.AxisName = None,
                replicated: Any = None,
                name: str | None = None) -> optax.GradientTransformationExtraArgs:
  """Skips a step whose gradient norm or loss is a spike against the steps taken before it.

  With ``‖g‖`` the global L2 norm of the incoming updates, ``ℓ`` the loss passed
  as ``update(..., value=loss)`` (optional) and ``W`` the last ``window`` taken
  steps (the current one excluded)::

    limit_g   = mean_W(‖g‖) + sigma_factor · std_W(‖g‖)  if |W| >= min_history, else inf
    limit_ℓ   = mean_W(ℓ) + sigma_factor · std_W(ℓ)      same, over the steps of W with a loss
    threshold = min(limit_g, max_norm)
    spike     = ‖g‖ > threshold  or  ℓ > limit_ℓ
    skip      = ‖g‖ or ℓ is NaN or inf  or  (spike and consecutive < max_consecutive)

  ``std`` is the sample standard deviation (Bessel's ``n − 1``, as
  ``torch.std_mean`` in OLMo-core; 0 for a single value; Levanter's wrapper
  takes the population one, floored at 1e-6). Only taken steps
  enter ``W`` and count toward ``min_history``; a skipped spike never inflates
  the statistics that judge the next step. ``max_norm`` applies from the first
  step, ``min_history`` or not.

  A skipped step returns zeros (the structure and dtypes of ``inner``'s
  output) and leaves the inner state, ``W`` and its counters bit for bit as
  they were; it adds one to ``skips``. ``consecutive`` counts the spike skips
  in a row: after ``max_consecutive`` of them the next finite step is taken
  whatever its norm and loss (``max_norm`` included), enters ``W`` and resets
  the count, so a lasting shift in scale cannot stall training. Without
  ``max_consecutive`` it can: every step above the threshold is skipped. A
  step whose norm or loss is NaN or inf is always skipped, even past
  ``max_consecutive``, and leaves ``consecutive`` unchanged (it neither counts
  toward the escape nor resets it): a non-finite update is never applied.

  A taken step returns ``inner``'s update and state. ``inner`` receives every
  extra argument, ``value`` included (``optax.contrib.reduce_on_plateau``
  inside it reads the same loss). It runs on every step and its results are
  discarded by a select on a skipped one, so collectives inside ``inner``
  never run conditionally. Whether a loss is given is fixed per call site:
  without ``value``, ``limit_ℓ`` is not consulted and the step records no loss.
  Unlike OLMo-core, whose history holds every step (skipped ones included) and
  waits ``max(20, window // 2)`` steps, the window holds taken steps only.

  Args:
    inner: the transformation to wrap (an optimizer, a chain with clippers).
    sigma_factor: how many standard deviations above the mean a spike is
      (> 0). Default 6.0, as OLMo-core and Levanter.
    window: how many taken steps the statistics cover (an int >= 2, static:
      it sets the buffers' length; keep it in ``static_args`` under
      ``optax.inject_hyperparams``). Default 128.
    min_history: how many taken steps ``W`` must hold before ``limit_g`` and
      ``limit_ℓ`` apply, in ``[1, window]``. Default ``window // 2``.
    max_norm: optional absolute bound (>= 0): a norm above it is skipped.
    max_consecutive: optional bound (>= 1) on spike skips in a row; ``None``
      (default) for none.
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      global norm is taken over all shards with one collective. Pass a loss
      that is the same on every device (e.g. ``lax.pmean`` of it), so every
      device decides alike.
    {replicated}
    {name}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipSpikesState`; its ``stats`` (a :class:`SkipStats`) show in
    :func:`clipjax.clip_stats` as ``"skip_spikes/<field>"``.

  Raises:
    TypeError: when ``inner`` is not an ``optax.GradientTransformation``.
    ValueError: for a concrete out-of-range argument, and at ``update`` when
      the state is ``None`` or ``value`` is not a scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipjax
    >>> tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=3.0, window=8, min_history=4)
    >>> state = tx.init(jnp.zeros(2))
    >>> for norm in [1.0, 1.2, 0.9, 1.1]:
    ...   updates, state = tx.update(jnp.array([norm, 0.0]), state, value=2.0 + norm)
    >>> updates, state = tx.update(jnp.array([50.0, 0.0]), state, value=2.5)  # a norm spike
    >>> updates, bool(state.stats.skipped), int(state.stats.skips)
    (Array([0., 0.], dtype=float32), True, 1)
    >>> updates, state = tx.update(jnp.array([1.0, 0.0]), state, value=2.5)
    >>> updates, round(float(state.stats.threshold), 4)  # mean + 3 · std of 1, 1.2, 0.9, 1.1
    (Array([-1., -0.], dtype=float32), 1.4373)

  References:
    OLMo-core's ``SkipStepOptimizer``
    (https://github.com/allenai/OLMo-core, ``src/olmo_core/optim/skip_step_optimizer.py``)
    and Levanter's ``SkipStepConfig`` (https://github.com/stanford-crfm/levanter).
  """
  size = _check_arguments(inner, sigma_factor, window, min_history, max_norm, max_consecutive)
  _layout.check_replicated(replicated)
  inner = optax.with_extra_args_support(inner)
  name = _base.check_name(name, "skip_spikes")

  def init_fn(params):
    if size is None:
      raise ValueError(
          f"skip_spikes: window={window!r} is traced at init, but it sets the buffers'"
          " length; pass it as a static argument"
          " (optax.inject_hyperparams(clipjax.skip_spikes, static_args='window')).")
    return SkipSpikesState(
        inner=inner.init(params), norms=jnp.zeros((size,), _F32),
        losses=jnp.full((size,), jnp.nan, _F32), position=jnp.zeros((), jnp.int32),
        filled=jnp.zeros((), jnp.int32), consecutive=jnp.zeros((), jnp.int32),
        skips=jnp.zeros((), jnp.int32), clip_stats={name: _initial_stats()})

  def thresholds(state):
    """``(threshold, limit_ℓ)`` in force for this step, from the window."""
    least = state.norms.shape[0] // 2 if min_history is None else min_history
    sigma = jnp.asarray(sigma_factor).astype(_F32)
    taken = jnp.arange(state.norms.shape[0], dtype=jnp.int32) < state.filled
    threshold = _limit(state.norms, taken, sigma, least)
    if max_norm is not None:
      threshold = jnp.minimum(threshold, jnp.asarray(max_norm).astype(_F32))
    return threshold, _limit(state.losses, taken & jnp.isfinite(state.losses), sigma, least)

  def decide(state, norm, loss):
    """``(skipped, consecutive, threshold)`` of this step: the rule of the docstring."""
    threshold, loss_limit = thresholds(state)
    finite, spike = jnp.isfinite(norm), norm > threshold
    if loss is not None:
      finite, spike = finite & jnp.isfinite(loss), spike | (loss > loss_limit)
    if max_consecutive is not None:
      spike = spike & (state.consecutive < max_consecutive)
    skipped = ~finite | spike
    run = jnp.where(skipped, optax.safe_increment(state.consecutive), 0)
    return skipped, jnp.where(finite, run, state.consecutive), threshold

  def update_fn(updates, state, params=None, **extra_args):
    state = _base.state_for(updates, state, SkipSpikesState, None, name=name,
                            needs="it keeps a rolling window of past steps")
    loss = _loss_of(extra_args.get("value"))
    norm = _norms.global_norm(updates, axis_name=axis_name, replicated=replicated)
    norm = norm.astype(_F32)
    skipped, consecutive, threshold = decide(state, norm, loss)
    inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    out, inner_state = _select(skipped, inner_updates, inner_state, state.inner)
    shown = jnp.full((), jnp.nan, _F32) if loss is None else loss
    skips = jnp.where(skipped, optax.safe_increment(state.skips), state.skips)
    stats = SkipStats(norm=norm, loss=shown, threshold=threshold, skipped=skipped, skips=skips)
    return out, SkipSpikesState(inner=inner_state, **_record(state, norm, shown, ~skipped),
                                consecutive=consecutive, skips=skips, clip_stats={name: stats})

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
