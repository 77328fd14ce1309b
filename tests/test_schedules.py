"""Decay schedules against their closed forms, and scheduled thresholds in the clippers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
import registry
from _trees import np_norm

STEPS = np.arange(10_001)  # t = 0 ... 10 000
F32_RTOL = 1e-6


def _values(schedule, steps=STEPS):
  """The schedule on every step at once, as one jitted call with a traced int32 step."""
  out = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
  assert out.dtype == jnp.float32
  return np.asarray(out)


# Closed forms, float64 ---------------------------------------------------------


def _polynomial_np(t, init, steps, power, end):
  t = np.minimum(t.astype(np.float64), steps)
  return (init - end) * (1.0 - t / steps) ** power + end


def _inverse_sqrt_np(t, init, timescale):
  return init / np.sqrt(1.0 + t.astype(np.float64) / timescale)


def _inverse_time_np(t, init, steps, power, staircase):
  ratio = t.astype(np.float64) / steps
  if staircase:
    ratio = np.floor(ratio)
  return init / (1.0 + ratio) ** power


@pytest.mark.parametrize("init, steps, power, end", [
    (1.0, 10_000, 1, 0.0),
    (0.1, 3_000, 2, 0.0),
    (5.0, 7_777, 0.5, 0.25),
    (1.0, 10_000, 3.0, 1e-3),
    (0.5, 1_000, 1.0, 2.0),  # end above init: a polynomial warm-up
    (2.0, 250.5, 1.5, 0.0),  # a non-integer number of steps
])
def test_polynomial_decay_closed_form(init, steps, power, end):
  got = _values(clipjax.polynomial_decay(init, steps, power=power, end_value=end))
  np.testing.assert_allclose(got, _polynomial_np(STEPS, init, steps, power, end), rtol=F32_RTOL)


@pytest.mark.parametrize("init, timescale", [(1.0, 1.0), (3.0, 1.0), (0.02, 250.0), (7.0, 0.3)])
def test_inverse_sqrt_decay_closed_form(init, timescale):
  got = _values(clipjax.inverse_sqrt_decay(init, timescale))
  np.testing.assert_allclose(got, _inverse_sqrt_np(STEPS, init, timescale), rtol=F32_RTOL)


@pytest.mark.parametrize("init, steps, power, staircase", [
    (1.0, 1, 1, False),
    (0.1, 100, 1.0, False),
    (2.0, 37.5, 0.5, False),
    (1.0, 1000, 2, False),
    (1.0, 100, 1.0, True),
    (3.0, 7, 0.75, True),
])
def test_inverse_time_decay_closed_form(init, steps, power, staircase):
  got = _values(clipjax.inverse_time_decay(init, steps, power=power, staircase=staircase))
  np.testing.assert_allclose(got, _inverse_time_np(STEPS, init, steps, power, staircase),
                             rtol=F32_RTOL)


def test_inverse_sqrt_decay_default_is_one_over_sqrt_t_plus_one():
  got = _values(clipjax.inverse_sqrt_decay(2.0))
  np.testing.assert_allclose(got, 2.0 / np.sqrt(STEPS + 1.0), rtol=F32_RTOL)


# Other libraries' schedules -------------------------------------------------------


def _keras_inverse_time_np(t, a, d, r, staircase):
  """Keras ``InverseTimeDecay(a, d, r, staircase)``: ``a / (1 + r * t / d)``."""
  p = t.astype(np.float64) / d
  if staircase:
    p = np.floor(p)
  return a / (1.0 + r * p)


@pytest.mark.parametrize("a, d, r", [(0.1, 1.0, 0.5), (1.0, 1000.0, 1.0), (0.01, 10.0, 3.0),
                                     (2.0, 256.0, 0.1)])
def test_inverse_time_decay_reproduces_keras(a, d, r):
  got = _values(clipjax.inverse_time_decay(a, d / r))
  np.testing.assert_allclose(got, _keras_inverse_time_np(STEPS, a, d, r, False), rtol=F32_RTOL)


@pytest.mark.parametrize("a, d", [(0.1, 10.0), (1.0, 1000.0), (0.5, 3.0)])
def test_inverse_time_decay_staircase_reproduces_keras_with_unit_rate(a, d):
  # Keras' staircase is a / (1 + r floor(t / d)): it is this schedule's staircase when r = 1.
  got = _values(clipjax.inverse_time_decay(a, d, staircase=True))
  np.testing.assert_allclose(got, _keras_inverse_time_np(STEPS, a, d, 1.0, True), rtol=F32_RTOL)


@pytest.mark.parametrize("init, end, power, steps", [
    (1.0, 0.0, 1, 10_000), (1.0, 0.01, 2, 100), (0.3, 0.1, 0.5, 4_000), (1e-3, 1e-5, 3, 9_999),
])
def test_polynomial_decay_equals_optax_polynomial_schedule(init, end, power, steps):
  ours = _values(clipjax.polynomial_decay(init, steps, power=power, end_value=end))
  theirs = _values(optax.polynomial_schedule(init, end, power, steps, transition_begin=0))
  # Under jit, optax's 1 - t/T can come out a hair below 0 at t >= T (XLA divides by
  # multiplying with 1/T), and a fractional power of it is NaN: optax is then undefined,
  # while polynomial_decay is finite everywhere. Compare where optax is defined.
  defined = np.isfinite(theirs)
  assert defined[:steps].all() and np.isfinite(ours).all()
  # Elsewhere they agree up to optax's own rounding of 1 - t/T (an ulp or two of 1), which the
  # power amplifies near t = T by the slope |I - E| p x^(p-1).
  x = np.maximum(1.0 - np.minimum(STEPS, steps) / steps, 1.0 / steps)[defined]
  slack = abs(init - end) * power * x ** (power - 1) * 2.0**-22
  error = np.abs(ours[defined] - theirs[defined])
  assert np.all(error <= F32_RTOL * np.abs(theirs[defined]) + slack)
  np.testing.assert_allclose(ours, _polynomial_np(STEPS, init, steps, power, end), rtol=F32_RTOL)


# Steps: traced, Python, negative ------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: clipjax.polynomial_decay(1.0, 10, power=2),
    lambda: clipjax.inverse_sqrt_decay(1.0, 4.0),
    lambda: clipjax.inverse_time_decay(1.0, 3, power=0.5, staircase=True),
])
def test_schedule_accepts_python_and_traced_steps(make):
  schedule = make()
  jitted = jax.jit(schedule)
  for t in (0, 1, 7, 12):
    eager = schedule(t)
    traced = jitted(jnp.asarray(t, jnp.int32))
    assert eager.dtype == traced.dtype == jnp.float32 and eager.shape == ()
    # XLA may contract a * b + c into one fused multiply-add under jit: an ulp apart at most.
    np.testing.assert_allclose(float(traced), float(eager), rtol=F32_RTOL)
  # Step 0 is exactly init_value, eager and jitted (no constant folding moves it).
  assert float(schedule(0)) == float(jitted(jnp.zeros((), jnp.int32))) == 1.0
  # A negative step counts as step 0.
  assert float(schedule(-5)) == float(schedule(0))


def test_schedule_arguments_may_be_traced():
  @jax.jit
  def value(init, steps, power):
    return clipjax.polynomial_decay(init, steps, power=power)(jnp.asarray(5, jnp.int32))

  got = value(jnp.float32(2.0), jnp.float32(10.0), jnp.float32(2.0))
  np.testing.assert_allclose(float(got), 2.0 * 0.5**2, rtol=F32_RTOL)


# Bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: clipjax.polynomial_decay(1.0, 0), "decay_steps=0 must be > 0"),
    (lambda: clipjax.polynomial_decay(1.0, -10), "decay_steps=-10 must be > 0"),
    (lambda: clipjax.polynomial_decay(1.0, 10, power=-1.0), "power=-1.0 must be >= 0"),
    (lambda: clipjax.polynomial_decay(-1.0, 10), "init_value=-1.0 must be >= 0"),
    (lambda: clipjax.polynomial_decay(1.0, 10, end_value=-0.5), "end_value=-0.5 must be >= 0"),
    (lambda: clipjax.polynomial_decay(float("nan"), 10), "init_value=nan must not be NaN"),
    (lambda: clipjax.polynomial_decay(1.0, float("inf")), "decay_steps=inf must be finite"),
    (lambda: clipjax.inverse_sqrt_decay(1.0, 0.0), "timescale=0.0 must be > 0"),
    (lambda: clipjax.inverse_sqrt_decay(1.0, -2), "timescale=-2 must be > 0"),
    (lambda: clipjax.inverse_sqrt_decay(-0.1), "init_value=-0.1 must be >= 0"),
    (lambda: clipjax.inverse_sqrt_decay(float("inf")), "init_value=inf must be finite"),
    (lambda: clipjax.inverse_time_decay(1.0, 0), "decay_steps=0 must be > 0"),
    (lambda: clipjax.inverse_time_decay(1.0, 10, power=-0.5), "power=-0.5 must be >= 0"),
    (lambda: clipjax.inverse_time_decay(-3.0, 10), "init_value=-3.0 must be >= 0"),
    (lambda: clipjax.inverse_time_decay(1.0, 10, staircase=1), "staircase=1 must be a bool"),
    (lambda: clipjax.inverse_time_decay(1.0, optax.constant_schedule(3)),
     "decay_steps=.* must be a number, not a schedule"),
])
def test_bad_arguments_raise_naming_the_argument(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# Scheduled thresholds in the clippers --------------------------------------------


def _run(tx, grads, steps, params=None):
  """``steps`` jitted updates of the same gradient; the updates and states of each step."""
  update = jax.jit(tx.update)
  state = tx.init(params if params is not None else grads)
  out = []
  for _ in range(steps):
    updates, state = update(grads, state, params)
    out.append((updates, state))
  return out


def test_scheduled_global_norm_clips_to_4_3_2_1_and_stays_at_1():
  tx = clipjax.clip_by_global_norm(optax.linear_schedule(4.0, 1.0, 3))
  grads = {"w": jnp.array([30.0, 40.0]), "b": jnp.array([0.0])}  # norm 50
  steps = _run(tx, grads, 5)
  expected = [4.0, 3.0, 2.0, 1.0, 1.0]
  np.testing.assert_allclose([np_norm(u) for u, _ in steps], expected, rtol=F32_RTOL)
  np.testing.assert_allclose([float(s.stats.threshold) for _, s in steps], expected,
                             rtol=F32_RTOL)
  # The direction is kept: each step is the gradient scaled by threshold / 50.
  for (u, _), c in zip(steps, expected):
    np.testing.assert_allclose(np.asarray(u["w"]), np.array([30.0, 40.0]) * c / 50.0,
                               rtol=F32_RTOL)
  assert int(steps[-1][1].clip_count) == 5


_SCHEDULES = {
    "inverse_sqrt": clipjax.inverse_sqrt_decay(4.0),
    "polynomial": clipjax.polynomial_decay(4.0, 3, power=2, end_value=0.5),
    "inverse_time": clipjax.inverse_time_decay(4.0, 1.5, staircase=True),
}


def _check_follows(tx, entry, schedule):
  """Five steps of ``tx``: each clipped onto the schedule's value, which ``entry`` reports."""
  grads = {"w": jnp.array([[30.0, -40.0], [12.0, 5.0]]), "b": jnp.array([-20.0, 21.0])}
  for t, (updates, state) in enumerate(_run(tx, grads, 5)):
    expected = float(schedule(t))
    np.testing.assert_allclose(entry.measure(updates), expected, rtol=F32_RTOL)
    stats = clipjax.clip_stats(state)
    for threshold, clipped in zip(entry.stat_names("threshold"), entry.stat_names("clipped")):
      np.testing.assert_allclose(float(stats[threshold]), expected, rtol=F32_RTOL)
      assert bool(stats[clipped])


