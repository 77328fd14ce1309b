"""Meshes of one, two and three axes, with no ``replicated``: each leaf's type says it.

Inside ``shard_map`` a leaf's type records the mesh axes it varies over. On a 1-D
mesh, a 2×2 (``fsdp``, ``tp``) mesh and a 2×2×2 (``data``, ``fsdp``, ``tp``) mesh,
with leaves sharded over both axes, one of them, neither, and an expert-sharded
MoE leaf, every clipper with ``axis_name`` and every norm must give what it gives
on the unsharded arrays and under plain ``jit`` over the sharded arrays (GSPMD),
with one all-reduce per update. ``replicated`` still serves where the types
record nothing (``check_vma=False``), and contradicting the type is an error.

Explicit sharding (``AxisType.Explicit``) with ``layer_axis`` on a leaf sharded
along its layer axis is tested at the end.
"""

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax
import registry
from _dist_cases import assert_close
from _dist_cases import bundle
from _dist_cases import count_lowered_all_reduce
from _dist_cases import groups
from _dist_cases import make
from _dist_cases import place
from _dist_cases import run_unsharded
from _dist_cases import side_by_side
from _dist_cases import step_trees
from _dist_cases import threshold_for
from _trees import ORDS
from _trees import np_leaf_norms
from _trees import np_norm
from _trees import np_unit_norms

GROUPS = groups()
SEED = 30

# Leaves as a transformer shards them: a kernel over FSDP and TP, a norm scale over
# FSDP only, a head over TP rows, a projection over TP columns, an unsharded bias,
# an embedding over data and FSDP, and MoE experts (E, d, f) over an expert axis.
SHAPES = {"kernel": (8, 8), "norm": (8,), "head": (4, 6), "proj": (6, 4), "bias": (5,),
          "embed": (8, 4), "experts": (8, 2, 6)}
MESHES = {"1d": ((8,), ("fsdp",)), "2x2": ((2, 2), ("fsdp", "tp")),
          "2x2x2": ((2, 2, 2), ("data", "fsdp", "tp"))}
SPECS = {
    "1d": {"kernel": P("fsdp"), "norm": P("fsdp"), "head": P(), "proj": P(), "bias": P(),
           "embed": P("fsdp"), "experts": P("fsdp")},
    "2x2": {"kernel": P("fsdp", "tp"), "norm": P("fsdp"), "head": P("tp"),
            "proj": P(None, "tp"), "bias": P(), "embed": P("fsdp"),
            "experts": P("fsdp", None, "tp")},
    # "data" doubles as the expert axis: each expert lives on one half of the mesh.
    "2x2x2": {"kernel": P("fsdp", "tp"), "norm": P("fsdp"), "head": P("tp"),
              "proj": P(None, "tp"), "bias": P(), "embed": P(("data", "fsdp")),
              "experts": P("data", None, "tp")},
}
# AGC sums each unit over its shards, so its leaves are sharded along unit axes only
# (axis 0 of every leaf here), over one, two or three mesh axes, or none.
AGC_SPECS = {
    "1d": {"kernel": P("fsdp"), "norm": P("fsdp"), "head": P(), "proj": P(), "bias": P(),
           "embed": P("fsdp"), "experts": P("fsdp")},
    "2x2": {"kernel": P(("fsdp", "tp")), "norm": P("fsdp"), "head": P("tp"), "proj": P(),
            "bias": P(), "embed": P("fsdp"), "experts": P("fsdp")},
    "2x2x2": {"kernel": P(("fsdp", "tp")), "norm": P("fsdp"), "head": P("tp"), "proj": P(),
              "bias": P(), "embed": P(("data", "fsdp", "tp")), "experts": P("data")},
}


def _is_spec(x):
  return isinstance(x, P)


@functools.cache
def _mesh(name, axis_types=None):
  shape, axes = MESHES[name]
  devices = jax.devices()[:int(np.prod(shape))]
  if axis_types is None:
    return jax.make_mesh(shape, axes, devices=devices)
  return jax.make_mesh(shape, axes, devices=devices, axis_types=(axis_types,) * len(axes))


