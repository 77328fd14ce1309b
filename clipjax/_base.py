"""The shared pieces of every clipper: its state, statistics, thresholds, the scale rule, apply.

Each transform builds its own ``init_fn`` and ``update_fn``: it starts from
:func:`state_for`, measures (``_norms``), decides a scale with
:func:`scale_rule` and applies it with :func:`apply_scale`. Adaptive clippers
compute a threshold from their state before the same rule, and keep their
running statistics through :func:`taken_into`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks
from . import _layout
from . import _norms
from . import _partials
from . import _xla

# What every threshold argument accepts: a Python number, a JAX scalar (traced
# values included, for optax.inject_hyperparams) or an optax.Schedule of the step
# count. Annotations are strings (PEP 563), so signatures read "Threshold".
Threshold = float | int | jax.Array | Callable[[jax.Array], jax.typing.ArrayLike]


def check_name(name: str | None, default: str) -> str:
  """The name a transform's statistics are reported under: ``name=``, else ``default``."""
  if name is None:
    return default
  if not isinstance(name, str) or not name or "/" in name:
    raise ValueError(f"{name=} must be a non-empty string without '/'")
  return name


def _only_stats(state: Any) -> Any:
  (stats,) = state.clip_stats.values()
  return stats


# Every state class sets ``stats = _base.STATS``: its one entry of ``clip_stats``.
# The statistics live in a dict keyed by the transform's name, because dict keys
# survive every serialization (pickle, msgpack, orbax, nnx.state) and a class does not.
STATS = property(_only_stats, doc="The last step's statistics, the one value of ``clip_stats``.")

class ClipStats(NamedTuple):
  """What a clipper did on its last step, kept in its state for logging.

  ``clipped`` is True when the updates were rescaled (down to ``threshold``, or
  up to a ``min_*`` floor); ``scale`` is the factor applied (for per-leaf and
  element-wise clippers, the smallest one); ``norm`` is the measured quantity
  compared with ``threshold`` (for per-leaf clippers, the largest leaf norm).
  """

  norm: jax.Array  # [] float32, pre-clip
  threshold: jax.Array  # [] float32, the threshold in force at this step
  scale: jax.Array  # [] float32, 1.0 when untouched
  clipped: jax.Array  # [] bool
  finite: jax.Array  # [] bool, False when the measured norm was NaN or inf


class CountState(NamedTuple):
  """A step count and the last statistics: the layout of a fixed-threshold clipper's state.

  Each such clipper's own state class (``ClipState``, ``ClipByNormState``, ...)
  subclasses it in the clipper's module, so that a state knows the transform
  that made it.
  """

  # Not named ``count``: optax.tree_utils.tree_get would confuse it with the optimizer's.
  clip_count: jax.Array  # [] int32, steps taken (read by a scheduled threshold)
  clip_stats: dict[str, Any]  # {name: the last step's statistics}
  stats = STATS


def initial_stats(threshold: jax.typing.ArrayLike = 0.0) -> ClipStats:
  """Statistics before the first step: nothing measured, nothing clipped."""
  return ClipStats(
      norm=jnp.zeros((), jnp.float32),
      threshold=f32(threshold),
      scale=jnp.ones((), jnp.float32),
      clipped=jnp.zeros((), jnp.bool_),
      finite=jnp.ones((), jnp.bool_),
  )


def make_stats(norm: jax.Array, threshold: jax.typing.ArrayLike, scale: jax.Array,
               clipped: jax.Array, finite: jax.Array) -> ClipStats:
  """Statistics of one step, cast to the dtypes the state keeps (see :func:`f32`)."""
  return ClipStats(
      norm=f32(norm),
      threshold=f32(threshold),
      scale=f32(scale),
      clipped=jnp.asarray(clipped, jnp.bool_),
      finite=jnp.asarray(finite, jnp.bool_),
  )


# Thresholds -----------------------------------------------------------------



def resolve(value: Threshold | None, count: jax.Array) -> jax.Array | None:
  """The threshold in force at step ``count``: a schedule is evaluated at it."""
  if value is None:
    return None
  if callable(value):
    return jnp.asarray(value(count))
  return jnp.asarray(value)


