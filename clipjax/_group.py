"""Clipping groups of leaves, each by its own norm: the labels of ``optax.multi_transform``.

:func:`clip_by_group_norm` measures every leaf once (:func:`clipjax._norms.measure`,
one collective for all leaves under ``axis_name``), combines the leaf norms of
each group into the group's norm, and scales each group with the shared rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _base
from . import _checks
from . import _docs
from . import _layout
from . import _norms
from ._base import Threshold

# The key of the total norm in the statistics; the other keys are the labels.
_TOTAL = "norm"


class ClipByGroupNormState(_base.CountState):
  """State of :func:`clipjax.clip_by_group_norm`: a step count and the last statistics.

  The statistics under the transform's name are a dict: ``"norm"``, the norm of
  the whole update, and for each label the :class:`ClipStats` of its group.
  """

  __slots__ = ()


Labels = Any  # a pytree (prefix) of str labels, or a callable of the updates returning one


def _check_label(label: Any, what: str) -> str:
  if not isinstance(label, str) or not label or "/" in label or label == _TOTAL:
    raise ValueError(
        f"{what}={label!r}: a group label must be a non-empty string without '/', other"
        f" than {_TOTAL!r} (the key of the total norm in the statistics)")
  return label


def _leaf_labels(tree: Any, param_labels: Labels) -> list[str]:
  """One label per leaf of ``tree``, from the prefix (or the callable) ``param_labels``."""
  labels = param_labels(tree) if callable(param_labels) else param_labels
  per_leaf = _layout._per_leaf(tree, labels, "param_labels", "a str label",  # noqa: SLF001
                               lambda v: isinstance(v, str))
  for (path, _), label in zip(jax.tree_util.tree_flatten_with_path(tree)[0], per_leaf):
    if label is None:
      raise ValueError(f"param_labels gives the leaf {jax.tree_util.keystr(path)} no label")
  return per_leaf


def _check_thresholds(max_norms: Any, param_labels: Labels) -> Mapping[str, Any] | None:
  """Validates ``max_norms``; returns it as a mapping, or ``None`` for one threshold for all."""
  if not isinstance(max_norms, Mapping):
    _checks.check_number("max_norms", max_norms)
    return None
  for label, value in max_norms.items():
    _check_label(label, "max_norms key")
    _checks.check_number(f"max_norms[{label!r}]", value, allow_none=True)
  if not callable(param_labels):
    for label in jax.tree.leaves(param_labels):
      _check_label(label, "param_labels label")
      _check_covered(label, max_norms)
  return dict(max_norms)


def _check_covered(label: str, max_norms: Mapping[str, Any]) -> None:
  if label not in max_norms:
    raise ValueError(
        f"param_labels has the label {label!r}, which max_norms does not name; give it a"
        f" threshold, or None to measure it without clipping (max_norms has"
        f" {sorted(max_norms)})")


@_docs.fill
def clip_by_group_norm(max_norms: Mapping[str, Threshold | None] | Threshold,
                       param_labels: Labels, *, ord: int | float = 2,
                       axis_name: _norms.AxisName = None, replicated: Any = None,
                       name: str | None = None) -> optax.GradientTransformation:
  """Clips each group of leaves to norm at most its own threshold.

  Leaves are grouped by label, as ``optax.multi_transform`` groups them. With
  ``G`` the leaves labelled ``l`` and ``‖g_G‖`` their norm together::

    g_G ← g_G · max_l / max(‖g_G‖, max_l)

  the rule of :func:`clipjax.clip_by_global_norm` applied to each group on its
  own. A group whose threshold is ``None`` is measured (its statistics are
  kept) but not clipped. Every leaf is measured once and all groups share one
  collective under ``axis_name``: the group norm is the ``ord``-norm of its
  leaves' norms (``sqrt(Σ‖g_i‖²)`` for 2, ``Σ‖g_i‖₁`` for 1, ``max`` for inf),
  which is the norm of its elements together. A group whose norm is NaN or inf
  passes through unscaled with ``finite`` False; the other groups are clipped
  as usual. A zero group stays zero.

  The clipper goes in front of the optimizer, outside ``optax.multi_transform``
  (one measurement for every group, and one set of statistics); the same
  labels can be passed to both.

  :func:`clipjax.clip_stats` reports the total norm as ``"<name>/norm"`` and
  each group's ``norm``, ``threshold`` (inf for ``None``), ``scale``,
  ``clipped`` and ``finite`` as ``"<name>/<label>/<field>"``.

  Args:
    max_norms: a mapping from every label to its threshold (a number, a scalar
      array, or an ``optax.Schedule`` of this transform's step count) or
      ``None``; or one threshold for every group. A label of the updates that
      the mapping does not name is a ``ValueError``; a label it names that no
      leaf has is reported with norm 0. Labels are non-empty strings without
      ``'/'``, and ``"norm"`` is taken by the total norm.
    param_labels: the label of each leaf: a pytree (or pytree prefix) of the
      updates' structure holding labels, or a callable returning one from the
      updates (``init`` calls it with the parameters), as for
      ``optax.multi_transform``.
    ord: ``1``, ``2`` or ``jnp.inf``.
    {axis_name}
    {replicated}
    {name}

  {returns: ClipByGroupNormState}
    Where ``max_norms`` is one threshold and ``param_labels`` a callable,
    ``init`` needs the parameters to know the labels.

  {example}
    >>> grads = {"dense": jnp.array([3.0, 4.0]), "bias": jnp.array([0.0, 2.0])}
    >>> labels = {"dense": "matrices", "bias": "vectors"}
    >>> tx = clipjax.clip_by_group_norm({"matrices": 1.0, "vectors": None}, labels)
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["dense"], updates["bias"]  # only the matrices are clipped
    (Array([0.6, 0.8], dtype=float32), Array([0., 2.], dtype=float32))
    >>> stats = clipjax.clip_stats(state)
    >>> float(stats["clip_by_group_norm/matrices/norm"]), bool(stats["clip_by_group_norm/vectors/clipped"])
    (5.0, False)
    >>> round(float(stats["clip_by_group_norm/norm"]), 4)  # the total norm, sqrt(25 + 4)
    5.3852
  """
  ord = _norms.check_ord(ord)
  _layout.check_replicated(replicated)
  thresholds = _check_thresholds(max_norms, param_labels)
  name = _base.check_name(name, "clip_by_group_norm")
  values = [max_norms] if thresholds is None else list(thresholds.values())
  needs = _base.needs_state(*values)

  def threshold_of(label):
    return max_norms if thresholds is None else thresholds[label]

  def group_labels(tree):
    """The labels the statistics hold: every key of ``max_norms``, else those of ``tree``."""
    if thresholds is not None:
      return sorted(thresholds)
    if tree is None:
      raise ValueError(
          "clip_by_group_norm: init needs the parameters (a tree of the updates'"
          " structure) to know the groups' labels")
    return sorted({_check_label(label, "param_labels label")
                   for label in _leaf_labels(tree, param_labels)})

  def init_fn(params):
    stats: dict[str, Any] = {_TOTAL: jnp.zeros((), jnp.float32)}
    for label in group_labels(params):
      stats[label] = _base.initial_stats(_base.initial_threshold(threshold_of(label)))
    return ClipByGroupNormState(clip_count=jnp.zeros((), jnp.int32), clip_stats={name: stats})

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, ClipByGroupNormState, lambda: init_fn(updates),
                            name=name, needs=needs)
    labels = _leaf_labels(updates, param_labels)
    for label in labels:
      _check_label(label, "param_labels label")
      if thresholds is not None:
        _check_covered(label, thresholds)
    norms = _norms.measure(updates, ord, axis_name=axis_name, replicated=replicated)
    stats: dict[str, Any] = {_TOTAL: _base.f32(norms.total)}
    factors: list[_base.Ratio | None] = [None] * len(labels)
    for label in group_labels(updates):
      members = np.flatnonzero(np.asarray(labels) == label) if labels else np.zeros(0, int)
      # The group's norm from its leaves' norms: local arrays, no second collective.
      norm = _norms.global_norm(norms.leaves[members], ord)
      high = _base.resolve(threshold_of(label), state.clip_count)
      scale, clipped, finite = _base.scale_rule(norm, high)
      shown = _base.initial_threshold(None) if high is None else high  # None: measured only
      stats[label] = _base.make_stats(norm, shown, scale, clipped, finite)
      for i in members:
        factors[i] = _base.ratio_rule(norm, high)
    return (_base.apply_scale(updates, factors),
            ClipByGroupNormState(_base.next_count(state.clip_count), {name: stats}))

  return optax.GradientTransformation(init_fn, update_fn)

