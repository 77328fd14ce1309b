"""Norms of gradient trees: float32 accumulation, one cross-device reduction.

This module is the only place that knows about ``ord``, ``axis_name`` and
the collective; the partial norm of a leaf and its rescue come from
``_partials``, the expansion of ``replicated`` and ``layer_axis`` from
``_layout``. Clippers measure through
:func:`measure`, which reduces the per-leaf partial norms of one update with a
single collective; a clipper with other cross-device sums (AGC's per-unit
sums, ``clip``'s smallest magnitude) reduces them through :func:`all_reduce`,
the one owner of the collective and of the count-once rule for replicated
leaves.
"""

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _docs
from . import _layout
from . import _partials
from . import _xla
from ._layout import Layout
from ._partials import Ord

AxisName = _layout.AxisName
# For each axis name, NumPy bools marking the entries of a vector that hold the
# same value on every device of that axis (replicated leaves).
Shared = Mapping[Hashable, np.ndarray]

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


# A leaf's unrooted partials: (plain, shrunk, grown), each a scalar, or a vector
# with one entry per slice along the leaf's layer axis.
Rows = tuple[jax.Array, jax.Array, jax.Array]


def _local_rows(leaves: Sequence[jax.Array], layers: Sequence[int | None], ord: Ord,
                acc: jnp.dtype, small: bool) -> list[Rows]:
  """Each leaf's local partials: plain ``sum|x|^ord`` (or ``max|x|``), and over ``x·2**∓k``.

  The shrunk and grown partials are computed from the data only when some
  plain partial overflowed on this device (shrunk), or, with ``small``, is so
  small that its squares may have underflowed (grown): a rare, local
  ``lax.cond``. Otherwise they are derived from the plain ones, so the common
  case reads each leaf once. Every leaf keeps its own values (no shared
  vector is sliced per leaf: that costs XLA a distinct kernel per leaf).
  """
  plain = [_partials.partial(leaf, ord, acc, 1.0, layer) for leaf, layer in zip(leaves, layers)]
  if ord == float("inf"):
    return [(p, p, p) for p in plain]

  def reread(factor):
    return [_partials.partial(leaf, ord, acc, factor, layer)
            for leaf, layer in zip(leaves, layers)]

  shrunk, grown = _partials.rescued(plain, reread, acc, 2 if ord == 2 else 1,
                                    overflow=_partials.can_overflow(leaves, acc),
                                    underflow=small)
  return list(zip(plain, shrunk, grown))


def _total_rows(leaves: Sequence[jax.Array], ord: Ord, acc: jnp.dtype, small: bool,
                shared: Shared) -> jax.Array:
  """The local ``[3]`` sums (plain, shrunk, grown) over the leaves this device counts.

  For a norm of the whole tree only: the rescue ``lax.cond`` recomputes two
  sums rather than a partial per leaf, which keeps the program small.
  ``shared`` marks the leaves counted once (see :func:`count_once`).
  """

  def parts(factor):
    return count_once(jnp.stack([_partials.partial(leaf, ord, acc, factor) for leaf in leaves]),
                      shared)

  if ord == float("inf"):
    # The per-leaf maxima are computed once: otherwise XLA CPU fuses every leaf's
    # NaN flag into one kernel for the max over the leaves, two operands per leaf,
    # which took 1 GB and 27 s to compile at 1000 leaves (350 MB and 16 s with the sort).
    plain = jnp.max(_xla.materialized(parts(1.0)))
    return _xla.materialized(jnp.stack([plain, plain, plain]))
  plain = jnp.sum(parts(1.0))
  (shrunk,), (grown,) = _partials.rescued([plain], lambda factor: [jnp.sum(parts(factor))], acc,
                                          2 if ord == 2 else 1,
                                          overflow=_partials.can_overflow(leaves, acc),
                                          underflow=small)
  # Computed once: otherwise XLA fuses the sums into every leaf-sized kernel that reads them.
  return _xla.materialized(jnp.stack([plain, shrunk, grown]))


def flat(parts: Sequence[jax.Array]) -> jax.Array:
  """Per-leaf values (scalars or per-slice vectors) as one ``[n_tensors]`` vector.

  A part sharded on an Explicit mesh (one value per slice of a sharded layer
  axis) is replicated first: explicit sharding joins only arrays of one
  sharding, and these are a few scalars per slice.
  """
  parts = [jax.sharding.reshard(p, jax.sharding.PartitionSpec()) if _layout.is_sharded(p)
           else p for p in parts]
  if not parts:
    return jnp.zeros((0,), jnp.float32)
  if all(jnp.ndim(p) == 0 for p in parts):
    return jnp.stack(parts)
  return jnp.concatenate([jnp.reshape(p, (-1,)) for p in parts])


