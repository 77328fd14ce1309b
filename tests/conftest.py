"""Test set-up: 8 CPU devices before JAX starts, strict promotion, seeded Hypothesis."""

import os
import shutil
import tempfile

# JAX reads this once, when its CPU backend starts: it must be set before any
# test imports jax. Multi-device tests then always run on 8 CPU devices. The
# classic CPU emitters compile the suite's small programs in about half the time
# of the default fusion emitters; test_emitters.py checks that both compute the
# same. Flags already in XLA_FLAGS come later and win.
os.environ["XLA_FLAGS"] = " ".join(
    ["--xla_cpu_use_fusion_emitters=false", *os.environ.get("XLA_FLAGS", "").split(),
     "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("clipjax", derandomize=True, deadline=None, max_examples=30,
                          print_blob=True)
settings.load_profile("clipjax")


def pytest_configure(config):
  """One persistent XLA cache per run, shared by the xdist workers.

  Many tests compile the same program (a transform on the same tree); the
  cache compiles it once per run. It starts empty, so no run reuses another's.
  """
  if not hasattr(config, "workerinput"):  # the controller, or a run without xdist
    path = tempfile.mkdtemp(prefix="clipjax-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # inherited by the workers
    config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionstart(session):
  del session
  if jax.device_count() != 8:
    raise RuntimeError(
        f"the tests need 8 CPU devices, JAX has {jax.device_count()}: "
        "jax was imported before tests/conftest.py set XLA_FLAGS")


@pytest.fixture(autouse=True)
def _strict_promotion(request):
  """The library's own code must not rely on implicit dtype or rank promotion."""
  if request.node.get_closest_marker("loose_promotion"):
    yield
    return
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield
