"""Reading clip statistics out of any optax state, and gradient norms by path, for logging."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import _docs, _norms

def path_name(keypath: Sequence[Any], sep: str = "/") -> str:
  """The name of a pytree path: its keys joined by ``sep``.

  A dict key is written with ``str`` (``"w"``, ``0``), a sequence index as its
  number, an attribute (a NamedTuple field, a dataclass field) as its name:
  ``{"a": [x, (y, z)]}`` has the paths ``"a/0"``, ``"a/1/0"`` and ``"a/1/1"``.
  The root is ``""``. Keys are not escaped: a key that contains ``sep`` reads
  like two.

  Args:
    keypath: a path as ``jax.tree_util.tree_flatten_with_path`` gives it.
    sep: the separator.

  Returns:
    The path as a string.

  Example:
    >>> import jax
    >>> import clipjax
    >>> tree = {"dense": [{"kernel": 1.0}], "scale": 2.0}
    >>> [clipjax.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    ['dense/0/kernel', 'scale']
  """
  return jax.tree_util.keystr(tuple(keypath), simple=True, separator=sep)


@_docs.fill
def norms_by_path(tree: Any, ord: int | float | str = 2, *,  # noqa: A002 - optax's name.
                  axis_name: _norms.AxisName = None, replicated: Any = None,
                  sep: str = "/") -> dict[str, jax.Array]:
  """The norm of each leaf of a gradient tree, keyed by its path, for logging.

  ``{path_name(path): ‖leaf‖_ord}`` for every leaf, in ``jax.tree.leaves``
  order (a dict returned from a jitted function has its keys sorted, as JAX
  rebuilds every dict), with paths named by :func:`path_name` (dict keys,
  sequence indices and attribute names joined by ``sep``:
  ``"encoder/layers/0/kernel"``). The
  norms are those of :func:`clipjax.leaf_norms`: accumulated in float32
  (float64 under x64), overflow-safe, and reduced over ``axis_name`` with one
  collective for all leaves. This is Lightning's ``grad_norm(module,
  norm_type)`` for a pytree.

  Every key is a path: the global norm is not in the dict, so no leaf can
  collide with it. It is :func:`clipjax.global_norm` (a second reduction), or,
  from these norms, their own ``ord``-norm: ``‖(‖g_1‖, …, ‖g_n‖)‖_ord`` equals
  ``‖g‖_ord`` for ``ord`` 1, 2 and inf.

  Flax NNX states hold ``Variable`` objects whose array is their ``value``
  attribute; that last ``value`` is left out of the name, so an ``nnx.State``
  of gradients and ``nnx.to_pure_dict(grads)`` both give paths such as
  ``"linear/kernel"``.

  Args:
    tree: a pytree of arrays (gradients).
    ord: ``1``, ``2`` or ``inf`` (``jnp.inf``, ``float("inf")``, ``"inf"``).
    axis_name: mapped axis name(s) over which the leaves are sharded
      (``shard_map``, ``pmap``); every norm is then global over them.
    {replicated}
    sep: the separator between the keys of a path (a non-empty string).

  Returns:
    A dict from path to a scalar float32 array (float64 under x64).

  Raises:
    ValueError: when ``ord`` is not 1, 2 or inf, ``sep`` is empty, or two
      leaves have the same name (keys that contain ``sep``).

  {example}
    >>> grads = {"dense": {"kernel": jnp.array([3.0, 4.0]), "bias": jnp.array([-2.0])}}
    >>> {k: float(v) for k, v in clipjax.norms_by_path(grads).items()}
    {'dense/bias': 2.0, 'dense/kernel': 5.0}
    >>> round(float(clipjax.global_norm(grads)) ** 2, 4)
    29.0
  """
  if not isinstance(sep, str) or not sep:
    raise ValueError(f"{sep=} must be a non-empty string")
  paths = leaf_names(tree, sep)
  norms = _norms.measure(tree, ord, axis_name=axis_name, replicated=replicated).leaves
  return {path: norms[i] for i, path in enumerate(paths)}


_VARIABLE_VALUE = jax.tree_util.GetAttrKey("value")


def leaf_names(tree: Any, sep: str = "/") -> list[str]:
  """The name of each leaf of ``tree`` by its path, in ``jax.tree.leaves`` order.

  A path's last ``.value`` attribute (the array of a Flax NNX ``Variable``) is
  left out, so the parameters' names are the same whether ``init`` sees
  ``nnx.State`` with Variables or ``update`` sees plain arrays.

  Raises:
    ValueError: when two leaves get the same name (a key that contains ``sep``).
  """
  paths = [path[:-1] if path and path[-1] == _VARIABLE_VALUE else path
           for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  names = [path_name(path, sep) for path in paths]
  repeated = [name for name, n in Counter(names).items() if n > 1]
  if repeated:
    raise ValueError(
        f"two leaves are both named {repeated[0]!r} with {sep=} (a key contains sep); "
        "pass another sep")
  return names


def clip_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Every clipjax statistic in a (nested) optax state, as a flat dict.

  Finds the state of each clipjax transform anywhere in ``opt_state`` (inside
  ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``optax.masked``, :func:`clipjax.skip_spikes`, Flax ``TrainState`` and
  ``nnx.Optimizer`` states, ...) and returns its last step's statistics:
  ``norm``, ``threshold``, ``scale``, ``clipped``, ``finite``, plus any extra
  statistics the transform keeps.

  Statistics are named ``"<name>/<field>"``, where ``<name>`` is the
  transform's ``name=`` (default: its own name, e.g. ``"clip_by_norm"``).
  When a state holds two transforms of one name, each is named with its
  position among them, in the order of their paths in ``opt_state``:
  ``"clip_by_norm_0/norm"``, ``"clip_by_norm_1/norm"``. A statistic kept by
  path (``clip_by_norm(leaf_stats=True)``'s ``leaf_norms``) gives one entry
  per path: ``"clip_by_norm/leaf_norms/<path>"``; the statistics of a group
  (:func:`clipjax.clip_by_group_norm`) one per field: ``"<name>/<label>/<field>"``.

  Every clipjax state keeps its statistics in a field ``clip_stats``, a dict
  keyed by the transform's name, so the names survive what a checkpoint does
  to a state: the same names and values come out of a live state and of that
  state after ``pickle``, ``flax.serialization.to_state_dict`` and msgpack,
  an orbax checkpoint restored with or without a target, or
  ``nnx.state(optimizer)`` (its ``Variable`` wrappers and ``"value"`` entries
  are looked through).

  Args:
    opt_state: an optax state, or any pytree that contains one.

  Returns:
    A dict from names to scalar arrays (empty when no clipjax transform is found).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax import serialization
    >>> import clipjax
    >>> tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> stats = clipjax.clip_stats(state)
    >>> float(stats["clip_by_global_norm/norm"]), bool(stats["clip_by_global_norm/clipped"])
    (5.0, True)
    >>> restored = serialization.msgpack_restore(serialization.msgpack_serialize(
    ...     serialization.to_state_dict(state)))
    >>> float(clipjax.clip_stats(restored)["clip_by_global_norm/norm"])
    5.0
  """
  found = sorted(_states(opt_state, ()), key=lambda item: _path_order(item[0]))
  records = [(str(name), record) for _, node in found
             for name, record in _field(node, STATS_FIELD).items()]
  kinds = Counter(name for name, _ in records)
  seen: Counter[str] = Counter()
  out: dict[str, jax.Array] = {}
  for name, record in records:
    prefix = name if kinds[name] == 1 else f"{name}_{seen[name]}"
    seen[name] += 1
    for field, value in _fields_of(record).items():
      out.update(_named(f"{prefix}/{field}", value))
  return out


