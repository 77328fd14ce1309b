"""Every example runs in its quick mode, as a user would run it, and prints what it promises."""

import math
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user has; not the suite's eight
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONWARNINGS"] = "error"  # as in the test suite, a warning is an error
  proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                        text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


def test_compare_clipping(tmp_path):
  out = run_example("compare_clipping.py", "--quick", "--out", str(tmp_path))
  header = out.index("method")
  assert "train loss" in out[header:] and "test acc" in out[header:]
  for name in ["none", "value", "per-tensor norm", "global norm", "global norm + floor", "AGC",
               "AutoClip", "ZClip", "AdaGC", "quantile"]:
    assert f"\n{name} " in out, name
  png = tmp_path / "compare_clipping_quick.png"
  assert f"plot written to {png}" in out
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.parametrize("name", ["flax_linen_trainstate.py", "flax_nnx.py"])
def test_flax(name):
  out = run_example(name, "--quick")
  epochs = [line for line in out.splitlines() if line.startswith("epoch")]
  assert len(epochs) == 2
  for line in epochs:
    assert "clip_by_global_norm: norm" in line and "clipped" in line
  accuracy = float(out.split("final test accuracy: ")[1].split("%")[0])
  assert accuracy > 50.0  # two epochs; the full run reaches >= 90% and checks it itself


def test_linear_regression():
  out = run_example("linear_regression.py", "--quick")
  error = float(out.split("max |fitted - closed form| = ")[1].split()[0])
  assert error < 1e-2
  assert "OK:" in out


def test_transformer_lm(tmp_path):
  out = run_example("transformer_lm.py", "--quick", "--out", str(tmp_path))
  lines = out[out.index("\nmethod") + 1:].splitlines()
  assert lines[0].split() == ["method", "val", "bpc", "spikes", "clipped", "skipped", "max", "|g|",
                              "time", "[s]"]
  assert set(lines[1]) == {"-"}
  # Per method: does it report clipped steps, skipped steps?
  expected = {"none": (False, False), "global norm 1.0": (True, False), "ZClip": (True, False),
              "AdaGC": (True, False), "skip spikes": (False, True),
              "ZClip + skip spikes": (True, True)}
  rows = {}
  for line in lines[2:2 + len(expected)]:
    name, *cells = line.rsplit(maxsplit=6)
    rows[name.strip()] = cells
  assert list(rows) == list(expected)
  for name, (clips, skips) in expected.items():
    val_bpc, spikes, clipped, skipped, max_norm, seconds = rows[name]
    for number in (val_bpc, max_norm, seconds):
      assert math.isfinite(float(number)), (name, number)
    assert 0 < float(val_bpc) < 8 and int(spikes) >= 0
    for reported, cell in ((clips, clipped), (skips, skipped)):
      assert (0 <= int(cell) <= 30) if reported else cell == "-", (name, cell)
  assert "a training loss above 1.5x the median of the 50 steps before it" in out  # the definition
  png = tmp_path / "transformer_lm_quick.png"
  assert f"plot written to {png}" in out
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
