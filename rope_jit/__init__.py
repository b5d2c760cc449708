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
    apply_rotary_emb,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_inplace,
    apply_rotary_pos_emb_interleave,
    positions_from_offsets,
)
from .api_fused import (
    FusedSetKVBufferArg,
    concat_and_cache_mla_rope_fused,
    fused_qk_norm_rope,
    mla_rope_quantize_fp8,
    rope_and_reshape_and_cache_flash,
    rope_quantize_fp8,
    rope_quantize_fp8_append_paged_kv_cache,
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
    "FusedSetKVBufferArg",
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
    "apply_rotary_emb",
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_inplace",
    "apply_rotary_pos_emb_interleave",
    "clear_caches",
    "compute_cos_sin_cache",
    "concat_and_cache_mla_rope_fused",
    "fused_qk_norm_rope",
    "get_rope",
    "mla_rope_quantize_fp8",
    "positions_from_offsets",
    "resolve_rope_scaling",
    "rope_and_reshape_and_cache_flash",
    "rope_from_hf_config",
    "rope_quantize_fp8",
    "rope_quantize_fp8_append_paged_kv_cache",
]
