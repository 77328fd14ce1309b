"""Reliability policies on one device: derivatives, dtypes, zero norms, arguments, state=None.

Each test pins one policy of docs/design.md; the cross-device ones are in
test_reliability_sharded.py. Updates run jitted (one compilation per case).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
import registry

ENTRIES = registry.ENTRIES
IDS = [entry.id for entry in ENTRIES]
BY_ID = {entry.id: entry for entry in ENTRIES}
# The history-based clippers.
ADAPTIVE = tuple(e.id for e in registry.STATEFUL)
# Transforms whose state must be threaded: those, and wrappers with state of their own.
THREADED = ADAPTIVE + tuple(e.id for e in ENTRIES if e.inner is not None and not e.memoryless)


def _tree(scale, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  signs = rng.choice([-1, 1], (3, 2))
  return {"a": jnp.asarray(rng.uniform(0.5, 1.5, (3, 2)) * signs * scale, dtype),
          "b": jnp.asarray(rng.uniform(0.5, 1.5, (4,)) * scale, dtype)}


PARAMS = _tree(1.0, seed=9)


def _weights(tree):
  """Fixed cotangents: the scalar function is sum(w · update); only shapes are read."""
  return jax.tree.map(lambda x: jnp.asarray(
      np.random.default_rng(x.size).normal(size=x.shape), x.dtype), tree)


def _scalar(update, weights):
  def f(g):
    out = update(g)
    return sum(jnp.vdot(w, o) for w, o in zip(jax.tree.leaves(weights), jax.tree.leaves(out)))
  return f


def _central_difference(f, tree, h=1e-6):
  """Float64 central difference of a scalar ``f`` at ``tree``, all coordinates in one vmap."""
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [x.size for x in leaves]
  flat = jnp.concatenate([x.ravel() for x in leaves])
  basis = jnp.eye(flat.size, dtype=flat.dtype) * h

  def unflat(vector):
    parts = jnp.split(vector, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(treedef, [p.reshape(x.shape) for p, x in zip(parts, leaves)])

  at = jax.jit(jax.vmap(lambda v: f(unflat(v))))
  return unflat((at(flat[None] + basis) - at(flat[None] - basis)) / (2 * h))


def _assert_trees_close(actual, expected, rtol, atol=0.0):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert np.all(np.isfinite(np.asarray(a, np.float64))), a
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                               rtol=rtol, atol=atol)


def _primed(tx, steps, params):
  """A state after ``steps``, so an adaptive clipper has statistics."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  for g in steps:
    _, state = update(g, state, params)
  return state


