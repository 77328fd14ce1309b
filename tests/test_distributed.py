"""Clipping across 8 CPU devices: shard_map (1-D and 2-D meshes), pmap and sharded jit.

Every norm-based clipper must give, on gradients spread over devices with a mix of
sharded and replicated leaves, what it gives on the full unsharded arrays (states
included, over several steps), with exactly one all-reduce per update; under plain
``jit`` with sharded arrays it must neither all-gather nor reshard.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax
from _dist_cases import all_cases
from _dist_cases import all_reduce_branches
from _dist_cases import assert_close
from _dist_cases import bundle
from _dist_cases import compiled_texts
from _dist_cases import count_all_gather
from _dist_cases import count_all_reduce
from _dist_cases import count_lowered_all_reduce
from _dist_cases import graded_tree
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

PMAP_WARNING = "ignore:.*pmap.*:DeprecationWarning"
GROUPS = groups()

# One gradient tree for every layout: three sharded leaves, two replicated ones.
SHAPES = {"kernel": (16, 6), "proj": (5, 24), "emb": (8, 3, 2), "bias": (6,), "gain": ()}
REPLICATED = {"kernel": False, "proj": False, "emb": False, "bias": True, "gain": True}
# 1-D mesh of 8: leaves sharded along different dimensions.
SPECS_1D = {"kernel": P("d"), "proj": P(None, "d"), "emb": P("d"), "bias": P(), "gain": P()}
# 2-D mesh (2, 4): leaves sharded over both axes, in both orders.
SPECS_2D = {"kernel": P("b", "a"), "proj": P(None, ("a", "b")), "emb": P(("b", "a")),
            "bias": P(), "gain": P()}
# Tensor-parallel rows: sharded over "b" only, each row of "a" holds its own gradients.
SPECS_ROW = {"kernel": P("b"), "proj": P(None, "b"), "emb": P("b"), "bias": P(), "gain": P()}
SEED = 10


def _is_spec(x):
  return isinstance(x, P)


@pytest.fixture(scope="module")
def mesh_1d():
  return jax.make_mesh((8,), ("d",))


@pytest.fixture(scope="module")
def mesh_2d():
  return jax.make_mesh((2, 4), ("a", "b"))


@functools.cache
def _steps(seed, factor=1.0):
  return [jax.tree.map(lambda x: x * np.float32(factor), t) for t in step_trees(seed, SHAPES)]


def _thresholds(group):
  """Thresholds far from every norm of the first step of ``SEED``, used by every run."""
  first = _steps(SEED)[0]
  return [threshold_for(entry, first, o) for entry, o in GROUPS[group]]


@functools.cache
def _reference(group):
  """The unsharded clippers of ``group``, compiled once for every seed."""
  tx = bundle(GROUPS[group], _thresholds(group))
  return optax.GradientTransformation(tx.init, jax.jit(tx.update))


@functools.cache
def _expected(group, seed, factor=1.0):
  """The unsharded run of every clipper of ``group``, step by step (shared by the tests)."""
  return run_unsharded(_reference(group), _steps(seed, factor))


def _check(group, seed, actual, what, factor=1.0):
  """Compares ``actual`` [(updates tuple, states tuple)] with the unsharded run."""
  steps = _steps(seed, factor)
  expected = _expected(group, seed, factor)
  assert len(actual) == len(steps)
  for k, (entry, o) in enumerate(GROUPS[group]):
    case = f"{what} {entry} ord={o}"
    for i, ((u, s), (ue, se), grads) in enumerate(zip(actual, expected, steps)):
      assert_close(u[k], ue[k], what=f"{case} step {i} updates")
      assert_close(s[k], se[k], what=f"{case} step {i} state")
      if entry.ords:  # a norm clipper reports the (largest) norm of that ord
        norm = np_leaf_norms(grads, o).max() if entry.per_leaf else np_norm(grads, o)
        np.testing.assert_allclose(s[k].stats.norm, norm, rtol=1e-5)
    # Each case must clip at least once, or it proves nothing.
    assert any(bool(s[k].stats.clipped) for _, s in expected), f"{case}: never clipped"


def _run_shard_map(tx, steps, specs, mesh, n_out):
  out_specs = tuple(specs for _ in range(n_out))
  step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()),
                               out_specs=(out_specs, P())))
  state = jax.device_put(tx.init(steps[0]), NamedSharding(mesh, P()))
  out = []
  for grads in steps:
    updates, state = step(place(grads, specs, mesh), state)
    for leaf, spec in zip(jax.tree.leaves(updates),
                          jax.tree.leaves(out_specs, is_leaf=_is_spec)):
      assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), spec
    out.append(jax.device_get((updates, state)))
  return out


# Norms against NumPy ---------------------------------------------------------------


@pytest.mark.parametrize("ord", ORDS)
def test_norms_under_shard_map_match_numpy(mesh_1d, ord):
  tree = graded_tree(0, SHAPES)
  tree["bias"] = tree["bias"] * np.float32(50.0)  # a large replicated leaf, so miscounting shows

  def norms(t):
    m = clipjax.leaf_norms(t, ord, axis_name="d", replicated=REPLICATED)
    g = clipjax.global_norm(t, ord, axis_name="d", replicated=REPLICATED)
    return m, g

  f = jax.jit(jax.shard_map(norms, mesh=mesh_1d, in_specs=(SPECS_1D,), out_specs=(P(), P())))
  leaf, total = f(place(tree, SPECS_1D, mesh_1d))
  np.testing.assert_allclose(leaf, np_leaf_norms(tree, ord), rtol=1e-5)
  np.testing.assert_allclose(total, np_norm(tree, ord), rtol=1e-5)


def test_replicated_leaf_counted_once_and_unmarked_counted_per_device(mesh_1d):
  """Where the types record nothing (check_vma=False), a replicated leaf counts once when
  marked; unmarked, each device adds it. tests/test_meshes.py reads it from the types."""
  tree = {"w": np.arange(16.0, dtype=np.float32).reshape(8, 2),
          "b": np.array([1.0, 2.0, 3.0], np.float32)}
  specs = {"w": P("d"), "b": P()}
  placed = place(tree, specs, mesh_1d)

  def norm_with(replicated):
    f = jax.shard_map(lambda t: clipjax.global_norm(t, axis_name="d", replicated=replicated),
                      mesh=mesh_1d, in_specs=(specs,), out_specs=P(), check_vma=False)
    return float(jax.jit(f)(placed))

  w2 = float(np.sum(np.arange(16.0) ** 2))
  np.testing.assert_allclose(norm_with({"w": False, "b": True}), np.sqrt(w2 + 14.0), rtol=1e-6)
  np.testing.assert_allclose(norm_with(None), np.sqrt(w2 + 8 * 14.0), rtol=1e-6)


# shard_map -------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
def test_shard_map_1d_matches_unsharded(mesh_1d, group):
  steps = _steps(SEED)
  tx = bundle(GROUPS[group], _thresholds(group), axis_name="d", replicated=REPLICATED)
  actual = _run_shard_map(tx, steps, SPECS_1D, mesh_1d, len(GROUPS[group]))
  _check(group, SEED, actual, "shard_map 1-D")


@pytest.mark.parametrize("group", GROUPS)
def test_shard_map_2d_tuple_axis_matches_unsharded(mesh_2d, group):
  steps = _steps(SEED)
  tx = bundle(GROUPS[group], _thresholds(group), axis_name=("a", "b"),
              replicated=REPLICATED)
  actual = _run_shard_map(tx, steps, SPECS_2D, mesh_2d, len(GROUPS[group]))
  _check(group, SEED, actual, "shard_map 2-D")


@pytest.mark.parametrize("group", GROUPS)
def test_shard_map_2d_one_axis_clips_each_row(mesh_2d, group):
  """axis_name="b" on a (2, 4) mesh: the norm spans "b" only; each "a" row clips alone."""
  rows = [(SEED, 1.0), (SEED + 100, 3.0)]
  tx = bundle(GROUPS[group], _thresholds(group), axis_name="b",
              replicated=REPLICATED)
  n_out = len(GROUPS[group])
  row_specs = jax.tree.map(lambda s: P("a", *s), SPECS_ROW, is_leaf=_is_spec)
  out_specs = tuple(row_specs for _ in range(n_out))

  def per_row(updates, state):
    first = lambda t: jax.tree.map(lambda x: x[0], t)
    updates, state = tx.update(first(updates), first(state))
    return jax.tree.map(lambda x: x[None], (updates, state))

  step = jax.jit(jax.shard_map(per_row, mesh=mesh_2d, in_specs=(row_specs, P("a")),
                               out_specs=(out_specs, P("a"))))
  init = tx.init(_steps(SEED)[0])
  state = jax.device_put(jax.tree.map(lambda x: jnp.stack([x, x]), init),
                         NamedSharding(mesh_2d, P("a")))
  actual = []
  for grads0, grads1 in zip(*(_steps(*r) for r in rows)):
    stacked = jax.tree.map(lambda x, y: np.stack([x, y]), grads0, grads1)
    updates, state = step(place(stacked, row_specs, mesh_2d), state)
    actual.append(jax.device_get((updates, state)))
  for r, (seed, factor) in enumerate(rows):
    pick = lambda t, r=r: jax.tree.map(lambda x: x[r], t)
    _check(group, seed, [pick(a) for a in actual], f"row {r}", factor=factor)


@pytest.mark.parametrize("ord", ORDS)
def test_floors_and_tiny_norms_under_shard_map(mesh_1d, ord):
  """min_norm floors, and norms whose squares underflow float32, across devices."""
  base = graded_tree(80, SHAPES)
  # "proj" is so small that its squares underflow float32 on every device.
  base["proj"] = base["proj"] * np.float32(1e-25)
  steps = [jax.tree.map(lambda x, s=s: x * np.float32(s), base) for s in (1.0, 0.3, 6.0)]
  norm0, leaf0 = np_norm(base, ord), np.sort(np_leaf_norms(base, ord))

  def txs(**dist):
    return [clipjax.clip_by_global_norm(2.0 * norm0, min_norm=0.8 * norm0, ord=ord, **dist),
            clipjax.clip_by_norm(leaf0[-2], min_norm=leaf0[1] * 2.0, ord=ord, **dist)]

  actual = _run_shard_map(side_by_side(txs(axis_name="d", replicated=REPLICATED)), steps,
                          SPECS_1D, mesh_1d, 2)
  expected = run_unsharded(side_by_side(txs()), steps)
  for i, ((u, s), (ue, se), grads) in enumerate(zip(actual, expected, steps)):
    assert_close(u, ue, what=f"step {i} updates")
    assert_close(s, se, what=f"step {i} state")
    np.testing.assert_allclose(s[0].stats.norm, np_norm(grads, ord), rtol=1e-5)
  # The global clip floored (step 1) and clipped (step 2); the tiny leaf was floored.
  assert [bool(s[0].stats.clipped) for _, s in expected] == [False, True, True]
  assert float(expected[1][1][0].stats.scale) > 1.0 > float(expected[2][1][0].stats.scale)
  tiny_out = np_leaf_norms({"proj": expected[0][0][1]["proj"]}, ord)[0]
  np.testing.assert_allclose(tiny_out, leaf0[1] * 2.0, rtol=1e-5)


# pmap ------------------------------------------------------------------------------


def _to_pmap(x, spec, n):
  if spec == P():
    return np.broadcast_to(x, (n, *np.shape(x)))
  return np.stack(np.split(x, n, axis=list(spec).index("d")))


def _from_pmap(y, spec):
  y = np.asarray(y)
  if spec == P():
    for copy in y[1:]:  # every device must hold the same replicated result
      np.testing.assert_array_equal(copy, y[0])
    return y[0]
  return np.concatenate(list(y), axis=list(spec).index("d"))


@pytest.mark.filterwarnings(PMAP_WARNING)
@pytest.mark.parametrize("group", GROUPS)
def test_pmap_matches_unsharded(group):
  steps = _steps(SEED)
  n = jax.device_count()
  tx = bundle(GROUPS[group], _thresholds(group), axis_name="i", replicated=REPLICATED)
  step = jax.pmap(tx.update, axis_name="i")
  # A state already laid out as pmap returns it, so the step compiles once.
  state = jax.pmap(tx.init, axis_name="i")(
      jax.tree.map(lambda x: _to_pmap(x, P(), n), steps[0]))
  actual = []
  for grads in steps:
    updates, state = step(jax.tree.map(lambda x, s: _to_pmap(x, s, n), grads, SPECS_1D), state)
    updates = tuple(jax.tree.map(_from_pmap, u, SPECS_1D) for u in updates)
    actual.append((updates, jax.tree.map(lambda x: _from_pmap(x, P()), state)))
  _check(group, SEED, actual, "pmap")


# HLO: one all-reduce per update ----------------------------------------------------

# Every clipper at 3 leaves, and at 16 leaves at ord 2 (or without ord): the norm
# clippers at ord 1 and inf take the psum and pmax paths too.
HLO_CASES = [(entry, o, n) for entry, o in all_cases() for n in (3, 16)
             if n == 3 or o in (None, 2)]


@pytest.mark.parametrize(("entry", "ord", "n_leaves"), HLO_CASES, ids=str)
def test_one_all_reduce_per_update(mesh_1d, entry, ord, n_leaves):
  shapes = {f"w{i:02d}": (8 * (1 + i % 2),) for i in range(n_leaves)}
  specs = {k: P("d") for k in shapes}
  replicated = {k: False for k in shapes}
  # One replicated leaf, so the index-0 masking is in the program too.
  last = max(shapes)
  specs[last], replicated[last] = P(), True
  grads = graded_tree(n_leaves, shapes)
  tx = make(entry, ord, 1.0, axis_name="d", replicated=replicated)
  f = jax.shard_map(tx.update, mesh=mesh_1d, in_specs=(specs, P()), out_specs=(specs, P()))
  args = (place(grads, specs, mesh_1d),
          jax.device_put(tx.init(grads), NamedSharding(mesh_1d, P())))
  lowered, compiled = compiled_texts(f, *args)
  # Asked for once by the program (so XLA's combiner cannot hide several) ...
  assert count_lowered_all_reduce(lowered) == 1
  # ... and compiled to one.
  assert count_all_reduce(compiled) == 1, compiled
  assert count_all_gather(compiled) == 0


def test_all_reduce_counter_counts_instructions_not_names():
  text = ("%all-reduce.1 = f32[2,3]{1,0} all-reduce(f32[2,3]{1,0} %x), to_apply=%add\n"
          "%all-reduce-start.2 = f32[4]{0} all-reduce-start(f32[4]{0} %y), to_apply=%add\n"
          "%all-reduce-done.2 = f32[4]{0} all-reduce-done(f32[4]{0} %all-reduce-start.2)\n"
          "%t = f32[2,3]{1,0} add(f32[2,3]{1,0} %all-reduce.1, f32[2,3]{1,0} %all-reduce.1)\n"
          "%g = f32[8]{0} all-gather(f32[1]{0} %z), dimensions={0}\n")
  assert count_all_reduce(text) == 2
  assert count_all_gather(text) == 1
  # One reduced value per device gathered for a variadic reduction is not data;
  # a larger gather, or one from another op, is.
  partials = ("HloModule m, num_partitions=8\n"
              '%a = f32[8,1]{1,0} all-gather(%p), metadata={op_name="jit(f)/reduce"}\n')
  assert count_all_gather(partials) == 0
  assert count_all_gather(partials.replace("f32[8,1]", "f32[8,2]")) == 1
  assert count_all_gather(partials.replace("/reduce", "/reshape")) == 1


# Sharded jit (GSPMD): no axis_name --------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
def test_sharded_jit_keeps_shardings_and_never_all_gathers(mesh_2d, group):
  steps = _steps(SEED)
  tx = bundle(GROUPS[group], _thresholds(group))
  update = jax.jit(tx.update)
  state = tx.init(steps[0])
  actual = []
  for i, grads in enumerate(steps):
    placed = place(grads, SPECS_2D, mesh_2d)
    if i == 0:
      update = update.lower(placed, state).compile()
      text = update.as_text()
      assert count_all_gather(text) == 0, text
      assert "all-to-all(" not in text and "collective-permute(" not in text
    updates, state = update(placed, state)
    for u in updates:
      for out, x in zip(jax.tree.leaves(u), jax.tree.leaves(placed)):
        assert out.sharding.is_equivalent_to(x.sharding, x.ndim), (out.sharding, x.sharding)
    actual.append(jax.device_get((updates, state)))
  _check(group, SEED, actual, "sharded jit")


# inject_hyperparams injects ``ord`` as a traced value --------------------------------


def test_inject_hyperparams_under_shard_map(mesh_1d):
  steps = _steps(SEED)
  threshold = 0.5 * np_norm(steps[0], 2)
  inner = optax.inject_hyperparams(clipjax.clip_by_global_norm)(
      max_norm=threshold, axis_name="d", replicated=REPLICATED)
  out = _run_shard_map(side_by_side([inner]), steps, SPECS_1D, mesh_1d, 1)
  expected = run_unsharded(clipjax.clip_by_global_norm(threshold), steps)
  for (u, s), (ue, se) in zip(out, expected):
    assert_close(u[0], ue)
    assert_close(s[0].inner_state.stats, se.stats)


@pytest.mark.parametrize("ord", ORDS)
def test_inject_hyperparams_ord_runs_one_all_reduce(mesh_1d, ord):
  """A traced ``ord`` picks psum or pmax at run time: two branches, one all-reduce runs."""
  grads = graded_tree(3, {"w": (16,), "b": (3,)})
  specs = {"w": P("d"), "b": P()}
  tx = optax.inject_hyperparams(clipjax.clip_by_global_norm)(
      max_norm=1.0, ord=ord, axis_name="d", replicated={"w": False, "b": True})
  f = jax.shard_map(tx.update, mesh=mesh_1d, in_specs=(specs, P()), out_specs=(specs, P()))
  args = (place(grads, specs, mesh_1d),
          jax.device_put(tx.init(grads), NamedSharding(mesh_1d, P())))
  lowered, compiled = compiled_texts(f, *args)
  assert count_lowered_all_reduce(lowered) == 2
  assert count_all_reduce(compiled) == 2
  assert [len(b) for b in all_reduce_branches(compiled)] == [2], compiled
  _, state = jax.jit(f)(*args)
  np.testing.assert_allclose(state.inner_state.stats.norm, np_norm(grads, ord), rtol=1e-5)


# Adaptive gradient clipping (per unit, needs params) ---------------------------------

# AGC sums each unit (a column of an (in, out) kernel, a whole vector) over its shards,
# so leaves are sharded along their unit axes: axis 0 of every rank-1 to rank-3 leaf.
AGC_SHAPES = {"kernel": (16, 6), "proj": (24, 5), "emb": (8, 3, 2), "vec": (16,), "bias": (6,),
              "gain": ()}
AGC_REPLICATED = {"kernel": False, "proj": False, "emb": False, "vec": False, "bias": True,
                  "gain": True}
AGC_EPS = 1e-3


def _agc_specs(axis):
  return {k: (P() if AGC_REPLICATED[k] else P(axis)) for k in AGC_SHAPES}


def _np_agc(grads, params, clipping):
  """AGC in float64 NumPy: (updates, largest unit ratio)."""
  out, largest = {}, 0.0
  for k, g in grads.items():
    g_norm = np_unit_norms(g)
    w_norm = np.maximum(np_unit_norms(params[k]), AGC_EPS)
    ratio = g_norm / w_norm
    scale = np.where(ratio > clipping, clipping * w_norm / np.where(g_norm > 0, g_norm, 1), 1.0)
    out[k] = np.asarray(g, np.float64) * scale
    largest = max(largest, float(ratio.max()))
  return out, largest


@functools.cache
def _agc_case():
  """(gradient steps, params, clipping) with some units clipped and some not."""
  params = graded_tree(90, AGC_SHAPES)
  steps = step_trees(91, AGC_SHAPES)
  ratios = np.sort(np.concatenate([
      (np_unit_norms(steps[0][k]) / np.maximum(np_unit_norms(params[k]), AGC_EPS)).ravel()
      for k in AGC_SHAPES]))
  mid = len(ratios) // 2
  return steps, params, float(np.sqrt(ratios[mid - 1] * ratios[mid]))


def _check_agc(actual, what):
  steps, params, clipping = _agc_case()
  expected = _agc_expected()
  clipped = []
  for i, ((u, s), (ue, se), grads) in enumerate(zip(actual, expected, steps)):
    assert_close(u, ue, what=f"{what} step {i} updates")
    assert_close(s, se, what=f"{what} step {i} state")
    ref, largest = _np_agc(grads, params, clipping)
    for k in AGC_SHAPES:
      np.testing.assert_allclose(u[k], ref[k], rtol=1e-5, atol=1e-6 * np.abs(ref[k]).max(),
                                 err_msg=f"{what} step {i} {k}")
    np.testing.assert_allclose(s.stats.norm, largest, rtol=1e-5)
    clipped.append(bool(s.stats.clipped) and float(s.stats.scale) < 1.0)
  assert all(clipped), what


@functools.cache
def _agc_expected():
  """The unsharded AGC run on the full arrays, step by step (shared by the tests)."""
  steps, params, clipping = _agc_case()
  tx = clipjax.adaptive_grad_clip(clipping, AGC_EPS)
  update = jax.jit(tx.update)
  state, out = tx.init(params), []
  for grads in steps:
    updates, state = update(grads, state, params)
    out.append((updates, state))
  return out


@pytest.mark.parametrize("layout", ["1d", "2d-tuple", "2d-one-axis"])
def test_adaptive_grad_clip_under_shard_map(mesh_1d, mesh_2d, layout):
  """On the 2-D mesh with axis_name="b", the leaves are sharded over "b" and the same on
  both rows of "a": a sum over "a" too would count every unit twice."""
  steps, params, clipping = _agc_case()
  mesh, axis = {"1d": (mesh_1d, "d"), "2d-tuple": (mesh_2d, ("a", "b")),
                "2d-one-axis": (mesh_2d, "b")}[layout]
  specs = _agc_specs(axis)
  tx = clipjax.adaptive_grad_clip(clipping, AGC_EPS, axis_name=axis, replicated=AGC_REPLICATED)
  step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P(), specs),
                               out_specs=(specs, P())))
  state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
  placed_params = place(params, specs, mesh)
  actual = []
  for grads in steps:
    updates, state = step(place(grads, specs, mesh), state, placed_params)
    actual.append(jax.device_get((updates, state)))
  _check_agc(actual, f"shard_map {layout}")


@pytest.mark.filterwarnings(PMAP_WARNING)
def test_adaptive_grad_clip_under_pmap():
  steps, params, clipping = _agc_case()
  n = jax.device_count()
  specs = _agc_specs("d")
  tx = clipjax.adaptive_grad_clip(clipping, AGC_EPS, axis_name="i", replicated=AGC_REPLICATED)
  step = jax.pmap(tx.update, axis_name="i")
  to_pmap = lambda tree: jax.tree.map(lambda x, s: _to_pmap(x, s, n), tree, specs)
  state = jax.pmap(tx.init, axis_name="i")(to_pmap(params))
  actual = []
  for grads in steps:
    updates, state = step(to_pmap(grads), state, to_pmap(params))
    actual.append((jax.tree.map(_from_pmap, updates, specs),
                   jax.tree.map(lambda x: _from_pmap(x, P()), state)))
  _check_agc(actual, "pmap")


@pytest.mark.parametrize("n_leaves", [3, 16])
def test_adaptive_grad_clip_one_all_reduce(mesh_1d, n_leaves):
  shapes = {f"w{i:02d}": (8 * (1 + i % 2), 3) for i in range(n_leaves)}
  replicated = {k: k == max(shapes) for k in shapes}
  specs = {k: P() if replicated[k] else P("d") for k in shapes}
  grads, params = graded_tree(n_leaves, shapes), graded_tree(n_leaves + 1, shapes)
  tx = clipjax.adaptive_grad_clip(0.1, axis_name="d", replicated=replicated)
  f = jax.shard_map(tx.update, mesh=mesh_1d, in_specs=(specs, P(), specs),
                    out_specs=(specs, P()))
  lowered, compiled = compiled_texts(
      f, place(grads, specs, mesh_1d), jax.device_put(tx.init(params),
                                                      NamedSharding(mesh_1d, P())),
      place(params, specs, mesh_1d))
  assert count_lowered_all_reduce(lowered) == 1
  assert count_all_reduce(compiled) == 1, compiled
  assert count_all_gather(compiled) == 0


def test_adaptive_grad_clip_sharded_jit_keeps_shardings(mesh_2d):
  """GSPMD partitions any layout, also along a kernel's output axis (no axis_name)."""
  steps, params, clipping = _agc_case()
  specs = {"kernel": P("b", "a"), "proj": P(("a", "b")), "emb": P(None, None, "a"), "vec": P("b"),
           "bias": P("a"), "gain": P()}
  tx = clipjax.adaptive_grad_clip(clipping, AGC_EPS)
  placed_params = place(params, specs, mesh_2d)
  update = jax.jit(tx.update).lower(place(steps[0], specs, mesh_2d), tx.init(params),
                                    placed_params).compile()
  assert count_all_gather(update.as_text()) == 0, update.as_text()
  state, actual = tx.init(params), []
  for grads in steps:
    placed = place(grads, specs, mesh_2d)
    updates, state = update(placed, state, placed_params)
    for k in AGC_SHAPES:
      assert updates[k].sharding.is_equivalent_to(placed[k].sharding, placed[k].ndim), k
    actual.append(jax.device_get((updates, state)))
  _check_agc(actual, "sharded jit")