def _axes(name):
  return MESHES[name][1]


def _replicated_axes(specs, axes):
  """Per leaf, the mesh axes its spec does not shard it over (what its type says)."""
  def free(spec):
    used = {a for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s)}
    return tuple(a for a in axes if a not in used) or False
  return jax.tree.map(free, specs, is_leaf=_is_spec)


@functools.cache
def _steps():
  return step_trees(SEED, SHAPES)


def _thresholds(group):
  first = _steps()[0]
  return [threshold_for(entry, first, o) for entry, o in GROUPS[group]]


@functools.cache
def _expected(group):
  tx = bundle(GROUPS[group], _thresholds(group))
  return run_unsharded(tx, _steps())


def _check(group, actual, what):
  """``actual`` [(updates tuple, states tuple)] against the unsharded run and NumPy."""
  for k, (entry, o) in enumerate(GROUPS[group]):
    case = f"{what} {entry} ord={o}"
    for i, ((u, s), (ue, se), grads) in enumerate(zip(actual, _expected(group), _steps(),
                                                      strict=True)):
      assert_close(u[k], ue[k], what=f"{case} step {i} updates")
      assert_close(s[k], se[k], what=f"{case} step {i} state")
      if entry.ords:
        norm = np_leaf_norms(grads, o).max() if entry.per_leaf else np_norm(grads, o)
        np.testing.assert_allclose(s[k].stats.norm, norm, rtol=1e-5, err_msg=case)
    assert any(bool(s[k].stats.clipped) for _, s in actual), f"{case}: never clipped"


def _shard_map_step(tx, mesh, specs, n_out, check_vma=True):
  out_specs = tuple(specs for _ in range(n_out))
  return jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()), out_specs=(out_specs, P()),
                       check_vma=check_vma)


def _run(step, tx, mesh, specs):
  state = jax.device_put(tx.init(_steps()[0]), NamedSharding(mesh, P()))
  out = []
  for grads in _steps():
    updates, state = step(place(grads, specs, mesh), state)
    out.append(jax.device_get((updates, state)))
  return out


# The repro ---------------------------------------------------------------


def test_fsdp_tp_leaf_replicated_over_tp_is_counted_once():
  """16 ones sharded over both axes and 4 over fsdp only: the norm is sqrt(20)."""
  mesh = _mesh("2x2")
  specs = {"w": P("fsdp", "tp"), "ln": P("fsdp")}
  grads = place({"w": np.ones((4, 4), np.float32), "ln": np.ones((4,), np.float32)}, specs,
                mesh)
  tx = clipjax.clip_by_global_norm(1.0, axis_name=("fsdp", "tp"))
  step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()),
                               out_specs=(specs, P())))
  updates, state = step(grads, tx.init(grads))
  np.testing.assert_allclose(state.stats.norm, np.sqrt(20.0), rtol=1e-6)
  np.testing.assert_allclose(clipjax.global_norm(updates), 1.0, rtol=1e-6)
  _, gspmd = jax.jit(clipjax.clip_by_global_norm(1.0).update)(grads, None)
  np.testing.assert_allclose(gspmd.stats.norm, np.sqrt(20.0), rtol=1e-6)


# Every clipper with axis_name, every ord -----------------------------------------


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("group", GROUPS)
def test_shard_map_and_gspmd_match_unsharded(mesh_name, group):
  mesh, specs, axes = _mesh(mesh_name), SPECS[mesh_name], _axes(mesh_name)
  n = len(GROUPS[group])
  tx = bundle(GROUPS[group], _thresholds(group), axis_name=axes)
  step = jax.jit(_shard_map_step(tx, mesh, specs, n))
  _check(group, _run(step, tx, mesh, specs), f"shard_map {mesh_name}")
  # One all-reduce per update: each clipper of the bundle asks for one.
  lowered = step.lower(place(_steps()[0], specs, mesh), tx.init(_steps()[0])).as_text()
  assert count_lowered_all_reduce(lowered) == n
  if mesh_name != "1d":  # tests/test_distributed.py runs GSPMD on one axis
    plain = bundle(GROUPS[group], _thresholds(group))
    _check(group, _run(jax.jit(plain.update), plain, mesh, specs), f"GSPMD {mesh_name}")


