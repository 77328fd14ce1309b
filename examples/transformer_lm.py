"""Loss spikes in a small transformer language model, with and without clipping.

A decoder-only transformer written in Flax NNX (pre-LayerNorm blocks created
with ``nnx.vmap`` as one stacked set of parameters and applied with
``nnx.scan``) is trained character by character on real text that ships with
Python: the standard library's own ``*.py`` files, read from
``sysconfig.get_paths()["stdlib"]`` in sorted order and concatenated up to
two million characters (nothing is downloaded). Every tenth file is held out
for validation. AdamW's learning rate rises linearly over the first half of
the run to a peak of 0.3, past what this model trains stably at, then decays
along a cosine; the rise shows where training degrades and, near the peak,
where the loss diverges for a while. The run is repeated once per method
with the same initialisation, data order, seeds and schedule; only the
transform around AdamW changes:

  none                  adamw
  global norm 1.0       chain(clipjax.clip_by_global_norm(1.0), adamw)
  ZClip                 chain(clipjax.zclip(), adamw)               (defaults)
  AdaGC                 chain(clipjax.adagc(warmup_steps=steps // 20,
                                            layer_axis=...), adamw)
  skip spikes           clipjax.skip_spikes(adamw)                  (defaults)
  ZClip + skip spikes   clipjax.skip_spikes(chain(clipjax.zclip(), adamw))

AdaGC's ``layer_axis`` makes each layer of the stacked blocks its own tensor,
as in the unscanned model. The loss goes to
``tx.update(grads, state, params, value=loss)``, which ``skip_spikes`` reads
and the plain chains ignore. The per-step statistics (pre-clip global norm,
clipped and skipped flags) come from ``clipjax.clip_stats(opt_state)``; the
norm of the gradient that reaches AdamW is read from a pass-through transform
in front of it, so the plot shows each gradient before and after its clipper.

A loss spike is a run of consecutive steps whose training loss is above 1.5x
the median training loss of the 50 steps before it; a run counts once.

The script prints a table (validation loss in bits per character at the end,
loss spikes, steps clipped and skipped, largest pre-clip norm, wall time per
method) and writes a PNG with the training-loss curves of every method, the
spikes and the learning rate marked, and, per method, the training loss and
the global gradient norm before and after clipping on a log scale. The
forward and backward pass is compiled once for all methods (``nnx.split`` /
``nnx.merge`` around a pure loss under ``jax.jit``), each method's optimiser
step once.

What the default run shows: every method reaches about 3.5 bits per character
within 100 steps; once the learning rate rises past about 0.1 (step 200) the
training loss climbs back to about 4.5 for all of them and comes down again
only as the rate decays. Just after the peak one run diverges for about 30
steps, its loss up to 10 bits per character: with this initialisation it is
the global-norm run, clipped to norm 1.0 throughout (a fixed threshold bounds
the gradient, but AdamW normalises its update anyway). Which run diverges near
the peak is partly chance: the runs part ways from their first steps, where
the gradient norm is above 5 and the fixed thresholds already act. ZClip and
AdaGC, alone or under ``skip_spikes``, end 0.2 to 0.3 bits per character below
the unclipped run; ``skip_spikes`` alone, which skips a few steps with
outlying gradient norms, ends where the unclipped run does.

Run it with::

  python examples/transformer_lm.py            # full run, 3.5 to 7 minutes on 2 cores
  python examples/transformer_lm.py --quick    # a tiny model for 30 steps, for tests
  python examples/transformer_lm.py --methods none,ZClip --out /tmp/plots

The run is seeded: the same machine gives the same numbers.
"""

