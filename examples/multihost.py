"""Clipping across hosts with jax.distributed: one global norm over every device of every process.

Each process owns some devices; the gradients are sharded over all devices of all
processes. Under ``jax.shard_map``, ``clipjax.clip_by_global_norm(axis_name=...)``
reduces the per-leaf partial norms with one all-reduce that crosses processes, so
every process clips with the same, global norm. Each process checks that:

* the norm equals a float64 NumPy norm of the full (unsharded) gradients,
* every process measured the same norm and applied the same scale,
* plain ``jax.jit`` on the sharded arrays (GSPMD, no ``axis_name``) agrees.

Run on one machine, no accelerator needed (the default launches 2 local processes
with 2 fake CPU devices each, joined on 127.0.0.1 with gloo CPU collectives):

    python examples/multihost.py
    python examples/multihost.py --quick                      # as the tests run it
    python examples/multihost.py --num-processes 4 --cpu-devices 1

On real hosts, start one process per host, all with the same coordinator (host 0's
address and a free port) and their own ``--process-id``; ``--cpu-devices 0`` uses the
hosts' GPUs or TPUs:

    python examples/multihost.py --coordinator-address 10.0.0.1:1234 \\
        --num-processes 4 --process-id $RANK --cpu-devices 0

On a Cloud TPU pod slice (or under SLURM / Open MPI), ``jax.distributed.initialize()``
finds everything itself: run ``python examples/multihost.py --auto --cpu-devices 0``
on every worker, e.g. with ``gcloud compute tpus tpu-vm ssh NAME --worker=all
--command=...``.
"""

import argparse
import os
import socket
import subprocess
import sys

TIMEOUT = 180  # seconds the launcher waits for its processes


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--coordinator-address", default=None,
                      help="host:port of process 0 (default: launch local processes)")
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--process-id", type=int, default=None,
                      help="this process's rank; without it, launch --num-processes locally")
  parser.add_argument("--auto", action="store_true",
                      help="let jax.distributed.initialize() detect the cluster (TPU, SLURM)")
  parser.add_argument("--cpu-devices", type=int, default=2,
                      help="fake CPU devices per process (0: use the real devices)")
  parser.add_argument("--steps", type=int, default=None, help="clipping steps")
  parser.add_argument("--quick", action="store_true", help="a short run (2 steps)")
  parser.add_argument("--max-norm", type=float, default=1.0)
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 2 if args.quick else 10
  return args


def launch(args) -> int:
  """Starts ``--num-processes`` copies of this program on 127.0.0.1 and waits for them."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # each process sets its own device count
  common = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
            str(args.num_processes), "--cpu-devices", str(args.cpu_devices), "--steps",
            str(args.steps), "--max-norm", str(args.max_norm)]
  print(f"launching {args.num_processes} processes, coordinator 127.0.0.1:{port}", flush=True)
  # Separate pipes: each process sends native output (gloo's) to stderr and keeps
  # stdout for its own lines, so the two never interleave.
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--process-id", str(i),
                             *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
           for i in range(args.num_processes)]
  status = 0
  for i, p in enumerate(procs):
    try:
      out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out, err = p.communicate()
      print(f"process {i} timed out after {TIMEOUT}s")
    lines = out.splitlines() + [f"stderr: {line}" for line in err.splitlines()
                                if line.strip() and "[Gloo]" not in line
                                and "connected to" not in line]
    print("\n".join(f"[{i}] {line}" for line in lines), flush=True)
    status = status or p.returncode or 0
  print("OK: all processes agree" if status == 0 else f"FAILED (exit status {status})")
  return status


def _native_output_to_stderr() -> None:
  """Sends what native libraries print (gloo writes to stdout) to stderr.

  Python's own lines keep a private copy of stdout, so a native write can never
  land in the middle of one of them.
  """
  sys.stdout.flush()
  own = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(own, "w", buffering=1)


def run(args) -> int:
  """One process of the group: join, clip sharded gradients, check the results."""
  _native_output_to_stderr()
  import jax  # noqa: PLC0415 - configured before JAX starts its backend

  if args.cpu_devices > 0:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.auto:
    jax.distributed.initialize()
  else:
    host = args.coordinator_address.rsplit(":", 1)[0]
    # A local group listens on the loopback interface only; real hosts on all interfaces.
    bind = args.coordinator_address if host in ("127.0.0.1", "localhost") else None
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id,
                               coordinator_bind_address=bind)

  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import clipjax  # noqa: PLC0415

  me, n = jax.process_index(), jax.device_count()
  mesh = jax.make_mesh((n,), ("devices",))
  print(f"process {me} of {jax.process_count()}: {jax.local_device_count()} local devices "
        f"of {n}")

  # Sharded like FSDP keeps them; "bias" is small and replicated everywhere.
  shapes = {"kernel": (8 * n, 16), "proj": (32, 4 * n), "bias": (16,)}
  specs = {"kernel": P("devices"), "proj": P(None, "devices"), "bias": P()}
  replicated = {"kernel": False, "proj": False, "bias": True}

  def gradients(step):
    # Every process draws the same full arrays and keeps only its own shards; in
    # training each process would compute the shards of its own devices.
    r = np.random.default_rng(step)
    return {k: (r.standard_normal(s) * (1 + 3 * (step % 3))).astype(np.float32)
            for k, s in sorted(shapes.items())}

  def to_global(tree):
    return {k: jax.make_array_from_callback(x.shape, NamedSharding(mesh, specs[k]),
                                            lambda index, x=x: x[index])
            for k, x in tree.items()}

  tx = clipjax.clip_by_global_norm(args.max_norm, axis_name="devices", replicated=replicated)
  clip = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()),
                               out_specs=(specs, P())))
  gspmd = clipjax.clip_by_global_norm(args.max_norm)  # plain jit on sharded arrays
  clip_gspmd = jax.jit(gspmd.update)
  replicate = lambda tree: jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), NamedSharding(mesh, P()),
                                             lambda index, x=x: np.asarray(x)[index]), tree)
  state, state_gspmd = replicate(tx.init(None)), replicate(gspmd.init(None))
  local = lambda x: float(np.asarray(x.addressable_data(0)))  # a replicated scalar

  ok = True
  for step in range(args.steps):
    full = gradients(step)
    expected = float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in full.values())))
    updates, state = clip(to_global(full), state)
    _, state_gspmd = clip_gspmd(to_global(full), state_gspmd)
    norm, scale = local(state.stats.norm), local(state.stats.scale)
    clipped_norm = local(jax.jit(clipjax.global_norm)(updates))  # GSPMD reduces the shards
    every_norm = np.asarray(multihost_utils.process_allgather(
        np.asarray(norm, np.float32)))  # what each process measured
    checks = {
        "matches NumPy": abs(norm - expected) <= 1e-5 * expected,
        "same on every process": bool(np.all(every_norm == every_norm[0])),
        "plain jit agrees": abs(local(state_gspmd.stats.norm) - norm) <= 1e-5 * norm,
        "clipped to max_norm": abs(clipped_norm - min(expected, args.max_norm))
                               <= 1e-5 * args.max_norm,
    }
    ok &= all(checks.values())
    print(f"process {me} step {step}: global norm {norm:.4f} (NumPy {expected:.4f}), "
          f"scale {scale:.4f}, after clipping {clipped_norm:.4f}; "
          + ", ".join(f"{k}: {v}" for k, v in checks.items()), flush=True)
  jax.distributed.shutdown()
  return 0 if ok else 1


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.process_id is None and not args.auto:
    if args.coordinator_address is not None:
      raise SystemExit("--coordinator-address needs --process-id (or omit both to launch "
                       "local processes)")
    return launch(args)
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
