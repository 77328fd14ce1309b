"""The whole train step: what each clipper adds to a jitted transformer language-model step.

Run by ``make bench`` after ``bench_clip.py`` (or ``python benchmarks/bench_step.py``).
Prints a table and rewrites the section between ``<!-- step:start -->`` and
``<!-- step:end -->`` of ``benchmarks/RESULTS.md``; nothing else in the file changes.

Method:

* The step is one ``jax.jit`` with the parameters and the optimizer state
  donated (``donate_argnums=(0, 1)``): the next-token cross-entropy of a
  GPT-style flax.linen transformer on a fixed batch of random tokens, its
  gradient (``jax.value_and_grad``), ``tx = optax.chain(clipper,
  optax.adamw(1e-3))``, ``tx.update(grads, state, params)`` and
  ``optax.apply_updates``. ``skip_spikes`` wraps ``optax.adamw(1e-3)``
  instead of being chained before it. The baseline is the same step with
  ``optax.clip_by_global_norm(1.0)``; clipjax's ``adaptive_grad_clip`` is
  compared with the step with ``optax.adaptive_grad_clip(0.01)``.
* Two models of the same size (``_common.transformer`` with ``DIMS``): the
  blocks unrolled (198 leaves), and the blocks under ``nn.scan`` (22 leaves,
  each block parameter stacked along a leading layer axis).
* Instructions: the lines of the optimized HLO (``compiled.as_text()``) that
  contain `` = ``, for the whole step; deterministic for given software
  versions, so a goal on them is met or not met.
* Time: every step is compiled ahead of time and warmed up, then all steps of
  a model run interleaved (A B C ... then ... C B A), each feeding its
  parameters and state back, for a number of rounds. A time is the median over
  the rounds; a ratio is the median over rounds of the per-round ratio, its
  spread the min–max of the per-round ratios. A goal is met when the whole
  spread is within its bound, not met when all of it is above, and within the
  noise otherwise.

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

import jax
import optax

import _common
import clipjax
from _common import Case, median_ms, ratio_cell, run_interleaved

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

# The model: 2.9M parameters; a step takes about 0.1 s on 2 quiet cores.
DIMS = dict(d=128, heads=4, layers=12, vocab=2048, context=64)
BATCH = 4
QUICK_DIMS = dict(layers=2, context=16)  # with scale < 1: d 64, vocab 512
QUICK_BATCH = 2
# With --quick only these steps are compiled (each compile takes seconds, the model's
# gradient most of them): one of each kind of clipper, and the steps the others refer to.
QUICK_STEPS = ("optax.clip_by_global_norm", "optax.adaptive_grad_clip",
               "clipjax.clip_by_global_norm", "clipjax.clip", "clipjax.adaptive_grad_clip",
               "clipjax.zclip", "clipjax.skip_spikes(adamw)")
LEARNING_RATE = 1e-3

BASE = "optax.clip_by_global_norm"
OAGC = "optax.adaptive_grad_clip"
CGN = "clipjax.clip_by_global_norm"
AGC = "clipjax.adaptive_grad_clip"
SKIP = "clipjax.skip_spikes(adamw)"

# Goals: instructions of the step ≤ bound × the reference's; time ≤ bound × the reference's.
INSTRUCTION_BOUND, TIME_BOUND = 1.03, 1.05
TIGHT = {CGN: (1.01, 1.02), AGC: (1.01, TIME_BOUND)}


def optimizers() -> list[tuple[str, optax.GradientTransformation]]:
  """(name, ``tx``) of every step: the optax baselines first, then every clipjax clipper."""
  def chained(clipper: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(clipper, optax.adamw(LEARNING_RATE))

  steps = [
      (BASE, chained(optax.clip_by_global_norm(1.0))),
      (OAGC, chained(optax.adaptive_grad_clip(0.01))),
      (CGN, chained(clipjax.clip_by_global_norm(1.0))),
      ("clipjax.clip", chained(clipjax.clip(1e-4))),
      ("clipjax.clip_by_norm", chained(clipjax.clip_by_norm(1.0))),
      ("clipjax.clip_by_block_rms", chained(clipjax.clip_by_block_rms(1e-4))),
      (AGC, chained(clipjax.adaptive_grad_clip(0.01))),
  ]
  for name in ("zclip", "adagc", "autoclip", "quantile_clip", "clip_by_rolling_norm"):
    if hasattr(clipjax, name):
      steps.append((f"clipjax.{name}", chained(getattr(clipjax, name)())))
  if hasattr(clipjax, "skip_spikes"):
    steps.append((SKIP, clipjax.skip_spikes(optax.adamw(LEARNING_RATE))))
  return steps


def reference(name: str) -> str | None:
  """The step a step is compared with: the optax AGC step for clipjax's AGC, else the
  baseline."""
  if name == BASE:
    return None
  return OAGC if name == AGC else BASE


def bounds(name: str) -> tuple[float, float]:
  """(instructions, time) bounds of a step's goals."""
  return TIGHT.get(name, (INSTRUCTION_BOUND, TIME_BOUND))


