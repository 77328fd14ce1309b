"""Adaptive clippers against NumPy float64 references written from the published rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import clipjax
import registry
from _dist_cases import make as make_distributed
from _trees import assert_tree_close
from _trees import np_unit_norms
from _trees import random_tree

RTOL = 1e-5  # float32 against the float64 references, after 200+ steps of running statistics

# The leaves every driven run uses, and the unit direction each leaf's gradient points along.
SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _directions(seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for shape in SHAPES:
    d = rng.normal(size=shape)
    out.append(d / np.linalg.norm(d))
  return out


def _norm_sequence(steps=240, seed=1, warmup=30):
  """Global norms near 1 with spikes, zero steps, and NaN and inf steps.

  Zero steps fall inside and after ``warmup``; bad steps only after a few good ones.
  """
  rng = np.random.default_rng(seed)
  norms = np.exp(rng.normal(0.0, 0.2, steps))
  spikes = rng.choice(np.arange(warmup + 5, steps), 12, replace=False)
  norms[spikes] *= rng.uniform(5.0, 100.0, 12)
  norms[[3, warmup + 40, warmup + 41, steps - 7]] = 0.0
  norms[[warmup + 10, warmup + 77, steps - 30]] = np.nan
  norms[warmup + 120] = np.inf
  return norms


def _leaf_norms(global_norms, seed=2):
  """Splits each global norm over the leaves with fixed random weights of unit norm."""
  rng = np.random.default_rng(seed)
  w = rng.uniform(0.5, 1.5, len(SHAPES))
  return np.outer(global_norms, w / np.linalg.norm(w))


def _gradients(leaf_norms):
  """Stacked float32 gradient leaves ``[steps, *shape]``: each leaf's direction times its norm."""
  with np.errstate(invalid="ignore"):
    return [(d[None] * leaf_norms[:, i].reshape((-1,) + (1,) * d.ndim)).astype(np.float32)
            for i, d in enumerate(_directions())]


def _measured(grads):
  """float64 norms of the float32 gradients: per leaf ``[steps, leaves]``, global ``[steps]``."""
  per_leaf = np.stack([np.sqrt(np.sum(np.square(g.astype(np.float64)),
                                      axis=tuple(range(1, g.ndim)))) for g in grads], axis=1)
  return per_leaf, np.sqrt(np.sum(per_leaf**2, axis=1))


@functools.partial(jax.jit, static_argnums=0)
def _scan(tx, grads):
  """Runs ``tx`` over stacked gradients in one jitted scan; returns outputs and states per step."""
  state0 = tx.init([g[0] for g in grads])

  def step(state, g):
    out, new = tx.update(g, state)
    return new, (out, new)

  _, (outs, states) = jax.lax.scan(step, state0, grads)
  return outs, states


def _drive(tx, leaf_norms):
  grads = _gradients(leaf_norms)
  outs, states = _scan(tx, [jnp.asarray(g) for g in grads])
  return grads, [np.asarray(o) for o in outs], states


def _check_outputs(grads, outs, scales):
  """Each step's output is its input times the reference factor(s) (scalar or per leaf)."""
  scales = np.asarray(scales, np.float64)
  for i, (g, o) in enumerate(zip(grads, outs)):
    s = scales if scales.ndim == 1 else scales[:, i]
    expected = g.astype(np.float64) * s.reshape((-1,) + (1,) * (g.ndim - 1))
    with np.errstate(invalid="ignore"):
      np.testing.assert_allclose(o, expected, rtol=RTOL, atol=0)


def _check_bad_steps_keep_state(norms, states):
  """At every NaN or inf step, each running statistic is bit-identical to the step before."""
  bad = np.flatnonzero(~np.isfinite(norms))
  assert bad.size and bad.min() > 0
  running = states._replace(clip_stats=None)
  for t in bad:
    before = jax.tree.map(lambda x, t=t: np.asarray(x)[t - 1], running)
    after = jax.tree.map(lambda x, t=t: np.asarray(x)[t], running)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
      assert np.array_equal(a, b), f"step {t} changed the state"
    assert not bool(np.asarray(states.stats.finite)[t])


def _factor(norm, threshold):
  """min(1, threshold / norm); 1 for a zero or non-finite norm."""
  if not np.isfinite(norm) or norm == 0 or not norm > threshold:
    return 1.0
  return threshold / norm


# References -------------------------------------------------------------------

