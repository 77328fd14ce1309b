"""Decay schedules for thresholds and learning rates: polynomial, inverse square root, inverse time.

Each factory validates its concrete arguments and returns an ``optax.Schedule``:
a function of the step count (a Python int or an int32 array, traced under
``jit``) that returns a float32 scalar. Steps below zero count as zero. The
step enters the formulas as ``(T - t) / T`` or ``(T + t) / T`` rather than
``1 ± t/T``, so that for integer ``t`` and ``T`` below ``2**24`` the ratio is
rounded once and the result stays within a few float32 ulps of the exact value.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import _checks
from . import _docs
from . import _xla


def _check(name: str, value: Any, *, positive: bool = False) -> None:
  """A concrete argument must be a finite number, ``>= 0`` (``> 0`` if ``positive``)."""
  _checks.check_number(name, value, strict_min=positive, allow_schedule=False, finite=True)


def _f32(value: jax.typing.ArrayLike) -> jax.Array:
  return jnp.asarray(value).astype(jnp.float32)


def _exponent(power: Any) -> Any:
  """A Python int power stays an int (exact repeated multiplication); else float32."""
  if isinstance(power, int) and not isinstance(power, bool):
    return power
  return _f32(power)


def _step(count: jax.typing.ArrayLike) -> jax.Array:
  """The step count as float32, negative steps counted as zero."""
  return jnp.maximum(_f32(count), jnp.zeros((), jnp.float32))


@_docs.fill
def polynomial_decay(init_value: jax.typing.ArrayLike, decay_steps: jax.typing.ArrayLike,
                     power: jax.typing.ArrayLike = 1.0,
                     end_value: jax.typing.ArrayLike = 0.0) -> optax.Schedule:
  r"""Decays from ``init_value`` to ``end_value`` along a polynomial over ``decay_steps`` steps.

  .. math::
    v(t) = (v_0 - v_T) \left(1 - \frac{\min(t, T)}{T}\right)^{p} + v_T

  the "poly" rule :math:`v_0 (1 - t/T)^p` when ``end_value`` is 0. After
  ``decay_steps`` the value stays at ``end_value``. Equal to
  ``optax.polynomial_schedule(init_value, end_value, power, decay_steps)``
  (with ``transition_begin=0``) and to Keras' ``PolynomialDecay`` without
  ``cycle``. ``end_value`` may exceed ``init_value`` (a polynomial warm-up).

  Args:
    init_value: the value at step 0, a finite number ``>= 0``.
    decay_steps: ``T``, the number of steps over which the value decays, ``> 0``.
    power: ``p``, the exponent of the polynomial, ``>= 0`` (1 is linear decay).
    end_value: the value from step ``T`` on, a finite number ``>= 0``.

  {schedule_returns}

  {raises: decay_steps=0 must be > 0}

  Example:
    >>> import clipjax
    >>> schedule = clipjax.polynomial_decay(1.0, decay_steps=4, power=2)
    >>> [float(schedule(t)) for t in range(6)]
    [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]

  References:
    Liu, Rabinovich and Berg, `ParseNet: Looking Wider to See Better
    <https://arxiv.org/abs/1506.04579>`_, 2015 (the "poly" learning-rate policy).
  """
  _check("init_value", init_value)
  _check("decay_steps", decay_steps, positive=True)
  _check("power", power)
  _check("end_value", end_value)
  exponent = _exponent(power)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    init, end, steps = _xla.unfolded(init_value, end_value, decay_steps)
    remaining = (steps - jnp.minimum(_step(count), steps)) / steps
    return (init - end) * remaining**exponent + end

  return schedule


@_docs.fill
def inverse_sqrt_decay(init_value: jax.typing.ArrayLike,
                       timescale: jax.typing.ArrayLike = 1.0) -> optax.Schedule:
  r"""Decays as the inverse square root of the step.

  .. math::
    v(t) = \frac{v_0}{\sqrt{1 + t / \tau}}

  so ``init_value / sqrt(t + 1)`` with the default ``timescale`` of 1. A
  larger ``timescale`` holds the value near ``init_value`` for longer: it
  halves at ``t = 3 τ``. This is the decay of the Transformer's learning-rate
  rule (without its warm-up; chain one with ``optax.join_schedules``).

  Args:
    init_value: the value at step 0, a finite number ``>= 0``.
    timescale: ``τ``, the step scale of the decay, ``> 0``.

  {schedule_returns}

  {raises: timescale=0.0 must be > 0}

  Example:
    >>> import clipjax
    >>> schedule = clipjax.inverse_sqrt_decay(1.0)
    >>> [float(schedule(t)) for t in (0, 3, 8, 99)]
    [1.0, 0.5, 0.3333333432674408, 0.10000000149011612]

  References:
    Vaswani et al., `Attention Is All You Need
    <https://arxiv.org/abs/1706.03762>`_, 2017 (the inverse square-root
    learning-rate decay).
  """
  _check("init_value", init_value)
  _check("timescale", timescale, positive=True)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    init, tau = _xla.unfolded(init_value, timescale)
    return init / jnp.sqrt((tau + _step(count)) / tau)

  return schedule


@_docs.fill
def inverse_time_decay(init_value: jax.typing.ArrayLike, decay_steps: jax.typing.ArrayLike,
                       power: jax.typing.ArrayLike = 1.0,
                       staircase: bool = False) -> optax.Schedule:
  r"""Decays as an inverse power of time.

  .. math::
    v(t) = \frac{v_0}{(1 + t / \gamma)^{p}}

  with :math:`\lfloor t / \gamma \rfloor` in place of :math:`t / \gamma` when
  ``staircase`` (the value then drops once every ``decay_steps`` steps). With
  ``power=1`` this is the classic ``1/t`` step-size rule of stochastic
  approximation. Keras' ``InverseTimeDecay(a, d, r)``, ``a / (1 + r t / d)``,
  is ``inverse_time_decay(a, d / r)`` (without ``staircase``; Keras' staircase
  form ``a / (1 + r ⌊t / d⌋)`` is this one only when ``r = 1``).

  Args:
    init_value: the value at step 0, a finite number ``>= 0``.
    decay_steps: ``γ``, the number of steps for the denominator to grow by 1,
      ``> 0`` (any positive number, not only integers).
    power: ``p``, the exponent of the denominator, ``>= 0``.
    staircase: whether to decay in discrete steps, every ``decay_steps`` steps.

  {schedule_returns}

  {raises: power=-1.0 must be >= 0}

  Example:
    >>> import clipjax
    >>> schedule = clipjax.inverse_time_decay(1.0, decay_steps=2)
    >>> [float(schedule(t)) for t in range(5)]
    [1.0, 0.6666666865348816, 0.5, 0.4000000059604645, 0.3333333432674408]
    >>> stairs = clipjax.inverse_time_decay(1.0, decay_steps=2, staircase=True)
    >>> [float(stairs(t)) for t in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.3333333432674408]

  References:
    Robbins and Monro, `A Stochastic Approximation Method
    <https://doi.org/10.1214/aoms/1177729586>`_, 1951.
  """
  _check("init_value", init_value)
  _check("decay_steps", decay_steps, positive=True)
  _check("power", power)
  if not isinstance(staircase, bool):
    raise ValueError(f"{staircase=} must be a bool")
  exponent = _exponent(power)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    init, steps = _xla.unfolded(init_value, decay_steps)
    t = _step(count)
    if staircase:
      growth = jnp.floor(t / steps) + jnp.ones((), jnp.float32)
    else:
      growth = (steps + t) / steps
    return init / growth**exponent

  return schedule
