"""One Hypothesis property suite over every transform of ``registry.ENTRIES``.

Random trees (three layouts of mixed shapes and float32/bfloat16/float16 leaves,
values from exact zeros and 1e-30 to 1e3, whole zero and tiny leaves), random
thresholds. After a priming step on half the gradient, the measured step must:

- keep the dtype of every leaf and the direction of every element (its sign;
  one factor per tree or per leaf where the rule is global or per leaf; no
  element grows, unless the rule normalises, as Stable-SPAM's AdaGN);
- bound the rule's measure (``entry.bound``, else the global norm) by the
  ``threshold`` it reports, when finite, and be the identity when it reports no
  clip (and report none when the measure is below the threshold);
- have finite reverse-mode derivatives;
- under ``shard_map`` over 4 devices, give what the unsharded run gives, also
  when one shard holds a NaN or an inf.

Each transform is jitted once per layout; the examples only change values.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import PartitionSpec as P

import clipjax
import registry
from _trees import np_norm
from _dist_cases import place

ENTRIES = registry.ENTRIES
BY_ID = {entry.id: entry for entry in ENTRIES}
# How many factors the rule applies ("unit": AGC's per-unit factors are not checked for it).
RULES = {"clip": "element", "clip_by_norm": "leaf", "clip_by_block_rms": "leaf",
         "adaptive_grad_clip": "unit", "adagc": "leaf", "clip_by_group_norm": "leaf",
         "stable_spam_clip": "element"}
TINY = float(jnp.finfo(jnp.float32).tiny)
EPS = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
LAYOUTS = (
    {"w": ((4, 3), F32), "b": ((3,), BF16), "s": ((), F16)},
    {"k": ((2, 5), F16), "v": ((6,), F32), "m": ((3, 3), BF16)},
    {"a": ((7,), BF16), "c": ((2, 2), F32)},
)
# The sharded layout: leading axes split over 4 devices, the scalar replicated.
SHARDED = {"w": ((8, 3), F32), "b": ((4,), BF16), "s": ((), F16)}
SPECS = {"w": P("d"), "b": P("d"), "s": P()}
REPLICATED = {"w": False, "b": False, "s": True}

elements = st.one_of(
    st.just(0.0),
    st.builds(lambda sign, e: sign * 10.0**e, st.sampled_from([-1.0, 1.0]), st.floats(-30.0, 3.0)),
    st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32))
leaf_scales = st.sampled_from([1.0, 1.0, 1.0, 0.0, 1e-25])  # whole zero and tiny leaves


@st.composite
def trees(draw, layout):
  out = {}
  for key, (shape, dtype) in sorted(layout.items()):
    values = draw(hnp.arrays(np.float32, shape, elements=elements)) * draw(leaf_scales)
    # No float32 subnormals: XLA on CPU flushes them to zero (a documented limit).
    values = np.asarray(jnp.asarray(values, dtype))
    out[key] = np.where(np.abs(values.astype(np.float32)) < TINY, 0, values).astype(values.dtype)
  return out


def _params(layout):
  rng = np.random.default_rng(7)
  return {k: np.asarray(jnp.asarray(rng.uniform(0.5, 2.0, s), d)) for k, (s, d) in layout.items()}


def _threshold_kwargs(entry, threshold):
  """The threshold hyperparameter, when the entry has one that bounds a measure."""
  return {entry.hyper[0]: threshold} if entry.bound is not None else {}


def _weights(tree):
  return jax.tree.map(lambda x: jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape).astype(x.dtype),
                      tree)


def _two_steps(tx, g, params):
  """The update after a priming step on ``g / 2``, and its state."""
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(lambda x: x * jnp.asarray(0.5, x.dtype), g), state, params)
  return tx.update(g, state, params)


@functools.cache
def _run(entry_id, layout_index):
  entry = BY_ID[entry_id]

  @jax.jit
  def run(g, params, threshold):
    tx = entry.build(**_threshold_kwargs(entry, threshold))
    out, state = _two_steps(tx, g, params)

    def scalar(g):
      updates = _two_steps(tx, g, params)[0]
      return sum(jnp.vdot(w, u).astype(jnp.float32)
                 for w, u in zip(jax.tree.leaves(_weights(g)), jax.tree.leaves(updates)))

    return out, clipjax.clip_stats(state), jax.grad(scalar)(g)

  return run


def _stat(stats, field):
  """The statistic ``field``; of a clipper with groups, the strictest over its groups."""
  values = [v for k, v in stats.items() if k.endswith("/" + field)]
  assert values, field
  if field == "threshold":
    return min(float(v) for v in values)
  if field == "finite":
    return all(bool(v) for v in values)
  if field == "clipped":
    return any(bool(v) for v in values)
  (value,) = values
  return value


def _np64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _check_direction(rule, layout, g, out, eps, grows=False):
  """Signs kept, nothing grows, one factor per tree (global) or per leaf.

  The factor is read from elements normal in the leaf's dtype (a subnormal
  output has fewer significant bits).
  """
  factors = []
  for key, (_, dtype) in layout.items():
    x, y = g[key], out[key]
    assert np.all((np.sign(y) == np.sign(x)) | (y == 0)) and np.all((y == 0) | (x != 0)), key
    assert grows or np.all(np.abs(y) <= np.abs(x) * (1 + eps)), key
    normal = float(jnp.finfo(dtype).tiny)
    nonzero = (np.abs(x) >= normal) & (np.abs(y) >= normal)
    if rule in ("global", "leaf") and nonzero.any():
      ratio = y[nonzero] / x[nonzero]
      np.testing.assert_allclose(ratio, ratio[0], rtol=2 * eps, err_msg=key)
      factors.append(ratio[0])
  if rule == "global" and factors:
    np.testing.assert_allclose(factors, factors[0], rtol=2 * eps)


# skip_spikes skips steps rather than clipping them; tests/test_skip.py holds its properties.
@pytest.mark.parametrize("entry_id", [entry.id for entry in ENTRIES if not entry.skips])
@settings(max_examples=12)
@given(data=st.data(), threshold=st.floats(1e-2, 1e2))
def test_properties_of_every_transform(entry_id, data, threshold):
  entry = BY_ID[entry_id]
  index = data.draw(st.sampled_from(range(len(LAYOUTS))), label="layout")
  layout = LAYOUTS[index]
  g, params = data.draw(trees(layout), label="grads"), _params(layout)
  out, stats, grads = _run(entry_id, index)(g, params, np.float32(threshold))
  eps = max(EPS[dtype] for _, dtype in layout.values())
  for key, (_, dtype) in layout.items():
    assert out[key].dtype == dtype and grads[key].dtype == dtype, key
    assert np.all(np.isfinite(np.asarray(grads[key], np.float32))), key
  g64, out64, p64 = _np64(g), _np64(out), _np64(params)
  _check_direction(RULES.get(entry_id, "global"), layout, g64, out64, eps, entry.normalizes)
  def measure(updates, params):
    return entry.measure(updates, params) if entry.bound is not None else np_norm(updates)

  limit = float(_stat(stats, "threshold"))
  assert bool(_stat(stats, "finite"))
  if np.isfinite(limit):
    assert measure(out64, p64) <= limit * (1 + eps) + 1e-30
  if not bool(_stat(stats, "clipped")):
    for key in g:
      np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(g[key]))
  if entry.bound is not None and measure(g64, p64) < limit * (1 - eps):
    assert not bool(_stat(stats, "clipped"))


# Sharded equals unsharded ---------------------------------------------------------------


def _distributed(entry):
  parameters = inspect.signature(entry.make).parameters
  if "axis_name" not in parameters:
    return None
  dist = {"axis_name": "d"}
  if "replicated" in parameters:
    dist["replicated"] = REPLICATED
  return dist


SHARDABLE = [entry.id for entry in ENTRIES
             if _distributed(entry) is not None and not entry.skips]


@functools.cache
def _sharded_run(entry_id):
  entry = BY_ID[entry_id]
  mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
  tx = entry.build(**_distributed(entry))
  plain = jax.jit(lambda g, p: _two_steps(entry.build(), g, p))

  def update(g, p):
    return _two_steps(tx, g, p)

  sharded = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(SPECS, SPECS),
                                  out_specs=(SPECS, P())))
  return mesh, sharded, plain


def _assert_close(actual, expected, what):
  for (path, e), a in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                          jax.tree.leaves(actual), strict=True):
    a, e = np.asarray(a), np.asarray(e)
    where = what + jax.tree_util.keystr(path)
    assert a.dtype == e.dtype, where
    if jnp.issubdtype(e.dtype, jnp.floating):
      rtol = EPS.get(e.dtype.type, 1e-5)
      np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol,
                                 atol=1e-30, err_msg=where)
    else:
      np.testing.assert_array_equal(a, e, err_msg=where)


@pytest.mark.parametrize("entry_id", SHARDABLE)
@settings(max_examples=8)
@given(g=trees(SHARDED), bad=st.sampled_from([None, None, np.nan, np.inf, -np.inf]),
       where=st.integers(0, 7))
def test_sharded_equals_unsharded(entry_id, g, bad, where):
  if bad is not None:  # one element of one device's shard
    g["w"][where, where % 3] = bad
  params = _params(SHARDED)
  mesh, sharded, plain = _sharded_run(entry_id)
  expected = jax.device_get(plain(g, params))
  actual = jax.device_get(sharded(place(g, SPECS, mesh), place(params, SPECS, mesh)))
  _assert_close(actual[0], expected[0], "updates")
  _assert_close(actual[1], expected[1], "state")
  if bad is not None:
    assert not bool(_stat(clipjax.clip_stats(actual[1]), "finite"))
