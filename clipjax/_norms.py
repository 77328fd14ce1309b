"""Norms of gradient trees: float32 accumulation, one cross-device reduction.

This module is the only place that knows about ``ord``, the accumulation
dtype, ``axis_name`` and ``replicated``. Clippers measure through
:func:`measure`, which reduces the per-leaf partial norms of one update with a
single collective; a clipper with other cross-device sums (AGC's per-unit
sums, ``clip``'s smallest magnitude) reduces them through :func:`all_reduce`,
the one owner of the collective and of the count-once rule for replicated
leaves.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _xla

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
    if np.asarray(ord).dtype.kind in "bcOSU":  # True would read as 1, 1+0j as 1
      raise TypeError
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


def _tiny_partial(acc: jnp.dtype, power: int) -> float:
  """Below this an unrooted partial of ``|x|^power`` may have lost elements to underflow."""
  return 2.0 ** ((jnp.finfo(acc).minexp // 2 + 13) * power)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` of a sum of squares, with a finite derivative everywhere.

  Every root of a sum of squares in the package is taken here. The derivative
  at 0 is 0 (the subgradient of a norm at zero, as ``optax.safe_norm``), not
  inf: the inner ``where`` gives ``sqrt`` a safe input, so a branch that a
  ``where`` does not select cannot turn its zero cotangent into
  ``0 · inf = NaN``. NaN and inf pass through.
  """
  zero = x == 0
  root = jnp.sqrt(jnp.where(zero, jnp.ones((), x.dtype), x))
  return jnp.where(zero, jnp.zeros((), x.dtype), root)


@jax.custom_jvp
def _nan_max(x: jax.Array) -> jax.Array:
  """``max(x)`` of nonnegative ``x`` that is NaN when some element is, on every backend.

  XLA's max all-reduce on CPU drops NaN operands, also where the partitioner
  inserts it (a sharded leaf under plain ``jit``). The max is taken over the
  bit patterns instead, which order nonnegative floats and put NaN above inf:
  an integer reduction, exact. The sign bit is cleared (a NaN may carry one).
  """
  ints = jnp.int64 if x.dtype.itemsize == 8 else jnp.int32
  bits = lax.bitcast_convert_type(x, ints) & jnp.asarray(jnp.iinfo(ints).max, ints)
  return lax.bitcast_convert_type(jnp.max(bits), x.dtype)


@_nan_max.defjvp
def _nan_max_jvp(primals, tangents):
  # As jnp.max: the tangent is shared equally by the elements equal to the max.
  (x,), (t,) = primals, tangents
  top = _nan_max(x)
  at = (x == top).astype(x.dtype)
  return top, jnp.sum(at * t) / jnp.sum(at)


def _magnitude(leaf: jax.Array, acc: jnp.dtype) -> jax.Array:
  """``|x|`` in ``acc``, with derivative 0 at ``x = 0``.

  0 is the subgradient every norm here takes at zero (``jnp.abs`` would give
  1, or NaN for a complex 0); the inner ``where`` keeps ``abs`` off 0.
  """
  zero = leaf == 0
  safe = jnp.where(zero, jnp.ones((), leaf.dtype), leaf)
  return jnp.where(zero, jnp.zeros((), acc), jnp.abs(safe).astype(acc))


def _partial(leaf: jax.Array, ord: Ord, acc: jnp.dtype, factor: float = 1.0) -> jax.Array:
  """The local, unrooted partial norm of one leaf: sum|x|^ord or max|x|."""
  x = _xla.to_square(leaf, acc) if ord == 2 else _magnitude(leaf, acc)
  if factor != 1.0:
    x = x * _xla.opaque(factor, acc)
  if x.size == 0:
    return jnp.zeros((), acc)
  if ord == 2:
    return jnp.sum(x * x)
  if ord == 1:
    return jnp.sum(x)
  return _nan_max(x)


def can_overflow(leaves: Sequence[jax.Array], acc: jnp.dtype) -> bool:
  """Whether a squared element of some leaf can exceed the accumulation range."""
  acc_exp = jnp.finfo(acc).maxexp
  return any(2 * jnp.finfo(leaf.dtype).maxexp > acc_exp
             for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact))


