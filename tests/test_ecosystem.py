"""clipjax composed with the rest of the ecosystem: Flax NNX, optax's tree utilities,
NumPy states, donation and path names."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
import registry

# optax's and Flax's own code mixes int32 counters and floats.
pytestmark = pytest.mark.loose_promotion

GRADS = {"enc": {"kernel": jnp.arange(6.0).reshape(3, 2) - 2.5, "bias": jnp.array([4.0, -3.0])},
         "head": jnp.array([0.5, 0.0, -9.0])}


def _nnx_model():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(2, 3, rngs=rngs)
      self.l2 = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  return Model(nnx.Rngs(0))


def test_nnx_leaf_stats_are_keyed_by_the_parameters_paths_and_scan():
  from flax import nnx

  model = _nnx_model()
  optimizer = nnx.Optimizer(model, clipjax.clip_by_norm(1.0, leaf_stats=True), wrt=nnx.Param)
  x = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)

  def loss(m):
    return jnp.sum(m(x) ** 2)

  grads = nnx.grad(loss)(model)
  optimizer.update(model, grads)
  stats = clipjax.clip_stats(optimizer.opt_state)
  names = sorted(k.split("leaf_norms/")[1] for k in stats if "leaf_norms/" in k)
  assert names == ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"]
  pure = nnx.to_pure_dict(grads)
  for name in names:
    layer, kind = name.split("/")
    expected = np.linalg.norm(np.asarray(pure[layer][kind], np.float64))
    np.testing.assert_allclose(float(stats[f"clip_by_norm/leaf_norms/{name}"]), expected,
                               rtol=1e-6)

  # Training steps under nnx.scan keep the state's structure.
  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def train(carry, batch):
    m, opt = carry
    opt.update(m, nnx.grad(lambda mm: jnp.sum(mm(batch) ** 2))(m))
    return m, opt

  train((model, optimizer), jnp.stack([x, 2 * x, 3 * x]))
  assert sorted(k for k in clipjax.clip_stats(optimizer.opt_state) if "leaf_norms/" in k) == [
      f"clip_by_norm/leaf_norms/{n}" for n in names]


def test_colliding_leaf_names_raise_as_norms_by_path_does():
  tree = {"enc": {"kernel": jnp.ones(2)}, "enc/kernel": jnp.ones(3)}
  with pytest.raises(ValueError, match="both named 'enc/kernel'"):
    clipjax.norms_by_path(tree)
  tx = clipjax.clip_by_norm(1.0, leaf_stats=True)
  with pytest.raises(ValueError, match="both named 'enc/kernel'"):
    tx.init(tree)
  state = clipjax.clip_by_norm(1.0, leaf_stats=True).init({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="both named 'enc/kernel'"):
    tx.update(tree, state)


@pytest.mark.parametrize("entry", registry.select(lambda e: e.inner is None), ids=str)
def test_tree_get_count_finds_the_optimizers_count(entry):
  tx = optax.chain(entry.build(), optax.adam(1e-3))
  state = tx.init(GRADS)
  _, state = tx.update(GRADS, state, GRADS)
  assert int(optax.tree_utils.tree_get(state, "count")) == 1


@pytest.mark.parametrize("entry", registry.ENTRIES, ids=str)
def test_states_of_numpy_arrays_are_accepted(entry):
  # What flax.serialization.from_bytes gives: the state's classes, NumPy arrays inside.
  tx = entry.build()
  state = tx.init(GRADS)
  _, state = tx.update(GRADS, state, GRADS)
  as_numpy = jax.tree.map(np.asarray, state)
  expected = tx.update(GRADS, state, GRADS)
  got = tx.update(GRADS, as_numpy, GRADS)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("entry", registry.ENTRIES, ids=str)
def test_a_state_never_aliases_a_users_array(entry):
  name, _ = entry.hyper
  value = jnp.asarray(float(entry.kwargs.get(name, 1.0)), jnp.float32)
  tx = entry.build(**{name: value}) if name in entry.kwargs else entry.build()
  state = tx.init(GRADS)
  buffers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]
  assert len(set(buffers)) == len(buffers), "a donated state must not hold one buffer twice"
  step = jax.jit(tx.update, donate_argnums=(1,))
  _, state = step(GRADS, state, GRADS)
  _, state = step(GRADS, state, GRADS)
  assert not value.is_deleted()
  float(value)
  # A fresh state after the donated ones still works.
  jax.block_until_ready(step(GRADS, tx.init(GRADS), GRADS))
  initial = clipjax.quantile_clip(initial_norm=value)
  state = initial.init(GRADS)
  jax.jit(initial.update, donate_argnums=(1,))(GRADS, state)
  assert not value.is_deleted()


def test_layer_axis_prefix_matches_nnx_states_by_path():
  from flax import nnx

  class Scanned(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.Param(jax.random.normal(rngs.params(), (3, 2, 2)))
      self.head = nnx.Linear(2, 1, rngs=rngs)

    def __call__(self, x):
      for i in range(3):
        x = jnp.tanh(x @ self.blocks[i])
      return self.head(x)

  x = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
  plain = {"blocks": 0, "head": None}
  model = Scanned(nnx.Rngs(0))
  from_state = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
  from_state["blocks"] = 0
  for prefix in (plain, from_state):
    optimizer = nnx.Optimizer(model, clipjax.clip_by_norm(0.1, layer_axis=prefix),
                              wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    pure = nnx.to_pure_dict(grads)
    expected = np.max([np.linalg.norm(np.asarray(pure["blocks"][i], np.float64))
                       for i in range(3)] + [np.linalg.norm(np.asarray(v, np.float64))
                                             for v in pure["head"].values()])
    np.testing.assert_allclose(float(optimizer.opt_state.stats.norm), expected, rtol=1e-6)


def test_layer_axis_that_does_not_fit_says_what_differs():
  tree = {"blocks": jnp.ones((3, 2)), "head": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"no entries for the leaf head .* entries are at"):
    clipjax.leaf_norms(tree, layer_axis={"blocks": 0})
  with pytest.raises(ValueError, match=r"entries at \['tail'\] that match no leaf"):
    clipjax.leaf_norms(tree, layer_axis={"blocks": 0, "head": None, "tail": None})


def _clip_derivative(g: np.ndarray, high: float, low: float | None) -> np.ndarray:
  """d/dg of sum(g · s) with s = high/‖g‖ above high, low/‖g‖ below low, in float64."""
  n = np.linalg.norm(g)
  unit = g / n
  target = high if n > high else low if (low is not None and n < low) else None
  if target is None:
    return np.ones_like(g)
  return target / n * (np.ones_like(g) - unit * unit.sum())


@pytest.mark.parametrize("magnitude", [1e-30, 1e-25, 1e-10, 1.0, 1e10, 1e20, 1e30])
def test_derivatives_follow_the_formula_at_extreme_norms(magnitude):
  g = np.array([3.0, -4.0]) * magnitude
  cases = [(clipjax.clip_by_global_norm(1.0), 1.0, None),
           (clipjax.clip_by_norm(1.0), 1.0, None),
           (clipjax.clip_by_global_norm(1.0, min_norm=0.5), 1.0, 0.5),
           (clipjax.clip_by_norm(1.0, min_norm=0.5), 1.0, 0.5)]
  for tx, high, low in cases:
    got = jax.grad(lambda x, tx=tx: jnp.sum(tx.update(x, tx.init(x))[0]))(jnp.asarray(g,
                                                                                      jnp.float32))
    np.testing.assert_allclose(got, _clip_derivative(g, high, low), rtol=2e-6)
  got = jax.grad(lambda x: jnp.sum(clipjax.clip_grad_norm(x, 1.0)[0]))(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(got, _clip_derivative(g, 1.0, None), rtol=2e-6)
