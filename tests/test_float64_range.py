"""Under x64, a finite float64 norm beyond float32's range is compared in float64.

The states keep float32 (a finite value beyond its range is clamped to its
maximum by ``_base.f32``), but each decision of the step is taken in the
norm's own dtype, so a finite update is never treated as inf.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax

F32_MAX = float(np.finfo(np.float32).max)

pytestmark = pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")


def test_autoclip_first_step_is_its_own_threshold():
  with jax.enable_x64(True):
    tx = clipjax.autoclip(percentile=10.0, history=8)
    grads = jnp.array([1e39, 0.0], jnp.float64)
    for update in (tx.update, jax.jit(tx.update)):
      updates, state = update(grads, tx.init(grads))
      np.testing.assert_array_equal(np.asarray(updates), [1e39, 0.0])
      assert not bool(state.stats.clipped) and float(state.stats.scale) == 1.0
      assert float(state.stats.norm) == F32_MAX == float(state.stats.threshold)
      assert float(state.history[0]) == F32_MAX  # the state stays float32 and finite


def test_skip_spikes_takes_a_finite_float64_step_beyond_float32():
  with jax.enable_x64(True):
    tx = clipjax.skip_spikes(optax.sgd(1.0), window=4, min_history=2)
    grads = jnp.array([1e39, 0.0], jnp.float64)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert not bool(state.stats.skipped)
    np.testing.assert_array_equal(np.asarray(updates), [-1e39, 0.0])
    assert float(state.stats.norm) == F32_MAX and float(state.norms[0]) == F32_MAX
