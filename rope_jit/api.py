"""Public entry points: vLLM's and FlashInfer's RoPE APIs, same names, arguments, defaults
and return conventions. Each builds the call's ``RopeCall`` (memoized) and makes one call
into ``route.rope``.

Arrays may be torch tensors, CuPy arrays, or any object with ``__cuda_array_interface__``
or ``__dlpack__``; out-of-place functions return the caller's array type. In-place
functions return None.
"""

from __future__ import annotations

from . import route
from .api_fused import rope_with_kv_buffer
from .arrays import describe
from .call import (COS_SIN, COS_SIN_HALF, INDPTR, POSITIONS, cache_call, check_bool, check_int,
                   frequencies_json, on_the_fly_call, plain_cache_call, token_cos_sin_call,
                   with_rope_dim_offset)

# ------------------------------------------------------------------ from a cos/sin cache

def apply_rope_inplace_with_cache(positions, query, key, head_size, cos_sin_cache, is_neox,
                                  rope_dim_offset=0, inverse=False, *, check_positions=False,
                                  enable_pdl=False) -> None:
    """vLLM's ``rotary_embedding`` op: rotate query and key (may be None) in place.

    positions: int32/int64 ``[num_tokens]`` or ``[batch, seq]``; query/key
    ``[tokens..., num_heads * head_size]`` or ``[tokens..., num_heads, head_size]``;
    cos_sin_cache ``[max_position, rotary_dim]`` (fp16, bf16 or fp32, any query dtype).
    Positions outside the cache leave their token unrotated and are never read past the
    cache; ``check_positions=True`` raises ValueError for them instead (one host sync).
    ``rope_dim_offset``: the rotated dims of each head are [offset, offset + rotary_dim)
    (vLLM's argument); ``inverse``: rotate by the negative angle (undo a rotation).
    ``enable_pdl``: programmatic dependent launch (sm_90+; FlashInfer's name): the kernel
    may start while the previous one on the stream finishes, reading positions and the
    cache first, so that kernel must not write them.
    """
    if inverse is False and enable_pdl is False and rope_dim_offset == 0:  # the warm path
        route.rope(plain_cache_call(head_size, is_neox, True, check_positions), query, key,
                   positions, None, None, cos_sin_cache)
        return
    call = cache_call(head_size, is_neox, True, check_positions, None, False, None, inverse,
                      enable_pdl)
    if rope_dim_offset:
        call = with_rope_dim_offset(call, rope_dim_offset)
    route.rope(call, query, key, positions, None, None, cos_sin_cache)


def apply_rope_with_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox=True,
                                  *, check_positions=False, enable_pdl=False):
    """FlashInfer's ``apply_rope_with_cos_sin_cache``: returns ``(query_out, key_out)``."""
    call = (plain_cache_call(head_size, is_neox, False, check_positions) if enable_pdl is False
            else cache_call(head_size, is_neox, False, check_positions, None, False, None, False,
                            enable_pdl))
    return route.rope(call, query, key, positions, None, None, cos_sin_cache)


def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache,
                                          is_neox=True, fused_set_kv_buffer_arg=None,
                                          enable_pdl=None, *, check_positions=False) -> None:
    """FlashInfer's ``apply_rope_with_cos_sin_cache_inplace``: returns None.

    SGLang's form too: with ``fused_set_kv_buffer_arg`` (``rope_jit.FusedSetKVBufferArg``
    or SGLang's own), the rotated key and the value are also written to its KV buffers at
    ``cache_loc``, in the same kernel (``rope_jit.api_fused.rope_with_kv_buffer``; with
    PDL it waits for the previous kernel before any read). ``enable_pdl`` (None: False) as
    ``apply_rope_inplace_with_cache``."""
    pdl = False if enable_pdl is None else check_bool(enable_pdl, "enable_pdl")
    if fused_set_kv_buffer_arg is not None:
        if check_positions:
            raise ValueError("check_positions: not available with fused_set_kv_buffer_arg")
        rope_with_kv_buffer(positions, query, key, head_size, cos_sin_cache, is_neox,
                            fused_set_kv_buffer_arg, pdl)
        return
    call = (plain_cache_call(head_size, is_neox, True, check_positions) if pdl is False
            else cache_call(head_size, is_neox, True, check_positions, None, False, None, False,
                            pdl))
    route.rope(call, query, key, positions, None, None, cos_sin_cache)


# ------------------------------------------------------------------ on the fly

_NO_ARRAY = object()