# 8. float64 norms beyond float32 ---------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTIVE)
def test_float64_norms_above_float32_range_are_clipped_and_stay_finite(name):
  with jax.enable_x64(True):
    tx = BY_ID[name].build()
    params = _tree(1.0, jnp.float64, seed=9)
    state = _primed(tx, [_tree(1.0, jnp.float64, seed=s) for s in range(4)], params)
    dtypes = [x.dtype for x in jax.tree.leaves(state)]
    out, new = jax.jit(tx.update)(_tree(1e200, jnp.float64), state, params)
    assert [x.dtype for x in jax.tree.leaves(new)] == dtypes  # lax.scan and jit caches hold
    assert float(clipjax.global_norm(out)) < 1e3  # clipped in float64
    running = [np.asarray(x) for x in jax.tree.leaves(new._replace(clip_stats=None))
               if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(np.all(np.isfinite(x)) for x in running), running
    assert np.isfinite(float(new.stats.norm)) and bool(new.stats.finite)


# 1. Reverse-mode derivatives ----------------------------------------------------------


def test_norm_gradients_match_optax_and_are_zero_at_zero():
  x = jnp.array([3.0, 4.0])
  grad = jax.jit(jax.grad(clipjax.global_norm))
  np.testing.assert_allclose(grad(x), [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(
      jax.jit(jax.grad(lambda v: clipjax.leaf_norms([v, 2 * v]).sum()))(x), [1.8, 2.4],
      rtol=1e-6)
  for ord in (1, 2, jnp.inf):
    g = jax.jit(jax.grad(lambda v, o=ord: clipjax.global_norm(v, ord=o)))(jnp.zeros(3))
    np.testing.assert_array_equal(g, 0.0)
  units = jax.jit(jax.grad(lambda v: clipjax.unitwise_norm(v).sum()))(jnp.zeros((3, 2)))
  np.testing.assert_array_equal(units, 0.0)


def _optax_twins():
  """(clipjax update, optax update) pairs of the same function of the gradients."""
  cj, ox = clipjax, optax
  pairs = {
      "clip_by_global_norm": (cj.clip_by_global_norm(1.0), ox.clip_by_global_norm(1.0)),
      "clip_by_block_rms": (cj.clip_by_block_rms(0.5), ox.clip_by_block_rms(0.5)),
      "clip": (cj.clip(0.8), ox.clip(0.8)),
      "adaptive_grad_clip": (cj.adaptive_grad_clip(0.3), ox.adaptive_grad_clip(0.3)),
  }
  out = {name: (lambda g, t=a: t.update(g, t.init(PARAMS), PARAMS)[0],
                lambda g, t=b: t.update(g, t.init(PARAMS), PARAMS)[0])
         for name, (a, b) in pairs.items()}
  for name in ("per_example_global_norm_clip", "per_example_layer_norm_clip"):
    ours, theirs = getattr(cj, name), getattr(ox, name)
    out[name] = (lambda g, f=ours: f(g, 1.0)[0], lambda g, f=theirs: f(g, 1.0)[0])
  return out


TWINS = _optax_twins()
BATCH = {"a": (4, 3, 2), "b": (4, 4)}


@pytest.mark.parametrize("scale", [0.05, 5.0], ids=["below", "clipped"])
@pytest.mark.parametrize("name", sorted(TWINS))
def test_reverse_mode_equals_optax_twin(name, scale):
  ours, theirs = TWINS[name]
  rng = np.random.default_rng(4)
  g = (jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) * scale, jnp.float32), BATCH,
                    is_leaf=lambda s: isinstance(s, tuple))
       if name.startswith("per_example") else _tree(scale))
  w = _weights(jax.eval_shape(ours, g))
  expected = jax.jit(jax.grad(_scalar(theirs, w)))(g)
  actual = jax.jit(jax.grad(_scalar(ours, w)))(g)
  _assert_trees_close(actual, expected, rtol=2e-5, atol=1e-6)


def _x64_cases():
  """name -> (build, or None for the norm itself; the scale of the point)."""
  cj = clipjax
  cases = {}
  for ord in (1, 2, np.inf):
    cases[f"clip_by_norm-{ord}"] = (lambda o=ord: cj.clip_by_norm(1.0, ord=o), 2.0)
    cases[f"clip_by_global_norm-{ord}"] = (lambda o=ord: cj.clip_by_global_norm(1.0, ord=o), 2.0)
    cases[f"global_norm-{ord}"] = (None, 2.0)
  cases["clip_by_norm-floor"] = (lambda: cj.clip_by_norm(10.0, min_norm=4.0), 1.0)
  cases["clip_by_global_norm-floor"] = (lambda: cj.clip_by_global_norm(10.0, min_norm=8.0), 1.0)
  cases["clip-floor"] = (lambda: cj.clip(1.2, min_delta=0.9), 1.0)
  # No clipping: an inf threshold must not give inf·0 in the unselected quotient.
  cases["clip_by_global_norm-no-threshold"] = (lambda: cj.clip_by_global_norm(np.inf), 2.0)
  cases["adaptive_grad_clip-no-threshold"] = (lambda: cj.adaptive_grad_clip(np.inf), 2.0)
  cases["adaptive_grad_clip"] = (lambda: cj.adaptive_grad_clip(0.3), 2.0)
  cases["autoclip"] = (lambda: cj.autoclip(50.0, history=8), 3.0)
  cases["zclip"] = (lambda: cj.zclip(0.9, z_thresh=1.0, warmup_steps=3), 9.0)
  cases["adagc-warm"] = (lambda: cj.adagc(lambda_abs=1.0, warmup_steps=10), 2.0)
  cases["adagc"] = (lambda: cj.adagc(lambda_abs=1.0, warmup_steps=2), 3.0)
  cases["quantile_clip"] = (lambda: cj.quantile_clip(0.5, initial_norm=1.0), 3.0)
  return cases


