"""Compile-time sweep: how long ``jax.jit(tx.update)`` takes to lower and compile, and how much
host memory the compile needs, for every clipjax transform and the optax twins.

Run with ``make bench-compile`` (or ``python benchmarks/compile_time.py``). Writes
the section between ``<!-- compile:start -->`` and ``<!-- compile:end -->`` of
``benchmarks/RESULTS.md`` (nothing else in the file changes) and the plot
``benchmarks/compile_time.png`` next to it.

Method:

* Trees: N float32 leaves of shape (64, 64) for N in 100, 1000, 4000
  (``--leaves``), and the parameter tree of the Flax transformer of
  ``bench_clip.py``. The leaves are ``jax.ShapeDtypeStruct``s: nothing is
  allocated, only ``jax.jit(tx.update).lower(grads, state, params).compile()``
  runs (the state from ``jax.eval_shape(tx.init, params)``).
* Every compile runs in a fresh Python subprocess, so no cache, allocator pool
  or earlier compile is shared. The time is the wall time of lower + compile in
  that process.
* Peak memory is the subprocess's peak resident set size after lower +
  compile (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus its resident
  set size just before lowering (``/proc/self/statm``), when it has imported
  jax, optax and clipjax, built the tree and the transform, and run one tiny
  warm-up compile that initialises the backend and the compiler.
* Up to ``--reps`` repetitions each compile every transform once on every
  tree, in an order of the transforms reversed from one repetition to the
  next; a repetition that would end past ``--budget`` minutes is not started
  (the first always runs). A time is the median over the repetitions; a ratio
  is the median over repetitions of the ratio within one repetition, where both
  compiles of a tree ran close together, so load hits both alike; its spread
  is the min–max of those ratios.
* A subprocess running past ``--timeout`` seconds (default 600, start-up
  included) is killed and reported as a timeout; that transform is then
  skipped on the larger synthetic trees.

No timing here is asserted by any test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import _common
import clipjax

REFERENCE = "optax.clip_by_global_norm"

# name -> the factory of the transform (called in the subprocess).
TRANSFORMS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "clipjax.clip": lambda: clipjax.clip(1.0),
    "clipjax.clip_by_norm": lambda: clipjax.clip_by_norm(1.0),
    "clipjax.clip_by_global_norm": lambda: clipjax.clip_by_global_norm(1.0),
    "clipjax.clip_by_block_rms": lambda: clipjax.clip_by_block_rms(1.0),
    "clipjax.adaptive_grad_clip": lambda: clipjax.adaptive_grad_clip(0.01),
    "clipjax.autoclip": lambda: clipjax.autoclip(),
    "clipjax.zclip": lambda: clipjax.zclip(),
    "clipjax.adagc": lambda: clipjax.adagc(),
    "clipjax.quantile_clip": lambda: clipjax.quantile_clip(),
    "clipjax.clipped(identity)": lambda: clipjax.clipped(optax.identity(), global_clipnorm=1.0),
    "clipjax.skip_spikes(identity)": lambda: clipjax.skip_spikes(optax.identity()),
    "optax.clip": lambda: optax.clip(1.0),
    "optax.clip_by_global_norm": lambda: optax.clip_by_global_norm(1.0),
    "optax.clip_by_block_rms": lambda: optax.clip_by_block_rms(1.0),
    "optax.adaptive_grad_clip": lambda: optax.adaptive_grad_clip(0.01),
}
TWINS = {"clipjax.clip": "optax.clip",
         "clipjax.clip_by_global_norm": "optax.clip_by_global_norm",
         "clipjax.clip_by_block_rms": "optax.clip_by_block_rms",
         "clipjax.adaptive_grad_clip": "optax.adaptive_grad_clip"}

# Goals.
TIME_BOUND = 1.2  # × optax.clip_by_global_norm at the same tree
TWIN_BOUND = 1.0  # × the optax twin
MEMORY_BOUND = 1.5  # peak compile memory × optax.clip_by_global_norm's
GROWTH_BOUND = 4.5  # compile time at 4000 leaves / at 1000 (4× the leaves)
LEAF_SHAPE = (64, 64)


# The subprocess -------------------------------------------------------------------


def child(transform: str, tree_file: str) -> None:
  """Lowers and compiles one transform's update on one tree; prints one RESULT line."""
  import resource

  def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

  def rss_mb() -> float:
    try:
      with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # no procfs: the peak so far stands in for the current RSS
      return peak_mb()

  def usage_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

  with open(tree_file, encoding="utf-8") as f:
    spec = json.load(f)

  def build(node: Any) -> Any:
    if isinstance(node, dict):
      return {k: build(v) for k, v in node.items()}
    shape, dtype = node
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))

  params = build(spec)
  tx = TRANSFORMS[transform]()
  state = jax.eval_shape(tx.init, params)
  warm = jax.ShapeDtypeStruct((8,), jnp.float32)
  jax.jit(lambda x: x * 2.0).lower(warm).compile()

  base_mb, peak_before, cpu0 = rss_mb(), peak_mb(), usage_s()
  start = time.perf_counter()
  lowered = jax.jit(tx.update).lower(params, state, params)
  lowered_at = time.perf_counter()
  lowered.compile()
  end = time.perf_counter()
  print("RESULT " + json.dumps(dict(
      total_s=end - start, lower_s=lowered_at - start, cpu_s=usage_s() - cpu0,
      base_mb=base_mb, peak_before_mb=peak_before, peak_mb=peak_mb() - base_mb)), flush=True)


