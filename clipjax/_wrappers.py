"""Keras-style clipping options for any optax optimizer, and PyTorch-style clipping functions."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _base
from . import _checks
from . import _docs
from . import _norms
from ._base import Threshold
from ._clipping import clip, clip_by_global_norm, clip_by_norm

# torch.nn.utils.clip_grads_with_norm_ divides by ``total_norm + 1e-6``.
_TORCH_EPS = 1e-6


def clipped(tx: optax.GradientTransformation, *, clipnorm: Threshold | None = None,
            clipvalue: Threshold | None = None,
            global_clipnorm: Threshold | None = None,
            name: str | None = None) -> optax.GradientTransformation:
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

    name: the clipper's ``name=``: the prefix of its statistics in
      :func:`clipjax.clip_stats` (default: the clipper's own name).

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
  given = {option: value for option, value in options.items() if value is not None}
  if len(given) > 1:
    shown = ", ".join(f"{option}={value!r}" for option, value in given.items())
    raise ValueError(
        f"at most one of clipnorm, clipvalue and global_clipnorm may be set; got {shown}")
  if not given:
    return tx
  (option, value), = given.items()
  _checks.check_number(option, value)
  clipper = _CLIPPERS[option](value, name=name)
  return optax.chain(clipper, tx)


_CLIPPERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "clipnorm": clip_by_norm, "clipvalue": clip, "global_clipnorm": clip_by_global_norm}


@_docs.fill
def clip_grad_norm(grads: Any, max_norm: float | jax.Array, norm_type: float | str = 2.0,
                   error_if_nonfinite: bool = False) -> tuple[Any, jax.Array]:
  """Clips a gradient tree to global norm at most ``max_norm``, as PyTorch's ``clip_grad_norm_``.

  ``g ← g · max_norm / max(‖g‖, max_norm)``, with ``‖g‖`` the ``norm_type``
  norm of all leaves together: the numbers of :func:`clipjax.clip_by_global_norm`
  applied once, outside an optax chain, returning the pre-clip norm the way
  ``torch.nn.utils.clip_grad_norm_`` does. Pure and jit-compatible: the
  clipped tree is returned, not written in place.

  It is :func:`get_total_norm` followed by the scaling of
  :func:`clip_grads_with_norm`, with one difference, the coefficient. The rule
  is clipjax's, not torch's ``max_norm / (‖g‖ + 1e-6)``: the scaled
  norm is ``max_norm`` exactly, and a norm at or below ``max_norm`` leaves the
  gradients unchanged. The two factors differ by a relative
  ``1e-6 / (‖g‖ + 1e-6)``, so for finite gradients the results equal torch's
  to that relative precision. ``total_norm`` is float32 (float64 under x64),
  accumulated overflow-safe whatever the gradients' dtype; the clipped leaves
  keep their dtypes. With a NaN or inf norm, torch multiplies the gradients by
  NaN or 0; clipjax returns them unscaled (the library's non-finite policy:
  a bad step stays visible, for ``optax.apply_if_finite`` or a check of
  ``total_norm`` to skip).

  ``error_if_nonfinite=True`` raises when ``total_norm`` is NaN or inf.
  Called eagerly, the call raises ``RuntimeError``, as torch does. Under a
  transformation (``jax.jit``, ``shard_map``, ``lax.scan``, ...) the norm is
  not known when the function is traced: the check is a ``jax.debug.callback``
  that runs on the host when the computation runs, and its ``RuntimeError``
  reaches the caller as a ``jax.errors.JaxRuntimeError`` (a subclass of
  ``RuntimeError``) with the same message, raised by the jitted call (on
  backends that dispatch asynchronously, at the latest when its results are
  read); JAX also logs the callback's traceback. No ``checkify`` wrapper is
  needed.

  Args:
    grads: a pytree of gradients (one array is a tree too).
    max_norm: the largest global norm, ``>= 0``: a number or a scalar array
      (traced values work under ``jit``).
    norm_type: ``1``, ``2`` or ``inf`` (``float("inf")``, ``jnp.inf`` or
      ``"inf"``); torch's other p-norms are not supported.
    error_if_nonfinite: raise when the total norm is NaN or inf, instead of
      returning the gradients unscaled.

  Returns:
    ``(clipped_grads, total_norm)``: the clipped tree and the norm of ``grads``
    before clipping.

  Raises:
    ValueError: when ``norm_type`` is not 1, 2 or inf, ``max_norm`` is
      negative or not a number, or ``error_if_nonfinite`` is not a bool.
    RuntimeError: when ``error_if_nonfinite`` and the total norm is not
      finite (see above for the form it takes under a transformation).

  {example}
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> clipped, total_norm = clipjax.clip_grad_norm(grads, max_norm=1.0)
    >>> clipped["w"], float(total_norm)
    (Array([0.6, 0.8], dtype=float32), 5.0)
  """
  ord = _norm_type(norm_type)
  _checks.check_number("max_norm", max_norm, allow_schedule=False)
  if not isinstance(error_if_nonfinite, (bool, np.bool_)):
    raise ValueError(f"{error_if_nonfinite=} must be a bool")
  _checks.check_updates(grads, "clip_grad_norm")
  total_norm = get_total_norm(grads, ord)
  if error_if_nonfinite:
    _check_finite(total_norm, _shown(norm_type))
  # clipjax's rule: the factor that brings total_norm to max_norm exactly, never above 1.
  return _scaled(grads, _base.ratio_rule(total_norm, jnp.asarray(max_norm)), total_norm), total_norm


@_docs.fill
def get_total_norm(grads: Any, norm_type: float | str = 2.0, *,
                   axis_name: _norms.AxisName = None, replicated: Any = None) -> jax.Array:
  """The norm of all gradients together, as PyTorch's ``torch.nn.utils.get_total_norm``.

  ``‖g‖ = ‖(‖g_1‖, …, ‖g_n‖)‖`` of order ``norm_type`` over the leaves, which
  equals the norm of all elements together: :func:`clipjax.global_norm`,
  accumulated in float32 (float64 under x64) and overflow-safe whatever the
  gradients' dtype. With torch ≥ 2.6, ``clip_grad_norm_`` is this function
  followed by ``clip_grads_with_norm_``; here :func:`clip_grad_norm` is this
  function followed by the scaling of :func:`clip_grads_with_norm`.

  Args:
    grads: a pytree of gradients (one array is a tree too).
    norm_type: ``1``, ``2`` or ``inf`` (``float("inf")``, ``jnp.inf`` or
      ``"inf"``); torch's other p-norms are not supported.
    axis_name: mapped axis name(s) over which the leaves are sharded
      (``shard_map``, ``pmap``); the norm is global over them, with one
      collective.
    {replicated}

  Returns:
    A float32 scalar (float64 when the tree holds float64 leaves); NaN or inf
    when some gradient is.

  Raises:
    ValueError: when ``norm_type`` is not 1, 2 or inf.

  {example}
    >>> float(clipjax.get_total_norm({"w": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}))
    13.0
  """
  ord = _norm_type(norm_type)
  return _norms.global_norm(grads, ord, axis_name=axis_name, replicated=replicated)


@_docs.fill
def clip_grads_with_norm(grads: Any, max_norm: float | jax.Array,
                         total_norm: jax.typing.ArrayLike) -> Any:
  """Scales gradients by a norm computed before, as PyTorch's ``clip_grads_with_norm_``.

  ``g ← g · min(1, max_norm / (total_norm + 1e-6))``: torch's coefficient,
  1e-6 included, clamped to at most 1, so the gradients are never scaled up.
  ``total_norm`` is any norm the caller computed (typically
  :func:`get_total_norm`, possibly of a larger tree, or reduced over devices
  beforehand), which is what makes the split useful: measure once, clip
  several trees with the same factor. Pure and jit-compatible: the scaled
  tree is returned, not written in place, each leaf in its own dtype
  (half-precision leaves are multiplied in float32).

  Unlike :func:`clip_grad_norm`, whose factor brings the norm to
  ``max_norm`` exactly, the result equals torch's: the norm after clipping is
  ``max_norm · total_norm / (total_norm + 1e-6)``, slightly below
  ``max_norm``. When ``total_norm`` is NaN or inf, torch multiplies the
  gradients by NaN or 0; clipjax returns them unscaled (the library's
  non-finite policy: a bad step stays visible, for ``optax.apply_if_finite``
  or a check of ``total_norm`` to skip).

  Args:
    grads: a pytree of gradients (one array is a tree too).
    max_norm: the largest norm, ``>= 0``: a number or a scalar array (traced
      values work under ``jit``).
    total_norm: the norm the factor is computed from: a number or a scalar
      array.

  Returns:
    The scaled tree.

  Raises:
    ValueError: when ``max_norm`` is negative or not a number.

  {example}
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> total_norm = clipjax.get_total_norm(grads)
    >>> clipjax.clip_grads_with_norm(grads, 1.0, total_norm)["w"]  # 1 / (5 + 1e-6)
    Array([0.5999999 , 0.79999983], dtype=float32)
  """
  _checks.check_number("max_norm", max_norm, allow_schedule=False)
  _checks.check_updates(grads, "clip_grads_with_norm")
  total = jnp.asarray(total_norm)
  if not jnp.issubdtype(total.dtype, jnp.floating):
    total = total.astype(jnp.float32)
  total = total.astype(_base.compute_dtype(total.dtype))
  # torch's min(max_norm / (total + 1e-6), 1), as a Ratio for its derivative.
  high = jnp.asarray(max_norm).astype(total.dtype)
  den = total + jnp.asarray(_TORCH_EPS, total.dtype)
  cut, one = high < den, jnp.ones((), total.dtype)
  return _scaled(grads, _base.Ratio(jnp.where(cut, high, one), jnp.where(cut, den, one)), total)


def _scaled(grads: Any, scale: _base.Ratio, total_norm: jax.Array) -> Any:
  """``grads`` times ``scale``, each leaf in its dtype; unscaled when ``total_norm`` is not finite.

  The one scaling step of :func:`clip_grad_norm` and :func:`clip_grads_with_norm`.
  """
  finite = jnp.isfinite(total_norm)
  scale = jax.tree.map(lambda s: jnp.where(finite, s, jnp.ones((), s.dtype)), scale)
  return _base.apply_scale(grads, scale)


@_docs.fill
def clip_grad_value(grads: Any, clip_value: float | jax.Array) -> Any:
  """Clamps each gradient element to ``[-clip_value, clip_value]``, as torch's ``clip_grad_value_``.

  ``g ← clamp(g, -clip_value, clip_value)``: :func:`clipjax.clip` applied
  once, outside an optax chain. Pure and jit-compatible: the clamped tree is
  returned, not written in place, each leaf in its own dtype. For finite
  gradients the result equals ``torch.nn.utils.clip_grad_value_``'s. NaN and
  ``±inf`` elements are kept as they are while the finite ones are clamped
  (torch clamps ``±inf`` to ``±clip_value``): a bad step stays visible, for
  ``optax.apply_if_finite`` to skip.

  Args:
    grads: a pytree of gradients (one array is a tree too).
    clip_value: the largest magnitude an element may keep, ``>= 0``: a number
      or a scalar array (traced values work under ``jit``).

  Returns:
    The clamped tree.

  Raises:
    ValueError: when ``clip_value`` is negative or not a number.

  {example}
    >>> clipjax.clip_grad_value({"w": jnp.array([0.5, -3.0, 2.0])}, clip_value=1.0)["w"]
    Array([ 0.5, -1. ,  1. ], dtype=float32)
  """
  _checks.check_number("clip_value", clip_value, allow_schedule=False)
  clamped, _ = clip(clip_value).update(grads, None)
  return clamped


def _norm_type(norm_type: Any) -> Any:
  """``norm_type`` as the ``ord`` of the norms module, or a ``ValueError`` naming it."""
  if isinstance(norm_type, (bool, np.bool_)):
    raise ValueError(f"{norm_type=} must be 1, 2 or inf")
  try:
    return _norms.check_ord(norm_type)
  except ValueError:
    raise ValueError(f"{norm_type=} must be 1, 2 or inf") from None


def _shown(norm_type: Any) -> str:
  return "a traced value" if isinstance(norm_type, jax.core.Tracer) else repr(norm_type)


def _check_finite(total_norm: jax.Array, norm_type: str) -> None:
  """Raises now for a concrete norm; under a transformation, when the computation runs."""
  _checks.raise_on_host(functools.partial(_raise_if_nonfinite, norm_type=norm_type), total_norm)


def _raise_if_nonfinite(total_norm: Any, *, norm_type: str) -> None:
  value = float(np.asarray(total_norm))
  if not np.isfinite(value):
    raise RuntimeError(
        f"clip_grad_norm: the total norm of order norm_type={norm_type} of the gradients "
        f"is {value}, so they cannot be clipped (error_if_nonfinite=True); with "
        "error_if_nonfinite=False they are returned unscaled")