def _fly(q, k, inplace, rotary_dim, interleave, frequencies, enable_pdl, *, pos_ids=_NO_ARRAY,
         indptr=None, offsets=None, mrope_section=None, mrope_interleaved=False):
    if pos_ids is not _NO_ARRAY:
        call = on_the_fly_call(POSITIONS, rotary_dim, interleave, inplace, frequencies,
                               mrope_section, mrope_interleaved, enable_pdl)
        return route.rope(call, q, k, pos_ids)
    call = on_the_fly_call(INDPTR, rotary_dim, interleave, inplace, frequencies, None, False,
                           enable_pdl)
    return route.rope(call, q, k, None, indptr, offsets)


def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0,
               rope_theta=1e4, *, rope_scaling=None, enable_pdl=False):
    """FlashInfer's ``apply_rope``: ragged batch (indptr + offsets), cos/sin on the fly.
    q ``[nnz, num_q_heads, head_dim]``, k ``[nnz, num_k_heads, head_dim]``; ``rope_scale``
    divides the frequencies. Returns ``(q_rope, k_rope)``.

    ``rope_scaling``: a HuggingFace-style dict (``rope_type`` default, linear, llama3 or
    yarn) computed on the fly instead of ``rope_scale``; see README "Scaling variants"."""
    return _fly(q, k, False, rotary_dim, interleave,
                frequencies_json(rope_theta, rope_scale, rope_scaling), enable_pdl, indptr=indptr,
                offsets=offsets)


def apply_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0,
                       rope_theta=1e4, *, rope_scaling=None, enable_pdl=False) -> None:
    """FlashInfer's ``apply_rope_inplace``."""
    _fly(q, k, True, rotary_dim, interleave, frequencies_json(rope_theta, rope_scale, rope_scaling), enable_pdl,
         indptr=indptr, offsets=offsets)


def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0,
                       rope_theta=1e4, *, rope_scaling=None, enable_pdl=False):
    """FlashInfer's ``apply_rope_pos_ids``: one position per token, cos/sin on the fly."""
    return _fly(q, k, False, rotary_dim, interleave,
                frequencies_json(rope_theta, rope_scale, rope_scaling), enable_pdl, pos_ids=pos_ids)


def apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0,
                               rope_theta=1e4, *, rope_scaling=None, enable_pdl=False) -> None:
    """FlashInfer's ``apply_rope_pos_ids_inplace``."""
    _fly(q, k, True, rotary_dim, interleave, frequencies_json(rope_theta, rope_scale, rope_scaling), enable_pdl,
         pos_ids=pos_ids)


def _llama(rope_theta, rope_scale, low_freq_factor, high_freq_factor, old_context_len) -> str:
    return frequencies_json(rope_theta, rope_scale,
                            llama31=(low_freq_factor, high_freq_factor, old_context_len))


def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8.0,
                       rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0,
                       old_context_len=8192, *, enable_pdl=False):
    """FlashInfer's ``apply_llama31_rope``: Llama 3.1 frequency smoothing, on the fly."""
    return _fly(q, k, False, rotary_dim, interleave,
                _llama(rope_theta, rope_scale, low_freq_factor, high_freq_factor, old_context_len), enable_pdl,
                indptr=indptr, offsets=offsets)


def apply_llama31_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False,
                               rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0,
                               high_freq_factor=4.0, old_context_len=8192, *, enable_pdl=False) -> None:
    """FlashInfer's ``apply_llama31_rope_inplace``."""
    _fly(q, k, True, rotary_dim, interleave,
         _llama(rope_theta, rope_scale, low_freq_factor, high_freq_factor, old_context_len), enable_pdl,
         indptr=indptr, offsets=offsets)


def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8.0,
                               rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0,
                               old_context_len=8192, *, enable_pdl=False):
    """FlashInfer's ``apply_llama31_rope_pos_ids``."""
    return _fly(q, k, False, rotary_dim, interleave,
                _llama(rope_theta, rope_scale, low_freq_factor, high_freq_factor, old_context_len), enable_pdl, pos_ids=pos_ids)


def apply_llama31_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False,
                                       rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0,
                                       high_freq_factor=4.0, old_context_len=8192, *, enable_pdl=False) -> None:
    """FlashInfer's ``apply_llama31_rope_pos_ids_inplace``."""
    _fly(q, k, True, rotary_dim, interleave,
         _llama(rope_theta, rope_scale, low_freq_factor, high_freq_factor, old_context_len), enable_pdl, pos_ids=pos_ids)


# ------------------------------------------------------------------ multimodal RoPE

def _section(mrope_section):
    """A hashable mrope_section for the memoized call builders (they check its values)."""
    try:
        return tuple(mrope_section)
    except TypeError:
        raise TypeError(f"mrope_section: expected 3 integers (t, h, w), got {mrope_section!r}") from None


