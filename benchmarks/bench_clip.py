"""Benchmarks: clipjax against optax and PyTorch, side by side in one process.

Run with ``make bench`` (or ``python benchmarks/bench_clip.py``). Prints a table
and rewrites the section between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` of ``benchmarks/RESULTS.md``; nothing else in the file
changes. Compile times are swept separately by ``compile_time.py``
(``make bench-compile``).

Method:

* Four gradient trees: 25M float32 parameters as 10 leaves, as 1000 leaves,
  the parameter tree of a small Flax (linen) transformer, and the same model
  with its blocks under ``nn.scan`` (each block parameter one leaf stacked
  along a leading layer axis).
* Every case is compiled ahead of time (``jax.jit(...).lower(...).compile()``),
  warmed up, then all cases of a tree run interleaved (A B C ... then ... C B A)
  for a number of rounds in this one process. A time is the median over the
  rounds; a ratio is the median over rounds of the per-round ratio, so a load
  spike hits both sides of a comparison alike; its spread is the min–max of the
  per-round ratios. A goal is met when the whole spread is within its bound,
  not met when all of it is above, and within the noise otherwise.
* "in place" cases donate the gradient buffers (``donate_argnums=(0,)``) and
  feed the state that comes out back as the next call's state; the optimizer
  steps (``adam``) donate the parameters and the optimizer state, as a jitted
  train step does; ``torch.nn.utils.clip_grad_norm_`` also works in place.
  "fresh output" cases write a new output tree on every call.
* Peak memory is ``argument + output + temp - alias`` bytes from the compiled
  executable's ``memory_analysis()``.

No timing here is asserted by any test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

# PyTorch's OpenMP workers otherwise spin after each call and steal the cores
# from the XLA call that follows in the interleaved loop.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
import clipjax  # noqa: E402
from _common import Case, median_ms, ratio, ratio_cell, run_interleaved  # noqa: E402

try:
  import torch  # noqa: E402
except ImportError:  # the benchmark extras are optional for a quick look
  torch = None

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

TOTAL = 25_000_000
# Interleaved rounds per tree at least, whatever the --budget (the 1000-leaf tree takes 1.5–5 s
# a round on 2 cores, quiet or busy).
MIN_ROUNDS = 8
# The clippers that keep a history of past norms, compared with clip_by_global_norm.
HISTORY = ("autoclip", "zclip", "adagc", "quantile_clip", "clip_by_rolling_norm")


# Trees ------------------------------------------------------------------------


def like(tree: Any, seed: int, std: float = 1.0) -> Any:
  """A random tree with the shapes and dtypes of ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def copy_tree(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# Cases ------------------------------------------------------------------------


def jax_case(name: str, fn: Callable[..., Any], args: tuple, *, donate: tuple[int, ...] = (),
             carry: Callable[[tuple, Any], tuple] | None = None,
             fresh: Callable[[tuple], tuple] | None = None) -> Case:
  """Compiles ``fn(*args)``; each step feeds ``carry(args, out)`` back as the next args.

  ``fresh(args)``, when given, rebuilds the args before each step, untimed (a
  new copy of a donated gradient, so every step clips the same large norm).

  The compile is started in the background; :meth:`Case.ready` waits for it.
  """
  lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
  future = _common.compile_in_background(lowered)
  current = [args]
  case = Case(name, lambda: None, donated=bool(donate))

  def ready():
    compiled, case.compile_s = future.result()
    case.memory = compiled.memory_analysis()

    def step():
      out = compiled(*current[0])
      jax.block_until_ready(out)
      if carry is not None:
        current[0] = carry(current[0], out)

    case.step = step
    if fresh is not None:
      def prepare():
        current[0] = fresh(current[0])
        jax.block_until_ready(current[0])
      case.prepare = prepare

  case.ready = ready
  return case


def update_case(name: str, tx: optax.GradientTransformation, grads: Any, params: Any, *,
                in_place: bool, needs_params: bool = False, keep_state: bool = True) -> Case:
  """A case running ``tx.update`` on ``grads``, in place (the gradient donated) or to a fresh
  output; the state that comes out is the next call's state."""
  state = tx.init(params)
  p = params if needs_params else None
  original = grads
  if keep_state:
    def fn(g, s, p):
      return tx.update(g, s, p)

    def carry(args, out):
      return (args[0], out[1], args[2])
    donate = (0,) if in_place else ()
  else:
    def fn(g, s, p):
      return tx.update(g, s, p)[0]

    def carry(args, out):
      return args
    donate = (0,) if in_place else ()

  def fresh(args):
    # The donated gradient is consumed: each step gets a new copy of the
    # original (norm far above the threshold), made outside the timed call.
    return (copy_tree(original),) + tuple(args[1:])

  return jax_case(name, fn, (copy_tree(grads) if in_place else grads, state, p), donate=donate,
                  carry=carry, fresh=fresh if in_place else None)


def train_case(name: str, tx: optax.GradientTransformation, grads: Any, params: Any) -> Case:
  """One optimizer step ``params ← params + tx.update(grads)``, params and state donated."""
  params = copy_tree(params)
  state = tx.init(params)

  def fn(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  def carry(args, out):
    return (out[0], out[1], args[2])

  return jax_case(name, fn, (params, state, grads), donate=(0, 1), carry=carry)


def torch_case(grads: Any) -> Case | None:
  if torch is None:
    return None
  tensors = []
  for leaf in jax.tree.leaves(grads):
    t = torch.zeros(leaf.shape, dtype=torch.float32, requires_grad=True)
    t.grad = torch.from_numpy(np.array(leaf))
    tensors.append(t)

  originals = [t.grad.clone() for t in tensors]

  def step():
    torch.nn.utils.clip_grad_norm_(tensors, 1.0, foreach=True)

  def prepare():
    for t, g in zip(tensors, originals):
      t.grad.copy_(g)

  case = Case("torch clip_grad_norm_ (foreach)", step, donated=True)
  case.prepare = prepare
  return case


# Names of the cases, used by the goals and the tables.
READ = "clipjax.global_norm (one read pass)"
OPTAX_READ = "optax.global_norm"
CGN, OCGN = "clipjax.clip_by_global_norm", "optax.clip_by_global_norm"
FRESH = " [fresh output]"
NO_STATS = "clipjax.clip_by_global_norm, updates only"
TORCH = "torch clip_grad_norm_ (foreach)"
ADAM, CLIP_ADAM, OPTAX_CLIP_ADAM = ("optax.adam", "clipjax.clip_by_global_norm + adam",
                                    "optax.clip_by_global_norm + adam")
PER_SLICE = ", layer_axis=0 on the blocks"

# Goals: (goal, case, reference case, bound on the ratio of their times), in place.
RATIO_GOALS = [
    ("clip ≤ 1.05× optax.clip", "clipjax.clip", "optax.clip", 1.05),
    ("clip_by_global_norm ≤ 1.0× optax's", CGN, OCGN, 1.0),
    ("clip_by_block_rms ≤ 1.0× optax's", "clipjax.clip_by_block_rms",
     "optax.clip_by_block_rms", 1.0),
    ("adaptive_grad_clip ≤ 1.0× optax's", "clipjax.adaptive_grad_clip",
     "optax.adaptive_grad_clip", 1.0),
    ("chain(clip_by_global_norm, adam) ≤ 1.12× adam", CLIP_ADAM, ADAM, 1.12),
] + [(f"{name} ≤ 1.05× clip_by_global_norm", f"clipjax.{name}", CGN, 1.05)
     for name in HISTORY + ("skip_spikes",)]
# Peak memory with donation ≤ this × the gradient bytes (AGC: × gradient + parameter bytes).
MEMORY_BOUND = 1.02
MEMORY_GOALS = ("clip", "clip_by_norm", "clip_by_global_norm", "clip_by_block_rms",
                "adaptive_grad_clip") + HISTORY + ("skip_spikes",)


def clipper_pairs() -> list[tuple[str, optax.GradientTransformation | None, str | None,
                                  optax.GradientTransformation | None, bool]]:
  """(clipjax name, transform, optax name, optax transform or None, needs params)."""
  pairs = [
      ("clip_by_global_norm", clipjax.clip_by_global_norm(1.0), "clip_by_global_norm",
       optax.clip_by_global_norm(1.0), False),
      ("clip_by_norm", clipjax.clip_by_norm(1.0), None, None, False),
      ("clip", clipjax.clip(1e-4), "clip", optax.clip(1e-4), False),
      ("clip_by_block_rms", clipjax.clip_by_block_rms(1e-4), "clip_by_block_rms",
       optax.clip_by_block_rms(1e-4), False),
      ("adaptive_grad_clip", clipjax.adaptive_grad_clip(0.01), "adaptive_grad_clip",
       optax.adaptive_grad_clip(0.01), True),
  ]
  for name in HISTORY:
    if hasattr(clipjax, name):
      pairs.append((name, getattr(clipjax, name)(), None, None, False))
  if hasattr(clipjax, "skip_spikes"):
    # Around the identity its step is a global norm and a select: the work of a global clip.
    pairs.append(("skip_spikes", clipjax.skip_spikes(optax.identity()), None, None, False))
  return pairs


def per_slice_clippers(params: Any) -> list[tuple[str, optax.GradientTransformation, bool]]:
  """The per-tensor clippers with ``layer_axis`` on a scanned tree: (name, transform, needs
  params). They clip each layer's slice as the unscanned model's leaf; optax has no such
  option, so these rows carry no goal."""
  axis = _common.stacked_layer_axis(params)
  return [("clip_by_norm", clipjax.clip_by_norm(1.0, layer_axis=axis), False),
          ("clip_by_block_rms", clipjax.clip_by_block_rms(1e-4, layer_axis=axis), False),
          ("adaptive_grad_clip", clipjax.adaptive_grad_clip(0.01, layer_axis=axis), True),
          ("adagc", clipjax.adagc(layer_axis=axis), False)]


def build_cases(grads: Any, params: Any, log: Callable[[str], None], *,
                scanned: bool) -> list[Case]:
  cases: list[Case] = []

  def add(case: Case | None) -> None:
    if case is not None:
      cases.append(case)

  add(jax_case(READ, clipjax.global_norm, (grads,)))
  add(jax_case(OPTAX_READ, optax.global_norm, (grads,)))
  for cj_name, cj_tx, ox_name, ox_tx, needs_params in clipper_pairs():
    add(update_case(f"clipjax.{cj_name}", cj_tx, grads, params, in_place=True,
                    needs_params=needs_params))
    if ox_tx is not None:
      add(update_case(f"optax.{ox_name}", ox_tx, grads, params, in_place=True,
                      needs_params=needs_params))
  if scanned:
    for name, tx, needs_params in per_slice_clippers(params):
      add(update_case(f"clipjax.{name}{PER_SLICE}", tx, grads, params, in_place=True,
                      needs_params=needs_params))
  add(update_case(NO_STATS, clipjax.clip_by_global_norm(1.0), grads, params, in_place=True,
                  keep_state=False))
  add(update_case(CGN + FRESH, clipjax.clip_by_global_norm(1.0), grads, params, in_place=False))
  add(update_case(OCGN + FRESH, optax.clip_by_global_norm(1.0), grads, params, in_place=False))
  add(torch_case(grads))
  add(train_case(ADAM, optax.adam(1e-3), grads, params))
  add(train_case(CLIP_ADAM, optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(1e-3)),
                 grads, params))
  add(train_case(OPTAX_CLIP_ADAM, optax.chain(optax.clip_by_global_norm(1.0),
                                              optax.adam(1e-3)), grads, params))
  for case in cases:
    case.ready()
    if case.compile_s is not None:
      log(f"    compiled {case.name} in {case.compile_s:.2f} s")
  return cases


def peak_bytes(memory: Any) -> int:
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


# Report -------------------------------------------------------------------------


def software() -> str:
  if torch is None:
    return _common.versions("torch not installed")
  return _common.versions(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small trees (100 leaves instead of 1000) and few rounds: checks"
                           " that the script runs")
  parser.add_argument("--budget", type=float, default=10.0,
                      help="seconds of interleaved timing per tree (default 10; at least"
                           f" {MIN_ROUNDS} rounds)")
  parser.add_argument("--out", default=_common.RESULTS,
                      help="the Markdown file whose bench section is rewritten")
  args = parser.parse_args()

  t0 = time.perf_counter()

  def log(msg: str) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[{time.perf_counter() - t0:6.1f} s, {rss:4.1f} GB] {msg}", flush=True)

  if torch is not None:
    torch.set_num_threads(2)
  scale = 0.01 if args.quick else 1.0
  total = int(TOTAL * scale)
  many = 100 if args.quick else 1000
  budget = 3.0 if args.quick else args.budget
  min_rounds, max_rounds = (3, 5) if args.quick else (MIN_ROUNDS, 101)
  load_before = os.getloadavg()
  started = datetime.datetime.now(datetime.timezone.utc)
  log(f"clipjax benchmarks on {_common.cpu_model()}, {os.cpu_count()} cores; {software()};"
      f" clipjax from {_common.clipjax_source()}")

  trees = [("10 leaves", lambda: _common.synthetic_tree(10, total, 0), False),
           (f"{many} leaves", lambda: _common.synthetic_tree(many, total, 1), False),
           ("Flax transformer", lambda: _common.transformer_params(scale), False),
           ("scanned Flax transformer",
            lambda: _common.transformer_params(scale, scanned=True), True)]
  results = []
  for label, make, scanned in trees:
    log(f"{label}: building the tree")
    params = make()
    grads = like(params, seed=7, std=1.0)
    n_leaves = len(jax.tree.leaves(grads))
    n_params = sum(x.size for x in jax.tree.leaves(grads))
    if not label.endswith(" leaves"):
      label = f"{label} ({n_leaves} leaves)"
    log(f"{label}: compiling")
    cases = build_cases(grads, params, log, scanned=scanned)
    log(f"{label}: timing {len(cases)} cases, interleaved")
    rounds = run_interleaved(cases, warmup=2, min_rounds=min_rounds, max_rounds=max_rounds,
                             budget_s=budget, log=log)
    results.append(dict(label=label, n_leaves=n_leaves, n_params=n_params,
                        grad_bytes=_common.tree_bytes(grads),
                        param_bytes=_common.tree_bytes(params),
                        cases={c.name: c for c in cases}, rounds=rounds))
    for case in cases:  # free the buffers before the next tree
      case.step = None
    del cases, params, grads

  body = write_report(results, started=started, elapsed=time.perf_counter() - t0,
                      load=(load_before, os.getloadavg()), quick=args.quick)
  print(body)
  _common.write_section(args.out, "bench", body)
  log(f"wrote the bench section of {args.out}")


def write_report(results: list[dict], *, started, elapsed: float, load: tuple,
                 quick: bool) -> str:
  lines: list[str] = []
  r = lines.append
  if quick:
    r("**Quick mode (`--quick`): tiny trees, a few rounds; these figures mean nothing.**")
    r("")
  lines += _common.machine_lines(
      started=started, elapsed_s=elapsed, load=load, software=software(),
      command="`make bench` (runs `python benchmarks/bench_clip.py`)")
  r("")
  r("Times are medians over interleaved rounds (every case once per round, warm-up excluded);"
    " ratios are medians of the per-round ratios, with the min–max of the per-round ratios in"
    " parentheses. A goal is *met* when the whole min–max spread is within its bound, *not"
    " met* when all of it is above, and *within the noise* when the spread straddles the"
    " bound. *In place* means the gradient buffers are donated (`donate_argnums=(0,)`, the"
    " state that comes out is the next call's), and for the adam steps the parameters and the"
    " optimizer state, as in a jitted train step; PyTorch's `clip_grad_norm_` works in place"
    " too. *Fresh"
    " output* writes a new tree each call. Peak memory is argument + output + temp − alias"
    " bytes from `compiled.memory_analysis()`.")
  r("")

  # Goals
  r("### Goals (in place)")
  r("")
  r("| goal | " + " | ".join(res["label"] for res in results) + " |")
  r("|---|" + "---|" * len(results))
  tally: dict[str, int] = {}

  def cell(text: str) -> str:
    for word in ("not met", "within the noise", "met"):
      if word in text:
        tally[word] = tally.get(word, 0) + 1
        break
    return text

  for goal, name, ref, bound in RATIO_GOALS:
    cells = []
    for res in results:
      c = res["cases"]
      cells.append(cell(ratio_cell(c[name], c[ref], bound)) if name in c and ref in c else "—")
    r(f"| {goal} | " + " | ".join(cells) + " |")
  for name in MEMORY_GOALS:
    agc = name == "adaptive_grad_clip"
    cells = []
    for res in results:
      case = res["cases"].get(f"clipjax.{name}")
      if case is None or case.memory is None:
        cells.append("—")
        continue
      base = res["grad_bytes"] + (res["param_bytes"] if agc else 0)
      x = peak_bytes(case.memory) / base
      cells.append(cell(f"{x:.3f}× {_common.verdict(x, x, MEMORY_BOUND)}"))
    what = "gradient + parameter bytes" if agc else "gradient bytes"
    r(f"| {name}: peak memory ≤ {MEMORY_BOUND}× {what} | " + " | ".join(cells) + " |")
  r("")
  r(f"{tally.get('met', 0)} met, {tally.get('within the noise', 0)} within the noise,"
    f" {tally.get('not met', 0)} not met.")
  r("")

  # Times
  for res in results:
    c = res["cases"]
    r(f"### {res['label']}")
    r("")
    r(f"{res['n_params'] / 1e6:.1f}M parameters, gradients {res['grad_bytes'] / 1e6:.0f} MB;"
      f" {res['rounds']} interleaved rounds.")
    r("")
    r("| case | median ms | × read pass | × optax (min–max) | peak memory × grads |"
      " compile s |")
    r("|---|---:|---:|---|---:|---:|")
    for name, case in c.items():
      rel_read = f"{ratio(case, c[READ]):.2f}"
      other = None
      if name.startswith("clipjax."):
        candidate = "optax." + name[len("clipjax."):]
        if name == CLIP_ADAM:
          candidate = OPTAX_CLIP_ADAM
        if name == NO_STATS:
          candidate = OCGN
        if name == READ:
          candidate = OPTAX_READ
        other = c.get(candidate)
      if name == TORCH:
        other = c.get(OCGN)
      rel_optax = ratio_cell(case, other) if other is not None else "—"
      if name.startswith("clipjax.") and other is None:
        rel_optax = "no optax equivalent"
      mem = (f"{peak_bytes(case.memory) / res['grad_bytes']:.3f}"
             if case.memory is not None else "—")
      comp = f"{case.compile_s:.2f}" if case.compile_s is not None else "—"
      shown = name + (" [in place]" if case.donated and FRESH not in name
                      and name not in (READ, OPTAX_READ) else "")
      r(f"| {shown} | {median_ms(case):.2f} | {rel_read} | {rel_optax} | {mem} | {comp} |")
    r("")
    if TORCH in c:
      r(f"PyTorch `clip_grad_norm_(foreach=True)` takes {ratio_cell(c[TORCH], c[CGN])} the"
        " time of clipjax's in-place `clip_by_global_norm` (interleaved).")
      r("")
  r("Notes: `clip_by_norm` (per tensor) has no optax counterpart. `skip_spikes` wraps"
    " `optax.identity()`. On the scanned tree the optax twins and clipjax's defaults treat a"
    " stacked leaf as one tensor; the rows with `layer_axis` clip each layer's slice as the"
    " unscanned model does. `clip_stats` cannot be switched off: *updates only* jits an update"
    " that returns only the updates, so XLA drops the statistics. Compile times here ran two"
    " at a time; `make bench-compile` measures them one at a time.")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
