"""Norms of gradient trees: float32 accumulation, one cross-device reduction.

This module is the only place that knows about ``ord``, the accumulation
dtype, ``axis_name`` and ``replicated``. Every clipper measures through
:func:`tree_norms`, which reduces the per-leaf partial norms of one update
with a single collective.
"""

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Hashable | tuple[Hashable, ...] | None
Ord = int | float

VALID_ORDS = (1, 2, float("inf"))


def check_ord(ord: Any) -> Any:  # noqa: A002 - ``ord`` is the name optax and torch use.
  """Returns ``ord`` as ``1``, ``2`` or ``inf``, or raises ``ValueError``.

  A traced ``ord`` (``optax.inject_hyperparams`` injects every numeric
  argument) is returned unchecked; :func:`measure` then selects among the three
  norms at run time.
  """
  if isinstance(ord, jax.core.Tracer):
    return ord
  if isinstance(ord, str) and ord.lower() in ("inf", "infinity"):
    return float("inf")
  try:
    value = float(ord)
  except (TypeError, ValueError):
    raise ValueError(f"{ord=} must be 1, 2 or inf") from None
  if value not in VALID_ORDS:
    raise ValueError(f"{ord=} must be 1, 2 or inf")
  return int(value) if value != float("inf") else value


def accumulation_dtype(leaves: Sequence[jax.typing.ArrayLike]) -> jnp.dtype:
  """float64 when any leaf is float64 (only possible under x64), else float32."""
  for leaf in leaves:
    dtype = jnp.asarray(leaf).dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
      dtype = jnp.finfo(dtype).dtype
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits == 64:
      return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def _rescale_exponent(acc: jnp.dtype) -> int:
  # Elements are multiplied by 2**-k before squaring in the overflow fallback:
  # k is large enough that a sum of 2**40 squared maximal values stays finite,
  # small enough that only elements far below the norm's own scale underflow.
  return (jnp.finfo(acc).maxexp + 48) // 2


def _magnitude(leaf: jax.Array, acc: jnp.dtype) -> jax.Array:
  return jnp.abs(leaf).astype(acc)


def _partial(leaf: jax.Array, ord: Ord, acc: jnp.dtype, factor: float = 1.0) -> jax.Array:
  """The local, unrooted partial norm of one leaf: sum|x|^ord or max|x|."""
  x = _magnitude(leaf, acc)
  if factor != 1.0:
    x = x * jnp.asarray(factor, acc)
  if x.size == 0:
    return jnp.zeros((), acc)
  if ord == 2:
    return jnp.sum(x * x)
  if ord == 1:
    return jnp.sum(x)
  return jnp.max(x)


def _can_overflow(leaves: Sequence[jax.Array], acc: jnp.dtype) -> bool:
  """Whether a squared element of some leaf can exceed the accumulation range."""
  acc_exp = jnp.finfo(acc).maxexp
  return any(2 * jnp.finfo(leaf.dtype).maxexp > acc_exp
             for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact))


def _local_partials(leaves: Sequence[jax.Array], ord: Ord, acc: jnp.dtype) -> jax.Array:
  """Per-leaf local partials, stacked as ``[2, n_leaves]`` (plain, rescaled).

  Row 0 holds ``sum|x|^ord`` (or ``max|x|``) in ``acc``. Row 1 holds the same
  sum over ``x * 2**-k``: it is computed from the data only when row 0
  overflowed on this device (a rare, local ``lax.cond``), otherwise derived
  from row 0, so the common case reads each leaf once.
  """
  plain = jnp.stack([_partial(leaf, ord, acc) for leaf in leaves])
  if ord == float("inf"):
    return jnp.stack([plain, plain])
  k = _rescale_exponent(acc)
  power = 2 if ord == 2 else 1
  shrink = jnp.asarray(2.0 ** (-k * power), acc)
  if not _can_overflow(leaves, acc):
    return jnp.stack([plain, plain * shrink])

  def derived(_):
    return plain * shrink

  def recomputed(_):
    return jnp.stack([_partial(leaf, ord, acc, 2.0**-k) for leaf in leaves])

  rescaled = lax.cond(jnp.all(jnp.isfinite(plain)), derived, recomputed, None)
  return jnp.stack([plain, rescaled])


def replicated_mask(tree: Any, replicated: Any) -> list[bool]:
  """Expands the pytree prefix ``replicated`` to one bool per leaf of ``tree``."""
  n = len(jax.tree.leaves(tree))
  if replicated is None:
    return [False] * n
  if isinstance(replicated, bool):
    return [replicated] * n
  try:
    full = jax.tree.broadcast(replicated, tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
        f"replicated={replicated!r} must be a bool or a pytree prefix of the updates"
    ) from err
  flags = jax.tree.leaves(full)
  if len(flags) != n or not all(isinstance(f, bool) for f in flags):
    raise ValueError(f"replicated={replicated!r} must hold Python bools, one per leaf or subtree")
  return flags


