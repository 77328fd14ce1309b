"""The sdist and the wheel, built offline through hatchling's PEP 517 hooks, hold what they should.

The hooks are what pip and ``python -m build`` call; calling them directly
needs no network and no build isolation (hatchling is in the ``test`` extra).
"""

import pathlib
import tarfile
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

hatchling_build = pytest.importorskip("hatchling.build", reason="hatchling is in the test extra")


def _version() -> str:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """``(sdist names, wheel names, wheel METADATA)``, each name relative to the archive's root."""
  out = tmp_path_factory.mktemp("dist")
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(ROOT)  # the hooks build the project in the working directory
    sdist = out / hatchling_build.build_sdist(str(out))
    wheel = out / hatchling_build.build_wheel(str(out))
  with tarfile.open(sdist) as archive:
    top = f"clipjax-{_version()}/"
    sdist_names = {name.removeprefix(top) for name in archive.getnames() if name != top[:-1]}
  with zipfile.ZipFile(wheel) as archive:
    wheel_names = set(archive.namelist())
    metadata = archive.read(f"clipjax-{_version()}.dist-info/METADATA").decode()
  return sdist_names, wheel_names, metadata


def test_sdist_holds_the_package_tests_examples_and_docs(built):
  names = built[0]
  for required in ("clipjax/__init__.py", "clipjax/py.typed", "tests/conftest.py",
                   "tests/test_packaging.py", "README.md", "LICENSE", "BUILD_NOTES.md",
                   "pyproject.toml", "PKG-INFO"):
    assert required in names, required
  for folder in ("examples/", "benchmarks/"):
    assert any(name.startswith(folder) for name in names), folder
  if (ROOT / "docs").is_dir():
    assert any(name.startswith("docs/") for name in names)


def test_sdist_leaves_out_ci_and_build_debris(built):
  names = built[0]
  assert not [name for name in names if name == ".ci" or name.startswith(".ci/")]
  assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
  assert not [name for name in names if name.startswith((".venv/", ".git/"))]


def test_wheel_holds_the_package_typing_marker_and_license(built):
  _, names, _ = built
  assert "clipjax/__init__.py" in names
  assert "clipjax/py.typed" in names
  assert f"clipjax-{_version()}.dist-info/licenses/LICENSE" in names
  # Only the package: no tests, examples or CI scripts installed into site-packages.
  assert {name.split("/")[0] for name in names} == {"clipjax", f"clipjax-{_version()}.dist-info"}


def test_wheel_metadata(built):
  metadata = built[2].splitlines()
  assert "License-Expression: Apache-2.0" in metadata
  assert "License-File: LICENSE" in metadata
  assert "Classifier: Typing :: Typed" in metadata
  # The SPDX expression carries the license: PEP 639 deprecates License classifiers with it.
  assert not [line for line in metadata if line.startswith("Classifier: License ::")]
  requires = [line for line in metadata if line.startswith("Requires-Dist:")
              and "extra ==" not in line]
  assert sorted(line.split()[1].split(">")[0] for line in requires) == ["jax", "optax"]
  assert any(line.startswith("Project-URL: Source, https://") for line in metadata)


def test_license_is_the_apache_2_text():
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  assert "APPENDIX: How to apply the Apache License to your work." in text
