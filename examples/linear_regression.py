"""Linear regression with gradient clipping, checked against the closed-form solution.

Seeded synthetic data ``y = X w + b + noise`` with a few gross outliers in the
targets (their gradients are what clipping tames). The model is fitted by
full-batch gradient descent with momentum through

  optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(schedule, momentum=0.9))

with a ``clipjax.inverse_time_decay`` learning rate. Clipping changes the path,
not the minimum: once the gradient norm falls below the threshold the clipper
is the identity, so the fit must land on the least-squares solution from
``np.linalg.lstsq``. The script prints the largest coefficient error, the
fraction of steps clipped (from ``clipjax.clip_stats``) and asserts the error
is below 1e-2.

Run it with::

  python examples/linear_regression.py
  python examples/linear_regression.py --quick   # fewer steps, same check
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import clipjax

TOLERANCE = 1e-2


def make_data(seed: int, n: int = 256, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=d).astype(np.float32)
  y = x @ w + 0.5 + 0.1 * rng.normal(size=n).astype(np.float32)
  y[:4] += 100.0  # outliers: a huge gradient at the start
  return x, y.astype(np.float32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps (for tests)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  steps = 1000 if args.quick else 3000

  x, y = make_data(args.seed)
  # Closed form: least squares on [X, 1], in float64.
  design = np.concatenate([x, np.ones((x.shape[0], 1), np.float32)], axis=1).astype(np.float64)
  exact, *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)

  def loss_fn(params, x, y):
    return 0.5 * jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

  tx = optax.chain(
      clipjax.clip_by_global_norm(1.0),
      optax.sgd(clipjax.inverse_time_decay(0.1, decay_steps=1000), momentum=0.9),
  )
  params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
  x, y = jnp.asarray(x), jnp.asarray(y)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(loss_fn)(params, x, y)
      updates, state = tx.update(grads, state, params)
      stats = clipjax.clip_stats(state)
      return (optax.apply_updates(params, updates), state), (
          stats["clip_by_global_norm/norm"], stats["clip_by_global_norm/clipped"])

    (params, _), trace = lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, trace

  params, (norms, clipped) = fit(params)
  fitted = np.concatenate([np.asarray(params["w"]), np.asarray(params["b"])[None]])
  error = float(np.max(np.abs(fitted - exact)))
  print(f"{steps} steps; gradient norm {float(norms[0]):.2f} at the start, "
        f"{float(norms[-1]):.2e} at the end; clipped on "
        f"{int(clipped.sum())} steps ({100 * float(clipped.mean()):.1f}%)")
  print(f"closed form: {np.array2string(exact, precision=4)}")
  print(f"fitted:      {np.array2string(fitted, precision=4)}")
  print(f"max |fitted - closed form| = {error:.2e} (tolerance {TOLERANCE:g})")
  assert error < TOLERANCE, f"error {error:.3e} is above {TOLERANCE:g}"
  print("OK: gradient descent with clipping reaches the least-squares solution")


if __name__ == "__main__":
  main()
