"""Skipping spike steps: a wrapper that drops an update whose gradient norm or loss is an outlier.

:func:`skip_spikes` is the rule of OLMo-core's ``SkipStepOptimizer`` and
Levanter's skip-step wrapper as an optax wrapper: it measures the global norm
once (:func:`clipjax._norms.measure`, one collective under ``axis_name``),
compares it and the loss with a rolling window of the steps it took, and
either runs the inner transformation or returns zeros and leaves every piece
of state as it was.
"""

from __future__ import annotations

import functools
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

_F32 = jnp.float32
_F32_MAX = float(jnp.finfo(_F32).max)

# The spread of a window is at least this fraction of its mean's magnitude:
# a constant or slowly drifting norm or loss has a standard deviation of 0 or
# of its round-off, and would otherwise make every step that rounds one ulp
# above the mean a spike. float32 resolves about 6e-8 relative.
RELATIVE_FLOOR = 1e-6

NONFINITE_POLICIES = ("skip", "raise")


class SkipStats(NamedTuple):
  """What :func:`skip_spikes` measured and decided on its last step, for logging.

  :func:`clipjax.clip_stats` reports the fields as ``"skip_spikes/<field>"``.
  """

  norm: jax.Array  # [] float32, global L2 norm of the incoming updates
  loss: jax.Array  # [] float32, the loss passed as ``loss=`` or ``value=``; 0.0 when none was
  threshold: jax.Array  # [] float32, the norm above which the step is skipped; float32 max for none
  skipped: jax.Array  # [] bool
  skips: jax.Array  # [] int32, steps skipped since ``init``