def rescued(plain: list[jax.Array], reread: Callable[[float], list[jax.Array]],
            acc: jnp.dtype, power: int, *, overflow: bool, underflow: bool
            ) -> tuple[list[jax.Array], list[jax.Array]]:
  """The shrunk and grown rows of the local unrooted partials ``plain``.

  ``plain`` is a list of arrays of sums of ``|x|^power`` in ``acc``;
  ``reread(factor)`` computes the same sums over ``x * factor`` from the data.
  The rows are the sums over ``x * 2**-k`` and ``x * 2**k``, derived from
  ``plain`` by exact multiplication unless a local, rare ``lax.cond`` finds a
  plain sum that overflowed (with ``overflow``) or may have underflowed (with
  ``underflow``, below ``2**-100`` for squares); only then are they reread, so
  the common case reads the data once. :func:`root` takes the rescued row
  where the plain sum left the range.
  """
  k = _rescale_exponent(acc)
  # 2**(±k * power) is outside the accumulation range for power 2: apply 2**±k
  # `power` times (each step exact, as long as the result is representable).
  shrink, grow = _xla.opaque(2.0**-k, acc), _xla.opaque(2.0**k, acc)

  def times(x, factor):
    for _ in range(power):
      x = x * factor
    return x

  def derived(_):
    return [times(p, shrink) for p in plain], [times(p, grow) for p in plain]

  if not (overflow or underflow):
    return derived(None)

  def recomputed(_):
    shrunk, grown = derived(None)
    return (reread(2.0**-k) if overflow else shrunk), (reread(2.0**k) if underflow else grown)

  fine = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in plain]))
  if underflow:
    tiny = jnp.asarray(_tiny_partial(acc, power), acc)
    fine = fine & jnp.all(jnp.stack([jnp.all(p >= tiny) for p in plain]))
  if not isinstance(fine, jax.core.Tracer):
    # Outside jit the branch is known: the same result, without compiling a new
    # conditional on every call (its branches are fresh closures).
    return derived(None) if bool(fine) else recomputed(None)
  return lax.cond(fine, derived, recomputed, None)


def root(plain: jax.Array, shrunk: jax.Array, grown: jax.Array | None, power: int
         ) -> jax.Array:
  """The norms of unrooted sums of ``|x|^power``, rescued where ``plain`` left the range.

  ``sqrt(shrunk)·2^k`` (or ``shrunk·2^k`` for power 1) where ``plain``
  overflowed, ``sqrt(grown)·2^-k`` where it may have underflowed (``grown``
  ``None``: no underflow rescue), ``sqrt(plain)`` elsewhere, all through
  :func:`safe_sqrt`.
  """
  dtype = plain.dtype
  k = _rescale_exponent(dtype)
  big, small = jnp.asarray(2.0**k, dtype), jnp.asarray(2.0**-k, dtype)
  take = safe_sqrt if power == 2 else (lambda x: x)
  value = take(plain)
  if grown is not None:
    underflowed = plain < jnp.asarray(_tiny_partial(dtype, power), dtype)
    value = jnp.where(underflowed, take(grown) * small, value)
  return jnp.where(jnp.isfinite(plain), value, take(shrunk) * big)


def _local_partials(leaves: Sequence[jax.Array], ord: Ord, acc: jnp.dtype,
                    small: bool) -> jax.Array:
  """Per-leaf local partials, stacked as ``[3, n_leaves]`` (plain, shrunk, grown).

  Row 0 holds ``sum|x|^ord`` (or ``max|x|``) in ``acc``, rows 1 and 2 the
  same sums over ``x * 2**-k`` and ``x * 2**k`` (see :func:`rescued`; the
  grown row is reread only with ``small``).
  """
  plain = _xla.materialized(jnp.stack([_partial(leaf, ord, acc) for leaf in leaves]))
  if ord == float("inf"):
    return jnp.stack([plain, plain, plain])

  def reread(factor):
    return [jnp.stack([_partial(leaf, ord, acc, factor) for leaf in leaves])]

  (shrunk,), (grown,) = rescued([plain], reread, acc, 2 if ord == 2 else 1,
                                overflow=can_overflow(leaves, acc), underflow=small)
  return jnp.stack([plain, shrunk, grown])


def check_replicated(replicated: Any) -> None:
  """Raises unless ``replicated`` is ``None``, a bool, or a pytree whose leaves are Python bools.

  Called when a transform is built, so a bad value is caught with or without
  ``axis_name``; :func:`replicated_mask` checks that it is a prefix of the
  updates.
  """
  if replicated is None or isinstance(replicated, bool):
    return
  flags = jax.tree.leaves(replicated)
  if not all(isinstance(f, bool) for f in flags):
    raise ValueError(
        f"replicated={replicated!r} must be a bool or a pytree prefix of the updates"
        " holding Python bools, one per leaf or subtree")


def replicated_mask(tree: Any, replicated: Any) -> list[bool]:
  """Expands the pytree prefix ``replicated`` to one bool per leaf of ``tree``."""
  check_replicated(replicated)
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


def _pmax(values: jax.Array, axis_name: AxisName) -> jax.Array:
  """``lax.pmax`` that keeps NaN, with one collective.

  XLA's max all-reduce on CPU drops NaN operands (the pmax of 1, 2, NaN, 3 is
  3), so a NaN on one device would go unseen by the others. An is-NaN
  indicator travels in the same operand, and NaN is restored where it is set.
  """
  nan = jnp.isnan(values)
  both = lax.pmax(jnp.stack([jnp.where(nan, -jnp.inf, values), nan.astype(values.dtype)]),
                  axis_name)
  return jnp.where(both[1] > 0, jnp.full((), jnp.nan, values.dtype), both[0])


