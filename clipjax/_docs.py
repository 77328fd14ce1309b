"""The docstring text that many public functions share, written once.

The clippers document their ``axis_name``, ``replicated`` and ``name``
arguments alike and return alike, the schedules share their Returns and
Raises sections, and most examples open with the same two imports. Copied into
every docstring, such text drifts apart as soon as one copy is edited. So a
docstring holds a marker line where a shared paragraph goes, ``{replicated}``
or ``{returns: ClipState}`` (the text after the colon is the marker's
argument), and :func:`fill` writes the paragraph there, indented as the
marker, when the module is imported. ``help()``, the doctests and Sphinx's
autodoc all read the runtime ``__doc__``, so they see the full text.

Markers are whole lines only: docstrings are not templates (their examples
hold dict literals), and every other line is kept as written.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

_Function = TypeVar("_Function", bound=Callable)

_MARKER = re.compile(r"(?P<indent> *)\{(?P<key>\w+)(?:: (?P<argument>[^{}]+))?\}")

# A Returns sentence longer than this (indentation not counted) goes on two lines.
_WIDTH = 79

# The global-norm clippers' ``axis_name``; the others say what it does to their own norms.
_AXIS_NAME = """\
axis_name: mapped axis name(s) over which the leaves are sharded; the
  global norm is taken over all shards with one collective."""

_REPLICATED = """\
replicated: where types record no mesh axes (``pmap``, ``shard_map`` with
  ``check_vma=False``), a pytree prefix of bools (all of ``axis_name``) or
  tuples of axis names marking the leaves that are the same on every device
  of those axes; they are counted once, and unmarked leaves on every device.
  Inside ``shard_map`` each leaf's type says it; a contradicting value raises."""

_SCHEDULE_RETURNS = """\
Returns:
  An ``optax.Schedule``: step count (int or int32 array, traceable) to a
  float32 scalar."""

_EXAMPLE = """\
Example:
  >>> import jax.numpy as jnp
  >>> import clipjax"""


def _argument(key: str, argument: str | None) -> str:
  if not argument:
    raise ValueError(f"the docstring marker {{{key}}} needs an argument: {{{key}: ...}}")
  return argument


def _name(owner: str, argument: str | None) -> str:
  """The ``name`` entry of a transform; its default is the name of the function."""
  del argument
  return ("name: the prefix of its statistics in :func:`clipjax.clip_stats`\n"
          f'  (default ``"{owner}"``), to tell apart two transforms of one kind.')


def _returns(owner: str, state: str | None) -> str:
  """The Returns section of a transform whose state is the class named ``state``."""
  del owner
  state = _argument("returns", state)
  article = "an" if state[0] in "AEIOU" else "a"
  sentence = f"An ``optax.GradientTransformation`` whose state is {article} :class:`{state}`."
  return "Returns:\n" + textwrap.indent(textwrap.fill(sentence, _WIDTH), "  ")


def _raises(owner: str, message: str | None) -> str:
  """The Raises section of a factory that checks its concrete arguments, with a sample error."""
  del owner
  return ("Raises:\n"
          "  ValueError: when a concrete argument is out of range, e.g.\n"
          f"    ``{_argument('raises', message)}``.")


# A str reads the same wherever it stands; a function writes the text for the
# function that holds the marker (its name) and the marker's argument.
_PARAGRAPHS: dict[str, str | Callable[[str, str | None], str]] = {
    "axis_name": _AXIS_NAME,
    "replicated": _REPLICATED,
    "name": _name,
    "returns": _returns,
    "schedule_returns": _SCHEDULE_RETURNS,
    "raises": _raises,
    "example": _EXAMPLE,
}


def _expand(line: str, owner: str) -> str:
  """``line``, or the paragraph its marker names, indented as the marker."""
  marker = _MARKER.fullmatch(line)
  if marker is None:
    return line
  if marker["key"] not in _PARAGRAPHS:
    raise ValueError(f"{owner}: no shared docstring text is called {{{marker['key']}}}")
  paragraph = _PARAGRAPHS[marker["key"]]
  text = paragraph if isinstance(paragraph, str) else paragraph(owner, marker["argument"])
  return textwrap.indent(text, marker["indent"])


def fill(function: _Function) -> _Function:
  """Writes the shared paragraphs in place of the marker lines of ``function``'s docstring."""
  if function.__doc__ is not None:  # None under ``python -OO``, which drops docstrings
    lines = function.__doc__.split("\n")
    function.__doc__ = "\n".join(_expand(line, function.__name__) for line in lines)
  return function
