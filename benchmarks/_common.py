"""What the benchmark scripts share: the trees, compiling in the background, interleaved
timing, the size of a compiled program, the machine description, the verdicts, and writing a
generated section of ``RESULTS.md`` between its markers.

The scripts use clipjax, optax and flax by their public names only, so they
measure whichever clipjax is imported (the path is printed in every report).
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")


# Trees ------------------------------------------------------------------------


def synthetic_tree(n_leaves: int, total: int, seed: int) -> dict[str, jax.Array]:
  """``n_leaves`` float32 matrices holding ``total`` elements together."""
  per = total // n_leaves
  rows = max(1, int(round(np.sqrt(per / 2.5))))
  while per % rows:
    rows -= 1
  keys = jax.random.split(jax.random.key(seed), n_leaves)
  return {f"w{i:04d}": jax.random.normal(k, (rows, per // rows), jnp.float32)
          for i, k in enumerate(keys)}


def transformer_size(scale: float, dims: dict[str, int] | None = None) -> dict[str, int]:
  """The dimensions of :func:`transformer`: ``d``, ``heads``, ``layers``, ``vocab`` and
  ``context``."""
  size = dict(d=320, heads=5, layers=16, vocab=8192, context=256)
  if scale < 1.0:
    size.update(d=64, heads=4, layers=4, vocab=512)
  size.update(dims or {})
  return size


def transformer(scale: float, *, scanned: bool = False,
                dims: dict[str, int] | None = None) -> tuple[Any, jax.Array]:
  """A small GPT-style flax.linen transformer (causal attention) and the tokens that
  initialise it.

  ``scale < 1`` gives a tiny model for quick runs. With ``scanned`` the blocks
  are one ``nn.scan`` over the layers: each block parameter becomes one leaf
  stacked along a leading ``(layers, ...)`` axis (22 leaves instead of 262).
  ``dims`` overrides any of ``d``, ``heads``, ``layers``, ``vocab`` and
  ``context`` (the longest sequence): an unscanned model has ``16 · layers + 6``
  leaves.
  """
  import flax.linen as nn

  size = transformer_size(scale, dims)
  d, heads, layers, vocab, context = (size[k] for k in ("d", "heads", "layers", "vocab",
                                                         "context"))

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x, _=None):
      h = nn.LayerNorm()(x)
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
      x = x + nn.MultiHeadDotProductAttention(num_heads=heads)(h, h, mask=mask)
      h = nn.LayerNorm()(x)
      h = nn.gelu(nn.Dense(4 * d)(h))
      x = x + nn.Dense(d)(h)
      return (x, None) if scanned else x

  class Transformer(nn.Module):

    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(vocab, d)(tokens)
      x = x + self.param("position", nn.initializers.normal(0.02), (context, d))[:tokens.shape[1]]
      if scanned:
        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=layers)
        x, _ = blocks(name="blocks")(x, None)
      else:
        for _ in range(layers):
          x = Block()(x)
      return nn.Dense(vocab)(nn.LayerNorm()(x))

  return Transformer(), jnp.zeros((1, 8), jnp.int32)


def transformer_params(scale: float, *, scanned: bool = False) -> Any:
  """The initialised parameters of :func:`transformer`."""
  model, tokens = transformer(scale, scanned=scanned)
  return jax.jit(model.init)(jax.random.key(0), tokens)["params"]


def transformer_shapes(scale: float, *, scanned: bool = False) -> Any:
  """The parameter tree of :func:`transformer` as ``jax.ShapeDtypeStruct`` leaves (nothing
  is allocated)."""
  model, tokens = transformer(scale, scanned=scanned)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def stacked_layer_axis(params: Any) -> Any:
  """The ``layer_axis`` prefix of a scanned :func:`transformer`: 0 on the stacked blocks."""
  return {k: 0 if k == "blocks" else None for k in params}


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# Compiling and timing -----------------------------------------------------------

# Compiles run two at a time in threads of the one process (lowering stays on the
# main thread): on 2 cores XLA's compile time, not the timing, dominates a run.
_COMPILER = concurrent.futures.ThreadPoolExecutor(max_workers=2)


def compile_in_background(lowered: Any) -> concurrent.futures.Future:
  """Starts ``lowered.compile()``; the future gives ``(compiled, seconds)``."""
  def compile_():
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start

  return _COMPILER.submit(compile_)


def hlo_instructions(compiled: Any) -> int:
  """The number of instructions of a compiled program: the lines of its optimized HLO text
  that contain `` = ``."""
  return sum(" = " in line for line in compiled.as_text().splitlines())


def bytes_accessed(compiled: Any) -> float:
  """XLA's estimate of the bytes a compiled program reads and writes
  (``cost_analysis()["bytes accessed"]``)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one entry per program in older jax releases
    cost = cost[0]
  return float(cost["bytes accessed"])