def all_reduce(values: jax.Array, axis_name: AxisName, *, maximum: bool | jax.Array = False,
               shared: np.ndarray | None = None) -> jax.Array:
  """Sums (or, with ``maximum``, maxes) ``values`` over ``axis_name`` with ONE collective.

  The only cross-device reduction of the package. NaN and inf on any device
  reach every device: ``psum`` propagates them, the max carries an is-NaN
  indicator in its operand. ``shared`` (NumPy bools broadcastable to
  ``values``) marks entries that hold the same value on every device of the
  axis (replicated leaves): a sum counts them once, from the device of index
  0. A traced ``maximum`` (a traced ``ord``) picks the collective at run
  time, so one is still executed.
  """
  if maximum is not True and shared is not None and shared.any():
    first = lax.axis_index(axis_name) == 0
    keep = jnp.logical_or(jnp.asarray(~shared), first)
    values = jnp.where(keep, values, jnp.zeros((), values.dtype))
  if maximum is True:
    return _pmax(values, axis_name)
  if maximum is False:
    return lax.psum(values, axis_name)
  return lax.cond(maximum, lambda v: _pmax(v, axis_name), lambda v: lax.psum(v, axis_name),
                  values)


class _Partials(NamedTuple):
  """Per-leaf partial norms, reduced over devices; unrooted.

  ``plain[i]`` is ``sum|x_i|^ord`` (or ``max|x_i|``) in the accumulation dtype;
  ``shrunk[i]`` and ``grown[i]`` are the same over ``x_i * 2**∓k``, used
  where ``plain`` overflowed or underflowed.
  """

  plain: jax.Array  # [n_leaves] float32 (float64 under x64)
  shrunk: jax.Array  # [n_leaves] same dtype
  grown: jax.Array  # [n_leaves] same dtype
  ord: Ord

  @classmethod
  def of_rows(cls, rows: jax.Array, ord: Ord) -> "_Partials":
    return cls(rows[0], rows[1], rows[2], ord)


class Norms(NamedTuple):
  """The norms of one update, from one cross-device reduction."""

  leaves: jax.Array  # [n_leaves] float32 (float64 under x64), one norm per leaf
  total: jax.Array  # [] same dtype, the norm of the whole tree
  sizes: np.ndarray  # [n_leaves] int, elements per leaf over all devices (replicated: once)


def _norms_of(partials: _Partials, sizes: np.ndarray) -> Norms:
  if partials.ord == float("inf"):
    return Norms(partials.plain, jnp.max(partials.plain, initial=0.0), sizes)
  power = 2 if partials.ord == 2 else 1
  leaves = root(partials.plain, partials.shrunk, partials.grown, power)
  total = root(jnp.sum(partials.plain), jnp.sum(partials.shrunk), jnp.sum(partials.grown),
               power)
  return Norms(leaves, total, sizes)


def _global_sizes(leaves: Sequence[jax.Array], shared: Sequence[bool],
                  axis_name: AxisName) -> np.ndarray:
  """Elements of each leaf over all devices: a sharded leaf counts on each, a replicated one once."""
  devices = 1 if axis_name is None else lax.axis_size(axis_name)
  return np.asarray([leaf.size if flag else leaf.size * devices
                     for leaf, flag in zip(leaves, shared)], np.int64)


def measure(tree: Any, ord: Any = 2, *, axis_name: AxisName = None,
            replicated: Any = None, small: bool = False) -> Norms:
  """Per-leaf and global norms of ``tree`` with one collective.

  ``ord`` is normally a Python ``1``, ``2`` or ``inf``; a traced ``ord`` (from
  ``optax.inject_hyperparams``) computes all three locally, reduces the
  partials of the one in force, and selects at run time. ``small`` asks for
  exact norms below the float32 range of squares (it may cost a second pass
  when some leaf is zero or tiny); clippers with a lower bound use it.
  """
  ord = check_ord(ord)
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  acc = accumulation_dtype(leaves)
  shared = replicated_mask(tree, replicated)
  sizes = _global_sizes(leaves, shared, axis_name)
  if not leaves:
    empty = jnp.zeros((0,), acc)
    return Norms(empty, jnp.zeros((), acc), sizes)
  ords = VALID_ORDS if isinstance(ord, jax.core.Tracer) else (ord,)
  rows = [_local_partials(leaves, o, acc, small) for o in ords]
  pick = jnp.asarray(ord).astype(jnp.float32)
  chosen = rows[0]
  for value, option in zip(ords[1:], rows[1:]):
    chosen = jnp.where(pick == value, option, chosen)
  if axis_name is not None:
    maximum = ord == float("inf") if len(ords) == 1 else pick == float("inf")
    chosen = all_reduce(chosen, axis_name, maximum=maximum,
                        shared=np.asarray(shared, bool)[None, :])
  options = [_norms_of(_Partials.of_rows(chosen, o), sizes) for o in ords]
  norms = options[0]
  for value, option in zip(ords[1:], options[1:]):
    norms = Norms(jnp.where(pick == value, option.leaves, norms.leaves),
                  jnp.where(pick == value, option.total, norms.total), sizes)
  return norms


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
