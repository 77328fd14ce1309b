"""The unrooted partial norm of a leaf, and its overflow/underflow rescue.

A partial is ``sum|x|^ord`` (or ``max|x|``) of one leaf, accumulated in
float32 (float64 under x64). Squares of float16/bfloat16 values, and of
large float32 ones, can leave that range: :func:`rescued` recomputes the
partials over rescaled values only when a rare, local ``lax.cond`` finds one
that did, and :func:`root` takes the rescued value where the plain one left
the range. ``_norms`` (per-tensor and global norms) and ``_agc`` (per-unit
norms) measure through here.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from . import _layout
from . import _xla

Ord = int | float


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


def _flat_at_zero(fn: Callable[[jax.Array], jax.Array],
                  slope: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]) -> Callable:
  """``fn`` with the derivative ``slope(x, safe, dx)`` where ``x != 0``, and 0 at ``x = 0``.

  ``safe`` is ``fn(x)`` with 1 where ``x = 0``, a denominator that cannot be 0. 0 is the
  subgradient every norm here takes at zero (as ``optax.safe_norm``), where ``sqrt`` has an
  infinite derivative and ``jnp.abs`` 1 (NaN for a complex 0); a branch that a ``where`` does
  not select then cannot turn its zero cotangent into ``0 · inf = NaN``. As a ``custom_jvp``
  the forward pass stays the bare ``fn``, which XLA CPU fuses into its fast reductions.
  """
  wrapped = jax.custom_jvp(fn)

  @wrapped.defjvp
  def _jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    value = fn(x)
    zero = x == 0
    safe = jnp.where(zero, jnp.ones((), value.dtype), value)
    return value, jnp.where(zero, jnp.zeros((), value.dtype), slope(x, safe, t))

  return wrapped


# Every root of a sum of squares in the package is taken here; NaN and inf pass through.
safe_sqrt = _flat_at_zero(jnp.sqrt, lambda x, root, t: t / (2 * root))
# d|x| = Re(conj(x)·dx)/|x|; sign(x)·dx for real x.
_modulus = _flat_at_zero(
    jnp.abs, lambda x, size, t: (jnp.real(jnp.conj(x) * t) / size if jnp.iscomplexobj(x)
                                 else jnp.sign(x) * t))


@jax.custom_jvp
def _nan_max(x: jax.Array) -> jax.Array:
  """``max(x)`` of nonnegative ``x`` that is NaN when some element is, on every backend.

  XLA's max all-reduce on CPU drops NaN operands, also where the partitioner
  inserts it (a sharded leaf under plain ``jit``). One variadic reduction
  takes the max of the other elements and, beside it, the sum of the NaN
  elements (0 when there is none, NaN otherwise), so that no NaN is left to
  drop (the partitioner gathers the per-device pairs of a sharded leaf); their
  sum is the result. The NaN comes from the input, never from a constant, so
  healthy input runs under ``jax_debug_nans``. A float max alone would drop
  the NaN; a max over the bit patterns as integers is exact, but XLA CPU
  writes them out at leaf size and reduces them about ten times slower; XLA
  CPU's reductions of one operand read selects at leaf size too.
  """
  nan = jnp.isnan(x)
  zero = jnp.zeros((), x.dtype)
  top, nans = lax.reduce(
      (jnp.where(nan, zero, x), jnp.where(nan, x, zero)), (zero, zero),
      lambda a, b: (lax.max(a[0], b[0]), a[1] + b[1]), tuple(range(x.ndim)))
  return top + nans


@_nan_max.defjvp
def _nan_max_jvp(primals, tangents):
  # As jnp.max: the tangent is shared equally by the elements equal to the max.
  (x,), (t,) = primals, tangents
  top = _nan_max(x)
  at = (x == top).astype(x.dtype)
  return top, jnp.sum(at * t) / jnp.sum(at)


def _magnitude(leaf: jax.Array, acc: jnp.dtype) -> jax.Array:
  """``|x|`` in ``acc``, with derivative 0 at ``x = 0``."""
  return _modulus(leaf).astype(acc)


def partial(leaf: jax.Array, ord: Ord, acc: jnp.dtype, factor: float = 1.0,
             layer: int | None = None) -> jax.Array:
  """The local, unrooted partial norm of one leaf: sum|x|^ord or max|x|.

  A scalar; with ``layer``, a vector with one partial per slice along that axis.
  """
  x = _xla.scaled(leaf, factor, acc, _xla.to_square if ord == 2 else _magnitude)
  axes = None if layer is None else tuple(i for i in range(x.ndim) if i != layer)
  if x.size == 0:
    return jnp.zeros(() if layer is None else (x.shape[layer],), acc)
  if ord == 2:
    if factor > 1.0:
      # The grown reread serves only sums that underflowed, whose elements are all
      # tiny; an element whose grown square would overflow is left out, so that its
      # derivative 2x stays finite and the zero cotangent of the unselected row
      # cannot make 0·inf = NaN.
      x = jnp.where(jnp.abs(x) <= jnp.sqrt(jnp.finfo(acc).max), x, jnp.zeros((), acc))
    return jnp.sum(x * x, axis=axes)
  if ord == 1:
    return jnp.sum(x, axis=axes)
  return _nan_max(x) if axes is None else jnp.max(x, axis=axes)


def can_overflow(leaves: Sequence[jax.Array], acc: jnp.dtype) -> bool:
  """Whether a squared element of some leaf can exceed the accumulation range."""
  acc_exp = jnp.finfo(acc).maxexp
  return any(2 * jnp.finfo(leaf.dtype).maxexp > acc_exp
             for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact))


def _times(partial: jax.Array, factor: jax.Array, ord: Ord) -> jax.Array:
  """A partial of ``x`` turned into the partial of ``x·factor`` (exactly, while representable).

  For ord 2 the factor applies twice: ``factor²`` is outside the accumulation range.
  """
  for _ in range(2 if ord == 2 else 1):
    partial = partial * factor
  return partial


def rescued(plain: list[jax.Array], reread: Callable[[float], list[jax.Array]],
            acc: jnp.dtype, power: int, *, overflow: bool, underflow: bool,
            summed: bool = True) -> tuple[list[jax.Array], list[jax.Array]]:
  """The shrunk and grown rows of the local unrooted partials ``plain``.

  ``plain`` is a list of arrays of sums of ``|x|^power`` in ``acc``;
  ``reread(factor)`` computes the same sums over ``x * factor`` from the data.
  The rows are the sums over ``x * 2**-k`` and ``x * 2**k``, derived from
  ``plain`` by exact multiplication unless a local, rare ``lax.cond`` finds a
  plain sum that overflowed (with ``overflow``) or may have underflowed (with
  ``underflow``, below ``2**-100`` for squares); only then are they reread, so
  the common case reads the data once. :func:`root` takes the rescued row
  where the plain sum left the range.

  Without ``summed`` (the rows are only rooted entry by entry, never added
  together) a row that is not rescued holds the plain sums themselves: root
  never reads it there, and the common case computes nothing more.
  """
  k = _rescale_exponent(acc)
  shrink, grow = _xla.opaque(2.0**-k, acc), _xla.opaque(2.0**k, acc)

  def times(x, factor):
    return _times(x, factor, power)

  # :func:`root` reads a grown sum only where the plain one is below this; capped
  # there, the others cannot overflow to an inf that jax_debug_infs would flag.
  cap = jnp.asarray(_tiny_partial(acc, power), acc)

  def derived(_):
    # Without ``underflow`` no grown row is read (root takes None): none is made,
    # and ``plain`` stands in its place outside the conditional.
    if not summed:
      return list(plain), list(plain) if underflow else []
    return ([times(p, shrink) for p in plain],
            [times(jnp.minimum(p, cap), grow) for p in plain] if underflow else [])

  def recomputed(_):
    shrunk, grown = derived(None)
    return (reread(2.0**-k) if overflow else shrunk), (reread(2.0**k) if underflow else grown)

  if not (overflow or underflow):
    shrunk, grown = derived(None)
  else:
    # One reduction over the joined sums, not one per array (AGC has an array per leaf).
    groups = [group for (group,) in _layout.joined(plain)]
    fine = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in groups]))
    if underflow:
      tiny = jnp.asarray(_tiny_partial(acc, power), acc)
      fine = fine & jnp.all(jnp.stack([jnp.all(p >= tiny) for p in groups]))
    if isinstance(fine, jax.core.Tracer):
      shrunk, grown = lax.cond(fine, derived, recomputed, None)
    else:
      # Outside jit the branch is known: the same result, without compiling a new
      # conditional on every call (its branches are fresh closures).
      shrunk, grown = derived(None) if bool(fine) else recomputed(None)
  return shrunk, (grown if underflow else list(plain))


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
  one, big, small = (jnp.asarray(v, dtype) for v in (1.0, 2.0**k, 2.0**-k))
  # The sum is chosen before the one root is taken (one sqrt per norm, not three);
  # the power-of-two factor is exact.
  finite = jnp.isfinite(plain)
  chosen, factor = jnp.where(finite, plain, shrunk), jnp.where(finite, one, big)
  if grown is not None:
    underflowed = plain < jnp.asarray(_tiny_partial(dtype, power), dtype)
    chosen, factor = jnp.where(underflowed, grown, chosen), jnp.where(underflowed, small, factor)
  return (safe_sqrt(chosen) if power == 2 else chosen) * factor
