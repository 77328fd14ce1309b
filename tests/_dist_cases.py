"""Shared pieces of the multi-device tests: gradient trees, references, HLO counting."""

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax

ORDS = (1, 2, float("inf"))
RTOL = 1e-5  # f32 results against the unsharded run: only the summation order differs.

# Every norm-based clipper, built with or without the cross-device arguments. The
# adaptive ones join when the package exports them; their hyperparameters make them
# clip within a few steps (short warm-ups, short histories).
_FIXED = ("clip_by_norm", "clip_by_global_norm")
_ADAPTIVE_KWARGS: dict[str, dict[str, Any]] = {
    "autoclip": dict(percentile=50.0, history=4),
    "zclip": dict(alpha=0.8, z_thresh=1.0, warmup_steps=2),
    "adagc": dict(lambda_rel=1.05, beta=0.9, warmup_steps=2),
    "quantile_clip": dict(target_quantile=0.5, learning_rate=0.5, initial_norm=1.0),
}


def adaptive_names() -> list[str]:
  """The adaptive clippers with ``axis_name`` that the package exports."""
  return [name for name in _ADAPTIVE_KWARGS if hasattr(clipjax, name)]


# Element-wise clip (its statistics and non-finite check are global) and block RMS.
_LOCAL = (("clip", float("inf")), ("clip_by_block_rms", 2))


def fixed_cases() -> list[tuple[str, float]]:
  return [(name, o) for name in _FIXED for o in ORDS]


def local_cases() -> list[tuple[str, float]]:
  return list(_LOCAL)


def all_cases() -> list[tuple[str, float]]:
  """(transform name, ord) for every norm-based clipper; adaptive ones at ord 2."""
  return fixed_cases() + local_cases() + [(name, 2) for name in adaptive_names()]


def make(name: str, ord: float, threshold: float, **dist: Any) -> optax.GradientTransformation:
  """The named clipper; ``dist`` holds ``axis_name``/``replicated`` (or nothing)."""
  if name in _FIXED:
    return getattr(clipjax, name)(threshold, ord=ord, **dist)
  if name == "clip":
    return clipjax.clip(threshold, min_delta=threshold / 50, axis_name=dist.get("axis_name"))
  if name == "clip_by_block_rms":
    return clipjax.clip_by_block_rms(threshold, **dist)
  assert ord == 2, name
  return getattr(clipjax, name)(**_ADAPTIVE_KWARGS[name], **dist)


# Gradient trees ----------------------------------------------------------------


def np_leaf_norms(tree: Any, ord: float) -> np.ndarray:
  """Float64 NumPy norm of every leaf, in ``jax.tree.leaves`` order."""
  out = []
  for leaf in jax.tree.leaves(tree):
    x = np.abs(np.asarray(leaf, np.float64)).ravel()
    if ord == 1:
      out.append(x.sum())
    elif ord == 2:
      out.append(np.sqrt((x * x).sum()))
    else:
      out.append(x.max(initial=0.0))
  return np.array(out)


def np_global_norm(tree: Any, ord: float) -> float:
  norms = np_leaf_norms(tree, ord)
  if ord == 1:
    return float(norms.sum())
  if ord == 2:
    return float(np.sqrt((norms**2).sum()))
  return float(norms.max())


