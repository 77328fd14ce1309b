"""skip_spikes against a float64 NumPy transcription of the rolling-window rule.

The main case runs a 400-step stream (a fixed direction scaled per step, with
norm and loss spikes, NaN and inf steps, and norms ×20 from step 250 on) in
one jitted ``lax.scan`` and checks every step: the decision, the statistics,
the output (zeros or the inner update), and that a skipped step leaves the
inner state and the window bit for bit as they were.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax
from _dist_cases import compiled_texts, count_all_reduce, count_lowered_all_reduce

STEPS = 400
SHIFT = 250  # the norms are 20 times larger from this step on
WINDOW, MIN_HISTORY, SIGMA, MAX_CONSECUTIVE = 32, 16, 4.0, 6
# Decisions closer than this (relative) to a threshold could flip with float32 round-off.
MARGIN = 1e-4


def _directions() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1)
  tree = {"b": rng.standard_normal(3), "w": rng.standard_normal((4, 3))}
  total = np.sqrt(sum(np.sum(x * x) for x in tree.values()))
  return {k: (x / total).astype(np.float32) for k, x in tree.items()}


DIRS = _directions()


def _stream() -> tuple[np.ndarray, np.ndarray]:
  """Per-step scales of ``DIRS`` and losses, float32."""
  rng = np.random.default_rng(0)
  scale = np.exp(0.1 * rng.standard_normal(STEPS))
  scale[[60, 61, 130, 200, 320]] *= 8.0  # norm spikes (two in a row at 60)
  scale[SHIFT:] *= 20.0
  scale[90], scale[170] = np.nan, np.inf
  # Non-finite exactly when the max_consecutive escape is due: still skipped.
  scale[SHIFT + MAX_CONSECUTIVE] = np.nan
  loss = 2.0 + 0.05 * rng.standard_normal(STEPS)
  loss[[100, 180, 300]] += 3.0  # loss spikes with ordinary norms
  loss[150] = np.nan
  return scale.astype(np.float32), loss.astype(np.float32)


SCALES, LOSSES = _stream()


def _grads(scale):
  return jax.tree.map(lambda d: scale * d, DIRS)


def _np_norm(scale: np.float32) -> float:
  with np.errstate(invalid="ignore", over="ignore"):
    leaves = [(scale * d).astype(np.float64) for d in DIRS.values()]
    return float(np.sqrt(sum(np.sum(x * x) for x in leaves)))


def _inner() -> optax.GradientTransformation:
  """Momentum SGD with a decaying learning rate: a trace and a step count to keep."""
  return optax.chain(optax.trace(0.9),
                     optax.scale_by_schedule(optax.exponential_decay(0.1, 50, 0.5)))


# The float64 NumPy transcription of the rule -------------------------------------------


F32_MAX = float(np.finfo(np.float32).max)  # the threshold statistic while none applies


def _np_limit(values: list[float], min_history: int, sigma: float) -> float:
  """mean + sigma · max(sample std, 1e-6·|mean|), at least max(values) when the std is below
  that floor; inf below ``min_history`` values."""
  if len(values) < min_history:
    return float("inf")
  x = np.asarray(values, np.float64)
  std = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
  mean = float(np.mean(x))
  floor = 1e-6 * abs(mean)
  limit = mean + sigma * max(std, floor)
  return max(limit, float(x.max())) if std < floor else limit


def reference(norms, losses, *, sigma=SIGMA, window=WINDOW, min_history=MIN_HISTORY,
              max_norm=None, max_consecutive=None, count_skipped=False):
  """Per step: skipped, threshold, forced (taken only by the escape), closest margin.

  ``losses`` is ``None`` when no loss is given. The windows are the last
  ``window`` taken steps (finite steps with ``count_skipped``).
  """
  taken_norms, taken_losses, consecutive = [], [], 0
  rows = []
  for t, norm in enumerate(norms):
    loss = None if losses is None else float(losses[t])
    threshold = min(_np_limit(taken_norms[-window:], min_history, sigma),
                    np.inf if max_norm is None else max_norm)
    recent = [x for x in taken_losses[-window:] if x is not None]
    loss_limit = _np_limit(recent, min_history, sigma)
    finite = np.isfinite(norm) and (loss is None or np.isfinite(loss))
    spike = norm > threshold or (loss is not None and loss > loss_limit)
    escape = max_consecutive is not None and consecutive >= max_consecutive
    skipped = not finite or (spike and not escape)
    margin = np.inf
    if finite:
      for x, limit in ((norm, threshold), (loss, loss_limit)):
        if x is not None and np.isfinite(limit):
          margin = min(margin, abs(x - limit) / abs(limit))
    if not skipped:
      consecutive = 0
    elif finite:
      consecutive += 1
    if finite and (count_skipped or not skipped):
      taken_norms.append(norm)
      taken_losses.append(loss)
    rows.append((skipped, threshold, finite and spike and escape, margin))
  skipped, threshold, forced, margin = map(np.asarray, zip(*rows))
  return skipped, threshold, forced, margin


# The stream in one jitted scan ----------------------------------------------------------


@functools.cache
def _scan(with_loss: bool, max_norm: float | None, max_consecutive: int | None,
          count_skipped: bool):
  tx = clipjax.skip_spikes(_inner(), sigma_factor=SIGMA, window=WINDOW,
                           min_history=MIN_HISTORY, max_norm=max_norm,
                           max_consecutive=max_consecutive, count_skipped=count_skipped)

  @jax.jit
  def run(scales, losses):
    def step(state, x):
      extra = {"value": x[1]} if with_loss else {}
      updates, state = tx.update(_grads(x[0]), state, **extra)
      return state, (updates, state)

    init = tx.init(DIRS)
    return init, lax.scan(step, init, (scales, losses))[1]

  return run


def _inner_on_taken_steps(taken: np.ndarray):
  """The inner transformation alone, run on the taken steps only: (updates, state) per step."""
  inner = _inner()
  update = jax.jit(inner.update)
  state = inner.init(DIRS)
  out = []
  for t in range(STEPS):
    updates = jax.tree.map(jnp.zeros_like, DIRS)
    if taken[t]:
      updates, state = update(_grads(SCALES[t]), state)
    out.append((updates, state))
  return out


def _at(tree, t):
  return jax.tree.map(lambda x: x[t], tree)


def _assert_equal_bits(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), what


def _window(state):
  return state.norms, state.losses, state.has_loss, state.position, state.filled


def _check_stream(with_loss, max_norm, max_consecutive, count_skipped=False):
  """Runs the stream and checks every step against the reference; returns its decisions."""
  init, (updates, states) = jax.device_get(
      _scan(with_loss, max_norm, max_consecutive, count_skipped)(SCALES, LOSSES))
  norms = [_np_norm(s) for s in SCALES]
  skipped, threshold, forced, margin = reference(
      norms, LOSSES if with_loss else None, max_norm=max_norm, max_consecutive=max_consecutive,
      count_skipped=count_skipped)
  finite = np.isfinite(norms) & (np.isfinite(LOSSES) if with_loss else True)
  assert margin.min() > MARGIN, f"the stream has a near-tie at step {margin.argmin()}"
  stats = states.stats
  np.testing.assert_array_equal(np.asarray(stats.skipped), skipped)
  np.testing.assert_array_equal(np.asarray(stats.skips), np.cumsum(skipped))
  np.testing.assert_allclose(np.asarray(stats.norm), norms, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats.threshold),
                             np.where(np.isinf(threshold), F32_MAX, threshold), rtol=1e-5)
  expected_loss = LOSSES if with_loss else np.zeros(STEPS, np.float32)
  np.testing.assert_array_equal(np.asarray(stats.loss), expected_loss)
  expected = _inner_on_taken_steps(~skipped)
  before = init
  for t in range(STEPS):
    after = _at(states, t)
    got, (want, want_inner) = _at(updates, t), expected[t]
    if skipped[t]:
      _assert_equal_bits(got, want, f"step {t}: zeros")
      _assert_equal_bits(after.inner, before.inner, f"step {t}: inner state")
      if not (count_skipped and finite[t]):
        _assert_equal_bits(_window(after), _window(before), f"step {t}: window")
      else:  # the skipped step entered the window
        assert int(after.filled) == min(int(before.filled) + 1, WINDOW), t
        assert after.norms[int(before.position)] == after.stats.norm, t
    else:
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    for a, b in zip(jax.tree.leaves(after.inner), jax.tree.leaves(want_inner), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    before = after
  return skipped, forced


@pytest.mark.parametrize("with_loss", [True, False], ids=["loss", "norm_only"])
def test_stream_matches_the_reference(with_loss):
  skipped, forced = _check_stream(with_loss, None, MAX_CONSECUTIVE)
  # The stream exercises every branch of the rule.
  assert skipped[[60, 61, 90, 130, 170, 200]].all()
  assert skipped[[100, 180]].all() == with_loss  # loss spikes, ordinary norms
  assert skipped[150] == with_loss  # a NaN loss with a finite norm
  # After the shift: max_consecutive skips, the NaN step that falls due is still
  # skipped, then the escape takes a step, and later ones as the window adapts.
  assert skipped[SHIFT:SHIFT + MAX_CONSECUTIVE + 1].all()
  assert forced[SHIFT + MAX_CONSECUTIVE + 1] and not skipped[SHIFT + MAX_CONSECUTIVE + 1]
  assert forced.sum() >= 2
  assert not skipped[-50:].any()  # the window has caught up with the new scale


def test_max_norm_without_max_consecutive_skips_every_step_above_it():
  skipped, forced = _check_stream(True, 6.0, None)
  assert not forced.any()
  assert skipped[SHIFT:].all()  # no escape: a lasting shift stalls training
  assert skipped[[60, 61, 130, 200]].all()


@pytest.mark.parametrize("with_loss", [True, False], ids=["loss", "norm_only"])
def test_count_skipped_lets_skipped_spikes_into_the_window(with_loss):
  skipped, _ = _check_stream(with_loss, None, None, count_skipped=True)
  # The window takes in the shifted norms, so the new scale becomes the baseline
  # without max_consecutive (without count_skipped every later step would be skipped).
  assert skipped[SHIFT] and not skipped[-50:].any()
  assert skipped[[90, 170]].all()  # non-finite: skipped, and kept out of the window


# Smaller cases ---------------------------------------------------------------------------


def _run(tx, norms, losses=None):
  """Steps of ``tx`` on ``norm · e_0``; returns the stats of each step and the last state."""
  update = jax.jit(tx.update)
  state = tx.init(jnp.zeros(2))
  stats = []
  for t, norm in enumerate(norms):
    extra = {} if losses is None else {"value": jnp.float32(losses[t])}
    _, state = update(jnp.array([norm, 0.0], jnp.float32), state, **extra)
    stats.append(jax.device_get(state.stats))
  return stats, state


def test_loss_spike_is_skipped_only_when_value_is_passed():
  tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=3.0, window=8, min_history=4)
  norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]
  losses = [3.0, 3.1, 2.9, 3.05, 2.95, 30.0]
  with_loss, _ = _run(tx, norms, losses)
  without, _ = _run(tx, norms)
  assert [bool(s.skipped) for s in with_loss] == [False] * 5 + [True]
  assert not any(bool(s.skipped) for s in without)
  assert float(without[-1].loss) == 0.0 and float(with_loss[-1].loss) == 30.0


def test_max_norm_applies_before_min_history():
  tx = clipjax.skip_spikes(optax.sgd(1.0), window=8, max_norm=2.0)
  stats, state = _run(tx, [1.0, 3.0, 1.5, 2.5])
  assert [bool(s.skipped) for s in stats] == [False, True, False, True]
  assert all(float(s.threshold) == 2.0 for s in stats)
  assert int(state.filled) == 2 and int(state.skips) == 2


def test_threshold_reads_float32_max_before_min_history():
  tx = clipjax.skip_spikes(optax.sgd(1.0), window=8)  # min_history = 4
  stats, _ = _run(tx, [1.0, 1.0, 1.0, 1.0, 1.0])
  # A constant window's limit is its value plus the relative floor on the spread.
  assert [float(s.threshold) for s in stats] == [F32_MAX] * 4 + [np.float32(1.0 + 6e-6)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_skipped_non_finite_step_returns_zeros_of_the_inner_dtype(dtype):
  tx = clipjax.skip_spikes(optax.sgd(0.5, momentum=0.9), window=4, min_history=2)
  grads = {"w": jnp.ones((3,), dtype), "b": jnp.ones((2,), dtype)}
  update = jax.jit(tx.update)
  _, state = update(grads, tx.init(grads))
  bad = {"w": grads["w"].at[1].set(jnp.nan), "b": grads["b"] * jnp.asarray(jnp.inf, dtype)}
  updates, new_state = update(bad, state)
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == dtype
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)
  assert bool(new_state.stats.skipped) and not np.isfinite(float(new_state.stats.norm))
  _assert_equal_bits(new_state.inner, state.inner, "inner state")


def test_non_finite_steps_do_not_count_toward_the_escape():
  tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=3.0, window=4, min_history=2,
                           max_consecutive=2)
  norms = [1.0, 1.1, 50.0, np.nan, 50.0, np.inf, 50.0, 500.0]
  stats, state = _run(tx, norms)
  # Spike, NaN (not counted), spike, inf past the bound (still skipped), escape, spike.
  assert [bool(s.skipped) for s in stats] == [False, False, True, True, True, True, False,
                                              True]
  assert int(state.skips) == 5 and int(state.consecutive) == 1


# Composition -----------------------------------------------------------------------------


@pytest.mark.loose_promotion  # optax.MultiSteps adds an int32 step count to float32 sums
def test_multi_steps_decides_on_the_mean_gradient():
  def make():
    return clipjax.skip_spikes(_inner(), sigma_factor=3.0, window=4, min_history=2)

  tx = optax.MultiSteps(make(), every_k_schedule=2)
  step = jax.jit(tx.update)
  state = tx.init(DIRS)
  means = [1.0, 1.2, 0.9, 30.0, 1.1]
  direct, direct_state = jax.jit(make().update), make().init(DIRS)
  for mean in means:
    for half in (mean - 0.25, mean + 0.25):
      updates, state = step(_grads(np.float32(half)), state, value=jnp.float32(2.0))
    want, direct_state = direct(_grads(np.float32(mean)), direct_state, value=jnp.float32(2.0))
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(state.inner_opt_state), jax.tree.leaves(direct_state),
                    strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert int(state.inner_opt_state.skips) == 1


def test_inject_hyperparams_sigma_factor_takes_effect_under_jit():
  tx = optax.inject_hyperparams(clipjax.skip_spikes, static_args=("window",))(
      inner=optax.sgd(1.0), sigma_factor=100.0, window=8, min_history=4)
  step = jax.jit(tx.update)
  state = tx.init(jnp.zeros(2))
  for norm in [1.0, 1.2, 0.9, 1.1]:
    _, state = step(jnp.array([norm, 0.0]), state, value=jnp.float32(3.0))
  spike = jnp.array([3.0, 0.0])
  updates, new = step(spike, state, value=jnp.float32(3.0))
  assert not bool(new.inner_state.stats.skipped)  # 3 is within 100 σ
  state.hyperparams["sigma_factor"] = jnp.asarray(2.0, jnp.float32)
  updates, new = step(spike, state, value=jnp.float32(3.0))
  direct = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=2.0, window=8, min_history=4)
  want, want_state = jax.jit(direct.update)(spike, state.inner_state, value=jnp.float32(3.0))
  assert bool(new.inner_state.stats.skipped)
  np.testing.assert_array_equal(np.asarray(updates), np.asarray(want))
  for a, b in zip(jax.tree.leaves(new.inner_state), jax.tree.leaves(want_state), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_traced_window_at_init_says_it_must_be_static():
  def init(window):
    return clipjax.skip_spikes(optax.sgd(1.0), window=window).init(jnp.zeros(2))

  with pytest.raises(ValueError, match="window=.* static argument"):
    jax.jit(init)(8)


@pytest.mark.parametrize("outer", [True, False], ids=["outside", "inside"])
def test_apply_if_finite(outer):
  sgd = optax.sgd(0.1, momentum=0.9)
  skip = functools.partial(clipjax.skip_spikes, window=4, min_history=2)
  tx = (optax.apply_if_finite(skip(sgd), 3) if outer
        else skip(optax.apply_if_finite(sgd, 3)))
  step = jax.jit(tx.update)
  grads = jnp.array([1.0, 2.0])
  _, state = step(grads, tx.init(grads))
  updates, new = step(grads.at[0].set(jnp.nan), state)
  np.testing.assert_array_equal(np.asarray(updates), 0.0)
  if outer:  # apply_if_finite rejects the step: skip_spikes never sees it
    assert int(new.notfinite_count) == 1
    _assert_equal_bits(new.inner_state, state.inner_state, "skip_spikes state")
  else:  # skip_spikes skips it: the inner apply_if_finite state does not move either
    assert bool(new.stats.skipped) and int(new.skips) == 1
    assert int(new.inner.notfinite_count) == 0
    _assert_equal_bits(new.inner, state.inner, "apply_if_finite state")


def test_clipper_inside_inner_reports_both_statistics():
  tx = clipjax.skip_spikes(
      optax.chain(clipjax.zclip(warmup_steps=2), optax.sgd(0.1, momentum=0.9)),
      sigma_factor=3.0, window=4, min_history=2)
  stats, state = _run(tx, [1.0, 1.2, 0.9, 40.0])
  shown = clipjax.clip_stats(state)
  assert {"skip_spikes/norm", "skip_spikes/loss", "skip_spikes/threshold",
          "skip_spikes/skipped", "skip_spikes/skips", "zclip/norm", "zclip/clipped"} <= set(shown)
  assert bool(shown["skip_spikes/skipped"]) and float(shown["skip_spikes/norm"]) == 40.0
  # zclip reports what it measured on the skipped step...
  assert float(shown["zclip/norm"]) == 40.0
  assert [bool(s.skipped) for s in stats] == [False, False, False, True]
  # ...while every other field of the inner state is the last taken step's, bit for bit.
  _, before = _run(tx, [1.0, 1.2, 0.9])
  zclip_now, zclip_before = state.inner[0], before.inner[0]
  for field in zclip_now._fields:
    if field != "clip_stats":
      _assert_equal_bits(getattr(zclip_now, field), getattr(zclip_before, field), field)
  _assert_equal_bits(state.inner[1], before.inner[1], "sgd state")
  assert float(clipjax.clip_stats(before)["zclip/norm"]) == pytest.approx(0.9)


@pytest.mark.loose_promotion  # reduce_on_plateau divides a float32 sum by an int32 count
def test_extra_args_reach_an_inner_transformation_that_takes_them():
  inner = optax.chain(optax.sgd(1.0), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
  tx = clipjax.skip_spikes(inner, window=4, min_history=2)
  update, state = jax.jit(tx.update), tx.init(jnp.zeros(2))
  for loss in [1.0, 1.0, 1.0, 1.0]:
    updates, state = update(jnp.array([1.0, 0.0]), state, value=jnp.float32(loss))
  assert float(state.inner[1].scale) < 1.0  # the plateau was seen through value=
  np.testing.assert_array_equal(np.asarray(updates), [-float(state.inner[1].scale), 0.0])


def test_state_none_is_rejected():
  tx = clipjax.skip_spikes(optax.sgd(1.0))
  with pytest.raises(ValueError, match="needs the SkipSpikesState.*thread it through"):
    tx.update(jnp.ones(2), None)


def test_value_must_be_a_scalar():
  tx = clipjax.skip_spikes(optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"value= must be a scalar loss, got shape \(2,\)"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=jnp.ones(2))


# Across devices -------------------------------------------------------------------------

MESH_SHAPES = {"b": (3,), "w": (8, 3)}
SPECS = {"b": P(), "w": P("d")}
REPLICATED = {"b": True, "w": False}


def _mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("d",))


def _mesh_tx(**dist):
  return clipjax.skip_spikes(optax.sgd(0.1, momentum=0.9), sigma_factor=3.0, window=8,
                             min_history=4, max_consecutive=3, **dist)


def _mesh_stream():
  rng = np.random.default_rng(3)
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in MESH_SHAPES.items()}
  scale = np.exp(0.1 * rng.standard_normal(40))
  scale[[12, 13, 25]] *= 10.0
  scale[30:] *= 20.0
  scale[18] = np.nan
  grads = {k: (scale[:, None] * x.reshape(1, -1)).reshape((40,) + x.shape).astype(np.float32)
           for k, x in base.items()}
  losses = (1.0 + 0.05 * rng.standard_normal(40)).astype(np.float32)
  losses[20] += 2.0
  return grads, losses


def _scan_steps(tx):
  def run(grads, losses):
    first = jax.tree.map(lambda x: x[0], grads)

    def step(state, x):
      updates, state = tx.update(x[0], state, value=x[1])
      return state, (updates, state.stats)

    return lax.scan(step, tx.init(first), (grads, losses))[1]

  return run


def test_shard_map_gives_the_unsharded_decisions_with_one_all_reduce():
  mesh = _mesh()
  grads, losses = _mesh_stream()
  expected_updates, expected = jax.jit(_scan_steps(_mesh_tx()))(grads, losses)
  stacked = {k: P(None, *s) for k, s in SPECS.items()}
  sharded = jax.jit(jax.shard_map(
      _scan_steps(_mesh_tx(axis_name="d", replicated=REPLICATED)), mesh=mesh,
      in_specs=(stacked, P()), out_specs=(stacked, P())))
  updates, stats = sharded(grads, losses)
  skipped = np.asarray(expected.skipped)
  assert skipped[[12, 13, 18, 20, 25, 30, 31, 32]].all() and not skipped[33]
  np.testing.assert_array_equal(np.asarray(stats.skipped), skipped)
  np.testing.assert_array_equal(np.asarray(stats.skips), np.asarray(expected.skips))
  np.testing.assert_allclose(np.asarray(stats.norm), np.asarray(expected.norm), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats.threshold), np.asarray(expected.threshold),
                             rtol=1e-5)
  for k in MESH_SHAPES:
    np.testing.assert_allclose(np.asarray(updates[k]), np.asarray(expected_updates[k]),
                               rtol=1e-5, atol=1e-7)
  # One update under shard_map: the norm's collective is the only one.
  tx = _mesh_tx(axis_name="d", replicated=REPLICATED)
  one = {k: x[0] for k, x in grads.items()}

  def update(g, v):  # the momentum is sharded like the gradients: initialised per device
    updates, state = tx.update(g, tx.init(g), value=v)
    return updates, state.stats

  f = jax.shard_map(update, mesh=mesh, in_specs=(SPECS, P()), out_specs=(SPECS, P()))
  placed = {k: jax.device_put(x, NamedSharding(mesh, SPECS[k])) for k, x in one.items()}
  lowered, compiled = compiled_texts(f, placed, jnp.float32(1.0))
  assert count_lowered_all_reduce(lowered) == 1
  assert count_all_reduce(compiled) == 1, compiled


# Arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sigma_factor": 0.0}, r"^sigma_factor=0.0 must be > 0$"),
    ({"sigma_factor": -1}, r"^sigma_factor=-1 must be > 0$"),
    ({"window": 1}, r"^window=1 must be >= 2$"),
    ({"window": 2.5}, r"^window=2.5 must be an int$"),
    ({"min_history": 0}, r"^min_history=0 must be >= 1$"),
    ({"min_history": 200}, r"^min_history=200 must be <= window=128$"),
    ({"max_norm": -1.0}, r"^max_norm=-1.0 must be >= 0$"),
    ({"max_norm": optax.constant_schedule(1.0)}, r"^max_norm=.* must be a number"),
    ({"max_consecutive": 0}, r"^max_consecutive=0 must be >= 1$"),
    ({"max_consecutive": True}, r"^max_consecutive=True must be an int$"),
    ({"count_skipped": 1}, r"^count_skipped=1 must be a bool$"),
    ({"on_nonfinite": "warn"}, r"^on_nonfinite='warn' must be one of 'skip', 'raise'$"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
  with pytest.raises(ValueError, match=message):
    clipjax.skip_spikes(optax.sgd(1.0), **kwargs)


@pytest.mark.parametrize("inner", [lambda g: g, optax.MultiSteps(optax.sgd(1.0), 2), None],
                         ids=["function", "multi_steps_object", "none"])
def test_inner_must_be_a_transformation(inner):
  with pytest.raises(TypeError, match="^skip_spikes: inner=.* must be an optax"):
    clipjax.skip_spikes(inner)


def test_traced_arguments_pass_unchecked():
  def build(sigma_factor, max_norm, min_history, max_consecutive):
    tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=sigma_factor, window=4,
                             min_history=min_history, max_norm=max_norm,
                             max_consecutive=max_consecutive)
    return tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[1].stats.skipped

  # Values that would be rejected if they were concrete: only checked in Python.
  assert not bool(jax.jit(build)(-1.0, 5.0, 9, 0))


# The loss argument ---------------------------------------------------------------------------


def _recording_inner(seen: list):
  """An inner transformation that records the extra arguments it receives."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params
    seen.append(sorted(extra_args))
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_loss_keyword_decides_like_value_and_reaches_inner():
  norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]
  losses = [3.0, 3.1, 2.9, 3.05, 2.95, 30.0]
  seen = []
  tx = clipjax.skip_spikes(_recording_inner(seen), sigma_factor=3.0, window=8, min_history=4)
  state = tx.init(jnp.zeros(2))
  by_loss = []
  for norm, loss in zip(norms, losses, strict=True):
    _, state = tx.update(jnp.array([norm, 0.0]), state, loss=jnp.float32(loss), other=1)
    by_loss.append(jax.device_get(state.stats))
  by_value, _ = _run(clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=3.0, window=8,
                                         min_history=4), norms, losses)
  assert [bool(s.skipped) for s in by_loss] == [False] * 5 + [True]
  for a, b in zip(by_loss, by_value, strict=True):
    _assert_equal_bits(a, b, "statistics")
  assert seen == [["loss", "other"]] * len(norms)  # every extra argument, unchanged


