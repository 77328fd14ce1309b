"""One process of the two-process test (tests/test_multiprocess.py); not a test itself.

Run as ``python tests/_dist_worker.py --process-id I --num-processes N --port P --out DIR``:
joins the others through ``jax.distributed`` on 127.0.0.1 with 2 CPU devices and gloo
collectives, clips gradients sharded over every device of every process, and writes
the gathered results to ``DIR/process_I.npz``.
"""

import argparse
import os
import sys

LOCAL_DEVICES = 2


def _configure_environment() -> None:
  """CPU only, and no device count inherited from the parent (it has 8 devices)."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  _configure_environment()

  import jax  # noqa: PLC0415 - configured above, before JAX starts
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import _dist_cases  # noqa: PLC0415 - beside this file
  import clipjax  # noqa: PLC0415

  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{args.port}"
  jax.distributed.initialize(coordinator_address=address, coordinator_bind_address=address,
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=60)
  n = jax.device_count()
  assert n == LOCAL_DEVICES * args.num_processes, jax.devices()
  assert jax.local_device_count() == LOCAL_DEVICES
  mesh = jax.make_mesh((n,), ("d",))

  cases = multiprocess_cases()
  steps = multiprocess_steps(n)
  thresholds = multiprocess_thresholds(steps)
  specs = multiprocess_specs()

  def global_array(x, spec):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

  def place(tree):
    return jax.tree.map(global_array, tree, specs)

  results = {}
  # One clipper alone: its compiled program holds one all-reduce, across processes too.
  single = clipjax.clip_by_global_norm(1.0, axis_name="d", replicated=REPLICATED)
  single_fn = jax.shard_map(single.update, mesh=mesh, in_specs=(specs, P()),
                            out_specs=(specs, P()))
  lowered, compiled = _dist_cases.compiled_texts(
      single_fn, place(steps[0]), jax.tree.map(lambda x: global_array(x, P()),
                                               single.init(steps[0])))
  results["single/lowered_all_reduce"] = np.int64(_dist_cases.count_lowered_all_reduce(lowered))
  results["single/all_reduce"] = np.int64(_dist_cases.count_all_reduce(compiled))
  # shard_map with axis_name, and plain jit on sharded arrays (GSPMD), over all processes.
  sharded = _dist_cases.bundle(cases, thresholds, axis_name="d", replicated=REPLICATED)
  out_specs = tuple(specs for _ in cases)
  shard_map_step = jax.jit(jax.shard_map(sharded.update, mesh=mesh, in_specs=(specs, P()),
                                         out_specs=(out_specs, P())))
  plain = _dist_cases.bundle(cases, thresholds)
  jit_step = jax.jit(plain.update)
  for kind, tx, step in (("shard_map", sharded, shard_map_step), ("jit", plain, jit_step)):
    state = jax.tree.map(lambda x: global_array(x, P()), tx.init(steps[0]))
    step = step.lower(place(steps[0]), state).compile()  # run what is inspected
    results[f"{kind}/all_reduce"] = np.int64(_dist_cases.count_all_reduce(step.as_text()))
    results[f"{kind}/all_gather"] = np.int64(_dist_cases.count_all_gather(step.as_text()))
    outputs = []
    for tree in steps:
      updates, state = step(place(tree), state)
      for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        spec = specs[path[-1].key]
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), path
      outputs.append((updates, state))
    # Every process gets the full results, in one collective call.
    gathered = multihost_utils.process_allgather(outputs, tiled=True)
    for i, (updates, state) in enumerate(gathered):
      for k in range(len(cases)):
        for name, tree in (("updates", updates[k]), ("state", state[k])):
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            results[f"{kind}/{i}/{k}/{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  np.savez(os.path.join(args.out, f"process_{args.process_id}.npz"), **results)
  print(f"process {args.process_id}: {len(results)} results, "
        f"one clipper compiles to {results['single/all_reduce']} all-reduce", flush=True)
  jax.distributed.shutdown()


# What the workers compute; the test builds the single-process reference from the same.
REPLICATED = {"kernel": False, "proj": False, "bias": True}


def multiprocess_specs():
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  return {"kernel": P("d"), "proj": P(None, "d"), "bias": P()}


def multiprocess_cases():
  import _dist_cases  # noqa: PLC0415
  return _dist_cases.all_cases()


def multiprocess_steps(n_devices):
  import _dist_cases  # noqa: PLC0415
  shapes = {"kernel": (4 * n_devices, 3), "proj": (5, 2 * n_devices), "bias": (3,)}
  return _dist_cases.step_trees(7, shapes)


def multiprocess_thresholds(steps):
  import _dist_cases  # noqa: PLC0415
  return [_dist_cases.threshold_for(entry, steps[0], o) for entry, o in multiprocess_cases()]


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main()
