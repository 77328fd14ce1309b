"""The suite's XLA CPU code generator computes what the default one computes.

``conftest.py`` compiles the suite with XLA CPU's classic emitters
(``--xla_cpu_use_fusion_emitters=false``), which compile the suite's many small
programs in about half the time. Users run the default (fusion) emitters, so
this test runs every registry transform and the norms on rare inputs (overflow,
underflow, zeros, NaN, inf; float32, bfloat16, float16) in a subprocess with the
default emitters and compares with the same computed here: NaN and inf in the
same places, flags equal, values equal to the rounding of a reduction order.
The examples (``test_examples*.py``) run with the default emitters too.
"""

import os
import subprocess
import sys

import numpy as np

import _emitter_cases

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_emitter_cases.py")
FLAG = "--xla_cpu_use_fusion_emitters=false"


def test_suite_flags_use_the_classic_emitters():
  assert FLAG in os.environ["XLA_FLAGS"].split()


def test_default_emitters_give_the_suite_results(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if f != FLAG)
  env["PYTHONWARNINGS"] = "error"
  out = tmp_path / "default.npz"
  proc = subprocess.run([sys.executable, SCRIPT, str(out)], capture_output=True, text=True,
                        env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  theirs = np.load(out)
  ours = _emitter_cases.results()
  assert sorted(theirs.files) == sorted(ours)
  for key, mine in ours.items():
    other = theirs[key]
    assert other.dtype == mine.dtype and other.shape == mine.shape, key
    if not np.issubdtype(mine.dtype, np.floating):
      np.testing.assert_array_equal(other, mine, err_msg=key)
      continue
    np.testing.assert_array_equal(np.isnan(other), np.isnan(mine), err_msg=key)
    np.testing.assert_array_equal(np.isposinf(other), np.isposinf(mine), err_msg=key)
    np.testing.assert_array_equal(np.isneginf(other), np.isneginf(mine), err_msg=key)
    finite = np.isfinite(mine)
    np.testing.assert_allclose(other[finite], mine[finite], rtol=_rtol(key), atol=0, err_msg=key)


def _rtol(key):
  """A reduction order moves a float32 result by an ulp, and so an update's rounding."""
  leaf = key.rsplit("/", 1)[-1] if "/updates/" in key else None
  dtype = _emitter_cases.SHAPES[leaf][1] if leaf else "float32"
  return {"float32": 2e-6, "bfloat16": 1e-2, "float16": 2e-3}[dtype]
