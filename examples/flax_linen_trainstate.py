"""A Flax linen ``TrainState`` whose optimiser is a clipjax chain.

A small CNN classifies scikit-learn's 8x8 handwritten digits (shipped inside
the package, nothing is downloaded). The optimiser is

  optax.chain(clipjax.clip_by_global_norm(1.0), optax.adamw(schedule))

with ``clipjax.inverse_sqrt_decay`` as the learning-rate schedule, held in a
``flax.training.train_state.TrainState``. ``clipjax.clip_stats`` finds the
clipper's statistics inside ``state.opt_state``; every epoch logs the norm
and threshold of the last step, the largest norm and the fraction of steps
clipped in the epoch. Each epoch is one compiled ``lax.scan`` over its
minibatches.

Run it with::

  python examples/flax_linen_trainstate.py           # 10 epochs, >= 90% test accuracy
  python examples/flax_linen_trainstate.py --quick   # 2 epochs, for tests
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax
from sklearn.datasets import load_digits

import clipjax


class CNN(nn.Module):
  """Two 3x3 convolutions, a 2x2 average pool and two dense layers."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def load_data(seed: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Digits as (n, 8, 8, 1) images in [0, 1]; a seeded 80/20 split."""
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  n_train = int(0.8 * len(x))
  return (jnp.asarray(x[:n_train]), jnp.asarray(y[:n_train]),
          jnp.asarray(x[n_train:]), jnp.asarray(y[n_train:]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="2 epochs (for tests)")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  epochs = 2 if args.quick else args.epochs

  x_train, y_train, x_test, y_test = load_data(args.seed)
  steps_per_epoch = x_train.shape[0] // args.batch
  model = CNN()
  params = model.init(jax.random.key(args.seed), x_train[:1])["params"]
  tx = optax.chain(
      clipjax.clip_by_global_norm(1.0),
      optax.adamw(clipjax.inverse_sqrt_decay(3e-3, timescale=steps_per_epoch),
                  weight_decay=1e-4),
  )
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def train_step(state, batch):
    x, y = batch

    def loss_fn(params):
      logits = state.apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads)
    return state, (loss, clipjax.clip_stats(state.opt_state))

  @jax.jit
  def train_epoch(state, key):
    order = jax.random.permutation(key, x_train.shape[0])[:steps_per_epoch * args.batch]
    batches = (x_train[order].reshape(steps_per_epoch, args.batch, 8, 8, 1),
               y_train[order].reshape(steps_per_epoch, args.batch))
    return lax.scan(train_step, state, batches)

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  print(f"digits: {x_train.shape[0]} training, {x_test.shape[0]} test images; "
        f"{epochs} epochs of {steps_per_epoch} steps")
  start = time.perf_counter()
  key = jax.random.key(args.seed + 1)
  for epoch in range(1, epochs + 1):
    state, (losses, stats) = train_epoch(state, jax.random.fold_in(key, epoch))
    # `stats` holds clip_stats of every step of the epoch; the last step's
    # values are what clipjax.clip_stats(state.opt_state) returns now.
    last = clipjax.clip_stats(state.opt_state)
    print(f"epoch {epoch:2d}  loss {float(losses.mean()):.4f}  "
          f"test accuracy {100 * float(accuracy(state.params, x_test, y_test)):5.1f}%  "
          f"clip_by_global_norm: norm {float(last['clip_by_global_norm/norm']):.3f} "
          f"threshold {float(last['clip_by_global_norm/threshold']):.1f}  "
          f"max norm {float(stats['clip_by_global_norm/norm'].max()):.3f}  "
          f"clipped {100 * float(stats['clip_by_global_norm/clipped'].mean()):.0f}% of steps")
  final = float(accuracy(state.params, x_test, y_test))
  print(f"final test accuracy: {100 * final:.1f}% ({time.perf_counter() - start:.1f} s)")
  if not args.quick and final < 0.9:
    raise SystemExit(f"test accuracy {final:.3f} is below 0.90")


if __name__ == "__main__":
  main()
