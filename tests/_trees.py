"""Gradient trees, float64 NumPy references and tree assertions shared by the tests."""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ORDS = (1, 2, np.inf)  # the norms clipjax measures (torch's norm_type)

# Trees ---------------------------------------------------------------------------


def random_tree(seed: int | np.random.Generator, shapes: Mapping[str, Any],
                dtype: Any = jnp.float32, scale: float | Sequence[float] = 1.0) -> dict[str, Any]:
  """Normal samples times ``scale`` in ``dtype``, shaped like ``shapes``.

  Args:
    seed: a seed, or a ``np.random.Generator`` to go on drawing from.
    shapes: a dict, nested or not, of leaf shapes; leaves are drawn in its order.
    dtype: the dtype of every leaf.
    scale: one factor for every leaf, or one per leaf in drawing order.

  Returns:
    A dict of the same nesting as ``shapes`` with ``jax.Array`` leaves.
  """
  rng = np.random.default_rng(seed)
  scales = iter(scale) if isinstance(scale, Sequence) else None

  def draw(shape: Any) -> Any:
    if isinstance(shape, Mapping):
      return {k: draw(v) for k, v in shape.items()}
    factor = scale if scales is None else next(scales)
    return jnp.asarray(rng.normal(size=shape) * factor, dtype)

  return draw(shapes)


def leaves64(tree: Any) -> list[np.ndarray]:
  """The leaves of ``tree`` as float64 NumPy arrays, in ``jax.tree.leaves`` order."""
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


# float64 references --------------------------------------------------------------


def np_norm(tree: Any, ord: float = 2) -> float:  # noqa: A002 - the name numpy and torch use
  """The float64 norm of all values of ``tree`` together, for ``ord`` 1, 2 or inf.

  The values are divided by the largest magnitude before the power, so that
  the reference itself cannot overflow.
  """
  flat = np.abs(np.concatenate([np.zeros(0)] + [x.ravel() for x in leaves64(tree)]))
  largest = np.max(flat, initial=0.0)
  if ord == np.inf or largest == 0.0 or not np.isfinite(largest):
    return float(largest)
  return float(largest * np.sum((flat / largest) ** ord) ** (1.0 / ord))


def np_leaf_norms(tree: Any, ord: float = 2) -> np.ndarray:  # noqa: A002
  """The float64 norm of every leaf, in ``jax.tree.leaves`` order."""
  return np.array([np_norm(x, ord) for x in leaves64(tree)])


def np_unit_axes(shape: tuple[int, ...], axis: int | tuple[int, ...] | None = None
                 ) -> tuple[int, ...]:
  """The axes that make a unit (AGC, optax's ``unitwise_norm``) of an array of ``shape``.

  Scalars and vectors (one axis longer than 1) are one unit; rank 2 and 3
  reduce axis 0 (``(in, out)`` kernels), rank 4 ``(0, 1, 2)`` (HWIO), rank 5
  ``(0, 1, 2, 3)``.
  """
  if axis is not None:
    return (axis,) if isinstance(axis, int) else tuple(axis)
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(len(shape)))
  return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[len(shape)]


def np_unit_norms(x: Any, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
  """The float64 L2 norm of each unit of ``x``, reduced axes kept with size 1."""
  x = np.asarray(x, np.float64)
  return np.sqrt(np.sum(x * x, axis=np_unit_axes(x.shape, axis), keepdims=True))


def largest_abs(tree: Any) -> float:
  """The largest magnitude of any value: what ``clip`` bounds."""
  return np_norm(tree, np.inf)


def largest_leaf_norm(tree: Any) -> float:
  """The largest L2 norm of a leaf: what ``clip_by_norm`` bounds."""
  return float(np.max(np_leaf_norms(tree, 2)))


def leaf_rms(tree: Any) -> np.ndarray:
  """The root mean square of every leaf, in ``jax.tree.leaves`` order."""
  return np.array([np.sqrt(np.mean(x * x)) for x in leaves64(tree)])


def largest_rms(tree: Any) -> float:
  """The largest root mean square of a leaf: what ``clip_by_block_rms`` bounds."""
  return float(np.max(leaf_rms(tree)))


# Assertions ----------------------------------------------------------------------


def _leaf_pairs(actual: Any, expected: Any, what: str) -> Iterator[tuple[str, np.ndarray,
                                                                        np.ndarray]]:
  """``(where, actual, expected)`` per leaf, once structures, shapes and dtypes agree."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), (
      what, jax.tree.structure(actual), jax.tree.structure(expected))
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  for (path, e), a in zip(paths, jax.tree.leaves(actual), strict=True):
    a, e = np.asarray(a), np.asarray(e)
    where = f"{what}{jax.tree_util.keystr(path)}"
    assert a.shape == e.shape and a.dtype == e.dtype, (where, a.shape, e.shape, a.dtype, e.dtype)
    yield where, a, e


def assert_tree_close(actual: Any, expected: Any, *, rtol: float, atol: float = 0.0,
                      what: str = "") -> None:
  """Floating leaves within ``atol + rtol·|expected|``, the others equal; same structure.

  Args:
    actual: the tree computed.
    expected: the reference, of the same structure, shapes and dtypes.
    rtol: the relative tolerance.
    atol: the absolute tolerance.
    what: a label for the failure message, followed by the leaf's path.
  """
  for where, a, e in _leaf_pairs(actual, expected, what):
    if jnp.issubdtype(e.dtype, jnp.inexact):
      np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=where)
    else:
      np.testing.assert_array_equal(a, e, err_msg=where)


def assert_tree_equal(actual: Any, expected: Any, what: str = "") -> None:
  """Every leaf exactly equal (NaNs in the same places); same structure, shapes and dtypes."""
  for where, a, e in _leaf_pairs(actual, expected, what):
    np.testing.assert_array_equal(a, e, err_msg=where)
