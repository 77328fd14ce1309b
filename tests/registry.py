"""Every exported clipjax transform, with what the tests need to know about it.

A new transform joins by adding one :class:`Entry` to ``ENTRIES`` with its flags;
``test_registry_covers_every_exported_transform`` fails until it does, and fails
too when an entry names something that is not exported. Tests pick entries by
their flags, never from lists of names, and build them with
``getattr(clipjax, name)``: a renamed transform fails there, loudly, instead of
dropping out of a test.
"""

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

import clipjax
from _trees import ORDS
from _trees import largest_abs
from _trees import largest_leaf_norm
from _trees import largest_rms
from _trees import leaf_rms
from _trees import leaves64
from _trees import np_leaf_norms
from _trees import np_norm
from _trees import np_unit_norms

# Measures of the updates that a threshold bounds ----------------------------------


def largest_agc_ratio(updates: Any, params: Any, eps: float = 1e-3) -> float:
  """The largest ratio of a unit's gradient norm to its parameter norm: what AGC bounds."""
  return max(float(np.max(np_unit_norms(u) / np.maximum(np_unit_norms(p), eps)))
             for u, p in zip(leaves64(updates), leaves64(params), strict=True))


def rank_labels(tree: Any) -> Any:
  """Two groups for the group clipper: ``"matrices"`` (rank >= 2) and ``"vectors"``."""
  return jax.tree.map(lambda x: "matrices" if np.ndim(x) >= 2 else "vectors", tree)


def largest_group_norm(tree: Any) -> float:
  """The largest norm of a group of :func:`rank_labels`: what ``clip_by_group_norm`` bounds."""
  labels = jax.tree.leaves(rank_labels(tree))
  leaves = leaves64(tree)
  return max(np_norm([x for x, label in zip(leaves, labels) if label == group])
             for group in set(labels))


# Thresholds far from every norm of a gradient tree, for the multi-device cases -------


def _geometric_middle(values: np.ndarray) -> float:
  ordered = np.sort(values)
  mid = len(ordered) // 2
  return float(np.sqrt(ordered[mid - 1] * ordered[mid]))


def half_global_norm(tree: Any, ord: float | None) -> float:  # noqa: A002
  return 0.5 * np_norm(tree, ord)


def half_largest_abs(tree: Any, ord: float | None) -> float:  # noqa: A002
  del ord
  return 0.5 * largest_abs(tree)


def middle_leaf_norm(tree: Any, ord: float | None) -> float:  # noqa: A002
  return _geometric_middle(np_leaf_norms(tree, ord))


def middle_leaf_rms(tree: Any, ord: float | None) -> float:  # noqa: A002
  del ord
  return _geometric_middle(leaf_rms(tree))


# Entries ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dist:
  """How the multi-device tests build a transform, so that it clips within a few steps.

  Attributes:
    args: which of ``axis_name`` and ``replicated`` the factory takes.
    kwargs: fixed arguments.
    threshold: for a fixed threshold, ``threshold(tree, ord)`` picks one far
      from every norm of the first step's gradients.
    scaled: the arguments set to that threshold times a factor.
  """

  args: tuple[str, ...] = ("axis_name", "replicated")
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  threshold: Callable[[Any, float | None], float] | None = None
  scaled: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a cache key
