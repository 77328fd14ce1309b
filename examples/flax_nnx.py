"""A Flax NNX model trained with ``nnx.Optimizer`` and a clipjax chain.

The same small CNN as ``flax_linen_trainstate.py``, written with ``flax.nnx``,
classifies scikit-learn's 8x8 handwritten digits (shipped inside the package,
nothing is downloaded). The optimiser is

  optax.chain(clipjax.clip_by_global_norm(1.0), optax.adamw(schedule))

with ``clipjax.inverse_sqrt_decay`` as the learning-rate schedule, wrapped as
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and stepped with
``optimizer.update(model, grads)`` inside ``nnx.jit``. The clip statistics are
read from ``optimizer.opt_state`` with
``clipjax.clip_stats(optimizer.opt_state)`` and logged every
epoch.

Run it with::

  python examples/flax_nnx.py           # 10 epochs, >= 90% test accuracy
  python examples/flax_nnx.py --quick   # 2 epochs, for tests
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import clipjax


class CNN(nnx.Module):
  """Two 3x3 convolutions, a 2x2 average pool and two dense layers."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.dense1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
    self.dense2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dense1(x))
    return self.dense2(x)


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


def loss_fn(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  # optimizer.opt_state holds nnx Variables; clip_stats reads the arrays through them.
  return loss, clipjax.clip_stats(optimizer.opt_state)


@nnx.jit
def accuracy(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(model(x), -1) == y)


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
  model = CNN(nnx.Rngs(args.seed))
  tx = optax.chain(
      clipjax.clip_by_global_norm(1.0),
      optax.adamw(clipjax.inverse_sqrt_decay(3e-3, timescale=steps_per_epoch),
                  weight_decay=1e-4),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  print(f"digits: {x_train.shape[0]} training, {x_test.shape[0]} test images; "
        f"{epochs} epochs of {steps_per_epoch} steps")
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed + 1)
  for epoch in range(1, epochs + 1):
    order = rng.permutation(x_train.shape[0])
    losses, norms, clipped = [], [], []
    for i in range(steps_per_epoch):
      idx = order[i * args.batch:(i + 1) * args.batch]
      loss, stats = train_step(model, optimizer, x_train[idx], y_train[idx])
      losses.append(loss)
      norms.append(stats["clip_by_global_norm/norm"])
      clipped.append(stats["clip_by_global_norm/clipped"])
    last = clipjax.clip_stats(optimizer.opt_state)  # the epoch's last step
    print(f"epoch {epoch:2d}  loss {float(np.mean(losses)):.4f}  "
          f"test accuracy {100 * float(accuracy(model, x_test, y_test)):5.1f}%  "
          f"clip_by_global_norm: norm {float(last['clip_by_global_norm/norm']):.3f} "
          f"threshold {float(last['clip_by_global_norm/threshold']):.1f}  "
          f"max norm {float(np.max(norms)):.3f}  "
          f"clipped {100 * float(np.mean(clipped)):.0f}% of steps")
  final = float(accuracy(model, x_test, y_test))
  print(f"final test accuracy: {100 * final:.1f}% ({time.perf_counter() - start:.1f} s)")
  if not args.quick and final < 0.9:
    raise SystemExit(f"test accuracy {final:.3f} is below 0.90")


if __name__ == "__main__":
  main()