import argparse
import dataclasses
import math
import pathlib
import sysconfig
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import clipjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that is the same for every method."""

  text_chars: int = 2_000_000  # how much of the standard library to read (characters)
  width: int = 64  # model width
  heads: int = 4
  layers: int = 2
  context: int = 32  # characters per training sequence
  batch: int = 32  # sequences per step
  steps: int = 1200
  # The learning rate rises linearly for `warmup` steps to its peak, then
  # decays along a cosine to `final_lr` times the peak. The peak is past what
  # this model trains stably at: the rise crosses the limit mid-run.
  learning_rate: float = 0.3
  warmup: int = 600
  final_lr: float = 0.1
  b2: float = 0.999  # optax's default
  weight_decay: float = 0.1
  val_sequences: int = 512  # validation windows of `context` characters
  seed: int = 0


FULL = Config()
QUICK = dataclasses.replace(FULL, text_chars=200_000, width=32, heads=2, batch=8, steps=30,
                            warmup=15, val_sequences=16)

# A loss spike: a run of steps whose loss is above SPIKE_FACTOR x the median of
# the SPIKE_WINDOW steps before it.
SPIKE_FACTOR = 1.5
SPIKE_WINDOW = 50


# Methods ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """How one run wraps AdamW, and the statistics that say what it did."""

  # (adamw, steps, layer_axis) -> the optimiser; layer_axis marks the stacked blocks.
  build: Callable[[optax.GradientTransformation, int, Any], optax.GradientTransformation]
  clipped: str | None = None  # the clip_stats key of the clipper's `clipped` flag
  skipped: str | None = None  # the clip_stats key of skip_spikes' `skipped` flag


METHODS: dict[str, Method] = {
    "none": Method(lambda adamw, steps, layer_axis: adamw),
    "global norm 1.0": Method(
        lambda adamw, steps, layer_axis: optax.chain(clipjax.clip_by_global_norm(1.0), adamw),
        clipped="clip_by_global_norm/clipped"),
    "ZClip": Method(lambda adamw, steps, layer_axis: optax.chain(clipjax.zclip(), adamw),
                    clipped="zclip/clipped"),
    # AdaGC clips each tensor on its own; layer_axis makes each layer of the
    # stacked blocks its own tensor, as in the unscanned model. Its warm-up
    # (global clipping at 1.0) is 100 steps in the paper's long runs; here it
    # is a twentieth of the run.
    "AdaGC": Method(
        lambda adamw, steps, layer_axis: optax.chain(
            clipjax.adagc(warmup_steps=max(1, steps // 20), layer_axis=layer_axis), adamw),
        clipped="adagc/clipped"),
    "skip spikes": Method(lambda adamw, steps, layer_axis: clipjax.skip_spikes(adamw),
                          skipped="skip_spikes/skipped"),
    "ZClip + skip spikes": Method(
        lambda adamw, steps, layer_axis: clipjax.skip_spikes(
            optax.chain(clipjax.zclip(), adamw)),
        clipped="zclip/clipped", skipped="skip_spikes/skipped"),
}


class NormProbeState(NamedTuple):
  adamw_input_norm: jax.Array  # [] float32, the global norm of the last update seen


def norm_probe() -> optax.GradientTransformation:
  """Passes the updates through unchanged and keeps their global norm in its state."""

  def init(params):
    del params
    return NormProbeState(jnp.zeros((), jnp.float32))

  def update(updates, state, params=None):
    del state, params
    return updates, NormProbeState(clipjax.global_norm(updates))

  return optax.GradientTransformation(init, update)


# Data -------------------------------------------------------------------------


def load_text(cfg: Config) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The standard library's sources as character ids: (train, validation, vocabulary).

  Files are taken in sorted order until ``cfg.text_chars`` are read; every
  tenth file goes to validation. The vocabulary is every character that occurs.
  """
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  train_parts, val_parts, size = [], [], 0
  for i, path in enumerate(sorted(stdlib.glob("*.py"))):
    text = path.read_text(encoding="utf-8", errors="replace")
    (val_parts if i % 10 == 9 else train_parts).append(text)
    size += len(text)
    if size >= cfg.text_chars:
      break
  train_text, val_text = "".join(train_parts), "".join(val_parts)
  vocab = sorted(set(train_text) | set(val_text))
  index = {c: i for i, c in enumerate(vocab)}

  def encode(text: str) -> np.ndarray:
    return np.fromiter((index[c] for c in text), np.int32, len(text))

  return encode(train_text), encode(val_text), vocab


def batch_at(data: jax.Array, key: jax.Array, step: jax.Array, cfg: Config):
  """The ``step``-th minibatch: inputs and next-character targets, [batch, context]."""
  starts = jax.random.randint(jax.random.fold_in(key, step), (cfg.batch,), 0,
                              data.shape[0] - cfg.context - 1)
  windows = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (cfg.context + 1,)))(starts)
  return windows[:, :-1], windows[:, 1:]