@pytest.mark.parametrize("mesh_name", MESHES)
def test_each_clipper_asks_for_one_all_reduce(mesh_name):
  mesh, specs, axes = _mesh(mesh_name), SPECS[mesh_name], _axes(mesh_name)
  grads = place(_steps()[0], specs, mesh)
  for entry, o in [c for cases in GROUPS.values() for c in cases]:
    tx = make(entry, o, 1.0, axis_name=axes)
    f = jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
    lowered = jax.jit(f).lower(grads, tx.init(_steps()[0])).as_text()
    assert count_lowered_all_reduce(lowered) == 1, (entry, o)


# Norms, skip_spikes and AGC -------------------------------------------------------


def _norms(tree, axis_name=None, replicated=None):
  dist = {"axis_name": axis_name, "replicated": replicated}
  return {str(o): (clipjax.global_norm(tree, o, **dist), clipjax.leaf_norms(tree, o, **dist),
                   clipjax.norms_by_path(tree, o, **dist)) for o in ORDS}


def _check_norms(out, tree, what):
  for o in ORDS:
    total, leaves, by_path = out[str(o)]
    np.testing.assert_allclose(total, np_norm(tree, o), rtol=1e-5, err_msg=f"{what} {o}")
    np.testing.assert_allclose(leaves, np_leaf_norms(tree, o), rtol=1e-5, err_msg=f"{what} {o}")
    np.testing.assert_allclose([by_path[k] for k in sorted(tree)], np_leaf_norms(tree, o),
                               rtol=1e-5, err_msg=f"{what} {o}")


@pytest.mark.parametrize("mesh_name", MESHES)
def test_norms_match_numpy_with_one_all_reduce_each(mesh_name):
  mesh, specs, axes = _mesh(mesh_name), SPECS[mesh_name], _axes(mesh_name)
  tree = _steps()[0]
  placed = place(tree, specs, mesh)
  f = jax.jit(jax.shard_map(functools.partial(_norms, axis_name=axes), mesh=mesh,
                            in_specs=(specs,), out_specs=P()))
  _check_norms(f(placed), tree, f"shard_map {mesh_name}")
  # Three functions at three ords: nine norms, nine all-reduces.
  assert count_lowered_all_reduce(f.lower(placed).as_text()) == 3 * len(ORDS)
  _check_norms(jax.jit(_norms)(placed), tree, f"GSPMD {mesh_name}")


def _spikes(**dist):
  inner = clipjax.clip_by_global_norm(0.5 * np_norm(_steps()[0]), **dist)
  return clipjax.skip_spikes(inner, sigma_factor=1.0, window=4, min_history=2, **dist)


@pytest.mark.parametrize("mesh_name", ["2x2", "2x2x2"])
def test_skip_spikes_matches_unsharded(mesh_name):
  mesh, specs, axes = _mesh(mesh_name), SPECS[mesh_name], _axes(mesh_name)
  tx = _spikes(axis_name=axes)
  step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()),
                               out_specs=(specs, P())))
  expected = run_unsharded(_spikes(), _steps())
  state = jax.device_put(tx.init(_steps()[0]), NamedSharding(mesh, P()))
  for i, (grads, (ue, se)) in enumerate(zip(_steps(), expected, strict=True)):
    updates, state = step(place(grads, specs, mesh), state)
    assert_close(jax.device_get(updates), ue, what=f"step {i} updates")
    assert_close(jax.device_get(state), se, what=f"step {i} state")
  assert bool(expected[3][1].stats.skipped)  # the spike of step 3 is skipped


