"""Per-example clipping for DP-SGD: clip each example's gradient, then sum."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _base
from . import _checks
from . import _docs
from . import _layout
from . import _norms


def _check_batch_dim(grads: Any, name: str) -> list[jax.Array]:
  leaves = [jnp.asarray(g) for g in jax.tree.leaves(grads)]
  if not leaves:
    raise ValueError(f"{name}: grads is an empty tree")
  batch = leaves[0].shape[0] if leaves[0].ndim else None
  if batch is None or any(g.ndim < 1 or g.shape[0] != batch for g in leaves):
    raise ValueError(
        f"{name} expects every leaf of grads to have the same batch dimension in"
        f" axis 0; got shapes {[g.shape for g in leaves]}")
  return leaves


def _multipliers(norms: jax.Array, clip_norm: jax.typing.ArrayLike) -> jax.Array:
  """``min(1, C / ‖g_b‖)`` per example; 1 for zero or non-finite norms."""
  scale, _, _ = _base.scale_rule(norms, clip_norm)
  return scale


def _result_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype of a leaf's clipped sum, as optax gives it.

  A floating leaf keeps its dtype. Integer and bool leaves are summed as
  floats (optax multiplies them by its float multipliers): the default float
  dtype, float32, or float64 under x64.
  """
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.dtype(dtype)
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _weighted_sum(multipliers: jax.Array, g: jax.Array) -> jax.Array:
  out = _result_dtype(g.dtype)
  compute = _base.compute_dtype(out)
  summed = jnp.tensordot(multipliers.astype(compute), g.astype(compute), axes=1)
  return summed.astype(out)


@_docs.fill
def per_example_global_norm_clip(grads: Any, l2_norm_clip: jax.typing.ArrayLike
                                 ) -> tuple[Any, jax.Array]:
  """Clips each example's gradient to global L2 norm ``l2_norm_clip``, then sums.

  ``Σ_b g_b · min(1, C / ‖g_b‖)``, where ``g_b`` is example ``b``'s slice of
  every leaf (axis 0 is the batch) and ``‖g_b‖`` its norm over all leaves,
  accumulated in float32. Same results and signature as optax's function of
  this name, integer and bool gradients included (summed as floats, as optax
  does); an example with a NaN or inf norm enters the sum unscaled rather
  than being zeroed.

  Args:
    grads: a pytree whose leaves all have the batch dimension in axis 0.
    l2_norm_clip: the largest L2 norm of one example's gradient.

  Returns:
    ``(clipped_sum, num_clipped)``: the sum over the batch of the clipped
    per-example gradients (a pytree without the batch axis), and how many
    examples were clipped (int32).

  {example}
    >>> grads = [jnp.array([[0., 0., 0.], [0., 3., 4.], [4., 0., 3.], [3., 4., 0.]])]
    >>> clipjax.per_example_global_norm_clip(grads, 1.25)
    ([Array([1.75, 1.75, 1.75], dtype=float32)], Array(3, dtype=int32))

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.
  """
  _checks.check_number("l2_norm_clip", l2_norm_clip, allow_schedule=False)
  _check_batch_dim(grads, "per_example_global_norm_clip")
  norms = jax.vmap(_norms.global_norm)(grads)
  multipliers = _multipliers(norms, l2_norm_clip)
  num_clipped = jnp.sum(multipliers < 1, dtype=jnp.int32)
  return jax.tree.map(lambda g: _weighted_sum(multipliers, jnp.asarray(g)), grads), num_clipped


@_docs.fill
def per_example_layer_norm_clip(grads: Any, global_l2_norm_clip: jax.typing.ArrayLike,
                                uniform: bool = True, layer_axis: Any = None
                                ) -> tuple[Any, Any]:
  """Clips each example's gradient layer by layer, then sums over the batch.

  Each layer ``i`` of every example is clipped to its own norm ``C_i``:
  ``C / sqrt(K)`` for ``K`` layers when ``uniform``, else
  ``C · sqrt(D_i / D)`` with ``D_i`` the layer's size per example and ``D`` the
  total; so ``sqrt(Σ C_i²) = C``. A layer is a leaf, or with ``layer_axis``
  each slice of a leaf along its layer axis. Same results and signature as
  optax's function of this name (without ``layer_axis``).

  Args:
    grads: a pytree whose leaves all have the batch dimension in axis 0.
    global_l2_norm_clip: the overall clip norm ``C``.
    uniform: split ``C`` evenly over the layers, or in proportion to their size.
    layer_axis: pytree prefix of ``int | None``, counted in the axes of one
      example's gradient (axis 0 is the first axis after the batch): a leaf
      with a layer axis (a scanned model's stacked layers) holds one layer per
      slice along it, as in the unscanned model.

  Returns:
    ``(clipped_sum, num_clipped)``: a pytree of per-leaf sums over the batch,
    and a pytree (same structure) of clipped-example counts: an int32 scalar
    per leaf, or a vector with one count per slice for a leaf with a layer axis.

  {example}
    >>> grads = [jnp.array([[0., 0., 0.], [0., 3., 4.], [4., 0., 3.], [3., 4., 0.]])]
    >>> clipjax.per_example_layer_norm_clip(grads, 1.25)
    ([Array([1.75, 1.75, 1.75], dtype=float32)], [Array(3, dtype=int32)])

  References:
    McMahan et al., `Learning Differentially Private Recurrent Language Models
    <https://arxiv.org/abs/1710.06963>`_, 2018.
  """
  _checks.check_number("global_l2_norm_clip", global_l2_norm_clip, allow_schedule=False)
  leaves = _check_batch_dim(grads, "per_example_layer_norm_clip")
  treedef = jax.tree.structure(grads)
  layout = _layout.layout(jax.tree.unflatten(treedef, [g[0] for g in leaves]), layer_axis)
  sizes = [g[0].size // max(count, 1) for g, count in zip(leaves, layout.counts)]
  layers = sum(layout.counts)
  total = sum(size * count for size, count in zip(sizes, layout.counts))
  sums, counts = [], []
  for g, size, layer in zip(leaves, sizes, layout.layers):
    fraction = 1.0 / max(layers, 1) if uniform else size / max(total, 1)
    clip = global_l2_norm_clip * fraction**0.5
    if layer is None:
      total_g, count = per_example_global_norm_clip([g], clip)
      sums.append(total_g[0])
      counts.append(count)
      continue
    # One clip per slice: the layer axis (after the batch) leads, vmapped.
    clip_slices = jax.vmap(lambda s: per_example_global_norm_clip([s], clip), in_axes=layer + 1)
    total_g, count = clip_slices(g)
    sums.append(jnp.moveaxis(total_g[0], 0, layer))
    counts.append(count)
  return jax.tree.unflatten(treedef, sums), jax.tree.unflatten(treedef, counts)