def _stacked(rows: list[Rows]) -> jax.Array:
  """The rows of every leaf as one ``[3, n_tensors]`` array."""
  rows = [_replicated(r) for r in rows]
  return jnp.stack([flat([r[i] for r in rows]) for i in range(3)])


def _replicated(rows: Rows) -> Rows:
  """A leaf's rows, replicated on every device where their type shards them.

  A leaf whose layer axis is sharded on an Explicit mesh has rows of one
  value per slice, sharded like that axis; explicit sharding joins only arrays
  of one sharding. Its three rows are gathered together, a few scalars per
  slice (the gradients themselves never are).
  """
  if not _layout.is_sharded(rows[0]):
    return rows
  both = jax.sharding.reshard(jnp.stack(rows), jax.sharding.PartitionSpec())
  return both[0], both[1], both[2]


def _reduced_rows(rows: list[Rows], layout: Layout, axis_name: AxisName,
                  maximum: bool | jax.Array, shared: Shared) -> list[Rows]:
  """The rows of every leaf, reduced over ``axis_name`` with ONE collective."""
  stacked = all_reduce(_stacked(rows), axis_name, maximum=maximum, shared=shared)
  out = []
  for (p, _, _), start, count in zip(rows, layout.starts, layout.counts):
    part = stacked[:, start:start + count]
    out.append(tuple(part[i].reshape(jnp.shape(p)) for i in range(3)))
  return out


def _pmax(values: jax.Array, axis_name: AxisName) -> jax.Array:
  """``lax.pmax`` that keeps NaN, with one collective.

  XLA's max all-reduce on CPU drops NaN operands (the pmax of 1, 2, NaN, 3 is
  3), so a NaN on one device would go unseen by the others. An is-NaN
  indicator travels in the same operand, and NaN is restored where it is set.
  """
  nan = jnp.isnan(values)
  lowest = jnp.asarray(jnp.finfo(values.dtype).min, values.dtype)
  both = lax.pmax(jnp.stack([jnp.where(nan, lowest, values), nan.astype(values.dtype)]),
                  axis_name)
  # The NaN is made as 0/0 where the indicator is set, so healthy input holds no
  # NaN constant for jax_debug_nans to flag.
  flagged = both[1] > 0
  zero = jnp.where(flagged, jnp.zeros((), values.dtype), jnp.ones((), values.dtype))
  return jnp.where(flagged, zero / zero, both[0])


def shared_masks(replicated: Sequence[tuple[Hashable, ...]], axis_name: AxisName,
                 repeats: Sequence[int] | int = 1) -> dict[Hashable, np.ndarray]:
  """The :data:`Shared` masks of a vector holding ``repeats`` entries per leaf, in leaf order.

  ``replicated`` holds, per leaf, the axes over which it is the same on every
  device (``_layout.replicated_axes``).
  """
  return {axis: np.repeat(np.asarray([axis in r for r in replicated], bool), repeats)
          for axis in _layout.axes_of(axis_name)}


def count_once(values: jax.Array, shared: Shared | None) -> jax.Array:
  """``values`` with zeros where this device must not add them, so a sum counts them once.

  The count-once rule for replicated leaves, written only here. ``shared``
  maps axis names to NumPy bools (broadcastable to ``values``) marking entries
  that hold the same value on every device of that axis; such an entry is
  kept on the devices of index 0 along every axis that marks it, zeroed on the
  others.
  """
  keep = None
  for axis, mask in (shared or {}).items():
    if mask.any():
      first = lax.axis_index(axis) == 0
      here = jnp.logical_or(jnp.asarray(~mask), first)
      keep = here if keep is None else jnp.logical_and(keep, here)
  return values if keep is None else jnp.where(keep, values, jnp.zeros((), values.dtype))


def _varying(values: jax.Array, axis_name: AxisName) -> jax.Array:
  """``values`` typed as varying over every axis of ``axis_name`` whose types are recorded.

  Inside ``shard_map`` a collective over an axis needs an operand of a type
  that varies over it; the partials of leaves replicated over an axis (and
  not masked, as for the max) are not.
  """
  missing = tuple(a for a in _layout.typed_axes(axis_name)
                  if a not in _layout.varying_axes(values))
  if not missing:
    return values
  if hasattr(lax, "pcast"):  # JAX 0.10 renamed pvary
    return lax.pcast(values, missing, to="varying")
  return lax.pvary(values, missing)


