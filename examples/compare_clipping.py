"""Ten ways to clip the gradients of an exploding RNN, compared on real data.

A tanh RNN reads each 8x8 image of scikit-learn's handwritten digits (shipped
inside the package: nothing is downloaded) as a sequence of 64 pixels and
classifies it from its last hidden state. Its recurrent weights start at
spectral radius 1.2 and it is trained with SGD + momentum at a learning rate
(decayed with ``clipjax.polynomial_decay``) that is too large for its gradient
spikes: without clipping, one spike throws the weights into saturation and the
network ends at chance. The run is repeated once per method, with the same
model, data, seeds and schedule; only the clipper in front of the optimiser
changes:

  none, value (``clip``), per-tensor norm (``clip_by_norm``), global norm
  (``clip_by_global_norm``), lower-bounded global norm (``min_norm``), AGC
  (``adaptive_grad_clip``), AutoClip, ZClip, AdaGC and quantile tracking.

Each training run is one compiled ``lax.scan`` over its steps (in chunks, so a
progress bar can advance). The script prints a table (final training loss,
test accuracy, non-finite steps, fraction of steps clipped, median and max
pre-clip global gradient norm, wall time) and writes a PNG with the loss
curves and the gradient-norm traces of every method, whose path it prints.

Run it with ``make demo`` or::

  python examples/compare_clipping.py            # full run, about 2 min on 2 cores
  python examples/compare_clipping.py --quick    # a few seconds, for tests
  python examples/compare_clipping.py --seed 1   # another initialisation, split and batches
  python examples/compare_clipping.py --out /tmp/plots

Every random choice (the weights, the train/test split, the minibatches) comes
from ``--seed``, so two runs on one machine print the same table apart from the
times. Another CPU can give other numbers: XLA compiles for the host's
instruction set, and a tanh RNN at this learning rate amplifies the last bits of
a reduction or a ``tanh`` into a different run.
"""

import argparse
import dataclasses
import math
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from jax import lax
from sklearn.datasets import load_digits
from tqdm import tqdm

import clipjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that is the same for every method."""

  hidden: int = 64  # hidden units of the RNN
  radius: float = 1.2  # spectral radius of the initial recurrent weights
  batch: int = 64
  steps: int = 600
  learning_rate: float = 0.1  # initial value; decays linearly to 0
  momentum: float = 0.9
  chunk: int = 50  # steps per compiled call (the progress bar advances by this)
  seed: int = 0


FULL = Config()
QUICK = Config(hidden=8, steps=20, chunk=10)


# Methods ----------------------------------------------------------------------

# Each method is a factory for the clipper chained in front of SGD + momentum.
# Fixed thresholds are set relative to the gradient norms this model has (a
# median around 3): value 0.05, per tensor 0.5, global 0.5 (floor 0.25).
# AGC uses clipping factor 0.05 (Brock et al. suggest larger factors for
# small batches), AutoClip its paper's 10th percentile, quantile tracking the
# median; ZClip and AdaGC their papers' defaults.
METHODS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "none": optax.identity,
    "value": lambda: clipjax.clip(0.05),
    "per-tensor norm": lambda: clipjax.clip_by_norm(0.5),
    "global norm": lambda: clipjax.clip_by_global_norm(0.5),
    "global norm + floor": lambda: clipjax.clip_by_global_norm(0.5, min_norm=0.25),
    "AGC": lambda: clipjax.adaptive_grad_clip(0.05),
    "AutoClip": lambda: clipjax.autoclip(percentile=10.0),
    "ZClip": lambda: clipjax.zclip(),
    "AdaGC": lambda: clipjax.adagc(),
    "quantile": lambda: clipjax.quantile_clip(target_quantile=0.5),
}


# Data and model -----------------------------------------------------------------


def load_data(seed: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Digits as (n, 64) pixel sequences in [0, 1]; a seeded 80/20 split."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  n_train = int(0.8 * len(x))
  return (jnp.asarray(x[:n_train]), jnp.asarray(y[:n_train]),
          jnp.asarray(x[n_train:]), jnp.asarray(y[n_train:]))


def init_params(key: jax.Array, cfg: Config) -> dict[str, jax.Array]:
  k_rec, k_in, k_out = jax.random.split(key, 3)
  h = cfg.hidden
  return {
      # Orthogonal times the radius: every eigenvalue has modulus `radius` > 1.
      "w_rec": cfg.radius * jax.random.orthogonal(k_rec, h),
      "w_in": jax.random.normal(k_in, (h,)),
      "b": jnp.zeros((h,)),
      "w_out": jax.random.normal(k_out, (h, 10)) / math.sqrt(h),
      "b_out": jnp.zeros((10,)),
  }


def logits_fn(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """Runs the RNN over the 64 pixels of each image; logits from the last state."""

  def cell(state, pixel):
    state = jnp.tanh(state @ params["w_rec"] + pixel[:, None] * params["w_in"] + params["b"])
    return state, None

  h0 = jnp.zeros((x.shape[0], params["w_rec"].shape[0]), x.dtype)
  last, _ = lax.scan(cell, h0, x.T)
  return last @ params["w_out"] + params["b_out"]


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


# Training -----------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  name: str
  losses: np.ndarray  # [steps] minibatch loss
  norms: np.ndarray  # [steps] pre-clip global gradient norm
  clipped_norms: np.ndarray  # [steps] global norm after the clipper
  clipped: np.ndarray | None  # [steps] bool from clip_stats, None without a clipper
  thresholds: np.ndarray  # [steps] the clipper's threshold in force (NaN without one)
  train_loss: float
  test_accuracy: float
  seconds: float


def train(name: str, clipper: optax.GradientTransformation, cfg: Config,
          data: tuple[jax.Array, ...], bar: tqdm) -> Result:
  """Trains one RNN with ``chain(clipper, sgd)``; returns its traces and scores."""
  x_train, y_train, x_test, y_test = data
  start = time.perf_counter()
  schedule = clipjax.polynomial_decay(cfg.learning_rate, cfg.steps)
  sgd = optax.sgd(schedule, momentum=cfg.momentum)
  tx = optax.chain(clipper, sgd)
  params = init_params(jax.random.key(cfg.seed), cfg)
  opt_state = tx.init(params)
  batch_key = jax.random.key(cfg.seed + 1)  # the same minibatches for every method

  # One step of tx = optax.chain(clipper, sgd), with the chain written out so
  # that the update can be measured between the clipper and the optimiser.
  def step(carry, t):
    params, (clip_state, sgd_state) = carry
    idx = jax.random.randint(jax.random.fold_in(batch_key, t), (cfg.batch,), 0,
                             x_train.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(params, x_train[idx], y_train[idx])
    clipped, clip_state = clipper.update(grads, clip_state, params)
    updates, sgd_state = sgd.update(clipped, sgd_state, params)
    params = optax.apply_updates(params, updates)
    stats = clipjax.clip_stats(clip_state)
    was_clipped = next((v for k, v in stats.items() if k.endswith("/clipped")),
                       jnp.zeros((), jnp.bool_))
    threshold = next((v for k, v in stats.items() if k.endswith("/threshold")),
                     jnp.full((), jnp.nan))
    trace = (loss, clipjax.global_norm(grads), clipjax.global_norm(clipped), was_clipped,
             threshold)
    return (params, (clip_state, sgd_state)), trace

  @jax.jit
  def run_chunk(params, opt_state, first):
    return lax.scan(step, (params, opt_state), first + jnp.arange(cfg.chunk))

  traces = []
  carry = (params, opt_state)
  for first in range(0, cfg.steps, cfg.chunk):
    carry, trace = run_chunk(*carry, jnp.asarray(first, jnp.int32))
    traces.append(jax.device_get(trace))
    bar.update(cfg.chunk)
  params = carry[0]
  losses, norms, clipped_norms, was_clipped, thresholds = (np.concatenate(t)
                                                            for t in zip(*traces))
  train_loss = float(jax.jit(loss_fn)(params, x_train, y_train))
  predictions = jnp.argmax(jax.jit(logits_fn)(params, x_test), axis=-1)
  accuracy = float(jnp.mean(predictions == y_test))
  has_stats = bool(clipjax.clip_stats(tx.init(params)))
  return Result(name, losses, norms, clipped_norms, was_clipped if has_stats else None,
                thresholds, train_loss, accuracy, time.perf_counter() - start)


# Report -------------------------------------------------------------------------


def table(results: list[Result]) -> str:
  header = (f"{'method':<20} {'train loss':>10} {'test acc':>8} {'non-finite':>10} "
            f"{'clipped':>8} {'median |g|':>10} {'max |g|':>10} {'time [s]':>8}")
  lines = [header, "-" * len(header)]
  for r in results:
    finite = np.isfinite(r.norms)
    clipped = "-" if r.clipped is None else f"{100 * r.clipped.mean():.0f}%"
    median = f"{np.median(r.norms[finite]):.3g}" if finite.any() else "nan"
    largest = f"{np.max(r.norms[finite]):.3g}" if finite.any() else "nan"
    lines.append(
        f"{r.name:<20} {r.train_loss:>10.3f} {100 * r.test_accuracy:>7.1f}% "
        f"{int((~finite).sum()):>10d} {clipped:>8} {median:>10} {largest:>10} {r.seconds:>8.1f}")
  return "\n".join(lines)


def smooth(values: np.ndarray, width: int) -> np.ndarray:
  """Trailing moving average (NaN once the run has gone non-finite)."""
  width = max(1, min(width, len(values)))
  kernel = np.ones(width) / width
  padded = np.concatenate([np.full(width - 1, values[0]), values])
  return np.convolve(padded, kernel, mode="valid")


# Where a clipper's threshold is not a bound on the global norm, the panel says what it bounds.
THRESHOLD_NOTES = {
    "value": "each element to ±0.05",
    "per-tensor norm": "each leaf to norm 0.5",
    "AGC": "each unit to 0.05·‖W‖",
}
LINESTYLES = ["-", "--", "-.", ":"]


def plot(results: list[Result], cfg: Config, path: pathlib.Path) -> None:
  # tab10 with its grey swapped for black: grey is kept for the pre-clip norms.
  colors = list(plt.get_cmap("tab10").colors)
  colors[7] = (0.0, 0.0, 0.0)
  width = max(1, cfg.steps // 40)
  fig = plt.figure(figsize=(16, 10), layout="constrained")
  top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 2])
  ax_loss, ax_acc = top.subplots(1, 2, width_ratios=[3, 2])
  steps = np.arange(1, cfg.steps + 1)
  # Line styles cycle as well as colours, so curves that coincide (global norm with
  # and without its floor) both show.
  for i, (r, color) in enumerate(zip(results, colors)):
    ax_loss.plot(steps, smooth(r.losses, width), color=color, lw=1.6,
                 ls=LINESTYLES[i % len(LINESTYLES)], label=r.name)
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel(f"training loss (moving average of {width})")
  ax_loss.axhline(math.log(10), color="grey", ls=":", lw=1)
  ax_loss.text(steps[-1], math.log(10), " chance", va="bottom", ha="right", color="grey")
  ax_loss.legend(ncol=2, fontsize=9, loc="lower left")
  ax_loss.set_title("Training loss")

  names = [r.name for r in results]
  accs = [100 * r.test_accuracy for r in results]
  ax_acc.barh(names, accs, color=colors[:len(results)])
  ax_acc.invert_yaxis()
  ax_acc.axvline(10, color="grey", ls=":", lw=1)
  for i, a in enumerate(accs):
    ax_acc.text(a + 1, i, f"{a:.1f}%", va="center", fontsize=9)
  ax_acc.set_xlim(0, 110)
  ax_acc.set_xlabel("test accuracy [%] (dotted: chance)")
  ax_acc.set_title("Test accuracy")

  axes = bottom.subplots(2, 5, sharex=True, sharey=True)
  for i, (r, color, ax) in enumerate(zip(results, colors, axes.flat)):
    ax.plot(steps, r.norms, color="0.7", lw=0.6, label="before clipping")
    ax.plot(steps, r.clipped_norms, color=color, lw=0.9, label="after clipping")
    if r.name in THRESHOLD_NOTES:
      ax.text(0.03, 0.04, "threshold: " + THRESHOLD_NOTES[r.name], transform=ax.transAxes,
              fontsize=8)
    elif np.isfinite(r.thresholds).any():
      ax.plot(steps, r.thresholds, color="k", ls="--", lw=0.8, label="threshold")
    ax.set_yscale("log")
    ax.set_title(r.name, color=color, fontsize=11)
    if i % 5 == 0:
      ax.set_ylabel("global gradient norm")
    if i >= 5:
      ax.set_xlabel("step")
    if i in (0, 3):
      ax.legend(fontsize=8, loc="upper right")
  bottom.suptitle("Gradient norm per step, before (grey) and after the clipper, and the"
                  " clipper's threshold (dashed)")
  fig.suptitle(
      f"tanh RNN on digits as 64-pixel sequences: SGD + momentum, lr {cfg.learning_rate} "
      f"with polynomial decay, {cfg.steps} steps, recurrent spectral radius {cfg.radius}")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a small model for a few steps (for tests)")
  parser.add_argument("--seed", type=int, default=FULL.seed,
                      help="seed of the weights, the split and the minibatches (default 0)")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).resolve().parent / "output",
                      help="directory for the PNG (default: examples/output)")
  args = parser.parse_args()
  cfg = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)

  data = load_data(cfg.seed)
  print(f"digits: {data[0].shape[0]} training and {data[2].shape[0]} test sequences of "
        f"{data[0].shape[1]} pixels; {len(METHODS)} methods x {cfg.steps} steps")
  results = []
  start = time.perf_counter()
  with tqdm(total=len(METHODS) * cfg.steps, unit="step", mininterval=0.5) as bar:
    for name, factory in METHODS.items():
      bar.set_description(f"{name:<20}")
      results.append(train(name, factory(), cfg, data, bar))
  total = time.perf_counter() - start

  print()
  print(table(results))
  print(f"\ntotal wall time {total:.1f} s")
  none = results[0]
  best = max(results[1:], key=lambda r: r.test_accuracy)
  print(f"without clipping: {100 * none.test_accuracy:.1f}% test accuracy "
        f"(chance is 10%); best clipped: {best.name} with {100 * best.test_accuracy:.1f}%")
  path = args.out / ("compare_clipping_quick.png" if args.quick else "compare_clipping.png")
  plot(results, cfg, path)
  print(f"plot written to {path}")


if __name__ == "__main__":
  main()
