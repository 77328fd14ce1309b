"""Healthy inputs run under ``jax_debug_nans`` and ``jax_debug_infs``: no NaN or inf sentinel.

Both flags make JAX check the output of every primitive run eagerly and of
every jitted call, and raise ``FloatingPointError`` at the first NaN (inf).
A NaN or inf constant in the package (a sentinel in a state, a statistic
meaning "none", a select whose unchosen side is NaN) trips them on inputs a
user would call healthy. Every transform of the registry runs here, eagerly
and under ``jit``, init and several updates, with the flags on; the flags are
switched back whatever happens.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
import registry
from _trees import ORDS

FLAGS = {"nans": (jax.debug_nans,), "infs": (jax.debug_infs,),
         "both": (jax.debug_nans, jax.debug_infs)}


@pytest.fixture(params=list(FLAGS))
def debug_checks(request):
  """Switches the debug flags on for the test and restores them after it, pass or fail."""
  before = (jax.config.jax_debug_nans, jax.config.jax_debug_infs)
  with contextlib.ExitStack() as stack:
    for flag in FLAGS[request.param]:
      stack.enter_context(flag(True))
    yield request.param
  assert (jax.config.jax_debug_nans, jax.config.jax_debug_infs) == before


def _grads(scale: float) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  return {"b": jnp.asarray(scale * rng.standard_normal(3), jnp.float32),
          "w": jnp.asarray(scale * rng.standard_normal((4, 3)), jnp.float32)}


PARAMS = jax.tree.map(lambda g: g + 1.0, _grads(1.0))
# Ordinary steps, a zero step (frozen parameters: healthy too), a spike, ordinary again.
SCALES = (1.0, 1.2, 0.9, 0.0, 1.1, 40.0, 1.0, 0.8)


def _steps(tx, jit: bool, **extra):
  init = jax.jit(tx.init) if jit else tx.init
  update = jax.jit(tx.update) if jit else tx.update
  state = init(PARAMS)
  for scale in SCALES:
    updates, state = update(_grads(scale), state, PARAMS, **extra)
  jax.block_until_ready((updates, state))
  return updates, state


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("entry", registry.ENTRIES, ids=str)
def test_every_transform_runs_clean(entry, jit, debug_checks):
  del debug_checks
  _, state = _steps(entry.build(), jit)
  for name, value in clipjax.clip_stats(state).items():
    assert np.all(np.isfinite(np.asarray(value, np.float64))), name


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kwargs", [{}, {"loss": 2.0}, {"value": 2.0}],
                         ids=["no_loss", "loss", "value"])
def test_skip_spikes_with_and_without_a_loss(kwargs, jit, debug_checks):
  del debug_checks
  tx = clipjax.skip_spikes(optax.chain(clipjax.zclip(warmup_steps=2), optax.sgd(0.1, momentum=0.9)),
                           window=4, min_history=2, max_norm=1e3, max_consecutive=2,
                           count_skipped=True, on_nonfinite="raise")
  extra = {key: jnp.float32(value) for key, value in kwargs.items()}
  _, state = _steps(tx, jit, **extra)
  assert int(state.skips) >= 1  # the spike was skipped


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("ord", ORDS)
def test_torch_style_functions_and_global_norm(ord, jit, debug_checks):  # noqa: A002
  del debug_checks
  grads = _grads(3.0)

  def run(grads):
    clipped, norm = clipjax.clip_grad_norm(grads, 1.0, norm_type=ord, error_if_nonfinite=True)
    return (clipped, norm, clipjax.clip_grad_value(grads, 0.5),
            clipjax.global_norm(grads, ord), clipjax.global_norm(grads, ord))

  out = (jax.jit(run) if jit else run)(grads)
  jax.block_until_ready(out)
  assert float(out[1]) == pytest.approx(float(out[3]))


def test_the_flags_are_off_outside_the_tests():
  assert not jax.config.jax_debug_nans and not jax.config.jax_debug_infs


def test_sharded_max_and_floor_make_no_nan_or_inf(debug_checks):
  """The NaN-keeping pmax and clip's smallest magnitude on healthy input, under shard_map."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
  grads = {"a": jnp.array([0.0, 1e-3, -3.0, 2.0]), "b": jnp.zeros(4)}
  tx = clipjax.clip(1.0, min_delta=0.01, axis_name="d")
  spec = jax.sharding.PartitionSpec("d")
  step = jax.jit(jax.shard_map(lambda g: tx.update(g, tx.init(g))[1].stats.norm, mesh=mesh,
                               in_specs=(spec,), out_specs=jax.sharding.PartitionSpec()))
  assert float(step(grads)) == 3.0
  eager, _ = clipjax.clip(1.0, min_delta=0.01).update(grads, None)
  np.testing.assert_array_equal(eager["a"], np.float32([0.0, 0.01, -1.0, 1.0]))
