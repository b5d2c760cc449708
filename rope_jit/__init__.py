"""rope_jit: rotary position embedding kernels specialized at run time (NVRTC via CuPy).

One namespace with vLLM's and FlashInfer's RoPE APIs. Importing it needs only NumPy;
CuPy is imported on the first GPU call.
"""

from ._version import __version__
from .api import (
    clear_caches,
    apply_llama31_rope,
    apply_llama31_rope_inplace,
    apply_llama31_rope_pos_ids,
    apply_llama31_rope_pos_ids_inplace,
    apply_mrope_inplace_with_cache,
    apply_mrope_pos_ids,
    apply_mrope_pos_ids_inplace,
    apply_mrope_with_cos_sin_cache,
    apply_rope,
    apply_rope_inplace,
    apply_rope_inplace_with_cache,
    apply_rope_pos_ids,
    apply_rope_pos_ids_inplace,
    apply_rope_with_cos_sin_cache,
    apply_rope_with_cos_sin_cache_inplace,
    positions_from_offsets,
)
from .arrays import ArrayDesc
from . import tune as _tune  # noqa: F401  (registers the ROPE_JIT_AUTOTUNE measurer)
from .cos_sin_cache import compute_cos_sin_cache
from .jit import CompileError
from .rotary_embedding import MRotaryEmbedding, RotaryEmbedding, get_rope, rope_from_hf_config
from .scaling import RopeScaling, resolve_rope_scaling

__all__ = [
    "__version__",
    "ArrayDesc",
    "CompileError",
    "MRotaryEmbedding",
    "RopeScaling",
    "RotaryEmbedding",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace",
    "apply_mrope_inplace_with_cache",
    "apply_mrope_pos_ids",
    "apply_mrope_pos_ids_inplace",
    "apply_mrope_with_cos_sin_cache",
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_inplace_with_cache",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
    "clear_caches",
    "compute_cos_sin_cache",
    "get_rope",
    "positions_from_offsets",
    "resolve_rope_scaling",
    "rope_from_hf_config",
]