def threshold_for(name: str, tree: Any, ord: float) -> float:
  """A threshold far from every norm: half the global norm, or a mid leaf norm."""
  if name == "clip_by_global_norm":
    return 0.5 * np_global_norm(tree, ord)
  if name == "clip":
    return 0.5 * np_global_norm(tree, float("inf"))
  if name == "clip_by_block_rms":
    rms = np.sort([np.sqrt(np.mean(np.square(np.asarray(x, np.float64))))
                   for x in jax.tree.leaves(tree)])
    return float(np.sqrt(rms[len(rms) // 2 - 1] * rms[len(rms) // 2]))
  norms = np.sort(np_leaf_norms(tree, ord))
  mid = len(norms) // 2
  return float(np.sqrt(norms[mid - 1] * norms[mid]))


def random_tree(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  # Leaves of different magnitudes, so per-leaf clipping clips some and not others.
  return {k: (rng.standard_normal(s) * (1.0 + 2.0 * i)).astype(np.float32)
          for i, (k, s) in enumerate(sorted(shapes.items()))}


# A spike at step 3 makes every adaptive clipper clip after its warm-up.
STEP_SCALES = (1.0, 1.3, 0.8, 9.0, 1.1, 0.7)


def step_trees(seed: int, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
  return [jax.tree.map(lambda x, s=s: (x * np.float32(s)), random_tree(seed + i, shapes))
          for i, s in enumerate(STEP_SCALES)]


def place(tree: Any, specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs,
                      is_leaf=lambda s: isinstance(s, P))


def groups() -> dict[str, list[tuple[str, float]]]:
  """The clippers tested together in one program (one compilation per group)."""
  out = {"fixed": fixed_cases(), "local": local_cases()}
  if adaptive_names():
    out["adaptive"] = [(name, 2) for name in adaptive_names()]
  return out


def side_by_side(txs: list[optax.GradientTransformation]) -> optax.GradientTransformation:
  """Several transforms on the same updates: a tuple of results and a tuple of states."""

  def init_fn(params):
    return tuple(tx.init(params) for tx in txs)

  def update_fn(updates, state, params=None):
    outs = [tx.update(updates, s, params) for tx, s in zip(txs, state)]
    return tuple(u for u, _ in outs), tuple(s for _, s in outs)

  return optax.GradientTransformation(init_fn, update_fn)


def bundle(cases: list[tuple[str, float]], thresholds: list[float],
           **dist: Any) -> optax.GradientTransformation:
  """Several clippers side by side on the same updates: a tuple of results and states."""
  return side_by_side([make(name, o, t, **dist) for (name, o), t in zip(cases, thresholds)])


def run_unsharded(tx: optax.GradientTransformation, steps: list[Any]) -> list[tuple[Any, Any]]:
  """``(updates, state)`` after each step of the plain single-device transform."""
  update = tx.update if hasattr(tx.update, "lower") else jax.jit(tx.update)  # jit once
  state = tx.init(steps[0])
  out = []
  for grads in steps:
    updates, state = update(grads, state)
    out.append((updates, state))
  return out


def assert_tree_close(actual: Any, expected: Any, rtol: float = RTOL, what: str = "") -> None:
  """Floats within ``rtol`` (relative), integers and bools equal, same structure."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  for (path, e), a in zip(paths, jax.tree.leaves(actual)):
    a, e = np.asarray(a), np.asarray(e)
    where = f"{what}{jax.tree_util.keystr(path)}"
    assert a.shape == e.shape and a.dtype == e.dtype, (where, a.shape, e.shape, a.dtype, e.dtype)
    if np.issubdtype(e.dtype, np.floating):
      # atol only absorbs round-off of values that are zero in exact arithmetic.
      np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-30, err_msg=where)
    else:
      np.testing.assert_array_equal(a, e, err_msg=where)


# HLO -----------------------------------------------------------------------------

# An all-reduce instruction is `all-reduce(` (synchronous) or `all-reduce-start(`
# (asynchronous, paired with an `all-reduce-done(` that is not counted). The opcode
# follows the result type and a space; instruction *names* like `%all-reduce.3` are
# never followed by "(".
_ALL_REDUCE = re.compile(r"\sall-reduce(?:-start)?\(")
_ALL_GATHER = re.compile(r"\sall-gather(?:-start)?\(")
_STABLEHLO_ALL_REDUCE = re.compile(r"stablehlo\.all_reduce")


def count_all_reduce(hlo_text: str) -> int:
  return len(_ALL_REDUCE.findall(hlo_text))


def count_all_gather(hlo_text: str) -> int:
  return len(_ALL_GATHER.findall(hlo_text))


def count_lowered_all_reduce(stablehlo_text: str) -> int:
  """All-reduces the program asks for, before XLA may combine several into one."""
  return len(_STABLEHLO_ALL_REDUCE.findall(stablehlo_text))


def all_reduce_branches(hlo_text: str) -> list[tuple[str, ...]]:
  """For each ``conditional`` whose branches hold all-reduces, the branches holding one.

  Also asserts that every all-reduce of the module sits in some conditional's branch.
  """
  owner, holders = None, []
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      owner = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
    elif _ALL_REDUCE.search(line):
      holders.append(owner)
  found = []
  for branches in re.findall(r"branch_computations=\{([^}]*)\}", hlo_text):
    names = tuple(n.strip() for n in branches.split(","))
    inside = tuple(n for n in names if n in holders)
    if inside:
      found.append(inside)
  assert sorted(h for group in found for h in group) == sorted(holders), (holders, found)
  return found


def compiled_texts(fn: Callable[..., Any], *args: Any) -> tuple[str, str]:
  """(lowered StableHLO, compiled HLO) of ``jax.jit(fn)`` at ``args``."""
  lowered = jax.jit(fn).lower(*args)
  return lowered.as_text(), lowered.compile().as_text()