# The running statistics take only finite, nonzero global norms: a NaN or inf step
# would poison them and a zero step carries no scale (counted, it pulls the
# threshold to 0). Each reference skips such steps in its statistics.


def _taken(norm):
  return bool(np.isfinite(norm) and norm > 0)


def autoclip_reference(norms, percentile, history):
  kept, thresholds, scales = [], [], []
  for n in norms:
    if _taken(n):
      kept = (kept + [n])[-history:]
    # No norm recorded yet: the statistic reads float32's maximum (no threshold).
    thresholds.append(np.percentile(kept, percentile) if kept else np.finfo(np.float32).max)
    scales.append(_factor(n, thresholds[-1]))
  return np.array(thresholds), np.array(scales)


def zclip_reference(norms, alpha, z_thresh, warmup_steps, max_norm=None, mode="zscore",
                    clip_option="adaptive_scaling", clip_factor=1.0,
                    skip_update_on_spike=False, eps=1e-6):
  """The authors' ZClip.step, transcribed, with the cap applied as ``max_norm``."""
  # No cap: the threshold statistic reads float32's maximum in warm-up.
  cap = np.finfo(np.float32).max if max_norm is None else max_norm
  buffer, mean, var = [], None, None
  thresholds, scales, means = [], [], []
  for n in norms:
    if mean is None:  # warm-up: collect, clip only at the cap
      thresholds.append(cap)
      scales.append(_factor(n, cap))
      if _taken(n):
        buffer.append(n)
        if len(buffer) >= warmup_steps:
          mean, var = np.mean(buffer), np.var(buffer)
      means.append(np.nan if mean is None else mean)
      continue
    std = np.sqrt(var)
    z = (n - mean) / (std + eps)
    if mode == "percentile":
      bound = mean + z_thresh * std
      spike, target = n > bound, bound
    else:
      bound = mean + z_thresh * (std + eps)
      spike = z > z_thresh
      target = mean if clip_option == "mean" else clip_factor * (mean + z_thresh**2 / z * std)
    threshold, g_hat = (target, target) if spike else (bound, n)
    thresholds.append(min(threshold, cap))
    scales.append(_factor(n, min(g_hat, cap)))
    if _taken(n) and not (spike and skip_update_on_spike):
      mean = alpha * mean + (1 - alpha) * g_hat
      var = alpha * var + (1 - alpha) * (g_hat - mean) ** 2
    means.append(mean)
  return np.array(thresholds), np.array(scales), np.array(means)


def adagc_reference(leaf_norms, lambda_abs, lambda_rel, beta, warmup_steps):
  gamma = np.full(leaf_norms.shape[1], np.inf)
  count = 0
  thresholds, scales, gammas = [], [], []
  for n in leaf_norms:
    total = np.sqrt(np.sum(n**2))
    warm = count < warmup_steps
    relative = lambda_rel * gamma
    thresholds.append(lambda_abs if warm else np.sqrt(np.sum(relative**2)))
    if not _taken(total):
      scales.append(np.ones_like(n))
      gammas.append(gamma.copy())
      continue
    if warm:
      s = np.full_like(n, _factor(total, lambda_abs))
      g_hat = s * n
      new = np.minimum(gamma, g_hat)
    else:
      s = np.array([_factor(x, r) for x, r in zip(n, relative)])
      g_hat = s * n
      new = np.where(np.isfinite(gamma), beta * gamma + (1 - beta) * g_hat, g_hat)
    gamma = np.where(n > 0, new, gamma)  # a zero gradient leaves its γ unchanged
    count += 1
    scales.append(s)
    gammas.append(gamma.copy())
  return np.array(thresholds), np.array(scales), np.array(gammas)


def quantile_reference(norms, target_quantile, learning_rate, initial_norm):
  c = initial_norm
  thresholds, scales = [], []
  for n in norms:
    thresholds.append(c)
    scales.append(_factor(n, c))
    if _taken(n):
      c = c * np.exp(-learning_rate * (float(n <= c) - target_quantile))
  return np.array(thresholds), np.array(scales)


# Against the references over 240 steps ---------------------------------------