class Entry:
  """One transform as the suites build it, and what they may expect of it.

  Attributes:
    name: the public name in ``clipjax.__all__``.
    kwargs: typical arguments, all passed by keyword.
    hyper: a numeric hyperparameter that ``optax.inject_hyperparams`` should
      let the suite change, and the value it is changed to.
    bound: when ``hyper`` is a threshold, the measure of the updates (and of
      the params, where ``needs_params``) that must then equal the new value
      (the suite's gradients are large enough to clip).
    static_args: arguments ``optax.inject_hyperparams`` must keep static.
    variant: a suffix of the test id, when a name has several entries.
    needs_params: whether ``update`` needs ``params``.
    scope: what one factor scales: ``"tree"`` the whole update, ``"leaf"``
      each tensor on its own, ``"unit"`` each unit of a tensor (AGC),
      ``"group"`` each group of leaves (``clip_by_group_norm``),
      ``"element"`` each element (``clip``).
    memoryless: whether the state holds nothing but a step count and the
      last statistics.
    inner: the argument that takes the transform it wraps; its state holds
      the inner state, so it must be threaded.
    ords: the values its ``ord`` argument takes; empty when it has none.
    dist: how the multi-device tests build it; ``None`` without ``axis_name``.
    skips: whether a non-finite step gives zero updates (the step is skipped)
      rather than passing through unscaled.
    groups: the labels of a clipper with statistics per group: they are named
      ``"<name>/<label>/<field>"``, besides the total ``"<name>/norm"``.
    normalizes: whether the rule rescales each tensor to a tracked norm rather
      than bounding a norm (Stable-SPAM's AdaGN): an element may grow.
  """

  name: str
  kwargs: Mapping[str, Any]
  hyper: tuple[str, float]
  bound: Callable[..., float] | None = None
  static_args: tuple[str, ...] = ()
  variant: str = ""
  needs_params: bool = False
  scope: str = "tree"
  memoryless: bool = False
  inner: str | None = None
  ords: tuple[float, ...] = ()
  dist: Dist | None = None
  skips: bool = False
  groups: tuple[str, ...] = ()
  normalizes: bool = False

  @property
  def id(self) -> str:
    return f"{self.name}-{self.variant}" if self.variant else self.name

  @property
  def per_leaf(self) -> bool:
    """Whether each tensor (or unit) is scaled by its own factor."""
    return self.scope != "tree"

  @property
  def make(self) -> Callable[..., optax.GradientTransformation]:
    return getattr(clipjax, self.name)

  def build(self, **overrides: Any) -> optax.GradientTransformation:
    return self.make(**{**self.kwargs, **overrides})

  def measure(self, updates: Any, params: Any = None) -> float:
    """What ``bound`` measures of ``updates`` (and of ``params`` where the rule reads them)."""
    return self.bound(updates, params) if self.needs_params else self.bound(updates)

  def stat_names(self, field: str) -> list[str]:
    """The names under which ``clip_stats`` reports ``field`` of this transform (one per group)."""
    if self.groups:
      return [f"{self.name}/{group}/{field}" for group in self.groups]
    return [f"{self.name}/{field}"]

  def __str__(self) -> str:
    return self.id


