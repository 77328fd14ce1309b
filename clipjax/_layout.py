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
  axes = _per_leaf(tree, layer_axis, "layer_axis", "an int",
                   lambda v: isinstance(v, int) and not isinstance(v, bool))
  layers, counts = [], []
  for (path, leaf), axis in zip(flat, axes):
    shape = jnp.shape(leaf)
    if axis is not None and not -len(shape) <= axis < len(shape):
      raise ValueError(f"layer_axis={axis} is out of range for the leaf"
                       f" {jax.tree_util.keystr(path)} of shape {shape}")
    layers.append(None if axis is None else axis % len(shape))
    counts.append(1 if axis is None else shape[axis])
  return Layout(tuple(layers), tuple(counts))


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