class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`.

  A skipped step leaves every field but ``skips``, ``consecutive``,
  ``skip_step`` and the statistics bit for bit as it was (with
  ``count_skipped=True`` a finite skipped step enters the window too); in
  ``inner`` only the fields named ``clip_stats`` change.
  """

  inner: Any  # the inner transformation's state
  norms: jax.Array  # [window] float32, global norms of the last steps in the window (ring buffer)
  losses: jax.Array  # [window] float32, their losses; 0.0 where none was given
  has_loss: jax.Array  # [window] bool, whether the step in the slot was given a loss
  position: jax.Array  # [] int32, the slot the next step of the window is written to
  filled: jax.Array  # [] int32, how many slots hold a step (<= window)
  consecutive: jax.Array  # [] int32, spike skips in a row (non-finite steps not counted)
  skips: jax.Array  # [] int32, steps skipped since ``init``
  skip_step: jax.Array  # [] int32, updates since ``init``, taken or skipped
  clip_stats: dict[str, SkipStats]  # {name: the last step's statistics}
  stats = _base.STATS


def _initial_stats() -> SkipStats:
  return SkipStats(norm=jnp.zeros((), _F32), loss=jnp.zeros((), _F32),
                   threshold=jnp.full((), _F32_MAX, _F32), skipped=jnp.zeros((), jnp.bool_),
                   skips=jnp.zeros((), jnp.int32))


def _check_arguments(inner: Any, sigma_factor: Any, window: Any, min_history: Any,
                     max_norm: Any, max_consecutive: Any, count_skipped: Any,
                     on_nonfinite: Any) -> int | None:
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
  if not isinstance(count_skipped, (bool, np.bool_)):
    raise ValueError(f"{count_skipped=} must be a bool")
  _checks.check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
  return size


def _loss_of(extra_args: dict[str, Any]) -> jax.Array | None:
  """The loss passed as ``loss=`` or ``value=``, as a float scalar; ``None`` when none was."""
  given = {key: extra_args[key] for key in ("loss", "value") if extra_args.get(key) is not None}
  if len(given) > 1:
    raise ValueError("skip_spikes: pass the loss as loss= or as value=, not both")
  if not given:
    return None
  (key, value), = given.items()
  if jnp.shape(value) != ():
    raise ValueError(f"skip_spikes: {key}= must be a scalar loss, got shape {jnp.shape(value)}")
  loss = jnp.asarray(value)
  # Compared in float64 when it is float64 (x64), as the norm; else in float32.
  return loss if loss.dtype == jnp.float64 else loss.astype(_F32)


def _limit(buffer: jax.Array, valid: jax.Array, sigma: jax.Array
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(limit / unit, unit, count)``: the spike limit of ``buffer[valid]``, scaled by ``unit``.

  ``limit = mean + sigma · max(std, RELATIVE_FLOOR · |mean|)`` with the sample
  standard deviation (0 for one value); when ``std`` is below that floor
  (a constant or nearly constant window) the limit is also at least the
  window's largest value, so a value inside the window's range is never a
  spike, whatever the rounding of the mean. The values are divided by their
  largest magnitude ``unit`` first, so their squares cannot overflow float32;
  the caller multiplies back in the dtype it compares in.
  """
  count = jnp.sum(valid.astype(jnp.int32))
  mean, std, unit = _base.window_moments(buffer, valid, sample=True)
  floor = RELATIVE_FLOOR * jnp.abs(mean)
  limit = mean + sigma * jnp.maximum(std, floor)
  top = jnp.max(jnp.where(valid, buffer / unit, -1.0))  # <= 1 where valid: -1 is below all
  return jnp.where(std < floor, jnp.maximum(limit, top), limit), unit, count


def _above(value: jax.Array, limit: tuple[jax.Array, jax.Array, jax.Array],
           least: int | jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(value > limit, limit)`` in ``value``'s dtype; never above before ``least`` values."""
  scaled, unit, count = limit
  bound = scaled.astype(value.dtype) * unit.astype(value.dtype)
  active = count >= least
  return active & (value > bound), jnp.where(active, _base.f32(bound), _F32_MAX)


def _record(state: SkipSpikesState, norm: jax.Array, loss: jax.Array | None,
            enters: jax.Array) -> dict[str, jax.Array]:
  """The window after the step: the step's norm and loss enter it when ``enters``."""
  length = state.norms.shape[0]
  slot = jnp.asarray(state.position)
  norms, losses, has_loss = map(jnp.asarray, (state.norms, state.losses, state.has_loss))
  loss_in = jnp.zeros((), _F32) if loss is None else _base.f32(loss)
  return dict(
      norms=_base.keep(enters, norms.at[slot].set(_base.f32(norm)), norms),
      losses=_base.keep(enters, losses.at[slot].set(loss_in), losses),
      has_loss=_base.keep(enters, has_loss.at[slot].set(loss is not None), has_loss),
      position=_base.keep(enters, (slot + 1) % length, slot),
      filled=_base.keep(enters, jnp.minimum(optax.safe_increment(state.filled), length),
                        state.filled))


def _in_stats(path: tuple[Any, ...]) -> bool:
  """Whether a leaf's path goes through a field (or, restored, an entry) named ``clip_stats``."""
  return any(getattr(key, "name", getattr(key, "key", None)) == _stats.STATS_FIELD
             for key in path)


def _select(skipped: jax.Array, inner_updates: Any, new_inner: Any, old_inner: Any
            ) -> tuple[Any, Any]:
  """Zeros and the old inner state on a skipped step, else the inner results.

  ``jnp.zeros_like`` reads only shapes and dtypes, so a NaN in the inner
  result cannot reach the zeros; the state is selected leaf by leaf, bit
  exact. The inner statistics (every field named ``clip_stats``) are the new
  ones either way: they describe the step, not the running state.
  """
  updates = jax.tree.map(lambda u: jnp.where(skipped, jnp.zeros_like(u), u), inner_updates)
  kept = jax.tree_util.tree_map_with_path(
      lambda path, new, old: new if _in_stats(path) else jnp.where(skipped, old, new),
      new_inner, old_inner)
  return updates, kept


def _raise_if_nonfinite(step: Any, norm: Any, loss: Any, *, name: str) -> None:
  """``on_nonfinite="raise"``: a ``FloatingPointError`` naming the step and what was not finite."""
  bad = [f"the global gradient norm is {float(np.asarray(norm))}"] if not np.isfinite(
      np.asarray(norm)) else []
  if loss is not None and not np.isfinite(np.asarray(loss)):
    bad.append(f"the loss is {float(np.asarray(loss))}")
  if bad:
    raise FloatingPointError(
        f"{name}: at step {int(np.asarray(step))} (updates since init, counted from 0) "
        f"{' and '.join(bad)} (on_nonfinite='raise'; with on_nonfinite='skip' the step "
        "is skipped)")


@_docs.fill
def skip_spikes(inner: optax.GradientTransformation, *, sigma_factor: float = 6.0,
                window: int = 128, min_history: int | None = None,
                max_norm: float | None = None, max_consecutive: int | None = None,
                count_skipped: bool = False, on_nonfinite: str = "skip",
                axis_name: _norms.AxisName = None,
                replicated: Any = None,
                name: str | None = None) -> optax.GradientTransformationExtraArgs:
  """Skips a step whose gradient norm or loss is a spike against the steps before it.

  With ``‖g‖`` the global L2 norm of the incoming updates, ``ℓ`` the loss passed
  as ``update(..., loss=loss)`` or ``update(..., value=loss)`` (optional) and
  ``W`` the last ``window`` steps of the window (the current one excluded;
  taken steps, or every finite step with ``count_skipped``)::

    μ, s      = mean and sample standard deviation over W (of ‖g‖; of ℓ for limit_ℓ)
    spread    = max(s, 1e-6 · |μ|)
    limit     = μ + sigma_factor · spread,  and at least max(W) when s < 1e-6 · |μ|
    limit_g   = limit of the norms   if |W| >= min_history, else none
    limit_ℓ   = limit of the losses  same, over the steps of W with a loss
    threshold = min(limit_g, max_norm)
    spike     = ‖g‖ > threshold  or  ℓ > limit_ℓ
    skip      = ‖g‖ or ℓ is NaN or inf  or  (spike and consecutive < max_consecutive)

  ``s`` is the sample standard deviation (Bessel's ``n − 1``, as
  ``torch.std_mean`` in OLMo-core; 0 for a single value). Its floor, relative
  to the mean (Levanter floors the population deviation at an absolute 1e-6),
  and the bound ``max(W)`` make a constant or nearly constant norm or loss
  never a spike: a value within the range of a window whose spread is below
  the floor is not above the limit, however the mean rounds. ``max_norm``
  applies from the first step, ``min_history`` or not. The norm is compared
  in its own dtype (float64 under x64); the window and the statistics keep
  float32 (a finite norm beyond its range is kept as float32's maximum).

  A skipped step returns zeros (the structure and dtypes of ``inner``'s
  output), leaves the inner state, ``W`` and its counters bit for bit as they
  were, and adds one to ``skips``. Only the inner statistics change: every
  field named ``clip_stats`` inside the inner state (a clipper's statistics)
  takes the skipped step's values, so a clipper inside reports what it
  measured on that step (the norm of the spike), while its running
  statistics stay those of the last taken step.

  With ``count_skipped=False`` (default, as llm.c) only taken steps enter
  ``W``: a skipped spike never inflates the statistics that judge the next
  step. With ``count_skipped=True`` (as MaxText) every finite step enters it,
  skipped spikes included, so a lasting shift in scale becomes the new
  baseline. A step whose norm or loss is NaN or inf never enters ``W``.

  ``consecutive`` counts the spike skips in a row: after ``max_consecutive``
  of them the next finite step is taken whatever its norm and loss
  (``max_norm`` included), enters ``W`` and resets the count, so a lasting
  shift in scale cannot stall training. Without ``max_consecutive`` (and
  without ``count_skipped``) it can: every step above the threshold is
  skipped. A step whose norm or loss is NaN or inf is always skipped, even
  past ``max_consecutive``, and leaves ``consecutive`` unchanged (it neither
  counts toward the escape nor resets it): a non-finite update is never
  applied. With ``on_nonfinite="raise"`` such a step raises instead, naming
  its ``skip_step``: a ``FloatingPointError`` when ``update`` runs eagerly;
  under ``jit`` (or ``scan``, ``shard_map``) a ``jax.debug.callback`` raises
  it on the host and it reaches the caller as a
  ``jax.errors.JaxRuntimeError`` with the same message.

  A taken step returns ``inner``'s update and state. ``inner`` receives every
  extra argument unchanged, ``loss`` and ``value`` included
  (``optax.contrib.reduce_on_plateau`` inside it reads the same loss). It
  runs on every step and its results are discarded by a select on a skipped
  one, so collectives inside ``inner`` never run conditionally. Whether a loss
  is given is fixed per call site: without one, ``limit_ℓ`` is not consulted
  and the step records no loss (``loss`` reads 0.0). Unlike OLMo-core, which
  waits ``max(20, window // 2)`` steps, ``min_history`` defaults to
  ``window // 2``.

  Args:
    inner: the transformation to wrap (an optimizer, a chain with clippers).
    sigma_factor: how many standard deviations above the mean a spike is
      (> 0). Default 6.0, as OLMo-core and Levanter.
    window: how many steps the statistics cover (an int >= 2, static: it sets
      the buffers' length; keep it in ``static_args`` under
      ``optax.inject_hyperparams``). Default 128.
    min_history: how many steps ``W`` must hold before ``limit_g`` and
      ``limit_ℓ`` apply, in ``[1, window]``. Default ``window // 2``.
    max_norm: optional absolute bound (>= 0): a norm above it is skipped.
    max_consecutive: optional bound (>= 1) on spike skips in a row; ``None``
      (default) for none.
    count_skipped: whether skipped (finite) steps enter ``W``. Default False.
    on_nonfinite: ``"skip"`` (default) skips a step whose norm or loss is NaN
      or inf; ``"raise"`` raises (see above).
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      global norm is taken over all shards with one collective. Pass a loss
      that is the same on every device (e.g. ``lax.pmean`` of it), so every
      device decides alike.
    {replicated}
    {name}

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipSpikesState`; its ``stats`` (a :class:`SkipStats`) show in
    :func:`clipjax.clip_stats` as ``"skip_spikes/<field>"``. ``threshold``
    reads float32's maximum while no threshold applies, ``loss`` 0.0 on a
    step given no loss.

  Raises:
    TypeError: when ``inner`` is not an ``optax.GradientTransformation``.
    ValueError: for a concrete out-of-range argument, and at ``update`` when
      the state is ``None``, the loss is not a scalar, or it is given as both
      ``loss=`` and ``value=``.
    FloatingPointError: with ``on_nonfinite="raise"``, at an eager ``update``
      whose norm or loss is NaN or inf.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipjax
    >>> tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=3.0, window=8, min_history=4)
    >>> state = tx.init(jnp.zeros(2))
    >>> for norm in [1.0, 1.2, 0.9, 1.1]:
    ...   updates, state = tx.update(jnp.array([norm, 0.0]), state, loss=2.0 + norm)
    >>> updates, state = tx.update(jnp.array([50.0, 0.0]), state, loss=2.5)  # a norm spike
    >>> updates, bool(state.stats.skipped), int(state.stats.skips)
    (Array([0., 0.], dtype=float32), True, 1)
    >>> updates, state = tx.update(jnp.array([1.0, 0.0]), state, loss=2.5)
    >>> updates, round(float(state.stats.threshold), 4)  # mean + 3 · std of 1, 1.2, 0.9, 1.1
    (Array([-1., -0.], dtype=float32), 1.4373)

  References:
    OLMo-core's ``SkipStepOptimizer``
    (https://github.com/allenai/OLMo-core, ``src/olmo_core/optim/skip_step_optimizer.py``),
    Levanter's ``SkipStepConfig`` (https://github.com/stanford-crfm/levanter),
    llm.c's ``skip_update_lossz``/``skip_update_gradz``
    (https://github.com/karpathy/llm.c) and MaxText's spike skipping
    (https://github.com/AI-Hypercomputer/maxtext).
  """
  size = _check_arguments(inner, sigma_factor, window, min_history, max_norm, max_consecutive,
                          count_skipped, on_nonfinite)
  _layout.check_replicated(replicated)
  inner = optax.with_extra_args_support(inner)
  name = _base.check_name(name, "skip_spikes")

  def init_fn(params):
    if size is None:
      raise ValueError(
          f"skip_spikes: window={window!r} is traced at init, but it sets the buffers'"
          " length; pass it as a static argument"
          " (optax.inject_hyperparams(clipjax.skip_spikes, static_args='window')).")
    # One array per field: a donated state must not hold one buffer twice.
    counters = {field: jnp.zeros((), jnp.int32)
                for field in ("position", "filled", "consecutive", "skips", "skip_step")}
    return SkipSpikesState(
        inner=inner.init(params), norms=jnp.zeros((size,), _F32),
        losses=jnp.zeros((size,), _F32), has_loss=jnp.zeros((size,), jnp.bool_),
        **counters, clip_stats={name: _initial_stats()})

  def decide(state, norm, loss):
    """``(skipped, finite, consecutive, threshold)`` of this step: the rule of the docstring."""
    least = state.norms.shape[0] // 2 if min_history is None else min_history
    sigma = _base.f32(sigma_factor)
    taken = jnp.arange(state.norms.shape[0], dtype=jnp.int32) < state.filled
    spike, threshold = _above(norm, _limit(state.norms, taken, sigma), least)
    if max_norm is not None:
      bound = jnp.asarray(max_norm)
      spike = spike | (norm > bound.astype(norm.dtype))
      threshold = jnp.minimum(threshold, _base.f32(bound))
    finite = jnp.isfinite(norm)
    if loss is not None:
      loss_spike, _ = _above(loss, _limit(state.losses, taken & state.has_loss, sigma), least)
      finite, spike = finite & jnp.isfinite(loss), spike | loss_spike
    if max_consecutive is not None:
      spike = spike & (state.consecutive < max_consecutive)
    skipped = ~finite | spike
    run = jnp.where(skipped, optax.safe_increment(state.consecutive), 0)
    return skipped, finite, jnp.where(finite, run, state.consecutive), threshold

  def update_fn(updates, state, params=None, **extra_args):
    state = _base.state_for(updates, state, SkipSpikesState, None, name=name,
                            needs="it keeps a rolling window of past steps")
    loss = _loss_of(extra_args)
    norm = _norms.global_norm(updates, axis_name=axis_name, replicated=replicated)
    if on_nonfinite == "raise":
      _checks.raise_on_host(functools.partial(_raise_if_nonfinite, name=name),
                            state.skip_step, norm, loss)
    skipped, finite, consecutive, threshold = decide(state, norm, loss)
    inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    out, inner_state = _select(skipped, inner_updates, inner_state, state.inner)
    skips = jnp.where(skipped, optax.safe_increment(state.skips), state.skips)
    shown = jnp.zeros((), _F32) if loss is None else _base.f32(loss)
    stats = SkipStats(norm=_base.f32(norm), loss=shown, threshold=threshold, skipped=skipped,
                      skips=skips)
    enters = finite if count_skipped else ~skipped
    return out, SkipSpikesState(
        inner=inner_state, **_record(state, norm, loss, enters), consecutive=consecutive,
        skips=skips, skip_step=optax.safe_increment(state.skip_step), clip_stats={name: stats})

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