class Case:
  """One timed operation; ``step()`` runs it once and waits for the result."""

  def __init__(self, name: str, step: Callable[[], None], *, compile_s: float | None = None,
               memory: Any = None, donated: bool = False):
    self.name = name
    self.step = step
    self.compile_s = compile_s
    self.memory = memory
    self.donated = donated
    self.instructions: int | None = None  # of the compiled program, when there is one
    self.bytes_accessed: float | None = None
    self.times: list[float] = []
    self.ready: Callable[[], None] = lambda: None
    self.prepare: Callable[[], None] = lambda: None  # untimed, before each step

  def timed(self) -> float:
    self.prepare()
    start = time.perf_counter()
    self.step()
    return time.perf_counter() - start


def run_interleaved(cases: list[Case], *, warmup: int, min_rounds: int, max_rounds: int,
                    budget_s: float, log: Callable[[str], None]) -> int:
  """Runs all cases round after round (alternating direction) until the budget is spent."""
  for case in cases:
    for _ in range(warmup):
      case.prepare()
      case.step()
  start = time.perf_counter()
  rounds = 0
  while rounds < max_rounds:
    order = cases if rounds % 2 == 0 else cases[::-1]
    for case in order:
      case.times.append(case.timed())
    rounds += 1
    elapsed = time.perf_counter() - start
    if rounds % 5 == 0:
      log(f"    round {rounds}: {elapsed:.0f} s")
    if rounds >= min_rounds and elapsed * (rounds + 1) / rounds > budget_s:
      break
  return rounds


def median_ms(case: Case) -> float:
  return 1e3 * statistics.median(case.times)


def ratios(a: Case, b: Case) -> list[float]:
  """``a``'s time over ``b``'s time in each round."""
  return [x / y for x, y in zip(a.times, b.times)]


def ratio(a: Case, b: Case) -> float:
  """Median over rounds of ``a``'s time over ``b``'s time in the same round."""
  return statistics.median(ratios(a, b))


def ratio_cell(a: Case, b: Case, bound: float | None = None) -> str:
  """``median× (min–max)`` of the per-round ratios, with the verdict against ``bound``."""
  rs = ratios(a, b)
  cell = f"{statistics.median(rs):.3f}× ({spread(rs)})"
  if bound is not None:
    cell += " " + verdict(min(rs), max(rs), bound)
  return cell


# Machine ----------------------------------------------------------------------


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions(*extra: str) -> str:
  import clipjax
  import optax

  parts = [f"Python {platform.python_version()}", f"jax {jax.__version__}",
           f"jaxlib {jax.lib.__version__}" if hasattr(jax.lib, "__version__") else "",
           f"optax {optax.__version__}", f"clipjax {clipjax.__version__}"]
  try:
    import flax
    parts.append(f"flax {flax.__version__}")
  except ImportError:
    pass
  return ", ".join([p for p in parts if p] + list(extra))


