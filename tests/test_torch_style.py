"""clip_grad_norm and clip_grad_value against a NumPy transcription of torch.nn.utils.

torch is not a test dependency: the references below transcribe
``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` (torch 2.x) in
float64, line for line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax

ORDS = [1, 2, np.inf]
# Relative precision of an output leaf, per dtype (one rounding of the scaled value).
RTOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def torch_clip_grad_norm(grads, max_norm, norm_type=2.0):
  """``torch.nn.utils.clip_grad_norm_`` in float64 (error_if_nonfinite=False)."""
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  if not leaves:
    return [], 0.0
  norm_type = float(norm_type)
  norms = [np.linalg.norm(g.ravel(), norm_type) for g in leaves]
  total_norm = np.linalg.norm(np.array(norms), norm_type)
  clip_coef = max_norm / (total_norm + 1e-6)
  clip_coef_clamped = min(clip_coef, 1.0)  # torch.clamp(clip_coef, max=1.0)
  return [g * clip_coef_clamped for g in leaves], total_norm


def torch_clip_grad_value(grads, clip_value):
  """``torch.nn.utils.clip_grad_value_`` in float64: ``clamp_(-clip_value, clip_value)``."""
  return [np.clip(np.asarray(g, np.float64), -clip_value, clip_value)
          for g in jax.tree.leaves(grads)]


def random_grads(seed, dtype=jnp.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, 4)) * scale, dtype),
                    "bias": jnp.asarray(rng.normal(size=(4,)) * scale, dtype)},
          "layers": [jnp.asarray(rng.normal(size=(3, 3, 2)) * scale, dtype)]}


def _assert_leaves_close(got, expected, rtol, atol=0.0):
  leaves = jax.tree.leaves(got)
  assert len(leaves) == len(expected)
  for leaf, ref in zip(leaves, expected):
    np.testing.assert_allclose(np.asarray(leaf, np.float64), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and untouched
def test_clip_grad_norm_matches_torch(ord, dtype, max_norm):
  grads = random_grads(0, dtype, scale=2.0)
  clipped, total_norm = clipjax.clip_grad_norm(grads, max_norm, norm_type=ord)
  expected, expected_norm = torch_clip_grad_norm(grads, max_norm, ord)
  assert total_norm.dtype == jnp.float32
  np.testing.assert_allclose(float(total_norm), expected_norm, rtol=2e-6)
  assert [x.dtype for x in jax.tree.leaves(clipped)] == [dtype] * 3
  # torch divides by total_norm + 1e-6: the factors differ by a relative 1e-6 / total_norm.
  _assert_leaves_close(clipped, expected, rtol=RTOL[dtype] + 1e-6 / expected_norm)


@pytest.mark.parametrize("ord", ORDS)
def test_clip_grad_norm_is_the_exact_clipjax_rule(ord):
  grads = random_grads(1, scale=2.0)
  clipped, total_norm = clipjax.clip_grad_norm(grads, 0.5, ord)
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  norm = np.linalg.norm(np.array([np.linalg.norm(g.ravel(), ord) for g in leaves]), ord)
  _assert_leaves_close(clipped, [g * 0.5 / max(norm, 0.5) for g in leaves], rtol=2e-6)
  np.testing.assert_allclose(float(clipjax.global_norm(clipped, ord)), 0.5, rtol=2e-6)
  # The same numbers as the optax transform it is built on.
  updates, state = clipjax.clip_by_global_norm(0.5, ord=ord).update(grads, None)
  assert float(total_norm) == float(state.stats.norm)
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(updates)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ord", ORDS)
def test_clip_grad_norm_under_jit(ord):
  grads = random_grads(2, scale=2.0)
  eager = clipjax.clip_grad_norm(grads, 1.0, ord)
  static = jax.jit(clipjax.clip_grad_norm, static_argnames=("norm_type", "error_if_nonfinite"))
  traced = jax.jit(lambda g, m: clipjax.clip_grad_norm(g, m, ord))  # a traced max_norm
  for got in (static(grads, 1.0, norm_type=ord), traced(grads, jnp.float32(1.0))):
    np.testing.assert_allclose(float(got[1]), float(eager[1]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(eager[0])):
      np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("spelling", [1, 1.0, 2, 2.0, np.inf, float("inf"), "inf", jnp.inf])
def test_norm_type_spellings(spelling):
  grads = {"w": jnp.array([3.0, -4.0])}
  expected = {1.0: 7.0, 2.0: 5.0, np.inf: 4.0}[float(spelling)]
  _, total_norm = clipjax.clip_grad_norm(grads, 1.0, spelling)
  assert float(total_norm) == expected


@pytest.mark.parametrize("bad", [3, 0.5, -1, 0, "fro", "nuc", None, True])
def test_other_norm_types_raise_naming_norm_type(bad):
  with pytest.raises(ValueError, match="norm_type=.* must be 1, 2 or inf"):
    clipjax.clip_grad_norm({"w": jnp.ones(2)}, 1.0, bad)


def test_bad_max_norm_and_flag_raise_naming_them():
  with pytest.raises(ValueError, match="max_norm=-1.0 must be >= 0"):
    clipjax.clip_grad_norm({"w": jnp.ones(2)}, -1.0)
  with pytest.raises(ValueError, match="max_norm=.* must be a number, not a schedule"):
    clipjax.clip_grad_norm({"w": jnp.ones(2)}, lambda count: 1.0)
  with pytest.raises(ValueError, match="error_if_nonfinite='yes' must be a bool"):
    clipjax.clip_grad_norm({"w": jnp.ones(2)}, 1.0, error_if_nonfinite="yes")


def test_zero_and_empty_gradients():
  zeros = {"w": jnp.zeros(3)}
  for max_norm in (1.0, 0.0):
    clipped, total_norm = clipjax.clip_grad_norm(zeros, max_norm)
    assert float(total_norm) == 0.0
    np.testing.assert_array_equal(clipped["w"], np.zeros(3))
  clipped, total_norm = clipjax.clip_grad_norm({}, 1.0)
  assert clipped == {} and float(total_norm) == 0.0


NONFINITE = [np.nan, np.inf]


@pytest.mark.parametrize("bad", NONFINITE)
def test_nonfinite_norm_returns_the_gradients_unscaled(bad):
  grads = {"w": jnp.array([3.0, bad]), "b": jnp.array([100.0])}
  clipped, total_norm = clipjax.clip_grad_norm(grads, 1.0)
  assert not np.isfinite(float(total_norm))
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", NONFINITE)
def test_error_if_nonfinite_raises_eagerly(bad):
  grads = {"w": jnp.array([3.0, bad])}
  with pytest.raises(RuntimeError, match="total norm of order norm_type=2.0 .* cannot be clipped"):
    clipjax.clip_grad_norm(grads, 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("bad", NONFINITE)
def test_error_if_nonfinite_raises_at_run_time_under_jit(bad):
  step = jax.jit(lambda g: clipjax.clip_grad_norm(g, 1.0, "inf", error_if_nonfinite=True))
  # Traced and compiled without error; the check runs with the computation.
  clipped, total_norm = step({"w": jnp.array([3.0, -4.0])})
  assert float(total_norm) == 4.0
  np.testing.assert_allclose(clipped["w"], [0.75, -1.0])
  with pytest.raises(jax.errors.JaxRuntimeError, match="norm_type='inf' .* cannot be clipped"):
    jax.block_until_ready(step({"w": jnp.array([3.0, bad])}))


def test_error_if_nonfinite_with_a_finite_norm_changes_nothing():
  grads = random_grads(3, scale=2.0)
  plain = clipjax.clip_grad_norm(grads, 1.0)
  checked = clipjax.clip_grad_norm(grads, 1.0, error_if_nonfinite=True)
  assert float(plain[1]) == float(checked[1])
  for a, b in zip(jax.tree.leaves(plain[0]), jax.tree.leaves(checked[0])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize("clip_value", [0.0, 0.5, 1e3])
def test_clip_grad_value_matches_torch(dtype, clip_value):
  grads = random_grads(4, dtype, scale=2.0)
  clamped = clipjax.clip_grad_value(grads, clip_value)
  assert [x.dtype for x in jax.tree.leaves(clamped)] == [dtype] * 3
  # The clamp is exact: both sides are values the dtype holds.
  expected = torch_clip_grad_value(grads, float(np.asarray(jnp.asarray(clip_value, dtype),
                                                           np.float64)))
  _assert_leaves_close(clamped, expected, rtol=0.0)


def test_clip_grad_value_under_jit():
  grads = random_grads(5, scale=2.0)
  expected = torch_clip_grad_value(grads, 0.5)
  _assert_leaves_close(jax.jit(clipjax.clip_grad_value)(grads, 0.5), expected, rtol=0.0)
  _assert_leaves_close(jax.jit(clipjax.clip_grad_value, static_argnums=1)(grads, 0.5),
                       expected, rtol=0.0)


def test_clip_grad_value_clamps_finite_elements_and_keeps_nan_and_inf():
  grads = {"w": jnp.array([3.0, np.inf, -np.nan, -np.inf, -0.5]), "b": jnp.array([100.0])}
  clamped = clipjax.clip_grad_value(grads, 1.0)
  np.testing.assert_array_equal(clamped["w"], [1.0, np.inf, np.nan, -np.inf, -0.5])
  np.testing.assert_array_equal(clamped["b"], [1.0])


def test_clip_grad_value_bad_argument_names_itself():
  with pytest.raises(ValueError, match="clip_value=-1.0 must be >= 0"):
    clipjax.clip_grad_value({"w": jnp.ones(2)}, -1.0)
  with pytest.raises(ValueError, match="clip_value=.* must be a number, not a schedule"):
    clipjax.clip_grad_value({"w": jnp.ones(2)}, lambda count: 1.0)


# get_total_norm and clip_grads_with_norm (torch >= 2.6) ----------------------------------


def torch_get_total_norm(grads, norm_type=2.0):
  """``torch.nn.utils.get_total_norm`` in float64: the norm of the per-tensor norms."""
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  if not leaves:
    return 0.0
  norm_type = float(norm_type)
  norms = [np.linalg.norm(g.ravel(), norm_type) for g in leaves]
  return float(np.linalg.norm(np.array(norms), norm_type))


def torch_clip_grads_with_norm(grads, max_norm, total_norm):
  """``torch.nn.utils.clip_grads_with_norm_`` in float64."""
  clip_coef = max_norm / (total_norm + 1e-6)
  clip_coef_clamped = min(clip_coef, 1.0)  # torch.clamp(clip_coef, max=1.0)
  return [np.asarray(g, np.float64) * clip_coef_clamped for g in jax.tree.leaves(grads)]


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize("ord", ORDS)
def test_get_total_norm_matches_torch(ord, dtype):
  grads = random_grads(6, dtype, scale=2.0)
  total_norm = clipjax.get_total_norm(grads, ord)
  assert total_norm.dtype == jnp.float32
  np.testing.assert_allclose(float(total_norm), torch_get_total_norm(grads, ord), rtol=2e-6)
  assert float(clipjax.get_total_norm({})) == 0.0


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e3])  # zeroed, clipped, untouched
def test_clip_grads_with_norm_matches_torch(dtype, max_norm):
  grads = random_grads(7, dtype, scale=2.0)
  total_norm = clipjax.get_total_norm(grads)
  clipped = clipjax.clip_grads_with_norm(grads, max_norm, total_norm)
  assert [x.dtype for x in jax.tree.leaves(clipped)] == [dtype] * 3
  expected = torch_clip_grads_with_norm(grads, max_norm, float(total_norm))
  _assert_leaves_close(clipped, expected, rtol=RTOL[dtype])
  if max_norm == 1e3:  # the coefficient is clamped to 1: the gradients come back unchanged
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(a, b)


def test_clip_grads_with_norm_uses_torchs_epsilon_and_never_scales_up():
  grads = {"w": jnp.array([3.0, 4.0])}
  out = clipjax.clip_grads_with_norm(grads, 1.0, 5.0)["w"]
  np.testing.assert_allclose(np.asarray(out, np.float64), np.array([3.0, 4.0]) / (5.0 + 1e-6),
                             rtol=1e-7)
  # A norm given below the true one (or zero) would ask for a factor above 1: clamped.
  for total_norm in (0.0, 0.1, 0.9):
    np.testing.assert_array_equal(clipjax.clip_grads_with_norm(grads, 1.0, total_norm)["w"],
                                  grads["w"])
  # One norm measured for two trees: both scaled by the same factor.
  other = {"v": jnp.array([1.0, 1.0])}
  total_norm = clipjax.get_total_norm((grads, other))
  a, b = clipjax.clip_grads_with_norm((grads, other), 1.0, total_norm)
  np.testing.assert_allclose(a["w"] / grads["w"], b["v"] / other["v"], rtol=1e-6)


@pytest.mark.parametrize("bad", NONFINITE)
def test_clip_grads_with_a_nonfinite_norm_returns_the_gradients_unscaled(bad):
  grads = random_grads(8)
  out = clipjax.clip_grads_with_norm(grads, 1.0, bad)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)


def test_get_total_norm_and_clip_grads_with_norm_under_jit():
  grads = random_grads(9, scale=2.0)
  step = jax.jit(lambda g, m: clipjax.clip_grads_with_norm(g, m, clipjax.get_total_norm(g)))
  expected = torch_clip_grads_with_norm(grads, 0.5, torch_get_total_norm(grads))
  _assert_leaves_close(step(grads, jnp.float32(0.5)), expected, rtol=2e-6)


def test_clip_grad_norm_is_get_total_norm_with_the_exact_rule():
  """One code path: the same norm as get_total_norm, and the factor max_norm / norm."""
  grads = random_grads(10, scale=2.0)
  clipped, total_norm = clipjax.clip_grad_norm(grads, 0.5)
  assert float(total_norm) == float(clipjax.get_total_norm(grads))
  torch_style = clipjax.clip_grads_with_norm(grads, 0.5, total_norm)
  for a, b, g in zip(jax.tree.leaves(clipped), jax.tree.leaves(torch_style),
                     jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a) / np.asarray(g), 0.5 / float(total_norm), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(b) / np.asarray(g), 0.5 / (float(total_norm) + 1e-6),
                               rtol=2e-6)


def test_clip_grads_with_norm_checks_its_arguments():
  with pytest.raises(ValueError, match="max_norm=-1.0 must be >= 0"):
    clipjax.clip_grads_with_norm({"w": jnp.ones(2)}, -1.0, 1.0)
  with pytest.raises(TypeError, match=r"updates\['w'\] has dtype int32"):
    clipjax.clip_grads_with_norm({"w": jnp.ones(2, jnp.int32)}, 1.0, 1.0)
  with pytest.raises(ValueError, match="norm_type=3 must be 1, 2 or inf"):
    clipjax.get_total_norm({"w": jnp.ones(2)}, 3)


def test_against_torch_when_installed():
  torch = pytest.importorskip("torch")
  grads = random_grads(11, scale=2.0)
  tensors = [torch.tensor(np.asarray(g, np.float64)) for g in jax.tree.leaves(grads)]
  for ord in ORDS:
    expected = float(torch.nn.utils.get_total_norm(tensors, norm_type=ord))
    np.testing.assert_allclose(float(clipjax.get_total_norm(grads, ord)), expected, rtol=2e-6)
  total_norm = torch.nn.utils.get_total_norm(tensors)
  torch.nn.utils.clip_grads_with_norm_(tensors, 0.5, total_norm)
  out = clipjax.clip_grads_with_norm(grads, 0.5, clipjax.get_total_norm(grads))
  _assert_leaves_close(out, [t.numpy() for t in tensors], rtol=2e-6)