X64_CASES = _x64_cases()


@pytest.mark.parametrize("case", sorted(X64_CASES))
def test_reverse_mode_equals_float64_central_difference(case):
  build, scale = X64_CASES[case]
  with jax.enable_x64(True):
    params = _tree(1.0, jnp.float64, seed=9)
    g = _tree(scale, jnp.float64)
    if build is None:  # the norm itself
      ord = float(case.split("-")[1])
      update = lambda t, o=ord: {"n": clipjax.global_norm(t, ord=o) * jnp.ones(1, t["a"].dtype)}
    else:
      tx = build()
      warm = [_tree(s, jnp.float64, seed=i) for i, s in enumerate([1.0, 1.2, 0.9, 1.1])]
      state = _primed(tx, warm, params)
      update = lambda t, tx=tx, state=state: tx.update(t, state, params)[0]
    w = _weights(jax.eval_shape(update, g))
    f = _scalar(update, w)
    grad = jax.jit(jax.grad(f))
    _assert_trees_close(grad(g), _central_difference(f, g), rtol=1e-6, atol=1e-9)
    # The zero gradient: finite, and the identity's derivative (no clipper moves a zero).
    expected = w if build is not None else jax.tree.map(jnp.zeros_like, g)
    _assert_trees_close(grad(jax.tree.map(jnp.zeros_like, g)), expected, rtol=0.0)


@pytest.mark.parametrize("entry_id", IDS)
def test_reverse_mode_is_finite_at_zero_for_every_transform(entry_id):
  tx = BY_ID[entry_id].build()
  state = tx.init(PARAMS)
  w = _weights(PARAMS)
  grad = jax.jit(jax.grad(_scalar(lambda g: tx.update(g, state, PARAMS)[0], w)))
  _assert_trees_close(grad(jax.tree.map(jnp.zeros_like, PARAMS)), w, rtol=0.0)


# 4. AGC and unitwise_norm do not overflow -------------------------------------------------


@pytest.mark.parametrize("dtype,value", [(jnp.float32, 1e20), (jnp.bfloat16, 1e30),
                                         (jnp.float32, 1e36)])
def test_agc_and_unitwise_norm_rescue_overflow(dtype, value):
  g = {"w": jnp.full((3, 2), value, dtype), "b": jnp.full((2,), value, dtype)}
  p = {"w": jnp.ones((3, 2), dtype), "b": jnp.ones((2,), dtype)}
  true = float(jnp.asarray(value, dtype).astype(jnp.float32))
  np.testing.assert_allclose(clipjax.unitwise_norm(g["w"]), true * np.sqrt(3), rtol=1e-6)
  tx = clipjax.adaptive_grad_clip(0.1)
  out, state = jax.jit(tx.update)(g, tx.init(p), p)
  assert bool(state.stats.finite) and bool(state.stats.clipped)
  # Each unit is brought to 0.1 · its parameter norm (sqrt(3) for a column, sqrt(2) for b).
  rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
  np.testing.assert_allclose(clipjax.unitwise_norm(out["w"].astype(jnp.float32)),
                             0.1 * np.sqrt(3), rtol=rtol)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out["b"], np.float64)), 0.1 * np.sqrt(2),
                             rtol=rtol)


def test_agc_common_case_reads_each_leaf_once():
  """Without overflow the rescue is a cond's untaken branch: one reduction per leaf outside it."""
  g = {"w": jnp.ones((6, 4)), "b": jnp.ones((4,))}
  tx = clipjax.adaptive_grad_clip(0.1)
  jaxpr = jax.make_jaxpr(lambda g, p: tx.update(g, tx.init(p), p))(g, g).jaxpr
  top = [e.primitive.name for e in jaxpr.eqns]
  assert top.count("reduce_sum") == 4 and top.count("cond") == 1, top  # 2 grads + 2 params


# 3. Thresholds of any real dtype --------------------------------------------------------


@pytest.mark.parametrize("entry_id", IDS)
def test_inject_hyperparams_with_bfloat16_params(entry_id):
  entry = BY_ID[entry_id]
  tx = optax.inject_hyperparams(entry.make, static_args=entry.static_args)(**entry.kwargs)
  params = _tree(1.0, jnp.bfloat16, seed=9)
  out, _ = jax.jit(tx.update)(_tree(50.0, jnp.bfloat16), tx.init(params), params)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))


