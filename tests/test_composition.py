"""The shared composition suite: every exported transform with optax, Flax and checkpoints.

Each transform of ``registry.ENTRIES`` is run through every case below; a case
checks values against a reference (the clipper and the optimizer applied one
after the other, the transform rebuilt with the new hyperparameter, the
clipper applied to the mean gradient, ...), not only that it runs. Jitted
functions are cached per transform and shared between cases, to keep the
suite's compile time small.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import clipjax
import registry
from _trees import assert_tree_close
from _trees import assert_tree_equal
from _trees import random_tree

RTOL = 1e-6  # float32
ATOL = 1e-7  # float32 results of order 0.1-10; a last-bit difference near zero
assert_close = functools.partial(assert_tree_close, rtol=RTOL, atol=ATOL)
ENTRIES = registry.ENTRIES

# The tiny model every case uses: a Flax Dense layer, 3 inputs, 2 outputs.
MODEL = nn.Dense(2)
_X = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
PARAMS = MODEL.init(jax.random.key(0), _X)
# Four gradients of the model's shape, growing to a spike, so every clipper clips at the end.
_SCALES = [3.0, 5.0, 4.0, 40.0]


GRADS = [random_tree(i + 1, jax.tree.map(np.shape, PARAMS), scale=s)
         for i, s in enumerate(_SCALES)]
OPTIMIZERS = {
    "sgd_momentum": optax.sgd(0.1, momentum=0.9),
    "adam": optax.adam(0.01),
    "adamw": optax.adamw(0.01, weight_decay=0.1),
    "rmsprop": optax.rmsprop(0.01),
    "adagrad": optax.adagrad(0.1),
}


# Cached transforms and jitted functions, shared between cases -----------------------


@functools.cache
def _tx(entry: registry.Entry) -> optax.GradientTransformation:
  return entry.build()


@functools.cache
def _update(entry: registry.Entry):
  """The transform's own jitted update: the reference most cases compare with."""
  return jax.jit(_tx(entry).update)


@functools.cache
def _optimizer_update(name: str):
  return jax.jit(OPTIMIZERS[name].update)


def _run(update, state, grads, params=PARAMS):
  for g in grads:
    _, state = update(g, state, params)
  return state


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _clipped(state) -> bool:
  """Whether some clipjax transform in ``state`` clipped on its last step."""
  return any(bool(v) for k, v in clipjax.clip_stats(state).items() if k.endswith("/clipped"))


# The registry -----------------------------------------------------------------------


def test_registry_covers_every_exported_transform():
  exported = registry.exported_transforms()
  assert {"clip", "clip_by_norm", "clip_by_global_norm", "clipped"} <= exported
  missing = exported - {entry.name for entry in ENTRIES}
  assert not missing, f"add these transforms to tests/registry.py: {sorted(missing)}"
  # And every entry names an exported transform.
  assert {e.name for e in ENTRIES} <= exported


@pytest.mark.parametrize("entry", registry.select(lambda e: e.needs_params), ids=str)
def test_transforms_that_need_params_say_so(entry):
  tx = _tx(entry)
  with pytest.raises(ValueError, match="params"):
    tx.update(GRADS[0], tx.init(PARAMS))


# optax.chain with optimizers -----------------------------------------------------------


@functools.cache
def _chain_steps(entry: registry.Entry):
  """Four jitted steps of ``chain(clipper, optimizer)`` for every optimizer at once.

  One program per transform for the five optimizers (five separate ones cost
  four times the compile time). Returns, per optimizer, the state before the
  last step and that step's updates and new state. optax's Adam raises a float
  to an int32 count, so this runs under standard promotion; the clipper's own
  code is held to strict promotion by the other cases.
  """
  chains = {name: optax.chain(_tx(entry), opt) for name, opt in OPTIMIZERS.items()}

  @jax.jit
  def step(g, states):
    return {name: chain.update(g, states[name], PARAMS) for name, chain in chains.items()}

  with jax.numpy_dtype_promotion("standard"):
    states = {name: chain.init(PARAMS) for name, chain in chains.items()}
    for g in GRADS[:3]:  # fill momenta and running statistics
      states = {name: new for name, (_, new) in step(g, states).items()}
    last = step(GRADS[3], states)
  return {name: (states[name], *last[name]) for name in chains}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_chain_with_optimizer_equals_clipper_then_optimizer(entry, optimizer):
  state, updates, new_state = _chain_steps(entry)[optimizer]
  assert _finite(updates)
  clipped, clip_state = _update(entry)(GRADS[3], state[0], PARAMS)
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam, as above
    expected, opt_state = _optimizer_update(optimizer)(clipped, state[1], PARAMS)
  assert_close(updates, expected)
  assert_close(new_state, (clip_state, opt_state))
  # The spike was clipped: the chain did not bypass the clipper.
  assert _clipped(new_state)


