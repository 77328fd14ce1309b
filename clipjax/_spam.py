"""Stable-SPAM's gradient stabilisation: AdaClip and AdaGN per tensor.

:func:`stable_spam_clip` keeps three moving averages per tensor (a leaf, or
with ``layer_axis`` a slice of one) and its own step count. It measures each
tensor's largest magnitude (one collective under ``axis_name``, a max), clips
the elements above a moving average of it, measures the clipped tensors' norms
(a second collective, a sum, which also carries the incoming norms for the
statistics), and rescales each tensor to a moving average of its norm.
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


class StableSpamState(NamedTuple):
  """State of :func:`clipjax.stable_spam_clip`.

  One entry per tensor: the leaves in ``jax.tree.leaves`` order, a leaf with a
  layer axis one tensor per slice.
  """

  max_ema: jax.Array  # [n_tensors] float32, m_max: EMA (theta) of each tensor's max |g|
  norm_ema: jax.Array  # [n_tensors] float32, m_n: EMA (gamma1) of each tensor's norm after AdaClip
  sq_norm_ema: jax.Array  # [n_tensors] float32, v_n: EMA (gamma2) of its square
  spam_step: jax.Array  # [] int32, t: steps with a finite nonzero update (bias corrections)
  clip_stats: dict[str, ClipStats]  # {name: the last step's statistics}
  stats = _base.STATS


def _per_tensor(values: jax.Array, leaf: jax.Array, start: int, count: int,
                layer: int | None) -> jax.Array:
  """The entries of a ``[n_tensors]`` vector that belong to ``leaf``, shaped to broadcast."""
  if layer is None:
    return values[start]
  shape = [1] * leaf.ndim
  shape[layer] = count
  return jnp.reshape(values[start:start + count], shape)


def _adaclipped(updates: Any, bound: jax.Array, largest: jax.Array,
                layout: _layout.Layout) -> Any:
  """Each element above its tensor's ``bound`` scaled by ``bound / largest``; the rest kept.

  Computed in at least float32, returned in each leaf's dtype.
  """
  leaves, treedef = jax.tree.flatten(updates)
  ratio = jnp.where(largest > bound, bound / jnp.where(largest > 0, largest, 1.0), 1.0)
  out = []
  for g, start, count, layer in zip(leaves, layout.starts, layout.counts, layout.layers):
    g = jnp.asarray(g)
    compute = _base.compute_dtype(g.dtype)
    x = g.astype(compute)
    b = _per_tensor(bound, g, start, count, layer).astype(compute)
    r = _per_tensor(ratio, g, start, count, layer).astype(compute)
    out.append(jnp.where(jnp.abs(x) > b, x * r, x).astype(g.dtype))
  return jax.tree.unflatten(treedef, out)


@_docs.fill
def stable_spam_clip(theta: float = 0.999, gamma1: float = 0.7, gamma2: float = 0.9,
                     eps: float = 1e-8, *, layer_axis: Any = None,
                     axis_name: _norms.AxisName = None, replicated: Any = None,
                     name: str | None = None) -> optax.GradientTransformation:
  """Stable-SPAM's AdaClip and AdaGN: spike-aware clipping and norm tracking per tensor.

  For each tensor ``g`` (leaf) at step ``t`` (its own count, from 1), with
  ``M = max|g|``::

    AdaClip:  m_max ← θ·m_max + (1 − θ)·M,        m̂ = m_max / (1 − θ^t)
              g ← g · m̂ / M   where |g| > m̂  (elementwise; the others kept)
    AdaGN:    n = ‖g‖ (after AdaClip)
              m_n ← γ1·m_n + (1 − γ1)·n,          v_n ← γ2·v_n + (1 − γ2)·n²
              g ← g / n · (m_n / (1 − γ1^t)) / (sqrt(v_n / (1 − γ2^t)) + eps)   where n > 0

  AdaClip cuts elements far above the recent largest magnitude. AdaGN
  normalises each tensor to norm ``m̂_n / (sqrt(v̂_n) + eps)``: about 1 while
  its norm is steady, less when this step's norm is a spike against the
  recent ones. The update's scale is therefore not kept (a tensor of norm
  1e-3 comes out with norm about 1): this is a stabiliser for Adam-type
  optimizers, which are invariant to a tensor's scale, not a norm bound.
  Stable-SPAM applies both to the gradient before Adam's moments:
  ``optax.chain(stable_spam_clip(), optax.adamw(...))``.

  The reference optimizer also resets its step count, with Adam's moments,
  every ``update_proj_gap`` steps (SPAM's momentum reset), and can decay the
  learning rate with ``total_T``; this transform does neither: its step count
  runs from the first step, and resets belong to the optimizer. It reproduces
  the reference with ``update_proj_gap=0`` and ``total_T=None``.

  A step whose update is zero, NaN or inf passes through unscaled, with
  ``finite`` False when non-finite, and changes neither the averages nor
  ``t``. A tensor whose gradient is exactly zero stays zero and keeps its
  averages (the reference would decay them towards zero). The statistics
  report the global L2 norm of the incoming update as ``norm``; as
  ``threshold`` the global norm AdaGN gives the update,
  ``sqrt(Σ_i (m̂_n,i / (sqrt(v̂_n,i) + eps))²)`` over the nonzero tensors; as
  ``scale`` the smallest factor AdaGN applies to a tensor; ``clipped`` is True
  when an element was clipped or a tensor rescaled.

  Across devices: a tensor's largest magnitude is a max over its shards and
  its norm after AdaClip a sum that depends on that max, so a step takes two
  collectives under ``axis_name`` (one ``pmax`` for every tensor, then one
  ``psum``), not one as the norm clippers do.

  Args:
    theta: the decay of the moving average of each tensor's largest magnitude,
      in ``[0, 1)``. Default 0.999.
    gamma1: the decay of the moving average of each tensor's norm, in
      ``[0, 1)``. Default 0.7.
    gamma2: the decay of the moving average of its square, in ``[0, 1)``.
      Default 0.9.
    eps: added to ``sqrt(v̂_n)`` (>= 0). Default 1e-8.
    layer_axis: pytree prefix of ``int | None``: a leaf with a layer axis (a
      scanned model's stacked layers) holds one tensor, with its own averages,
      per slice along that axis. Give ``init`` the same tree structure.
    axis_name: mapped axis name(s) over which the leaves are sharded; each
      tensor's largest magnitude and norm are taken over all its shards.
    {replicated}
    {name}

  {returns: StableSpamState}
    Its ``init`` needs the parameters (or any tree of the updates' structure).

  {example}
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> tx = clipjax.stable_spam_clip()
    >>> state = tx.init(grads)
    >>> updates, state = tx.update(grads, state)  # first step: m̂ = M; normalised to norm 1
    >>> [round(float(x), 4) for x in updates["w"]]
    [0.6, 0.8]
    >>> updates, state = tx.update({"w": jnp.array([300.0, 40.0])}, state)  # a spike
    >>> [round(float(x), 4) for x in updates["w"]]  # 300 clipped to m̂ ≈ 152, then normalised
    [0.8012, 0.2107]

  References:
    Huang, Zhu, Jin, Liu, Wang and Liu, `Stable-SPAM: How to Train in 4-Bit More
    Stably than 16-Bit Adam <https://arxiv.org/abs/2502.17055>`_, 2025; the
    reference code is ``galore_torch/stablespam.py`` in
    https://github.com/TianjinYellow/StableSPAM.
  """
  for arg, value in (("theta", theta), ("gamma1", gamma1), ("gamma2", gamma2)):
    _checks.check_number(arg, value, minimum=0.0, maximum=1.0, strict_max=True,
                         allow_schedule=False)
  _checks.check_number("eps", eps, allow_schedule=False, finite=True)
  _layout.check_replicated(replicated)
  name = _base.check_name(name, "stable_spam_clip")

  def init_fn(params):
    n = sum(_layout.layout(params, layer_axis).counts)
    zeros = jnp.zeros((n,), _F32)
    return StableSpamState(max_ema=zeros, norm_ema=zeros, sq_norm_ema=zeros,
                           spam_step=jnp.zeros((), jnp.int32),
                           clip_stats={name: _base.initial_stats(jnp.inf)})

  def update_fn(updates, state, params=None):
    del params
    state = _base.state_for(updates, state, StableSpamState, None, name=name,
                            needs=_base.HISTORY_NEEDS)
    largest = _norms.measure(updates, float("inf"), axis_name=axis_name,
                             replicated=replicated, layer_axis=layer_axis)
    if state.max_ema.shape != largest.leaves.shape:
      raise ValueError(
          f"stable_spam_clip: the state tracks {state.max_ema.shape[0]} tensors but the"
          f" updates have {largest.leaves.shape[0]}; call init with the parameters (a tree"
          " of the updates' structure).")
    acc, layout = largest.leaves.dtype, largest.layout
    t = _base.next_count(state.spam_step)
    step = t.astype(acc)
    th, g1, g2 = (_base.f32(v).astype(acc) for v in (theta, gamma1, gamma2))
    moving = lambda decay, old, new: decay * jnp.asarray(old).astype(acc) + (1.0 - decay) * new
    max_ema = moving(th, state.max_ema, largest.leaves)
    bound = max_ema / (1.0 - th**step)
    clipped_tree = _adaclipped(updates, bound, largest.leaves, layout)
    # One collective for the norms after AdaClip and, for the statistics, before it.
    norms = _norms.measure((clipped_tree, updates), 2, axis_name=axis_name,
                           replicated=(replicated, replicated),
                           layer_axis=(layer_axis, layer_axis))
    n = norms.leaves.shape[0] // 2
    after, total = norms.leaves[:n], _norms.global_norm(norms.leaves[n:])
    norm_ema = moving(g1, state.norm_ema, after)
    sq_norm_ema = moving(g2, state.sq_norm_ema, after * after)
    target = (norm_ema / (1.0 - g1**step)) / (
        jnp.sqrt(sq_norm_ema / (1.0 - g2**step)) + _base.f32(eps).astype(acc))
    nonzero = after > 0
    factors = jnp.where(nonzero, target / jnp.where(nonzero, after, 1.0), 1.0)
    finite = jnp.isfinite(largest.total)
    factors = jnp.where(finite, factors, jnp.ones((), acc))
    changed = jnp.any(largest.leaves > bound) | jnp.any(factors != 1.0)
    threshold = _norms.global_norm(jnp.where(nonzero, target, 0.0))
    smallest = jnp.min(factors, initial=jnp.inf)
    smallest = jnp.where(jnp.isfinite(smallest), smallest, jnp.ones((), acc))
    stats = _base.make_stats(total, threshold, smallest, finite & changed, finite)
    # A tensor whose gradient is zero keeps its averages.
    keep = lambda new, old: jnp.where(largest.leaves > 0, _base.saturate(_base.f32(new)), old)
    new = StableSpamState(max_ema=keep(max_ema, state.max_ema),
                          norm_ema=keep(norm_ema, state.norm_ema),
                          sq_norm_ema=keep(sq_norm_ema, state.sq_norm_ema),
                          spam_step=t, clip_stats={name: stats})
    out = jax.tree.map(lambda c, g: jnp.where(finite, c, g), clipped_tree, updates)
    return (_base.apply_scale(out, factors, layout),
            _base.taken_into(largest.total, new, state))

  return optax.GradientTransformation(init_fn, update_fn)