@pytest.mark.loose_promotion
def test_flax_train_state_with_bfloat16_params():
  from flax.training import train_state
  params = _tree(1.0, jnp.bfloat16)
  tx = optax.chain(optax.inject_hyperparams(clipjax.clip_by_global_norm)(max_norm=1.0),
                   optax.sgd(0.1))
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, _tree(50.0, jnp.bfloat16))
  assert state.params["a"].dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int8, jnp.uint8])
def test_thresholds_of_every_real_dtype_are_numbers(dtype):
  one = jnp.asarray(1, dtype)
  out, _ = clipjax.clip_by_global_norm(one).update({"w": jnp.array([3.0, 4.0])}, None)
  np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)
  clipjax.zclip(alpha=jnp.asarray(0.5, dtype) if dtype != jnp.uint8 else 0.5)
  clipjax.clip(np.asarray(2, dtype))


# 5, 6. Zero norms leave running statistics alone --------------------------------------


@pytest.mark.parametrize("name", ADAPTIVE)
def test_zero_steps_leave_running_statistics_untouched(name):
  tx = BY_ID[name].build()
  state = _primed(tx, [_tree(1.0 + seed, seed=seed) for seed in range(3)], PARAMS)
  _, after = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, PARAMS), state, PARAMS)
  for b, a in zip(jax.tree.leaves(state._replace(clip_stats=None)),
                  jax.tree.leaves(after._replace(clip_stats=None))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tx", [clipjax.quantile_clip(), clipjax.zclip(warmup_steps=25),
                                clipjax.autoclip(10.0, history=64), clipjax.adagc(warmup_steps=5)],
                         ids=["quantile_clip", "zclip", "autoclip", "adagc"])
def test_many_zero_steps_do_not_stall_training(tx):
  """5000 zero steps (quantile_clip reached C = 0 after 4367), then ordinary gradients."""
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  steps = jnp.stack([jnp.asarray(s) for s in [1.0, 1.1, 0.9] * 10])

  @jax.jit
  def run(state):
    state = jax.lax.scan(lambda s, _: (tx.update(zeros, s, PARAMS)[1], None), state, None,
                         length=5000)[0]

    def step(state, s):
      out, state = tx.update(jax.tree.map(lambda p: p * s, PARAMS), state, PARAMS)
      return state, clipjax.global_norm(out)

    return jax.lax.scan(step, state, steps)

  state, norms = run(tx.init(PARAMS))
  assert float(jnp.min(norms)) > 0.1, norms  # nothing is zeroed after the zero steps
  if hasattr(state, "clip_norm"):
    assert float(state.clip_norm) > 0.1


def test_quantile_clip_rejects_infinite_rates_and_norms():
  for kwargs in ({"learning_rate": np.inf}, {"initial_norm": np.inf}):
    with pytest.raises(ValueError, match="must be finite"):
      clipjax.quantile_clip(**kwargs)


# 7. Integer and bool gradients -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
@pytest.mark.parametrize("entry_id", IDS)
def test_integer_and_bool_updates_raise_naming_the_leaf(entry_id, dtype):
  tx = BY_ID[entry_id].build()
  grads = {"a": jnp.ones((3, 2)), "b": jnp.ones((4,), dtype)}
  with pytest.raises(TypeError, match=r"updates\['b'\] has dtype"):
    tx.update(grads, tx.init(PARAMS), PARAMS)


def test_clip_with_fractional_delta_does_not_truncate_integers():
  with pytest.raises(TypeError, match="updates has dtype int32"):
    clipjax.clip(0.5).update(jnp.array([3, -4]), None)


@pytest.mark.loose_promotion
@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_per_example_integer_gradients_match_optax(dtype, x64):
  with jax.enable_x64(x64):
    grads = [jnp.array([[0.0, -0.5], [3.0, 4.0], [5.0, 6.0], [0.0, 0.0]]),
             jnp.asarray(np.array([[0], [5], [-3], [1]]).astype(dtype))]
    for name, arg in (("per_example_global_norm_clip", 1.0),
                      ("per_example_layer_norm_clip", 1.5)):
      ours, n_ours = jax.jit(getattr(clipjax, name), static_argnums=1)(grads, arg)
      theirs, n_theirs = jax.jit(getattr(optax, name), static_argnums=1)(grads, arg)
      for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
      np.testing.assert_array_equal(jax.tree.leaves(n_ours), jax.tree.leaves(n_theirs))


