"""Every exported clipjax transform with typical arguments, for the shared composition suite.

A new transform joins by adding an :class:`Entry` to ``ENTRIES``;
``test_registry_covers_every_exported_transform`` fails until it does, and
fails too when an entry names something that is not exported.
"""

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import clipjax

# A measure of updates (and params) that a threshold hyperparameter bounds.
Measure = Callable[[Any, Any], float]


def _leaves64(tree: Any) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def largest_abs(updates: Any, params: Any) -> float:
  del params
  return max(float(np.max(np.abs(x))) for x in _leaves64(updates))


def largest_leaf_norm(updates: Any, params: Any) -> float:
  del params
  return max(float(np.linalg.norm(x.ravel())) for x in _leaves64(updates))


def global_norm(updates: Any, params: Any) -> float:
  del params
  return float(np.sqrt(sum(np.sum(x * x) for x in _leaves64(updates))))


def largest_rms(updates: Any, params: Any) -> float:
  del params
  return max(float(np.sqrt(np.mean(x * x))) for x in _leaves64(updates))


def _unit_norms(x: np.ndarray) -> np.ndarray:
  """AGC's units: a vector is one unit; a matrix (inputs, outputs) has one unit per column."""
  if x.ndim <= 1:
    return np.sqrt(np.sum(x * x, keepdims=True))
  return np.sqrt(np.sum(x * x, axis=tuple(range(x.ndim - 1))))


def largest_agc_ratio(updates: Any, params: Any, eps: float = 1e-3) -> float:
  return max(float(np.max(_unit_norms(u) / np.maximum(_unit_norms(p), eps)))
             for u, p in zip(_leaves64(updates), _leaves64(params), strict=True))


@dataclasses.dataclass(frozen=True)
class Entry:
  """One transform as the suite builds it.

  Attributes:
    id: the test id (the public name, with a suffix when a name has variants).
    name: the public name in ``clipjax.__all__``.
    kwargs: typical arguments, all passed by keyword.
    factory: the function called with them; ``None`` for ``clipjax.<name>``,
      looked up at call time.
    needs_params: whether ``update`` needs ``params``.
    hyper: a numeric hyperparameter that ``optax.inject_hyperparams`` should
      let the suite change, and the value it is changed to.
    bound: when ``hyper`` is a threshold, the measure of the updates that must
      then equal the new value (the suite's gradients are large enough to clip).
    static_args: arguments ``optax.inject_hyperparams`` must keep static.
  """

  id: str
  name: str
  kwargs: dict[str, Any]
  hyper: tuple[str, float]
  factory: Callable[..., optax.GradientTransformation] | None = None
  needs_params: bool = False
  bound: Measure | None = None
  static_args: tuple[str, ...] = ()

  @property
  def make(self) -> Callable[..., optax.GradientTransformation]:
    return self.factory if self.factory is not None else getattr(clipjax, self.name)

  def build(self, **overrides: Any) -> optax.GradientTransformation:
    return self.make(**{**self.kwargs, **overrides})

  def __str__(self) -> str:
    return self.id


def _clipped_global(tx: optax.GradientTransformation, global_clipnorm: float
                    ) -> optax.GradientTransformation:
  return clipjax.clipped(tx, global_clipnorm=global_clipnorm)


ENTRIES = [
    Entry("clip", "clip", {"max_delta": 1.0}, hyper=("max_delta", 0.25), bound=largest_abs),
    Entry("clip_by_norm", "clip_by_norm", {"max_norm": 1.0}, hyper=("max_norm", 0.5),
          bound=largest_leaf_norm),
    Entry("clip_by_global_norm", "clip_by_global_norm", {"max_norm": 1.0},
          hyper=("max_norm", 0.5), bound=global_norm),
    Entry("clip_by_block_rms", "clip_by_block_rms", {"threshold": 0.5},
          hyper=("threshold", 0.125), bound=largest_rms),
    # clipped() puts a clipper in front of an optimizer; the identity keeps the checks exact.
    Entry("clipped", "clipped", {"tx": optax.identity(), "global_clipnorm": 1.0},
          hyper=("global_clipnorm", 0.5), factory=_clipped_global, bound=global_norm),
    Entry("adaptive_grad_clip", "adaptive_grad_clip", {"clipping": 0.1},
          hyper=("clipping", 0.05), needs_params=True, bound=largest_agc_ratio),
    Entry("autoclip", "autoclip", {"percentile": 50.0, "history": 8},
          hyper=("percentile", 10.0), static_args=("history",)),
    # With max_norm, zclip caps the global norm on every step, warm-up included.
    Entry("zclip", "zclip", {"alpha": 0.9, "z_thresh": 2.5, "warmup_steps": 2, "max_norm": 20.0},
          hyper=("max_norm", 0.5), bound=global_norm),
    Entry("adagc", "adagc", {"lambda_abs": 1.0, "warmup_steps": 2}, hyper=("lambda_rel", 0.5)),
    Entry("quantile_clip", "quantile_clip", {"target_quantile": 0.5, "initial_norm": 1.0},
          hyper=("learning_rate", 0.5)),
]



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