# optax.inject_hyperparams -----------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_inject_hyperparams_changes_take_effect_under_jit(entry):
  name, value = entry.hyper
  tx = optax.inject_hyperparams(entry.make, static_args=entry.static_args)(**entry.kwargs)
  step = jax.jit(tx.update)
  state = _run(step, tx.init(PARAMS), GRADS[:3])
  assert name in state.hyperparams
  old = state.hyperparams[name]
  state.hyperparams[name] = jnp.full_like(old, value)
  updates, new_state = step(GRADS[3], state, PARAMS)
  # Reference: the transform built with the new value, from the same inner state.
  direct = entry.build(**{name: value})
  expected, expected_inner = jax.jit(direct.update)(GRADS[3], state.inner_state, PARAMS)
  assert_tree_close(updates, expected, rtol=RTOL)
  assert_tree_close(new_state.inner_state, expected_inner, rtol=RTOL)
  # The change mattered: the unchanged transform gives another result.
  unchanged = _update(entry)(GRADS[3], state.inner_state, PARAMS)
  assert not all(np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(unchanged), jax.tree.leaves((updates, new_state.inner_state)), strict=True))
  if entry.bound is not None:  # a threshold: the updates now sit exactly on it, as reported
    np.testing.assert_allclose(entry.measure(updates, PARAMS), value, rtol=RTOL)
    thresholds = [v for k, v in clipjax.clip_stats(new_state).items() if k.endswith("/threshold")]
    assert thresholds and all(float(t) == np.float32(value) for t in thresholds)


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_inject_hyperparams_with_unchanged_values_equals_the_plain_transform(entry):
  plain = entry.build()
  injected = optax.inject_hyperparams(entry.make, static_args=entry.static_args)(**entry.kwargs)
  params = {"a": jnp.ones((3,)), "b": jnp.full((2, 2), 2.0)}
  rng = np.random.default_rng(8)
  p_state, i_state = plain.init(params), injected.init(params)
  p_update, i_update = jax.jit(plain.update), jax.jit(injected.update)
  n_clipped = 0
  for step in range(12):
    grads = random_tree(rng, {"a": (3,), "b": (2, 2)}, scale=20.0 if step in (6, 9) else 1.0)
    p_out, p_state = p_update(grads, p_state, params)
    i_out, i_state = i_update(grads, i_state, params)
    assert_tree_close(i_out, p_out, rtol=1e-6)
    n_clipped += _clipped(p_state)
  assert n_clipped > 0
  stats, expected = clipjax.clip_stats(i_state), clipjax.clip_stats(p_state)
  # Named after the transform (a wrapper: after the clipper it puts in front).
  names = {entry.name} if entry.inner is None else {k.split("/")[0] for k in expected}
  clipper_fields = {f"{n}/{f}" for n in names - {"skip_spikes"}
                    for f in ("norm", "threshold", "scale", "clipped", "finite")}
  if entry.groups:  # the total norm, and each group's statistics
    clipper_fields = {f"{entry.name}/norm"} | {
        name for f in ("norm", "threshold", "scale", "clipped", "finite")
        for name in entry.stat_names(f)}
  skip_fields = {f"skip_spikes/{f}" for f in ("norm", "loss", "threshold", "skipped", "skips")}
  assert set(stats) == clipper_fields | (skip_fields if entry.skips else set())
  assert_tree_close(stats, expected, rtol=1e-6)


# optax.MultiSteps -----------------------------------------------------------------------


