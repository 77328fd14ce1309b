"""The multi-device examples run as documented, in their short mode, on fake CPU devices."""

import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TIMEOUT = 150


def _run(script, *args, warnings="error"):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the examples set their own device counts
  env["PYTHONWARNINGS"] = warnings  # as in the test suite, a warning is an error
  proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args],
                        capture_output=True, text=True, env=env, timeout=TIMEOUT)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{output}"
  return proc.stdout


def _check_training(out):
  assert "OK: loss decreased" in out, out
  first, last = map(float, re.search(r"^loss ([\d.]+) -> ([\d.]+)$", out, re.M).groups())
  assert last < 0.5 * first, out
  error = float(re.search(r"relative error ([\d.e+-]+)\)", out).group(1))
  assert error <= 1e-5, out
  steps = re.findall(r"^step +\d+ +loss [\d.]+ +grad norm +[\d.]+ +scale [\d.]+ +clipped "
                     r"(True|False)$", out, re.M)
  assert len(steps) >= 5 and "True" in steps, out


def test_shard_map_train_quick():
  out = _run("shard_map_train.py", "--quick")
  assert out.startswith("8 devices, mesh {'fsdp': 8}; w1 (16, 128) stored as (2, 128) per device")
  _check_training(out)


def test_pmap_train_quick():
  # jax.pmap is deprecated in favour of shard_map; a deprecation notice is not a failure.
  out = _run("pmap_train.py", "--quick", warnings="error,ignore::DeprecationWarning")
  assert out.startswith("8 devices, 16 examples each")
  assert "largest difference between parameter replicas: 0.0e+00" in out
  _check_training(out)


@pytest.mark.slow
def test_multihost_quick():
  out = _run("multihost.py", "--quick")
  assert "OK: all processes agree" in out, out
  for process in (0, 1):
    assert f"[{process}] process {process} of 2: 2 local devices of 4" in out, out
    lines = re.findall(rf"^\[{process}\] process {process} step \d+: .*$", out, re.M)
    assert len(lines) == 2, out
    for line in lines:
      assert line.count(": True") == 4 and "False" not in line, line
