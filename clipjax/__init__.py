"""clipjax: gradient clipping for JAX, as optax GradientTransformations."""

from importlib import metadata as _metadata

from ._adaptive import AdagcState as AdagcState
from ._adaptive import AutoclipState as AutoclipState
from ._adaptive import QuantileClipState as QuantileClipState
from ._adaptive import adagc as adagc
from ._adaptive import autoclip as autoclip
from ._adaptive import quantile_clip as quantile_clip
from ._agc import AdaptiveGradClipState as AdaptiveGradClipState
from ._agc import adaptive_grad_clip as adaptive_grad_clip
from ._agc import unitwise_norm as unitwise_norm
from ._base import ClipStats as ClipStats
from ._base import Threshold as Threshold
from ._clipping import ClipByBlockRmsState as ClipByBlockRmsState
from ._clipping import ClipByGlobalNormState as ClipByGlobalNormState
from ._clipping import ClipByNormState as ClipByNormState
from ._clipping import ClipState as ClipState
from ._clipping import LeafClipStats as LeafClipStats
from ._clipping import clip as clip
from ._clipping import clip_by_block_rms as clip_by_block_rms
from ._clipping import clip_by_global_norm as clip_by_global_norm
from ._clipping import clip_by_norm as clip_by_norm
from ._group import ClipByGroupNormState as ClipByGroupNormState
from ._group import clip_by_group_norm as clip_by_group_norm
from ._norms import global_norm as global_norm
from ._norms import leaf_norms as leaf_norms
from ._per_example import per_example_global_norm_clip as per_example_global_norm_clip
from ._per_example import per_example_layer_norm_clip as per_example_layer_norm_clip
from ._rolling import ClipByRollingNormState as ClipByRollingNormState
from ._rolling import clip_by_rolling_norm as clip_by_rolling_norm
from ._schedules import inverse_sqrt_decay as inverse_sqrt_decay
from ._schedules import inverse_time_decay as inverse_time_decay
from ._schedules import polynomial_decay as polynomial_decay
from ._skip import SkipSpikesState as SkipSpikesState
from ._skip import SkipStats as SkipStats
from ._skip import skip_spikes as skip_spikes
from ._spam import StableSpamState as StableSpamState
from ._spam import stable_spam_clip as stable_spam_clip
from ._stats import clip_stats as clip_stats
from ._stats import norms_by_path as norms_by_path
from ._stats import path_name as path_name
from ._wrappers import clip_grad_norm as clip_grad_norm
from ._wrappers import clip_grad_value as clip_grad_value
from ._wrappers import clip_grads_with_norm as clip_grads_with_norm
from ._wrappers import clipped as clipped
from ._wrappers import get_total_norm as get_total_norm
from ._zclip import ZclipState as ZclipState
from ._zclip import zclip as zclip

try:
  __version__ = _metadata.version("clipjax")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0"

__all__ = [
    "AdagcState",
    "AdaptiveGradClipState",
    "AutoclipState",
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByGroupNormState",
    "ClipByNormState",
    "ClipByRollingNormState",
    "ClipState",
    "ClipStats",
    "LeafClipStats",
    "QuantileClipState",
    "SkipSpikesState",
    "SkipStats",
    "StableSpamState",
    "Threshold",
    "ZclipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "clip_by_norm",
    "clip_by_rolling_norm",
    "clip_grad_norm",
    "clip_grad_value",
    "clip_grads_with_norm",
    "clip_stats",
    "clipped",
    "get_total_norm",
    "global_norm",
    "inverse_sqrt_decay",
    "inverse_time_decay",
    "leaf_norms",
    "norms_by_path",
    "path_name",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
    "polynomial_decay",
    "quantile_clip",
    "skip_spikes",
    "stable_spam_clip",
    "unitwise_norm",
    "zclip",
]
