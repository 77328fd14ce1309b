"""Data-parallel training with jax.pmap: average the gradients, then clip them.

Every device holds a full copy of the parameters and a slice of the batch. The
gradients are averaged across devices with ``lax.pmean``; after that every device
holds the same, complete gradient, so the clip needs no ``axis_name``: each device
computes the same global norm and the replicas stay identical. (Clipping *before*
the ``pmean`` would clip each device's partial gradient with its own norm; with
``axis_name`` on already-averaged gradients every leaf would be counted once per
device unless marked ``replicated=True``.)

``jax.pmap`` still works but new code should prefer ``jax.shard_map``
(examples/shard_map_train.py).

Run on a CPU-only machine (8 CPU devices are faked before JAX starts):

    python examples/pmap_train.py             # 300 steps
    python examples/pmap_train.py --quick     # 40 steps, as the tests run it

On several GPUs or TPU cores, use the real devices: ``--cpu-devices 0``.
"""

import argparse
import sys


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a short run (40 steps)")
  parser.add_argument("--steps", type=int, default=None, help="training steps")
  parser.add_argument("--cpu-devices", type=int, default=8,
                      help="fake this many CPU devices (0: use the real devices)")
  parser.add_argument("--max-norm", type=float, default=1.0, help="global clipping norm")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 40 if args.quick else 300
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # noqa: PLC0415 - the device count is set before JAX starts its backend

  if args.cpu_devices > 0:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)

  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from jax import lax  # noqa: PLC0415

  import clipjax  # noqa: PLC0415

  n = jax.local_device_count()
  d_in, hidden, per_device = 8, 32, 16

  rng = np.random.default_rng(args.seed)
  params = {
      "w1": rng.standard_normal((d_in, hidden)).astype(np.float32) / np.sqrt(d_in),
      "b1": np.zeros((hidden,), np.float32),
      "w2": rng.standard_normal((hidden, 1)).astype(np.float32) / np.sqrt(hidden),
      "b2": np.full((1,), 3.0, np.float32),  # a bad start: the first gradients are large
  }
  direction = rng.standard_normal((d_in, 1)).astype(np.float32)

  def make_batch(step):
    r = np.random.default_rng((args.seed, step))
    x = r.standard_normal((n, per_device, d_in)).astype(np.float32)
    y = np.sin(x @ direction) + 0.05 * r.standard_normal((n, per_device, 1))
    return x, y.astype(np.float32)

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean(jnp.sum((h @ p["w2"] + p["b2"] - y) ** 2, axis=-1))

  tx = optax.chain(clipjax.clip_by_global_norm(args.max_norm), optax.adam(1e-2))

  def train_step(p, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    grads = lax.pmean(grads, "batch")  # every device now holds the full mean gradient
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, lax.pmean(loss, "batch")

  step_fn = jax.pmap(train_step, axis_name="batch")
  replicate = lambda tree: jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), tree)
  p, opt_state = replicate(params), replicate(tx.init(params))
  print(f"{n} devices, {per_device} examples each")

  losses, clipped_steps = [], 0
  for step in range(args.steps):
    x, y = make_batch(step)
    p, opt_state, loss = step_fn(p, opt_state, x, y)
    stats = jax.tree.map(lambda s: s[0], clipjax.clip_stats(opt_state))
    losses.append(float(loss[0]))
    clipped_steps += bool(stats["clip_by_global_norm/clipped"])
    if step == 0:
      # The clip saw the gradient of the whole batch, as one device would.
      reference = float(clipjax.global_norm(jax.grad(loss_fn)(
          params, x.reshape(-1, d_in), y.reshape(-1, 1))))
      measured = float(stats["clip_by_global_norm/norm"])
      error = abs(measured - reference) / reference
      print(f"step 0: norm of the averaged gradient {measured:.6f}, whole-batch reference "
            f"{reference:.6f} (relative error {error:.1e})")
      if error > 1e-5:
        print("ERROR: the averaged gradient's norm differs from the whole-batch norm")
        return 1
    if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {losses[-1]:.4f}  "
            f"grad norm {float(stats['clip_by_global_norm/norm']):8.4f}  "
            f"scale {float(stats['clip_by_global_norm/scale']):.3f}  "
            f"clipped {bool(stats['clip_by_global_norm/clipped'])}")

  # Same gradients and same clip on every device: the replicas never drift apart.
  drift = max(float(np.max(np.abs(np.asarray(v) - np.asarray(v)[0])))
              for v in jax.tree.leaves(p))
  print(f"largest difference between parameter replicas: {drift:.1e}")
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  print(f"clipped on {clipped_steps} of {args.steps} steps (max_norm={args.max_norm})")
  print(f"loss {first:.4f} -> {last:.4f}")
  if drift != 0.0 or not last < 0.5 * first:
    print("ERROR: the replicas drifted apart or the loss did not decrease")
    return 1
  print("OK: loss decreased")
  return 0


if __name__ == "__main__":
  sys.exit(main())
