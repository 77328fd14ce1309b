"""Argument and update checks: a clear error, naming the argument, when a transform is built.

Tracers and schedules pass unchecked (``optax.inject_hyperparams`` injects
every numeric argument; a schedule is a callable of the step count). The
update-dtype check runs in each transform's ``update``.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_schedule(value: Any) -> bool:
  """Whether a threshold is an ``optax.Schedule`` (a callable of the step count)."""
  return callable(value)


def is_concrete(value: Any) -> bool:
  """Whether ``value`` can be read in Python (not a tracer, not a schedule)."""
  if is_schedule(value) or isinstance(value, jax.core.Tracer):
    return False
  return True


def check_number(name: str, value: Any, *, minimum: float | None = 0.0,
                 maximum: float | None = None, strict_min: bool = False,
                 strict_max: bool = False, allow_none: bool = False,
                 allow_schedule: bool = True, finite: bool = False) -> None:
  """Validates a concrete scalar argument; tracers and schedules pass unchecked.

  With ``finite``, an infinite value is rejected too.

  Raises ``ValueError`` naming the argument and its value, e.g.
  ``max_norm=-1.0 must be >= 0``.
  """
  if value is None:
    if allow_none:
      return
    raise ValueError(f"{name}=None is not allowed")
  if is_schedule(value):
    if allow_schedule:
      return
    raise ValueError(f"{name}={value!r} must be a number, not a schedule")
  if not is_concrete(value):
    return
  # Read with NumPy: jnp.asarray would give a tracer when the transform is built
  # inside a traced function.
  try:
    array = np.asarray(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} must be a number") from None
  if array.ndim != 0:
    raise ValueError(f"{name}={value!r} must be a scalar")
  # jnp.issubdtype: bfloat16 (from inject_hyperparams with bf16 params) is not an
  # np.number; bools and complex numbers are not thresholds.
  if jnp.issubdtype(array.dtype, jnp.complexfloating):
    raise ValueError(f"{name}={value!r} must be a real number")
  if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
    raise ValueError(f"{name}={value!r} must be a number")
  number = float(array)
  shown = value if isinstance(value, (int, float)) else number
  if number != number:
    raise ValueError(f"{name}={shown} must not be NaN")
  if minimum is not None:
    if strict_min and not number > minimum:
      raise ValueError(f"{name}={shown} must be > {minimum:g}")
    if not strict_min and not number >= minimum:
      raise ValueError(f"{name}={shown} must be >= {minimum:g}")
  if maximum is not None:
    if strict_max and not number < maximum:
      raise ValueError(f"{name}={shown} must be < {maximum:g}")
    if not strict_max and not number <= maximum:
      raise ValueError(f"{name}={shown} must be <= {maximum:g}")
  if finite and number in (float("inf"), float("-inf")):
    raise ValueError(f"{name}={shown} must be finite")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices`` (compared by type and value)."""
  if not any(type(value) is type(c) and value == c for c in choices):
    raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")


def check_order(low_name: str, low: Any, high_name: str, high: Any) -> None:
  """Raises when two concrete thresholds are in the wrong order (``low > high``)."""
  if low is None or high is None or not (is_concrete(low) and is_concrete(high)):
    return
  if float(np.asarray(low)) > float(np.asarray(high)):
    raise ValueError(f"{low_name}={low} must be <= {high_name}={high}")


def check_int(name: str, value: Any, *, minimum: int) -> int | None:
  """Validates an integer argument (a size or a step count).

  Accepts a Python int or a concrete integer array and returns it as an int;
  returns ``None`` for a tracer (``optax.inject_hyperparams`` injects every
  numeric argument), which is not checked.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    raise ValueError(f"{name}={value!r} must be an int")
  if not isinstance(value, int):
    try:
      array = np.asarray(value)
    except TypeError:
      raise ValueError(f"{name}={value!r} must be an int") from None
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{name}={value!r} must be an int")
    value = int(array)
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}")
  return value

def check_updates(updates: Any, name: str) -> None:
  """Raises ``TypeError`` naming the first leaf of ``updates`` that is not floating point.

  The dtype policy for integer and bool gradients: scaling them in their own
  dtype would truncate (``[3, 4]`` clipped to norm 1 gives ``[0, 0]``), and a
  clipper never changes the dtype of what it returns, so it refuses them.
  Both transform shells call this; complex leaves are accepted (their modulus
  is measured).
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{name}: updates{jax.tree_util.keystr(path)} has dtype {dtype}, but clipping"
          " needs floating-point updates (cast them, e.g. with .astype(jnp.float32))")


def raise_on_host(check: Callable[..., None], *values: Any) -> None:
  """Runs ``check(*values)``, which raises on bad values: now, or where the computation runs.

  Concrete values are checked at once, so the caller sees ``check``'s own
  exception. Traced ones (under ``jit``, ``scan``, ``shard_map``) are checked
  by a ``jax.debug.callback`` on the host when the computation runs; its
  exception reaches the caller as a ``jax.errors.JaxRuntimeError`` (a
  ``RuntimeError``) with the same message, raised by the transformed call.
  A ``None`` among ``values`` is passed through as ``None``.
  """
  if any(isinstance(v, jax.core.Tracer) for v in values):
    jax.debug.callback(check, *values)
  else:
    check(*values)
