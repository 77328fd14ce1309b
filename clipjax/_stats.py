"""Reading clip statistics out of any optax state, for logging."""

from collections import Counter
from typing import Any

import jax
import numpy as np

from . import _base


def clip_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Every clipjax statistic in a (nested) optax state, as a flat dict.

  Finds the state of each clipjax transform anywhere in ``opt_state`` (inside
  ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``optax.masked``, Flax ``TrainState`` and ``nnx.Optimizer`` states, ...) and
  returns its last step's
  statistics as ``"<transform>/<field>"``: ``norm``, ``threshold``, ``scale``,
  ``clipped``, ``finite``, plus any extra statistics the transform keeps. When
  a state holds two transforms of the same kind, each is named with its
  position among them, in tree order: ``"clip_by_norm_0/norm"``,
  ``"clip_by_norm_1/norm"``.

  Args:
    opt_state: an optax state, or any pytree that contains one.

  Returns:
    A dict from names to scalar arrays (empty when no clipjax transform is found).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipjax
    >>> tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> stats = clipjax.clip_stats(state)
    >>> float(stats["clip_by_global_norm/norm"]), bool(stats["clip_by_global_norm/clipped"])
    (5.0, True)
  """
  found = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_clip_state)
           if _is_clip_state(node)]
  names = [str(_base.state_name(node)) for node in found]
  kinds = Counter(names)
  seen: Counter[str] = Counter()
  out: dict[str, jax.Array] = {}
  for node, kind in zip(found, names):
    prefix = kind if kinds[kind] == 1 else f"{kind}_{seen[kind]}"
    seen[kind] += 1
    for field, value in node.stats._asdict().items():
      out[f"{prefix}/{field}"] = _unwrap(value)
  return out


def _unwrap(value: Any) -> Any:
  """The array inside a one-leaf wrapper (a Flax NNX ``OptArray``), else ``value``."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return value
  leaves = jax.tree.leaves(value)
  return leaves[0] if len(leaves) == 1 else value


def _is_clip_state(node: Any) -> bool:
  return _base.state_name(node) is not None