# The field (or, restored, the entry) of every clipjax state that holds its statistics.
STATS_FIELD = "clip_stats"
_FIELDS = ("norm", "threshold", "scale", "clipped", "finite")


def _field(node: Any, key: str) -> Any:
  """A NamedTuple's field or a mapping's entry (a state restored without its class)."""
  return node[key] if isinstance(node, Mapping) else getattr(node, key)


def _states(tree: Any, prefix: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], Any]]:
  """Every clipjax state in ``tree`` with its path, those nested in another's fields too."""
  out = []
  for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_holds_stats)[0]:
    if _holds_stats(node):
      out.append(((*prefix, *path), node))
      fields = node.items() if isinstance(node, Mapping) else node._asdict().items()
      for key, value in fields:  # e.g. the inner state of skip_spikes
        if key != STATS_FIELD:
          out += _states(value, (*prefix, *path, jax.tree_util.DictKey(key)))
  return out


def _holds_stats(node: Any) -> bool:
  """Whether ``node`` is a clipjax state: it has a ``clip_stats`` mapping of name to statistics."""
  if isinstance(node, Mapping):
    stats = node.get(STATS_FIELD)
  elif isinstance(node, tuple) and hasattr(node, "_fields"):
    stats = getattr(node, STATS_FIELD, None)
  else:
    return False
  return isinstance(stats, Mapping)


def _fields_of(record: Any) -> dict[str, Any]:
  """A transform's statistics by field: ClipStats' fields first, then the others sorted."""
  items = dict(record._asdict()) if hasattr(record, "_asdict") else dict(record)
  first = [f for f in _FIELDS if f in items]
  return {str(f): items[f] for f in [*first, *sorted(str(k) for k in items if k not in first)]}


def _path_order(path: Sequence[Any]) -> tuple[tuple[int, int | str], ...]:
  """A sort key that orders paths alike whether their keys are indices or digit strings."""
  names = path_name(path).split("/") if path else []
  return tuple((0, int(n)) if n.isdigit() else (1, n) for n in names)


def _named(name: str, value: Any) -> dict[str, Any]:
  """``{name: value}``, or one entry per key of a mapping or record, recursively.

  A mapping of statistics by path (``leaf_norms``) gives ``"<name>/<path>"``;
  the statistics of a group (:func:`clipjax.clip_by_group_norm`, a
  ``ClipStats`` under its label) give ``"<name>/<field>"``.
  """
  value = _unwrap(value)
  if hasattr(value, "_asdict"):
    value = _fields_of(value)
  if isinstance(value, Mapping):
    out: dict[str, Any] = {}
    for key, item in value.items():
      out.update(_named(f"{name}/{key}", item))
    return out
  return {name: value}


def _unwrap(value: Any) -> Any:
  """The array inside a wrapper: a Flax NNX ``Variable``, or ``{"value": x}`` as orbax keeps one."""
  while isinstance(value, Mapping) and list(value) == ["value"]:
    value = value["value"]
  if isinstance(value, (jax.Array, np.ndarray, np.generic, Mapping)):
    return value
  leaves = jax.tree.leaves(value)
  return leaves[0] if len(leaves) == 1 else value