@pytest.mark.loose_promotion  # optax.MultiSteps adds an int32 step count to float32 sums
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_multi_steps_clips_the_mean_gradient_every_fourth_step(entry):
  tx = optax.MultiSteps(_tx(entry), every_k_schedule=4)
  step = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for g in GRADS[:3]:
    updates, state = step(g, state, PARAMS)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(updates))
  updates, state = step(GRADS[3], state, PARAMS)
  assert int(state.gradient_step) == 1
  mean = jax.tree.map(lambda *g: jnp.asarray(np.mean(np.stack(g).astype(np.float64), 0),
                                             jnp.float32), *GRADS)
  expected, inner = _update(entry)(mean, _tx(entry).init(PARAMS), PARAMS)
  # MultiSteps averages in float32 as it goes: a few ulps from the float64 mean.
  assert_close(updates, expected, rtol=1e-5, atol=1e-6)
  assert_close(state.inner_opt_state, inner, rtol=1e-5, atol=1e-6)


# optax.masked ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_masked_leaves_pass_unchanged(entry):
  mask = {"params": {"bias": False, "kernel": True}}
  tx = optax.masked(_tx(entry), mask)
  step = jax.jit(tx.update)
  state = _run(step, tx.init(PARAMS), GRADS[:3])
  g = GRADS[3]
  updates, _ = step(g, state, PARAMS)
  np.testing.assert_array_equal(np.asarray(updates["params"]["bias"]),
                                np.asarray(g["params"]["bias"]))
  # The kernel is clipped as if it were the whole tree, from the same inner state.
  sub = {"params": {"kernel": g["params"]["kernel"]}}
  sub_params = {"params": {"kernel": PARAMS["params"]["kernel"]}}
  expected, _ = jax.jit(_tx(entry).update)(sub, state.inner_state, sub_params)
  np.testing.assert_allclose(np.asarray(updates["params"]["kernel"]),
                             np.asarray(expected["params"]["kernel"]), rtol=RTOL, atol=ATOL)
  assert not np.allclose(np.asarray(updates["params"]["kernel"]),
                         np.asarray(g["params"]["kernel"]))


# optax.apply_if_finite ---------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_apply_if_finite_skips_a_nan_step_without_advancing_the_clipper(entry):
  tx = optax.apply_if_finite(_tx(entry), max_consecutive_errors=3)
  step = jax.jit(tx.update)
  _, state = step(GRADS[0], tx.init(PARAMS), PARAMS)
  before = state.inner_state
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), GRADS[1])
  updates, state = step(bad, state, PARAMS)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
  assert_tree_equal(state.inner_state, before)
  # The next finite step continues from the state before the NaN step.
  updates, state = step(GRADS[2], state, PARAMS)
  expected, inner = _update(entry)(GRADS[2], before, PARAMS)
  assert_close(updates, expected)
  assert_close(state.inner_state, inner)


# Flax TrainState -------------------------------------------------------------------------

_Y = jnp.asarray(np.random.default_rng(1).normal(size=(5, 2)) * 30.0, jnp.float32)


def _loss(params, apply_fn):
  return jnp.mean((apply_fn(params, _X) - _Y) ** 2)


@jax.jit
def _train_step(state):
  return state.apply_gradients(grads=jax.grad(_loss)(state.params, state.apply_fn))


@pytest.mark.loose_promotion  # flax.linen.Dense promotes its inputs implicitly
@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_flax_train_state_step(entry):
  tx = optax.chain(_tx(entry), optax.sgd(0.1))
  state = train_state.TrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=tx)
  new = _train_step(state)
  assert int(new.step) == 1
  grads = jax.jit(jax.grad(_loss), static_argnums=1)(PARAMS, MODEL.apply)
  clipped, clip_state = _update(entry)(grads, state.opt_state[0], PARAMS)
  expected = jax.tree.map(lambda p, u: p - 0.1 * u, PARAMS, clipped)
  assert_close(new.params, expected)
  assert_close(new.opt_state[0], clip_state)


