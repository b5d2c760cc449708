"""Public fused entry points: RoPE with FP8 quantization and the KV-cache write, and QK
RMSNorm + RoPE, under the names, argument names, defaults and return values of FlashInfer
(``flashinfer.rope``), vLLM (``vllm._custom_ops``) and SGLang (``sgl_kernel``). Each
builds its call (memoized, ``rope_jit.call_fused``) and makes one call into ``route``.

Beyond the peers, every function also computes cos/sin on the fly: pass
``cos_sin_cache=None`` and the keyword-only ``rope_theta`` (default 1e4), ``rope_scale``
(divides the frequencies, FlashInfer's meaning) or ``rope_scaling`` (a HuggingFace-style
dict: default, linear, llama3, yarn), as the plain on-the-fly functions take them.

Arrays may be torch tensors, CuPy arrays, or any object with ``__cuda_array_interface__``
or ``__dlpack__`` (arrays a function writes must be mutable: not JAX arrays). Every error is
a TypeError/ValueError naming the argument, raised before anything is written.
``enable_pdl=True`` (FlashInfer's functions and SGLang's KV-buffer form; sm_90 and newer)
launches with programmatic dependent launch: the kernel may be scheduled while the previous
kernel on the stream finishes and waits for it before reading anything, so only the launch
latency overlaps (no prologue runs early: the index arrays may be the previous kernel's).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

from . import route
from .call import frequencies_json
from .call_fused import (APPEND_PAGED, KV_BUFFER, KV_CACHE, MLA_CACHE, ROPE_QUANTIZE,
                         check_number, fused_rope_call, qk_norm_rope_call)
from .plan_fused import FusedRopeArrays, QKNormRopeArrays


# FlashInfer's implementations of rope_quantize_fp8 (its CUDA kernel, its cuTile one): one
# function, so rope_jit takes either name and runs its own kernel.
FLASHINFER_BACKENDS = ("cuda", "cutile")


def _frequencies(cos_sin_cache, rope_theta, rope_scale, rope_scaling) -> str | None:
    """None with a cos/sin cache; the on-the-fly frequencies without one."""
    if cos_sin_cache is not None:
        if rope_theta is not None or rope_scaling is not None or rope_scale != 1.0:
            raise ValueError("cos_sin_cache: pass either a cos/sin cache or on-the-fly "
                             "frequencies (rope_theta, rope_scale, rope_scaling), not both")
        return None
    return frequencies_json(1e4 if rope_theta is None else rope_theta, rope_scale, rope_scaling)


# ------------------------------------------------------------------ FlashInfer

def rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, is_neox=True,
                      quantize_dtype=None, quant_scale_q=1.0, quant_scale_kv=1.0,
                      q_rope_out=None, k_rope_out=None, q_nope_out=None, k_nope_out=None,
                      enable_pdl=False, backend="cuda", *, rope_theta=None, rope_scale=1.0,
                      rope_scaling=None):
    """FlashInfer's ``rope_quantize_fp8``: RoPE of q_rope / k_rope, then every part scaled
    and rounded to FP8 (round to nearest even, saturated to the largest finite value).

    q_rope ``[nnz, num_qo_heads, rope_dim]``; k_rope ``[nnz, num_kv_heads, rope_dim]``
    (GQA/MHA) or ``[nnz, rope_dim]`` (MLA); q_nope / k_nope likewise with their own no-rope
    dims, or None; fp16, bf16 (or fp32). cos_sin_cache ``[max_seq_len, rope_dim]`` (cos
    half, then sin half; fp32, bf16 or fp16), pos_ids ``[nnz]`` int32/int64. Outputs:
    q outputs = round(x * quant_scale_q), k outputs = round(x * quant_scale_kv), in
    quantize_dtype (float8_e4m3fn or float8_e5m2; None: the dtype of the outputs given,
    else float8_e4m3fn); missing outputs are allocated (an absent nope part gives an
    empty ``[nnz, heads, 0]`` output). ``backend``: FlashInfer's choice of implementation,
    "cuda" or "cutile"; rope_jit runs its own kernel for either (the same function). Returns ``(q_rope_out, k_rope_out,
    q_nope_out, k_nope_out)``."""
    if backend not in FLASHINFER_BACKENDS:
        raise ValueError(f"backend: expected 'cuda' or 'cutile' (FlashInfer's; both run "
                         f"rope_jit's CUDA kernel), got {backend!r}")
    call = fused_rope_call(ROPE_QUANTIZE, is_neox,
                           _frequencies(cos_sin_cache, rope_theta, rope_scale, rope_scaling),
                           None, None, quantize_dtype, quant_scale_q, quant_scale_kv,
                           quant_scale_kv, 0, "NHD", "auto", enable_pdl)
    return route.rope_fused(call, FusedRopeArrays(
        q_rope, k_rope, q_nope, k_nope, q_rope_out=q_rope_out, k_rope_out=k_rope_out,
        q_nope_out=q_nope_out, k_nope_out=k_nope_out, pos_ids=pos_ids,
        cos_sin_cache=cos_sin_cache))


def mla_rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, is_neox=True,
                          quantize_dtype=None, quant_scale_q=1.0, quant_scale_kv=1.0,
                          q_rope_out=None, k_rope_out=None, q_nope_out=None, k_nope_out=None,
                          enable_pdl=False, *, rope_theta=None, rope_scale=1.0,
                          rope_scaling=None):
    """FlashInfer's ``mla_rope_quantize_fp8``: ``rope_quantize_fp8`` with MLA's 2-D
    k_rope ``[nnz, rope_dim]`` and k_nope ``[nnz, no_rope_dim]``."""
    return rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, is_neox,
                             quantize_dtype, quant_scale_q, quant_scale_kv, q_rope_out,
                             k_rope_out, q_nope_out, k_nope_out, enable_pdl,
                             rope_theta=rope_theta, rope_scale=rope_scale,
                             rope_scaling=rope_scaling)


def _pair(caches, name: str) -> tuple:
    try:
        first, second = caches
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a tuple of 2 arrays, got {type(caches).__name__}") from None
    return first, second


def rope_quantize_fp8_append_paged_kv_cache(
        q_rope, k_rope, q_nope, k_nope, v, cos_sin_cache, pos_ids, paged_kv_cache, kv_indices,
        kv_indptr, batch_indices, positions, is_neox=True, quantize_dtype=None,
        quant_scale_q=1.0, quant_scale_kv=1.0, page_size=16, kv_layout="NHD", q_rope_out=None,
        q_nope_out=None, enable_pdl=False, *, rope_theta=None, rope_scale=1.0,
        rope_scaling=None):
    """FlashInfer's ``rope_quantize_fp8_append_paged_kv_cache``: ``rope_quantize_fp8`` of q,
    and K (rotated part, then the nope part) and V appended to a paged cache, quantized
    with quant_scale_kv.

    GQA/MHA (3-D k_rope): ``paged_kv_cache = (k_cache, v_cache)``, ``[max_pages, page_size,
    num_kv_heads, head_dim]`` (kv_layout "NHD") or ``[max_pages, num_kv_heads, page_size,
    head_dim]`` ("HND"), head_dim = rope_dim + no_rope_dim; v ``[nnz, num_kv_heads,
    head_dim]``. MLA (2-D k_rope, v None): ``(ckv_cache [max_pages, page_size,
    no_rope_dim], kpe_cache [max_pages, page_size, rope_dim])``. Token i goes to request
    b = batch_indices[i] at position p = positions[i]: page kv_indices[kv_indptr[b] + p //
    page_size], entry p % page_size; a token with batch_indices < 0 (CUDA-graph padding) is
    not written at all, nor is an entry outside the cache. Any page size; int32/int64
    tables. Beyond FlashInfer: a float16/bfloat16 cache (with no quantize_dtype and no
    outputs given, the outputs take the cache's dtype) appends without quantization.
    Returns ``(q_rope_out, q_nope_out)``."""
    cache0, cache1 = _pair(paged_kv_cache, "paged_kv_cache")
    call = fused_rope_call(APPEND_PAGED, is_neox,
                           _frequencies(cos_sin_cache, rope_theta, rope_scale, rope_scaling),
                           None, None, quantize_dtype, quant_scale_q, quant_scale_kv,
                           quant_scale_kv, page_size, kv_layout, "auto", enable_pdl)
    return route.rope_fused(call, FusedRopeArrays(
        q_rope, k_rope, q_nope, k_nope, v, q_rope_out=q_rope_out, q_nope_out=q_nope_out,
        cache0=cache0, cache1=cache1, pos_ids=pos_ids, cos_sin_cache=cos_sin_cache,
        batch_indices=batch_indices, positions=positions, kv_indices=kv_indices,
        kv_indptr=kv_indptr))


# ------------------------------------------------------------------ vLLM

def concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox,
                                    slot_mapping, kv_cache, kv_cache_dtype="auto",
                                    kv_cache_scale=None, *, rope_theta=None, rope_scale=1.0,
                                    rope_scaling=None) -> None:
    """vLLM's ``concat_and_cache_mla_rope_fused``: RoPE of q_pe ``[num_tokens, num_heads,
    rot_dim]`` and k_pe ``[num_tokens, rot_dim]`` in place, and the MLA cache row
    ``[kv_c | rotated k_pe]`` of each token written to kv_cache ``[num_blocks, block_size,
    kv_lora_rank + rot_dim]`` at slot_mapping[i] (block slot // block_size, entry
    slot % block_size; a negative slot, or a token past slot_mapping, is not cached).
    kv_cache_dtype "auto" stores the input dtype; "fp8"/"fp8_e4m3"/"fp8_e5m2" store
    round(x / kv_cache_scale) (a float32 device scalar, read when the kernel runs) in a
    uint8 or float8 cache. Returns None."""
    call = fused_rope_call(MLA_CACHE, is_neox,
                           _frequencies(cos_sin_cache, rope_theta, rope_scale, rope_scaling),
                           None, None, None, 1.0, 1.0, 1.0, 0, "NHD", kv_cache_dtype)
    route.rope_fused(call, FusedRopeArrays(
        q_pe, k_pe, k_nope=kv_c, cache0=kv_cache, pos_ids=positions,
        cos_sin_cache=cos_sin_cache, slot_mapping=slot_mapping, k_scale=kv_cache_scale))


def _divisor(scale, name: str) -> tuple:
    """(host multiplier, device array) of a scale x is divided by: None, a number, or a
    float32 array of one element on the device."""
    if scale is None:
        return 1.0, None
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        x = check_number(scale, name)
        if x <= 0:
            raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
        return 1.0 / x, None
    return 1.0, scale


def rope_and_reshape_and_cache_flash(positions, query, key, value, head_size, cos_sin_cache,
                                     is_neox, key_cache, value_cache, slot_mapping,
                                     kv_cache_dtype="auto", k_scale=None, v_scale=None, *,
                                     rotary_dim=None, rope_theta=None, rope_scale=1.0,
                                     rope_scaling=None) -> None:
    """vLLM's ``rotary_embedding(positions, query, key, head_size, cos_sin_cache,
    is_neox)`` followed by ``reshape_and_cache_flash(key, value, key_cache, value_cache,
    slot_mapping, kv_cache_dtype, k_scale, v_scale)``, in one kernel: query and key rotated
    in place (the first rotary_dim = cos_sin_cache width elements of each head), then each
    token's whole key and value heads written to the caches ``[num_blocks, block_size,
    num_kv_heads, head_size]`` (any strides: FlashAttention's split views too) at
    slot_mapping[i] (negative: not cached). "fp8" caches store round(x / k_scale) and
    round(x / v_scale); the scales are numbers or float32 device scalars (read when the
    kernel runs). Returns None."""
    k_mul, k_dev = _divisor(k_scale, "k_scale")
    v_mul, v_dev = _divisor(v_scale, "v_scale")
    call = fused_rope_call(KV_CACHE, is_neox,
                           _frequencies(cos_sin_cache, rope_theta, rope_scale, rope_scaling),
                           head_size, rotary_dim, None, 1.0, k_mul, v_mul, 0, "NHD",
                           kv_cache_dtype)
    route.rope_fused(call, FusedRopeArrays(
        query, key, v=value, cache0=key_cache, cache1=value_cache, pos_ids=positions,
        cos_sin_cache=cos_sin_cache, slot_mapping=slot_mapping, k_scale=k_dev, v_scale=v_dev))


def fused_qk_norm_rope(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight,
                       k_weight, cos_sin_cache, is_neox, position_ids,
                       forced_token_heads_per_warp=-1, *, rotary_dim=None, rope_theta=None,
                       rope_scale=1.0, rope_scaling=None) -> None:
    """vLLM's ``fused_qk_norm_rope``: in place on qkv ``[num_tokens, (num_heads_q +
    num_heads_k + num_heads_v) * head_dim]`` (fp16/bf16, any token stride), every q head
    becomes RMSNorm(x) * q_weight and every k head RMSNorm(x) * k_weight (fp32:
    x / sqrt(mean(x^2) + eps) * w), then RoPE on the first rotary_dim (the cache width)
    elements of each, rounded once; v heads untouched. Any even rotary dim up to any head
    size (512 and more with 16-byte aligned rows); q_weight / k_weight ``[head_dim]`` of any
    float dtype; position_ids int32/int64. With cos_sin_cache None, cos/sin are computed on
    the fly (rotary_dim: the whole head unless given). forced_token_heads_per_warp as vLLM's:
    -1 (or any value <= 0) lets rope_jit choose; N (a power of two up to 32) gives each
    (token, head) row 32 / N threads. Returns None."""
    call = qk_norm_rope_call(num_heads_q, num_heads_k, num_heads_v, head_dim, eps, is_neox,
                             _frequencies(cos_sin_cache, rope_theta, rope_scale, rope_scaling),
                             rotary_dim, forced_token_heads_per_warp)
    route.qk_norm_rope(call, QKNormRopeArrays(qkv, q_weight, k_weight, position_ids,
                                              cos_sin_cache))


# ------------------------------------------------------------------ SGLang

@dataclass
class FusedSetKVBufferArg:
    """SGLang's ``fused_set_kv_buffer_arg`` (sgl_kernel's field order): with it,
    ``apply_rope_with_cos_sin_cache_inplace`` also writes the rotated key and the value of
    token i to k_buffer[cache_loc[i]] and v_buffer[cache_loc[i]] (buffers ``[num_slots,
    num_kv_heads * head_size]`` or ``[num_slots, num_kv_heads, head_size]``; a negative
    cache_loc is not written). A buffer of another dtype than the inputs (e.g. FP8) stores
    round(x / k_scale) and round(x / v_scale). SGLang's own instances work as well."""

    value: Any
    k_buffer: Any
    v_buffer: Any
    k_scale: Optional[float] = None
    v_scale: Optional[float] = None
    cache_loc: Any = None