def step_case(name: str, tx: optax.GradientTransformation, value_and_grad: Callable,
              params: Any, tokens: jax.Array) -> Case:
  """One train step, compiled in the background; each call feeds its parameters and state
  back. :meth:`Case.ready` waits for the compile."""
  def step(p, s, batch):
    loss, grads = value_and_grad(p, batch)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  params = jax.tree.map(lambda x: x.copy(), params)
  state = tx.init(params)
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens)
  future = _common.compile_in_background(lowered)
  current = [(params, state, tokens)]
  case = Case(name, lambda: None, donated=True)

  def ready():
    compiled, case.compile_s = future.result()
    case.instructions = _common.hlo_instructions(compiled)

    def run():
      out = compiled(*current[0])
      jax.block_until_ready(out)
      current[0] = (out[0], out[1], tokens)

    case.step = run

  case.ready = ready
  return case


def model_cases(scale: float, dims: dict[str, int], batch: int, *, scanned: bool,
                only: tuple[str, ...] | None, log: Callable[[str], None]
                ) -> tuple[list[Case], dict]:
  """The steps of every optimizer on one model, compiled; and the model's size."""
  model, _ = _common.transformer(scale, scanned=scanned, dims=dims)
  size = _common.transformer_size(scale, dims)
  tokens = jax.random.randint(jax.random.key(1), (batch, size["context"] + 1), 0,
                              size["vocab"])
  params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"]

  def loss(p, batch_tokens):
    logits = model.apply({"params": p}, batch_tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_tokens[:, 1:]).mean()

  # One jitted gradient shared by every step: traced once, inlined into each step's HLO.
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  cases = [step_case(name, tx, value_and_grad, params, tokens) for name, tx in optimizers()
           if only is None or name in only]
  for case in cases:
    case.ready()
    log(f"    compiled {case.name} in {case.compile_s:.2f} s")
  leaves = jax.tree.leaves(params)
  info = dict(n_leaves=len(leaves), n_params=sum(x.size for x in leaves), tokens=tokens.shape)
  return cases, info


# Report -------------------------------------------------------------------------


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a tiny model, some of the clippers and few rounds: checks that"
                           " the script runs")
  parser.add_argument("--budget", type=float, default=10.0,
                      help="seconds of interleaved timing per model (default 10; at least 8"
                           " rounds)")
  parser.add_argument("--out", default=_common.RESULTS,
                      help="the Markdown file whose step section is rewritten")
  args = parser.parse_args()

  t0 = time.perf_counter()
  log = _common.progress_log(t0)

  scale, dims, batch = (0.01, QUICK_DIMS, QUICK_BATCH) if args.quick else (1.0, DIMS, BATCH)
  budget = 2.0 if args.quick else args.budget
  min_rounds, max_rounds = (3, 5) if args.quick else (8, 101)
  load_before = os.getloadavg()
  started = datetime.datetime.now(datetime.timezone.utc)
  log(f"train-step benchmark on {_common.cpu_model()}, {os.cpu_count()} cores;"
      f" {_common.versions()}; clipjax from {_common.clipjax_source()}")

  results = []
  for label, scanned in (("transformer", False), ("scanned transformer", True)):
    log(f"{label}: compiling")
    cases, info = model_cases(scale, dims, batch, scanned=scanned,
                              only=QUICK_STEPS if args.quick else None, log=log)
    label = f"{label} ({info['n_leaves']} leaves)"
    log(f"{label}: timing {len(cases)} steps, interleaved")
    rounds = run_interleaved(cases, warmup=2, min_rounds=min_rounds, max_rounds=max_rounds,
                             budget_s=budget, log=log)
    results.append(dict(label=label, rounds=rounds, cases={c.name: c for c in cases}, **info))
    for case in cases:  # free the buffers before the next model
      case.step = None
    del cases

  body = write_report(results, dims=dims, scale=scale, batch=batch, started=started,
                      elapsed=time.perf_counter() - t0, load=(load_before, os.getloadavg()),
                      quick=args.quick)
  print(body)
  _common.write_section(args.out, "step", body)
  log(f"wrote the step section of {args.out}")


