"""What ``test_emitters.py`` compares between XLA CPU's two code generators; not a test itself.

Run as ``python tests/_emitter_cases.py OUT.npz``: computes :func:`results` with
the XLA flags of the environment and saves them.
"""

import os
import sys

import numpy as np

F32, BF16, F16 = "float32", "bfloat16", "float16"
# Leaves of three dtypes, and steps that reach every rare path: overflow, values whose
# squares underflow, exact zeros, NaN and inf, and a long ordinary leaf (its reduction
# order is the code generator's).
SHAPES = {"w": ((5, 4), F32), "h": ((6,), BF16), "k": ((2, 3, 2), F16), "long": ((4096,), F32)}
STEPS = [("normal", 1.0), ("large", 1e20), ("tiny", 1e-25), ("zero", 0.0), ("nan", 1.0),
         ("inf", 1.0), ("after", 2.0)]


def _tree(jnp, seed, scale, poison=None):
  rng = np.random.default_rng(seed)
  out = {}
  for key, (shape, dtype) in SHAPES.items():
    values = rng.normal(size=shape) * scale
    if poison is not None and key == "w":
      values.flat[3] = poison
    # Large steps stay inside the leaf's dtype: float16 saturates at 65504.
    limit = float(jnp.finfo(dtype).max) / 4
    out[key] = jnp.asarray(np.clip(values, -limit, limit), dtype)
  return out


def results() -> dict[str, np.ndarray]:
  """Updates and statistics of every registry transform over :data:`STEPS`, and the norms."""
  import jax  # noqa: PLC0415 - after the caller has set the XLA flags
  import jax.numpy as jnp  # noqa: PLC0415

  import clipjax  # noqa: PLC0415
  import registry  # noqa: PLC0415

  params = _tree(jnp, 99, 1.0)
  steps = [(name, _tree(jnp, i, scale, {"nan": np.nan, "inf": np.inf}.get(name)))
           for i, (name, scale) in enumerate(STEPS)]
  out = {}
  for entry in registry.ENTRIES:
    tx = entry.build()
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step, grads in steps:
      updates, state = update(grads, state, params)
      for key, leaf in updates.items():
        out[f"{entry.id}/{step}/updates/{key}"] = np.asarray(leaf.astype(jnp.float32))
      for key, value in clipjax.clip_stats(state).items():
        out[f"{entry.id}/{step}/stats/{key}"] = np.asarray(value)
  for step, grads in steps:
    for ord in (1, 2, np.inf):
      out[f"global_norm/{ord}/{step}"] = np.asarray(jax.jit(
          lambda g, o=ord: clipjax.global_norm(g, ord=o))(grads))
      out[f"leaf_norms/{ord}/{step}"] = np.asarray(jax.jit(
          lambda g, o=ord: clipjax.leaf_norms(g, ord=o))(grads))
    out[f"unitwise_norm/{step}"] = np.asarray(jax.jit(clipjax.unitwise_norm)(grads["w"]))
  return out


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  np.savez(sys.argv[1], **results())
