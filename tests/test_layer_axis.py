"""``layer_axis``: a scanned (stacked) model is clipped exactly like its unrolled twin.

The twin pair is a small Flax NNX model whose blocks are stacked with
``nnx.vmap`` and run with ``nnx.scan``, and the same model with the blocks as
separate modules holding the same weights. Every transform that takes
``layer_axis`` gets the scanned gradients (stacked along axis 0, as
``nnx.scan`` makes them, or along axis 1, as MaxText's ``param_scan_axis=1``)
and the unrolled ones; the updates, restacked, and the statistics agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import _dist_cases
import clipjax

LAYERS, WIDTH, BATCH = 3, 8, 4
RTOL = 1e-5  # scan and the unrolled loop sum in different orders


class Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.scale = nnx.Param(jnp.ones((WIDTH,)))

  def __call__(self, x):
    return x + jnp.tanh(self.linear(x)) * self.scale[...]


class Scanned(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    make = nnx.vmap(lambda r: Block(r), in_axes=0, out_axes=0)
    self.blocks = make(nnx.Rngs(0).split(LAYERS))
    self.head = nnx.Linear(WIDTH, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.head(run(x, self.blocks))


class Unrolled(nnx.Module):

  def __init__(self, scanned: Scanned, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.head = nnx.Linear(WIDTH, 2, rngs=rngs)
    nnx.update(self.head, nnx.state(scanned.head))
    for i, block in enumerate(self.blocks):
      nnx.update(block, jax.tree.map(lambda x, i=i: x[i], nnx.state(scanned.blocks)))

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def _loss(model, x, scale):
  return scale * jnp.sum(model(x) ** 2)


@functools.cache
def twins():
  """(scanned params, scanned grads, unrolled params, per-step gradient scales, input)."""
  # Flax's own layers need standard promotion; the clippers below run strict.
  # Built and differentiated under jit: op by op, Flax's layers take seconds to dispatch.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    scanned, unrolled = nnx.jit(_models)()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, WIDTH)), jnp.float32)
    out = {}
    for name, model in (("scanned", scanned), ("unrolled", unrolled)):
      grads = nnx.jit(nnx.grad(_loss))(model, x, 30.0)
      out[name] = (nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(grads))
  return out


def _models():
  scanned = Scanned(nnx.Rngs(1))
  return scanned, Unrolled(scanned, nnx.Rngs(2))


def _moved(tree, axis):
  """The scanned tree with its stacked axis moved from 0 to ``axis``."""
  return {**tree, "blocks": jax.tree.map(lambda x: jnp.moveaxis(x, 0, axis), tree["blocks"])}


def _restacked(unrolled, axis):
  """The unrolled tree in the scanned tree's structure, layers stacked along ``axis``."""
  layers = [unrolled["blocks"][i] for i in range(LAYERS)]
  return {**unrolled, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs, axis), *layers)}


def _prefix(axis):
  return {"blocks": axis, "head": None}


# Each transform with layer_axis, built for a given prefix (or None for the twin).
TRANSFORMS = {
    "clip_by_norm": lambda la, **kw: clipjax.clip_by_norm(0.5, layer_axis=la, **kw),
    "clip_by_norm_floor": lambda la, **kw: clipjax.clip_by_norm(
        2.0, min_norm=1.0, ord=1, layer_axis=la, **kw),
    "clip_by_block_rms": lambda la, **kw: clipjax.clip_by_block_rms(0.05, layer_axis=la, **kw),
    "adagc": lambda la, **kw: clipjax.adagc(lambda_rel=0.9, warmup_steps=1, layer_axis=la, **kw),
    "adaptive_grad_clip": lambda la, **kw: clipjax.adaptive_grad_clip(
        0.05, layer_axis=la, **kw),
}
STEP_SCALES = (1.0, 3.0)  # adagc: one warm-up step, then a per-tensor step


def _run(tx, grads, params):
  state = tx.init(params)
  for s in STEP_SCALES:
    updates, state = tx.update(jax.tree.map(lambda g, s=s: g * s, grads), state, params)
  return updates, clipjax.clip_stats(state)


def _assert_same(scanned_out, unrolled_out, axis):
  (updates, stats), (twin_updates, twin_stats) = scanned_out, unrolled_out
  expected = _restacked(twin_updates, axis)
  assert jax.tree.structure(updates) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=1e-7)
  assert stats.keys() == twin_stats.keys()
  for key in stats:
    np.testing.assert_allclose(np.asarray(stats[key]), np.asarray(twin_stats[key]), rtol=RTOL,
                               err_msg=key)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_scanned_model_is_clipped_like_its_unrolled_twin(name, axis):
  (params, grads), (twin_params, twin_grads) = twins()["scanned"], twins()["unrolled"]
  params, grads = _moved(params, axis), _moved(grads, axis)
  scanned = jax.jit(functools.partial(_run, TRANSFORMS[name](_prefix(axis))))(grads, params)
  unrolled = jax.jit(functools.partial(_run, TRANSFORMS[name](None)))(twin_grads, twin_params)
  _assert_same(scanned, unrolled, axis)
  assert bool(scanned[1][f"{name.removesuffix('_floor')}/clipped"])