def all_reduce(values: jax.Array, axis_name: AxisName, *, maximum: bool | jax.Array = False,
               shared: Shared | None = None) -> jax.Array:
  """Sums (or, with ``maximum``, maxes) ``values`` over ``axis_name`` with ONE collective.

  The only cross-device reduction of the package. NaN and inf on any device
  reach every device: ``psum`` propagates them, the max carries an is-NaN
  indicator in its operand. ``shared`` marks, per axis, entries that hold the
  same value on every device of that axis (replicated leaves): a sum counts
  them once (:func:`count_once`); a max needs no mask. A traced ``maximum``
  (a traced ``ord``) picks the collective at run time, so one is still
  executed.
  """
  if maximum is not True:
    values = count_once(values, shared)
  values = _varying(values, axis_name)
  if maximum is True:
    return _pmax(values, axis_name)
  if maximum is False:
    return lax.psum(values, axis_name)
  return lax.cond(maximum, lambda v: _pmax(v, axis_name), lambda v: lax.psum(v, axis_name),
                  values)


def _root(plain: jax.Array, shrunk: jax.Array, grown: jax.Array, ord: Ord,
          small: bool) -> jax.Array:
  """Turns unrooted partials into a norm, rescued where ``plain`` left the range.

  Without ``small`` nothing below the float32 range of squares was asked for:
  the underflow rescue, and its work per tensor, is left out.
  """
  if ord == float("inf"):
    return plain
  return _partials.root(plain, shrunk, grown if small else None, 2 if ord == 2 else 1)


class Norms(NamedTuple):
  """The norms of one update, from one cross-device reduction.

  A tensor is a leaf, or a slice of one along its layer axis (see :class:`Layout`).
  """

  leaves: jax.Array  # [n_tensors] float32 (float64 under x64), one norm per tensor
  total: jax.Array  # [] same dtype, the norm of the whole tree
  sizes: np.ndarray  # [n_tensors] int, elements over all devices (replicated: once)
  layout: Layout
  per_leaf: tuple[jax.Array, ...]  # per leaf: its norm, or one per slice with a layer axis


def _norms_of(rows: list[Rows], ord: Ord, small: bool, sizes: np.ndarray,
              layout: Layout) -> Norms:
  per_leaf = tuple(_root(*r, ord, small) for r in rows)
  # Computed once: otherwise XLA fuses the whole tree's reduction into every
  # leaf-sized kernel that reads the total (n reductions copied n times).
  plain, shrunk, grown = _xla.materialized(_stacked(rows))
  if ord == float("inf"):
    total = jnp.max(plain, initial=0.0)
  else:
    total = _root(jnp.sum(plain), jnp.sum(shrunk), jnp.sum(grown), ord, small)
  return Norms(_root(plain, shrunk, grown, ord, small), total, sizes, layout, per_leaf)


def _global_sizes(leaves: Sequence[jax.Array], replicated: Sequence[tuple[Hashable, ...]],
                  layout: Layout, axis_name: AxisName) -> np.ndarray:
  """Elements of each tensor over all devices: once over the axes it is replicated over."""
  axes = _layout.axes_of(axis_name)
  sizes = [leaf.size // max(count, 1)
           * math.prod(lax.axis_size(a) for a in axes if a not in same)
           for leaf, same, count in zip(leaves, replicated, layout.counts)]
  return layout.per_tensor(np.asarray(sizes, np.int64)).astype(np.int64)


def measure(tree: Any, ord: Any = 2, *, axis_name: AxisName = None,
            replicated: Any = None, small: bool = False, layer_axis: Any = None,
            per_leaf: bool = True) -> Norms:
  """Per-tensor and global norms of ``tree`` with one collective.

  A tensor is a leaf, or with ``layer_axis`` each slice of a leaf along its
  layer axis. The layer axis must not be sharded over ``axis_name``.

  ``ord`` is normally a Python ``1``, ``2`` or ``inf``; a traced ``ord`` (from
  ``optax.inject_hyperparams``) computes all three locally, reduces the
  partials of the one in force, and selects at run time. ``small`` asks for
  exact norms below the float32 range of squares (it may cost a second pass
  when some leaf is zero or tiny); clippers with a lower bound use it.
  Without ``per_leaf`` only ``total`` is computed (``leaves`` is ``None``,
  ``per_leaf`` empty): the norm of the whole tree needs no partial per leaf.
  """
  ord = check_ord(ord)
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  acc = _partials.accumulation_dtype(leaves)
  same = _layout.replicated_axes(tree, replicated, axis_name)
  tensors = _layout.layout(tree, layer_axis)
  sizes = _global_sizes(leaves, same, tensors, axis_name)
  if not leaves:
    empty = jnp.zeros((0,), acc)
    return Norms(empty, jnp.zeros((), acc), sizes, tensors, ())
  if not per_leaf and not isinstance(ord, jax.core.Tracer):
    return _total_norm(leaves, ord, acc, small, shared_masks(same, axis_name), axis_name,
                       sizes, tensors)
  ords = VALID_ORDS if isinstance(ord, jax.core.Tracer) else (ord,)
  options = [_local_rows(leaves, tensors.layers, o, acc, small) for o in ords]
  # Only a traced ord is picked at run time (and a concrete inf makes no inf array).
  pick = jnp.asarray(ord).astype(jnp.float32) if len(ords) > 1 else None
  rows = options[0]
  for value, option in zip(ords[1:], options[1:]):
    rows = [tuple(jnp.where(pick == value, a, b) for a, b in zip(new, old))
            for new, old in zip(option, rows)]
  if axis_name is not None:
    maximum = ord == float("inf") if len(ords) == 1 else pick == float("inf")
    rows = _reduced_rows(rows, tensors, axis_name, maximum,
                         shared_masks(same, axis_name, tensors.counts))
  results = [_norms_of(rows, o, small, sizes, tensors) for o in ords]
  norms = results[0]
  for value, option in zip(ords[1:], results[1:]):
    def choose(a, b, v=value):
      return jnp.where(pick == v, a, b)
    norms = norms._replace(leaves=choose(option.leaves, norms.leaves),
                           total=choose(option.total, norms.total),
                           per_leaf=tuple(map(choose, option.per_leaf, norms.per_leaf)))
  return norms