def initial_threshold(value: Threshold | None) -> jax.Array:
  """The threshold at step 0, as float32, for a fresh state; float32's maximum for none.

  "No threshold" is the largest finite value, not inf, so that a state holds no
  inf for ``jax_debug_infs`` to flag.
  """
  threshold = resolve(value, jnp.zeros((), jnp.int32))
  if threshold is None:
    return jnp.full((), _F32_MAX, jnp.float32)
  return threshold.astype(jnp.float32)


def next_count(count: jax.Array) -> jax.Array:
  return optax.safe_increment(count)


# Decide and apply -------------------------------------------------------------


class Ratio(NamedTuple):
  """A factor ``num / den`` kept as its two parts, so that its derivative stays in range.

  ``d(num/den)`` holds ``num/den²``, which leaves float32's range long before
  the factor itself does (a norm of 1e20 clipped to 1). :func:`scale_leaf`
  applies a ratio with a derivative written as ``(x/den)·(dnum − s·dden)``,
  whose parts are all in range for a norm ``den`` of ``x``.
  """

  num: jax.Array
  den: jax.Array


def ratio_rule(norm: jax.Array, max_norm: jax.typing.ArrayLike | None,
               min_norm: jax.typing.ArrayLike | None = None) -> Ratio:
  """The factor that brings ``norm`` into ``[min_norm, max_norm]``, as a :class:`Ratio`.

  ``max_norm / norm`` when ``norm > max_norm``; ``min_norm / norm`` when
  ``0 < norm < min_norm`` (and that factor is finite in the norm's dtype); else
  ``1 / 1``. A zero norm keeps factor 1 (zero stays zero, whatever the
  thresholds, with no 0/0); a NaN or inf norm keeps factor 1 (the updates pass
  through). Works elementwise, so ``norm`` may hold one norm per leaf.
  """
  one = jnp.ones((), norm.dtype)
  # Each part is selected where it is used, so an unselected inf threshold
  # (max_norm=inf: no clipping) cannot give inf·0 = NaN derivatives. A NaN norm
  # fails every comparison; an inf one is cut only if finite, so both keep 1 / 1.
  num, den = one, one
  if min_norm is not None:
    low = jnp.asarray(min_norm).astype(norm.dtype)
    # Lift only where the factor low / norm is representable (norm >= low / max):
    # a norm below that (e.g. 1e-38 lifted to 4) passes through like zero.
    liftable = norm * jnp.asarray(jnp.finfo(norm.dtype).max, norm.dtype) >= low
    lift = (norm > 0) & (norm < low) & liftable
    num, den = jnp.where(lift, low, num), jnp.where(lift, norm, den)
  if max_norm is not None:
    high = jnp.asarray(max_norm).astype(norm.dtype)
    cut = (norm > high) & jnp.isfinite(norm)
    num, den = jnp.where(cut, high, num), jnp.where(cut, norm, den)
  return Ratio(jnp.broadcast_to(num, norm.shape), jnp.broadcast_to(den, norm.shape))


