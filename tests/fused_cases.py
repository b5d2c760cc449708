"""Valid fused calls of every kind on ArrayDesc values (no GPU): the baselines the CPU tests
of rope_jit.plan_fused vary, and the specializations the NVRTC tests compile."""

from __future__ import annotations

from rope_jit.arrays import ArrayDesc, contiguous_strides
from rope_jit.call_fused import (APPEND_PAGED, KV_BUFFER, KV_CACHE, MLA_CACHE, ROPE_QUANTIZE,
                                 fused_rope_call)
from rope_jit.plan_fused import FusedRopeArrays, plan_rope_fused

KINDS = ("rq", "rq_mla", "ap", "ap_mla", "mla", "kv", "buf")

BASE = 1 << 32  # a 16-byte aligned fake device pointer


def desc(shape, dtype="bfloat16", *, strides=None, ptr=BASE, device=0):
    shape = tuple(shape)
    return ArrayDesc(ptr, shape, tuple(strides) if strides is not None else contiguous_strides(shape),
                     dtype, device)


T, HQ, HK, R, N, PS, P, B = 6, 4, 2, 64, 32, 16, 10, 3   # tokens, heads, rope/nope dims, pages
L, NB, BS, D = 128, 8, 16, 96                              # MLA latent, blocks, block size, head

CALL_DEFAULTS = dict(frequencies=None, head_size=None, rotary_dim=None, quantize_dtype=None,
                     quant_scale_q=1.0, quant_scale_kv=1.0, quant_scale_v=1.0, page_size=0,
                     kv_layout="NHD", kv_cache_dtype="auto", pdl=False)


def make_call(op, is_neox=True, **kw):
    args = dict(CALL_DEFAULTS, **kw)
    return fused_rope_call(op, is_neox, *args.values())


def base_arrays(kind):
    """(call keywords, arrays) of a valid call of each kind."""
    q, k = desc((T, HQ, R)), desc((T, HK, R))
    common = dict(pos_ids=desc((T,), "int64"), cos_sin_cache=desc((4096, R), "float32"))
    pages = dict(batch_indices=desc((T,), "int32"), positions=desc((T,), "int32"),
                 kv_indices=desc((P,), "int32"), kv_indptr=desc((B + 1,), "int32"))
    if kind == "rq":
        return (ROPE_QUANTIZE, {}), dict(q_rope=q, k_rope=k, q_nope=desc((T, HQ, N)),
                                         k_nope=desc((T, HK, N)), **common)
    if kind == "rq_mla":
        return (ROPE_QUANTIZE, {}), dict(q_rope=q, k_rope=desc((T, R)), q_nope=desc((T, HQ, N)),
                                         k_nope=desc((T, L)), **common)
    if kind == "ap":
        cache = desc((P, PS, HK, R + N), "float8_e4m3fn")
        return (APPEND_PAGED, dict(page_size=PS)), dict(
            q_rope=q, k_rope=k, q_nope=desc((T, HQ, N)), k_nope=desc((T, HK, N)),
            v=desc((T, HK, R + N)), cache0=cache, cache1=cache, **common, **pages)
    if kind == "ap_mla":
        return (APPEND_PAGED, dict(page_size=PS)), dict(
            q_rope=q, k_rope=desc((T, R)), q_nope=desc((T, HQ, N)), k_nope=desc((T, N)),
            cache0=desc((P, PS, N), "float8_e4m3fn"), cache1=desc((P, PS, R), "float8_e4m3fn"),
            **common, **pages)
    if kind == "mla":
        return (MLA_CACHE, dict(kv_cache_dtype="fp8")), dict(
            q_rope=q, k_rope=desc((T, R)), k_nope=desc((T, L)),
            cache0=desc((NB, BS, L + R), "uint8"), slot_mapping=desc((T,), "int64"),
            k_scale=desc((1,), "float32"), **common)
    if kind == "kv":
        cache = desc((NB, BS, HK, D))
        return (KV_CACHE, dict(head_size=D)), dict(
            q_rope=desc((T, HQ * D)), k_rope=desc((T, HK * D)), v=desc((T, HK * D)),
            cache0=cache, cache1=cache, slot_mapping=desc((T,), "int64"),
            pos_ids=desc((T,), "int64"), cos_sin_cache=desc((4096, D), "float32"))
    if kind == "buf":
        buf = desc((50, HK * D))
        return (KV_BUFFER, dict(head_size=D)), dict(
            q_rope=desc((T, HQ, D)), k_rope=desc((T, HK, D)), v=desc((T, HK, D)),
            cache0=buf, cache1=buf, slot_mapping=desc((T,), "int64"),
            pos_ids=desc((T,), "int64"), cos_sin_cache=desc((4096, D), "bfloat16"))
    raise AssertionError(kind)


def plan(kind, *, call=None, num_sms=132, **arrays):
    """plan_rope_fused of the valid call of `kind` with call keywords and arrays replaced."""
    (op, call_kw), base = base_arrays(kind)
    base.update(arrays)
    c = make_call(op, **dict(call_kw, **(call or {})))
    return plan_rope_fused(c, FusedRopeArrays(**base), num_sms=num_sms)


