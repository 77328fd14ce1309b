"""norms_by_path and path_name against NumPy float64 norms, under jit and shard_map."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import clipjax
from _trees import ORDS
from _trees import np_norm

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


class Block(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


def nested_tree(seed, dtype=jnp.float32):
  """Dicts, a list and a NamedTuple, with the paths ``expected_paths`` gives, in leaf order."""
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape) * 3.0, dtype)

  return {
      "encoder": {"layers": [Block(normal(4, 8), normal(8)), Block(normal(8, 8), normal(8))]},
      "head": normal(8, 4),
      "scale": normal(),
  }


EXPECTED_PATHS = ["encoder/layers/0/kernel", "encoder/layers/0/bias", "encoder/layers/1/kernel",
                  "encoder/layers/1/bias", "head", "scale"]


def test_path_name_joins_keys_indices_and_attributes():
  tree = {"a": [1.0, Block(2.0, {3: 4.0})], "b": (5.0,)}
  paths = [clipjax.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert paths == ["a/0", "a/1/kernel", "a/1/bias/3", "b/0"]
  dotted = [clipjax.path_name(p, sep=".")
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert dotted == ["a.0", "a.1.kernel", "a.1.bias.3", "b.0"]
  assert clipjax.path_name(()) == ""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ORDS)
def test_norms_by_path_match_float64_reference(ord, dtype):
  tree = nested_tree(0, dtype)
  norms = clipjax.norms_by_path(tree, ord)
  assert list(norms) == EXPECTED_PATHS
  for path, leaf in zip(EXPECTED_PATHS, jax.tree.leaves(tree)):
    assert norms[path].dtype == jnp.float32 and norms[path].shape == ()
    # float32 accumulation of values held exactly: ~1e-6 relative whatever the input dtype.
    np.testing.assert_allclose(float(norms[path]), np_norm(leaf, ord), rtol=2e-6, err_msg=path)


@pytest.mark.parametrize("ord", ORDS)
def test_norms_by_path_are_leaf_norms(ord):
  tree = nested_tree(1)
  norms = clipjax.norms_by_path(tree, ord)
  np.testing.assert_array_equal(np.stack([np.asarray(v) for v in norms.values()]),
                                np.asarray(clipjax.leaf_norms(tree, ord)))
  # The ord-norm of the leaf norms is the global norm.
  np.testing.assert_allclose(
      float(jnp.linalg.norm(jnp.stack(list(norms.values())), ord)),
      float(clipjax.global_norm(tree, ord)), rtol=2e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_norms_by_path_under_jit(ord):
  tree = nested_tree(2)
  eager = clipjax.norms_by_path(tree, ord)
  jitted = jax.jit(clipjax.norms_by_path, static_argnums=1)(tree, ord)
  assert sorted(jitted) == sorted(eager)  # a dict out of jit has its keys sorted
  for path, leaf in zip(EXPECTED_PATHS, jax.tree.leaves(tree)):
    np.testing.assert_allclose(float(jitted[path]), np_norm(leaf, ord), rtol=2e-6)


def test_ord_spellings_and_separator():
  tree = {"a": {"b": jnp.array([3.0, -4.0])}}
  for spelling in (np.inf, float("inf"), "inf"):
    assert float(clipjax.norms_by_path(tree, spelling)["a/b"]) == 4.0
  assert list(clipjax.norms_by_path(tree, sep=".")) == ["a.b"]
  assert clipjax.norms_by_path({}) == {}
  assert list(clipjax.norms_by_path(jnp.ones(3))) == [""]


def test_bad_arguments_name_themselves():
  with pytest.raises(ValueError, match="ord=3 must be 1, 2 or inf"):
    clipjax.norms_by_path({"a": jnp.ones(2)}, 3)
  with pytest.raises(ValueError, match="sep=''"):
    clipjax.norms_by_path({"a": jnp.ones(2)}, sep="")
  with pytest.raises(ValueError, match="'a/b'.*sep='/'"):
    clipjax.norms_by_path({"a/b": jnp.ones(2), "a": {"b": jnp.ones(2)}})


@pytest.fixture(scope="module")
def mesh_4():
  """Four of the eight CPU devices."""
  return Mesh(np.array(jax.devices()[:4]), ("d",))


@pytest.mark.parametrize("ord", ORDS)
def test_norms_by_path_under_shard_map(mesh_4, ord):
  rng = np.random.default_rng(3)
  tree = {"layers": [{"kernel": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)},
                     {"kernel": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)}],
          "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  specs = {"layers": [{"kernel": P("d")}, {"kernel": P("d")}], "bias": P()}
  replicated = {"layers": False, "bias": True}

  def norms(t):
    return clipjax.norms_by_path(t, ord, axis_name="d", replicated=replicated)

  out_specs = {path: P() for path in ("layers/0/kernel", "layers/1/kernel", "bias")}
  got = jax.jit(jax.shard_map(norms, mesh=mesh_4, in_specs=(specs,), out_specs=out_specs))(tree)
  assert sorted(got) == sorted(out_specs)
  for path, leaf in (("layers/0/kernel", tree["layers"][0]["kernel"]),
                     ("layers/1/kernel", tree["layers"][1]["kernel"]), ("bias", tree["bias"])):
    np.testing.assert_allclose(float(got[path]), np_norm(leaf, ord), rtol=2e-6, err_msg=path)


def test_shard_map_reduces_all_leaves_with_one_collective(mesh_4):
  tree = {"a": jnp.ones((8, 2)), "b": jnp.ones((4,)), "c": [jnp.ones((4, 4))]}
  specs = {"a": P("d"), "b": P("d"), "c": [P("d")]}
  f = jax.shard_map(lambda t: clipjax.norms_by_path(t, axis_name="d"), mesh=mesh_4,
                    in_specs=(specs,), out_specs={k: P() for k in ("a", "b", "c/0")})
  text = jax.jit(f).lower(tree).as_text()
  assert text.count("all_reduce") + text.count("all-reduce") == 1