def apply_mrope_inplace_with_cache(positions, query, key, head_size, cos_sin_cache, is_neox,
                                   mrope_section, mrope_interleaved=False, *,
                                   check_positions=False, enable_pdl=False) -> None:
    """Multimodal RoPE (Qwen2-VL, Qwen3-VL) from a cos/sin cache, in place.

    positions ``[3, num_tokens]``: temporal, height and width positions. Frequency j of the
    rotary_dim/2 takes its angle from row 0 for the first ``mrope_section[0]`` frequencies,
    row 1 for the next ``mrope_section[1]`` and row 2 for the rest (Qwen2-VL); with
    ``mrope_interleaved=True`` (Qwen3-VL) frequencies alternate t, h, w while each section
    lasts. The section is part of the compiled specialization: no per-token cos/sin is
    materialized. Text tokens (three equal rows) get exactly the plain RoPE result.
    """
    route.rope(cache_call(head_size, is_neox, True, check_positions, _section(mrope_section),
                          mrope_interleaved, None, False, enable_pdl),
               query, key, positions, cache=cos_sin_cache)


def apply_mrope_with_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox,
                                   mrope_section, mrope_interleaved=False, *,
                                   check_positions=False, enable_pdl=False):
    """Out-of-place ``apply_mrope_inplace_with_cache``: returns ``(query_out, key_out)``."""
    return route.rope(cache_call(head_size, is_neox, False, check_positions,
                                 _section(mrope_section), mrope_interleaved, None, False,
                                 enable_pdl),
                      query, key, positions, cache=cos_sin_cache)


def apply_mrope_pos_ids(q, k, pos_ids, mrope_section, rotary_dim=None, interleave=False,
                        rope_scale=1.0, rope_theta=1e4, *, mrope_interleaved=False,
                        rope_scaling=None, enable_pdl=False):
    """Multimodal RoPE with cos/sin on the fly: pos_ids ``[3, nnz]``, q/k
    ``[nnz, heads, head_dim]``; sections as ``apply_mrope_inplace_with_cache``. Returns
    ``(q_rope, k_rope)``."""
    return _fly(q, k, False, rotary_dim, interleave,
                frequencies_json(rope_theta, rope_scale, rope_scaling), enable_pdl, pos_ids=pos_ids,
                mrope_section=_section(mrope_section), mrope_interleaved=mrope_interleaved)


def apply_mrope_pos_ids_inplace(q, k, pos_ids, mrope_section, rotary_dim=None, interleave=False,
                                rope_scale=1.0, rope_theta=1e4, *, mrope_interleaved=False,
                                rope_scaling=None, enable_pdl=False) -> None:
    """In-place ``apply_mrope_pos_ids``."""
    _fly(q, k, True, rotary_dim, interleave, frequencies_json(rope_theta, rope_scale, rope_scaling), enable_pdl,
         pos_ids=pos_ids, mrope_section=_section(mrope_section),
         mrope_interleaved=mrope_interleaved)


# ------------------------------------------------------------------ cos/sin per token

def _cos_sin_without_grad(cos, sin) -> None:
    """cos and sin get no gradient: refuse them where autograd would expect one (a
    learnable cos/sin would otherwise silently stay untrained)."""
    for x, name in ((cos, "cos"), (sin, "sin")):
        if getattr(x, "requires_grad", False):
            import torch

            if torch.is_grad_enabled():
                raise ValueError(f"{name}: requires grad, but rope_jit gives cos and sin no "
                                 "gradient (only query and key get one); pass it detached, or "
                                 "call under torch.no_grad()")


