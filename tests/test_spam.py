"""stable_spam_clip in front of AdamW against a float64 transcription of the Stable-SPAM optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax
from _dist_cases import compiled_texts
from _dist_cases import count_all_gather
from _dist_cases import count_all_reduce
from _dist_cases import count_lowered_all_reduce
from _dist_cases import place
from _trees import assert_tree_close
from _trees import random_tree

SHAPES = {"w": (6, 4), "b": (4,), "k": (2, 3, 2)}


class StableSpamReference:
  """One parameter tensor of the reference ``StableSPAM`` optimizer, in float64.

  ``galore_torch/stablespam.py`` with ``update_proj_gap=0`` (no moment reset),
  ``total_T=None`` (constant learning rate) and ``weight_decay=0``: AdaClip and
  AdaGN on the gradient, then Adam's moments and step as the reference writes
  them (``step_size = lr·sqrt(1 − β2^t)/(1 − β1^t)``, ``denom = sqrt(v) + eps``).
  """

  def __init__(self, shape, lr, betas, eps, theta, gamma1, gamma2):
    self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
    self.theta, self.gamma1, self.gamma2 = theta, gamma1, gamma2
    self.exp_avg, self.exp_avg_sq = np.zeros(shape), np.zeros(shape)
    self.m_max_t, self.m_norm_t, self.v_norm_t = 0.0, 0.0, 0.0
    self.step = 0

  def update(self, grad):
    """The change of the parameter for ``grad``."""
    grad = np.array(grad, np.float64)
    self.step += 1
    # AdaClip
    max_gradient = np.max(np.abs(grad))
    self.m_max_t = self.theta * self.m_max_t + (1 - self.theta) * max_gradient
    m_max_hat = self.m_max_t / (1 - self.theta**self.step)
    mask = np.abs(grad) > m_max_hat
    if mask.sum() > 0:
      grad[mask] = grad[mask] / max_gradient * m_max_hat
    # AdaGN
    grad_norm = np.linalg.norm(grad)
    self.m_norm_t = self.gamma1 * self.m_norm_t + (1 - self.gamma1) * grad_norm
    self.v_norm_t = self.gamma2 * self.v_norm_t + (1 - self.gamma2) * grad_norm**2
    m_norm_hat = self.m_norm_t / (1 - self.gamma1**self.step)
    v_norm_hat = self.v_norm_t / (1 - self.gamma2**self.step)
    c_norm_t = m_norm_hat / (np.sqrt(v_norm_hat) + self.eps)
    if grad_norm > 0:
      grad = grad / grad_norm * c_norm_t
    # Adam
    self.exp_avg = self.b1 * self.exp_avg + (1 - self.b1) * grad
    self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1 - self.b2) * grad * grad
    denom = np.sqrt(self.exp_avg_sq) + self.eps
    step_size = self.lr * np.sqrt(1 - self.b2**self.step) / (1 - self.b1**self.step)
    return -step_size * self.exp_avg / denom


def _spiky_steps(seed, n):
  rng = np.random.default_rng(seed)
  steps = []
  for i in range(n):
    grads = random_tree(rng, SHAPES, scale=float(rng.lognormal(0.0, 0.3)))
    if i % 7 == 5:  # an element spike in one tensor
      grads["w"] = grads["w"].at[1, 2].multiply(80.0)
    if i % 11 == 9:  # a whole-tensor spike
      grads["k"] = grads["k"] * 30.0
    steps.append(grads)
  return steps


@pytest.mark.loose_promotion  # optax's Adam mixes float and int32 step counts
@pytest.mark.parametrize("theta,gamma1,gamma2", [(0.999, 0.7, 0.9), (0.9, 0.5, 0.99)])
def test_chained_before_adamw_reproduces_the_reference_optimizer(theta, gamma1, gamma2):
  # The reference adds eps to sqrt(v) before the bias correction, optax to sqrt(v̂): with
  # eps = 1e-10 that changes an update by less than the float32 tolerance.
  lr, betas, eps = 1e-3, (0.9, 0.999), 1e-10
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  tx = optax.chain(clipjax.stable_spam_clip(theta, gamma1, gamma2, eps),
                   optax.adamw(lr, *betas, eps=eps, weight_decay=0.0))
  refs = {k: StableSpamReference(s, lr, betas, eps, theta, gamma1, gamma2)
          for k, s in SHAPES.items()}
  state, update = tx.init(params), jax.jit(tx.update)
  for i, grads in enumerate(_spiky_steps(0, 40)):
    updates, state = update(grads, state, params)
    for k in SHAPES:
      expected = refs[k].update(np.asarray(grads[k]))
      # Adam's first moment cancels where the gradient changes sign: float32 error there is
      # relative to the tensor's largest update.
      np.testing.assert_allclose(np.asarray(updates[k], np.float64), expected, rtol=2e-5,
                                 atol=2e-5 * np.abs(expected).max(), err_msg=f"step {i} {k}")
  assert int(state[0].spam_step) == 40
  stats = clipjax.clip_stats(state)
  assert set(stats) == {f"stable_spam_clip/{f}"
                        for f in ("norm", "threshold", "scale", "clipped", "finite")}


def test_the_transform_alone_matches_adaclip_and_adagn():
  """The gradient the reference hands to Adam, step by step, and the statistics."""
  tx = clipjax.stable_spam_clip()
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  refs = {k: StableSpamReference(s, 1.0, (0.0, 0.0), 1e-8, 0.999, 0.7, 0.9)
          for k, s in SHAPES.items()}
  state, update = tx.init(params), jax.jit(tx.update)
  for i, grads in enumerate(_spiky_steps(1, 25)):
    out, state = update(grads, state)
    targets = []
    for k in SHAPES:
      ref = refs[k]
      ref.update(np.asarray(grads[k]))
      # With β1 = β2 = 0 the reference's Adam step is -grad / (|grad| + eps): read the
      # stabilised gradient from its first moment instead.
      np.testing.assert_allclose(np.asarray(out[k], np.float64), ref.exp_avg, rtol=1e-5,
                                 err_msg=f"step {i} {k}")
      targets.append(np.linalg.norm(ref.exp_avg))
    np.testing.assert_allclose(float(state.stats.threshold), np.linalg.norm(targets),
                               rtol=1e-5)
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    np.testing.assert_allclose(float(state.stats.norm), norm, rtol=1e-5)


def test_layer_axis_equals_the_unstacked_tensors():
  rng = np.random.default_rng(2)
  layers = [random_tree(rng, {"w": (4, 3)}, scale=float(s)) for s in (1.0, 10.0, 0.1)]
  stacked_tx = clipjax.stable_spam_clip(layer_axis={"w": 0})
  split_tx = clipjax.stable_spam_clip()
  stacked = {"w": jnp.stack([layer["w"] for layer in layers])}
  split = {f"w{i}": layer["w"] for i, layer in enumerate(layers)}
  s_state, u_state = stacked_tx.init(stacked), split_tx.init(split)
  for scale in (1.0, 3.0, 0.5, 40.0):
    a, s_state = stacked_tx.update(jax.tree.map(lambda x: x * scale, stacked), s_state)
    b, u_state = split_tx.update(jax.tree.map(lambda x: x * scale, split), u_state)
    for i in range(3):
      np.testing.assert_allclose(a["w"][i], b[f"w{i}"], rtol=1e-6)
  np.testing.assert_allclose(s_state.norm_ema, u_state.norm_ema, rtol=1e-6)


def test_non_finite_and_zero_steps_keep_the_state():
  tx = clipjax.stable_spam_clip()
  grads = random_tree(3, SHAPES)
  state = tx.init(grads)
  _, state = tx.update(grads, state)
  for bad in (np.nan, np.inf, 0.0):
    g = jax.tree.map(lambda x: x * 0.0, grads) if bad == 0.0 else {
        **grads, "w": grads["w"].at[0, 0].set(bad)}
    out, new = tx.update(g, state)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new._replace(clip_stats=None)),
                    jax.tree.leaves(state._replace(clip_stats=None))):
      np.testing.assert_array_equal(a, b)
    assert bool(new.stats.finite) == (bad == 0.0)


def test_a_zero_tensor_stays_zero_and_keeps_its_averages():
  tx = clipjax.stable_spam_clip()
  grads = random_tree(4, SHAPES)
  state = tx.init(grads)
  _, state = tx.update(grads, state)
  out, new = tx.update({**grads, "b": jnp.zeros(4)}, state)
  np.testing.assert_array_equal(out["b"], 0.0)
  index = 0  # "b" is the first leaf in sorted order
  assert float(new.max_ema[index]) == float(state.max_ema[index])
  assert float(new.norm_ema[1]) != float(state.norm_ema[1])


@pytest.mark.parametrize("kwargs,match", [
    ({"theta": 1.0}, "theta=1.0 must be < 1"),
    ({"gamma1": -0.1}, "gamma1=-0.1 must be >= 0"),
    ({"gamma2": 1.5}, "gamma2=1.5 must be < 1"),
    ({"eps": -1.0}, "eps=-1.0 must be >= 0"),
])
def test_bad_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    clipjax.stable_spam_clip(**kwargs)


def test_shard_map_equals_unsharded_with_two_collectives():
  """A max, then a sum that depends on it: two all-reduces, whatever the number of leaves."""
  mesh = jax.make_mesh((8,), ("d",))
  shapes = {"kernel": (16, 6), "proj": (8, 24), "bias": (6,), "gain": ()}
  specs = {"kernel": P("d"), "proj": P(None, "d"), "bias": P(), "gain": P()}
  replicated = {"kernel": False, "proj": False, "bias": True, "gain": True}
  steps = [random_tree(s, shapes, scale=[1.0, 2.0, 30.0, 5.0]) for s in range(4)]
  steps[2]["kernel"] = steps[2]["kernel"].at[3, 1].multiply(100.0)
  plain = clipjax.stable_spam_clip()
  sharded = clipjax.stable_spam_clip(axis_name="d", replicated=replicated)
  f = jax.shard_map(sharded.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
  state = jax.device_put(sharded.init(steps[0]), NamedSharding(mesh, P()))
  lowered, compiled = compiled_texts(f, place(steps[0], specs, mesh), state)
  assert count_lowered_all_reduce(lowered) == 2
  assert count_all_reduce(compiled) == 2, compiled
  assert count_all_gather(compiled) == 0
  step, plain_state, plain_update = jax.jit(f), plain.init(steps[0]), jax.jit(plain.update)
  for grads in steps:
    updates, state = step(place(grads, specs, mesh), state)
    expected, plain_state = plain_update(grads, plain_state)
    assert_tree_close(jax.device_get(updates), expected, rtol=1e-5, atol=1e-30)
    assert_tree_close(jax.device_get(state), plain_state, rtol=1e-5, atol=1e-30)