def run_child(transform: str, tree_file: str, timeout_s: float) -> dict[str, Any]:
  """One compile in a fresh subprocess: its RESULT, or ``{"error": ...}``."""
  env = dict(os.environ)
  # The subprocess imports the clipjax this process imported, wherever it is.
  root = os.path.dirname(_common.clipjax_source())
  env["PYTHONPATH"] = os.pathsep.join([root, _common.HERE] + (
      [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  cmd = [sys.executable, os.path.abspath(__file__), "--child", transform, tree_file]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": "timeout"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
  return {"error": tail[-200:]}


# The sweep --------------------------------------------------------------------------


def tree_spec(shapes: Any) -> Any:
  """A JSON-able nested dict ``{name: [shape, dtype]}`` of a tree of dicts."""
  if isinstance(shapes, dict) or hasattr(shapes, "items"):
    return {str(k): tree_spec(v) for k, v in shapes.items()}
  return [list(shapes.shape), str(shapes.dtype)]


class Tree:

  def __init__(self, label: str, spec: Any, n_leaves: int, synthetic: bool):
    self.label = label
    self.spec = spec
    self.n_leaves = n_leaves
    self.synthetic = synthetic
    # transform -> one result dict per repetition
    self.results: dict[str, list[dict[str, Any]]] = {}

  def times(self, name: str) -> list[float] | None:
    return self.values(name, "total_s")

  def values(self, name: str, key: str) -> list[float] | None:
    """``key`` of each repetition's result; ``None`` when one failed or none ran."""
    rs = self.results.get(name) or []
    if not rs or any("error" in r for r in rs):
      return None
    return [r[key] for r in rs]

  def error(self, name: str) -> str | None:
    for r in self.results.get(name) or []:
      if "error" in r:
        return r["error"]
    return None


def synthetic_spec(n: int) -> dict[str, Any]:
  return {f"w{i:05d}": [list(LEAF_SHAPE), "float32"] for i in range(n)}


def sweep(trees: list[Tree], names: list[str], reps: int, timeout_s: float, budget_s: float,
          log: Callable[[str], None]) -> int:
  """Runs up to ``reps`` repetitions, each over every tree and transform; returns how many ran.

  A repetition is not started when the last one, taken again, would end past
  ``budget_s`` seconds from the start (0: no budget); the first always runs.
  """
  failed: dict[str, str] = {}  # transform -> why it is skipped on the larger trees
  start = time.perf_counter()
  done = 0
  with tempfile.TemporaryDirectory(prefix="clipjax-compile-") as tmp:
    files = []
    for t_index, tree in enumerate(trees):
      files.append(os.path.join(tmp, f"tree{t_index}.json"))
      with open(files[-1], "w", encoding="utf-8") as f:
        json.dump(tree.spec, f)
    for rep in range(reps):
      elapsed = time.perf_counter() - start
      if rep and budget_s and elapsed + elapsed / rep > budget_s:
        log(f"repetition {rep + 1} would end past the budget of {budget_s / 60:g} min:"
            f" stopping after {rep}")
        break
      order = names if rep % 2 == 0 else names[::-1]
      for tree, tree_file in zip(trees, files):
        for name in order:
          if tree.synthetic and failed.get(name) == "timeout":
            if not tree.results.get(name):
              tree.results[name] = [{"error": "skipped: timed out on fewer leaves"}]
            continue
          if any("error" in r for r in tree.results.get(name, [])):
            continue
          r = run_child(name, tree_file, timeout_s)
          tree.results.setdefault(name, []).append(r)
          if "error" in r:
            failed[name] = r["error"]
            log(f"  rep {rep + 1}, {tree.label}: {name}: {r['error']}")
          else:
            log(f"  rep {rep + 1}, {tree.label}: {name}: {r['total_s']:.2f} s,"
                f" {r['peak_mb']:.0f} MB")
      done = rep + 1
      log(f"repetition {done} done after {(time.perf_counter() - start) / 60:.1f} min")
  return done


# Report -----------------------------------------------------------------------------


def paired(a: list[float] | None, b: list[float] | None) -> list[float] | None:
  """The per-repetition ratios ``a[i] / b[i]``."""
  if a is None or b is None:
    return None
  return [x / y for x, y in zip(a, b)] if all(y > 0 for y in b) else None


def ratio_cell(ratios: list[float] | None, bound: float | None = None) -> str:
  if ratios is None:
    return "—"
  cell = f"{statistics.median(ratios):.2f}×"
  if len(ratios) > 1:
    cell += f" ({_common.spread(ratios)})"
  if bound is not None:
    cell += ", " + _common.verdict(min(ratios), max(ratios), bound)
  return cell


def failed_cell(tree: Tree, name: str) -> str | None:
  why = tree.error(name)
  if why is None:
    return None
  if why == "timeout" or why.startswith("skipped"):
    return f"**{why}**"
  return f"**error**: {why}"


def growth(small: Tree, large: Tree, name: str) -> tuple[float, float, float] | None:
  """Median growth of the compile time and its widest spread over the repetitions."""
  a, b = small.times(name), large.times(name)
  if a is None or b is None:
    return None
  return statistics.median(b) / statistics.median(a), min(b) / max(a), max(b) / min(a)


def plot(trees: list[Tree], names: list[str], path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
  except ImportError:
    return False
  synthetic = [t for t in trees if t.synthetic]
  others = [t for t in trees if not t.synthetic]
  fig, ax = plt.subplots(figsize=(9, 6))
  colors = plt.get_cmap("tab20").colors
  bases = list(dict.fromkeys(name.split(".", 1)[1] for name in names))
  for name in names:
    # A clipjax transform and its optax twin share a colour: solid for clipjax, dashed for optax.
    color = colors[bases.index(name.split(".", 1)[1]) % len(colors)]
    style = "-" if name.startswith("clipjax.") else "--"
    xs, ys, lo, hi = [], [], [], []
    for t in synthetic:
      ts = t.times(name)
      if ts is not None:
        xs.append(t.n_leaves)
        ys.append(statistics.median(ts))
        lo.append(ys[-1] - min(ts))
        hi.append(max(ts) - ys[-1])
    if xs:
      ax.errorbar(xs, ys, yerr=[lo, hi], color=color, linestyle=style, marker="o",
                  markersize=3, capsize=2, label=name)
    for t in others:
      ts = t.times(name)
      if ts is not None:
        ax.plot([t.n_leaves], [statistics.median(ts)], color=color, marker="x", linestyle="")
  ax.set_xscale("log")
  ax.set_yscale("log")
  plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel(f"leaves of shape {LEAF_SHAPE} (×: the Flax transformer's tree)")
  ax.set_ylabel("lower + compile, s (median; bars: min–max)")
  ax.set_title("Compile time of jax.jit(tx.update)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def report(trees: list[Tree], names: list[str], *, reps: int, asked: int, budget_min: float,
           timeout_s: float, quick: bool,
           started, elapsed_s: float, load: tuple, plotted: str | None) -> str:
  lines: list[str] = []
  r = lines.append
  clipjax_names = [n for n in names if n.startswith("clipjax.")]
  lines += _common.report_head(
      quick="tiny trees, one repetition" if quick else None, started=started,
      elapsed_s=elapsed_s, load=load, software=_common.versions(),
      command="`make bench-compile` (runs `python benchmarks/compile_time.py`)")
  repetitions = ("one repetition" if reps == 1 else
                 f"{reps} repetitions, each over every tree and transform, the order of the"
                 " transforms reversed from one to the next")
  if reps < asked:
    repetitions += f" (of {asked} asked: the next would have ended past the {budget_min:g}-min"
    repetitions += " budget, `--budget`)"
  r(f"Each compile of `jax.jit(tx.update).lower(grads, state, params).compile()` runs in a"
    f" fresh subprocess; {repetitions}. Times are the wall time of"
    " lower + compile (median over repetitions); a ratio is the median of the ratios within"
    " one repetition, with their min–max in parentheses. Peak MB is the subprocess's peak"
    " RSS (`ru_maxrss`) after lower + compile minus its RSS just before lowering (jax, optax"
    " and clipjax imported, tree and transform built, one warm-up compile done)."
    " *CPU s* is the user + system time of lower + compile, which load distorts less than the"
    " wall time (XLA may compile on several threads, so it can exceed it)."
    f" Leaves are float32 {LEAF_SHAPE}. A verdict is *met* when the whole spread is within"
    " the bound, *not met* when all of it is above, *within the noise* when it straddles the"
    f" bound. A compile's subprocess is killed after {timeout_s:g} s (start-up included).")
  r("")

  # Goals.
  tree_cols = " | ".join(t.label for t in trees)
  sep = "|---|" + "---|" * len(trees)
  ref = REFERENCE
  r(f"### Compile time ≤ {TIME_BOUND}× {ref}")
  r("")
  r(f"| transform | {tree_cols} |")
  r(sep)
  for name in clipjax_names:
    cells = [failed_cell(t, name) or ratio_cell(paired(t.times(name), t.times(ref)), TIME_BOUND)
             for t in trees]
    r(f"| {name} | " + " | ".join(cells) + " |")
  r("")
  r(f"### Compile time ≤ {TWIN_BOUND}× the optax twin")
  r("")
  r(f"| transform | {tree_cols} |")
  r(sep)
  for name in clipjax_names:
    if name in TWINS and TWINS[name] in names:
      cells = [failed_cell(t, name) or ratio_cell(paired(t.times(name), t.times(TWINS[name])),
                                                  TWIN_BOUND) for t in trees]
      r(f"| {name} vs {TWINS[name]} | " + " | ".join(cells) + " |")
  r("")
  synthetic = sorted((t for t in trees if t.synthetic), key=lambda t: t.n_leaves)
  if len(synthetic) >= 2:
    small, large = synthetic[-2], synthetic[-1]
    bound = GROWTH_BOUND / 4 * large.n_leaves / small.n_leaves
    r(f"### Growth of the compile time from {small.n_leaves} to {large.n_leaves} leaves"
      f" ≤ {bound:.3g}×")
    r("")
    r("The spread is the largest time at the larger tree over the smallest at the smaller, and"
      " the reverse.")
    r("")
    r("| transform | growth | spread | verdict |")
    r("|---|---:|---|---|")
    for name in names:
      g = growth(small, large, name)
      if g is None:
        why = failed_cell(large, name) or failed_cell(small, name) or "—"
        r(f"| {name} | — | — | {why} |")
      else:
        r(f"| {name} | {g[0]:.2f}× | {g[1]:.2f}–{g[2]:.2f} |"
          f" {_common.verdict(g[1], g[2], bound)} |")
    r("")
  r(f"### Peak compile memory ≤ {MEMORY_BOUND}× {ref}'s")
  r("")
  r(f"| transform | {tree_cols} |")
  r(sep)
  for name in clipjax_names:
    cells = [failed_cell(t, name) or ratio_cell(
        paired(t.values(name, "peak_mb"), t.values(ref, "peak_mb")), MEMORY_BOUND)
             for t in trees]
    r(f"| {name} | " + " | ".join(cells) + " |")
  r("")

  # Figures per tree.
  for t in trees:
    r(f"### {t.label}")
    r("")
    r(f"| transform | median s | min–max s | × {ref} | × twin | lower s | CPU s | peak MB |"
      f" peak × {ref} |")
    r("|---|---:|---|---|---|---:|---:|---:|---|")
    for name in names:
      why = failed_cell(t, name)
      if why is not None:
        r(f"| {name} | {why} | | | | | | | |")
        continue
      ts = t.times(name)
      if ts is None:
        continue
      twin = TWINS.get(name)
      r(f"| {name} | {statistics.median(ts):.2f} | {_common.spread(ts)} |"
        f" {ratio_cell(paired(ts, t.times(ref)))} |"
        f" {ratio_cell(paired(ts, t.times(twin))) if twin else '—'} |"
        f" {statistics.median(t.values(name, 'lower_s')):.2f} |"
        f" {statistics.median(t.values(name, 'cpu_s')):.2f} |"
        f" {statistics.median(t.values(name, 'peak_mb')):.0f} |"
        f" {ratio_cell(paired(t.values(name, 'peak_mb'), t.values(ref, 'peak_mb')))} |")
    base = t.values(ref, "base_mb")
    r("")
    if base:
      r(f"RSS of a subprocess just before lowering (the baseline): {statistics.median(base):.0f}"
        " MB.")
      r("")
  if plotted:
    r(f"![Compile time against the number of leaves, log-log]({plotted})")
    r("")
  r("Notes: `clipped` and `skip_spikes` wrap `optax.identity()` (clipped with"
    " `global_clipnorm=1`). The adaptive clippers run with their default arguments;"
    " `adaptive_grad_clip` gets `params`, the others ignore them.")
  return "\n".join(lines)


def main() -> None:
  if len(sys.argv) == 4 and sys.argv[1] == "--child":
    child(sys.argv[2], sys.argv[3])
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="leaves 10 and 30, the tiny Flax model, one repetition: checks that"
                           " the script runs")
  parser.add_argument("--leaves", type=lambda s: [int(x) for x in s.split(",") if x],
                      help="comma-separated leaf counts (default 100,1000,4000)")
  parser.add_argument("--reps", type=int, help="repetitions, each over every tree and"
                      " transform (default 3; 1 with --quick)")
  parser.add_argument("--budget", type=float, default=0.0,
                      help="minutes: no repetition is started that would end past it; the"
                           " first always runs (default 0: no budget)")
  parser.add_argument("--no-flax", action="store_true", help="skip the Flax transformer tree")
  parser.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                      help=f"comma-separated transforms (always with {REFERENCE})")
  parser.add_argument("--timeout", type=float, default=600.0,
                      help="seconds before one compile is killed (default 600)")
  parser.add_argument("--out", default=_common.RESULTS,
                      help="the Markdown file whose compile section is rewritten; the plot is"
                           " written next to it")
  parser.add_argument("--json", help="also write the raw results to this file")
  args = parser.parse_args()

  leaves = args.leaves or ([10, 30] if args.quick else [100, 1000, 4000])
  reps = args.reps or (1 if args.quick else 3)
  names = list(TRANSFORMS)
  if args.only:
    unknown = [n for n in args.only if n not in TRANSFORMS]
    if unknown:
      parser.error(f"unknown transforms {unknown}; known: {', '.join(TRANSFORMS)}")
    names = [n for n in names if n in args.only or n == REFERENCE]

  t0 = time.perf_counter()

  def log(msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

  load_before = os.getloadavg()
  started = datetime.datetime.now(datetime.timezone.utc)
  log(f"compile-time sweep on {_common.cpu_model()}, {os.cpu_count()} cores;"
      f" {_common.versions()}; clipjax from {_common.clipjax_source()}")
  trees = [Tree(f"{n} leaves", synthetic_spec(n), n, True) for n in sorted(leaves)]
  if not args.no_flax:
    shapes = _common.transformer_shapes(0.01 if args.quick else 1.0)
    n = len(jax.tree.leaves(shapes))
    trees.append(Tree(f"Flax transformer ({n} leaves)", tree_spec(shapes), n, False))
  log(f"{len(names)} transforms × {len(trees)} trees × {reps} repetitions,"
      f" each compile in a fresh subprocess")
  done = sweep(trees, names, reps, args.timeout, 60 * args.budget, log)

  out_dir = os.path.dirname(os.path.abspath(args.out))
  png = "compile_time.png"
  plotted = png if plot(trees, names, os.path.join(out_dir, png)) else None
  if plotted is None:
    log("matplotlib is not installed: no plot")
  body = report(trees, names, reps=done, asked=reps, budget_min=args.budget,
                timeout_s=args.timeout, quick=args.quick,
                started=started, elapsed_s=time.perf_counter() - t0,
                load=(load_before, os.getloadavg()), plotted=plotted)
  print(body)
  _common.write_section(args.out, "compile", body)
  log(f"wrote the compile section of {args.out}" + (f" and {png}" if plotted else ""))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({t.label: t.results for t in trees}, f, indent=1)


if __name__ == "__main__":
  main()