def _shape(obj, name: str) -> tuple:
    """An array's shape from its metadata (no data pointer: fake and meta tensors have
    none)."""
    shape = getattr(obj, "shape", None)
    return tuple(shape) if shape is not None else describe(obj, name).shape


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' ``apply_rotary_pos_emb``: returns ``(q_embed, k_embed)``.

    q, k: ``[batch, heads, seq, head_dim]`` (``unsqueeze_dim=1``, transformers' attention
    layout), ``[batch, seq, heads, head_dim]`` (``unsqueeze_dim=2``) or ``[seq, heads,
    head_dim]`` (``unsqueeze_dim=-2``): the heads dim is where transformers unsqueezes
    cos/sin. Any strides with a contiguous last dim (transposed and sliced views are read
    in place); k may have its own head count, or be None.
    cos, sin: ``[batch, seq, rotary_dim]`` as transformers' rotary embeddings return them
    (``cat((freqs, freqs), -1)``; only the first half is read), or any leading dims that
    broadcast to the token dims (``[1, seq, rotary_dim]``, ``[seq, rotary_dim]``); fp16,
    bf16 or fp32 whatever q's dtype. rotary_dim below head_dim: the rest of each head passes
    through (partial rotary). NeoX pairs (``rotate_half``); arithmetic in fp32, rounded
    once. Returns new contiguous arrays of q's and k's shapes.

    Differentiable w.r.t. q and k; cos and sin get no gradient (a ValueError if they
    require one under grad mode).
    """
    _cos_sin_without_grad(cos, sin)
    return route.rope(token_cos_sin_call(COS_SIN, True, False, unsqueeze_dim), q, k,
                      cos=cos, sin=sin)


def apply_rotary_pos_emb_inplace(q, k, cos, sin, unsqueeze_dim=1) -> None:
    """In-place ``apply_rotary_pos_emb``: rotates q and k (may be None) in place, returns
    None. Not differentiable."""
    _cos_sin_without_grad(cos, sin)
    route.rope(token_cos_sin_call(COS_SIN, True, True, unsqueeze_dim), q, k, cos=cos, sin=sin)


def apply_rotary_pos_emb_interleave(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers' (DeepSeek-V3's) ``apply_rotary_pos_emb_interleave``: returns
    ``(q_embed, k_embed)``.

    Pairs are adjacent elements ``(x[2i], x[2i+1])`` (GPT-J style), and the outputs hold
    them de-interleaved, in NeoX order: ``[x1*c - x2*s for every pair, x2*c + x1*s for every
    pair]``, as transformers writes them. Layouts and cos/sin as ``apply_rotary_pos_emb``;
    ``position_ids`` is unused, as in transformers. Differentiable w.r.t. q and k.
    """
    _cos_sin_without_grad(cos, sin)
    return route.rope(token_cos_sin_call(COS_SIN, False, False, unsqueeze_dim, True), q, k,
                      cos=cos, sin=sin)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0):
    """flash-attn's ``apply_rotary_emb``: x ``[batch, seqlen, nheads, headdim]``, cos and sin
    ``[seqlen_ro, rotary_dim / 2]``; token s of every sequence takes row
    ``s + seqlen_offsets`` (an int; flash-attn's per-sequence offset tensors and
    ``cu_seqlens`` are not offered: use ``apply_rope_with_cos_sin_cache`` with positions).
    ``interleaved=True``: GPT-J pairs. Returns the rotated x (x itself when ``inplace``,
    as flash-attn). Differentiable w.r.t. x out of place; cos and sin get no gradient."""
    offset = check_int(seqlen_offsets, "seqlen_offsets")
    _cos_sin_without_grad(cos, sin)
    x_shape, cos_shape = _shape(x, "x"), _shape(cos, "cos")
    if len(x_shape) != 4:
        raise ValueError(f"x: expected shape [batch, seqlen, nheads, headdim], got {list(x_shape)}")
    seqlen = x_shape[1]
    if len(cos_shape) != 2 or not 0 <= offset <= cos_shape[0] - seqlen:
        raise ValueError(f"cos: expected shape [seqlen_ro, rotary_dim / 2] with seqlen_ro >= "
                         f"seqlen_offsets + seqlen = {offset + seqlen}, got {list(cos_shape)}")
    if cos_shape[0] != seqlen:  # the rows of this call's tokens (a view)
        cos, sin = cos[offset:offset + seqlen], sin[offset:offset + seqlen]
    call = token_cos_sin_call(COS_SIN_HALF, not interleaved, inplace)
    out = route.rope(call, x, None, cos=cos, sin=sin)
    return x if inplace else out[0]


# ------------------------------------------------------------------ positions

def positions_from_offsets(indptr, offsets, nnz=None):
    """Positions of a ragged batch: token j of request b gets offsets[b] + (j - indptr[b]).

    Returns ``nnz`` positions (default ``indptr[-1]``), one per token 0 .. nnz-1; a token no
    request owns gets -1. NumPy in, NumPy out (host arrays of any framework are computed on
    the host). Device arrays stay on the device: one kernel, no host round trip when
    ``nnz`` is given; without it, indptr[-1] is read back first. The result has the dtype
    of ``offsets``.
    """
    return route.positions_from_offsets(indptr, offsets, nnz)


def clear_caches() -> None:
    """Forget every per-call cache: launch plans (plain and fused), call descriptions and
    on-the-fly frequency values (each is bounded; this empties them, e.g. after changing tuning). Compiled
    kernels stay loaded (``rope_jit.jit.clear_memory`` forgets those too)."""
    from .call import clear_call_caches
    from .call_fused import clear_fused_call_caches
    from .launch import clear_caches as clear_plans
    from .launch_fused import clear_fused_plans
    from .scaling import on_the_fly_values

    clear_plans()
    clear_fused_plans()
    clear_call_caches()
    clear_fused_call_caches()
    on_the_fly_values.cache_clear()