@functools.cache
def _agc_case():
  """(gradient steps, params, clipping): a clipping factor between the unit ratios."""
  params = jax.tree.map(lambda x: np.abs(x) + np.float32(0.5), step_trees(SEED + 50, SHAPES)[0])
  ratios = np.sort(np.concatenate([
      (np_unit_norms(_steps()[0][k]) / np.maximum(np_unit_norms(params[k]), 1e-3)).ravel()
      for k in SHAPES]))
  return params, float(np.sqrt(ratios[len(ratios) // 2 - 1] * ratios[len(ratios) // 2]))


@pytest.mark.parametrize("mesh_name", MESHES)
def test_adaptive_grad_clip_matches_unsharded(mesh_name):
  mesh, specs, axes = _mesh(mesh_name), AGC_SPECS[mesh_name], _axes(mesh_name)
  params, clipping = _agc_case()
  # axis=0, the default for every leaf here: a local shard of one row would infer others.
  tx = clipjax.adaptive_grad_clip(clipping, axis=0, axis_name=axes)
  step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P(), specs),
                               out_specs=(specs, P())))
  plain = clipjax.adaptive_grad_clip(clipping, axis=0)
  plain_update = jax.jit(plain.update)
  state, expected_state = jax.device_put(tx.init(params), NamedSharding(mesh, P())), None
  placed_params = place(params, specs, mesh)
  for i, grads in enumerate(_steps()):
    placed = place(grads, specs, mesh)
    updates, state = step(placed, state, placed_params)
    expected, expected_state = plain_update(grads, expected_state, params)
    assert_close(jax.device_get(updates), expected, what=f"step {i} updates")
    assert_close(jax.device_get(state), expected_state, what=f"step {i} state")
    gspmd, gspmd_state = plain_update(placed, expected_state, placed_params)
    assert_close(jax.device_get(gspmd), expected, what=f"GSPMD step {i}")
    del gspmd_state
  assert bool(expected_state.stats.clipped)
  lowered = step.lower(placed, state, placed_params).as_text()
  assert count_lowered_all_reduce(lowered) == 1


# replicated where the types record nothing, and against the types ---------------


def test_replicated_that_contradicts_the_type_names_the_leaf():
  mesh, specs, axes = _mesh("2x2"), SPECS["2x2"], _axes("2x2")
  placed = place(_steps()[0], specs, mesh)
  right = _replicated_axes(specs, axes)
  for leaf, wrong in (("norm", True), ("proj", ("tp",)), ("bias", False), ("kernel", ("tp",))):
    tx = clipjax.clip_by_global_norm(1.0, axis_name=axes, replicated={**right, leaf: wrong})
    f = jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
    with pytest.raises(ValueError, match=rf"\['{leaf}'\] contradicts its type.*tp"):
      jax.jit(f)(placed, None)


def test_replicated_names_only_axes_of_axis_name():
  mesh, specs = _mesh("2x2"), SPECS["2x2"]
  replicated = {**_replicated_axes(specs, ("fsdp",)), "norm": ("tp",)}
  tx = clipjax.clip_by_global_norm(1.0, axis_name="fsdp", replicated=replicated)
  f = jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()),
                    check_vma=False)
  with pytest.raises(ValueError, match=r"\['norm'\] names axes \['tp'\]"):
    jax.jit(f)(place(_steps()[0], specs, mesh), None)


def test_replicated_accepts_tuples_of_axis_names_at_construction():
  ok = {"a": ("fsdp",), "b": ("data", "tp"), "c": True, "d": None}
  clipjax.clip_by_global_norm(1.0, replicated=ok)
  clipjax.adaptive_grad_clip(0.1, replicated=ok)
  for bad in ({"a": ("fsdp", True)}, {"a": ("fsdp", None)}, {"a": 1}):
    with pytest.raises(ValueError, match="replicated="):
      clipjax.clip_by_norm(1.0, replicated=bad)