def test_loss_and_value_together_are_rejected():
  tx = clipjax.skip_spikes(optax.sgd(1.0))
  with pytest.raises(ValueError, match="loss= or as value=, not both"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), loss=1.0, value=1.0)
  with pytest.raises(ValueError, match=r"loss= must be a scalar loss"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), loss=jnp.ones(2))


# Constant and nearly constant inputs ---------------------------------------------------------


def _scan_steps_of(tx, norms, losses=None):
  """``skipped`` of every step, run in one jitted scan over ``norm · e_0``."""
  @jax.jit
  def run(norms, losses):
    def step(state, x):
      extra = {} if losses is None else {"loss": x[1]}
      _, state = tx.update(jnp.stack([x[0], jnp.zeros_like(x[0])]), state, **extra)
      return state, state.stats.skipped

    xs = (norms, norms if losses is None else losses)
    return lax.scan(step, tx.init(jnp.zeros(2)), xs)[1]

  return np.asarray(run(jnp.asarray(norms, jnp.float32),
                        None if losses is None else jnp.asarray(losses, jnp.float32)))


@pytest.mark.parametrize("value", [0.3701, 1.0, 7.77, 123456.7, 3e-30])
def test_a_thousand_identical_steps_are_never_skipped(value):
  tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=6.0, window=128, min_history=8)
  steps = np.full(1000, value, np.float32)
  assert not _scan_steps_of(tx, steps).any()  # constant norm
  ordinary = np.exp(0.05 * np.random.default_rng(0).standard_normal(1000)).astype(np.float32)
  assert not _scan_steps_of(tx, ordinary, steps).any()  # constant loss, ordinary norms


