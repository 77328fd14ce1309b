"""Non-finite and overflowing values on one device of four are seen by every device.

XLA's max all-reduce on CPU drops NaN operands (pmax of 1, 2, NaN, 3 is 3), also
where the partitioner inserts one under plain ``jit``. Every clipper with
``axis_name``, at every ``ord``, must still report ``finite`` False on every
device and pass the update through exactly as the unsharded run does, with one
all-reduce per update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax
from _dist_cases import all_cases
from _dist_cases import assert_tree_close
from _dist_cases import compiled_texts
from _dist_cases import count_all_reduce
from _dist_cases import make
from _dist_cases import place

N = 4
SHAPES = {"kernel": (8, 3), "bias": (4,), "gain": ()}
SPECS = {"kernel": P("d"), "bias": P("d"), "gain": P()}
REPLICATED = {"kernel": False, "bias": False, "gain": True}
# Every clipper with axis_name, at every ord; `clip` with and without min_delta.
CASES = all_cases() + [("clip-no-floor", float("inf")), ("adaptive_grad_clip", 2)]


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((N,), ("d",), devices=jax.devices()[:N])


def _grads(bad=None):
  rng = np.random.default_rng(0)
  tree = {k: (rng.standard_normal(s) * 3.0).astype(np.float32) for k, s in SHAPES.items()}
  if bad is not None:
    tree["kernel"][5, 1] = bad  # rows 4-5: the third device's shard
  return tree


PARAMS = jax.tree.map(lambda x: np.abs(x) + 1.0, _grads())


def _build(name, ord, **dist):
  if name == "clip-no-floor":
    return clipjax.clip(1.0, axis_name=dist.get("axis_name"))
  if name == "adaptive_grad_clip":
    return clipjax.adaptive_grad_clip(0.1, axis_name=dist.get("axis_name"),
                                      replicated=dist.get("replicated"))
  return make(name, ord, 1.0, **dist)


def _per_device(tree):
  """Each device's copy of a replicated value, stacked: ``[N, ...]``."""
  return jax.tree.map(lambda x: x[None], tree)


def test_psum_propagates_nan_and_inf(mesh):
  f = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "d"), mesh=mesh, in_specs=P("d"),
                            out_specs=P()))
  for bad, expected in ((np.nan, np.nan), (np.inf, np.inf), (-np.inf, -np.inf)):
    x = jax.device_put(jnp.array([1.0, 2.0, bad, 3.0]), NamedSharding(mesh, P("d")))
    np.testing.assert_array_equal(np.asarray(f(x)), [expected])


def test_all_reduce_max_keeps_nan_with_one_collective(mesh):
  from clipjax import _norms
  f = jax.jit(jax.shard_map(lambda x: _norms.all_reduce(x, "d", maximum=True), mesh=mesh,
                            in_specs=P("d"), out_specs=P()))
  for position in range(N):
    values = np.array([1.0, 2.0, -5.0, 3.0], np.float32)
    values[position] = np.nan
    x = jax.device_put(values, NamedSharding(mesh, P("d")))
    assert np.isnan(np.asarray(f(x))).all()
    assert count_all_reduce(compiled_texts(f, x)[1]) == 1
  x = jax.device_put(jnp.array([1.0, np.inf, -5.0, 3.0]), NamedSharding(mesh, P("d")))
  np.testing.assert_array_equal(np.asarray(f(x)), [np.inf])


@pytest.mark.parametrize(("name", "ord"), CASES)
def test_nonfinite_shard_is_seen_by_every_device(mesh, name, ord):
  tx = _build(name, ord, axis_name="d", replicated=REPLICATED)
  plain = _build(name, ord)
  params = place(PARAMS, SPECS, mesh)

  def update(g, state, p):
    out, new = tx.update(g, state, p)
    return out, _per_device(new)

  f = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(SPECS, P(), SPECS),
                            out_specs=(SPECS, P("d"))))
  state = tx.init(PARAMS)
  for bad in (np.nan, np.inf):
    grads = _grads(bad)
    out, states = jax.device_get(f(place(grads, SPECS, mesh), state, params))
    expected, expected_state = plain.update(grads, plain.init(PARAMS), PARAMS)
    assert_tree_close(out, expected, rtol=1e-5, what=f"{name} {ord} {bad}: updates")
    for i in range(N):
      device = jax.tree.map(lambda x, i=i: x[i], states)
      assert not bool(device.stats.finite), (name, ord, bad, i)
      assert_tree_close(device, expected_state, rtol=1e-5, what=f"{name} {ord} {bad} device {i}: ")
  assert count_all_reduce(compiled_texts(f, place(_grads(), SPECS, mesh), state, params)[1]) == 1


@pytest.mark.parametrize("ord", [1, 2, float("inf")])
def test_nonfinite_shard_under_sharded_jit(mesh, ord):
  """No axis_name: XLA inserts the reduction, which must keep the NaN too."""
  tx = clipjax.clip_by_global_norm(1.0, ord=ord)
  update = jax.jit(tx.update)
  for bad in (np.nan, np.inf):
    grads = place(_grads(bad), SPECS, mesh)
    assert not np.isfinite(float(clipjax.global_norm(grads, ord=ord)))
    out, state = update(grads, tx.init(None))
    assert not bool(state.stats.finite)
    assert_tree_close(out, _grads(bad), rtol=1e-5, what=f"ord={ord} {bad}")


def test_agc_overflow_on_one_shard_matches_unsharded_with_one_all_reduce(mesh):
  grads = _grads()
  grads["kernel"][2:4] = 3e19  # overflows the second device's unit sums only
  grads["bias"][:] = 1e19  # each device's partial is finite, their sum is not
  tx = clipjax.adaptive_grad_clip(0.1, axis_name="d", replicated=REPLICATED)
  f = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(SPECS, P(), SPECS),
                            out_specs=(SPECS, P())))
  state = jax.device_put(tx.init(PARAMS), NamedSharding(mesh, P()))
  args = (place(grads, SPECS, mesh), state, place(PARAMS, SPECS, mesh))
  out, new = f(*args)
  plain = clipjax.adaptive_grad_clip(0.1)
  expected, expected_state = plain.update(grads, None, PARAMS)
  assert bool(new.stats.finite) and bool(new.stats.clipped)
  assert_tree_close(out, expected, rtol=1e-6, what="updates")
  assert_tree_close(new, expected_state, rtol=1e-6, what="state")
  assert count_all_reduce(compiled_texts(f, *args)[1]) == 1
