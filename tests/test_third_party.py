"""clipjax called the way third-party training code calls optax's clippers.

The patterns are those of public trainers and checkpoint libraries, written here
from their documented call shapes: MaxText's ``apply_gradient_clipping`` (a clipper
updated with the trainer's own ``TrainState`` as its state), stateless calls with
``optax.EmptyState()`` or ``()``, ``skip_spikes`` given the loss as ``loss=`` (MaxText,
OLMo-core), and every way a checkpoint stores and restores an optimizer state.
"""

import copy
import pickle

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from flax.training import train_state

import clipjax
import registry

# optax's and Flax's own code mixes int32 counters and floats.
pytestmark = pytest.mark.loose_promotion

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, "scale": jnp.ones(3)}
GRADS = {"dense": {"kernel": jnp.arange(6.0).reshape(3, 2) - 2.5,
                   "bias": jnp.array([4.0, -3.0])}, "scale": jnp.array([0.5, 0.0, -9.0])}

FOREIGN_STATES = {
    "none": None,
    "empty": optax.EmptyState(),
    "tuple": (),
    "adam": optax.adam(1e-3).init(PARAMS),
}


def _same_tree(got, expected):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _same_stats(got, expected):
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    assert np.asarray(got[name]).dtype == np.asarray(value).dtype, name
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)


# MaxText: the clipper's state is the trainer's TrainState -------------------------------


def _train_state():
  return train_state.TrainState.create(apply_fn=lambda *a: None, params=PARAMS,
                                       tx=optax.adamw(1e-3))


def _maxtext_clip(make):
  """MaxText's ``apply_gradient_clipping``: ``update(raw_grads, state, None)``, state dropped."""

  @jax.jit
  def apply_gradient_clipping(raw_grads, state):
    grads, _ = make(1.0).update(raw_grads, state, None)
    return grads

  return apply_gradient_clipping


@pytest.mark.parametrize("name", ["clip_by_global_norm", "clip", "clip_by_block_rms"])
def test_maxtext_apply_gradient_clipping_with_a_train_state(name):
  state = _train_state()
  got = _maxtext_clip(getattr(clipjax, name))(GRADS, state)
  twin = getattr(optax, name)(1.0)
  expected, _ = twin.update(GRADS, twin.init(PARAMS), None)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("foreign", FOREIGN_STATES, ids=str)
@pytest.mark.parametrize("entry", registry.FIXED + [registry.by_name("adaptive_grad_clip")],
                         ids=str)
def test_a_fixed_threshold_ignores_a_state_it_did_not_make(entry, foreign):
  tx = entry.build()
  params = PARAMS if entry.needs_params else None
  expected_updates, expected_state = tx.update(GRADS, tx.init(PARAMS), params)
  updates, state = tx.update(GRADS, FOREIGN_STATES[foreign], params)
  _same_tree(updates, expected_updates)
  # Its own state comes back, one step on, whatever it was given.
  _same_tree(state, expected_state)


def test_a_foreign_state_of_a_stateful_clipper_names_the_state_class():
  for entry in registry.STATEFUL:
    tx = entry.build()
    for foreign in FOREIGN_STATES.values():
      with pytest.raises(ValueError, match=r"State.*tx\.init\(params\)"):
        tx.update(GRADS, foreign)
  scheduled = clipjax.clip_by_global_norm(optax.linear_schedule(2.0, 1.0, 10))
  with pytest.raises(ValueError, match="ClipByGlobalNormState.*step count"):
    scheduled.update(GRADS, optax.EmptyState())


# skip_spikes given the loss as loss= -----------------------------------------------------


def test_skip_spikes_reads_loss_as_maxtext_and_olmo_core_pass_it():
  tx = clipjax.skip_spikes(optax.sgd(1.0), sigma_factor=3.0, window=8, min_history=4)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  for loss in [2.0, 2.1, 1.9, 2.05]:
    _, state = step(GRADS, state, PARAMS, loss=loss)
  updates, state = step(GRADS, state, PARAMS, loss=50.0)  # a loss spike, the same gradients
  assert bool(state.stats.skipped)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert float(state.stats.loss) == 50.0
  with pytest.raises(ValueError, match="loss"):
    tx.update(GRADS, state, PARAMS, loss=1.0, value=1.0)


