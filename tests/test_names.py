"""``name=``: the prefix of a transform's statistics in ``clip_stats``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax

# Every transform with statistics, built with typical arguments and an optional name.
FACTORIES = {
    "clip": lambda **kw: clipjax.clip(0.5, **kw),
    "clip_by_norm": lambda **kw: clipjax.clip_by_norm(1.0, **kw),
    "clip_by_global_norm": lambda **kw: clipjax.clip_by_global_norm(1.0, **kw),
    "clip_by_block_rms": lambda **kw: clipjax.clip_by_block_rms(0.5, **kw),
    "adaptive_grad_clip": lambda **kw: clipjax.adaptive_grad_clip(0.1, **kw),
    "autoclip": lambda **kw: clipjax.autoclip(50.0, history=4, **kw),
    "zclip": lambda **kw: clipjax.zclip(warmup_steps=2, **kw),
    "adagc": lambda **kw: clipjax.adagc(warmup_steps=2, **kw),
    "quantile_clip": lambda **kw: clipjax.quantile_clip(**kw),
    "skip_spikes": lambda **kw: clipjax.skip_spikes(optax.sgd(0.1), window=4, **kw),
    "clip_by_group_norm": lambda **kw: clipjax.clip_by_group_norm(
        {"matrix": 1.0, "vector": None}, {"w": "matrix", "b": "vector"}, **kw),
    "clip_by_rolling_norm": lambda **kw: clipjax.clip_by_rolling_norm(4, min_history=2, **kw),
    "stable_spam_clip": lambda **kw: clipjax.stable_spam_clip(**kw),
}
GRADS = {"w": jnp.asarray(np.arange(6.0).reshape(2, 3) - 2.0, jnp.float32),
         "b": jnp.asarray([3.0, -4.0, 0.5], jnp.float32)}


def _scan_stats(tx, steps=5):
  """clip_stats after ``steps`` updates in a jitted scan: init and update give one state type."""

  @jax.jit
  def run(grads):
    def step(state, scale):
      _, state = tx.update(jax.tree.map(lambda g: g * scale, grads), state, grads)
      return state, None

    state, _ = jax.lax.scan(step, tx.init(grads), jnp.linspace(1.0, 3.0, steps))
    return clipjax.clip_stats(state)

  return run(GRADS)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_name_prefixes_the_statistics(kind):
  default, named = _scan_stats(FACTORIES[kind]()), _scan_stats(FACTORIES[kind](name="enc"))
  assert default and all(key.startswith(f"{kind}/") for key in default)
  assert sorted(named) == sorted(key.replace(f"{kind}/", "enc/", 1) for key in default)
  for key, value in default.items():
    np.testing.assert_array_equal(np.asarray(named[key.replace(f"{kind}/", "enc/", 1)]),
                                  np.asarray(value))


def test_two_clippers_of_one_kind_in_multi_transform():
  tx = optax.multi_transform(
      {"enc": clipjax.clip_by_global_norm(1.0, name="encoder"),
       "dec": clipjax.clip_by_global_norm(2.0, name="decoder")},
      {"w": "enc", "b": "dec"})
  _, state = tx.update(GRADS, tx.init(GRADS))
  stats = clipjax.clip_stats(state)
  np.testing.assert_allclose(float(stats["encoder/norm"]), np.linalg.norm(np.asarray(GRADS["w"])),
                             rtol=1e-6)
  np.testing.assert_allclose(float(stats["decoder/norm"]), np.linalg.norm(np.asarray(GRADS["b"])),
                             rtol=1e-6)
  assert float(stats["encoder/threshold"]) == 1.0 and float(stats["decoder/threshold"]) == 2.0


def test_same_name_twice_is_indexed_and_clipped_takes_a_name():
  tx = optax.chain(clipjax.clip(1.0, name="c"), clipjax.clipped(optax.sgd(1.0), clipvalue=0.5,
                                                                name="c"))
  _, state = tx.update(GRADS, tx.init(GRADS))
  assert {"c_0/norm", "c_1/norm"} <= set(clipjax.clip_stats(state))


@pytest.mark.parametrize("bad", ["", "a/b", 3])
def test_bad_names_are_rejected(bad):
  with pytest.raises(ValueError, match="name="):
    clipjax.clip_by_norm(1.0, name=bad)