@pytest.mark.parametrize("sigma_factor", [6.0, 1.0])
def test_a_slowly_drifting_plateau_is_never_skipped(sigma_factor):
  rng = np.random.default_rng(4)
  # Within 1e-7 relative (an ulp or two): a random walk around 2.5, and a slow rise.
  ulps = np.cumsum(rng.integers(-1, 2, 1000))
  walk = (2.5 * (1.0 + 1e-7 * np.tanh(ulps / 10))).astype(np.float32)
  rise = (2.5 * (1.0 + 1e-7 * np.arange(1000) / 1000)).astype(np.float32)
  tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=sigma_factor, window=64,
                           min_history=8)
  for plateau in (walk, rise):
    assert len(np.unique(plateau)) > 1
    assert not _scan_steps_of(tx, plateau).any()
    assert not _scan_steps_of(tx, np.ones(1000, np.float32), plateau).any()


def test_real_spikes_are_still_caught():
  tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=6.0, window=64, min_history=8)
  noisy = np.exp(0.1 * np.random.default_rng(5).standard_normal(100)).astype(np.float32)
  spiked = noisy.copy()
  spiked[80] *= 10.0
  assert list(np.flatnonzero(_scan_steps_of(tx, spiked))) == [80]
  constant = np.full(100, 1.5, np.float32)
  constant[60] = 3.0  # twice the constant value
  assert list(np.flatnonzero(_scan_steps_of(tx, constant))) == [60]
  assert list(np.flatnonzero(_scan_steps_of(tx, np.ones(100, np.float32), constant))) == [60]


