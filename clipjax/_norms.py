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
import numpy as np
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
  # The rescue passes multiply elements by 2**-k (overflow) or 2**k (underflow)
  # before squaring: k is large enough that a sum of 2**40 squared maximal
  # values stays finite after shrinking, and that the smallest subnormal
  # squares to a normal number after growing.
  return (jnp.finfo(acc).maxexp + 48) // 2


def _tiny_partial(acc: jnp.dtype, ord: Ord) -> float:
  """Below this an unrooted partial may have lost elements to underflow."""
  power = 2 if ord == 2 else 1
  return 2.0 ** ((jnp.finfo(acc).minexp // 2 + 13) * power)


def _magnitude(leaf: jax.Array, acc: jnp.dtype) -> jax.Array:
  return jnp.abs(leaf).astype(acc)


def _to_square(leaf: jax.Array, acc: jnp.dtype) -> jax.Array:
  """``leaf`` in ``acc``, ready to be squared: real leaves need no abs (a shared
  ``abs(x)`` is materialised per leaf on XLA CPU), complex ones their modulus."""
  if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
    return _magnitude(leaf, acc)
  return leaf.astype(acc)


def _partial(leaf: jax.Array, ord: Ord, acc: jnp.dtype, factor: float = 1.0) -> jax.Array:
  """The local, unrooted partial norm of one leaf: sum|x|^ord or max|x|."""
  x = _to_square(leaf, acc) if ord == 2 else _magnitude(leaf, acc)
  if factor != 1.0:
    x = x * _opaque(factor, acc)
  if x.size == 0:
    return jnp.zeros((), acc)
  if ord == 2:
    return jnp.sum(x * x)
  if ord == 1:
    return jnp.sum(x)
  return jnp.max(x)


def _opaque(factor: float, acc: jnp.dtype) -> jax.Array:
  """A rescaling constant XLA cannot fold: ``(x·c)·(x·c)`` must not become ``x²·c²``.

  ``c²`` is outside the accumulation range for the rescue factors, so a folded
  product would be ``0·inf``.
  """
  return lax.optimization_barrier(jnp.asarray(factor, acc))


def materialized(values: jax.Array) -> jax.Array:
  """``values`` unchanged, computed once: consumers cannot fuse its producers.

  XLA otherwise fuses the reduction over the stacked per-leaf partials into
  each of the n leaf-sized consumer kernels (n reductions copied n times), so
  compile time grew with n². An identity sort (keyed by an iota) is exact, costs
  microseconds for a vector of n scalars, and is never fused.
  """
  if values.shape[-1] < 2:
    return values
  iota = lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
  return lax.sort((iota, values), dimension=values.ndim - 1, num_keys=1)[1]


def _can_overflow(leaves: Sequence[jax.Array], acc: jnp.dtype) -> bool:
  """Whether a squared element of some leaf can exceed the accumulation range."""
  acc_exp = jnp.finfo(acc).maxexp
  return any(2 * jnp.finfo(leaf.dtype).maxexp > acc_exp
             for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact))


def _local_partials(leaves: Sequence[jax.Array], ord: Ord, acc: jnp.dtype,
                    small: bool) -> jax.Array:
  """Per-leaf local partials, stacked as ``[3, n_leaves]`` (plain, shrunk, grown).

  Row 0 holds ``sum|x|^ord`` (or ``max|x|``) in ``acc``. Rows 1 and 2 hold the
  same sums over ``x * 2**-k`` and ``x * 2**k``. Row 1 is computed from the
  data only when row 0 overflowed on this device, row 2 only (with ``small``)
  when some partial is so small that its squares may have underflowed; that
  is a rare, local ``lax.cond``. Otherwise they are derived from row 0, so the
  common case reads each leaf once.
  """
  plain = materialized(jnp.stack([_partial(leaf, ord, acc) for leaf in leaves]))
  if ord == float("inf"):
    return jnp.stack([plain, plain, plain])
  k = _rescale_exponent(acc)
  power = 2 if ord == 2 else 1
  # 2**(±k * power) is outside the accumulation range for power 2: apply 2**±k
  # `power` times (each step exact, as long as the result is representable).
  shrink, grow = _opaque(2.0**-k, acc), _opaque(2.0**k, acc)

  def times(x, factor):
    for _ in range(power):
      x = x * factor
    return x

  if not (_can_overflow(leaves, acc) or small):
    return jnp.stack([plain, times(plain, shrink), times(plain, grow)])

  def derived(_):
    return jnp.stack([times(plain, shrink), times(plain, grow)])

  def recomputed(_):
    shrunk = jnp.stack([_partial(leaf, ord, acc, 2.0**-k) for leaf in leaves])
    if not small:
      # Only overflow is rescued: the grown row is not read where plain is large.
      return jnp.stack([shrunk, times(plain, grow)])
    return jnp.stack([shrunk, jnp.stack([_partial(leaf, ord, acc, 2.0**k) for leaf in leaves])])

  fine = jnp.all(jnp.isfinite(plain))
  if small:
    fine = fine & jnp.all(plain >= jnp.asarray(_tiny_partial(acc, ord), acc))
  rescued = lax.cond(fine, derived, recomputed, None)
  return jnp.concatenate([plain[None], rescued])


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

  ``plain[i]`` is ``sum|x_i|^ord`` (or ``max|x_i|``) in the accumulation dtype;
  ``shrunk[i]`` and ``grown[i]`` are the same over ``x_i * 2**∓exponent``, used
  where ``plain`` overflowed or underflowed.
  """

  plain: jax.Array  # [n_leaves] float32 (float64 under x64)
  shrunk: jax.Array  # [n_leaves] same dtype
  grown: jax.Array  # [n_leaves] same dtype
  ord: Ord
  exponent: int
  tiny: float


def reduced_partials(tree: Any, ord: Ord = 2, *, axis_name: AxisName = None,
                     replicated: Any = None, small: bool = False) -> Partials:
  """Per-leaf partial norms of ``tree``, reduced with ONE collective.

  Under ``axis_name`` the stacked partials of all leaves are summed (``psum``,
  ord 1 and 2) or maxed (``pmax``, ord inf) once. A leaf marked in
  ``replicated`` holds the same values on every device, so only the device of
  index 0 contributes it to a sum. ``small`` asks for exact norms below the
  float32 range of squares (it may cost a second pass when some leaf is zero
  or tiny); clippers with a lower bound use it.
  """
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  acc = accumulation_dtype(leaves)
  exponent = _rescale_exponent(acc)
  tiny = _tiny_partial(acc, ord)
  if not leaves:
    empty = jnp.zeros((0,), acc)
    return Partials(empty, empty, empty, ord, exponent, tiny)
  partials = _local_partials(leaves, ord, acc, small)
  if axis_name is not None:
    partials = _all_reduce(partials, tree, axis_name, replicated, ord == float("inf"))
  return Partials(partials[0], partials[1], partials[2], ord, exponent, tiny)


def _all_reduce(partials: jax.Array, tree: Any, axis_name: AxisName, replicated: Any,
                maximum: bool | jax.Array) -> jax.Array:
  """Reduces stacked ``[3, n_leaves]`` partials over ``axis_name`` with ONE collective.

  ``pmax`` when ``maximum`` (ord inf), else ``psum`` with replicated leaves
  contributed by index 0 only. A traced ``maximum`` (a traced ``ord``) picks
  the collective at run time, so one is still executed per update.
  """
  if maximum is True:
    return lax.pmax(partials, axis_name)
  # (Masking is harmless for a traced max: the partials are >= 0 and index 0 keeps them.)
  partials = count_once(partials, np.asarray(replicated_mask(tree, replicated), bool)[None, :],
                        axis_name)
  if maximum is False:
    return lax.psum(partials, axis_name)
  return lax.cond(maximum, lambda p: lax.pmax(p, axis_name), lambda p: lax.psum(p, axis_name),
                  partials)


def count_once(values: jax.Array, shared: np.ndarray, axis_name: AxisName) -> jax.Array:
  """Zeroes the ``shared`` entries of ``values`` on every device but index 0.

  A sharded value counts on every device, a replicated one (the same on every
  device of ``axis_name``) only once, when ``values`` is then summed over the
  axis. ``shared`` is a NumPy bool array broadcastable to ``values``.
  """
  if not shared.any():
    return values
  first = lax.axis_index(axis_name) == 0
  keep = jnp.logical_or(jnp.asarray(~shared), first)
  return jnp.where(keep, values, jnp.zeros((), values.dtype))


def _root(plain: jax.Array, shrunk: jax.Array, grown: jax.Array, partials: Partials
          ) -> jax.Array:
  """Turns unrooted partials into a norm, rescued where ``plain`` left the range."""
  if partials.ord == float("inf"):
    return plain
  dtype = plain.dtype
  big = jnp.asarray(2.0**partials.exponent, dtype)
  small = jnp.asarray(2.0**-partials.exponent, dtype)
  overflowed = ~jnp.isfinite(plain)
  underflowed = plain < jnp.asarray(partials.tiny, dtype)
  if partials.ord == 2:
    return jnp.where(overflowed, jnp.sqrt(shrunk) * big,
                     jnp.where(underflowed, jnp.sqrt(grown) * small, jnp.sqrt(plain)))
  return jnp.where(overflowed, shrunk * big,
                   jnp.where(underflowed, grown * small, plain))


def leaf_norms_from(partials: Partials) -> jax.Array:
  """One norm per leaf, ``[n_leaves]``."""
  return _root(partials.plain, partials.shrunk, partials.grown, partials)


def global_norm_from(partials: Partials) -> jax.Array:
  """The norm of the whole tree, a scalar."""
  if partials.ord == float("inf"):
    return jnp.max(partials.plain, initial=0.0)
  return _root(jnp.sum(partials.plain), jnp.sum(partials.shrunk), jnp.sum(partials.grown),
               partials)


class Norms(NamedTuple):
  """The norms of one update, from one cross-device reduction."""

  leaves: jax.Array  # [n_leaves] float32 (float64 under x64), one norm per leaf
  total: jax.Array  # [] same dtype, the norm of the whole tree


def measure(tree: Any, ord: Any = 2, *, axis_name: AxisName = None,
            replicated: Any = None, small: bool = False) -> Norms:
  """Per-leaf and global norms of ``tree`` with one collective.

  ``ord`` is normally a Python ``1``, ``2`` or ``inf``; a traced ``ord`` (from
  ``optax.inject_hyperparams``) computes all three and selects at run time.
  ``small`` makes norms whose squares underflow float32 exact (see
  :func:`reduced_partials`).
  """
  ord = check_ord(ord)
  if isinstance(ord, jax.core.Tracer):
    pick = jnp.asarray(ord).astype(jnp.float32)
    local = [reduced_partials(tree, o, small=small) for o in VALID_ORDS]
    if axis_name is not None and local[0].plain.shape[0]:
      # Reduce only the partials of the ord in force: one collective per update.
      def rows(p):
        return jnp.stack([p.plain, p.shrunk, p.grown])

      chosen = rows(local[0])
      for value, option in zip(VALID_ORDS[1:], local[1:]):
        chosen = jnp.where(pick == value, rows(option), chosen)
      chosen = _all_reduce(chosen, tree, axis_name, replicated, pick == float("inf"))
      local = [p._replace(plain=chosen[0], shrunk=chosen[1], grown=chosen[2]) for p in local]
    options = [Norms(leaf_norms_from(p), global_norm_from(p)) for p in local]
    leaves, total = options[0].leaves, options[0].total
    for value, norms in zip(VALID_ORDS[1:], options[1:]):
      leaves = jnp.where(pick == value, norms.leaves, leaves)
      total = jnp.where(pick == value, norms.total, total)
    return Norms(leaves, total)
  partials = reduced_partials(tree, ord, axis_name=axis_name, replicated=replicated,
                              small=small)
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
  """The norm of each leaf, stacked in ``jax.tree.leaves`` order.

  Accumulation, ``ord``, ``axis_name`` and ``replicated`` are as in
  :func:`global_norm`; all leaves are reduced with one collective.

  Returns:
    A ``[n_leaves]`` float32 array (float64 when the tree holds float64 leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> clipjax.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.array([-2.0])})
    Array([5., 2.], dtype=float32)
  """
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
  squared = unit_squares(x, unit_axes(x, axis), accumulation_dtype([x]))
  return jnp.broadcast_to(jnp.sqrt(squared), x.shape)


# Up to this many rows per unit, unit sums of squares add the rows elementwise.
_UNROLLED_ROWS = 64


def unit_squares(x: jax.Array, axes: tuple[int, ...], acc: jnp.dtype) -> jax.Array:
  """The sum of squares of each unit of ``x`` in ``acc``, reduced over ``axes`` with ``keepdims``."""
  x = _to_square(x, acc)
  lead = len(axes)
  rows = int(np.prod(x.shape[:lead]))
  kept = (1,) * lead + x.shape[lead:]
  if (axes == tuple(range(lead)) and lead < x.ndim and 1 < rows <= _UNROLLED_ROWS
      and jax.default_backend() == "cpu" and not is_sharded(x, axes)):
    # A reduction over a short leading axis runs up to 30x below memory speed
    # on XLA CPU; a sum of the rows' squares is one elementwise pass.
    flat = x.reshape((rows,) + x.shape[lead:])
    squares = [flat[i] * flat[i] for i in range(rows)]
    while len(squares) > 1:
      squares = ([a + b for a, b in zip(squares[::2], squares[1::2])]
                 + squares[len(squares) - len(squares) % 2:])
    return squares[0].reshape(kept)
  return jnp.sum(x * x, axis=axes, keepdims=True)


def is_sharded(x: jax.Array, axes: Sequence[int] | None = None) -> bool:
  """Whether ``x``'s type shards any of ``axes`` (default all) over a mesh axis.

  Only explicit sharding shows in the type; an unknown sharding counts as none.
  """
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if spec is None:
    return False
  axes = range(len(spec)) if axes is None else axes
  return any(i < len(spec) and spec[i] is not None for i in axes)


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
