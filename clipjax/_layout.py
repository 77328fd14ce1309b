"""Which values apply to which leaves: pytree prefixes, replicated leaves, layer axes, shardings.

``replicated`` and ``layer_axis`` are pytree prefixes of the updates; this
module expands them to one value per leaf and checks them, naming the
argument (or the leaf's path) when one does not fit.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _per_leaf(tree: Any, prefix: Any, name: str, kind: str,
              is_value: Callable[[Any], bool]) -> list[Any]:
  """Expands the pytree prefix ``prefix`` to one value per leaf of ``tree``.

  ``None`` (a leaf of the prefix, not an empty subtree) and every value for
  which ``is_value`` holds apply to the whole subtree they stand for.
  """
  n = len(jax.tree.leaves(tree))
  if prefix is None or is_value(prefix):
    return [prefix] * n
  try:
    full = jax.tree.broadcast(prefix, tree, is_leaf=lambda x: x is None)
  except (ValueError, TypeError) as err:
    raise ValueError(f"{name}={prefix!r} must be {kind} or a pytree prefix of the updates"
                     ) from err
  values = jax.tree.leaves(full, is_leaf=lambda x: x is None)
  if len(values) != n or not all(v is None or is_value(v) for v in values):
    raise ValueError(f"{name}={prefix!r} must hold {kind} values, one per leaf or subtree")
  return values



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
  flags = _per_leaf(tree, replicated, "replicated", "a bool", lambda v: isinstance(v, bool))
  return [bool(flag) for flag in flags]


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