def write_report(results: list[dict], *, dims: dict[str, int], scale: float, batch: int,
                 started, elapsed: float, load: tuple, quick: bool) -> str:
  lines: list[str] = []
  r = lines.append
  lines += _common.report_head(
      quick="a tiny model, a few rounds" if quick else None, started=started,
      elapsed_s=elapsed, load=load, software=_common.versions(),
      command="`make bench` (runs `python benchmarks/bench_step.py` after `bench_clip.py`)")
  first = results[0]
  size = ", ".join(f"{k}={v}" for k, v in dims.items())
  n_tokens = first["tokens"][1]
  r("One `jax.jit` per step, parameters and optimizer state donated: the next-token"
    " cross-entropy of a GPT-style flax.linen transformer (causal attention;"
    f" `_common.transformer({scale:g}, dims=dict({size}))`, {first['n_params'] / 1e6:.1f}M"
    f" parameters) on a fixed batch of {batch} sequences of {n_tokens} random tokens"
    f" ({n_tokens - 1} predicted), `jax.value_and_grad`, `optax.chain(clipper,"
    " optax.adamw(1e-3))` and `optax.apply_updates`; `skip_spikes` wraps `optax.adamw(1e-3)`."
    " The *reference* of a step is the same step with"
    f" `{BASE}(1.0)`, but for clipjax's `adaptive_grad_clip`: the step with"
    f" `{OAGC}(0.01)` (AGC reads the parameters too). *Instructions*: the lines of the"
    " optimized HLO (`compiled.as_text()`) that contain ` = `; deterministic, so met or not met."
    " *Time*: steps interleaved (every step once per round, the order alternating), medians of"
    " the per-round ratios with their min–max; met when the whole spread is within the bound,"
    " not met when all of it is above, within the noise otherwise. Clipjax constructors with"
    " their default arguments but the thresholds: `clip(1e-4)`, `clip_by_norm(1.0)`,"
    " `clip_by_block_rms(1e-4)`, `clip_by_global_norm(1.0)`, `adaptive_grad_clip(0.01)`.")
  r("")

  tally = _common.Tally()
  r("### Goals")
  r("")
  r("| goal | " + " | ".join(res["label"] for res in results) + " |")
  r("|---|" + "---|" * len(results))
  names = [name for name, _ in optimizers()]
  for index, what in ((0, "instructions"), (1, "time")):
    for name in names:
      ref = reference(name)
      if ref is None or name == OAGC:
        continue
      bound = bounds(name)[index]
      cells = []
      for res in results:
        c = res["cases"]
        if name not in c or ref not in c:
          cells.append("—")
        elif index == 0:
          x = c[name].instructions / c[ref].instructions
          cells.append(tally(f"{x:.3f}× {_common.verdict(x, x, bound)}"))
        else:
          cells.append(tally(ratio_cell(c[name], c[ref], bound)))
      short = name.removeprefix("clipjax.")
      r(f"| {short} step: {what} ≤ {bound}× the {ref} step | " + " | ".join(cells) + " |")
  r("")
  r(tally.line())
  r("")

  for res in results:
    c = res["cases"]
    r(f"### {res['label']}")
    r("")
    r(f"{res['n_params'] / 1e6:.1f}M parameters, {res['n_leaves']} leaves; {res['rounds']}"
      " interleaved rounds.")
    r("")
    r("| step | reference | median ms | time × reference (min–max) | instructions |"
      " × reference | compile s |")
    r("|---|---|---:|---|---:|---:|---:|")
    for name, case in c.items():
      ref = reference(name)
      vs_ref = ratio_cell(case, c[ref]) if ref in c else "—"
      rel = f"{case.instructions / c[ref].instructions:.3f}×" if ref in c else "—"
      r(f"| {name} | {ref or '—'} | {median_ms(case):.1f} | {vs_ref} | {case.instructions} |"
        f" {rel} | {case.compile_s:.1f} |")
    r("")
  r("Notes: compile times ran two at a time, while the next step was being lowered.")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