class Partials(NamedTuple):
  """Partial norms of every leaf, reduced over devices; unrooted.

  ``plain[i]`` is ``sum|x_i|^ord`` (or ``max|x_i|``) in the accumulation dtype,
  ``rescaled[i]`` the same over ``x_i * 2**-exponent``, used where ``plain``
  overflowed.
  """

  plain: jax.Array  # [n_leaves] float32 (float64 under x64)
  rescaled: jax.Array  # [n_leaves] same dtype
  ord: Ord
  exponent: int


def reduced_partials(tree: Any, ord: Ord = 2, *, axis_name: AxisName = None,
                     replicated: Any = None) -> Partials:
  """Per-leaf partial norms of ``tree``, reduced with ONE collective.

  Under ``axis_name`` the stacked partials of all leaves are summed (``psum``,
  ord 1 and 2) or maxed (``pmax``, ord inf) once. A leaf marked in
  ``replicated`` holds the same values on every device, so only the device of
  index 0 contributes it to a sum.
  """
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  acc = accumulation_dtype(leaves)
  exponent = _rescale_exponent(acc)
  if not leaves:
    empty = jnp.zeros((0,), acc)
    return Partials(empty, empty, ord, exponent)
  partials = _local_partials(leaves, ord, acc)
  if axis_name is not None:
    partials = _all_reduce(partials, tree, axis_name, replicated, ord == float("inf"))
  return Partials(partials[0], partials[1], ord, exponent)


def _all_reduce(partials: jax.Array, tree: Any, axis_name: AxisName, replicated: Any,
                maximum: bool | jax.Array) -> jax.Array:
  """Reduces stacked ``[2, n_leaves]`` partials over ``axis_name`` with ONE collective.

  ``pmax`` when ``maximum`` (ord inf), else ``psum`` with replicated leaves
  contributed by index 0 only. A traced ``maximum`` (a traced ``ord``) picks
  the collective at run time, so one is still executed per update.
  """
  if maximum is True:
    return lax.pmax(partials, axis_name)
  mask = replicated_mask(tree, replicated)
  if any(mask):
    # A sharded leaf counts on every device, a replicated one on index 0 only
    # (harmless for a traced max: the partials are >= 0 and index 0 keeps them).
    first = lax.axis_index(axis_name) == 0
    keep = jnp.logical_or(jnp.logical_not(jnp.asarray(mask)), first)
    partials = jnp.where(keep[None, :], partials, jnp.zeros((), partials.dtype))
  if maximum is False:
    return lax.psum(partials, axis_name)
  return lax.cond(maximum, lambda p: lax.pmax(p, axis_name), lambda p: lax.psum(p, axis_name),
                  partials)


def _root(plain: jax.Array, rescaled: jax.Array, ord: Ord, exponent: int) -> jax.Array:
  """Turns unrooted partials into a norm, from ``rescaled`` where ``plain`` overflowed."""
  if ord == float("inf"):
    return plain
  grow = jnp.asarray(2.0**exponent, plain.dtype)
  if ord == 2:
    return jnp.where(jnp.isfinite(plain), jnp.sqrt(plain), jnp.sqrt(rescaled) * grow)
  return jnp.where(jnp.isfinite(plain), plain, rescaled * grow)


def leaf_norms_from(partials: Partials) -> jax.Array:
  """One norm per leaf, ``[n_leaves]``."""
  return _root(partials.plain, partials.rescaled, partials.ord, partials.exponent)


def global_norm_from(partials: Partials) -> jax.Array:
  """The norm of the whole tree, a scalar."""
  if partials.ord == float("inf"):
    return jnp.max(partials.plain, initial=0.0)
  return _root(jnp.sum(partials.plain), jnp.sum(partials.rescaled), partials.ord,
               partials.exponent)


class Norms(NamedTuple):
  """The norms of one update, from one cross-device reduction."""

  leaves: jax.Array  # [n_leaves] float32 (float64 under x64), one norm per leaf
  total: jax.Array  # [] same dtype, the norm of the whole tree