ENTRIES = [
    Entry("clip", {"max_delta": 1.0}, hyper=("max_delta", 0.25), bound=largest_abs,
          scope="element", memoryless=True, dist=Dist(("axis_name",), threshold=half_largest_abs,
                                     scaled={"max_delta": 1.0, "min_delta": 0.02})),
    Entry("clip_by_norm", {"max_norm": 1.0}, hyper=("max_norm", 0.5), bound=largest_leaf_norm,
          scope="leaf", memoryless=True, ords=ORDS,
          dist=Dist(threshold=middle_leaf_norm, scaled={"max_norm": 1.0})),
    Entry("clip_by_global_norm", {"max_norm": 1.0}, hyper=("max_norm", 0.5), bound=np_norm,
          memoryless=True, ords=ORDS,
          dist=Dist(threshold=half_global_norm, scaled={"max_norm": 1.0})),
    Entry("clip_by_block_rms", {"threshold": 0.5}, hyper=("threshold", 0.125), bound=largest_rms,
          scope="leaf", memoryless=True,
          dist=Dist(threshold=middle_leaf_rms, scaled={"threshold": 1.0})),
    # clipped() puts a clipper in front of an optimizer; the identity keeps the checks exact.
    Entry("clipped", {"tx": optax.identity(), "global_clipnorm": 1.0},
          hyper=("global_clipnorm", 0.5), bound=np_norm, memoryless=True, inner="tx"),
    # AGC needs params: test_distributed gives it cases of its own.
    Entry("adaptive_grad_clip", {"clipping": 0.1}, hyper=("clipping", 0.05),
          bound=largest_agc_ratio, needs_params=True, scope="unit", memoryless=True, dist=Dist()),
    Entry("autoclip", {"percentile": 50.0, "history": 8}, hyper=("percentile", 10.0),
          static_args=("history",), dist=Dist(kwargs={"percentile": 50.0, "history": 4})),
    # With max_norm, zclip caps the global norm on every step, warm-up included.
    Entry("zclip", {"alpha": 0.9, "z_thresh": 2.5, "warmup_steps": 2, "max_norm": 20.0},
          hyper=("max_norm", 0.5), bound=np_norm,
          dist=Dist(kwargs={"alpha": 0.8, "z_thresh": 1.0, "warmup_steps": 2})),
    Entry("adagc", {"lambda_abs": 1.0, "lambda_rel": 1.05, "warmup_steps": 2},
          hyper=("lambda_rel", 0.5), scope="leaf",
          dist=Dist(kwargs={"lambda_rel": 1.05, "beta": 0.9, "warmup_steps": 2})),
    Entry("quantile_clip", {"target_quantile": 0.5, "initial_norm": 1.0},
          hyper=("learning_rate", 0.5),
          dist=Dist(kwargs={"target_quantile": 0.5, "learning_rate": 0.5, "initial_norm": 1.0})),
    # Matrices and vectors in two groups under one threshold for both, so the suites'
    # hyperparameter moves it; tests/test_group.py covers thresholds per group and ord.
    Entry("clip_by_group_norm", {"max_norms": 1.0, "param_labels": rank_labels},
          hyper=("max_norms", 0.5), bound=largest_group_norm, static_args=("param_labels",),
          scope="group", memoryless=True, groups=("matrices", "vectors")),
    Entry("clip_by_rolling_norm", {"window": 4, "sigma_factor": 1.0, "min_history": 2},
          hyper=("sigma_factor", 0.25), static_args=("window",),
          dist=Dist(kwargs={"window": 4, "sigma_factor": 0.5, "min_history": 2})),
    # Two collectives under axis_name (a max, then a sum): tests/test_spam.py shards it.
    Entry("stable_spam_clip", {"theta": 0.9, "gamma1": 0.7, "gamma2": 0.9},
          hyper=("gamma1", 0.3), scope="leaf", normalizes=True),
    # A clipper inside: its statistics show through the wrapper. With sigma_factor 1 the
    # spike of the suite's last step is skipped; with 50 it is taken.
    Entry("skip_spikes", {"inner": clipjax.clip_by_global_norm(1.0), "sigma_factor": 50.0,
                          "window": 4, "min_history": 2},
          hyper=("sigma_factor", 1.0), static_args=("window",), inner="inner", skips=True),
]


def select(keep: Callable[[Entry], bool]) -> list[Entry]:
  """The entries ``keep`` accepts, in registry order."""
  return [entry for entry in ENTRIES if keep(entry)]


def by_name(name: str) -> Entry:
  """The one entry of ``name``."""
  (entry,) = select(lambda e: e.name == name)
  return entry


# Clippers of a fixed threshold that need neither params nor a wrapped transform.
FIXED = select(lambda e: e.memoryless and not e.needs_params and e.inner is None)
# Clippers whose threshold follows running statistics of the norms.
STATEFUL = select(lambda e: not e.memoryless and e.inner is None)
# clipped()'s Keras options, and the clipper each one puts in front of the optimizer.
CLIPPED_OPTIONS = {"clipnorm": "clip_by_norm", "clipvalue": "clip",
                   "global_clipnorm": "clip_by_global_norm"}


def exported_transforms() -> set[str]:
  """The names in ``clipjax.__all__`` whose call returns an ``optax.GradientTransformation``.

  Read from the return annotation, which every exported callable must have.
  """
  found = set()
  for name in clipjax.__all__:
    obj = getattr(clipjax, name)
    if isinstance(obj, type) or not callable(obj):
      continue
    hints = typing.get_type_hints(obj)
    assert "return" in hints, f"clipjax.{name} has no return annotation"
    returns = hints["return"]
    if isinstance(returns, type) and issubclass(returns, optax.GradientTransformation):
      found.add(name)
  return found