@pytest.mark.parametrize("percentile,history", [(10.0, 1024), (90.0, 32), (50.0, 1)])
def test_autoclip_matches_reference(percentile, history):
  norms = _norm_sequence()
  grads, outs, states = _drive(clipjax.autoclip(percentile, history), _leaf_norms(norms))
  _, measured = _measured(grads)
  thresholds, scales = autoclip_reference(measured, percentile, history)
  np.testing.assert_allclose(states.stats.threshold, thresholds, rtol=RTOL)
  _check_outputs(grads, outs, scales)
  _check_bad_steps_keep_state(norms, states)
  clipped = np.asarray(states.stats.clipped).sum()
  assert clipped == 0 if history == 1 else clipped > 0  # history 1: the threshold is the norm


@pytest.mark.parametrize("kwargs", [
    {}, {"alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 10, "max_norm": 3.0},
    {"mode": "percentile", "z_thresh": 2.0}, {"clip_option": "mean"},
    {"clip_factor": 0.7, "eps": 1e-3}, {"skip_update_on_spike": True, "max_norm": 5.0}])
def test_zclip_matches_reference(kwargs):
  args = {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 25, "max_norm": None} | kwargs
  norms = _norm_sequence()
  grads, outs, states = _drive(clipjax.zclip(**args), _leaf_norms(norms))
  _, measured = _measured(grads)
  thresholds, scales, means = zclip_reference(measured, **args)
  np.testing.assert_allclose(states.stats.threshold, thresholds, rtol=RTOL)
  after = ~np.isnan(means)
  np.testing.assert_allclose(np.asarray(states.mean)[after], means[after], rtol=RTOL)
  _check_outputs(grads, outs, scales)
  _check_bad_steps_keep_state(norms, states)
  assert np.asarray(states.stats.clipped).sum() >= 10  # the spikes


def test_adagc_matches_reference():
  args = {"lambda_abs": 1.0, "lambda_rel": 1.05, "beta": 0.98, "warmup_steps": 100}
  norms = _norm_sequence(warmup=100)
  leaf_norms = _leaf_norms(norms) * 1.2
  rng = np.random.default_rng(3)
  for leaf in range(len(SHAPES)):  # spikes and zeros in single tensors too
    leaf_norms[rng.choice(np.arange(105, 240), 5, replace=False), leaf] *= 30.0
    leaf_norms[[10 + leaf, 150 + leaf], leaf] = 0.0
  leaf_norms[0, 1] = 0.0  # a tensor without gradient at the first step
  grads, outs, states = _drive(clipjax.adagc(**args), leaf_norms)
  per_leaf, _ = _measured(grads)
  thresholds, scales, gammas = adagc_reference(per_leaf, **args)
  # The state writes "no history" as γ = 0 and "no threshold" as float32's maximum.
  thresholds = np.where(np.isinf(thresholds), np.finfo(np.float32).max, thresholds)
  gammas = np.where(np.isinf(gammas), 0.0, gammas)
  np.testing.assert_allclose(states.stats.threshold, thresholds, rtol=RTOL)
  np.testing.assert_allclose(states.gamma, gammas, rtol=RTOL)
  _check_outputs(grads, outs, scales)
  _check_bad_steps_keep_state(norms, states)
  clipped = np.asarray(states.stats.clipped)
  assert clipped[:100].sum() > 0 and clipped[100:].sum() > 0


@pytest.mark.parametrize("target_quantile,learning_rate", [(0.9, 0.2), (0.5, 0.05)])
def test_quantile_clip_matches_reference(target_quantile, learning_rate):
  norms = _norm_sequence()
  grads, outs, states = _drive(
      clipjax.quantile_clip(target_quantile, learning_rate, initial_norm=0.5),
      _leaf_norms(norms))
  _, measured = _measured(grads)
  thresholds, scales = quantile_reference(measured, target_quantile, learning_rate, 0.5)
  np.testing.assert_allclose(states.stats.threshold, thresholds, rtol=RTOL)
  _check_outputs(grads, outs, scales)
  _check_bad_steps_keep_state(norms, states)


def test_quantile_clip_long_run_clipped_fraction():
  rng = np.random.default_rng(4)
  norms = np.exp(rng.normal(0.0, 1.0, (2, 6000)))

  @jax.jit
  def clipped_fraction(norms, q):
    tx = optax.inject_hyperparams(clipjax.quantile_clip)(target_quantile=q)
    grads = norms[:, None] * jnp.array([[0.6, 0.8]])

    def step(state, g):
      _, state = tx.update(g, state)
      return state, state.inner_state.stats.clipped

    _, clipped = jax.lax.scan(step, tx.init(grads[0]), grads)
    return jnp.mean(clipped[500:].astype(jnp.float32))

  for row, q in zip(norms, (0.9, 0.6)):
    fraction = float(clipped_fraction(jnp.asarray(row, jnp.float32), jnp.float32(q)))
    assert abs(fraction - (1 - q)) < 0.03, (q, fraction)


# Spikes ---------------------------------------------------------------------------


# Each adaptive clipper with its defaults, and AutoClip at a high percentile too.
# Stable-SPAM normalises each tensor rather than bounding a norm: tests/test_spam.py.
BOUNDING = [entry for entry in registry.STATEFUL if not entry.normalizes]
SPIKE_CASES = ([pytest.param(entry.make(), id=entry.id) for entry in BOUNDING]
               + [pytest.param(clipjax.autoclip(90.0), id="autoclip90")])


@pytest.mark.parametrize("tx", SPIKE_CASES)
def test_spike_after_warmup_is_clipped_and_next_step_passes(tx):
  rng = np.random.default_rng(5)
  warm = rng.uniform(0.9, 1.1, 100)
  norms = np.concatenate([warm, [100.0, warm.min()]])
  grads, outs, _ = _drive(tx, _leaf_norms(norms))
  out_norms = np.sqrt(sum(np.sum(o.astype(np.float64)**2, axis=tuple(range(1, o.ndim)))
                          for o in outs))
  assert out_norms[-2] < 2.0
  for g, o in zip(grads, outs):
    np.testing.assert_array_equal(o[-1], g[-1])


# Non-finite steps through the public API -------------------------------------------


@pytest.mark.parametrize("entry", registry.STATEFUL, ids=str)
def test_nan_and_inf_steps_pass_through_and_keep_state(entry):
  tx = entry.build()
  params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
  update = jax.jit(tx.update)
  state = tx.init(params)
  rng = np.random.default_rng(6)
  for _ in range(6):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    _, state = update(grads, state)
  for bad in (jnp.nan, jnp.inf):
    grads = {"a": jnp.array([1.0, bad, 2.0]), "b": jnp.full((2, 2), 50.0)}
    out, new = update(grads, state)
    for key in grads:
      np.testing.assert_array_equal(out[key], grads[key])
    for b, a in zip(jax.tree.leaves(state._replace(clip_stats=None)),
                    jax.tree.leaves(new._replace(clip_stats=None))):
      assert np.array_equal(a, b)
    assert not bool(new.stats.finite) and not bool(new.stats.clipped)
    assert float(new.stats.scale) == 1.0


# dtypes, inject_hyperparams, chain, clip_stats ----------------------------------------


@pytest.mark.parametrize("entry", BOUNDING, ids=str)
def test_dtypes_kept(entry):
  tx = entry.build()
  rng = np.random.default_rng(7)
  dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
  tol = {"f32": 1e-6, "bf16": 1e-2, "f16": 2e-3}
  update = jax.jit(tx.update)
  state = tx.init({k: jnp.zeros((4,), d) for k, d in dtypes.items()})
  for step in range(8):
    scale = 30.0 if step == 7 else 1.0  # the last step is a spike: clipped by every rule
    grads = {k: jnp.asarray(rng.normal(size=4) * scale, d) for k, d in dtypes.items()}
    before = state
    out, state = update(grads, state)
  assert bool(state.stats.clipped)
  assert float(state.stats.scale) < 0.5
  for i, k in enumerate(sorted(dtypes)):  # jax.tree.leaves order: sorted keys
    assert out[k].dtype == dtypes[k]
    g = np.asarray(grads[k], np.float64)
    if entry.per_leaf:  # AdaGC: each tensor by its own factor, min(1, λ_rel·γ_i / ‖g_i‖)
      factor = min(1.0, entry.kwargs["lambda_rel"] * float(before.gamma[i]) / np.linalg.norm(g))
    else:
      factor = float(state.stats.scale)
    np.testing.assert_allclose(np.asarray(out[k], np.float64), g * factor, rtol=tol[k])


def test_traced_history_at_init_asks_for_a_static_argument():
  tx = optax.inject_hyperparams(clipjax.autoclip)(history=8)
  with pytest.raises(ValueError, match="static"):
    jax.jit(tx.init)(jnp.zeros(3))
  static = optax.inject_hyperparams(clipjax.autoclip, static_args="history")(history=8)
  assert jax.jit(static.init)(jnp.zeros(3)).inner_state.history.shape == (8,)


def test_in_chain_with_optimizer_and_clip_stats():
  tx = optax.chain(clipjax.zclip(warmup_steps=2), clipjax.autoclip(90.0),
                   clipjax.quantile_clip(), optax.sgd(0.1))
  params = {"w": jnp.ones((4,))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in (1.0, 1.0, 1.0, 50.0):
    updates, state = update({"w": jnp.full((4,), g)}, state, params)
  stats = clipjax.clip_stats(state)
  assert {"zclip/threshold", "autoclip/threshold", "quantile_clip/threshold"} <= set(stats)
  assert bool(stats["zclip/clipped"])
  assert float(stats["zclip/norm"]) == 100.0


# AGC ------------------------------------------------------------------------------------


AGC_SHAPES = {"bias": (7,), "dense": (6, 5), "heads": (4, 3, 5), "conv": (3, 3, 4, 6),
              "row": (1, 6), "scalar": ()}


def test_agc_matches_optax():
  params = random_tree(9, AGC_SHAPES)
  grads = random_tree(10, AGC_SHAPES, scale=0.3)
  grads["dense"] = grads["dense"].at[:, 2].set(0.0)  # a zero unit
  params["bias"] = jnp.zeros((7,))  # zero-initialised: eps takes over

  @jax.jit
  def both(clipping, eps):  # traced arguments: one compilation for all values
    ours, state = clipjax.adaptive_grad_clip(clipping, eps).update(grads, None, params)
    ref, _ = optax.adaptive_grad_clip(clipping).update(grads, optax.EmptyState(), params)
    return ours, state, ref

  for clipping in (0.01, 0.2, 1.0):
    ours, state, ref = both(jnp.float32(clipping), jnp.float32(1e-3))
    assert_tree_close(ours, ref, rtol=1e-6)
    ratios = np.concatenate([
        (np_unit_norms(grads[k]) / np.maximum(np_unit_norms(params[k]), 1e-3)).ravel()
        for k in grads])
    np.testing.assert_allclose(state.stats.norm, ratios.max(), rtol=1e-6)
    assert bool(state.stats.clipped) == bool(np.any(ratios > clipping))
    assert float(state.stats.threshold) == np.float32(clipping)


def test_agc_without_params_raises():
  tx = clipjax.adaptive_grad_clip(0.01)
  grads = random_tree(9, AGC_SHAPES)
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(grads, tx.init(grads))


def test_agc_dtypes_zero_and_nan_units():
  params = {"h": jnp.ones((3, 2), jnp.float16), "b": jnp.ones((3, 2), jnp.bfloat16),
            "f": jnp.zeros((3, 2), jnp.float32)}
  grads = {"h": jnp.array([[1.0, 0.0]] * 3, jnp.float16),
           "b": jnp.array([[jnp.nan, 0.01]] * 3, jnp.bfloat16),
           "f": jnp.zeros((3, 2), jnp.float32)}
  update = jax.jit(lambda c, e: clipjax.adaptive_grad_clip(c, e).update(grads, None, params))
  out, state = update(jnp.float32(0.0), jnp.float32(1e-3))
  assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in grads.items()}
  np.testing.assert_array_equal(out["h"], 0.0)  # clipping=0 zeroes nonzero units; zeros stay zero
  np.testing.assert_array_equal(out["f"], 0.0)
  assert np.all(np.isnan(np.asarray(out["b"][:, 0], np.float32)))  # a NaN unit passes through
  np.testing.assert_array_equal(out["b"][:, 1], 0.0)
  assert not bool(state.stats.finite)
  out, _ = update(jnp.float32(0.5), jnp.float32(1e-3))
  np.testing.assert_allclose(np.asarray(out["h"][:, 0], np.float32), 0.5, rtol=1e-3)


# Across devices ----------------------------------------------------------------------------


def test_axis_name_gives_the_unsharded_result():
  mesh = Mesh(np.array(jax.devices()), ("d",))
  grads = random_tree(11, {"w": (8, 4), "b": (3,)})

  def run(grads, txs):
    outs = []
    for tx in txs:

      def step(state, factor, tx=tx):
        out, state = tx.update(jax.tree.map(lambda g: g * factor, grads), state)
        return state, out

      state, out = jax.lax.scan(step, tx.init(grads), jnp.array([1.0, 2.0, 5.0, 10.0, 17.0]))
      outs.append((out["w"][-1], out["b"][-1], state.stats.norm, state.stats.threshold))
    return outs

  # Stable-SPAM (no dist: two collectives) is sharded in tests/test_spam.py.
  entries = [entry for entry in registry.STATEFUL if entry.dist is not None]
  plain = [make_distributed(entry) for entry in entries]
  expected = jax.jit(functools.partial(run, txs=plain))(grads)
  sharded = [make_distributed(entry, axis_name="d", replicated={"w": False, "b": True})
             for entry in entries]
  spec = (P("d"), P(), P(), P())
  mapped = jax.jit(jax.shard_map(
      functools.partial(run, txs=sharded), mesh=mesh,
      in_specs=({"w": P("d"), "b": P()},), out_specs=[spec] * len(sharded), check_vma=False))
  got = mapped(grads)
  for want, have in zip(expected, got):
    for a, b in zip(want, have):
      np.testing.assert_allclose(b, a, rtol=1e-6)


def test_agc_sharded_along_unit_axes_matches_optax():
  mesh = Mesh(np.array(jax.devices()), ("d",))
  rng = np.random.default_rng(12)
  shapes = {"kernel": (16, 6), "conv": (3, 3, 8, 4), "bias": (5,)}
  specs = {"kernel": P("d"), "conv": P(None, None, "d"), "bias": P()}  # sharded in reduced axes
  params = random_tree(rng, shapes)
  grads = random_tree(rng, shapes, scale=0.1)
  tx = clipjax.adaptive_grad_clip(0.05, axis_name="d", replicated={"kernel": False,
                                                                    "conv": False, "bias": True})

  def update(g, p):
    out, state = tx.update(g, None, p)
    return out, state.stats.norm

  mapped = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(specs, specs),
                                 out_specs=(specs, P()), check_vma=False))
  out, norm = mapped(grads, params)

  plain = clipjax.adaptive_grad_clip(0.05)

  @jax.jit
  def unsharded(g, p):
    ref, _ = optax.adaptive_grad_clip(0.05).update(g, optax.EmptyState(), p)
    return ref, plain.update(g, None, p)[1].stats.norm

  ref, ref_norm = unsharded(grads, params)
  assert_tree_close(out, ref, rtol=1e-6)
  np.testing.assert_allclose(norm, ref_norm, rtol=1e-6)
  assert float(norm) > 0.05  # some units are clipped


# Arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize("factory,kwargs,name", [
    (clipjax.autoclip, {"percentile": -1.0}, "percentile"),
    (clipjax.autoclip, {"percentile": 100.5}, "percentile"),
    (clipjax.autoclip, {"history": 0}, "history"),
    (clipjax.autoclip, {"history": 2.5}, "history"),
    (clipjax.zclip, {"alpha": 1.0}, "alpha"),
    (clipjax.zclip, {"alpha": -0.1}, "alpha"),
    (clipjax.zclip, {"z_thresh": 0.0}, "z_thresh"),
    (clipjax.zclip, {"warmup_steps": 0}, "warmup_steps"),
    (clipjax.zclip, {"max_norm": -1.0}, "max_norm"),
    (clipjax.zclip, {"mode": "median"}, "mode"),
    (clipjax.zclip, {"clip_option": "max"}, "clip_option"),
    (clipjax.zclip, {"clip_factor": 0.0}, "clip_factor"),
    (clipjax.zclip, {"eps": -1e-6}, "eps"),
    (clipjax.zclip, {"skip_update_on_spike": 1}, "skip_update_on_spike"),
    (clipjax.adagc, {"lambda_abs": 0.0}, "lambda_abs"),
    (clipjax.adagc, {"lambda_rel": -1.0}, "lambda_rel"),
    (clipjax.adagc, {"beta": 1.0}, "beta"),
    (clipjax.adagc, {"warmup_steps": -1}, "warmup_steps"),
    (clipjax.quantile_clip, {"target_quantile": 1.0}, "target_quantile"),
    (clipjax.quantile_clip, {"target_quantile": 0.0}, "target_quantile"),
    (clipjax.quantile_clip, {"learning_rate": 0.0}, "learning_rate"),
    (clipjax.quantile_clip, {"initial_norm": -2.0}, "initial_norm"),
    (clipjax.adaptive_grad_clip, {"clipping": -0.1}, "clipping"),
    (clipjax.adaptive_grad_clip, {"clipping": 0.1, "eps": -1.0}, "eps"),
])
def test_bad_arguments_name_the_argument(factory, kwargs, name):
  with pytest.raises(ValueError, match=rf"^{name}="):
    factory(**kwargs)