def measure(tree: Any, ord: Any = 2, *, axis_name: AxisName = None,
            replicated: Any = None) -> Norms:
  """Per-leaf and global norms of ``tree`` with one collective.

  ``ord`` is normally a Python ``1``, ``2`` or ``inf``; a traced ``ord`` (from
  ``optax.inject_hyperparams``) computes all three and selects at run time.
  """
  ord = check_ord(ord)
  if isinstance(ord, jax.core.Tracer):
    pick = jnp.asarray(ord).astype(jnp.float32)
    local = [reduced_partials(tree, o) for o in VALID_ORDS]
    if axis_name is not None and local[0].plain.shape[0]:
      # Reduce only the partials of the ord in force: one collective per update.
      chosen = jnp.stack([local[0].plain, local[0].rescaled])
      for value, option in zip(VALID_ORDS[1:], local[1:]):
        chosen = jnp.where(pick == value, jnp.stack([option.plain, option.rescaled]), chosen)
      chosen = _all_reduce(chosen, tree, axis_name, replicated, pick == float("inf"))
      local = [p._replace(plain=chosen[0], rescaled=chosen[1]) for p in local]
    options = [Norms(leaf_norms_from(p), global_norm_from(p)) for p in local]
    leaves, total = options[0]
    for value, option in zip(VALID_ORDS[1:], options[1:]):
      leaves = jnp.where(pick == value, option.leaves, leaves)
      total = jnp.where(pick == value, option.total, total)
    return Norms(leaves, total)
  partials = reduced_partials(tree, ord, axis_name=axis_name, replicated=replicated)
  return Norms(leaf_norms_from(partials), global_norm_from(partials))


def global_norm(tree: Any, ord: Ord = 2, *, axis_name: AxisName = None,
                replicated: Any = None) -> jax.Array:
  """The norm of a whole pytree, accumulated in float32 and overflow-safe.

  ``‖g‖_p = (Σ_leaves Σ_i |g_i|^p)^(1/p)`` for ``ord=p`` in {1, 2}, and
  ``max_i |g_i|`` for ``ord=inf``. Each leaf is read once in float32 (float64
  under x64); when a float32 partial overflows, that device recomputes it on
  rescaled values, so a finite float16 or bfloat16 tree has a finite norm
  whenever the norm itself fits in float32.

  Args:
    tree: a pytree of arrays (the leaves may have different dtypes).
    ord: ``1``, ``2`` or ``jnp.inf``.
    axis_name: a mapped axis name, or a tuple of them, over which the leaves are
      sharded (``shard_map``, ``pmap``). The per-leaf partials are reduced with
      one ``psum`` (``pmax`` for inf).
    replicated: a pytree prefix of bools marking leaves that hold the same
      values on every device of ``axis_name``; they are counted once.

  Returns:
    A float32 scalar (float64 when the tree holds float64 leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> grads = {"w": jnp.full((1000,), 300.0, jnp.float16)}
    >>> float(clipjax.global_norm(grads))  # 300 * sqrt(1000); float16 would overflow
    9486.8330078125
    >>> float(clipjax.global_norm({"a": jnp.array([3.0, -4.0])}, ord=1))
    7.0
  """
  return measure(tree, ord, axis_name=axis_name, replicated=replicated).total


def leaf_norms(tree: Any, ord: Ord = 2, *, axis_name: AxisName = None,
               replicated: Any = None) -> jax.Array:
  """The norm of each leaf, stacked in ``jax.tree.leaves`` order; see :func:`global_norm`."""
  return measure(tree, ord, axis_name=axis_name, replicated=replicated).leaves


def unitwise_norm(x: jax.typing.ArrayLike,
                  axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """The L2 norm of each unit of ``x``, broadcast back to ``x``'s shape.

  A unit is a slice of ``x`` along ``axis``. With ``axis=None`` the reduction
  axes follow optax's layer conventions: scalars and vectors are one unit,
  rank 2 and 3 reduce axis 0 (``(in, out)`` kernels), rank 4 reduces
  ``(0, 1, 2)`` (HWIO convolutions), rank 5 ``(0, 1, 2, 3)``. The sum of
  squares accumulates in float32 (float64 under x64); the result has the
  accumulation dtype.

  Args:
    x: an array.
    axis: the axis or axes to reduce; ``None`` infers them from the rank.

  Returns:
    An array of ``x``'s shape holding each element's unit norm.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> clipjax.unitwise_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]))
    Array([[5., 1.],
           [5., 1.]], dtype=float32)
  """
  x = jnp.asarray(x)
  acc = accumulation_dtype([x])
  axes = unit_axes(x, axis)
  magnitude = _magnitude(x, acc)
  squared = jnp.sum(magnitude * magnitude, axis=axes, keepdims=True)
  return jnp.broadcast_to(jnp.sqrt(squared), x.shape)


def unit_axes(x: jax.Array, axis: int | tuple[int, ...] | None) -> tuple[int, ...]:
  """The axes :func:`unitwise_norm` reduces for an array of ``x``'s shape."""
  if axis is not None:
    return (axis,) if isinstance(axis, int) else tuple(axis)
  if sum(d != 1 for d in x.shape) <= 1:
    return tuple(range(x.ndim))
  if x.ndim in (2, 3):
    return (0,)
  if x.ndim == 4:
    return (0, 1, 2)
  if x.ndim == 5:
    return (0, 1, 2, 3)
  raise ValueError(
      f"unitwise_norm: x.shape={x.shape} has no default unit axes; pass axis=")
