"""Adaptive clipping: thresholds taken from the history of the gradient norms.

Every clipper here measures the update once (:func:`clipjax._norms.measure`,
one collective under ``axis_name``), computes its threshold from its state,
and scales with the shared rule of :mod:`clipjax._base`. A step whose measured
norm is NaN or inf passes through unscaled and reports ``finite`` False; a
step whose norm is zero stays zero. Either leaves every running statistic of
the state (history, moving averages, warm-up counters) exactly as it was
(:func:`clipjax._base.taken_into`): one bad step cannot poison the
threshold of the steps after it, and zero steps (frozen or masked
parameters) cannot pull it to 0. Norms enter the float32 state through
:func:`clipjax._base.f32` (a finite float64 norm stays finite); the scale is
computed in the norm's dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _base
from . import _checks
from . import _docs
from . import _layout
from . import _norms
from ._base import ClipStats

_F32 = jnp.float32
_TINY = float(jnp.finfo(_F32).tiny)


# AutoClip ---------------------------------------------------------------------


class AutoclipState(NamedTuple):
  """State of :func:`autoclip`: a ring buffer of the last finite global norms."""

  history: jax.Array  # [history] float32, past global norms; slots >= ``filled`` unused
  position: jax.Array  # [] int32, the slot the next finite norm is written to
  filled: jax.Array  # [] int32, how many slots hold a norm (<= history)
  clip_stats: dict[str, ClipStats]  # {name: the last step's statistics}
  stats = _base.STATS


def _percentile(buffer: jax.Array, filled: jax.Array, percentile: jax.Array) -> jax.Array:
  """The ``percentile``-th percentile (linear interpolation) of ``buffer[:filled]``.

  The largest value of the buffer's dtype when the buffer is empty (no
  threshold, and no inf for ``jax_debug_infs``). Same definition as
  ``numpy.percentile``'s default (``method="linear"``).
  """
  size = buffer.shape[0]
  largest = jnp.asarray(jnp.finfo(buffer.dtype).max, buffer.dtype)
  valid = jnp.arange(size, dtype=jnp.int32) < filled
  ordered = jnp.sort(jnp.where(valid, buffer, largest))
  last = jnp.maximum(filled - 1, 0)
  rank = percentile.astype(buffer.dtype) / 100.0 * last.astype(buffer.dtype)
  low = jnp.clip(jnp.floor(rank).astype(jnp.int32), 0, last)
  high = jnp.minimum(low + 1, last)
  fraction = rank - low.astype(buffer.dtype)
  a, b = ordered[low], ordered[high]
  value = a + fraction * (b - a)
  return jnp.where(filled > 0, value, largest)


@_docs.fill
def autoclip(percentile: float = 10.0, history: int = 1024, *,
             axis_name: _norms.AxisName = None,
             replicated: Any = None,
             name: str | None = None) -> optax.GradientTransformation:
  """AutoClip: clips the global norm at a percentile of its own recent history.

  With ``‖g‖`` the global L2 norm of the update and ``H`` the global norms of
  the last ``history`` steps with a finite nonzero norm, the current one
  included::

    threshold = percentile(H, percentile)      # linear interpolation
    g ← g · min(1, threshold / ‖g‖)

  The history is a fixed-size ring buffer (``history`` float32 values). A
  step whose norm is NaN or inf is not recorded: the updates pass through
  unscaled, the buffer, its write position and its fill count stay as they
  were. Zero updates stay zero and are not recorded either (recorded, many
  of them would make the threshold 0). The percentile is taken in the norm's
  dtype with the current norm as measured, so under x64 a finite norm beyond
  float32's range is its own threshold on the first step. Until a norm is
  recorded the ``threshold`` statistic reads float32's maximum (no threshold).

  Args:
    percentile: which percentile of the history is the threshold, in
      ``[0, 100]``. Default 10.0, as in the paper: about 90% of the steps are
      clipped, to a norm typical of the smaller ones.
    history: how many past norms to keep (>= 1). Default 1024; the paper keeps
      every norm since the start of training. The buffer length is read from
      the state, so under ``optax.inject_hyperparams`` the value given at
      ``init`` is the one that counts.
    {axis_name}
    {replicated}
    {name}

  {returns: AutoclipState}

  {example}
    >>> tx = clipjax.autoclip(percentile=50.0, history=4)
    >>> state = tx.init(None)
    >>> for norm in [1.0, 2.0, 3.0, 40.0]:
    ...   updates, state = tx.update(jnp.array([norm]), state)
    >>> updates, float(state.stats.threshold)  # the median of 1, 2, 3 and 40
    (Array([2.5], dtype=float32), 2.5)

  References:
    Seetharaman, Wichern, Pardo and Le Roux, `AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks <https://arxiv.org/abs/2007.14469>`_,
    2020.
  """
  _checks.check_number("percentile", percentile, minimum=0.0, maximum=100.0,
                     allow_schedule=False)
  size = _checks.check_int("history", history, minimum=1)
  _layout.check_replicated(replicated)
  name = _base.check_name(name, "autoclip")

  def init_fn(params):
    del params
    if size is None:
      raise ValueError(
          f"autoclip: history={history!r} is traced at init, but it sets the buffer's"
          " length; pass it as a static argument"
          " (optax.inject_hyperparams(clipjax.autoclip, static_args='history')).")
    return AutoclipState(
        history=jnp.zeros((size,), _F32),
        position=jnp.zeros((), jnp.int32),
        filled=jnp.zeros((), jnp.int32),
        clip_stats={name: _base.initial_stats(jnp.finfo(_F32).max)})

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, AutoclipState, None, name=name,
                            needs=_base.HISTORY_NEEDS)
    norm = _norms.global_norm(updates, axis_name=axis_name, replicated=replicated)
    taken = _base.informative(norm)
    length = state.history.shape[0]
    # The threshold reads the history with this step's norm in it (when it is taken),
    # in the norm's dtype: a float64 norm beyond float32's range is not clamped there.
    history = jnp.asarray(state.history)
    wide = history.astype(norm.dtype)
    filled = _base.keep(taken, jnp.minimum(_base.next_count(state.filled), length), state.filled)
    threshold = _percentile(_base.keep(taken, wide.at[state.position].set(norm), wide), filled,
                            _base.f32(percentile))
    buffer = _base.keep(taken, history.at[state.position].set(_base.f32(norm)), history)
    scale, clipped, finite = _base.scale_rule(norm, threshold)
    stats = _base.make_stats(norm, threshold, scale, clipped, finite)
    new = AutoclipState(history=buffer, position=(state.position + 1) % length, filled=filled,
                        clip_stats={name: stats})
    return (_base.apply_scale(updates, _base.ratio_rule(norm, threshold)),
            _base.taken_into(norm, new, state))

  return optax.GradientTransformation(init_fn, update_fn)


# AdaGC ------------------------------------------------------------------------


class AdagcState(NamedTuple):
  """State of :func:`adagc`.

  ``gamma[i]`` is γ_i of tensor ``i``: the leaves in ``jax.tree.leaves``
  order, a leaf with a layer axis one tensor per slice. It is 0 until the
  tensor's first nonzero gradient (no history: not clipped), as no zero norm
  ever enters it.
  """

  gamma: jax.Array  # [n_tensors] float32, per-tensor reference norms γ_i
  warmup_count: jax.Array  # [] int32, steps with a finite nonzero norm (the warm-up clock)
  clip_stats: dict[str, ClipStats]  # {name: the last step's statistics}
  stats = _base.STATS


@_docs.fill
def adagc(lambda_abs: float = 1.0, lambda_rel: float = 1.05, beta: float = 0.98,
          warmup_steps: int = 100, *, axis_name: _norms.AxisName = None,
          replicated: Any = None, layer_axis: Any = None,
          name: str | None = None) -> optax.GradientTransformation:
  """AdaGC: per-tensor clipping at a moving average of each tensor's own clipped norm.

  During the first ``warmup_steps`` steps with a finite nonzero global norm
  the update is clipped to
  global norm ``lambda_abs`` and each tensor (leaf) ``i`` tracks the smallest
  norm it came out with. After warm-up each tensor is clipped on its own::

    warm-up:  ĝ = g · min(1, lambda_abs / ‖g‖),   γ_i ← min(γ_i, ‖ĝ_i‖)
    after:    ĝ_i = g_i · min(1, lambda_rel · γ_i / ‖g_i‖),
              γ_i ← β·γ_i + (1 − β)·‖ĝ_i‖

  A zero gradient carries no scale, so a tensor whose gradient is exactly
  zero leaves its γ_i unchanged (in the paper's rule a zero norm during
  warm-up would set γ_i = 0 and zero that tensor for the rest of training);
  a tensor that has had no nonzero gradient yet (γ_i = 0 in the state) is not clipped,
  and its first nonzero ``‖ĝ_i‖`` becomes γ_i. A step whose global norm is
  NaN, inf or zero passes through unscaled and changes neither γ nor the
  warm-up count. The statistics report the global norm as ``norm``; as
  ``threshold`` the largest global norm the update could come out with
  (``lambda_abs`` during warm-up, ``sqrt(Σ_i (lambda_rel·γ_i)²)`` after);
  as ``scale`` the smallest factor applied to a tensor.

  Args:
    lambda_abs: the global-norm threshold during warm-up (> 0). Default 1.0.
    lambda_rel: how far above its γ_i a tensor's norm may go (> 0).
      Default 1.05.
    beta: the decay of the moving averages γ_i, in ``[0, 1)``. Default 0.98.
    warmup_steps: how many finite nonzero steps use global clipping (>= 0).
      Default 100.
    axis_name: mapped axis name(s) over which the leaves are sharded; the
      per-tensor and global norms are taken over all shards with one
      collective.
    {replicated}
    layer_axis: pytree prefix of ``int | None``: a leaf with a layer axis
      (a scanned model's stacked layers) holds one tensor, with its own γ,
      per slice along that axis. Give ``init`` the same tree structure.
    {name}

  {returns: AdagcState}
    Its ``init`` needs the parameters (or any tree of the updates' structure).

  {example}
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 1.0])}
    >>> tx = clipjax.adagc(lambda_abs=1.0, lambda_rel=1.0, warmup_steps=1)
    >>> state = tx.init(grads)
    >>> _, state = tx.update(grads, state)  # warm-up: global clip to norm 1
    >>> state.gamma.round(4)  # each tensor's norm after the global clip
    Array([0.9806, 0.1961], dtype=float32)
    >>> updates, state = tx.update({"a": jnp.array([6.0, 8.0]), "b": jnp.array([0.0, 0.1])},
    ...                            state)
    >>> updates["a"].round(4), updates["b"]  # "a" clipped to γ_a, "b" below γ_b
    (Array([0.5883, 0.7845], dtype=float32), Array([0. , 0.1], dtype=float32))

  References:
    Wang, Li, Chen, Zeng, Yang, Yu, Ma and Shen, `AdaGC: Improving Training
    Stability for Large Language Model Pretraining
    <https://arxiv.org/abs/2502.11034>`_, 2025.
  """
  _checks.check_number("lambda_abs", lambda_abs, strict_min=True, allow_schedule=False)
  _checks.check_number("lambda_rel", lambda_rel, strict_min=True, allow_schedule=False)
  _checks.check_number("beta", beta, minimum=0.0, maximum=1.0, strict_max=True,
                     allow_schedule=False)
  _checks.check_int("warmup_steps", warmup_steps, minimum=0)
  _layout.check_replicated(replicated)
  name = _base.check_name(name, "adagc")

  def init_fn(params):
    n = sum(_layout.layout(params, layer_axis).counts)
    return AdagcState(gamma=jnp.zeros((n,), _F32),
                      warmup_count=jnp.zeros((), jnp.int32),
                      clip_stats={name: _base.initial_stats(_base.f32(lambda_abs))})

  def tracked(gamma, leaf_norms, clipped_norms, warm):
    """The next γ: the smallest clipped norm in warm-up, then its EMA; zero norms skip."""
    b = _base.f32(beta)
    clipped_norms = _base.f32(clipped_norms)
    known = gamma > 0  # 0: no history yet, the first clipped norm becomes γ
    moving = jnp.where(known, _base.saturate(b * gamma + (1.0 - b) * clipped_norms),
                       clipped_norms)
    new = jnp.where(warm, jnp.where(known, jnp.minimum(gamma, clipped_norms), clipped_norms),
                    moving)
    return jnp.where(leaf_norms > 0, new, gamma)

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, AdagcState, None, name=name,
                            needs=_base.HISTORY_NEEDS)
    norms = _norms.measure(updates, 2, axis_name=axis_name, replicated=replicated,
                           layer_axis=layer_axis)
    if state.gamma.shape != norms.leaves.shape:
      raise ValueError(
          f"adagc: the state tracks {state.gamma.shape[0]} tensors but the updates have"
          f" {norms.leaves.shape[0]} leaves; call init with the parameters (a tree of the"
          " updates' structure).")
    # The scales are computed in the norms' dtype (float64 under x64), so a norm
    # beyond float32's range is still clipped.
    leaf_norms, acc = norms.leaves, norms.leaves.dtype
    warm = state.warmup_count < jnp.asarray(warmup_steps).astype(jnp.int32)
    lam_abs = _base.f32(lambda_abs)
    finite = jnp.isfinite(norms.total)
    known = jnp.asarray(state.gamma) > 0  # a tensor without history is not clipped
    relative = _base.f32(lambda_rel) * state.gamma
    one = jnp.ones((), acc)

    def chosen(whole, own):  # the global factor in warm-up, then each tensor's own
      return jnp.where(finite, jnp.where(warm, whole, jnp.where(known, own, one)), one)

    whole = _base.ratio_rule(norms.total, lam_abs.astype(acc))
    own = _base.ratio_rule(leaf_norms, relative.astype(acc))
    factors = _base.Ratio(chosen(whole.num, own.num), chosen(whole.den, own.den))
    scales = factors.num / factors.den
    bound = _norms.global_norm(relative.astype(acc))  # overflow-safe, like every norm
    # Unbounded while some tensor has no history: float32's maximum, no threshold.
    bound = jnp.where(jnp.all(known), bound, jnp.asarray(jnp.finfo(_F32).max, acc))
    threshold = jnp.where(warm, lam_abs.astype(acc), bound)
    stats = _base.make_stats(norms.total, threshold, jnp.min(scales, initial=1.0),
                             finite & jnp.any(scales != 1.0), finite)
    gamma = tracked(jnp.asarray(state.gamma), leaf_norms, scales * leaf_norms, warm)
    new = AdagcState(gamma=gamma, warmup_count=_base.next_count(state.warmup_count),
                     clip_stats={name: stats})
    return (_base.apply_scale(updates, factors, norms.layout),
            _base.taken_into(norms.total, new, state))

  return optax.GradientTransformation(init_fn, update_fn)


# Quantile tracking ------------------------------------------------------------


class QuantileClipState(NamedTuple):
  """State of :func:`quantile_clip`."""

  clip_norm: jax.Array  # [] float32, C: the threshold of the next step
  clip_stats: dict[str, ClipStats]  # {name: the last step's statistics}
  stats = _base.STATS


@_docs.fill
def quantile_clip(target_quantile: float = 0.9, learning_rate: float = 0.2,
                  initial_norm: float = 1.0, *, axis_name: _norms.AxisName = None,
                  replicated: Any = None,
                  name: str | None = None) -> optax.GradientTransformation:
  """Clips the global norm at a running estimate of its ``target_quantile``-quantile.

  The geometric quantile update of Andrew et al., applied to the global L2
  norm of each step::

    g ← g · min(1, C / ‖g‖)
    C ← C · exp(−learning_rate · (1[‖g‖ ≤ C] − target_quantile))

  ``C`` rises when a norm is above it and falls when below, and settles where
  a fraction ``target_quantile`` of the norms is at most ``C``: in the long
  run about ``1 − target_quantile`` of the steps are clipped. The state is one
  number. A step whose norm is NaN or inf passes through unscaled and leaves
  ``C`` unchanged; a zero update stays zero and leaves ``C`` unchanged too
  (counted as below ``C``, zero steps would shrink it to 0 for good). ``C``
  stays within float32's normal range.

  Args:
    target_quantile: the quantile of the norms to track, in ``(0, 1)``.
      Default 0.9.
    learning_rate: the step of the geometric update (> 0). Default 0.2, the
      value Andrew et al. recommend.
    initial_norm: ``C`` at the first step (> 0). Default 1.0.
    {axis_name}
    {replicated}
    {name}

  {returns: QuantileClipState}

  {example}
    >>> tx = clipjax.quantile_clip(target_quantile=0.5, learning_rate=0.2)
    >>> updates, state = tx.update(jnp.array([3.0, 4.0]), tx.init(None))
    >>> updates, float(state.stats.threshold)  # clipped at C = 1
    (Array([0.6, 0.8], dtype=float32), 1.0)
    >>> round(float(state.clip_norm), 6)  # C · exp(0.2 · 0.5): the norm was above C
    1.105171

  References:
    Andrew, Thakkar, McMahan and Ramaswamy, `Differentially Private Learning
    with Adaptive Clipping <https://arxiv.org/abs/1905.03871>`_, 2021.
  """
  _checks.check_number("target_quantile", target_quantile, minimum=0.0, maximum=1.0,
                     strict_min=True, strict_max=True, allow_schedule=False)
  _checks.check_number("learning_rate", learning_rate, strict_min=True, allow_schedule=False,
                     finite=True)
  _checks.check_number("initial_norm", initial_norm, strict_min=True, allow_schedule=False,
                     finite=True)

  _layout.check_replicated(replicated)
  name = _base.check_name(name, "quantile_clip")

  def init_fn(params):
    del params
    return QuantileClipState(clip_norm=_base.f32(initial_norm),
                             clip_stats={name: _base.initial_stats(_base.f32(initial_norm))})

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, QuantileClipState, None, name=name,
                            needs=_base.HISTORY_NEEDS)
    norm = _norms.global_norm(updates, axis_name=axis_name, replicated=replicated)
    c = jnp.asarray(state.clip_norm)
    scale, clipped, finite = _base.scale_rule(norm, c.astype(norm.dtype))
    below = (norm <= c.astype(norm.dtype)).astype(_F32)
    moved = c * jnp.exp(-_base.f32(learning_rate) * (below - _base.f32(target_quantile)))
    # C stays a positive, finite float32: at 0 or inf it could never move again.
    moved = _base.saturate(jnp.maximum(moved, _TINY))
    new = QuantileClipState(clip_norm=moved,
                            clip_stats={name: _base.make_stats(norm, c, scale, clipped, finite)})
    return (_base.apply_scale(updates, _base.ratio_rule(norm, c.astype(norm.dtype))),
            _base.taken_into(norm, new, state))

  return optax.GradientTransformation(init_fn, update_fn)
