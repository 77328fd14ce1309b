"""Every code block of README.md and docs/*.md runs, and prints what the page shows.

The convention, for the pages' authors:

- A fenced block opened with ```` ```python ```` is a program. It runs as
  written, on its own, in a fresh namespace (so it imports what it uses), under
  JAX's default promotion rules (``jax.numpy_dtype_promotion("standard")``, rank
  promotion allowed), as user code runs, with the 8 CPU devices the test suite
  has. Warnings are errors, as everywhere in the suite.
- What it prints is shown in ``# prints: TEXT`` comments, at the end of the
  ``print`` line or on lines of their own. Each comment is one line of output;
  the block's output must be exactly those lines, in order (trailing spaces
  ignored). A block without such comments must print nothing.
- Blocks that are not Python programs name their language: ``bash`` (shell
  commands, not run), ``text`` (output or diagrams, not run), or a MyST
  directive such as ``{toctree}``. A fence without a language holds a diagram.
  Any other language is an error here, so no Python block is skipped by a
  misspelt tag (``py``, ``python3``).
"""

import contextlib
import dataclasses
import io
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUN = "python"
NOT_RUN = {"bash", "text", ""}
PRINTS = re.compile(r"#\s*prints:\s?(.*)$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,})(?P<info>[^`]*)$")


@dataclasses.dataclass(frozen=True)
class Block:
  page: pathlib.Path
  line: int  # 1-based line of the opening fence
  language: str
  source: str

  @property
  def name(self) -> str:
    return f"{self.page.relative_to(ROOT)}:{self.line}"

  def expected_output(self) -> list[str]:
    return [m.group(1).rstrip() for text in self.source.splitlines()
            if (m := PRINTS.search(text))]


def blocks(page: pathlib.Path) -> list[Block]:
  """The fenced code blocks of a Markdown page, with their indentation removed."""
  found = []
  lines = page.read_text().splitlines()
  i = 0
  while i < len(lines):
    opening = FENCE.match(lines[i])
    if not opening:
      i += 1
      continue
    indent, fence = len(opening["indent"]), opening["fence"]
    language = opening["info"].strip().split(" ")[0]
    body = []
    j = i + 1
    while j < len(lines):
      closing = FENCE.match(lines[j])
      if closing and len(closing["fence"]) >= len(fence) and not closing["info"].strip():
        break
      text = lines[j]
      body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
      j += 1
    else:
      raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: the fence is never closed")
    found.append(Block(page, i + 1, language, "\n".join(body) + "\n"))
    i = j + 1
  return found


ALL = [block for page in PAGES for block in blocks(page)]
PROGRAMS = [block for block in ALL if block.language == RUN]


def test_every_page_is_read_and_every_block_has_a_known_language():
  assert (ROOT / "README.md") in PAGES and len(PAGES) > 5, PAGES
  unknown = [f"{b.name} ({b.language!r})" for b in ALL
             if b.language != RUN and b.language not in NOT_RUN
             and not b.language.startswith("{")]
  assert not unknown, f"fences with a language this test does not know: {unknown}"
  # A program inside a directive's fence would not be found above: there are none.
  nested = [f"{b.name}" for b in ALL if b.language != RUN
            and re.search(r"^\s*`{3,}\s*python", b.source, re.M)]
  assert not nested, f"python fences inside other fences: {nested}"
  assert len(PROGRAMS) >= 10


@pytest.mark.loose_promotion
@pytest.mark.parametrize("block", PROGRAMS, ids=lambda b: b.name)
def test_block_runs_and_prints_what_the_page_shows(block):
  out = io.StringIO()
  code = compile(block.source, block.name, "exec")
  with (jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"),
        contextlib.redirect_stdout(out)):
    exec(code, {"__name__": "__main__"})  # noqa: S102 - running the documentation is the test
  printed = [line.rstrip() for line in out.getvalue().splitlines()]
  assert printed == block.expected_output(), (
      f"{block.name} printed\n{out.getvalue()}but the page shows\n"
      + "\n".join(block.expected_output()))
