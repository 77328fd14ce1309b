"""The edge cases every exported transform must handle, over the composition registry.

Zero gradients stay zero (no 0/0), a NaN gradient is never turned into zeros or
spread to finite elements, the dtype of the updates is kept, and clippers
without memory accept ``state=None``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
import registry

IDS = [entry.id for entry in registry.ENTRIES]
BY_ID = {entry.id: entry for entry in registry.ENTRIES}
# Clippers whose state holds no memory beyond a step count and the last statistics.
MEMORYLESS = {"clip", "clip_by_norm", "clip_by_global_norm", "clip_by_block_rms",
              "adaptive_grad_clip"}


def tree(dtype, scale, seed=0):
  rng = np.random.default_rng(seed)
  return {"kernel": jnp.asarray(rng.normal(size=(4, 3)) * scale, dtype),
          "bias": jnp.asarray(rng.normal(size=(3,)) * scale, dtype)}


PARAMS = {dtype: tree(dtype, 1.0, seed=9) for dtype in (jnp.float32, jnp.bfloat16, jnp.float16)}


@functools.cache
def step(entry_id):
  tx = BY_ID[entry_id].build()

  @jax.jit
  def run(updates, params):
    state = tx.init(params)
    out, state = tx.update(updates, state, params)
    return out, clipjax.clip_stats(state)

  return run


@pytest.mark.parametrize("entry_id", IDS)
def test_zero_gradient_stays_zero(entry_id):
  zeros = tree(jnp.float32, 0.0)
  out, stats = step(entry_id)(zeros, PARAMS[jnp.float32])
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert all(bool(v) for k, v in stats.items() if k.endswith("/finite"))


@pytest.mark.parametrize("entry_id", IDS)
def test_nan_gradient_is_neither_zeroed_nor_spread(entry_id):
  grads = tree(jnp.float32, 50.0)
  grads["kernel"] = grads["kernel"].at[1, 2].set(jnp.nan)
  out, stats = step(entry_id)(grads, PARAMS[jnp.float32])
  nan_in = [np.isnan(np.asarray(g)) for g in jax.tree.leaves(grads)]
  for leaf, was_nan, sent in zip(jax.tree.leaves(out), nan_in, jax.tree.leaves(grads)):
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(np.isnan(leaf), was_nan)
    # Finite elements stay finite and nonzero: nothing is silently zeroed.
    assert np.all(leaf[~was_nan] != 0) and np.all(np.isfinite(leaf[~was_nan]))
  # The leaf holding the NaN is never rescaled by a NaN-derived factor.
  kernel_in, kernel_out = np.asarray(grads["kernel"]), np.asarray(out["kernel"])
  assert np.isnan(kernel_out[1, 2])
  finite_flags = [bool(v) for k, v in stats.items() if k.endswith("/finite")]
  assert finite_flags and not all(finite_flags)
  if entry_id not in ("clip_by_norm", "clip_by_block_rms", "adaptive_grad_clip", "adagc"):
    # Global rules pass the whole update through unscaled.
    for leaf, sent in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(sent))
  else:
    # Per-leaf and per-unit rules pass the NaN's own leaf (or unit) through.
    column = 2 if entry_id == "adaptive_grad_clip" else slice(None)
    np.testing.assert_array_equal(kernel_out[:, column], kernel_in[:, column])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("entry_id", IDS)
def test_dtype_is_kept(entry_id, dtype):
  grads = tree(dtype, 50.0)
  out, stats = step(entry_id)(grads, PARAMS[dtype])
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == dtype
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  assert all(v.dtype in (jnp.float32, jnp.bool_) for v in stats.values())


@pytest.mark.parametrize("entry_id", sorted(MEMORYLESS))
def test_state_none_for_clippers_without_memory(entry_id):
  tx = BY_ID[entry_id].build()
  grads, params = tree(jnp.float32, 50.0), PARAMS[jnp.float32]
  out, state = tx.update(grads, None, params)
  expected, _ = tx.update(grads, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.count) == 1
