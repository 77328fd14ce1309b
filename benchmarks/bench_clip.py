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

The same run writes a second section, between ``<!-- hlo:start -->`` and
``<!-- hlo:end -->``: the compiled size of every clipper's in-place program
and its optax twin's, the number of instructions of the optimized HLO
(``compiled.as_text()``) and XLA's ``cost_analysis()["bytes accessed"]`` over
the gradient bytes, at 100 and 1000 leaves of the same shape and on the Flax
tree. The 1000-leaf and Flax programs are the ones timed here (compiled once
for both sections); the 100-leaf tree is only lowered on shapes and compiled.
These figures are deterministic for given software versions.

No timing here is asserted by any test.
"""

from __future__ import annotations

import argparse
import datetime
import os
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
    case.instructions = _common.hlo_instructions(compiled)
    case.bytes_accessed = _common.bytes_accessed(compiled)

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


def update_fn(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """``lambda g, s, p: tx.update(g, s, p)``; ``p`` is ``None`` (no argument) but for AGC."""
  def fn(g, s, p):
    return tx.update(g, s, p)
  return fn


def size_case(name: str, tx: optax.GradientTransformation, grads: Any, params: Any, *,
              needs_params: bool) -> Case:
  """The program of an in-place :func:`update_case`, lowered on the shapes of ``grads`` and
  compiled, never run: the size of a clipper on a tree that is not timed."""
  state = jax.eval_shape(tx.init, params)
  return jax_case(name, update_fn(tx), (grads, state, params if needs_params else None),
                  donate=(0,))


def update_case(name: str, tx: optax.GradientTransformation, grads: Any, params: Any, *,
                in_place: bool, needs_params: bool = False, keep_state: bool = True) -> Case:
  """A case running ``tx.update`` on ``grads``, in place (the gradient donated) or to a fresh
  output; the state that comes out is the next call's state.

  In place, the program is ``jax.jit(lambda g, s, p: tx.update(g, s, p),
  donate_argnums=(0,))``, the one whose size the ``hlo`` section reports."""
  state = tx.init(params)
  p = params if needs_params else None
  original = grads
  if keep_state:
    fn = update_fn(tx)

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


# Compiled size (the hlo section): (clipjax clipper, reference, bound on the ratio of their
# HLO instruction counts). The clippers without an optax twin are held to optax's global clip.
SIZE_GOALS = [
    ("clip_by_global_norm", OCGN, 1.1),
    ("clip_by_block_rms", "optax.clip_by_block_rms", 1.1),
    ("adaptive_grad_clip", "optax.adaptive_grad_clip", 1.1),
    ("clip", "optax.clip", 2.5),
] + [(name, OCGN, 1.3) for name in ("clip_by_norm",) + HISTORY + ("skip_spikes",)]
# Instructions per leaf at the larger synthetic tree ≤ this × at the smaller one.
LINEAR_BOUND = 1.1
# Bytes accessed ≤ this × the gradient bytes, for every clipper but AGC (held to optax's AGC).
BYTES_BOUND = 3.0


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


def clippers() -> list[tuple[str, optax.GradientTransformation, bool]]:
  """Every clipper of :func:`clipper_pairs` and every optax twin: (case name, transform,
  needs params)."""
  out = []
  for cj_name, cj_tx, ox_name, ox_tx, needs_params in clipper_pairs():
    out.append((f"clipjax.{cj_name}", cj_tx, needs_params))
    if ox_tx is not None:
      out.append((f"optax.{ox_name}", ox_tx, needs_params))
  return out


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


def size_record(label: str, grads: Any, cases: list[Case]) -> dict:
  """The compiled size of the clippers' in-place programs among ``cases``, for the hlo
  section."""
  names = {name for name, _, _ in clippers()}
  leaves = jax.tree.leaves(grads)
  shapes = {tuple(x.shape) for x in leaves}
  return dict(label=label, n_leaves=len(leaves), grad_bytes=_common.tree_bytes(grads),
              leaf_shape=shapes.pop() if len(shapes) == 1 else None,
              figures={c.name: (c.instructions, c.bytes_accessed) for c in cases
                       if c.name in names})


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
  parser.add_argument("--budget", type=float, default=8.0,
                      help="seconds of interleaved timing per tree (default 8; at least"
                           f" {MIN_ROUNDS} rounds)")
  parser.add_argument("--out", default=_common.RESULTS,
                      help="the Markdown file whose bench section is rewritten")
  args = parser.parse_args()

  t0 = time.perf_counter()
  log = _common.progress_log(t0)

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
  # The hlo section reports the clippers' programs at many // 10 and many leaves (the same
  # leaf shape) and on the Flax tree. A tree of many // 10 leaves that is not timed is only
  # lowered on shapes and compiled, before the timed trees.
  few = many // 10
  sizes: dict[str, dict] = {}
  if few != 10:
    label = f"{few} leaves"
    log(f"{label}: compiling the clippers only (for the hlo section)")
    t_size = time.perf_counter()
    grads = jax.eval_shape(lambda: _common.synthetic_tree(few, total // 10, 1))
    cases = [size_case(name, tx, grads, grads, needs_params=needs_params)
             for name, tx, needs_params in clippers()]
    for case in cases:
      case.ready()
    sizes[label] = size_record(label, grads, cases)
    log(f"{label}: compiled {len(cases)} programs in {time.perf_counter() - t_size:.0f} s")
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
    if label in (f"{few} leaves", f"{many} leaves") or label.startswith("Flax transformer"):
      sizes[label] = size_record(label, grads, cases)
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

  elapsed = time.perf_counter() - t0
  load = (load_before, os.getloadavg())
  body = write_report(results, started=started, elapsed=elapsed, load=load, quick=args.quick)
  print(body)
  _common.write_section(args.out, "bench", body)
  log(f"wrote the bench section of {args.out}")
  body = write_size_report([sizes[k] for k in sorted(sizes, key=lambda k: (
      not k.endswith(" leaves"), sizes[k]["n_leaves"]))], small=f"{few} leaves",
      large=f"{many} leaves", started=started, elapsed=elapsed, load=load, quick=args.quick)
  print(body)
  _common.write_section(args.out, "hlo", body)
  log(f"wrote the hlo section of {args.out}")


def write_report(results: list[dict], *, started, elapsed: float, load: tuple,
                 quick: bool) -> str:
  lines: list[str] = []
  r = lines.append
  lines += _common.report_head(
      quick="tiny trees, a few rounds" if quick else None, started=started, elapsed_s=elapsed,
      load=load, software=software(),
      command="`make bench` (runs `python benchmarks/bench_clip.py`)")
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


def write_size_report(sizes: list[dict], *, small: str, large: str, started, elapsed: float,
                      load: tuple, quick: bool) -> str:
  """The hlo section: HLO instructions and bytes accessed of every clipper's program."""
  lines: list[str] = []
  r = lines.append
  lines += _common.report_head(
      quick="tiny trees" if quick else None, started=started, elapsed_s=elapsed, load=load,
      software=software(),
      command="`make bench` (runs `python benchmarks/bench_clip.py`, which writes this section"
              " and the run-time section)")
  labels = [t["label"] for t in sizes]
  by_label = {t["label"]: t for t in sizes}
  shapes = [f"{t['label']} of {t['leaf_shape']}" for t in sizes if t["leaf_shape"]]
  r("Every clipper's update, `jax.jit(lambda g, s: tx.update(g, s), donate_argnums=(0,))`"
    " (AGC: `lambda g, s, p: tx.update(g, s, p)`), lowered and compiled on each tree: the"
    " programs that the run-time section times in place (the size-only tree is lowered on"
    " shapes and never run). *Instructions*: the lines of `compiled.as_text()` (the optimized"
    " HLO) that contain ` = `. *Bytes*: `compiled.cost_analysis()[\"bytes accessed\"]` over"
    " the gradient bytes, also for AGC, although optax's and clipjax's AGC read the"
    " parameters as well. XLA's cost analysis counts a conditional as its costliest branch,"
    " so the overflow rescue of clipjax's norms (a second read of the gradients that runs"
    " only when a sum of squares overflows) counts as if it ran. Both figures depend only"
    " on the software versions, not on the machine's load: a goal is *met* or *not met*."
    " Trees, float32: " + "".join(f"{shape}; " for shape in shapes)
    + "the parameters of the Flax transformer of the run-time section. Clipjax constructors"
    " with their default arguments but the thresholds: `clip(1e-4)`, `clip_by_norm(1.0)`,"
    " `clip_by_block_rms(1e-4)`, `clip_by_global_norm(1.0)`, `adaptive_grad_clip(0.01)`;"
    " `skip_spikes` wraps `optax.identity()`.")
  r("")

  def figure(label: str, name: str, index: int) -> float | None:
    tree = by_label.get(label)
    if tree is None or name not in tree["figures"]:
      return None
    value = tree["figures"][name][index]
    return value / tree["grad_bytes"] if index == 1 else value

  tally = _common.Tally()
  head = "| goal | " + " | ".join(labels) + " |"
  rule = "|---|" + "---|" * len(labels)
  r("### Goals")
  r("")
  r(head)
  r(rule)
  for name, ref, bound in SIZE_GOALS:
    cells = []
    for label in labels:
      a, b = figure(label, f"clipjax.{name}", 0), figure(label, ref, 0)
      if a is None or b is None:
        cells.append("—")
        continue
      x = a / b
      cells.append(tally(f"{x:.3f}× {_common.verdict(x, x, bound)}"))
    r(f"| {name}: instructions ≤ {bound}× {ref} | " + " | ".join(cells) + " |")
  for name, ref, _ in SIZE_GOALS:
    agc = name == "adaptive_grad_clip"
    cells = []
    for label in labels:
      x = figure(label, f"clipjax.{name}", 1)
      bound = figure(label, "optax.adaptive_grad_clip", 1) if agc else BYTES_BOUND
      if x is None or bound is None:
        cells.append("—")
        continue
      shown = f"{x:.2f} (optax {bound:.2f})" if agc else f"{x:.2f}"
      # Judged as shown, to two decimals: the scalars (statistics, state) add a few
      # bytes that are not passes over the gradients (clip: 3.001 is one read + one clamp).
      x = round(x, 2)
      cells.append(tally(f"{shown} {_common.verdict(x, x, bound)}"))
    what = ("optax.adaptive_grad_clip's (both over gradient bytes)" if agc
            else f"{BYTES_BOUND}× gradient bytes")
    r(f"| {name}: bytes accessed ≤ {what} | " + " | ".join(cells) + " |")
  r("")

  r(f"### Linear in the number of leaves: instructions per leaf at {large} ≤ {LINEAR_BOUND}×"
    f" at {small}")
  r("")
  r(f"| transform | per leaf, {small} | per leaf, {large} | growth | verdict |")
  r("|---|---:|---:|---:|---|")
  for name, _, _ in clippers():
    a, b = figure(small, name, 0), figure(large, name, 0)
    if a is None or b is None:
      continue
    per_small, per_large = a / by_label[small]["n_leaves"], b / by_label[large]["n_leaves"]
    x = per_large / per_small
    judged = tally(_common.verdict(x, x, LINEAR_BOUND)) if name.startswith("clipjax.") else "—"
    r(f"| {name} | {per_small:.1f} | {per_large:.1f} | {x:.3f}× | {judged} |")
  r("")
  r(tally.line())
  r("")

  r("### HLO instructions")
  r("")
  r("In parentheses: over the reference of the clipper's goal.")
  r("")
  r("| transform | reference | " + " | ".join(labels) + " |")
  r("|---|---|" + "---:|" * len(labels))
  refs = {f"clipjax.{name}": ref for name, ref, _ in SIZE_GOALS}
  for name, _, _ in clippers():
    ref = refs.get(name)
    cells = []
    for label in labels:
      a = figure(label, name, 0)
      b = figure(label, ref, 0) if ref else None
      cells.append("—" if a is None else f"{a}" + (f" ({a / b:.2f}×)" if b else ""))
    r(f"| {name} | {ref or '—'} | " + " | ".join(cells) + " |")
  r("")
  r("### Bytes accessed ÷ gradient bytes")
  r("")
  r("| transform | " + " | ".join(labels) + " |")
  r("|---|" + "---:|" * len(labels))
  for name, _, _ in clippers():
    cells = []
    for label in labels:
      x = figure(label, name, 1)
      cells.append("—" if x is None else f"{x:.3f}")
    r(f"| {name} | " + " | ".join(cells) + " |")
  r("")
  r("Notes: one read and one write of the gradients is 2.0; a norm and then a scale is 3.0"
    " (read, read, write). `clip` ≤ 2.0 is within reach only where XLA fuses the statistic"
    " into the clamp; XLA CPU does not, so its goal here is ≤ 3.0 like the others.")
  r("")
  r("### The measurement's code and the accelerator")
  r("")
  lines_now = measurement_lines()
  r(f"- `_norms` + `_partials` + `_xla` of the clipjax measured: {lines_now} lines, goal ≤"
    f" {MEASUREMENT_LINES}: {_common.verdict(lines_now, lines_now, MEASUREMENT_LINES)}.")
  backend = jax.default_backend()
  if backend == "cpu":
    r("- Accelerator: none in this run (`cpu` backend), so there is no GPU figure.")
  else:
    r(f"- Accelerator: `{backend}` ({jax.devices()[0].device_kind}); the figures above are"
      " for its compiler.")
  return "\n".join(lines)


# The lines of the modules that measure norms (the partial norms, their rescue, the
# collective, and XLA workarounds) that the compiled-size section reports against.
MEASUREMENT_LINES = 350


def measurement_lines() -> int:
  """Lines of ``_norms.py``, ``_partials.py`` and ``_xla.py`` of the imported clipjax."""
  root = os.path.dirname(clipjax.__file__)
  total = 0
  for name in ("_norms.py", "_partials.py", "_xla.py"):
    with open(os.path.join(root, name), encoding="utf-8") as f:
      total += sum(1 for _ in f)
  return total


if __name__ == "__main__":
  main()