def clipjax_source() -> str:
  """Where the measured clipjax was imported from."""
  import clipjax

  return os.path.dirname(os.path.abspath(clipjax.__file__))


def machine_lines(*, started, elapsed_s: float, load: tuple, command: str,
                  software: str) -> list[str]:
  """The bullet list that dates a run and names its machine and software."""
  (b1, b5, b15), (a1, a5, a15) = load
  return [
      f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()}"
      f" {platform.release()}, CPU only (`{jax.devices()[0].platform}` backend)",
      f"- Software: {software}",
      f"- clipjax measured: `{clipjax_source()}`",
      f"- Date: {started:%Y-%m-%d %H:%M} UTC, {elapsed_s / 60:.1f} min",
      f"- Load average (1, 5, 15 min): {b1:.2f}, {b5:.2f}, {b15:.2f} at the start,"
      f" {a1:.2f}, {a5:.2f}, {a15:.2f} at the end",
      f"- Command: {command}",
  ]


def progress_log(t0: float) -> Callable[[str], None]:
  """A ``log(msg)`` that prints the seconds since ``t0`` and the peak resident memory."""

  def log(msg: str) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[{time.perf_counter() - t0:6.1f} s, {rss:4.1f} GB] {msg}", flush=True)

  return log


def report_head(*, quick: str | None, started, elapsed_s: float, load: tuple, command: str,
                software: str) -> list[str]:
  """The opening lines of a generated section: the quick-mode warning (``quick`` says what is
  small, ``None`` in a full run), the machine lines and a blank line."""
  head = [f"**Quick mode (`--quick`): {quick}; these figures mean nothing.**", ""] if quick else []
  return head + machine_lines(started=started, elapsed_s=elapsed_s, load=load, command=command,
                              software=software) + [""]


# Verdicts ---------------------------------------------------------------------


def verdict(low: float, high: float, bound: float) -> str:
  """``met`` when the whole spread is within the bound, ``not met`` when all of it is above,
  ``within the noise`` when the spread straddles it."""
  if high <= bound:
    return "met"
  if low > bound:
    return "**not met**"
  return "within the noise"


def spread(values: list[float], digits: int = 2) -> str:
  return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


class Tally:
  """Counts the verdicts of the cells it passes through."""

  WORDS = ("not met", "within the noise", "met")

  def __init__(self):
    self.counts: dict[str, int] = {}

  def __call__(self, text: str) -> str:
    for word in self.WORDS:
      if word in text:
        self.counts[word] = self.counts.get(word, 0) + 1
        break
    return text

  def line(self) -> str:
    c = self.counts
    return (f"{c.get('met', 0)} met, {c.get('within the noise', 0)} within the noise,"
            f" {c.get('not met', 0)} not met.")


# RESULTS.md ---------------------------------------------------------------------


def markers(key: str) -> tuple[str, str]:
  return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def write_section(path: str, key: str, body: str) -> None:
  """Replaces the lines between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path``.

  A marker counts only on a line of its own (the same text quoted inside a line
  is prose). Everything outside the markers is kept. A file without the markers
  gets the marked section appended; a new file is created with a title. A file
  with one marker but not the other, a marker twice, or the two out of order is
  left untouched and ``ValueError`` is raised.
  """
  start, end = markers(key)
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    lines = ["# clipjax benchmarks"]
  starts = [i for i, line in enumerate(lines) if line.strip() == start]
  ends = [i for i, line in enumerate(lines) if line.strip() == end]
  block = [start] + body.strip("\n").splitlines() + [end]
  if len(starts) == len(ends) == 1 and starts[0] < ends[0]:
    lines = lines[:starts[0]] + block + lines[ends[0] + 1:]
  elif not starts and not ends:
    while lines and not lines[-1].strip():
      lines.pop()
    lines += [""] + block
  else:
    raise ValueError(f"{path}: expected one line {start} and after it one line {end};"
                     " the file was not changed")
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)
