"""Two processes joined with jax.distributed (gloo CPU collectives on 127.0.0.1).

Each process has 2 CPU devices; the gradients are sharded over all 4. The clip
computed across processes, under ``shard_map`` with ``axis_name`` and under plain
``jit`` (GSPMD), must equal the single-process result computed here.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _dist_worker
from _dist_cases import assert_close
from _dist_cases import bundle
from _dist_cases import run_unsharded

NUM_PROCESSES = 2
TIMEOUT = 100  # seconds for the whole group; a normal run takes well under 30
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dist_worker.py")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out_dir, attempts=2) -> list[str]:
  """Runs the workers to completion; returns their output, or fails showing it.

  When one worker fails the others are stopped at once. The free port is only free
  when chosen: if another program takes it before the coordinator binds it, the group
  is started once more on a new port.
  """
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  env["PYTHONWARNINGS"] = "error"  # as in the test suite, a warning is an error
  logs = [out_dir / f"process_{i}.log" for i in range(NUM_PROCESSES)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, "--process-id", str(i), "--num-processes",
           str(NUM_PROCESSES), "--port", str(port), "--out", str(out_dir)],
          stdout=f, stderr=subprocess.STDOUT, env=env))
  deadline = time.monotonic() + TIMEOUT
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  outputs = [log.read_text() for log in logs]
  if all(p.returncode == 0 for p in procs):
    return outputs
  if attempts > 1 and any("Failed to start RPC server" in out for out in outputs):
    return _launch(out_dir, attempts - 1)
  shown = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{out}"
                    for i, (p, out) in enumerate(zip(procs, outputs)))
  pytest.fail(f"the worker processes failed (or ran over {TIMEOUT}s):\n{shown}")


@pytest.mark.slow
def test_two_processes_clip_like_one(tmp_path):
  outputs = _launch(tmp_path)
  results = [np.load(tmp_path / f"process_{i}.npz") for i in range(NUM_PROCESSES)]

  n_devices = _dist_worker.LOCAL_DEVICES * NUM_PROCESSES
  cases = _dist_worker.multiprocess_cases()
  steps = _dist_worker.multiprocess_steps(n_devices)
  thresholds = _dist_worker.multiprocess_thresholds(steps)
  expected = run_unsharded(bundle(cases, thresholds), steps)

  for i, r in enumerate(results):
    assert int(r["single/lowered_all_reduce"]) == 1, outputs[i]
    assert int(r["single/all_reduce"]) == 1, outputs[i]
    assert int(r["shard_map/all_gather"]) == 0 and int(r["jit/all_gather"]) == 0
    for kind in ("shard_map", "jit"):
      for step, (updates, states) in enumerate(expected):
        for k, (entry, o) in enumerate(cases):
          what = f"process {i} {kind} step {step} {entry} ord={o}"
          prefix = f"{kind}/{step}/{k}"
          paths = jax.tree_util.tree_flatten_with_path(updates[k])[0]
          got = [r[f"{prefix}/updates{jax.tree_util.keystr(p)}"] for p, _ in paths]
          assert_close(got, [x for _, x in paths], what=f"{what} updates")
          paths = jax.tree_util.tree_flatten_with_path(states[k])[0]
          got = [r[f"{prefix}/state{jax.tree_util.keystr(p)}"] for p, _ in paths]
          assert_close(got, [np.asarray(x) for _, x in paths], what=f"{what} state")
  assert any(bool(s[0].stats.clipped) for _, s in expected)