@pytest.mark.parametrize("schedule", list(_SCHEDULES))
@pytest.mark.parametrize("entry", registry.FIXED, ids=str)
def test_fixed_clippers_follow_a_schedule_and_report_it(entry, schedule):
  schedule = _SCHEDULES[schedule]
  _check_follows(entry.build(**{entry.hyper[0]: schedule}), entry, schedule)


@pytest.mark.parametrize("schedule", list(_SCHEDULES))
@pytest.mark.parametrize("option", list(registry.CLIPPED_OPTIONS))
def test_clipped_passes_a_schedule_to_its_clipper(option, schedule):
  schedule = _SCHEDULES[schedule]
  tx = clipjax.clipped(optax.identity(), **{option: schedule})
  _check_follows(tx, registry.by_name(registry.CLIPPED_OPTIONS[option]), schedule)


def test_zclip_max_norm_follows_a_schedule():
  schedule = optax.linear_schedule(4.0, 1.0, 3)
  # The cap applies on every step, warm-up included; a steady norm of 50 is never a z-spike,
  # so the cap alone sets the output norm and the reported threshold.
  tx = clipjax.zclip(warmup_steps=2, max_norm=schedule)
  grads = {"w": jnp.array([30.0, 40.0])}
  for t, (updates, state) in enumerate(_run(tx, grads, 5)):
    np.testing.assert_allclose(np_norm(updates), float(schedule(t)), rtol=F32_RTOL)
    np.testing.assert_allclose(float(clipjax.clip_stats(state)["zclip/threshold"]),
                               float(schedule(t)), rtol=F32_RTOL)


def test_adaptive_grad_clip_clipping_follows_a_schedule():
  schedule = clipjax.inverse_sqrt_decay(0.5)
  params = {"w": jnp.array([[3.0, 0.0], [4.0, 2.0]])}  # unit (column) norms 5 and 2
  grads = {"w": jnp.array([[30.0, 3.0], [40.0, 4.0]])}  # unit norms 50 and 5: both clipped
  for t, (updates, state) in enumerate(
      _run(clipjax.adaptive_grad_clip(schedule), grads, 4, params=params)):
    c = float(schedule(t))
    # Each column is scaled to c times its parameter norm.
    want = np.array([[30.0, 3.0], [40.0, 4.0]]) * np.array([c * 5.0 / 50.0, c * 2.0 / 5.0])
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=F32_RTOL)
    np.testing.assert_allclose(float(state.stats.threshold), c, rtol=F32_RTOL)
