"""FSDP-style training under shard_map, clipped by the global norm across devices.

A small MLP regressor whose weight matrices and hidden bias are sharded over the
devices along their first axis (FSDP: each device stores 1/N of every parameter and
all-gathers a layer's weights to use them); the batch is sharded over the same
devices. The output bias ``b2`` is small and stays replicated.

Inside ``jax.shard_map`` each device only holds its shard of every gradient, so a
plain global-norm clip would clip with the norm of 1/N of the gradient. Here

    clipjax.clip_by_global_norm(1.0, axis_name="fsdp", replicated=REPLICATED)

reduces the per-leaf partial norms of all leaves with one ``psum``, and counts the
replicated ``b2`` once rather than once per device. The first step checks the
clip's norm against the norm of the gradient computed on one device, unsharded.

Run on a CPU-only machine (8 CPU devices are faked before JAX starts):

    python examples/shard_map_train.py             # 300 steps
    python examples/shard_map_train.py --quick     # 40 steps, as the tests run it
    python examples/shard_map_train.py --cpu-devices 4

On GPUs or a TPU slice, use the real devices: ``--cpu-devices 0``. The mesh spans
every device JAX sees (``jax.devices()``); under ``jax.distributed`` that is every
device of every host.
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
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import clipjax  # noqa: PLC0415

  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("fsdp",))
  d_in, hidden, batch = 2 * n, 16 * n, 32 * n

  # Parameters: FSDP shards along the first axis; b2 is replicated.
  specs = {"w1": P("fsdp"), "b1": P("fsdp"), "w2": P("fsdp"), "b2": P()}
  replicated = {"w1": False, "b1": False, "w2": False, "b2": True}

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
    x = r.standard_normal((batch, d_in)).astype(np.float32)
    y = np.sin(x @ direction) + 0.05 * r.standard_normal((batch, 1)).astype(np.float32)
    return x, y.astype(np.float32)

  def forward(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]

  def local_loss(shards, x, y):
    # Gather each sharded parameter for use; the transpose of all_gather reduce-scatters
    # the gradient back to shards. b2 is replicated, its gradient is summed by shard_map.
    full = {k: (v if k == "b2" else lax.all_gather(v, "fsdp", tiled=True))
            for k, v in shards.items()}
    return jnp.sum((forward(full, x) - y) ** 2) / batch  # this device's part of the mean

  tx = optax.chain(
      clipjax.clip_by_global_norm(args.max_norm, axis_name="fsdp", replicated=replicated),
      optax.adam(1e-2),
  )
  opt_state = tx.init(params)
  # Adam's moments are sharded like the parameters; counts and statistics are replicated.
  state_specs = optax.tree_map_params(tx, lambda _, spec: spec, opt_state, specs,
                                      transform_non_params=lambda _: P(),
                                      is_leaf=lambda x: isinstance(x, P))

  def train_step(shards, opt_state, x, y):
    loss, grads = jax.value_and_grad(local_loss)(shards, x, y)
    updates, opt_state = tx.update(grads, opt_state, shards)
    return optax.apply_updates(shards, updates), opt_state, lax.psum(loss, "fsdp"), grads

  data_spec = P("fsdp")
  step_fn = jax.jit(jax.shard_map(
      train_step, mesh=mesh, in_specs=(specs, state_specs, data_spec, data_spec),
      out_specs=(specs, state_specs, P(), specs)))

  def put(tree, tree_specs):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree,
                        tree_specs, is_leaf=lambda x: isinstance(x, P))

  shards = put(params, specs)
  opt_state = put(opt_state, state_specs)
  print(f"{n} devices, mesh {dict(mesh.shape)}; w1 {params['w1'].shape} stored as "
        f"{shards['w1'].addressable_shards[0].data.shape} per device")

  losses, clipped_steps = [], 0
  for step in range(args.steps):
    x, y = make_batch(step)
    shards, opt_state, loss, grads = step_fn(shards, opt_state, put(x, data_spec),
                                             put(y, data_spec))
    stats = clipjax.clip_stats(opt_state)
    losses.append(float(loss))
    clipped_steps += bool(stats["clip_by_global_norm/clipped"])
    if step == 0:
      # The clip measured the norm of the whole gradient, as one device would.
      full_grads = jax.grad(lambda p: jnp.mean(jnp.sum((forward(p, x) - y) ** 2, axis=1)))(
          params)
      reference = float(clipjax.global_norm(jax.device_get(full_grads)))
      measured = float(stats["clip_by_global_norm/norm"])
      error = abs(measured - reference) / reference
      print(f"step 0: global norm across devices {measured:.6f}, "
            f"single-device reference {reference:.6f} (relative error {error:.1e})")
      if error > 1e-5:
        print("ERROR: the sharded norm differs from the single-device norm")
        return 1
    if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {losses[-1]:.4f}  "
            f"grad norm {float(stats['clip_by_global_norm/norm']):8.4f}  "
            f"scale {float(stats['clip_by_global_norm/scale']):.3f}  "
            f"clipped {bool(stats['clip_by_global_norm/clipped'])}")

  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  print(f"clipped on {clipped_steps} of {args.steps} steps (max_norm={args.max_norm})")
  print(f"loss {first:.4f} -> {last:.4f}")
  if not last < 0.5 * first:
    print("ERROR: the loss did not decrease")
    return 1
  print("OK: loss decreased")
  return 0


if __name__ == "__main__":
  sys.exit(main())
