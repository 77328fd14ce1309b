"""Sphinx configuration of the clipjax documentation.

Build with ``make docs`` (warnings are errors, every cross-reference must
resolve). The build needs no network: the types of other projects that the
signatures name (``jax.Array``, ``optax.GradientTransformation``, ...) link to
their pages through the table ``EXTERNAL_PAGES`` below rather than through
intersphinx, whose inventories would have to be downloaded; other names from
those projects are plain text.
"""

import inspect
import re
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Document the source tree this file sits in, installed or not.
sys.path.insert(0, str(ROOT))

import clipjax  # noqa: E402
import docutils.nodes  # noqa: E402

project = "clipjax"
author = "The clipjax authors"
copyright = "the clipjax authors, Apache-2.0"  # noqa: A001 - the name Sphinx reads
release = clipjax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",  # a [source] link beside every documented name
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = True

# MyST: ``$...$`` stays text; ``{ref}`` anchors for the headings of the long pages.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc and napoleon: Google-style docstrings, members in source order, the
# signature with its type hints, aliases kept by name (the modules' annotations
# are strings, which is what lets autodoc_type_aliases apply).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
python_use_unqualified_type_names = True
autodoc_type_aliases = {
    "Threshold": "clipjax.Threshold",
    "jax.Array": "jax.Array",
    "jax.typing.ArrayLike": "jax.typing.ArrayLike",
    "optax.GradientTransformation": "optax.GradientTransformation",
    "optax.GradientTransformationExtraArgs": "optax.GradientTransformationExtraArgs",
    "optax.Schedule": "optax.Schedule",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Names from other projects without an entry in EXTERNAL_PAGES are plain text;
# a name of clipjax's own that does not resolve is still an error.
_EXTERNAL = r"(jax|jaxlib|optax|numpy|np|flax|orbax|collections\.abc)(\..*)?"
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    # Bare names the signatures print for external types (python_use_unqualified_type_names).
    (r"py:.*", r"(Array|ArrayLike|GradientTransformation|GradientTransformationExtraArgs"
               r"|Schedule|Hashable|Callable|Sequence|ndarray)"),
]

# The pages of the other projects' types that clipjax's signatures and fields
# name, as intersphinx would link them.
_JAX = "https://docs.jax.dev/en/latest/_autosummary/"
_OPTAX = "https://optax.readthedocs.io/en/latest/api/"
_PYTHON = "https://docs.python.org/3/library/collections.abc.html#"
EXTERNAL_PAGES = {
    "jax.Array": _JAX + "jax.Array.html",
    "jax.typing.ArrayLike": _JAX + "jax.typing.ArrayLike.html",
    "optax.GradientTransformation": _OPTAX + "transformations.html#optax.GradientTransformation",
    "optax.GradientTransformationExtraArgs":
        _OPTAX + "transformations.html#optax.GradientTransformationExtraArgs",
    "optax.Schedule": _OPTAX + "optimizer_schedules.html#optax.schedules.Schedule",
    "collections.abc.Callable": _PYTHON + "collections.abc.Callable",
    "collections.abc.Hashable": _PYTHON + "collections.abc.Hashable",
    "collections.abc.Sequence": _PYTHON + "collections.abc.Sequence",
}
# Where autodoc writes the class a value has at run time instead of its public name.
_EXTERNAL_ALIASES = {"jax.jaxlib._jax.Array": "jax.Array", "jaxlib._jax.Array": "jax.Array"}

html_theme = "furo"
html_title = f"clipjax {release}"


def _alias_names(app, what, name, obj, options, signature, return_annotation):
  """Writes an alias inside a union (``Threshold | None``) by its name.

  Sphinx substitutes ``autodoc_type_aliases`` inside unions as placeholder
  objects and prints their repr, ``TypeAliasForwardRef('clipjax.Threshold')``.
  """
  del app, what, name, obj, options
  fix = lambda text: _FORWARD_REF.sub(r"\1", text) if text else text  # noqa: E731
  return fix(signature), fix(return_annotation)


_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")
_FIELD = re.compile(r"^\s+(\w+): [^#]*#\s*(.*)$")


def _field_comments(cls: type) -> dict[str, str]:
  """The comment after each field in the source of a NamedTuple and its bases, by field name.

  The fixed clippers' states are made by a helper and have no source of their
  own; their fields and comments are those of the base they share.
  """
  comments: dict[str, str] = {}
  for klass in reversed(cls.__mro__):
    try:
      source = inspect.getsource(klass)
    except (OSError, TypeError):
      continue
    comments |= {m[1]: m[2] for line in source.splitlines() if (m := _FIELD.match(line))}
  return comments


def _field_docs(app, what, name, obj, options, lines):
  """Documents a NamedTuple field with the shape and dtype comment of its source.

  The state classes describe their fields in comments (``count: jax.Array  #
  [] int32, steps taken``), where Python's own docstring of a field says only
  "Alias for field number 0".
  """
  del app, obj, options
  if what != "attribute" or not lines or not lines[0].startswith("Alias for field number"):
    return
  owner, field = name.rsplit(".", 1)
  cls = getattr(clipjax, owner.removeprefix("clipjax."), None)
  comment = _field_comments(cls).get(field) if isinstance(cls, type) else None
  if comment is None:
    # A field without a comment is told by its name and type alone (``stats: ClipStats``).
    lines[:] = []
    return
  shape = re.match(r"^(\[[^\]]*\])\s*(.*)$", comment)
  lines[:] = [f"``{shape[1]}`` {shape[2]}" if shape else comment]


def _external_link(app, env, node, contnode):
  """Links a Python name of another project to its page in ``EXTERNAL_PAGES``, or leaves it."""
  del app, env
  if node.get("refdomain") != "py":
    return None
  target = node.get("reftarget", "")
  target = _EXTERNAL_ALIASES.get(target, target)
  url = EXTERNAL_PAGES.get(target)
  if url is None:
    return None
  link = docutils.nodes.reference("", "", internal=False, refuri=url, reftitle=target)
  link.append(contnode)
  return link


def setup(app):
  app.connect("missing-reference", _external_link)
  app.connect("autodoc-process-signature", _alias_names)
  app.connect("autodoc-process-docstring", _field_docs)
