"""The documentation site builds with no warning, and its API reference covers every export.

The build is ``make docs``'s: Sphinx with warnings as errors and nitpicky
cross-references (``-W --keep-going -n``), so a broken reference, a docstring
that is not valid reStructuredText or a page missing from a table of contents
fails here. It needs no network. The docs tools are in the ``docs`` extra,
which the ``test`` extra includes.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import clipjax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TOOLS = {"sphinx": "sphinx", "myst_parser": "myst-parser", "furo": "furo"}


def _require_docs_tools():
  missing = [package for module, package in TOOLS.items()
             if importlib.util.find_spec(module) is None]
  if missing:
    pytest.fail(f"the docs tools are not installed ({', '.join(missing)}): "
                "pip install -e '.[docs]' (the test extra includes them)", pytrace=False)


def test_sphinx_build_has_no_warnings(tmp_path):
  _require_docs_tools()
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
       "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr}{result.stdout}"
  assert not result.stderr.strip(), result.stderr
  html = tmp_path / "html"
  for page in ["index", "getting-started", "choosing", "logging", "adaptive", "distributed",
               "migrating", "design", "api/index", "api/clipping"]:
    assert (html / f"{page}.html").is_file(), page
  # The alias reads as a name in the signatures, not as its expansion.
  clipping = (html / "api" / "clipping.html").read_text()
  signature = clipping[clipping.index('id="clipjax.clip_by_global_norm"'):][:4000]
  assert "Threshold" in signature and "Callable" not in signature
  # Every state field is described by its source comment, not Python's placeholder.
  for page in (html / "api").glob("*.html"):
    assert "Alias for field number" not in page.read_text(), page.name
  assert "steps taken" in clipping[clipping.index('id="clipjax.ClipByGlobalNormState"'):][:3000]


def test_api_reference_documents_every_export():
  documented = set()
  for page in sorted((DOCS / "api").glob("*.rst")):
    documented |= set(re.findall(r"^\.\. (?:autofunction|autoclass|py:type):: (\w+)$",
                                 page.read_text(), re.M))
  assert documented == set(clipjax.__all__), (
      f"exported but not documented: {sorted(set(clipjax.__all__) - documented)}; "
      f"documented but not exported: {sorted(documented - set(clipjax.__all__))}")
