"""Two processes joined with jax.distributed (gloo CPU collectives on 127.0.0.1).

Each process has 2 CPU devices; the gradients are sharded over all 4. The clip
computed across processes, under ``shard_map`` with ``axis_name`` and under plain
``jit`` (GSPMD), must equal the single-process result computed here.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import _dist_worker
from _dist_cases import assert_tree_close
from _dist_cases import bundle
from _dist_cases import run_unsharded

NUM_PROCESSES = 2
TIMEOUT = 100  # seconds for the whole group; a normal run takes well under 30
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dist_worker.py")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out_dir) -> list[str]:
  """Runs the workers to completion; returns their output, or fails showing it."""
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  procs = [subprocess.Popen(
      [sys.executable, WORKER, "--process-id", str(i), "--num-processes", str(NUM_PROCESSES),
       "--port", str(port), "--out", str(out_dir)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(NUM_PROCESSES)]
  outputs, failed = [], False
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT)
      outputs.append(out)
      failed |= p.returncode != 0
  except subprocess.TimeoutExpired:
    failed = True
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        out, _ = p.communicate()
        outputs.append(out)
  if failed:
    shown = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{out}"
                      for i, (p, out) in enumerate(zip(procs, outputs)))
    pytest.fail(f"the worker processes failed or timed out after {TIMEOUT}s:\n{shown}")
  return outputs


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
        for k, (name, o) in enumerate(cases):
          what = f"process {i} {kind} step {step} {name} ord={o}"
          prefix = f"{kind}/{step}/{k}"
          paths = jax.tree_util.tree_flatten_with_path(updates[k])[0]
          got = [r[f"{prefix}/updates{jax.tree_util.keystr(p)}"] for p, _ in paths]
          assert_tree_close(got, [x for _, x in paths], what=f"{what} updates")
          paths = jax.tree_util.tree_flatten_with_path(states[k])[0]
          got = [r[f"{prefix}/state{jax.tree_util.keystr(p)}"] for p, _ in paths]
          assert_tree_close(got, [np.asarray(x) for _, x in paths], what=f"{what} state")
  assert any(bool(s[0].stats.clipped) for _, s in expected)
