"""Which values apply to which leaves: pytree prefixes, replicated leaves, layer axes, shardings.

``replicated`` and ``layer_axis`` are pytree prefixes of the updates; this
module expands them to one value per leaf and checks them, naming the
argument (or the leaf's path) when one does not fit. Inside ``shard_map`` it
also reads from each leaf's type the mesh axes over which the leaf is the
same on every device.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AxisName = Hashable | tuple[Hashable, ...] | None


def _per_leaf(tree: Any, prefix: Any, name: str, kind: str,
              is_value: Callable[[Any], bool]) -> list[Any]:
  """Expands the pytree prefix ``prefix`` to one value per leaf of ``tree``.

  ``None`` (a leaf of the prefix, not an empty subtree) and every value for
  which ``is_value`` holds apply to the whole subtree they stand for.
  """
  n = len(jax.tree.leaves(tree))
  if prefix is None or is_value(prefix):
    return [prefix] * n

  def is_leaf(x):
    return x is None or is_value(x)

  try:
    full = jax.tree.broadcast(prefix, tree, is_leaf=is_leaf)
  except (ValueError, TypeError) as err:
    raise ValueError(f"{name}={prefix!r} must be {kind} or a pytree prefix of the updates"
                     ) from err
  values = jax.tree.leaves(full, is_leaf=is_leaf)
  if len(values) != n or not all(v is None or is_value(v) for v in values):
    raise ValueError(f"{name}={prefix!r} must hold {kind} values, one per leaf or subtree")
  return values


def axes_of(axis_name: AxisName) -> tuple[Hashable, ...]:
  """The mesh axis names in ``axis_name``: none, one, or a tuple of them."""
  if axis_name is None:
    return ()
  return tuple(axis_name) if isinstance(axis_name, tuple) else (axis_name,)


def _is_axes(value: Any) -> bool:
  """Whether a leaf of ``replicated`` is a tuple of axis names.

  A non-empty tuple none of whose items is a bool, ``None`` or a tuple: a
  tuple of flags is a pytree node of the prefix instead.
  """
  return (isinstance(value, tuple) and bool(value)
          and all(isinstance(v, Hashable) and not isinstance(v, (bool, tuple)) and v is not None
                  for v in value))


def _is_flag(value: Any) -> bool:
  return isinstance(value, bool) or _is_axes(value)


_REPLICATED_KIND = "a bool or a tuple of axis names"


def check_replicated(replicated: Any) -> None:
  """Raises unless ``replicated`` is ``None`` or a pytree prefix of bools and axis-name tuples.

  Called when a transform is built, so a bad value is caught with or without
  ``axis_name``; :func:`replicated_axes` checks that it is a prefix of the
  updates and agrees with their types.
  """
  if replicated is None or _is_flag(replicated):
    return
  flags = jax.tree.leaves(replicated, is_leaf=_is_axes)
  if not all(_is_flag(f) for f in flags):
    raise ValueError(
        f"replicated={replicated!r} must be a bool, a tuple of axis names or a pytree prefix"
        " of the updates holding them, one per leaf or subtree")


def replicated_mask(tree: Any, replicated: Any) -> list[bool | tuple[Hashable, ...] | None]:
  """Expands the pytree prefix ``replicated`` to one value per leaf of ``tree``.

  Each value is a bool, a tuple of axis names, or ``None`` where nothing was said.
  """
  check_replicated(replicated)
  return _per_leaf(tree, replicated, "replicated", _REPLICATED_KIND, _is_flag)


def varying_axes(x: jax.typing.ArrayLike) -> frozenset[Hashable]:
  """The manual mesh axes over which ``x``'s type says it may differ between devices.

  Empty outside ``shard_map``, and inside it with ``check_vma=False``. The
  type records them as ``manual_axis_type.varying`` (JAX 0.10) or ``vma``
  (JAX 0.7 to 0.9).
  """
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(manual, "varying", None) or getattr(aval, "vma", None) or ())


def typed_axes(axis_name: AxisName) -> tuple[Hashable, ...]:
  """The axes of ``axis_name`` whose replication the types record.

  An axis of ``shard_map`` with ``check_vma`` (the default) is recorded: a
  device's index along it varies over it. ``pmap`` axes and ``check_vma=False``
  record nothing.
  """
  return tuple(a for a in axes_of(axis_name) if a in varying_axes(lax.axis_index(a)))


def _stated(flag: bool | tuple[Hashable, ...] | None, path: str,
            axes: tuple[Hashable, ...]) -> frozenset[Hashable] | None:
  """The axes a ``replicated`` value names for one leaf (``True``: all of ``axes``)."""
  if flag is None or isinstance(flag, bool):
    return None if flag is None else frozenset(axes if flag else ())
  unknown = [a for a in flag if a not in axes]
  if unknown:
    raise ValueError(f"replicated={flag!r} for the leaf {path} names axes {unknown}"
                     f" that are not in axis_name={axes}")
  return frozenset(flag)


def replicated_axes(tree: Any, replicated: Any, axis_name: AxisName
                    ) -> list[tuple[Hashable, ...]]:
  """Per leaf of ``tree``, the axes of ``axis_name`` over which it is the same on every device.

  A sum over the devices counts a leaf once over these axes. On an axis the
  types record (``shard_map``), a leaf is replicated where its type does not
  vary; a ``replicated`` value that says otherwise raises ``ValueError``
  naming the leaf and the axes. On an axis they do not record (``pmap``,
  ``check_vma=False``), ``replicated`` says it, and a leaf it does not mark
  is taken to be sharded (counted on every device).
  """
  flags = replicated_mask(tree, replicated)
  axes = axes_of(axis_name)
  if not axes:
    return [()] * len(flags)
  typed = typed_axes(axes)
  out = []
  for (path, leaf), flag in zip(jax.tree_util.tree_flatten_with_path(tree)[0], flags):
    name = jax.tree_util.keystr(path) or "at the root"
    stated = _stated(flag, name, axes)
    varying = varying_axes(leaf)
    read = frozenset(a for a in typed if a not in varying)
    if stated is not None and stated.intersection(typed) != read:
      raise ValueError(
          f"replicated={flag!r} for the leaf {name} contradicts its type: over"
          f" {sorted(map(str, typed))} of axis_name it varies over"
          f" {sorted(str(a) for a in typed if a in varying)} and is replicated over"
          f" {sorted(map(str, read))}")
    chosen = read if stated is None else stated
    out.append(tuple(a for a in axes if a in chosen))
  return out


class Layout(NamedTuple):
  """How the leaves of a tree split into tensors (static).

  A leaf is one tensor, or, with a layer axis, one tensor per slice along it
  (a scanned model's stacked layers).
  """

  layers: tuple[int | None, ...]  # per leaf, the layer axis (non-negative) or None
  counts: tuple[int, ...]  # per leaf, how many tensors it holds

  @property
  def starts(self) -> tuple[int, ...]:
    """Each leaf's first tensor, in the ``[n_tensors]`` vectors."""
    return tuple(int(s) for s in np.cumsum((0,) + self.counts[:-1]))

  def per_tensor(self, values: Sequence[Any]) -> np.ndarray:
    """One value per leaf, repeated for each tensor the leaf holds."""
    return np.repeat(np.asarray(values), self.counts)


def layout(tree: Any, layer_axis: Any = None) -> Layout:
  """The tensors of ``tree`` under the pytree prefix ``layer_axis`` of ``int | None``.

  Raises ``ValueError`` naming the leaf's path when a layer axis is out of its range.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  axes = _layer_axes(flat, layer_axis)
  layers, counts = [], []
  for (path, leaf), axis in zip(flat, axes):
    shape = jnp.shape(leaf)
    if axis is not None and not -len(shape) <= axis < len(shape):
      raise ValueError(f"layer_axis={axis} is out of range for the leaf"
                       f" {jax.tree_util.keystr(path)} of shape {shape}")
    layers.append(None if axis is None else axis % len(shape))
    counts.append(1 if axis is None else shape[axis])
  return Layout(tuple(layers), tuple(counts))


def _is_axis(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _names(path: Sequence[Any]) -> tuple[Any, ...]:
  """A key path as plain names, whatever the containers.

  A dict key, an attribute and an index all become the key itself, and an NNX
  ``Variable``'s last ``.value`` is left out, so that a prefix built from
  ``nnx.state(model)``, from a plain dict or from ``nnx.State`` matches the
  same leaves.
  """
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
    keys = keys[:-1]
  return tuple(keys)


def _layer_axes(flat: list[tuple[Any, Any]], layer_axis: Any) -> list[int | None]:
  """``layer_axis`` (an int, ``None`` or a pytree prefix of them) for each leaf of ``flat``.

  The prefix is matched by path, not by node type: each leaf takes the entry
  whose path its own path starts with.
  """
  if layer_axis is None or _is_axis(layer_axis):
    return [layer_axis] * len(flat)
  entries = jax.tree_util.tree_flatten_with_path(
      layer_axis, is_leaf=lambda x: x is None or _is_axis(x))[0]
  if not all(value is None or _is_axis(value) for _, value in entries):
    raise ValueError(f"layer_axis={layer_axis!r} must be an int or a pytree prefix of the"
                     " updates holding ints and None, one per leaf or subtree")
  entries = [(_names(path), value) for path, value in entries]
  used, axes = set(), []
  for path, _ in flat:
    names = _names(path)
    found = [i for i, (prefix, _) in enumerate(entries) if names[:len(prefix)] == prefix]
    if len(found) != 1:
      raise ValueError(
          f"layer_axis={layer_axis!r} has {len(found) or 'no'} entries for the leaf"
          f" {'/'.join(map(str, names))} of the updates; its entries are at"
          f" {['/'.join(map(str, p)) for p, _ in entries]}")
    used.add(found[0])
    axes.append(entries[found[0]][1])
  unused = ['/'.join(map(str, entries[i][0])) for i in range(len(entries)) if i not in used]
  if unused:
    raise ValueError(f"layer_axis={layer_axis!r} has entries at {unused} that match no leaf"
                     " of the updates")
  return axes


def is_sharded(x: jax.Array) -> bool:
  """Whether ``x``'s type shards it over a mesh axis.

  Only explicit sharding shows in the type; an unknown sharding counts as none.
  """
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(s is not None for s in spec)


def joined(*columns: Sequence[jax.Array]) -> list[tuple[jax.Array, ...]]:
  """The arrays of ``columns`` in as few groups as one reduction each can read.

  Entry ``i`` of every column lands in the same group. An entry whose first
  column is explicitly sharded is a group of its own (joining it would gather
  its shards); all the others are raveled and concatenated into one group.
  """
  rows = list(zip(*columns))
  groups = [row for row in rows if is_sharded(row[0])]
  rest = [row for row in rows if not is_sharded(row[0])]
  if rest:
    groups.append(tuple(jnp.concatenate([x.ravel() for x in xs]) for xs in zip(*rest)))
  return groups
