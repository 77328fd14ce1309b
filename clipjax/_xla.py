"""Workarounds for XLA's behaviour, each with the reason it is needed.

They change how a computation is compiled, never its result: every function
here returns exactly what its plain counterpart would. Delete one when a
measurement shows that XLA no longer needs it (benchmarks/RESULTS.md holds
the measurements).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def materialized(values: jax.Array) -> jax.Array:
  """``values`` unchanged, computed once: its consumers cannot fuse its producers.

  Why: XLA fuses a reduction over the stacked per-leaf partials into each of
  the n leaf-sized kernels that read the result, so compile time grows with n².
  An identity sort (keyed by an iota) is exact, cheap for a vector of n scalars,
  and never fused.
  """
  if values.shape[-1] < 2:
    return values
  iota = lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
  return lax.sort((iota, values), dimension=values.ndim - 1, num_keys=1)[1]


def opaque(factor: float, dtype: jnp.dtype) -> jax.Array:
  """The constant ``factor`` in ``dtype``, hidden from XLA's algebraic simplifier.

  Why: XLA rewrites ``(x·c)·(x·c)`` as ``x²·c²``; for the overflow and
  underflow rescue factors ``c²`` is outside the accumulation range, so the
  rewritten product would be ``0·inf``.
  """
  return lax.optimization_barrier(jnp.asarray(factor, dtype))


def scaled(leaf: jax.Array, factor: float, dtype: jnp.dtype,
           cast: Callable[[jax.Array, jnp.dtype], jax.Array]) -> jax.Array:
  """``cast(leaf, dtype) · factor`` for a constant ``factor``, both hidden from XLA.

  Why: the factor is :func:`opaque` for the reason given there. And the
  rescue reads the leaves a second time: where that read shares its
  expressions with the first (a bfloat16 leaf cast to float32), or where
  several leaves of one shape are multiplied by one constant, XLA CPU computes
  the shared expression once, as a leaf-sized temporary. Passing the leaf
  through the barrier with its factor, before the cast, makes the second read
  its own.
  """
  if factor == 1.0:
    return cast(leaf, dtype)
  leaf, factor = lax.optimization_barrier((leaf, jnp.asarray(factor, dtype)))
  return cast(leaf, dtype) * factor


def to_square(leaf: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """``leaf`` cast to ``dtype`` and ready to be squared: the modulus only for complex leaves.

  Why: ``abs(x)`` shared by several reductions of a real leaf is materialised
  as a full-size temporary on XLA CPU; ``x·x`` needs no ``abs``.
  """
  if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
    # The modulus of a safe input: the derivative of |0| would be NaN.
    zero = leaf == 0
    modulus = jnp.abs(jnp.where(zero, jnp.ones((), leaf.dtype), leaf))
    return jnp.where(zero, jnp.zeros((), dtype), modulus.astype(dtype))
  return leaf.astype(dtype)


def unfolded(*values: jax.typing.ArrayLike) -> tuple[jax.Array, ...]:
  """``values`` as float32 arrays that XLA may not fold into constants.

  Why: under ``jit`` XLA rewrites arithmetic on constants (``(x / c)**2``
  becomes ``x * x * (1 / c**2)``), an ulp or more off the formula as written,
  so a jitted schedule would not give exactly ``init_value`` at step 0.
  """
  return lax.optimization_barrier(tuple(jnp.asarray(v).astype(jnp.float32) for v in values))
