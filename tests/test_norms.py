"""global_norm, leaf_norms and unitwise_norm against NumPy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from _trees import ORDS
from _trees import np_leaf_norms
from _trees import np_norm
from _trees import np_unit_norms
from _trees import random_tree
# The only package internals the tests use: where they move, only these lines change.
from clipjax._norms import check_ord
from clipjax._layout import replicated_mask

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SHAPES = {"dense": {"kernel": (7, 5), "bias": (5,)}, "conv": (3, 3, 2, 4), "scalar": ()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_matches_float64_reference(dtype, ord):
  tree = random_tree(0, SHAPES, dtype, scale=3.0)
  got = clipjax.global_norm(tree, ord=ord)
  assert got.dtype == jnp.float32
  # float32 accumulation of values held exactly: relative error ~1e-6 whatever the input dtype.
  np.testing.assert_allclose(float(got), np_norm(tree, ord), rtol=2e-6)
  np.testing.assert_allclose(float(jax.jit(clipjax.global_norm, static_argnums=1)(tree, ord)),
                             np_norm(tree, ord), rtol=2e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_leaf_norms_match_reference(ord):
  tree = random_tree(1, SHAPES)
  np.testing.assert_allclose(np.asarray(clipjax.leaf_norms(tree, ord=ord)),
                             np_leaf_norms(tree, ord), rtol=2e-6)


def test_float16_sum_of_squares_does_not_overflow():
  grads = {"w": jnp.full((1000,), 300.0, jnp.float16)}
  # float16 accumulation overflows at 65504: optax.tree.norm returns inf here.
  assert not np.isfinite(float(optax.tree.norm(grads)))
  np.testing.assert_allclose(float(clipjax.global_norm(grads)), 300.0 * np.sqrt(1000.0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("ord", [1, 2])
def test_squares_beyond_float32_range_use_the_rescaled_pass(dtype, ord):
  # 1e30**2 overflows float32; the norm itself (1e31) does not.
  tree = {"big": jnp.full((100,), 1e30, dtype), "small": jnp.full((3,), 2.0, dtype)}
  expected = np_norm(tree, ord)
  np.testing.assert_allclose(float(clipjax.global_norm(tree, ord=ord)), expected, rtol=2e-6)
  np.testing.assert_allclose(float(jax.jit(clipjax.global_norm)(tree)), np_norm(tree, 2),
                             rtol=2e-6)
  np.testing.assert_allclose(np.asarray(clipjax.leaf_norms(tree, ord=ord)),
                             np_leaf_norms(tree, ord), rtol=2e-6)


def test_norm_beyond_float32_range_is_inf():
  tree = [jnp.full((4,), 3e38, jnp.float32)]
  assert float(clipjax.global_norm(tree)) == np.inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("ord", ORDS)
def test_non_finite_values_give_non_finite_norm(bad, ord):
  tree = {"a": jnp.array([1.0, bad]), "b": jnp.ones(3)}
  assert not np.isfinite(float(clipjax.global_norm(tree, ord=ord)))
  leaves = np.asarray(clipjax.leaf_norms(tree, ord=ord))
  assert not np.isfinite(leaves[0]) and leaves[1] == pytest.approx(np_norm([np.ones(3)], ord))


def test_empty_and_zero_trees():
  assert float(clipjax.global_norm({})) == 0.0
  assert clipjax.leaf_norms({}).shape == (0,)
  zeros = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((0,))}
  for ord in ORDS:
    assert float(clipjax.global_norm(zeros, ord=ord)) == 0.0


def test_mixed_dtypes_in_one_tree():
  tree = {"a": jnp.full((10,), 300.0, jnp.float16), "b": jnp.full((10,), 1e20, jnp.bfloat16),
          "c": jnp.arange(4.0, dtype=jnp.float32)}
  np.testing.assert_allclose(float(clipjax.global_norm(tree)), np_norm(tree, 2), rtol=2e-6)


def test_float64_under_x64_accumulates_in_float64():
  with jax.enable_x64(True):
    tree = {"a": jnp.asarray(np.linspace(-1.0, 1.0, 101), jnp.float64) * 1e200}
    got = clipjax.global_norm(tree)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), np_norm(tree, 2), rtol=1e-12)


def test_string_inf_and_invalid_ord():
  assert check_ord("inf") == np.inf
  assert check_ord(2.0) == 2
  for bad in [3, 0, -1, "two", None]:
    with pytest.raises(ValueError, match="ord="):
      clipjax.global_norm({"a": jnp.ones(2)}, ord=bad)


def test_replicated_must_be_a_prefix_of_bools():
  tree = {"a": jnp.ones(2), "b": {"c": jnp.ones(2), "d": jnp.ones(2)}}
  assert replicated_mask(tree, {"a": True, "b": False}) == [True, False, False]
  assert replicated_mask(tree, True) == [True, True, True]
  with pytest.raises(ValueError, match="replicated="):
    replicated_mask(tree, {"a": True, "x": False})
  with pytest.raises(ValueError, match="replicated="):
    replicated_mask(tree, {"a": 1, "b": False})


@pytest.mark.parametrize("shape,axis", [((5,), None), ((1, 5), None), ((4, 3), None),
                                         ((2, 4, 3), None), ((3, 3, 2, 4), None),
                                         ((2, 2, 2, 3, 4), None), ((4, 3), 1), ((3, 2, 6), (0, 2)),
                                         # Short and odd leading axes, 64 and 65 rows.
                                         ((7, 9), None), ((5, 4, 6), None), ((64, 3), None),
                                         ((65, 3), None), ((2, 3, 5), (0, 1))])
def test_unitwise_norm_matches_optax_and_numpy(shape, axis):
  x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
  got = clipjax.unitwise_norm(x, axis=axis)
  theirs = optax.transforms.unitwise_norm(x, axis=axis)
  np.testing.assert_allclose(np.asarray(got), np.asarray(theirs), rtol=1e-6)
  expected = np.broadcast_to(np_unit_norms(x, axis), shape)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6)


def test_unitwise_norm_float16_does_not_overflow_and_rank_6_needs_axis():
  x = jnp.full((1000, 2), 300.0, jnp.float16)
  np.testing.assert_allclose(np.asarray(clipjax.unitwise_norm(x))[0], 300.0 * np.sqrt(1000.0),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="axis="):
    clipjax.unitwise_norm(jnp.ones((2,) * 6))


def test_underflowing_squares_give_norm_zero_unless_a_floor_asks():
  """As global_norm documents: no underflow rescue without a floor (optax.tree.norm: 0 too)."""
  g = {"a": jnp.full((4,), 1e-25, jnp.float32)}
  assert float(clipjax.global_norm(g)) == 0.0 == float(optax.tree.norm(g))
  np.testing.assert_allclose(float(clipjax.global_norm(g, ord=1)), 4e-25, rtol=1e-6)
  np.testing.assert_allclose(float(clipjax.global_norm(g, ord=np.inf)), 1e-25, rtol=1e-6)
  tx = clipjax.clip_by_global_norm(1.0, min_norm=1e-30)
  updates, state = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_allclose(float(state.stats.norm), 2e-25, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(updates["a"]), np.asarray(g["a"]))


@pytest.mark.parametrize("ord", [1, float("inf")])
def test_derivative_of_ord_1_and_inf_norms_matches_numpy_and_is_zero_at_zero(ord):
  x = jnp.array([3.0, -4.0, 0.0, 0.5])
  grad = jax.grad(lambda v: clipjax.global_norm({"w": v}, ord=ord))(x)
  # d‖x‖₁ = sign(x); d max|x| = sign at the largest element; 0 at x = 0 (the subgradient).
  expected = np.sign(np.asarray(x)) if ord == 1 else np.array([0.0, -1.0, 0.0, 0.0])
  np.testing.assert_array_equal(grad, expected)


def test_derivative_of_a_complex_ord_1_norm_is_finite_at_zero():
  z = jnp.array([3.0 + 4.0j, 0.0 + 0.0j])
  t = jnp.array([1.0 + 2.0j, 1.0 - 1.0j])
  _, tangent = jax.jvp(lambda v: clipjax.global_norm({"w": v}, ord=1), (z,), (t,))
  # d|z| = Re(conj(z)·dz)/|z| = (3·1 + 4·2)/5 for the first element, 0 at z = 0.
  np.testing.assert_allclose(float(tangent), 11.0 / 5.0, rtol=1e-6)