def test_without_layer_axis_a_stacked_leaf_is_one_tensor():
  (params, grads), (_, twin_grads) = twins()["scanned"], twins()["unrolled"]
  stacked = clipjax.leaf_norms(grads)
  per_layer = clipjax.leaf_norms(grads, layer_axis=_prefix(0))
  assert stacked.shape == (len(jax.tree.leaves(grads)),)
  # blocks/linear/bias, blocks/linear/kernel, blocks/scale hold LAYERS tensors each.
  assert per_layer.shape == (stacked.shape[0] + 3 * (LAYERS - 1),)
  twin = {jax.tree_util.keystr(p): float(n) for (p, _), n in zip(
      jax.tree_util.tree_flatten_with_path(twin_grads)[0], clipjax.leaf_norms(twin_grads))}
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
  expected = []
  for path in paths:
    if path.startswith("['blocks']"):
      expected += [twin[path.replace("['blocks']", f"['blocks'][{i}]")] for i in range(LAYERS)]
    else:
      expected.append(twin[path])
  np.testing.assert_allclose(np.asarray(per_layer), expected, rtol=RTOL)
  del params


@pytest.mark.parametrize("axis", [0, 1])
def test_per_example_layer_norm_clip_per_slice(axis):
  """Per-example gradients of the twins: each stacked slice is a layer of its own."""
  (_, grads), (_, twin_grads) = twins()["scanned"], twins()["unrolled"]
  factors = jnp.asarray([0.1, 1.0, 7.0, 40.0])
  per_example = jax.tree.map(lambda g: factors.reshape((-1,) + (1,) * g.ndim) * g[None],
                             _moved(grads, axis))
  twin = jax.tree.map(lambda g: factors.reshape((-1,) + (1,) * g.ndim) * g[None], twin_grads)
  for uniform in (True, False):
    sums, counts = clipjax.per_example_layer_norm_clip(per_example, 3.0, uniform,
                                                        layer_axis=_prefix(axis))
    twin_sums, twin_counts = clipjax.per_example_layer_norm_clip(twin, 3.0, uniform)
    for got, want in zip(jax.tree.leaves(sums), jax.tree.leaves(_restacked(twin_sums, axis))):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(counts["blocks"]["scale"]),
                                  [int(twin_counts["blocks"][i]["scale"]) for i in range(LAYERS)])


def _sharded_run(name, axis, grads, params, layer_axis):
  """``name`` under shard_map over 4 devices: kernels sharded along their inputs, the rest
  replicated."""
  mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])

  def spec(path, x):
    keys = jax.tree_util.keystr(path)
    if keys.endswith("['kernel']") and x.shape[-2] % 4 == 0:
      return P(*([None] * (x.ndim - 2)), "d", None)
    return P()

  specs = jax.tree_util.tree_map_with_path(spec, grads)
  replicated = jax.tree.map(lambda s: s == P(), specs, is_leaf=lambda s: isinstance(s, P))
  tx = TRANSFORMS[name](layer_axis, axis_name="d", replicated=replicated)
  run = jax.shard_map(functools.partial(_run, tx), mesh=mesh, in_specs=(specs, specs),
                      out_specs=(specs, P()))
  place = functools.partial(jax.tree.map, lambda x, s: jax.device_put(x, NamedSharding(mesh, s)))
  args = place(grads, specs), place(params, specs)
  # One collective per update, whatever the number of layers.
  once = jax.shard_map(lambda g, p: tx.update(g, tx.init(p), p)[0], mesh=mesh,
                       in_specs=(specs, specs), out_specs=specs)
  assert _dist_cases.count_lowered_all_reduce(jax.jit(once).lower(*args).as_text()) == 1
  return jax.jit(run)(*args)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_sharded_scanned_model_is_clipped_like_its_unrolled_twin(name):
  """With axis_name over 4 devices, a stacked leaf sharded along another axis."""
  axis = 1
  (params, grads), (twin_params, twin_grads) = twins()["scanned"], twins()["unrolled"]
  params, grads = _moved(params, axis), _moved(grads, axis)
  scanned = _sharded_run(name, axis, grads, params, _prefix(axis))
  unrolled = jax.jit(functools.partial(_run, TRANSFORMS[name](None)))(twin_grads, twin_params)
  _assert_same(scanned, unrolled, axis)


def test_layer_axis_out_of_range_names_the_leaf():
  with pytest.raises(ValueError, match=r"layer_axis=2 .*\['b'\]"):
    clipjax.leaf_norms({"a": jnp.ones((2, 3)), "b": jnp.ones(3)}, layer_axis={"a": 0, "b": 2})
  with pytest.raises(ValueError, match="layer_axis="):
    clipjax.clip_by_norm(1.0, layer_axis={"a": 0.5}).update({"a": jnp.ones(2)}, None)