# 9. AGC parameter shapes ---------------------------------------------------------------


def test_agc_rejects_params_of_other_shapes_or_structure():
  tx = clipjax.adaptive_grad_clip(0.1)
  grads = {"w": jnp.ones((2,)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"\['w'\].*shape \(2,\).*shape \(3,\)"):
    tx.update(grads, tx.init(grads), {"w": jnp.ones((3,)), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match="structure"):
    tx.update(grads, tx.init(grads), {"w": jnp.ones((2,))})


# 10. Argument checks ---------------------------------------------------------------------


def _with_argument(argument):
  return [name for name in clipjax.__all__ if callable(getattr(clipjax, name))
          and not isinstance(getattr(clipjax, name), type)
          and argument in inspect.signature(getattr(clipjax, name)).parameters]


def test_complex_threshold_names_the_argument():
  with pytest.raises(ValueError, match=r"max_norm=\(1\+0j\) must be a real number"):
    clipjax.clip_by_global_norm(1 + 0j)


@pytest.mark.parametrize("name", ["clip_by_norm", "clip_by_global_norm", "global_norm"])
def test_bool_ord_is_rejected(name):
  with pytest.raises(ValueError, match="ord=True"):
    if name == "global_norm":
      clipjax.global_norm({"a": jnp.ones(2)}, ord=True)
    else:
      getattr(clipjax, name)(1.0, ord=True)


def test_floors_must_be_finite():
  for build in (lambda: clipjax.clip_by_global_norm(np.inf, min_norm=np.inf),
                lambda: clipjax.clip_by_norm(np.inf, min_norm=np.inf),
                lambda: clipjax.clip(np.inf, min_delta=np.inf)):
    with pytest.raises(ValueError, match="must be finite"):
      build()


@pytest.mark.parametrize("name", _with_argument("replicated"))
def test_replicated_must_hold_bools_for_every_transform(name):
  factory = getattr(clipjax, name)
  with pytest.raises(ValueError, match="replicated='yes'"):
    if name in ("global_norm", "leaf_norms", "norms_by_path", "get_total_norm"):
      factory({"a": jnp.ones(2)}, replicated="yes")
    elif name in ("clip_by_norm", "clip_by_global_norm", "clip_by_block_rms",
                  "adaptive_grad_clip"):
      factory(0.5, replicated="yes")
    elif name == "skip_spikes":
      factory(optax.identity(), replicated="yes")
    elif name == "clip_by_group_norm":
      factory(0.5, lambda tree: tree, replicated="yes")
    else:
      factory(replicated="yes")


def test_layer_norm_clip_of_zero_size_leaves_is_defined():
  clip = jax.jit(clipjax.per_example_layer_norm_clip, static_argnums=(1, 2))
  for uniform in (True, False):
    sums, counts = clip([jnp.ones((3, 0)), jnp.ones((3, 0, 2))], 1.0, uniform)
    assert [s.shape for s in sums] == [(0,), (0, 2)]
    assert [int(c) for c in counts] == [0, 0]
  sums, _ = clip([jnp.ones((3, 0)), jnp.ones((3, 4))], 2.0, False)
  np.testing.assert_allclose(sums[1], 3.0, rtol=1e-6)  # each example (norm 2) is kept


# 11. state=None ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry_id", [e for e in IDS if e != "clipped"])  # clipped: an optax chain
def test_state_none_only_where_the_result_cannot_depend_on_state(entry_id):
  entry = BY_ID[entry_id]
  tx = entry.build()
  grads = _tree(50.0)
  if entry_id in THREADED:
    with pytest.raises(ValueError, match="thread"):
      tx.update(grads, None, PARAMS)
    return
  tx.update(grads, None, PARAMS)  # a fixed number: accepted
  name, value = entry.hyper
  scheduled = entry.build(**{name: optax.constant_schedule(value)})
  with pytest.raises(ValueError, match="thread"):
    scheduled.update(grads, None, PARAMS)