# Checkpoints: flatten / unflatten, a round trip through NumPy ---------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_state_survives_flatten_and_numpy_round_trip(entry):
  step = _update(entry)
  state = _run(step, _tx(entry).init(PARAMS), GRADS[:2])
  leaves, treedef = jax.tree.flatten(state)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  as_numpy = jax.tree.map(np.asarray, state)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(as_numpy))
  restored = jax.tree.map(jnp.asarray, as_numpy)
  assert jax.tree.structure(restored) == treedef
  expected = step(GRADS[2], state, PARAMS)
  assert_tree_equal(step(GRADS[2], rebuilt, PARAMS), expected)
  assert_tree_equal(step(GRADS[2], restored, PARAMS), expected)


# jit with donated buffers -------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=str)
def test_jit_with_donated_state_and_updates(entry):
  tx = _tx(entry)
  state = _run(_update(entry), tx.init(PARAMS), GRADS[:2])
  expected = _update(entry)(GRADS[2], state, PARAMS)
  copy = functools.partial(jax.tree.map, jnp.copy)
  grads, donated_state = copy(GRADS[2]), copy(state)
  donating = jax.jit(tx.update, donate_argnums=(0, 1))
  result = donating(grads, donated_state, PARAMS)
  assert_tree_equal(result, expected)
  assert all(x.is_deleted() for x in jax.tree.leaves(grads))
  # The donated input is consumed; the next step runs from the returned state.
  assert_tree_equal(donating(copy(GRADS[3]), result[1], PARAMS),
                    _update(entry)(GRADS[3], expected[1], PARAMS))


# clipped(): Keras' clipnorm, clipvalue and global_clipnorm ----------------------------------


def _keras_np(option, c, grads):
  """Keras' rules in float64: per variable, per element, or over all variables."""
  g = [np.asarray(x, np.float64) for x in grads]
  if option == "clipnorm":
    return [x * c / max(np.linalg.norm(x.ravel()), c) for x in g]
  if option == "clipvalue":
    return [np.clip(x, -c, c) for x in g]
  total = np.sqrt(sum(np.sum(x * x) for x in g))
  return [x * c / max(total, c) for x in g]


@pytest.mark.parametrize("option, name", list(registry.CLIPPED_OPTIONS.items()))
def test_clipped_follows_keras(option, name):
  grads = [jnp.array([3.0, -4.0, 12.0]), jnp.array([[0.5, -0.25], [0.1, 0.2]])]
  params = [jnp.zeros(3), jnp.zeros((2, 2))]
  tx = clipjax.clipped(optax.sgd(0.5), **{option: 2.0})
  state = tx.init(params)
  assert len(state) == 2  # optax.chain(clipper, sgd)
  updates, state = jax.jit(tx.update)(grads, state, params)
  for got, want in zip(updates, _keras_np(option, 2.0, grads), strict=True):
    np.testing.assert_allclose(np.asarray(got), -0.5 * want, rtol=RTOL)
  stats = clipjax.clip_stats(state)
  assert bool(stats[f"{name}/clipped"]) and float(stats[f"{name}/threshold"]) == 2.0


def test_clipped_without_options_returns_the_optimizer_itself():
  tx = optax.adam(0.1)
  assert clipjax.clipped(tx) is tx
  assert clipjax.clipped(tx, clipnorm=None, clipvalue=None, global_clipnorm=None) is tx


@pytest.mark.parametrize("options", [
    {"clipnorm": 1.0, "clipvalue": 0.5},
    {"clipnorm": 1.0, "global_clipnorm": 1.0},
    {"clipvalue": 0.5, "global_clipnorm": 2.0},
    {"clipnorm": 1.0, "clipvalue": 0.5, "global_clipnorm": 2.0},
])
def test_clipped_rejects_more_than_one_option(options):
  shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
  with pytest.raises(ValueError, match=f"at most one of .*; got {shown}$"):
    clipjax.clipped(optax.sgd(0.1), **options)


@pytest.mark.parametrize("option", list(registry.CLIPPED_OPTIONS))
def test_clipped_names_the_option_in_errors(option):
  with pytest.raises(ValueError, match=f"^{option}=-1.0 must be >= 0$"):
    clipjax.clipped(optax.sgd(0.1), **{option: -1.0})