# Checkpoints ----------------------------------------------------------------------------


def _every_transform():
  """One optimizer holding every registry transform, plain, named and wrapped."""
  parts = []
  for entry in registry.ENTRIES:
    parts += [entry.build(), entry.build(name=f"my_{entry.name}")]
  inner = optax.chain(clipjax.zclip(warmup_steps=2, name="inner_zclip"), optax.adamw(1e-3))
  parts += [
      clipjax.skip_spikes(inner, window=4, min_history=2),
      optax.MultiSteps(optax.chain(clipjax.clip_by_norm(0.5, leaf_stats=True),
                                   optax.sgd(0.1)), every_k_schedule=1).gradient_transformation(),
      optax.inject_hyperparams(clipjax.clip_by_global_norm)(max_norm=2.0),
  ]
  return optax.chain(*parts)


@pytest.fixture(scope="module")
def trained():
  """The optimizer's state after two steps, and its statistics."""
  tx = _every_transform()
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  for scale in (1.0, 3.0):
    _, state = step(jax.tree.map(lambda g: g * scale, GRADS), state, PARAMS)
  stats = clipjax.clip_stats(state)
  return tx, state, stats


def test_the_state_holds_every_transform_by_name(trained):
  _, _, stats = trained
  names = {key.split("/")[0] for key in stats}
  for entry in registry.ENTRIES:
    assert f"my_{entry.name}" in names
  assert "inner_zclip" in names
  assert {"skip_spikes_0", "skip_spikes_1", "clip_by_norm_0", "clip_by_norm_1"} <= names
  assert "clip_by_norm_1/leaf_norms/dense/kernel" in stats
  # The injected one is the last of its name.
  last = max(int(key.split("/")[0].rsplit("_", 1)[1]) for key in stats
             if key.startswith("clip_by_global_norm_"))
  assert float(stats[f"clip_by_global_norm_{last}/threshold"]) == 2.0


@pytest.mark.parametrize("route", ["pickle", "deepcopy", "cloudpickle"])
def test_copies_keep_the_state(trained, route):
  _, state, stats = trained
  copied = {"pickle": lambda s: pickle.loads(pickle.dumps(s)),
            "deepcopy": copy.deepcopy,
            "cloudpickle": lambda s: cloudpickle.loads(cloudpickle.dumps(s))}[route](state)
  _same_tree(copied, state)
  _same_stats(clipjax.clip_stats(copied), stats)


def test_flax_state_dict_and_msgpack(trained):
  tx, state, stats = trained
  data = serialization.to_bytes(state)
  # Without a target: nested dicts, the statistics' names unchanged.
  _same_stats(clipjax.clip_stats(serialization.msgpack_restore(data)), stats)
  _same_stats(clipjax.clip_stats(serialization.to_state_dict(state)), stats)
  # With a target: the classes back, and training goes on.
  restored = serialization.from_bytes(tx.init(PARAMS), data)
  _same_tree(restored, state)
  _same_stats(clipjax.clip_stats(restored), stats)
  tx.update(GRADS, restored, PARAMS)


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring:UserWarning")
@pytest.mark.filterwarnings("ignore:.*Couldn't find sharding info:UserWarning")
def test_orbax_with_and_without_a_target(trained, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx, state, stats = trained
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  _same_stats(clipjax.clip_stats(checkpointer.restore(tmp_path / "state")), stats)
  restored = checkpointer.restore(tmp_path / "state", tx.init(PARAMS))
  _same_stats(clipjax.clip_stats(restored), stats)
  tx.update(GRADS, restored, PARAMS)


def test_nnx_optimizer_state(trained):
  from flax import nnx

  tx, _, _ = trained
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 3))) ** 2))(model)
  optimizer.update(model, grads)
  live = clipjax.clip_stats(optimizer.opt_state)
  assert "skip_spikes_1/norm" in live and "my_adaptive_grad_clip/norm" in live
  _same_stats(clipjax.clip_stats(nnx.state(optimizer)), live)
  _same_stats(clipjax.clip_stats(nnx.to_pure_dict(nnx.state(optimizer))), live)