def rope_with_kv_buffer(positions, query, key, head_size, cos_sin_cache, is_neox,
                        fused_set_kv_buffer_arg, enable_pdl=False) -> None:
    """``apply_rope_with_cos_sin_cache_inplace`` with SGLang's fused_set_kv_buffer_arg
    (rope_jit.api calls this): RoPE in place and the KV-buffer write in one kernel."""
    arg = fused_set_kv_buffer_arg
    k_mul, k_dev = _divisor(getattr(arg, "k_scale", None), "fused_set_kv_buffer_arg.k_scale")
    v_mul, v_dev = _divisor(getattr(arg, "v_scale", None), "fused_set_kv_buffer_arg.v_scale")
    if k_dev is not None or v_dev is not None:
        raise TypeError("fused_set_kv_buffer_arg.k_scale/v_scale: expected numbers or None")
    call = fused_rope_call(KV_BUFFER, is_neox, None, head_size, None, None, 1.0, k_mul, v_mul,
                           0, "NHD", "auto", enable_pdl)
    route.rope_fused(call, FusedRopeArrays(
        query, key, v=getattr(arg, "value", None), cache0=getattr(arg, "k_buffer", None),
        cache1=getattr(arg, "v_buffer", None), pos_ids=positions, cos_sin_cache=cos_sin_cache,
        slot_mapping=getattr(arg, "cache_loc", None)))
