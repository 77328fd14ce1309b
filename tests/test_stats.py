"""clip_stats finds clipjax statistics anywhere in an optax state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax

# optax's own transforms mix int32 counters and floats internally.
pytestmark = pytest.mark.loose_promotion

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
GRADS = {"w": jnp.full((2, 3), 2.0), "b": jnp.array([1.0, -1.0, 0.0])}
GLOBAL_NORM = float(np.sqrt(6 * 4.0 + 2.0))


def test_through_chain():
  tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  stats = clipjax.clip_stats(state)
  assert sorted(stats) == [f"clip_by_global_norm/{f}" for f in
                           ("clipped", "finite", "norm", "scale", "threshold")]
  np.testing.assert_allclose(float(stats["clip_by_global_norm/norm"]), GLOBAL_NORM, rtol=1e-6)
  np.testing.assert_allclose(float(stats["clip_by_global_norm/scale"]), 1.0 / GLOBAL_NORM,
                             rtol=1e-6)
  assert bool(stats["clip_by_global_norm/clipped"])
  assert bool(stats["clip_by_global_norm/finite"])
  assert float(stats["clip_by_global_norm/threshold"]) == 1.0


def test_through_inject_hyperparams_and_multisteps():
  inner = optax.chain(clipjax.clip_by_norm(0.5), optax.sgd(0.1))
  tx = optax.MultiSteps(optax.inject_hyperparams(lambda max_norm: optax.chain(
      clipjax.clip_by_global_norm(max_norm), optax.sgd(0.1)))(max_norm=2.0), every_k_schedule=2)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  _, state = step(GRADS, state, PARAMS)
  # The inner clipper has not run yet: MultiSteps only calls it every 2nd step.
  assert float(clipjax.clip_stats(state)["clip_by_global_norm/norm"]) == 0.0
  _, state = step(GRADS, state, PARAMS)
  stats = clipjax.clip_stats(state)
  np.testing.assert_allclose(float(stats["clip_by_global_norm/norm"]), GLOBAL_NORM, rtol=1e-6)
  assert float(stats["clip_by_global_norm/threshold"]) == 2.0
  _, inner_state = inner.update(GRADS, inner.init(PARAMS), PARAMS)
  assert float(clipjax.clip_stats(inner_state)["clip_by_norm/norm"]) == pytest.approx(
      np.sqrt(24.0), rel=1e-6)


def test_two_clippers_of_one_kind_are_named_apart():
  tx = optax.chain(clipjax.clip_by_norm(10.0), optax.scale(2.0), clipjax.clip_by_norm(3.0),
                   clipjax.clip(0.1))
  _, state = tx.update(GRADS, tx.init(PARAMS))
  stats = clipjax.clip_stats(state)
  assert {k.split("/")[0] for k in stats} == {"clip_by_norm_0", "clip_by_norm_1", "clip"}
  np.testing.assert_allclose(float(stats["clip_by_norm_0/norm"]), np.sqrt(24.0), rtol=1e-6)
  np.testing.assert_allclose(float(stats["clip_by_norm_1/norm"]), 2 * np.sqrt(24.0), rtol=1e-6)
  assert not bool(stats["clip_by_norm_0/clipped"]) and bool(stats["clip_by_norm_1/clipped"])
  # After scale(2): "w" (norm 9.8) is clipped to 3, elements 1.22; "b" = [2, -2, 0] is not.
  assert float(stats["clip/norm"]) == pytest.approx(2.0, rel=1e-6)


def test_through_masked_and_a_plain_dict():
  tx = optax.masked(clipjax.clip_by_global_norm(1.0), {"w": True, "b": False})
  _, state = tx.update(GRADS, tx.init(PARAMS))
  stats = clipjax.clip_stats({"opt": state, "step": 3})
  np.testing.assert_allclose(float(stats["clip_by_global_norm/norm"]), np.sqrt(24.0), rtol=1e-6)


def test_nan_step_reports_not_finite():
  tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(1e-3))
  grads = {"w": GRADS["w"].at[0, 0].set(jnp.nan), "b": GRADS["b"]}
  updates, state = jax.jit(tx.update)(grads, tx.init(PARAMS))
  stats = clipjax.clip_stats(state)
  assert not bool(stats["clip_by_global_norm/finite"])
  assert np.isnan(float(stats["clip_by_global_norm/norm"]))


def test_no_clipjax_state_gives_empty_dict():
  assert clipjax.clip_stats(optax.adam(1e-3).init(PARAMS)) == {}
  assert clipjax.clip_stats(None) == {}


def test_through_flax_nnx_optimizer_state():
  from flax import nnx

  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 2))) ** 2))(model)
  expected = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                         for g in jax.tree.leaves(nnx.state(grads))))
  optimizer.update(model, grads)
  stats = clipjax.clip_stats(optimizer.opt_state)
  # Plain arrays, not nnx wrappers: ready for np.mean or a logger.
  assert isinstance(stats["clip_by_global_norm/norm"], jax.Array)
  np.testing.assert_allclose(float(stats["clip_by_global_norm/norm"]), expected, rtol=1e-6)
  assert bool(stats["clip_by_global_norm/clipped"])