# Model ------------------------------------------------------------------------


class Block(nnx.Module):
  """A pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    d = cfg.width
    self.heads = cfg.heads
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, t, 3 * self.heads, -1), 3, axis=2)
    attention = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(attention.reshape(b, t, d))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
  """Token and position embeddings, ``cfg.layers`` stacked blocks, a linear read-out."""

  def __init__(self, cfg: Config, vocab: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, cfg.width, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.context, cfg.width)))

    # One Block whose every parameter has a leading axis of length cfg.layers.
    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs)

    self.blocks = create_blocks(rngs)
    self.norm = nnx.LayerNorm(cfg.width, rngs=rngs)
    self.head = nnx.Linear(cfg.width, vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[:tokens.shape[1]]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def through(x, block):
      return block(x)

    return self.head(self.norm(through(x, self.blocks)))


def make_loss(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array, jax.Array], jax.Array]:
  def loss_fn(params, inputs, targets):
    logits = nnx.merge(graphdef, params)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return loss_fn


# Training ---------------------------------------------------------------------


def learning_rate(cfg: Config) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup, cfg.steps,
                                            end_value=cfg.learning_rate * cfg.final_lr)


@dataclasses.dataclass
class Result:
  name: str
  losses: np.ndarray  # [steps] minibatch loss, nats per character
  norms: np.ndarray  # [steps] pre-clip global gradient norm
  adamw_norms: np.ndarray  # [steps] global norm reaching AdamW (NaN where skipped)
  clipped: np.ndarray | None  # [steps] bool, None without a clipper
  skipped: np.ndarray | None  # [steps] bool, None without skip_spikes
  val_bpc: float
  seconds: float


def spike_mask(losses: np.ndarray) -> np.ndarray:
  """True where the loss is above SPIKE_FACTOR x the median of the SPIKE_WINDOW before it."""
  above = np.zeros(len(losses), bool)
  for t in range(SPIKE_WINDOW, len(losses)):
    reference = np.nanmedian(losses[t - SPIKE_WINDOW:t])
    above[t] = not np.isfinite(losses[t]) or losses[t] > SPIKE_FACTOR * reference
  return above


def spike_starts(losses: np.ndarray) -> np.ndarray:
  """The first step of each loss spike."""
  above = spike_mask(losses)
  return np.flatnonzero(above & ~np.concatenate([[False], above[:-1]]))


def train(name: str, method: Method, cfg: Config, init_params: nnx.State,
          loss_and_grads: Callable[[nnx.State, jax.Array], tuple[jax.Array, nnx.State]],
          evaluate: Callable[[nnx.State], jax.Array], bar: tqdm) -> Result:
  """Trains a copy of ``init_params`` with ``method``; returns its traces and score."""
  start = time.perf_counter()
  adamw = optax.chain(norm_probe(), optax.adamw(learning_rate(cfg), b2=cfg.b2,
                                                weight_decay=cfg.weight_decay))
  # The stacked blocks' parameters have the layer as their leading axis.
  layer_axis = jax.tree.map_with_path(lambda path, _: 0 if path[0].key == "blocks" else None,
                                      init_params)
  tx = method.build(adamw, cfg.steps, layer_axis)

  # The optimiser half of the train step, compiled once per method.
  @jax.jit
  def update(params, opt_state, grads, loss):
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    params = optax.apply_updates(params, updates)
    stats = clipjax.clip_stats(opt_state)
    no = jnp.zeros((), jnp.bool_)
    skipped = stats[method.skipped] if method.skipped else no
    # A skipped step leaves the inner state, and so its statistics, as they were.
    clipped = (stats[method.clipped] & ~skipped) if method.clipped else no
    adamw_norm = optax.tree_utils.tree_get(opt_state, "adamw_input_norm")
    trace = (loss, clipjax.global_norm(grads), jnp.where(skipped, jnp.nan, adamw_norm),
             clipped, skipped)
    return params, opt_state, trace

  params = jax.tree.map(jnp.copy, init_params)
  opt_state = tx.init(params)
  traces = []
  for t in range(cfg.steps):
    loss, grads = loss_and_grads(params, jnp.asarray(t, jnp.int32))
    params, opt_state, trace = update(params, opt_state, grads, loss)
    traces.append(trace)
    bar.update(1)
  losses, norms, adamw_norms, clipped, skipped = (
      np.stack(t) for t in zip(*jax.device_get(traces)))
  val_bpc = float(evaluate(params)) / math.log(2)
  return Result(name, losses, norms, adamw_norms, clipped if method.clipped else None,
                skipped if method.skipped else None, val_bpc, time.perf_counter() - start)


# Report -----------------------------------------------------------------------


def table(results: list[Result]) -> str:
  header = (f"{'method':<20} {'val bpc':>8} {'spikes':>6} {'clipped':>8} {'skipped':>8} "
            f"{'max |g|':>8} {'time [s]':>8}")
  lines = [header, "-" * len(header)]
  for r in results:
    clipped = "-" if r.clipped is None else str(int(r.clipped.sum()))
    skipped = "-" if r.skipped is None else str(int(r.skipped.sum()))
    finite = np.isfinite(r.norms)
    largest = f"{np.max(r.norms[finite]):.3g}" if finite.any() else "nan"
    lines.append(f"{r.name:<20} {r.val_bpc:>8.3f} {len(spike_starts(r.losses)):>6d} "
                 f"{clipped:>8} {skipped:>8} {largest:>8} {r.seconds:>8.1f}")
  return "\n".join(lines)


def plot(results: list[Result], cfg: Config, path: pathlib.Path) -> None:
  colors = plt.get_cmap("tab10").colors
  steps = np.arange(1, cfg.steps + 1)
  cols = 3
  rows = math.ceil(len(results) / cols)
  fig = plt.figure(figsize=(17, 5 + 4.2 * rows), layout="constrained")
  top, bottom = fig.subfigures(2, 1, height_ratios=[5, 4.2 * rows])
  ax = top.subplots()
  for r, color in zip(results, colors):
    ax.plot(steps, r.losses / math.log(2), color=color, lw=0.9,
            label=f"{r.name}: {r.val_bpc:.3f} val bpc")
    starts = spike_starts(r.losses)
    ax.plot(starts + 1, r.losses[starts] / math.log(2), "v", color=color, ms=8, mec="black",
            mew=0.6)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss [bits per character]")
  ax.set_title(f"Training loss; triangles: loss spikes (above {SPIKE_FACTOR}x the median of "
               f"the {SPIKE_WINDOW} steps before)")
  ax.legend(ncol=3, fontsize=9, loc="upper right")
  ax_lr = ax.twinx()
  ax_lr.plot(steps, learning_rate(cfg)(steps - 1), color="0.4", ls="--", lw=1.2)
  ax_lr.set_ylabel("learning rate (dashed)")
  ax_lr.set_ylim(0, 1.05 * cfg.learning_rate)

  panels = bottom.subfigures(rows, cols, squeeze=False).flat
  norm_axes = []
  for r, color, panel in zip(results, colors, panels):
    ax_loss, ax_norm = panel.subplots(2, 1, sharex=True, height_ratios=[1, 1.6])
    spikes = spike_mask(r.losses)
    ax_loss.plot(steps, r.losses / math.log(2), color=color, lw=0.8)
    ax_loss.plot(steps[spikes], r.losses[spikes] / math.log(2), ".", color="black", ms=4)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss [bpc]")
    ax_loss.set_title(r.name, color=color, fontsize=11)
    ax_norm.plot(steps, r.norms, color="0.65", lw=0.8, label="before clipping")
    ax_norm.plot(steps, r.adamw_norms, color=color, lw=0.8, label="into AdamW")
    if r.clipped is not None:
      ax_norm.plot(steps[r.clipped], r.adamw_norms[r.clipped], "|", color=color, ms=6,
                   label=f"clipped ({int(r.clipped.sum())})")
    if r.skipped is not None:
      ax_norm.plot(steps[r.skipped], r.norms[r.skipped], "x", color="red", ms=6,
                   label=f"skipped ({int(r.skipped.sum())})")
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("step")
    ax_norm.set_ylabel("global gradient norm")
    ax_norm.legend(fontsize=8, loc="upper right")
    norm_axes.append(ax_norm)
  for ax_norm in norm_axes[1:]:  # one scale for every method's norms
    ax_norm.sharey(norm_axes[0])
  fig.suptitle(
      f"Character-level transformer ({cfg.layers} layers, width {cfg.width}) on the Python "
      f"standard library: AdamW, peak lr {cfg.learning_rate:g}, b2 {cfg.b2}, "
      f"{cfg.steps} steps, batch {cfg.batch} x {cfg.context} characters")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def compare(cfg: Config, names: list[str]) -> tuple[list[Result], float]:
  """Trains one model per method in ``names``; returns the results and the total wall time."""
  start = time.perf_counter()
  train_ids, val_ids, vocab = load_text(cfg)
  model = nnx.jit(lambda: TransformerLM(cfg, len(vocab), nnx.Rngs(cfg.seed)))()
  graphdef, init_params = nnx.split(model)
  loss_fn = make_loss(graphdef)
  n_params = sum(x.size for x in jax.tree.leaves(init_params))
  print(f"Python {sysconfig.get_python_version()} standard library: {len(train_ids):,} training "
        f"and {len(val_ids):,} validation characters, {len(vocab)} distinct; "
        f"model {n_params:,} parameters; {len(names)} methods x {cfg.steps} steps")

  # Fixed validation windows, evaluated with one compilation for every method.
  val_windows = jnp.asarray(np.stack([val_ids[i * cfg.context:(i + 1) * cfg.context + 1]
                                      for i in range(cfg.val_sequences)]))
  evaluate = jax.jit(lambda params: loss_fn(params, val_windows[:, :-1], val_windows[:, 1:]))

  # The model half of the train step: the same for every method, so compiled once.
  train_data = jnp.asarray(train_ids)
  batch_key = jax.random.key(cfg.seed + 1)  # the same minibatches for every method

  def loss_and_grads(params, step):
    return jax.value_and_grad(loss_fn)(params, *batch_at(train_data, batch_key, step, cfg))

  compile_start = time.perf_counter()
  loss_and_grads = jax.jit(loss_and_grads).lower(init_params, jnp.asarray(0, jnp.int32)).compile()
  print(f"forward and backward pass compiled in {time.perf_counter() - compile_start:.1f} s")

  results = []
  with tqdm(total=len(names) * cfg.steps, unit="step", mininterval=0.5) as bar:
    for name in names:
      bar.set_description(f"{name:<20}")
      results.append(train(name, METHODS[name], cfg, init_params, loss_and_grads, evaluate,
                           bar))
  return results, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a tiny model for 30 steps (for tests)")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated subset of: {', '.join(METHODS)}")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).resolve().parent / "output",
                      help="directory for the PNG (default: examples/output)")
  args = parser.parse_args()
  cfg = QUICK if args.quick else FULL
  names = [n.strip() for n in args.methods.split(",") if n.strip()]
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")

  results, total = compare(cfg, names)
  print()
  print(table(results))
  print(f"""
val bpc:  validation loss in bits per character after the last step
          ({cfg.val_sequences} windows of {cfg.context} characters)
spikes:   runs of steps with a training loss above {SPIKE_FACTOR}x the median of the \
{SPIKE_WINDOW} steps before it
          (a run of consecutive such steps counts once)
clipped:  steps on which the clipper scaled the gradient down (of the steps taken)
skipped:  steps skip_spikes skipped ('-': the method has no such flag)
max |g|:  largest pre-clip global gradient norm
time:     wall time of the method, its update's compilation included""")
  print(f"\ntotal wall time {total:.1f} s")
  if len(results) > 1 and results[0].name == "none":
    none = results[0]
    best = min(results[1:], key=lambda r: r.val_bpc)
    print(f"without clipping: {none.val_bpc:.3f} bpc and {len(spike_starts(none.losses))} "
          f"spikes; best: {best.name} with {best.val_bpc:.3f} bpc and "
          f"{len(spike_starts(best.losses))} spikes")
  path = args.out / ("transformer_lm_quick.png" if args.quick else "transformer_lm.png")
  plot(results, cfg, path)
  print(f"plot written to {path}")


if __name__ == "__main__":
  main()
