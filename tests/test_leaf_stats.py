"""clip_by_norm(leaf_stats=True): each leaf's norm and the fraction clipped, by path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import clipjax

GRADS = {"enc": {"kernel": jnp.asarray(np.arange(12.0).reshape(3, 4) - 5.0, jnp.float32),
                 "bias": jnp.asarray([0.3, -0.4, 0.0, 0.0], jnp.float32)},
         "stack": jnp.asarray([[3.0, 4.0], [0.0, 0.5], [6.0, 8.0]], jnp.float32)}


def _np_norm(x):
  return float(np.sqrt(np.sum(np.square(np.asarray(x, np.float64)))))


def _stats(tx, grads=GRADS):
  state = tx.init(grads)
  _, state = jax.jit(tx.update)(grads, state, grads)
  return state, clipjax.clip_stats(state)


def test_leaf_norms_and_fraction_by_path():
  state, stats = _stats(clipjax.clip_by_norm(2.0, leaf_stats=True))
  expected = {"enc/bias": _np_norm(GRADS["enc"]["bias"]),
              "enc/kernel": _np_norm(GRADS["enc"]["kernel"]), "stack": _np_norm(GRADS["stack"])}
  for path, norm in expected.items():
    np.testing.assert_allclose(float(stats[f"clip_by_norm/leaf_norms/{path}"]), norm, rtol=1e-6)
  clipped = sum(norm > 2.0 for norm in expected.values())
  np.testing.assert_allclose(float(stats["clip_by_norm/clipped_fraction"]), clipped / 3)
  np.testing.assert_allclose(float(stats["clip_by_norm/norm"]), max(expected.values()), rtol=1e-6)
  # A restored, dict-shaped state reports the same figures under the same names.
  restored = clipjax.clip_stats(serialization.to_state_dict(state))
  np.testing.assert_allclose(float(restored["clip_by_norm/leaf_norms/enc/kernel"]),
                             expected["enc/kernel"], rtol=1e-6)


def test_with_a_layer_axis_each_slice_has_its_norm():
  tx = clipjax.clip_by_norm(2.0, leaf_stats=True, layer_axis={"enc": None, "stack": 0})
  _, stats = _stats(tx)
  np.testing.assert_allclose(np.asarray(stats["clip_by_norm/leaf_norms/stack"]), [5.0, 0.5, 10.0],
                             rtol=1e-6)
  # 5 tensors (kernel, bias, three slices): kernel and two slices are above 2.
  np.testing.assert_allclose(float(stats["clip_by_norm/clipped_fraction"]), 3 / 5)


def test_default_state_is_unchanged_and_init_needs_params():
  _, stats = _stats(clipjax.clip_by_norm(2.0))
  assert sorted(stats) == sorted(f"clip_by_norm/{f}" for f in clipjax.ClipStats._fields)
  with pytest.raises(ValueError, match="leaf_stats"):
    clipjax.clip_by_norm(2.0, leaf_stats=True).init(None)