def scale_rule(norm: jax.Array, max_norm: jax.typing.ArrayLike | None,
               min_norm: jax.typing.ArrayLike | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`ratio_rule`'s factor as one array, and what it did.

  Returns:
    ``(scale, clipped, finite)``, shaped like ``norm``: ``clipped`` where the
    factor is not 1, ``finite`` where the norm is finite.
  """
  ratio = ratio_rule(norm, max_norm, min_norm)
  scale = ratio.num / ratio.den
  finite = jnp.isfinite(norm)
  return scale, finite & (scale != jnp.ones((), norm.dtype)), finite


def apply_scale(updates: Any, scales: Any, layout: _layout.Layout | None = None) -> Any:
  """Multiplies each leaf by its scale; the result keeps the leaf's dtype.

  A scale is an array or a :class:`Ratio`. ``scales`` is a scalar one (one
  factor for the whole tree); or a sequence with one entry per leaf in
  ``jax.tree.leaves`` order (a scalar, or with a ``layout`` that gives the leaf
  a layer axis, a vector of one factor per slice); or a vector of one factor
  per tensor. Half-precision leaves are multiplied in float32 and cast back,
  so a small factor cannot underflow in float16 before it is applied.
  """
  leaves, treedef = jax.tree.flatten(updates)
  leaves = [jnp.asarray(g) for g in leaves]
  if isinstance(scales, Ratio) or not isinstance(scales, list | tuple):
    if jnp.ndim(_first(scales)) == 0:
      return jax.tree.unflatten(treedef, [scale_leaf(g, scales) for g in leaves])
    scales = _per_leaf_scales(scales, layout, len(leaves))
  layers = layout.layers if layout is not None else (None,) * len(leaves)
  out = []
  for g, scale, layer in zip(leaves, scales, layers, strict=True):
    if layer is not None:
      shape = [1] * g.ndim
      shape[layer] = g.shape[layer]
      scale = jax.tree.map(lambda s, shape=shape: jnp.reshape(s, shape), scale)
    out.append(scale_leaf(g, scale))
  return jax.tree.unflatten(treedef, out)


def _first(scale: Any) -> jax.Array:
  return scale.num if isinstance(scale, Ratio) else scale


def _per_leaf_scales(scales: Any, layout: _layout.Layout | None, n: int) -> list[Any]:
  """A ``[n_tensors]`` vector of factors (or a :class:`Ratio` of two) cut into each leaf's part."""
  # Computed once: otherwise XLA fuses the whole vector's rule into every leaf.
  scales = jax.tree.map(lambda s: _xla.materialized(jnp.asarray(s)), scales)

  def part(start, count, layer):
    return jax.tree.map(lambda s: s[start] if layer is None else s[start:start + count], scales)

  if layout is None:
    return [part(i, 1, None) for i in range(n)]
  return [part(*span) for span in zip(layout.starts, layout.counts, layout.layers)]


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32 for half-precision floats, the dtype itself otherwise."""
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(dtype)


def scale_leaf(leaf: jax.Array, scale: Any) -> jax.Array:
  """``leaf * scale`` computed in at least float32, returned in ``leaf.dtype``.

  ``scale`` is an array, or a :class:`Ratio` (see :func:`_times_ratio`).
  """
  if isinstance(scale, Ratio):
    return _times_ratio(leaf, scale.num, scale.den)
  compute = compute_dtype(leaf.dtype)
  if compute == leaf.dtype:
    return leaf * jnp.asarray(scale).astype(leaf.dtype)
  return (leaf.astype(compute) * jnp.asarray(scale).astype(compute)).astype(leaf.dtype)


@jax.custom_jvp
def _times_ratio(leaf: jax.Array, num: jax.Array, den: jax.Array) -> jax.Array:
  """``leaf · (num / den)``, the product :func:`scale_leaf` computes for a plain factor."""
  return scale_leaf(leaf, num / den)


@_times_ratio.defjvp
def _times_ratio_jvp(primals, tangents):
  # d(x·num/den) = s·dx + (x/den)·(dnum − s·dden), s = num/den: every part is in
  # range where num/den² is not (|x| <= den when den is a norm of x).
  leaf, num, den = primals
  d_leaf, d_num, d_den = tangents
  scale = num / den
  compute = compute_dtype(leaf.dtype)
  unit = leaf.astype(compute) / den.astype(compute)
  change = (d_num - scale * d_den).astype(compute)
  tangent = d_leaf.astype(compute) * scale.astype(compute) + unit * change
  return scale_leaf(leaf, scale), tangent.astype(leaf.dtype)


# The state an update starts from ---------------------------------------------------


def state_for(updates: Any, state: Any, cls: type, fresh: Callable[[], Any] | None, *,
              name: str, needs: str | None = None) -> Any:
  """Checks the updates' dtypes; returns the state an ``update`` starts from.

  That is ``state`` when it is a ``cls`` (its arrays may be NumPy arrays).

  Any other state (``None``, ``optax.EmptyState()``, ``()``, a Flax
  ``TrainState``, another transform's state) is ignored where the result
  cannot depend on the state (``needs`` is ``None``: a fixed threshold), as
  optax's twin ignores it, and ``fresh()`` is used instead. Where it can
  (``needs`` says why: a schedule, running statistics), such a state is a
  ``ValueError`` naming the class expected.
  """
  _checks.check_updates(updates, name)
  if isinstance(state, cls):
    return state
  if needs is None and fresh is not None:
    return fresh()
  got = "None" if state is None else f"a state of type {type(state).__qualname__}"
  raise ValueError(
      f"{name}: update got {got} as its state, but needs the {cls.__name__} that its init"
      f" returns ({needs}); thread it through: state = tx.init(params), then"
      " updates, state = tx.update(grads, state, params) on every step")


def first_state(cls: type, name: str, stats: Any) -> Any:
  """The state of a clipper that keeps a step count and its statistics, before its first step."""
  return cls(clip_count=jnp.zeros((), jnp.int32), clip_stats={name: stats})


def fixed_init(cls: type, name: str, threshold: Threshold) -> Callable[[Any], Any]:
  """The ``init_fn`` of a clipper whose state is a step count and its statistics."""

  def init_fn(params):
    del params
    return first_state(cls, name, initial_stats(initial_threshold(threshold)))

  return init_fn


SCHEDULE_NEEDS = "a scheduled threshold reads its step count"
HISTORY_NEEDS = "it keeps running statistics"


def needs_state(*thresholds: Threshold | None) -> str | None:
  """Why a clipper with these thresholds needs its own state: a schedule among them, or ``None``."""
  return SCHEDULE_NEEDS if any(_checks.is_schedule(t) for t in thresholds) else None


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def f32(value: jax.typing.ArrayLike) -> jax.Array:
  """``value`` as float32, for a state or a hyperparameter; a finite value stays finite.

  Every norm that enters a float32 state (statistics, histories, moving
  averages) passes here. A finite value beyond float32's range (a float64 norm
  under x64) is clamped to ±float32 max rather than becoming inf; NaN and inf
  are kept. Hyperparameters pass here too (``inject_hyperparams`` may give bf16).
  The result is a new array: a state never aliases a user's array, which a
  donated step would delete.
  """
  value = jnp.asarray(value)
  if jnp.issubdtype(value.dtype, jnp.floating) and jnp.finfo(value.dtype).bits > 32:
    value = jnp.where(jnp.isfinite(value), jnp.clip(value, -_F32_MAX, _F32_MAX), value)
  return jnp.array(value, jnp.float32)


def saturate(value: jax.Array) -> jax.Array:
  """A float32 running statistic computed from finite inputs, held in the finite range.

  Moving averages and variances of norms near float32's maximum can round or
  square past it; an inf there would stop the clipper for good, so it is
  clamped to ±float32 max. NaN is kept.
  """
  return jnp.clip(value, -_F32_MAX, _F32_MAX)


def keep(taken: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  """``new`` when the step is taken into the statistics, else ``old`` unchanged (bit for bit)."""
  return jnp.where(taken, new, old)


def informative(norm: jax.Array) -> jax.Array:
  """Whether a step's global norm may enter running statistics: finite and nonzero.

  A NaN or inf norm would poison them; a zero norm (a frozen or masked step)
  says nothing about the scale of the gradients, and counting it would pull
  an adaptive threshold towards 0, where it would zero every later update.
  """
  return jnp.isfinite(norm) & (norm > 0)


def window_moments(buffer: jax.Array, valid: jax.Array, *, sample: bool
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(mean, std, unit)`` of ``buffer[valid]``, the first two divided by ``unit``.

  ``unit`` is the largest magnitude in the window (1 when there is none), so
  the squares cannot overflow float32; the caller multiplies back in the
  dtype it compares in. ``std`` is the sample standard deviation (Bessel's
  ``n − 1``, 0 for one value) with ``sample``, else the population one; both
  are 0 for an empty window, with a finite derivative (a constant window has
  std 0).
  """
  n = jnp.sum(valid.astype(jnp.int32)).astype(jnp.float32)
  largest = jnp.max(jnp.where(valid, jnp.abs(buffer), 0.0))
  unit = jnp.where(largest > 0, largest, 1.0)
  x = jnp.where(valid, buffer / unit, 0.0)
  mean = jnp.sum(x) / jnp.maximum(n, 1.0)
  deviation = jnp.where(valid, x - mean, 0.0)
  variance = jnp.sum(deviation * deviation) / jnp.maximum(n - 1.0 if sample else n, 1.0)
  return mean, _partials.safe_sqrt(variance), unit


def taken_into(norm: jax.Array, new: Any, old: Any) -> Any:
  """The next state of an adaptive clipper: ``new``, or ``old`` when ``norm`` says nothing.

  When the step's global norm is not :func:`informative` (zero, NaN or inf),
  every field but ``clip_stats`` keeps its old value, bit for bit, so one bad
  step cannot poison the running statistics.
  """
  taken = informative(norm)
  kept = {field: jax.tree.map(lambda n, o: keep(taken, n, o), getattr(new, field),
                              getattr(old, field))
          for field in new._fields if field != "clip_stats"}
  return new._replace(**kept)


NO_PARAMS_MSG = (
    "{name} needs the current parameters: call update(updates, state, params)"
    " (inside optax.chain the params are passed on to every transform)."
)