def _total_norm(leaves: list[jax.Array], ord: Ord, acc: jnp.dtype, small: bool,
                shared: Shared, axis_name: AxisName, sizes: np.ndarray,
                tensors: Layout) -> Norms:
  """:func:`measure` of the whole tree only: one ``[3]`` row of sums, one collective."""
  # The max needs no mask: a replicated leaf's copies are equal.
  rows = _total_rows(leaves, ord, acc, small, {} if ord == float("inf") else shared)
  if axis_name is not None:
    rows = all_reduce(rows, axis_name, maximum=ord == float("inf"))
  return Norms(None, _root(rows[0], rows[1], rows[2], ord, small), sizes, tensors, ())


@_docs.fill
def global_norm(tree: Any, ord: Ord = 2, *, axis_name: AxisName = None,
                replicated: Any = None) -> jax.Array:
  """The norm of a whole pytree, accumulated in float32 and overflow-safe.

  ``‖g‖_p = (Σ_leaves Σ_i |g_i|^p)^(1/p)`` for ``ord=p`` in {1, 2}, and
  ``max_i |g_i|`` for ``ord=inf``. Each leaf is read once in float32 (float64
  under x64); when a float32 partial overflows, that device recomputes it on
  rescaled values, so a finite float16 or bfloat16 tree has a finite norm
  whenever the norm itself fits in float32. Underflow is not rescued here: a
  tree whose squared elements all underflow float32 (every ``|g_i|`` below
  about 1e-19) has ord-2 norm 0, as with ``optax.tree.norm``; ord 1 and inf
  are exact there. The clippers with a floor (``min_norm``) rescue it.

  Args:
    tree: a pytree of arrays (the leaves may have different dtypes).
    ord: ``1``, ``2`` or ``jnp.inf``.
    axis_name: a mapped axis name, or a tuple of them, over which the leaves are
      sharded (``shard_map``, ``pmap``). The per-leaf partials are reduced with
      one ``psum`` (``pmax`` for inf). Inside ``shard_map`` each leaf is
      counted once over the axes its type does not vary over.
    {replicated}

  Returns:
    A float32 scalar (float64 when the tree holds float64 leaves).

  {example}
    >>> grads = {"w": jnp.full((1000,), 300.0, jnp.float16)}
    >>> float(clipjax.global_norm(grads))  # 300 * sqrt(1000); float16 would overflow
    9486.8330078125
    >>> float(clipjax.global_norm({"a": jnp.array([3.0, -4.0])}, ord=1))
    7.0
  """
  return measure(tree, ord, axis_name=axis_name, replicated=replicated, per_leaf=False).total


@_docs.fill
def leaf_norms(tree: Any, ord: Ord = 2, *, axis_name: AxisName = None,
               replicated: Any = None, layer_axis: Any = None) -> jax.Array:
  """The norm of each leaf (tensor), stacked in ``jax.tree.leaves`` order.

  Accumulation, ``ord``, ``axis_name`` and ``replicated`` are as in
  :func:`global_norm`; all leaves are reduced with one collective. With
  ``layer_axis``, a pytree prefix of ``int | None``, each slice of a leaf
  along its layer axis (a scanned model's stacked layers) has its own norm,
  in order, where the leaf's one norm would be.

  Returns:
    A ``[n_tensors]`` float32 array (float64 when the tree holds float64
    leaves): one norm per leaf, or per slice of a leaf with a layer axis.

  {example}
    >>> clipjax.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.array([-2.0])})
    Array([5., 2.], dtype=float32)
    >>> clipjax.leaf_norms({"stacked": jnp.array([[3.0, 4.0], [0.0, 1.0]])}, layer_axis=0)
    Array([5., 1.], dtype=float32)
  """
  return measure(tree, ord, axis_name=axis_name, replicated=replicated,
                 layer_axis=layer_axis).leaves
