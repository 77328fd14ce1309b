"""Keras-style clipping options for any optax optimizer."""

from collections.abc import Callable

import optax

from . import _base
from ._base import Threshold
from ._clipping import clip, clip_by_global_norm, clip_by_norm


def clipped(tx: optax.GradientTransformation, *, clipnorm: Threshold | None = None,
            clipvalue: Threshold | None = None,
            global_clipnorm: Threshold | None = None) -> optax.GradientTransformation:
  """Chains the clipper that a Keras optimizer option names in front of ``tx``.

  The three options of a Keras optimizer, with Keras' rules:

  - ``clipnorm=c``: each leaf (variable) is clipped to norm at most ``c``,
    :func:`clipjax.clip_by_norm`;
  - ``clipvalue=c``: each element to ``[-c, c]``, :func:`clipjax.clip`;
  - ``global_clipnorm=c``: the whole gradient to global norm at most ``c``,
    :func:`clipjax.clip_by_global_norm`.

  The result is ``optax.chain(clipper, tx)``: the gradients are clipped before
  ``tx`` sees them, and the clipper's statistics are in the state for
  :func:`clipjax.clip_stats`. At most one option may be given, as in Keras.
  With none, there is nothing to clip and ``tx`` itself is returned unchanged
  (same object, same state), so ``clipped(tx, **options)`` can be written
  unconditionally from a configuration whose options default to ``None``.
  Each option accepts what the clipper accepts: a number, a scalar array, or
  an ``optax.Schedule``.

  Args:
    tx: the optimizer (any ``optax.GradientTransformation``).
    clipnorm: largest norm of each leaf.
    clipvalue: largest magnitude of each element.
    global_clipnorm: largest global norm of all leaves together.

  Returns:
    ``optax.chain(clipper, tx)``, or ``tx`` when no option is given.

  Raises:
    ValueError: when more than one option is given, or an option is out of
      range (``clipnorm=-1.0 must be >= 0``).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipjax
    >>> tx = clipjax.clipped(optax.sgd(1.0), global_clipnorm=1.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params))
    >>> updates["w"]
    Array([-0.6, -0.8], dtype=float32)
    >>> float(clipjax.clip_stats(state)["clip_by_global_norm/norm"])
    5.0
  """
  options = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
  given = {name: value for name, value in options.items() if value is not None}
  if len(given) > 1:
    shown = ", ".join(f"{name}={value!r}" for name, value in given.items())
    raise ValueError(
        f"at most one of clipnorm, clipvalue and global_clipnorm may be set; got {shown}")
  if not given:
    return tx
  (name, value), = given.items()
  _base.check_number(name, value)
  clipper = _CLIPPERS[name](value)
  return optax.chain(clipper, tx)


_CLIPPERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "clipnorm": clip_by_norm, "clipvalue": clip, "global_clipnorm": clip_by_global_norm}
