"""clip_by_rolling_norm against a float64 NumPy transcription of Levanter's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from _trees import np_norm
from _trees import random_tree

SHAPES = {"w": (5, 3), "b": (3,)}


class RollingReference:
  """Levanter's clip_update_by_historical_norm in float64, one step at a time.

  The threshold is ``mean + sigma · max(std, 1e-6)`` (population std) of the
  last ``window`` unclipped norms before this step, once ``min_history`` are in;
  zero and non-finite norms pass unscaled and are not recorded.
  """

  def __init__(self, window, sigma_factor, min_history=None):
    self.window, self.sigma = window, sigma_factor
    self.min_history = max(2, window // 2) if min_history is None else min_history
    self.history = []

  def step(self, norm):
    """The factor applied to an update of this norm, and the threshold in force."""
    threshold = np.inf
    if len(self.history) >= self.min_history:
      h = np.array(self.history, np.float64)
      threshold = h.mean() + self.sigma * max(h.std(), 1e-6)
    if not np.isfinite(norm) or norm == 0:
      return 1.0, threshold
    self.history = (self.history + [norm])[-self.window:]
    return (threshold / norm if norm > threshold else 1.0), threshold


def _norm_sequence(seed, n=200):
  """Norms around 1 with spikes, zero steps and non-finite steps."""
  rng = np.random.default_rng(seed)
  scales = rng.lognormal(0.0, 0.2, n)
  scales[rng.choice(n, 12, replace=False)] *= rng.uniform(5.0, 50.0, 12)
  scales[[i for i in (40, 41, 120) if i < n]] = 0.0
  return scales


@pytest.mark.parametrize("window,sigma,min_history", [(16, 3.0, None), (8, 1.0, 3),
                                                      (32, 2.0, 32)])
def test_matches_the_reference_over_200_steps(window, sigma, min_history):
  tx = clipjax.clip_by_rolling_norm(window, sigma, min_history=min_history)
  ref = RollingReference(window, sigma, min_history)
  update = jax.jit(tx.update)
  state = tx.init(None)
  rng = np.random.default_rng(window)
  clipped = 0
  for i, s in enumerate(_norm_sequence(window)):
    grads = random_tree(rng, SHAPES, scale=float(s))
    if i in (77, 150):
      grads["w"] = grads["w"].at[0, 0].set(np.nan if i == 77 else np.inf)
    norm = np_norm(grads)
    factor, threshold = ref.step(norm)
    updates, state = update(grads, state)
    for key in SHAPES:
      expected = np.asarray(grads[key], np.float64) * factor
      np.testing.assert_allclose(np.asarray(updates[key], np.float64), expected, rtol=2e-5,
                                 err_msg=f"step {i} {key}")
    # The statistics report "no threshold yet" as float32's maximum, not inf.
    shown = np.finfo(np.float32).max if threshold == np.inf else threshold
    np.testing.assert_allclose(float(state.stats.threshold), shown, rtol=2e-5)
    assert bool(state.stats.finite) == bool(np.isfinite(norm))
    assert bool(state.stats.clipped) == (factor != 1.0)
    clipped += factor != 1.0
  assert clipped >= 5
  history = np.asarray(state.history)[: int(state.filled)]
  np.testing.assert_allclose(np.sort(history), np.sort(ref.history), rtol=1e-6)


@pytest.mark.loose_promotion  # optax's Adam mixes float and int32 step counts
def test_behind_adamw_clips_the_optimizers_update():
  window, sigma = 8, 2.0
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  adam = optax.adamw(1e-2, weight_decay=0.0)
  tx = optax.chain(adam, clipjax.clip_by_rolling_norm(window, sigma))
  state, adam_state = tx.init(params), adam.init(params)
  ref = RollingReference(window, sigma)
  rng = np.random.default_rng(3)
  update = jax.jit(tx.update)
  clipped = 0
  for i, s in enumerate(_norm_sequence(5, 60)):
    grads = random_tree(rng, SHAPES, scale=float(s))
    adam_updates, adam_state = adam.update(grads, adam_state, params)
    factor, _ = ref.step(np_norm(adam_updates))
    updates, state = update(grads, state, params)
    for key in SHAPES:
      np.testing.assert_allclose(np.asarray(updates[key], np.float64),
                                 np.asarray(adam_updates[key], np.float64) * factor,
                                 rtol=2e-5, atol=1e-12, err_msg=f"step {i}")
    clipped += factor != 1.0
  assert clipped > 0


@pytest.mark.loose_promotion  # optax's Adam mixes float and int32 step counts
def test_in_front_of_adamw_equals_clip_then_adamw():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  clip = clipjax.clip_by_rolling_norm(4, 1.0, min_history=2)
  adam = optax.adamw(1e-2)
  tx = optax.chain(clip, adam)
  state, c_state, a_state = tx.init(params), clip.init(params), adam.init(params)
  rng = np.random.default_rng(4)
  for s in (1.0, 1.2, 0.9, 30.0, 1.1):
    grads = random_tree(rng, SHAPES, scale=s)
    updates, state = tx.update(grads, state, params)
    clipped, c_state = clip.update(grads, c_state, params)
    expected, a_state = adam.update(clipped, a_state, params)
    for key in SHAPES:
      np.testing.assert_allclose(updates[key], expected[key], rtol=1e-6)
  assert bool(state[0].stats.clipped) is False and bool(c_state.stats.finite)


def test_constant_norms_are_never_clipped():
  tx = clipjax.clip_by_rolling_norm(4, 3.0)
  state = tx.init(None)
  for _ in range(10):
    updates, state = tx.update(jnp.array([3.0, 4.0]), state)
    np.testing.assert_array_equal(updates, [3.0, 4.0])
  # The std floor: 5 + 3e-6, within float32 of 5.
  np.testing.assert_allclose(float(state.stats.threshold), 5.0, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"window": 1}, "window=1 must be >= 2"),
    ({"sigma_factor": -1.0}, "sigma_factor=-1.0 must be >= 0"),
    ({"window": 4, "min_history": 5}, "min_history=5 must be <= window=4"),
    ({"min_history": 0}, "min_history=0 must be >= 1"),
])
def test_bad_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    clipjax.clip_by_rolling_norm(**kwargs)
