"""The edge cases every exported transform must handle, over the registry.

Zero gradients stay zero (no 0/0) through warm-up and beyond, a NaN or inf
gradient is never turned into zeros or spread to finite elements, the dtype of
the updates is kept, and clippers without memory accept ``state=None``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
import registry
from _trees import assert_tree_equal
from _trees import random_tree

ENTRIES = registry.ENTRIES
SHAPES = {"kernel": (4, 3), "bias": (3,)}
PARAMS = {dtype: random_tree(9, SHAPES, dtype) for dtype in (jnp.float32, jnp.bfloat16,
                                                             jnp.float16)}


@functools.cache
def step(entry):
  """One jitted step from the initial state: the updates and the statistics."""
  tx = entry.build()

  @jax.jit
  def run(updates, params):
    state = tx.init(params)
    out, state = tx.update(updates, state, params)
    return out, clipjax.clip_stats(state)

  return run


def finite_flags(stats):
  return [bool(v) for k, v in stats.items() if k.endswith("/finite")]


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_zero_gradients_stay_zero(entry):
  tx = entry.build()
  zeros = random_tree(0, SHAPES, scale=0.0)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS[jnp.float32])
  for _ in range(5):  # through warm-up and beyond, with nothing but zeros
    out, state = update(zeros, state, PARAMS[jnp.float32])
    for leaf in jax.tree.leaves(out):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      if entry.skips and jax.tree_util.keystr(path).endswith(("losses", ".loss")):
        continue  # a step without a loss (no value=) records it as NaN
      assert not np.any(np.isnan(np.asarray(leaf))), jax.tree_util.keystr(path)
    assert all(finite_flags(clipjax.clip_stats(state)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("entry", registry.select(lambda e: not e.skips), ids=str)
def test_non_finite_gradient_is_neither_zeroed_nor_spread(entry, bad):
  grads = random_tree(0, SHAPES, scale=50.0)
  grads["kernel"] = grads["kernel"].at[1, 2].set(bad)
  out, stats = step(entry)(grads, PARAMS[jnp.float32])
  for leaf, sent in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
    leaf, was_bad = np.asarray(leaf), ~np.isfinite(np.asarray(sent))
    np.testing.assert_array_equal(np.isfinite(leaf), ~was_bad)
    # Finite elements stay finite and nonzero: nothing is silently zeroed.
    assert np.all(leaf[~was_bad] != 0) and np.all(np.isfinite(leaf[~was_bad]))
  # The leaf holding the bad value is never rescaled by a factor derived from it.
  kernel_in, kernel_out = np.asarray(grads["kernel"]), np.asarray(out["kernel"])
  np.testing.assert_array_equal(kernel_out[1, 2], bad)
  flags = finite_flags(stats)
  assert flags and not all(flags)
  if not entry.per_leaf:
    # Global rules pass the whole update through unscaled, and say so.
    assert_tree_equal(out, grads)
    assert not any(bool(v) for k, v in stats.items() if k.endswith("/clipped"))
    assert all(float(v) == 1.0 for k, v in stats.items() if k.endswith("/scale"))
  elif entry.scope == "element":
    # Element-wise rules clamp every finite element and keep the bad one as it is.
    for leaf, sent in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
      sent = np.asarray(sent)
      np.testing.assert_array_equal(
          np.asarray(leaf), np.where(np.isfinite(sent), np.clip(sent, -1.0, 1.0), sent))
  else:
    # Per-leaf and per-unit rules pass the bad value's own leaf (or unit) through.
    column = 2 if entry.scope == "unit" else slice(None)
    np.testing.assert_array_equal(kernel_out[:, column], kernel_in[:, column])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("entry", registry.select(lambda e: e.skips), ids=str)
def test_non_finite_step_is_skipped(entry, bad):
  """A transform that skips steps gives zero updates for a non-finite one, and counts it."""
  grads = random_tree(0, SHAPES, scale=50.0)
  grads["kernel"] = grads["kernel"].at[1, 2].set(bad)
  out, stats = step(entry)(grads, PARAMS[jnp.float32])
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert bool(stats[f"{entry.name}/skipped"]) and int(stats[f"{entry.name}/skips"]) == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_dtype_is_kept(entry, dtype):
  grads = random_tree(0, SHAPES, dtype, scale=50.0)
  out, stats = step(entry)(grads, PARAMS[dtype])
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == dtype
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  # Statistics are float32 and bool; counters (skip_spikes' skips) int32.
  assert all(v.dtype in (jnp.float32, jnp.bool_, jnp.int32) for v in stats.values())


@pytest.mark.parametrize("entry", registry.select(lambda e: e.memoryless and e.inner is None),
                         ids=str)
def test_state_none_for_clippers_without_memory(entry):
  tx = entry.build()
  grads, params = random_tree(0, SHAPES, scale=50.0), PARAMS[jnp.float32]
  out, state = tx.update(grads, None, params)
  expected, _ = tx.update(grads, tx.init(params), params)
  assert_tree_equal(out, expected)
  assert int(state.clip_count) == 1
