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


# Dict-shaped states: the classes are gone, the statistics are found by their field names. ------

FIELDS = ("norm", "threshold", "scale", "clipped", "finite")


def _chain_state():
  """A chain with a clipjax transform first, one step taken (a NamedTuple state)."""
  tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(1e-3))
  _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  return state


def _assert_same_stats(got, prefix, expected, expected_prefix):
  """``got[prefix/f]`` equals ``expected[expected_prefix/f]`` for every field, dtype included."""
  assert sorted(got) == sorted(f"{prefix}/{f}" for f in FIELDS)
  for field in FIELDS:
    value, reference = got[f"{prefix}/{field}"], expected[f"{expected_prefix}/{field}"]
    assert isinstance(value, (jax.Array, np.ndarray)), type(value)
    assert np.asarray(value).dtype == np.asarray(reference).dtype, field
    np.testing.assert_array_equal(np.asarray(value), np.asarray(reference))


def _nnx_optimizer():
  from flax import nnx

  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(1e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 2))) ** 2))(model)
  optimizer.update(model, grads)
  return optimizer


def test_nnx_state_of_the_optimizer_keeps_the_names():
  from flax import nnx

  optimizer = _nnx_optimizer()
  expected = clipjax.clip_stats(optimizer.opt_state)
  assert sorted(expected) == sorted(f"clip_by_global_norm/{f}" for f in FIELDS)
  # The functional split: nnx.state(optimizer) wraps every leaf in a Variable.
  _assert_same_stats(clipjax.clip_stats(nnx.state(optimizer)), "clip_by_global_norm", expected,
                     "clip_by_global_norm")
  _, state = nnx.split(optimizer)
  _assert_same_stats(clipjax.clip_stats(state), "clip_by_global_norm", expected,
                     "clip_by_global_norm")
  assert bool(expected["clip_by_global_norm/clipped"])


def test_flax_state_dict_keeps_the_names():
  from flax import serialization

  state = _chain_state()
  expected = clipjax.clip_stats(state)
  stats = clipjax.clip_stats(serialization.to_state_dict(state))
  _assert_same_stats(stats, "clip_by_global_norm", expected, "clip_by_global_norm")
  np.testing.assert_allclose(float(stats["clip_by_global_norm/norm"]), GLOBAL_NORM, rtol=1e-6)
  # msgpack bytes restored without a target: the same dicts.
  restored = serialization.msgpack_restore(serialization.to_bytes(state))
  _assert_same_stats(clipjax.clip_stats(restored), "clip_by_global_norm", expected,
                     "clip_by_global_norm")


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring:UserWarning")
@pytest.mark.parametrize("checkpointer", ["StandardCheckpointer", "PyTreeCheckpointer"])
def test_orbax_checkpoint_restored_without_target(tmp_path, checkpointer):
  ocp = pytest.importorskip("orbax.checkpoint")

  state = _chain_state()
  saver = getattr(ocp, checkpointer)()
  saver.save(tmp_path / "state", state)
  if hasattr(saver, "wait_until_finished"):
    saver.wait_until_finished()
  restored = saver.restore(tmp_path / "state")  # no target: nested lists and dicts
  assert isinstance(restored, list) and isinstance(restored[0], dict)
  _assert_same_stats(clipjax.clip_stats(restored), "clip_by_global_norm",
                     clipjax.clip_stats(state), "clip_by_global_norm")


def test_dict_states_of_one_kind_are_named_apart_as_live_ones():
  from flax import serialization

  # Eleven of one name: "10" sorts before "2" as a string, but not as a position.
  tx = optax.chain(*[clipjax.clip_by_norm(float(10 - i)) for i in range(11)])
  _, state = tx.update(GRADS, tx.init(PARAMS))
  expected = clipjax.clip_stats(state)
  assert len(expected) == 11 * len(FIELDS)
  stats = clipjax.clip_stats(serialization.to_state_dict(state))
  assert sorted(stats) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(stats[name], value)
  assert float(expected["clip_by_norm_10/threshold"]) == 0.0


def test_dict_state_inside_inject_hyperparams_and_at_the_root():
  from flax import serialization

  tx = optax.inject_hyperparams(lambda max_norm: optax.chain(
      clipjax.clip_by_global_norm(max_norm), optax.sgd(0.1)))(max_norm=2.0)
  _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  stats = clipjax.clip_stats(serialization.to_state_dict(state))
  _assert_same_stats(stats, "clip_by_global_norm", clipjax.clip_stats(state),
                     "clip_by_global_norm")
  # A transform's own state as a dict, named.
  clipper = clipjax.clip_by_norm(1.0, name="per_tensor")
  _, alone = clipper.update(GRADS, clipper.init(PARAMS))
  _assert_same_stats(clipjax.clip_stats(serialization.to_state_dict(alone)), "per_tensor",
                     clipjax.clip_stats(alone), "per_tensor")


def test_named_tuple_and_dict_states_together_are_named_apart():
  from flax import serialization

  state = _chain_state()
  stats = clipjax.clip_stats({"live": state, "saved": serialization.to_state_dict(state)})
  assert sorted(stats) == sorted([f"clip_by_global_norm_{i}/{f}" for f in FIELDS
                                  for i in (0, 1)])


def test_a_mapping_without_a_clip_stats_dict_is_not_a_transform_state():
  assert clipjax.clip_stats({"stats": {"norm": jnp.ones(()), "scale": jnp.ones(())}}) == {}
  assert clipjax.clip_stats({"clip_stats": jnp.ones(())}) == {}


def test_nothing_found_where_there_is_nothing():
  assert clipjax.clip_stats(optax.adam(1e-3).init(PARAMS)) == {}
  assert clipjax.clip_stats({}) == {}
  assert clipjax.clip_stats({"step": 3, "name": "run"}) == {}
  assert clipjax.clip_stats([None, ()]) == {}
