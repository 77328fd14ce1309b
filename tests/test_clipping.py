"""clip, clip_by_norm, clip_by_global_norm and clip_by_block_rms against references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
import registry
from _trees import ORDS
from _trees import assert_tree_close
from _trees import assert_tree_equal
from _trees import leaf_rms
from _trees import leaves64
from _trees import np_norm
from _trees import random_tree

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
RTOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
SHAPES = {"w": (6, 4), "b": (4,), "k": (2, 3, 2)}
# The norm clippers: an ord, and a floor (min_norm) besides the ceiling.
NORM_CLIPPERS = [entry for entry in registry.FIXED if entry.ords]


def np_scale(norm, max_norm, min_norm=None):
  """The clipping rule in float64: into [min_norm, max_norm], zero stays zero."""
  if norm > max_norm:
    return max_norm / norm
  if min_norm is not None and 0 < norm < min_norm:
    return min_norm / norm
  return 1.0


# clip_by_global_norm ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("max_norm,min_norm", [(0.5, None), (100.0, 50.0), (0.5, 0.1)])
def test_clip_by_global_norm_matches_reference(dtype, ord, max_norm, min_norm):
  grads = random_tree(0, SHAPES, dtype, scale=2.0)
  tx = clipjax.clip_by_global_norm(max_norm, min_norm=min_norm, ord=ord)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  arrays = leaves64(grads)
  norm = np_norm(arrays, ord)
  scale = np_scale(norm, max_norm, min_norm)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  # Inputs are exact in float64; the output is rounded once to `dtype`.
  assert_tree_close(leaves64(updates), [a * scale for a in arrays], rtol=RTOL[dtype], atol=1e-7)
  stats = state.stats
  np.testing.assert_allclose(float(stats.norm), norm, rtol=2e-6)
  np.testing.assert_allclose(float(stats.scale), scale, rtol=2e-6)
  assert bool(stats.clipped) == (scale != 1.0)
  assert bool(stats.finite)
  assert float(stats.threshold) == max_norm
  assert int(state.clip_count) == 1


# Computed once with torch 2.13.0: torch.nn.utils.clip_grad_norm_(ts, max_norm=2.0,
# norm_type=...) on the two tensors of `torch_inputs()`.
TORCH_CLIPPED = {
    1: [[[-0.24193547666072845, -0.14516128599643707, -0.04838709533214569],
         [0.04838709533214569, 0.14516128599643707, 0.24193547666072845]],
        [0.3870967626571655, -0.19354838132858276, 0.032258063554763794, 0.5161290168762207]],
    2: [[[-0.6151984930038452, -0.3691191077232361, -0.12303970009088516],
         [0.12303970009088516, 0.3691191077232361, 0.6151984930038452]],
        [0.9843176007270813, -0.49215880036354065, 0.08202646672725677, 1.3124234676361084]],
    np.inf: [[[-0.9374997615814209, -0.5624998807907104, -0.18749995529651642],
              [0.18749995529651642, 0.5624998807907104, 0.9374997615814209]],
             [1.4999996423721313, -0.7499998211860657, 0.12499997019767761,
              1.9999995231628418]],
}
TORCH_TOTAL_NORM = {1: 15.5, 2: 6.095592498779297, np.inf: 4.0}


def torch_inputs():
  a = (np.arange(6, dtype=np.float64).reshape(2, 3) - 2.5) * 0.75
  b = np.array([3.0, -1.5, 0.25, 4.0])
  return [jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)]


@pytest.mark.parametrize("ord", ORDS)
def test_clip_by_global_norm_matches_torch_clip_grad_norm(ord):
  tx = clipjax.clip_by_global_norm(2.0, ord=ord)
  updates, state = tx.update(torch_inputs(), tx.init(None))
  # torch divides by (norm + 1e-6): 2e-7 relative at these norms, inside 1e-5.
  for got, expected in zip(updates, TORCH_CLIPPED[ord]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5)
  np.testing.assert_allclose(float(state.stats.norm), TORCH_TOTAL_NORM[ord], rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.3, 1.0, 30.0])
def test_clip_by_global_norm_equals_optax_in_float32(max_norm):
  grads = random_tree(1, SHAPES, scale=2.0)
  ours, _ = clipjax.clip_by_global_norm(max_norm).update(grads, None)
  theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  assert_tree_close(ours, theirs, rtol=2e-6)


def test_float16_gradients_of_300_clip_to_norm_one():
  grads = {"w": jnp.full((1000,), 300.0, jnp.float16)}
  tx = clipjax.clip_by_global_norm(1.0)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert updates["w"].dtype == jnp.float16
  norm = np.linalg.norm(np.asarray(updates["w"], np.float64))
  assert abs(norm - 1.0) < 2e-3
  # What optax 0.2.8 does with the same input (its float16 norm overflows to inf).
  theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert np.all(np.asarray(theirs["w"]) == 0.0)
  assert bool(state.stats.finite) and bool(state.stats.clipped)


def test_tiny_scale_is_applied_in_float32_for_float16():
  # scale = 1 / (6e4 * 1000) = 1.7e-8 underflows to 0 in float16; the result does not.
  grads = [jnp.full((10**6,), 6e4, jnp.float16)]
  updates, _ = clipjax.clip_by_global_norm(1.0).update(grads, None)
  np.testing.assert_allclose(np.asarray(updates[0][:3], np.float64), 1e-3, rtol=1e-3)


@pytest.mark.parametrize("entry", NORM_CLIPPERS, ids=str)
@pytest.mark.parametrize("max_norm,min_norm", [(0.0, None), (1.0, 0.5), (0.0, 0.0)])
def test_zero_gradients_stay_zero(entry, max_norm, min_norm):
  grads = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4, jnp.float16)}
  updates, state = entry.make(max_norm, min_norm=min_norm).update(grads, None)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.asarray(leaf) == 0.0)
  assert float(state.stats.scale) == 1.0 and not bool(state.stats.clipped)
  assert bool(state.stats.finite)


def test_max_norm_zero_zeroes_nonzero_gradients():
  updates, state = clipjax.clip_by_global_norm(0.0).update({"a": jnp.array([3.0, 4.0])}, None)
  np.testing.assert_array_equal(np.asarray(updates["a"]), [0.0, 0.0])
  assert float(state.stats.scale) == 0.0 and bool(state.stats.clipped)


@pytest.mark.parametrize("entry", NORM_CLIPPERS, ids=str)
def test_min_norm_raises_tiny_gradient_to_exactly_min_norm(entry):
  grads = {"a": jnp.array([6e-5, 8e-5])}  # norm 1e-4
  updates, state = entry.make(1.0, min_norm=0.01).update(grads, None)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(updates["a"], np.float64)), 0.01,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["a"]), [0.006, 0.008], rtol=1e-6)
  assert bool(state.stats.clipped)
  np.testing.assert_allclose(float(state.stats.scale), 100.0, rtol=1e-5)


@pytest.mark.parametrize("value", [1e-25, 1e-37])
@pytest.mark.parametrize("entry", NORM_CLIPPERS, ids=str)
def test_min_norm_lifts_norms_whose_squares_underflow(entry, value):
  # value**2 underflows float32; the rescue pass measures the norm exactly. (Subnormal
  # inputs, below 1.2e-38, are flushed to zero by XLA on CPU and GPU.)
  grads = {"a": jnp.full((4,), value, jnp.float32)}
  updates, state = jax.jit(entry.make(1.0, min_norm=0.5).update)(grads, None)
  np.testing.assert_allclose(np.asarray(updates["a"]), [0.25] * 4, rtol=1e-5)
  np.testing.assert_allclose(float(state.stats.norm), 2 * float(np.float32(value)), rtol=1e-5)


def test_min_norm_leaves_norms_it_cannot_lift():
  # Lifting 2e-38 to 1e3 needs a factor 5e40, beyond float32: the update passes unchanged.
  grads = [jnp.array([2e-38], jnp.float32)]
  updates, state = clipjax.clip_by_global_norm(1e3, min_norm=1e3).update(grads, None)
  np.testing.assert_array_equal(np.asarray(updates[0]), np.asarray(grads[0]))
  assert not bool(state.stats.clipped) and bool(state.stats.finite)


# Groups: tests/test_group.py (a non-finite group passes, the others are clipped).
@pytest.mark.parametrize("entry", [e for e in registry.FIXED if e.scope == "leaf"], ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_per_leaf_non_finite_leaf_passes_others_are_clipped(entry, bad):
  # Per-leaf rules decide per leaf: the leaf whose norm is not finite passes through,
  # the other is clipped onto the threshold (its norm, or its RMS, of [0.6, 0.8]).
  clipped_b = np.array([0.6, 0.8])
  grads = {"a": jnp.array([1.0, bad]), "b": jnp.array([3.0, 4.0]) * 10 * np.sqrt(0.5)}
  threshold = entry.measure({"b": clipped_b})
  updates, state = jax.jit(entry.make(threshold).update)(grads, None)
  np.testing.assert_array_equal(np.asarray(updates["a"]), [1.0, bad])
  np.testing.assert_allclose(np.asarray(updates["b"]), clipped_b, rtol=1e-6)
  assert not bool(state.stats.finite) and bool(state.stats.clipped)


# Argument checks ------------------------------------------------------------


@pytest.mark.parametrize("entry", NORM_CLIPPERS, ids=str)
def test_bad_arguments_raise_naming_the_argument(entry):
  factory = entry.make
  with pytest.raises(ValueError, match=r"max_norm=-1.0 must be >= 0"):
    factory(-1.0)
  with pytest.raises(ValueError, match=r"min_norm=2.0 must be <= max_norm=1.0"):
    factory(1.0, min_norm=2.0)
  with pytest.raises(ValueError, match=r"min_norm=-0.5 must be >= 0"):
    factory(1.0, min_norm=-0.5)
  with pytest.raises(ValueError, match=r"ord=3 must be 1, 2 or inf"):
    factory(1.0, ord=3)
  with pytest.raises(ValueError, match=r"max_norm=nan must not be NaN"):
    factory(float("nan"))
  with pytest.raises(ValueError, match=r"max_norm='big' must be a number"):
    factory("big")
  with pytest.raises(ValueError, match=r"must be a scalar"):
    factory(jnp.ones(2))
  with pytest.raises(ValueError, match=r"max_norm=True must be a number"):
    factory(True)


def test_clip_and_block_rms_bad_arguments():
  with pytest.raises(ValueError, match=r"max_delta=-1 must be >= 0"):
    clipjax.clip(-1)
  with pytest.raises(ValueError, match=r"min_delta=2.0 must be <= max_delta=1.0"):
    clipjax.clip(1.0, min_delta=2.0)
  with pytest.raises(ValueError, match=r"threshold=-0.1 must be >= 0"):
    clipjax.clip_by_block_rms(-0.1)


# jit, inject_hyperparams, chain --------------------------------------------------


@pytest.mark.parametrize("entry", registry.FIXED, ids=str)
def test_transform_built_inside_jit_with_concrete_threshold(entry):
  threshold = {entry.hyper[0]: 0.5}

  @jax.jit
  def step(g):
    return entry.build(**threshold).update(g, None)[0]

  grads = {"a": jnp.array([3.0, 4.0])}
  expected, _ = entry.build(**threshold).update(grads, None)
  np.testing.assert_array_equal(np.asarray(step(grads)["a"]), np.asarray(expected["a"]))


def test_traced_negative_threshold_is_not_checked_in_python():
  # Values under jit are not checked (that would break inject_hyperparams): the rule
  # g * max_norm / max(norm, max_norm) is applied as written, and flips the sign.
  update = jax.jit(lambda g, m: clipjax.clip_by_global_norm(m).update(g, None)[0])
  grads = np.array([3.0, 4.0])
  got = update(jnp.asarray(grads, jnp.float32), jnp.asarray(-2.0))
  expected = grads * np_scale(np_norm(grads), -2.0)  # [-1.2, -1.6]
  np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL[jnp.float32])


def test_inject_hyperparams_with_injected_ord():
  grads = torch_inputs()
  tx = optax.inject_hyperparams(clipjax.clip_by_global_norm)(max_norm=2.0, ord=1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
  for got, expected in zip(updates, TORCH_CLIPPED[1]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5)


@pytest.mark.loose_promotion  # optax.adam mixes int32 and float internally
@pytest.mark.parametrize("entry", registry.FIXED, ids=str)
def test_chain_with_adam_equals_clip_then_adam(entry):
  # The composition suite checks every transform with five optimizers, to an atol
  # that momentum's cancellations need; from a fresh Adam state none is needed.
  params = random_tree(3, SHAPES)
  grads = random_tree(4, SHAPES, scale=5.0)
  clipper = entry.build(**{entry.hyper[0]: 0.7})
  chained = optax.chain(clipper, optax.adam(1e-2))
  clipped, _ = clipper.update(grads, None)
  expected, _ = optax.adam(1e-2).update(clipped, optax.adam(1e-2).init(params), params)
  got, _ = jax.jit(chained.update)(grads, chained.init(params), params)
  assert_tree_close(got, expected, rtol=1e-6)


# clip_by_norm -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("min_norm", [None, 3.0])
def test_clip_by_norm_clips_each_leaf_independently(dtype, ord, min_norm):
  rng = np.random.default_rng(5)
  grads = {"big": jnp.asarray(rng.normal(size=(5, 5)) * 10, dtype),
           "mid": jnp.asarray(rng.normal(size=(3,)) * 2, dtype),
           "small": jnp.asarray(rng.normal(size=(2, 2)) * 0.01, dtype)}
  tx = clipjax.clip_by_norm(4.0, min_norm=min_norm, ord=ord)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  arrays = leaves64(grads)
  norms = [np_norm(a, ord) for a in arrays]
  scales = [np_scale(n, 4.0, min_norm) for n in norms]
  assert_tree_close(leaves64(updates), [a * s for a, s in zip(arrays, scales)], rtol=RTOL[dtype])
  largest = int(np.argmax(norms))
  np.testing.assert_allclose(float(state.stats.norm), norms[largest], rtol=2e-6)
  np.testing.assert_allclose(float(state.stats.scale), scales[largest], rtol=2e-6)
  assert bool(state.stats.clipped)


def test_clip_by_norm_is_keras_clipnorm_rule():
  # tf.clip_by_norm: t * clip_norm / max(l2norm(t), clip_norm).
  t = jnp.array([[1.0, 2.0], [2.0, 4.0]])  # norm 5
  updates, _ = clipjax.clip_by_norm(2.5).update([t, t / 10], None)
  np.testing.assert_allclose(np.asarray(updates[0]), np.asarray(t) * 0.5, rtol=1e-7)
  np.testing.assert_allclose(np.asarray(updates[1]), np.asarray(t) / 10, rtol=1e-7)


# clip ---------------------------------------------------------------------------


def test_clip_with_min_delta_maps_example_values():
  updates, state = clipjax.clip(1.0, min_delta=0.01).update(jnp.array([0.0, 1e-4, -3.0]), None)
  np.testing.assert_allclose(np.asarray(updates), [0.0, 0.01, -1.0], rtol=1e-7)
  assert float(state.stats.norm) == 3.0 and bool(state.stats.clipped)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("min_delta", [None, 0.05])
def test_clip_matches_elementwise_reference(dtype, min_delta):
  grads = random_tree(6, SHAPES, dtype)
  grads["z"] = jnp.array([0.0, -0.0, 1e-3], dtype)
  tx = clipjax.clip(0.8, min_delta=min_delta)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  expected = []
  for a in leaves64(grads):
    high = float(np.asarray(jnp.asarray(0.8, dtype), np.float64))
    low = float(np.asarray(jnp.asarray(min_delta or 0.0, dtype), np.float64))
    magnitude = np.clip(np.abs(a), low, high)
    expected.append(np.where(a == 0, 0.0, np.sign(a) * magnitude))
  assert_tree_close(leaves64(updates), expected, rtol=0, atol=0)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  largest = max(np.max(np.abs(a)) for a in leaves64(grads))
  assert float(state.stats.norm) == pytest.approx(largest, rel=1e-7)
  np.testing.assert_allclose(float(state.stats.scale), min(1.0, 0.8 / largest), rtol=1e-6)


def test_clip_equals_optax_clip():
  grads = random_tree(7, SHAPES, scale=2.0)
  ours, _ = clipjax.clip(0.5).update(grads, None)
  theirs, _ = optax.clip(0.5).update(grads, optax.EmptyState())
  assert_tree_equal(ours, theirs)


def test_clip_untouched_reports_not_clipped():
  _, state = clipjax.clip(10.0).update([jnp.array([1.0, -2.0])], None)
  assert not bool(state.stats.clipped) and float(state.stats.scale) == 1.0
  _, state = clipjax.clip(10.0, min_delta=0.5).update([jnp.array([1.0, 0.0])], None)
  assert not bool(state.stats.clipped)
  _, state = clipjax.clip(10.0, min_delta=0.5).update([jnp.array([1.0, 0.1])], None)
  assert bool(state.stats.clipped)


# clip_by_block_rms --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_block_rms_matches_optax_and_reference(dtype):
  grads = random_tree(8, SHAPES, dtype, scale=3.0)
  updates, state = clipjax.clip_by_block_rms(1.5).update(grads, None)
  arrays = leaves64(grads)
  rms = leaf_rms(grads)
  expected = [a / max(1.0, r / 1.5) for a, r in zip(arrays, rms)]
  assert_tree_close(leaves64(updates), expected, rtol=RTOL[dtype])
  if dtype == jnp.float32:
    theirs, _ = optax.clip_by_block_rms(1.5).update(grads, optax.EmptyState())
    assert_tree_close(updates, theirs, rtol=2e-6)
  np.testing.assert_allclose(float(state.stats.norm), max(rms), rtol=2e-6)


def test_clip_by_block_rms_zero_block_with_zero_threshold():
  updates, _ = clipjax.clip_by_block_rms(0.0).update([jnp.zeros(3), jnp.ones(2)], None)
  np.testing.assert_array_equal(np.asarray(updates[0]), [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(updates[1]), [0.0, 0.0])
