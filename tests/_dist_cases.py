"""Shared pieces of the multi-device tests: the cases, gradient trees, HLO counting."""

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import registry
from _trees import assert_tree_close
from _trees import random_tree

RTOL = 1e-5  # f32 results against the unsharded run: only the summation order differs.
# Floats within RTOL, integers and bools equal, same structure; atol only absorbs
# round-off of values that are zero in exact arithmetic.
assert_close = functools.partial(assert_tree_close, rtol=RTOL, atol=1e-30)

# A case: a registry entry and the ord it is built with (None when it takes no ord).
Case = tuple[registry.Entry, float | None]


def all_cases() -> list[Case]:
  """Every clipper with cross-device arguments, at each ord it takes."""
  entries = registry.select(lambda e: e.dist is not None and not e.needs_params)
  return [(entry, o) for entry in entries for o in (entry.ords or (None,))]


def groups() -> dict[str, list[Case]]:
  """The clippers tested together in one program (one compilation per group).

  "fixed": fixed thresholds with an ``ord``; "local": fixed thresholds without
  one (element-wise, block RMS); "adaptive": thresholds from running statistics.
  """
  cases = all_cases()
  out = {"fixed": [c for c in cases if c[0].memoryless and c[0].ords],
         "local": [c for c in cases if c[0].memoryless and not c[0].ords],
         "adaptive": [c for c in cases if not c[0].memoryless]}
  assert all(out.values()), out
  return out


def make(entry: registry.Entry, ord: float | None = None, threshold: float | None = None,
         **dist: Any) -> optax.GradientTransformation:
  """The clipper of a case; ``dist`` holds ``axis_name``/``replicated`` (or nothing).

  Of ``dist``, only the arguments the factory takes are passed.
  """
  spec = entry.dist
  kwargs = {**spec.kwargs, **{k: factor * threshold for k, factor in spec.scaled.items()}}
  if ord is not None:
    kwargs["ord"] = ord
  return entry.make(**kwargs, **{k: v for k, v in dist.items() if k in spec.args})


def threshold_for(entry: registry.Entry, tree: Any, ord: float | None) -> float | None:
  """A threshold far from every norm of ``tree``; None for an adaptive clipper."""
  pick = entry.dist.threshold
  return None if pick is None else pick(tree, ord)


# Gradient trees ----------------------------------------------------------------


def graded_tree(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Host float32 leaves in sorted order, leaf i scaled by 1 + 2i.

  Leaves of different magnitudes, so per-leaf clipping clips some and not others.
  """
  shapes = dict(sorted(shapes.items()))
  scales = [1.0 + 2.0 * i for i in range(len(shapes))]
  return jax.tree.map(np.asarray, random_tree(seed, shapes, scale=scales))


# A spike at step 3 makes every adaptive clipper clip after its warm-up.
STEP_SCALES = (1.0, 1.3, 0.8, 9.0, 1.1, 0.7)


def step_trees(seed: int, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
  return [jax.tree.map(lambda x, s=s: (x * np.float32(s)), graded_tree(seed + i, shapes))
          for i, s in enumerate(STEP_SCALES)]


def place(tree: Any, specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs,
                      is_leaf=lambda s: isinstance(s, P))


def side_by_side(txs: list[optax.GradientTransformation]) -> optax.GradientTransformation:
  """Several transforms on the same updates: a tuple of results and a tuple of states."""

  def init_fn(params):
    return tuple(tx.init(params) for tx in txs)

  def update_fn(updates, state, params=None):
    outs = [tx.update(updates, s, params) for tx, s in zip(txs, state)]
    return tuple(u for u, _ in outs), tuple(s for _, s in outs)

  return optax.GradientTransformation(init_fn, update_fn)


def bundle(cases: list[Case], thresholds: list[float | None],
           **dist: Any) -> optax.GradientTransformation:
  """Several clippers side by side on the same updates: a tuple of results and states."""
  return side_by_side([make(entry, o, t, **dist)
                       for (entry, o), t in zip(cases, thresholds, strict=True)])


def run_unsharded(tx: optax.GradientTransformation, steps: list[Any]) -> list[tuple[Any, Any]]:
  """``(updates, state)`` after each step of the plain single-device transform."""
  update = tx.update if hasattr(tx.update, "lower") else jax.jit(tx.update)  # jit once
  state = tx.init(steps[0])
  out = []
  for grads in steps:
    updates, state = update(grads, state)
    out.append((updates, state))
  return out


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


# Under sharded jit the partitioner turns a variadic reduction over a sharded leaf
# (the NaN-keeping max) into an all-gather of one reduced value per device: that
# gathers partials, not gradients.
_PARTIAL_GATHER = re.compile(
    r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(.*op_name=\"[^\"]*/reduce\"")
_PARTITIONS = re.compile(r"num_partitions=(\d+)")


def count_all_gather(hlo_text: str) -> int:
  """All-gathers of data, leaving out the partitioner's gathers of one reduced value per device."""
  found = _PARTITIONS.search(hlo_text)
  devices = int(found.group(1)) if found else 1
  count = 0
  for line in hlo_text.splitlines():
    if not _ALL_GATHER.search(line):
      continue
    partial = _PARTIAL_GATHER.search(line)
    if partial and math.prod(int(d) for d in partial.group(1).split(",") if d) <= devices:
      continue
    count += 1
  return count


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
