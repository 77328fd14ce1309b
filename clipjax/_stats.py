"""Reading clip statistics out of any optax state, and gradient norms by path, for logging."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import _base, _docs, _norms

_STATS_KEY = "stats"
_FIELDS = _base.ClipStats._fields

_NOT_FOUND = (
    "clipjax.clip_stats found no clipjax statistics in a state that holds no NamedTuple, "
    "only dicts and lists. A state restored without a target (orbax `restore(path)`, "
    "flax.serialization.to_state_dict or msgpack_restore) has lost its classes; "
    "clip_stats then finds a transform's statistics under a 'stats' mapping with the "
    "fields " + ", ".join(_FIELDS) + ", and there is none here (were the states' "
    "fields turned into lists?). Restore with a target, e.g. the state "
    "`tx.init(params)` returns, to keep the classes; if the optimizer has no clipjax "
    "transform, there is nothing to find.")


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
  attribute, so their paths end in ``"/value"``; ``nnx.to_pure_dict(grads)``
  gives plain dicts and paths such as ``"kernel"``.

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
  paths = [path_name(path, sep) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  _check_unique(paths, sep)
  norms = _norms.measure(tree, ord, axis_name=axis_name, replicated=replicated).leaves
  return {path: norms[i] for i, path in enumerate(paths)}


def _check_unique(paths: list[str], sep: str) -> None:
  repeated = [path for path, n in Counter(paths).items() if n > 1]
  if repeated:
    raise ValueError(
        f"two leaves are both named {repeated[0]!r} with {sep=} (a key contains sep); "
        "pass another sep")


def clip_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Every clipjax statistic in a (nested) optax state, as a flat dict.

  Finds the state of each clipjax transform anywhere in ``opt_state`` (inside
  ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``optax.masked``, Flax ``TrainState`` and ``nnx.Optimizer`` states, ...) and
  returns its last step's statistics: ``norm``, ``threshold``, ``scale``,
  ``clipped``, ``finite``, plus any extra statistics the transform keeps.

  Statistics are named by where they were found:

  - In a state that keeps its classes (what ``tx.init`` and ``tx.update``
    return), a transform is known by its state class and its statistics are
    ``"<name>/<field>"``, where ``<name>`` is the transform's ``name=``
    (default: its own name, e.g. ``"clip_by_norm"``). When a state holds two
    transforms of one name, each is named with its position among them, in
    tree order: ``"clip_by_norm_0/norm"``, ``"clip_by_norm_1/norm"``.
  - In a dict-shaped state (``nnx.state(optimizer)``,
    ``flax.serialization.to_state_dict(state)``, an orbax checkpoint restored
    without a target), the classes are gone. A transform's state is then any
    mapping with a ``"stats"`` entry that is a mapping holding the fields
    ``norm``, ``threshold``, ``scale``, ``clipped`` and ``finite``, and its
    statistics are named by their path in ``opt_state``, as
    :func:`path_name` writes it: ``"<path>/stats/<field>"``, e.g.
    ``"0/stats/norm"`` for the first transform of an ``optax.chain``, or
    ``"opt_state/0/stats/norm"`` in ``nnx.state(optimizer)``. Such names end
    in ``"stats/<field>"`` and no transform is named ``stats``, so they never
    equal a class-based one.

  When nothing is found in a state that holds arrays but no NamedTuple at all
  (optax's states are NamedTuples; restored without a target they become
  dicts and lists), a ``UserWarning`` says so: such a state has lost its
  classes, and here the statistics' field names too (or the optimizer has no
  clipjax transform). Under Python's default warning filters it is shown once.

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
    >>> float(clipjax.clip_stats(serialization.to_state_dict(state))["0/stats/norm"])
    5.0
  """
  found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_found)[0]
  found = [(path, node) for path, node in found if _is_found(node)]
  out = _by_class([node for _, node in found if _is_clip_state(node)])
  for path, node in found:
    if not _is_clip_state(node):
      prefix = path_name((*path, jax.tree_util.DictKey(_STATS_KEY)))
      for field, value in _stats_of(node).items():
        out.update(_named(f"{prefix}/{field}", value))
  if not found and _lost_its_classes(opt_state):
    warnings.warn(_NOT_FOUND, UserWarning, stacklevel=2)
  return out


def _by_class(states: list[Any]) -> dict[str, jax.Array]:
  """Statistics of states known by their class, named ``"<name>[_<i>]/<field>"``."""
  names = [str(_base.state_name(node)) for node in states]
  kinds = Counter(names)
  seen: Counter[str] = Counter()
  out: dict[str, jax.Array] = {}
  for node, kind in zip(states, names):
    prefix = kind if kinds[kind] == 1 else f"{kind}_{seen[kind]}"
    seen[kind] += 1
    for field, value in node.stats._asdict().items():
      out.update(_named(f"{prefix}/{field}", value))
  return out


def _named(name: str, value: Any) -> dict[str, Any]:
  """``{name: value}``, or for a mapping of statistics by path (``leaf_norms``) one entry each."""
  if isinstance(value, Mapping):
    return {f"{name}/{key}": _unwrap(item) for key, item in value.items()}
  return {name: _unwrap(value)}


def _stats_of(node: Mapping) -> dict[str, Any]:
  """A dict-shaped state's statistics: ClipStats' fields first, then any others."""
  stats = node[_STATS_KEY]
  fields = [*_FIELDS, *(key for key in stats if key not in _FIELDS)]
  return {str(field): stats[field] for field in fields}


def _unwrap(value: Any) -> Any:
  """The array inside a one-leaf wrapper (a Flax NNX ``OptArray``), else ``value``."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return value
  leaves = jax.tree.leaves(value)
  return leaves[0] if len(leaves) == 1 else value


def _is_clip_state(node: Any) -> bool:
  return _base.state_name(node) is not None


def _is_dict_state(node: Any) -> bool:
  """A transform's state as a mapping: its ``"stats"`` mapping has ClipStats' fields."""
  if not isinstance(node, Mapping):
    return False
  stats = node.get(_STATS_KEY)
  return isinstance(stats, Mapping) and all(field in stats for field in _FIELDS)


def _is_found(node: Any) -> bool:
  return _is_clip_state(node) or _is_dict_state(node)


def _is_named_tuple(node: Any) -> bool:
  return isinstance(node, tuple) and hasattr(node, "_fields")


def _lost_its_classes(tree: Any) -> bool:
  """Whether ``tree`` holds arrays but only plain containers (no NamedTuple)."""
  leaves = jax.tree.leaves(tree, is_leaf=_is_named_tuple)
  if any(_is_named_tuple(leaf) for leaf in leaves):
    return False
  return any(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)
