"""DP-SGD helpers against optax and NumPy float64."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax


def batch_grads(seed, dtype=jnp.float32, batch=6):
  rng = np.random.default_rng(seed)
  scales = np.array([0.0, 0.1, 1.0, 3.0, 10.0, 0.5])[:batch]
  return [jnp.asarray(rng.normal(size=(batch, 3, 2)) * scales[:, None, None], dtype),
          jnp.asarray(rng.normal(size=(batch, 5)) * scales[:, None], dtype)]


def np_per_example(grads, clip):
  arrays = [np.asarray(g, np.float64) for g in grads]
  norms = np.sqrt(sum(np.sum(a.reshape(a.shape[0], -1) ** 2, axis=1) for a in arrays))
  multipliers = np.where(norms > clip, clip / np.where(norms > 0, norms, 1.0), 1.0)
  return [np.tensordot(multipliers, a, axes=1) for a in arrays], int(np.sum(multipliers < 1))


@pytest.mark.parametrize("clip", [0.0, 0.7, 2.0, np.inf])
def test_global_norm_clip_matches_reference_and_optax(clip):
  grads = batch_grads(0)
  summed, count = clipjax.per_example_global_norm_clip(grads, clip)
  expected, expected_count = np_per_example(grads, clip)
  for got, want in zip(summed, expected):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-7)
  assert int(count) == expected_count
  theirs, their_count = optax.per_example_global_norm_clip(grads, clip)
  for got, want in zip(summed, theirs):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=1e-7)
  assert int(count) == int(their_count)


@pytest.mark.parametrize("uniform", [True, False])
def test_layer_norm_clip_matches_optax(uniform):
  grads = batch_grads(1)
  summed, counts = clipjax.per_example_layer_norm_clip(grads, 1.5, uniform=uniform)
  theirs, their_counts = optax.per_example_layer_norm_clip(grads, 1.5, uniform=uniform)
  sizes = [6, 5]
  for i, g in enumerate(grads):
    layer_clip = 1.5 * (np.sqrt(1 / 2) if uniform else np.sqrt(sizes[i] / sum(sizes)))
    expected, expected_count = np_per_example([g], layer_clip)
    np.testing.assert_allclose(np.asarray(summed[i]), expected[0], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(summed[i]), np.asarray(theirs[i]), rtol=2e-6,
                               atol=1e-7)
    assert int(counts[i]) == expected_count == int(their_counts[i])


def test_float16_examples_keep_dtype_and_do_not_overflow():
  grads = [jnp.full((2, 1000), 300.0, jnp.float16)]
  summed, count = clipjax.per_example_global_norm_clip(grads, 1.0)
  assert summed[0].dtype == jnp.float16 and int(count) == 2
  np.testing.assert_allclose(np.linalg.norm(np.asarray(summed[0], np.float64)), 2.0, rtol=2e-3)


def test_non_finite_example_enters_unscaled():
  grads = [jnp.array([[1.0, np.inf], [30.0, 40.0]])]
  summed, count = clipjax.per_example_global_norm_clip(grads, 1.0)
  np.testing.assert_allclose(np.asarray(summed[0]), [1.6, np.inf], rtol=1e-6)
  assert int(count) == 1


def test_bad_input_raises():
  with pytest.raises(ValueError, match="batch dimension"):
    clipjax.per_example_global_norm_clip([jnp.ones((3, 2)), jnp.ones((4,))], 1.0)
  with pytest.raises(ValueError, match="l2_norm_clip=-1.0 must be >= 0"):
    clipjax.per_example_global_norm_clip([jnp.ones((3, 2))], -1.0)
  with pytest.raises(ValueError, match="global_l2_norm_clip=-2 must be >= 0"):
    clipjax.per_example_layer_norm_clip([jnp.ones((3, 2))], -2)
