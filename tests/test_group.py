"""clip_by_group_norm against per-group float64 NumPy norms, on one device and across eight."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax
from _dist_cases import compiled_texts
from _dist_cases import count_all_gather
from _dist_cases import count_all_reduce
from _dist_cases import count_lowered_all_reduce
from _dist_cases import place
from _trees import ORDS
from _trees import assert_tree_close
from _trees import np_norm
from _trees import random_tree

RTOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
SHAPES = {"attn": (6, 4), "mlp": (4, 5), "expert": (3, 4, 2), "bias": (4,), "scale": ()}
LABELS = {"attn": "dense", "mlp": "dense", "expert": "experts", "bias": "other",
          "scale": "other"}
FIELDS = ("norm", "threshold", "scale", "clipped", "finite")


def np_group_clip(grads, labels, max_norms, ord=2):
  """The rule in float64: each group scaled by ``max / max(norm, max)``; per-group norms."""
  out, norms = {}, {}
  for label, high in max_norms.items():
    members = {k: v for k, v in grads.items() if labels[k] == label}
    norm = np_norm(members, ord)
    norms[label] = norm
    scale = high / norm if high is not None and norm > high else 1.0
    out.update({k: np.asarray(v, np.float64) * scale for k, v in members.items()})
  return out, norms


def _grads(seed=0, dtype=jnp.float32):
  return random_tree(seed, SHAPES, dtype, scale=[3.0, 2.0, 1.0, 0.5, 4.0])


@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize("ord", ORDS)
def test_each_group_is_clipped_by_its_own_norm(ord, dtype):
  grads = _grads(0, dtype)
  _, norms = np_group_clip(grads, LABELS, {"dense": None, "experts": None, "other": None}, ord)
  # dense clipped, experts above its bound's reach (untouched), other measured only.
  max_norms = {"dense": 0.5 * norms["dense"], "experts": 2.0 * norms["experts"], "other": None}
  tx = clipjax.clip_by_group_norm(max_norms, LABELS, ord=ord)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  expected, _ = np_group_clip(grads, LABELS, max_norms, ord)
  for key in SHAPES:
    assert updates[key].dtype == dtype
    np.testing.assert_allclose(np.asarray(updates[key], np.float64), expected[key],
                               rtol=RTOL[dtype], err_msg=key)
  np.testing.assert_array_equal(updates["expert"], grads["expert"])
  np.testing.assert_array_equal(updates["bias"], grads["bias"])
  stats = clipjax.clip_stats(state)
  assert set(stats) == {"clip_by_group_norm/norm"} | {
      f"clip_by_group_norm/{label}/{field}" for label in max_norms for field in FIELDS}
  for label, norm in norms.items():
    np.testing.assert_allclose(float(stats[f"clip_by_group_norm/{label}/norm"]), norm,
                               rtol=2e-6)
  np.testing.assert_allclose(float(stats["clip_by_group_norm/norm"]), np_norm(grads, ord),
                             rtol=2e-6)
  assert [bool(stats[f"clip_by_group_norm/{g}/clipped"]) for g in ("dense", "experts", "other")
          ] == [True, False, False]
  # Measured, not clipped: no threshold, reported as float32's maximum.
  assert float(stats["clip_by_group_norm/other/threshold"]) == np.finfo(np.float32).max
  np.testing.assert_allclose(float(stats["clip_by_group_norm/dense/scale"]), 0.5, rtol=2e-6)


def test_labels_from_a_callable_a_prefix_and_one_threshold_for_all():
  grads = {"enc": {"w": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])},
           "dec": {"w": jnp.array([6.0, 8.0])}}
  prefix = {"enc": "enc", "dec": "dec"}  # one label per subtree, as optax.multi_transform
  def by_fn(tree):
    return {"enc": jax.tree.map(lambda _: "enc", tree["enc"]), "dec": {"w": "dec"}}

  for labels in (prefix, by_fn):
    tx = clipjax.clip_by_group_norm(1.0, labels)
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(np_norm(updates["enc"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np_norm(updates["dec"]), 1.0, rtol=1e-6)
    assert sorted(state.stats) == ["dec", "enc", "norm"]


def test_a_label_missing_from_max_norms_is_named():
  with pytest.raises(ValueError, match="label 'other', which max_norms does not name"):
    clipjax.clip_by_group_norm({"dense": 1.0, "experts": None}, LABELS)
  tx = clipjax.clip_by_group_norm({"dense": 1.0, "experts": None}, lambda tree: LABELS)
  with pytest.raises(ValueError, match="label 'other', which max_norms does not name"):
    tx.update(_grads(), tx.init(None))


@pytest.mark.parametrize("bad,match", [
    ({"dense": -1.0}, r"max_norms\['dense'\]=-1.0 must be >= 0"),
    ({"a/b": 1.0}, "max_norms key='a/b'"),
    ({"norm": 1.0}, "max_norms key='norm'"),
    (-2.0, "max_norms=-2.0 must be >= 0"),
])
def test_bad_thresholds_are_named(bad, match):
  with pytest.raises(ValueError, match=match):
    clipjax.clip_by_group_norm(bad, lambda tree: tree)


def test_a_label_without_a_threshold_no_leaf_has_is_reported_with_norm_zero():
  tx = clipjax.clip_by_group_norm({"dense": 1.0, "experts": 1.0, "other": 1.0, "spare": 1.0},
                                  LABELS)
  _, state = tx.update(_grads(), tx.init(None))
  assert float(state.stats["spare"].norm) == 0.0 and not bool(state.stats["spare"].clipped)


def test_schedules_follow_the_transforms_own_step_count():
  grads = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([5.0, 12.0])}
  tx = clipjax.clip_by_group_norm({"a": optax.linear_schedule(4.0, 1.0, 3), "b": 2.0},
                                  {"a": "a", "b": "b"})
  state = tx.init(grads)
  with pytest.raises(ValueError, match="thread"):
    tx.update(grads, None)
  for expected in (4.0, 3.0, 2.0, 1.0, 1.0):
    updates, state = tx.update(grads, state)
    np.testing.assert_allclose(np_norm(updates["a"]), expected, rtol=1e-6)
    np.testing.assert_allclose(np_norm(updates["b"]), 2.0, rtol=1e-6)
    assert float(state.stats["a"].threshold) == pytest.approx(expected)


def test_a_non_finite_group_passes_through_and_the_others_are_clipped():
  grads = _grads(1)
  grads["expert"] = grads["expert"].at[0, 0, 0].set(jnp.nan)
  tx = clipjax.clip_by_group_norm({"dense": 0.1, "experts": 0.1, "other": 0.1}, LABELS)
  updates, state = tx.update(grads, tx.init(None))
  np.testing.assert_array_equal(updates["expert"], grads["expert"])
  assert not bool(state.stats["experts"].finite) and bool(state.stats["dense"].finite)
  np.testing.assert_allclose(np_norm({k: updates[k] for k in ("attn", "mlp")}), 0.1, rtol=1e-6)


def test_zero_groups_stay_zero_with_a_zero_threshold():
  grads = jax.tree.map(jnp.zeros_like, _grads())
  tx = clipjax.clip_by_group_norm({"dense": 0.0, "experts": 0.0, "other": None}, LABELS)
  updates, state = tx.update(grads, tx.init(None))
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, 0.0)
  assert all(bool(s.finite) for k, s in state.stats.items() if k != "norm")


def test_statistics_survive_msgpack_and_chain_in_front_of_multi_transform():
  grads = _grads(2)
  max_norms = {"dense": 1.0, "experts": 0.5, "other": None}
  tx = optax.chain(
      clipjax.clip_by_group_norm(max_norms, LABELS, name="groups"),
      optax.multi_transform({"dense": optax.sgd(1.0), "experts": optax.sgd(0.5),
                             "other": optax.set_to_zero()}, LABELS))
  _, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
  live = clipjax.clip_stats(state)
  restored = clipjax.clip_stats(serialization.msgpack_restore(serialization.msgpack_serialize(
      serialization.to_state_dict(state))))
  assert sorted(live) == sorted(restored) and "groups/experts/clipped" in live
  for key in live:
    np.testing.assert_array_equal(np.asarray(live[key]), np.asarray(restored[key]))


# Across devices --------------------------------------------------------------------

DIST_SHAPES = {"kernel": (16, 6), "proj": (8, 24), "expert": (8, 3, 2), "bias": (6,),
               "gain": ()}
DIST_LABELS = {"kernel": "dense", "proj": "dense", "expert": "experts", "bias": "other",
               "gain": "other"}
DIST_SPECS = {"kernel": P("d"), "proj": P(None, "d"), "expert": P("d"), "bias": P(),
              "gain": P()}
REPLICATED = {"kernel": False, "proj": False, "expert": False, "bias": True, "gain": True}


@pytest.mark.parametrize("ord", ORDS)
def test_shard_map_equals_unsharded_with_one_all_reduce(ord):
  mesh = jax.make_mesh((8,), ("d",))
  steps = [random_tree(s, DIST_SHAPES, scale=[1.0, 2.0, 3.0, 20.0, 5.0]) for s in range(3)]
  _, norms = np_group_clip(steps[0], DIST_LABELS, {"dense": 1, "experts": 1, "other": 1}, ord)
  max_norms = {"dense": 0.5 * norms["dense"], "experts": 0.5 * norms["experts"],
               "other": None}
  plain = clipjax.clip_by_group_norm(max_norms, DIST_LABELS, ord=ord)
  sharded = clipjax.clip_by_group_norm(max_norms, DIST_LABELS, ord=ord, axis_name="d",
                                       replicated=REPLICATED)
  f = jax.shard_map(sharded.update, mesh=mesh, in_specs=(DIST_SPECS, P()),
                    out_specs=(DIST_SPECS, P()))
  state = jax.device_put(sharded.init(steps[0]), NamedSharding(mesh, P()))
  lowered, compiled = compiled_texts(f, place(steps[0], DIST_SPECS, mesh), state)
  assert count_lowered_all_reduce(lowered) == 1
  assert count_all_reduce(compiled) == 1, compiled
  assert count_all_gather(compiled) == 0
  step, plain_state = jax.jit(f), plain.init(steps[0])
  for grads in steps:
    updates, state = step(place(grads, DIST_SPECS, mesh), state)
    expected, plain_state = jax.jit(plain.update)(grads, plain_state)
    assert_tree_close(jax.device_get(updates), expected, rtol=1e-5, atol=1e-30)
    assert_tree_close(jax.device_get(state), plain_state, rtol=1e-5, atol=1e-30)
    reference, group_norms = np_group_clip(grads, DIST_LABELS, max_norms, ord)
    for label, norm in group_norms.items():
      np.testing.assert_allclose(float(state.stats[label].norm), norm, rtol=1e-5)
    for key in DIST_SHAPES:
      np.testing.assert_allclose(np.asarray(updates[key], np.float64), reference[key],
                                 rtol=1e-5)
  assert bool(state.stats["dense"].clipped)
