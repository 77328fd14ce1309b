"""Reliability policies on one device: derivatives, dtypes, zero norms, arguments, state=None.

Each test pins one policy of docs/design.md; the cross-device ones are in
test_reliability_sharded.py. Updates run jitted (one compilation per case).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
import registry

ENTRIES = registry.ENTRIES
IDS = [entry.id for entry in ENTRIES]
BY_ID = {entry.id: entry for entry in ENTRIES}
ADAPTIVE = ("autoclip", "zclip", "adagc", "quantile_clip")


def _tree(scale, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  signs = rng.choice([-1, 1], (3, 2))
  return {"a": jnp.asarray(rng.uniform(0.5, 1.5, (3, 2)) * signs * scale, dtype),
          "b": jnp.asarray(rng.uniform(0.5, 1.5, (4,)) * scale, dtype)}


PARAMS = _tree(1.0, seed=9)


def _primed(tx, steps, params):
  """A state after ``steps``, so an adaptive clipper has statistics."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  for g in steps:
    _, state = update(g, state, params)
  return state


# 8. float64 norms beyond float32 ---------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTIVE)
def test_float64_norms_above_float32_range_are_clipped_and_stay_finite(name):
  with jax.enable_x64(True):
    tx = BY_ID[name].build()
    params = _tree(1.0, jnp.float64, seed=9)
    state = _primed(tx, [_tree(1.0, jnp.float64, seed=s) for s in range(4)], params)
    dtypes = [x.dtype for x in jax.tree.leaves(state)]
    out, new = jax.jit(tx.update)(_tree(1e200, jnp.float64), state, params)
    assert [x.dtype for x in jax.tree.leaves(new)] == dtypes  # lax.scan and jit caches hold
    assert float(clipjax.global_norm(out)) < 1e3  # clipped in float64
    running = [np.asarray(x) for x in jax.tree.leaves(new._replace(stats=None))
               if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(np.all(np.isfinite(x)) for x in running), running
    assert np.isfinite(float(new.stats.norm)) and bool(new.stats.finite)