def test_tuple_replicated_without_types():
  """check_vma=False: the types record nothing, ``replicated`` says it per axis."""
  mesh, specs, axes = _mesh("2x2x2"), SPECS["2x2x2"], _axes("2x2x2")
  replicated = _replicated_axes(specs, axes)
  assert replicated["experts"] == ("fsdp",) and replicated["bias"] == axes
  tree = _steps()[0]
  placed = place(tree, specs, mesh)
  f = jax.jit(jax.shard_map(functools.partial(_norms, axis_name=axes, replicated=replicated),
                            mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False))
  _check_norms(f(placed), tree, "check_vma=False")
  # Unmarked, a leaf is taken to be sharded: every device adds its copy.
  g = jax.jit(jax.shard_map(lambda t: clipjax.global_norm(t, 1, axis_name=axes), mesh=mesh,
                            in_specs=(specs,), out_specs=P(), check_vma=False))
  copies = {k: 8 // np.prod([mesh.shape[a] for a in axes if a not in (r or ())])
            for k, r in replicated.items()}
  np.testing.assert_allclose(g(placed), sum(copies[k] * np.abs(tree[k]).sum() for k in tree),
                             rtol=1e-5)
  group = "fixed"
  tx = bundle(GROUPS[group], _thresholds(group), axis_name=axes, replicated=replicated)
  step = jax.jit(_shard_map_step(tx, mesh, specs, len(GROUPS[group]), check_vma=False))
  _check(group, _run(step, tx, mesh, specs), "check_vma=False")


# Explicit sharding and layer_axis --------------------------------------------------

LAYERS = 4
# Leaves far larger than their norms, so that a gathered gradient would show in the HLO.
STACKED = {"stack": (LAYERS, 16, 32), "w": (8, 64), "b": (3,)}
STACKED_SPECS = {"stack": P("layers"), "w": P("layers"), "b": P()}
LAYER_AXIS = {"stack": 0, "w": None, "b": None}


def _explicit_txs():
  """Every registry transform, with ``layer_axis`` where it takes one."""
  txs = []
  for entry in registry.ENTRIES:
    kwargs = {}
    if "layer_axis" in inspect.signature(entry.make).parameters:
      kwargs["layer_axis"] = LAYER_AXIS
    txs.append(entry.build(**kwargs))
  return side_by_side(txs)


def _layer_norms(tree):
  return clipjax.leaf_norms(tree, layer_axis=LAYER_AXIS)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=str)
def test_layer_axis_sharded_on_explicit_and_auto_meshes(axis_type):
  mesh = jax.make_mesh((LAYERS,), ("layers",), devices=jax.devices()[:LAYERS],
                       axis_types=(axis_type,))
  steps = step_trees(SEED + 7, STACKED)
  params = jax.tree.map(lambda x: np.abs(x) + np.float32(0.5), steps[0])
  tx = _explicit_txs()
  expected = run_unsharded(optax.GradientTransformation(
      tx.init, jax.jit(lambda g, s: tx.update(g, s, params))), steps)
  with jax.set_mesh(mesh):
    placed_params = place(params, STACKED_SPECS, mesh)
    state = tx.init(placed_params)
    update = jax.jit(tx.update).lower(place(steps[0], STACKED_SPECS, mesh), state,
                                      placed_params).compile()
    text = update.as_text()
    for i, (grads, (ue, se)) in enumerate(zip(steps, expected, strict=True)):
      placed = place(grads, STACKED_SPECS, mesh)
      updates, state = update(placed, state, placed_params)
      for u in updates:
        assert u["stack"].sharding.is_equivalent_to(placed["stack"].sharding, 3)
      assert_close(jax.device_get(updates), ue, what=f"step {i} updates")
      assert_close(jax.device_get(state), se, what=f"step {i} state")
      np.testing.assert_allclose(jax.jit(_layer_norms)(placed), _layer_norms(grads), rtol=1e-5)
  # What is gathered is norms (per layer, per unit), never a gradient: every gather is
  # at most a quarter of the smallest sharded leaf.
  gathered = _gathered_sizes(text)
  assert all(4 * size <= 8 * 64 for size in gathered), gathered


def _gathered_sizes(hlo_text):
  """The number of elements each all-gather of a compiled HLO module produces."""
  shapes = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo_text)
  return [int(np.prod([int(d) for d in shape.split(",") if d])) for shape in shapes]