# Non-finite steps ----------------------------------------------------------------------------


def test_non_finite_steps_never_enter_the_window_even_with_count_skipped():
  tx = clipjax.skip_spikes(optax.sgd(1.0), window=4, min_history=2, count_skipped=True)
  stats, state = _run(tx, [1.0, np.nan, 1.0, np.inf], [2.0, 2.0, np.nan, 2.0])
  assert [bool(s.skipped) for s in stats] == [False, True, True, True]
  assert int(state.filled) == 1 and int(state.skip_step) == 4


@pytest.mark.parametrize(("norm", "loss", "message"), [
    (np.nan, 2.0, "the global gradient norm is nan"),
    (1.0, np.inf, "the loss is inf"),
])
def test_on_nonfinite_raise_names_the_step(norm, loss, message):
  tx = clipjax.skip_spikes(optax.sgd(1.0), window=4, on_nonfinite="raise")
  state = tx.init(jnp.zeros(2))
  for _ in range(3):
    _, state = tx.update(jnp.array([1.0, 0.0]), state, loss=2.0)
  bad = jnp.array([norm, 0.0], jnp.float32)
  pattern = f"skip_spikes: at step 3 .*{message}"
  with pytest.raises(FloatingPointError, match=pattern):
    tx.update(bad, state, loss=jnp.float32(loss))
  with pytest.raises(jax.errors.JaxRuntimeError, match=pattern):
    jax.block_until_ready(jax.jit(tx.update)(bad, state, loss=jnp.float32(loss)))
  # A finite step passes, eagerly and under jit.
  jax.block_until_ready(jax.jit(tx.update)(jnp.array([1.0, 0.0]), state, loss=jnp.float32(2.0)))


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
def test_a_finite_float64_norm_beyond_float32_is_compared_in_float64():
  with jax.enable_x64(True):
    tx = clipjax.skip_spikes(optax.sgd(1.0), window=4, min_history=2)
    state = tx.init(jnp.zeros(2, jnp.float64))
    grads = jnp.array([1e39, 0.0], jnp.float64)
    updates, state = jax.jit(tx.update)(grads, state)
    assert not bool(state.stats.skipped)  # no history yet: taken
    assert float(state.stats.norm) == F32_MAX and np.isfinite(float(state.stats.norm))
    np.testing.assert_array_equal(np.asarray(updates), [-1e39, 0.0])
    # Against a window of ordinary norms it is a spike, not a non-finite step.
    state = tx.init(jnp.zeros(2, jnp.float64))
    for _ in range(2):
      _, state = tx.update(jnp.array([1.0, 0.0], jnp.float64), state)
    _, state = tx.update(grads, state)
    assert bool(state.stats.skipped) and int(state.consecutive) == 1
