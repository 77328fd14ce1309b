"""Hypothesis properties of the norm clippers: bounds, direction, identity, dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import clipjax
from _trees import ORDS
from _trees import np_norm

DTYPES = {"float32": (jnp.float32, 1e-5), "bfloat16": (jnp.bfloat16, 2e-2),
          "float16": (jnp.float16, 2e-3)}

# Magnitudes from 1e-30 to 1e3 (and exact zeros): far below and above the thresholds.
finite = st.one_of(
    st.just(0.0),
    st.builds(lambda sign, exponent: sign * 10.0**exponent, st.sampled_from([-1.0, 1.0]),
              st.floats(-30.0, 3.0)),
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32))
# Trees of a few fixed layouts (a scalar, a vector, mixed ranks): each layout is compiled
# once per case, and the examples vary the values, where the properties can break.
LAYOUTS = ([()], [(5,)], [(2, 3), (4,)], [(3, 1, 2), (), (5, 5), (1,)])
trees = st.sampled_from(LAYOUTS).flatmap(lambda shapes: st.tuples(
    *[hnp.arrays(np.float32, shape, elements=finite) for shape in shapes]).map(list))
thresholds = st.floats(1e-3, 1e3)

_jitted = {}


def run(factory, dtype, ord, max_norm, min_norm, grads):
  key = (factory, ord)
  if key not in _jitted:
    _jitted[key] = jax.jit(lambda g, hi, lo: factory(hi, min_norm=lo, ord=ord).update(g, None))
  tree = [jnp.asarray(g, dtype) for g in grads]
  updates, state = _jitted[key](tree, jnp.float32(max_norm), jnp.float32(min_norm))
  return tree, updates, state


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("ord", ORDS)
@given(grads=trees, max_norm=thresholds, low_fraction=st.floats(0.0, 1.0))
def test_global_norm_clip_properties(dtype_name, ord, grads, max_norm, low_fraction):
  dtype, rtol = DTYPES[dtype_name]
  min_norm = max_norm * low_fraction
  tree, updates, _ = run(clipjax.clip_by_global_norm, dtype, ord, max_norm, min_norm, grads)
  before = np_norm(tree, ord)
  after = np_norm(updates, ord)
  assert all(u.dtype == dtype for u in updates)
  # Bounded above by max_norm, below by min_norm when nonzero (rounding in `dtype` aside).
  assert after <= max_norm * (1 + rtol) + 1e-30
  if before > 0 and min_norm > 0:
    assert after >= min_norm * (1 - rtol) or after == 0.0
  if before == 0:
    assert after == 0
  # Identity inside [min_norm, max_norm].
  if min_norm <= before <= max_norm:
    for u, g in zip(updates, tree):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(g))
  # Direction kept: every element scaled by one nonnegative factor.
  scale = after / before if before > 0 else 1.0
  for u, g in zip(updates, tree):
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(g, np.float64) * scale,
                               rtol=rtol * 2, atol=1e-30 + rtol * 2 * after)


@pytest.mark.parametrize("ord", ORDS)
@given(grads=trees, max_norm=thresholds, low_fraction=st.floats(0.0, 1.0))
def test_per_leaf_norm_clip_properties(ord, grads, max_norm, low_fraction):
  min_norm = max_norm * low_fraction
  tree, updates, _ = run(clipjax.clip_by_norm, jnp.float32, ord, max_norm, min_norm, grads)
  for u, g in zip(updates, tree):
    before, after = np_norm(g, ord), np_norm(u, ord)
    assert after <= max_norm * (1 + 1e-5)
    if before > 0 and min_norm > 0:
      assert after >= min_norm * (1 - 1e-5)
    if min_norm <= before <= max_norm:
      np.testing.assert_array_equal(np.asarray(u), np.asarray(g))
    scale = after / before if before > 0 else 1.0
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(g, np.float64) * scale,
                               rtol=2e-5, atol=1e-30 + 2e-5 * after)


@given(grads=trees, max_delta=thresholds, low_fraction=st.floats(0.0, 1.0))
def test_elementwise_clip_properties(grads, max_delta, low_fraction):
  min_delta = max_delta * low_fraction
  tree = [jnp.asarray(g) for g in grads]
  updates, _ = clipjax.clip(max_delta, min_delta=min_delta).update(tree, None)
  hi, lo = np.float32(max_delta), np.float32(min_delta)
  for u, g in zip(updates, tree):
    u, g = np.asarray(u), np.asarray(g)
    assert u.dtype == g.dtype
    assert np.all(np.abs(u) <= hi)
    assert np.all((u == 0) == (g == 0))
    assert np.all(np.sign(u) == np.sign(g))
    assert np.all(np.abs(u[g != 0]) >= lo)
    inside = (np.abs(g) >= lo) & (np.abs(g) <= hi)
    np.testing.assert_array_equal(u[inside], g[inside])
