"""Validation and launch planning of the fused ops (rope_jit.plan_fused, rope_jit.call_fused)
on ArrayDesc values: no GPU, no CuPy.

* every error path: the exception type and a message naming the argument as the public
  function calls it (docs/errors.md), raised by planning, i.e. before any launch;
* what each public function maps to in the kernel (spec fields, strides, offsets, scales);
* vector widths, item counts and the launch shape.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from fused_cases import (B, BASE, BS, D, HK, HQ, KINDS, NB, PS, L, N, P, R, T, base_arrays,
                         desc, make_call, plan)
from rope_jit.arrays import HOST, ArrayDesc
from rope_jit.call import frequencies_json
from rope_jit.call_fused import APPEND_PAGED, ROPE_QUANTIZE, fused_rope_call, qk_norm_rope_call
from rope_jit.plan_fused import (BLOCK_THREADS, FEW_BLOCK_THREADS, ITEM_BATCH, THREAD_BATCHES,
                                 QKNormRopeArrays, choose_fused_launch, fused_items,
                                 plan_qk_norm_rope, widest_vec)
from rope_jit.specs import ROPE_FREQ
from rope_jit.specs_fused import FUSED_ROPE_PARAMS, QK_NORM_ROPE_PARAMS


def values(p) -> dict:
    names = FUSED_ROPE_PARAMS.static_names
    assert len(p.static) == len(names) == len(FUSED_ROPE_PARAMS.names) - 20
    return dict(zip(names, p.static))


@pytest.mark.parametrize("kind", KINDS)
def test_valid_baselines(kind):
    p = plan(kind)
    assert p.spec is not None and p.device == 0
    assert p.spec.vec == 8 and p.launch.block[0] * p.launch.block[1] <= 256


# ------------------------------------------------------------------ errors

ERRORS = [
    # q/k inputs
    ("q-none", "rq", dict(q_rope=None), TypeError, r"^q_rope: expected a float16, bfloat16 or float32 array, got None"),
    ("q-int", "rq", dict(q_rope=desc((T, HQ, R), "int32")), TypeError, r"^q_rope: expected dtype float16 or bfloat16 or float32, got int32"),
    ("k-none", "rq", dict(k_rope=None), TypeError, r"^k_rope: expected .* got None"),
    ("k-dtype", "rq", dict(k_rope=desc((T, HK, R), "float16")), TypeError, r"^k_rope: dtype float16 differs from q_rope dtype bfloat16"),
    ("v-dtype", "ap", dict(v=desc((T, HK, R + N), "float32")), TypeError, r"^v: dtype float32 differs from q_rope dtype bfloat16"),
    ("q-2d", "rq", dict(q_rope=desc((T, HQ * R))), ValueError, r"^q_rope: expected \[nnz, num_qo_heads, rope_dim\], got shape"),
    ("k-4d", "rq", dict(k_rope=desc((T, HK, 1, R))), ValueError, r"^k_rope: expected \[nnz, num_kv_heads, rope_dim\] \(GQA/MHA\) or \[nnz, rope_dim\] \(MLA\)"),
    ("k-tokens", "rq", dict(k_rope=desc((T + 1, HK, R))), ValueError, rf"^k_rope: expected {T} tokens \(its first dim\), got {T + 1}"),
    ("q-strided-last", "rq", dict(q_rope=desc((T, HQ, R), strides=(2 * HQ * R, 2 * R, 2))), ValueError, r"^q_rope: the last dim must be contiguous \(stride 1\), got stride 2"),
    ("k-width", "rq", dict(k_rope=desc((T, HK, R // 2))), ValueError, r"^k_rope: last dim 32 must equal the rope dim 64 of q_rope"),
    ("rope-odd", "rq", dict(q_rope=desc((T, HQ, 7)), k_rope=desc((T, HK, 7)), cos_sin_cache=desc((9, 7), "float32")), ValueError, r"^q_rope last dim \(rope dim\): expected a positive even number, got 7"),
    ("rotary-dim-fi", "rq", dict(call=dict(rotary_dim=32)), ValueError, r"^rotary_dim: rope_quantize_fp8 rotates the whole width of q_rope"),
    ("q-nope-heads", "rq", dict(q_nope=desc((T, HQ + 1, N))), ValueError, r"^q_nope: 5 heads, q_rope has 4"),
    ("k-nope-heads", "rq", dict(k_nope=desc((T, HK + 1, N))), ValueError, r"^k_nope: 3 heads, k_rope has 2"),
    ("k-nope-2d-gqa", "rq", dict(k_nope=desc((T, HK * N))), ValueError, r"^k_nope: expected \[nnz, num_kv_heads, no_rope_dim\]"),
    ("k-nope-3d-mla", "rq_mla", dict(k_nope=desc((T, 1, L))), ValueError, r"^k_nope: expected \[nnz, no_rope_dim\] \(MLA, as k_rope\)"),
    ("v-for-mla", "ap_mla", dict(v=desc((T, R + N))), ValueError, r"^v: MLA \(a 2-D k_rope\) takes no v: pass None"),
    ("v-missing-gqa", "ap", dict(v=None), TypeError, r"^v: GQA/MHA \(a 3-D k_rope\) needs the value array"),
    ("v-heads", "ap", dict(v=desc((T, HK + 1, R + N))), ValueError, r"^v: 3 heads, k_rope has 2"),
    ("mla-no-kv-c", "mla", dict(k_nope=None), TypeError, r"^kv_c: expected the latent array"),
    ("mla-q-2d", "mla", dict(q_rope=desc((T, HQ * R))), ValueError, r"^q_pe: expected \[num_tokens, num_heads, rot_dim\]"),
    ("mla-k-3d", "mla", dict(k_rope=desc((T, 1, R))), ValueError, r"^k_pe: expected \[num_tokens, rot_dim\]"),
    # vLLM/SGLang layouts
    ("kv-head-size", "kv", dict(call=dict(head_size=D + 2)), ValueError, r"^query: last dim 384 is not a multiple of head_size 98"),
    ("kv-head-size-3d", "buf", dict(q_rope=desc((T, HQ, D + 8))), ValueError, r"^query: last dim 104 must equal head_size 96"),
    ("kv-no-value", "kv", dict(v=None), TypeError, r"^value: expected the value array, got None"),
    ("kv-value-heads", "kv", dict(v=desc((T, 3 * D + 1))), ValueError, r"^value: last dim 289 is not a multiple of the 2 key heads"),
    ("kv-value-3d-heads", "buf", dict(v=desc((T, HK + 1, D))), ValueError, r"^fused_set_kv_buffer_arg.value: 3 heads, key has 2"),
    ("kv-rotary-vs-cache", "kv", dict(call=dict(rotary_dim=32)), ValueError, r"^cos_sin_cache: width 96 must equal rotary_dim 32"),
    ("kv-rotary-too-big", "kv", dict(cos_sin_cache=desc((4096, D + 2), "float32")), ValueError, r"^cos_sin_cache width \(rotary_dim\): 98 exceeds the head size 96"),
    ("kv-rotary-odd", "kv", dict(cos_sin_cache=desc((4096, 33), "float32")), ValueError, r"^cos_sin_cache width \(rotary_dim\): expected a positive even number, got 33"),
    # cos/sin cache
    ("cache-and-fly", "rq", dict(call=dict(frequencies=frequencies_json())), ValueError, r"^cos_sin_cache: pass either a cos/sin cache or on-the-fly frequencies"),
    ("cache-int", "rq", dict(cos_sin_cache=desc((4096, R), "int32")), TypeError, r"^cos_sin_cache: expected dtype float16 or bfloat16 or float32, got int32"),
    ("cache-1d", "rq", dict(cos_sin_cache=desc((4096 * R,), "float32")), ValueError, r"^cos_sin_cache: expected shape \[max_position, rotary_dim\]"),
    ("cache-strided", "rq", dict(cos_sin_cache=desc((4096, R), "float32", strides=(2 * R, 2))), ValueError, r"^cos_sin_cache: the last dim must be contiguous"),
    ("cache-width", "rq", dict(cos_sin_cache=desc((4096, 2 * R), "float32")), ValueError, r"^cos_sin_cache: width 128 must equal the rope dim \(q_rope last dim\) 64"),
    # outputs
    ("out-dtypes-differ", "rq", dict(q_rope_out=desc((T, HQ, R), "float8_e4m3fn"), k_rope_out=desc((T, HK, R), "float8_e5m2")), TypeError, r"^k_rope_out: dtype float8_e5m2 differs from q_rope_out \(float8_e4m3fn\)"),
    ("out-vs-quantize-dtype", "rq", dict(call=dict(quantize_dtype="float8_e5m2"), q_nope_out=desc((T, HQ, N), "float8_e4m3fn")), TypeError, r"^q_nope_out: dtype float8_e4m3fn differs from quantize_dtype \(float8_e5m2\)"),
    ("out-int8", "rq", dict(q_rope_out=desc((T, HQ, R), "int8")), TypeError, r"^q_rope_out: expected dtype float8_e4m3fn or float8_e5m2"),
    ("out-shape", "rq", dict(k_rope_out=desc((T, HK, R + 2), "float8_e4m3fn")), ValueError, r"^k_rope_out: expected shape \[6, 2, 64\], got \[6, 2, 66\]"),
    ("out-empty-nope", "rq", dict(q_nope=None, q_nope_out=desc((T, HQ, N), "float8_e4m3fn")), ValueError, r"^q_nope_out: expected shape \[6, 4, 0\], got \[6, 4, 32\]"),
    ("out-strided-last", "ap", dict(q_rope_out=desc((T, HQ, R), "float8_e4m3fn", strides=(2 * HQ * R, 2 * R, 2))), ValueError, r"^q_rope_out: the last dim must be contiguous"),
    # FlashInfer paged caches
    ("ap-cache-dtype", "ap", dict(cache1=desc((P, PS, HK, R + N), "float8_e5m2")), TypeError, r"^paged_kv_cache\[1\]: expected dtype float8_e4m3fn \(the quantized outputs' dtype\), got float8_e5m2"),
    ("ap-cache-3d", "ap", dict(cache0=desc((P, PS, HK * (R + N)), "float8_e4m3fn")), ValueError, r"^paged_kv_cache\[0\]: expected \[max_pages, page_size, num_kv_heads, head_dim\] \(NHD\)"),
    ("ap-page-size", "ap", dict(call=dict(page_size=8)), ValueError, r"^paged_kv_cache\[0\]: dim 1 \(page_size\) must be 8, got 16"),
    ("ap-hnd-heads", "ap", dict(call=dict(kv_layout="HND")), ValueError, r"^paged_kv_cache\[0\]: dim 2 \(page_size\) must be 16, got 2"),
    ("ap-head-dim", "ap", dict(cache0=desc((P, PS, HK, R), "float8_e4m3fn")), ValueError, r"^paged_kv_cache\[0\]: dim 3 \(rope_dim \+ no_rope_dim\) must be 96, got 64"),
    ("ap-v-head-dim", "ap", dict(v=desc((T, HK, R))), ValueError, r"^paged_kv_cache\[1\]: dim 3 \(the head_dim of v\) must be 64, got 96"),
    ("ap-mla-kpe", "ap_mla", dict(cache1=desc((P, PS, R + 2), "float8_e4m3fn")), ValueError, r"^paged_kv_cache\[1\]: dim 2 \(rope_dim\) must be 64, got 66"),
    ("ap-mla-ckv", "ap_mla", dict(cache0=desc((P, PS * 2, N), "float8_e4m3fn")), ValueError, r"^paged_kv_cache\[0\]: dim 1 \(page_size\) must be 16, got 32"),
    ("ap-cache-none", "ap", dict(cache1=None), TypeError, r"^paged_kv_cache\[1\]: expected a KV cache array, got None"),
    ("ap-cache-host", "ap", dict(cache0=desc((P, PS, HK, R + N), "float8_e4m3fn", device=HOST)), TypeError, r"^paged_kv_cache\[0\]: expected a CUDA device array"),
    ("ap-cache-int", "ap", dict(cache0=desc((P, PS, HK, R + N), "int32")), TypeError, r"^paged_kv_cache\[0\]: expected dtype .*got int32"),
    ("ap-cache-strided", "ap", dict(cache0=desc((P, PS, HK, R + N), "float8_e4m3fn", strides=(PS * HK * 192, HK * 192, 192, 2))), ValueError, r"^paged_kv_cache\[0\]: the last dim must be contiguous"),
    # vLLM caches
    ("mla-cache-width", "mla", dict(cache0=desc((NB, BS, L), "uint8")), ValueError, r"^kv_cache: dim 2 \(kv_lora_rank 128 \+ rot_dim 64\) must be 192, got 128"),
    ("mla-cache-4d", "mla", dict(cache0=desc((NB, BS, 1, L + R), "uint8")), ValueError, r"^kv_cache: expected \[num_blocks, block_size, kv_lora_rank \+ rot_dim\]"),
    ("mla-auto-dtype", "mla", dict(call=dict(kv_cache_dtype="auto")), TypeError, r"^kv_cache: kv_cache_dtype 'auto' stores the input dtype bfloat16, got a uint8 cache"),
    ("mla-fp8-dtype", "mla", dict(cache0=desc((NB, BS, L + R), "float16")), TypeError, r"^kv_cache: kv_cache_dtype 'fp8' needs a uint8 or float8_e4m3fn cache, got float16"),
    ("mla-e5m2-dtype", "mla", dict(call=dict(kv_cache_dtype="fp8_e5m2"), cache0=desc((NB, BS, L + R), "float8_e4m3fn")), TypeError, r"^kv_cache: kv_cache_dtype 'fp8_e5m2' needs a uint8 or float8_e5m2 cache"),
    ("mla-no-scale", "mla", dict(k_scale=None), TypeError, r"^kv_cache_scale: an fp8 cache needs the scale"),
    ("mla-scale-shape", "mla", dict(k_scale=desc((2,), "float32")), ValueError, r"^kv_cache_scale: expected one element, got shape \[2\]"),
    ("mla-scale-dtype", "mla", dict(k_scale=desc((1,), "float16")), TypeError, r"^kv_cache_scale: expected dtype float32, got float16"),
    ("kv-cache-heads", "kv", dict(cache0=desc((NB, BS, HK + 1, D))), ValueError, r"^key_cache: dim 2 \(num_kv_heads\) must be 2, got 3"),
    ("kv-cache-head-size", "kv", dict(cache0=desc((NB, BS, HK, D + 8))), ValueError, r"^key_cache: dim 3 \(head_size\) must be 96, got 104"),
    ("kv-value-cache-blocks", "kv", dict(cache1=desc((NB + 1, BS, HK, D))), ValueError, r"^value_cache: dim 0 \(num_blocks\) must be 8, got 9"),
    ("kv-value-cache-head", "kv", dict(cache1=desc((NB, BS, HK, D + 8))), ValueError, r"^value_cache: dim 3 \(head_size_v of value\) must be 96, got 104"),
    ("kv-cache-3d", "kv", dict(cache0=desc((NB, BS, HK * D))), ValueError, r"^key_cache: expected \[num_blocks, block_size, num_kv_heads, head_size\]"),
    ("kv-cache-dtypes", "kv", dict(call=dict(kv_cache_dtype="fp8"), cache0=desc((NB, BS, HK, D), "uint8"), cache1=desc((NB, BS, HK, D), "float8_e5m2")), TypeError, r"^value_cache: kv_cache_dtype 'fp8' needs a uint8 or float8_e4m3fn cache, got float8_e5m2"),
    ("kv-scale-host", "kv", dict(call=dict(kv_cache_dtype="fp8"), cache0=desc((NB, BS, HK, D), "uint8"), cache1=desc((NB, BS, HK, D), "uint8"), k_scale=desc((1,), "float32", device=HOST)), TypeError, r"^k_scale: expected a CUDA device array"),
    ("buf-shape", "buf", dict(cache0=desc((50, HK * D + 8))), ValueError, r"^fused_set_kv_buffer_arg.k_buffer: expected 2 heads of 96 per slot, got shape \[50, 200\]"),
    ("buf-3d-shape", "buf", dict(cache1=desc((50, HK, D + 8))), ValueError, r"^fused_set_kv_buffer_arg.v_buffer: expected 2 heads of 96 per slot"),
    ("buf-slots", "buf", dict(cache1=desc((40, HK * D))), ValueError, r"^fused_set_kv_buffer_arg.v_buffer: dim 0 \(slots\) must be 50, got 40"),
    ("buf-uint8", "buf", dict(cache0=desc((50, HK * D), "uint8")), TypeError, r"^fused_set_kv_buffer_arg.k_buffer: expected a float16, bfloat16, float32 or float8 buffer, got uint8"),
    ("buf-dtypes", "buf", dict(cache1=desc((50, HK * D), "float16")), TypeError, r"^fused_set_kv_buffer_arg.v_buffer: dtype float16 differs from fused_set_kv_buffer_arg.k_buffer dtype bfloat16"),
    # index arrays
    ("pos-none", "rq", dict(pos_ids=None), TypeError, r"^pos_ids: expected an integer array, got None"),
    ("pos-float", "rq", dict(pos_ids=desc((T,), "float32")), TypeError, r"^pos_ids: expected dtype int32 or int64, got float32"),
    ("pos-short", "rq", dict(pos_ids=desc((T - 1,), "int64")), ValueError, rf"^pos_ids: expected a 1-D array of at least {T} entries, got shape \[{T - 1}\]"),
    ("pos-2d", "mla", dict(pos_ids=desc((1, T), "int64")), ValueError, r"^positions: expected a 1-D array"),
    ("pos-host", "rq", dict(pos_ids=desc((T,), "int64", device=HOST)), TypeError, r"^pos_ids: expected a CUDA device array"),
    ("slot-none", "kv", dict(slot_mapping=None), TypeError, r"^slot_mapping: expected an integer array, got None"),
    ("slot-float", "buf", dict(slot_mapping=desc((T,), "float32")), TypeError, r"^fused_set_kv_buffer_arg.cache_loc: expected dtype int32 or int64"),
    ("batch-indices-short", "ap", dict(batch_indices=desc((T - 2,), "int32")), ValueError, r"^batch_indices: expected a 1-D array of at least 6 entries"),
    ("positions-float", "ap", dict(positions=desc((T,), "float16")), TypeError, r"^positions: expected dtype int32 or int64, got float16"),
    ("kv-indices-none", "ap", dict(kv_indices=None), TypeError, r"^kv_indices: expected an integer array, got None"),
    ("kv-indptr-empty", "ap", dict(kv_indptr=desc((0,), "int32")), ValueError, r"^kv_indptr: expected a 1-D array of at least 1 entries, got shape \[0\]"),
]


@pytest.mark.parametrize("kind, overrides, exc, match", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_invalid_call(kind, overrides, exc, match):
    """docs/errors.md: the exception type and a message naming the argument."""
    with pytest.raises(exc, match=match):
        plan(kind, **overrides)


DEVICE_CASES = [("rq", "k_nope", "k_nope"), ("ap", "cache1", r"paged_kv_cache\[1\]"),
                ("ap", "kv_indptr", "kv_indptr"), ("mla", "k_scale", "kv_cache_scale"),
                ("kv", "cos_sin_cache", "cos_sin_cache"), ("buf", "v", "fused_set_kv_buffer_arg.value"),
                ("rq", "q_rope_out", "q_rope_out")]


@pytest.mark.parametrize("kind, field, name", DEVICE_CASES)
def test_arrays_on_different_devices(kind, field, name):
    (_, _), base = base_arrays(kind)
    d = base.get(field) or desc((T, HQ, R), "float8_e4m3fn")
    moved = ArrayDesc(d.ptr, d.shape, d.strides, d.dtype, 1)
    first = {"rq": "q_rope", "ap": "q_rope", "mla": "q_pe", "kv": "query", "buf": "query"}[kind]
    with pytest.raises(ValueError, match=rf"^{name} is on cuda:1 but {first} is on cuda:0"):
        plan(kind, **{field: moved})


CALL_ERRORS = [
    (dict(op="rope"), ValueError, r"^op: expected one of"),
    (dict(is_neox=1), TypeError, r"^is_neox: expected a bool, got int 1"),
    (dict(quantize_dtype="int8"), TypeError, r"^quantize_dtype: expected float8_e4m3fn or float8_e5m2"),
    (dict(quant_scale_q="2"), TypeError, r"^quant_scale_q: expected a number, got str"),
    (dict(quant_scale_kv=float("nan")), ValueError, r"^quant_scale_kv: expected a finite number, got nan"),
    (dict(quant_scale_v=True), TypeError, r"^quant_scale_v: expected a number, got bool"),
    (dict(op=APPEND_PAGED, page_size=0), ValueError, r"^page_size: expected a positive integer, got 0"),
    (dict(op=APPEND_PAGED, page_size=16.0), TypeError, r"^page_size: expected an integer, got float"),
    (dict(kv_layout="NDH"), ValueError, r"^kv_layout: expected 'NHD' or 'HND', got 'NDH'"),
    (dict(kv_cache_dtype="fp4"), ValueError, r"^kv_cache_dtype: expected one of 'auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2', got 'fp4'"),
    (dict(head_size=0), ValueError, r"^head_size: expected a positive integer, got 0"),
    (dict(head_size="64"), TypeError, r"^head_size: expected an integer, got str"),
    (dict(rotary_dim=32.5), TypeError, r"^rotary_dim: expected an integer, got float"),
]


@pytest.mark.parametrize("kw, exc, match", CALL_ERRORS, ids=[str(c[0]) for c in CALL_ERRORS])
def test_invalid_call_arguments(kw, exc, match):
    # The builders are memoized on their arguments, and 1 == True == 1.0 as dict keys: a
    # call equal to one built before is the same call (checked when first built).
    fused_rope_call.cache_clear()
    kw = dict(kw)
    op, is_neox = kw.pop("op", ROPE_QUANTIZE), kw.pop("is_neox", True)
    with pytest.raises(exc, match=match):
        make_call(op, is_neox, **kw)


QK_CALL_ERRORS = [
    ((3.0, 1, 1, 64, 1e-6, True), TypeError, r"^num_heads_q: expected an integer, got float"),
    ((4, -1, 1, 64, 1e-6, True), ValueError, r"^num_heads_k: expected a non-negative integer, got -1"),
    ((4, 1, 1, 0, 1e-6, True), ValueError, r"^head_dim: expected a positive integer, got 0"),
    ((4, 1, 1, 64, -1e-6, True), ValueError, r"^eps: expected a finite number >= 0, got -1e-06"),
    ((4, 1, 1, 64, None, True), TypeError, r"^eps: expected a number, got NoneType"),
    ((4, 1, 1, 64, 1e-6, "yes"), TypeError, r"^is_neox: expected a bool, got str"),
    ((4, 1, 1, 64, 1e-6, True, None, None, 2.0), TypeError,
     r"^forced_token_heads_per_warp: expected an integer, got float"),
    ((4, 1, 1, 64, 1e-6, True, None, None, 3), ValueError,
     r"^forced_token_heads_per_warp: expected -1 \(the planner's choice\) or a power of two up to 32, got 3"),
    ((4, 1, 1, 64, 1e-6, True, None, None, 64), ValueError,
     r"^forced_token_heads_per_warp: expected -1 .* got 64"),
]


@pytest.mark.parametrize("args, exc, match", QK_CALL_ERRORS, ids=[c[2][1:12] for c in QK_CALL_ERRORS])
def test_invalid_qk_norm_call_arguments(args, exc, match):
    qk_norm_rope_call.cache_clear()
    with pytest.raises(exc, match=match):
        qk_norm_rope_call(*args)


# ------------------------------------------------------------------ what each function maps to

def test_rope_quantize_writes_four_arrays_and_allocates_missing_outputs():
    p = plan("rq")
    s = p.spec
    assert (s.q_inplace, s.k_rope_out, s.q_nope_out, s.k_nope_out) == (False, "array", True, True)
    assert (s.cache_mode, s.k_rope_cache, s.k_nope_cache, s.v_cache) == ("none", -1, -1, -1)
    assert s.q_out_dtype == s.k_out_dtype == "float8_e4m3fn"  # FlashInfer's default
    assert [f for f, _, _ in p.outputs] == ["q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out"]
    assert [shape for _, shape, _ in p.outputs] == [(T, HQ, R), (T, HK, R), (T, HQ, N), (T, HK, N)]


def test_rope_quantize_output_dtype_rules():
    """quantize_dtype, else the first output given, else e4m3; absent nope parts give empty
    outputs [nnz, heads, 0] (MLA's k: [nnz, 0])."""
    assert plan("rq", call=dict(quantize_dtype="float8_e5m2")).spec.q_out_dtype == "float8_e5m2"
    p = plan("rq", k_nope_out=desc((T, HK, N), "float8_e5m2"))
    assert p.spec.k_out_dtype == "float8_e5m2" and "k_nope_out" not in [f for f, _, _ in p.outputs]
    p = plan("rq_mla", q_nope=None, k_nope=None)
    assert dict((f, s) for f, s, _ in p.outputs)["k_nope_out"] == (T, 0)
    assert dict((f, s) for f, s, _ in p.outputs)["q_nope_out"] == (T, HQ, 0)
    assert not p.spec.q_nope_out and not p.spec.k_nope_out and p.spec.q_nope_dim == 0


def test_append_without_quantization_takes_the_cache_dtype():
    cache = desc((P, PS, HK, R + N), "bfloat16")
    p = plan("ap", cache0=cache, cache1=cache)
    assert p.spec.q_out_dtype == p.spec.kv_cache_dtype == "bfloat16"
    assert {dt for _, _, dt in p.outputs} == {"bfloat16"}


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_paged_cache_strides(layout):
    shape = (P, PS, HK, R + N) if layout == "NHD" else (P, HK, PS, R + N)
    cache = desc(shape, "float8_e4m3fn")
    p = plan("ap", call=dict(kv_layout=layout, quant_scale_q=0.5, quant_scale_kv=2.0),
             cache0=cache, cache1=cache)
    v = values(p)
    row = R + N
    entry, head = (HK * row, row) if layout == "NHD" else (row, PS * row)
    assert (v["krc_page"], v["krc_entry"], v["krc_head"], v["krc_off"]) == (PS * HK * row, entry, head, 0)
    assert (v["knc_entry"], v["knc_head"], v["knc_off"]) == (entry, head, R)
    assert (v["vc_page"], v["vc_entry"], v["vc_head"]) == (PS * HK * row, entry, head)
    assert (v["q_mul"], v["kc_mul"], v["vc_mul"]) == (0.5, 2.0, 2.0)
    assert (v["num_pages"], v["num_indices"], v["batch_size"]) == (P, P, B)
    s = p.spec
    assert (s.cache_mode, s.page_size, s.k_rope_cache, s.k_nope_cache, s.v_cache) == ("paged", PS, 0, 0, 1)
    assert s.k_rope_out == "none" and not s.q_inplace and s.q_nope_out and not s.k_nope_out


def test_append_paged_mla_caches():
    p = plan("ap_mla")
    v = values(p)
    s = p.spec
    assert (s.k_rope_cache, s.k_nope_cache, s.v_cache, s.num_k_heads) == (1, 0, -1, 1)
    assert (v["krc_page"], v["krc_entry"], v["krc_head"]) == (PS * R, R, 0)
    assert (v["knc_page"], v["knc_entry"], v["knc_off"]) == (PS * N, N, 0)
    assert (v["kr_st"], v["kr_sh"]) == (R, 0)


def test_vllm_mla_cache_row_is_latent_then_rotated_key():
    p = plan("mla")
    v = values(p)
    s = p.spec
    assert s.q_inplace and s.k_rope_out == "inplace" and s.cache_mode == "slots"
    assert s.page_size == BS and s.kv_cache_dtype == "float8_e4m3fn" and s.k_scale_on_device
    assert (v["krc_off"], v["knc_off"], v["krc_entry"], v["krc_page"]) == (L, 0, L + R, BS * (L + R))
    assert (v["num_slots"], v["num_pages"]) == (T, NB) and p.outputs == ()
    auto = plan("mla", call=dict(kv_cache_dtype="auto"), cache0=desc((NB, BS, L + R)))
    assert not auto.spec.k_scale_on_device and auto.spec.kv_cache_dtype == "bfloat16"


def test_vllm_kv_cache_partial_rotary_copies_the_rest_of_key():
    """rotary_dim (the cache width) < head_size: the key's pass-through part goes to the
    cache from key's own rows (offset = rotary dim), query's stays in place."""
    p = plan("kv", cos_sin_cache=desc((4096, 32), "float32"))
    v = values(p)
    s = p.spec
    assert s.rotary_dim == 32 and s.k_nope_in_k_rope and s.k_nope_dim == D - 32
    assert (v["kn_off"], v["knc_off"], v["kn_st"], v["kn_sh"]) == (32, 32, HK * D, D)
    assert (v["qr_st"], v["qr_sh"]) == (HQ * D, D) and s.q_nope_dim == 0
    full = plan("kv")
    assert full.spec.k_nope_cache == -1 and not full.spec.k_nope_in_k_rope


def test_vllm_kv_cache_scales():
    fp8 = dict(cache0=desc((NB, BS, HK, D), "uint8"), cache1=desc((NB, BS, HK, D), "uint8"))
    dev = plan("kv", call=dict(kv_cache_dtype="fp8"), k_scale=desc((1,), "float32"),
               v_scale=desc((1,), "float32"), **fp8)
    assert dev.spec.k_scale_on_device and dev.spec.v_scale_on_device
    host = plan("kv", call=dict(kv_cache_dtype="fp8", quant_scale_kv=0.25, quant_scale_v=4.0), **fp8)
    assert (values(host)["kc_mul"], values(host)["vc_mul"]) == (0.25, 4.0)
    # "auto": the values are stored as they are, scales or not
    auto = plan("kv", call=dict(quant_scale_kv=0.25), k_scale=desc((1,), "float32"))
    assert values(auto)["kc_mul"] == 1.0 and not auto.spec.k_scale_on_device


def test_sglang_buffer_is_one_entry_per_slot():
    p = plan("buf", cache0=desc((50, HK, D), "float8_e4m3fn"), cache1=desc((50, HK * D), "float8_e4m3fn"),
             call=dict(quant_scale_kv=0.5))
    v = values(p)
    assert p.spec.page_size == 1 and (v["krc_page"], v["krc_head"]) == (HK * D, D)
    assert (v["vc_page"], v["vc_head"], v["num_pages"]) == (HK * D, D, 50)
    assert v["kc_mul"] == 0.5 and v["vc_mul"] == 1.0


def test_on_the_fly_values():
    p = plan("rq", cos_sin_cache=None, call=dict(frequencies=frequencies_json(5e5, 2.0)))
    v = values(p)
    assert p.spec.cache_dtype is None and v["inv_scale"] == 0.5 and v["max_position"] == 0
    y = plan("kv", cos_sin_cache=None, call=dict(rotary_dim=64, frequencies=frequencies_json(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})))
    assert y.spec.scaling == "yarn" and y.spec.rotary_dim == 64


def test_index_dtypes_are_specialized():
    p = plan("ap", pos_ids=desc((T,), "int32"), batch_indices=desc((T,), "int64"),
             positions=desc((T,), "int32"), kv_indices=desc((P,), "int64"), kv_indptr=desc((B + 1,), "int32"))
    assert p.spec.index_dtypes == ("int32", "int64", "int32", "int64", "int32")
    assert plan("kv", slot_mapping=desc((T,), "int32")).spec.index_dtypes[1] == "int32"


def test_strided_views_of_a_fused_buffer():
    """q_rope/q_nope as slices of one [T, H, R + N] buffer (FlashInfer's test layout)."""
    row = R + N
    p = plan("rq", q_rope=desc((T, HQ, R), strides=(HQ * row, row, 1)),
             q_nope=desc((T, HQ, N), strides=(HQ * row, row, 1), ptr=BASE + 2 * R))
    v = values(p)
    assert (v["qr_st"], v["qr_sh"], v["qn_st"], v["qn_sh"]) == (HQ * row, row, HQ * row, row)
    assert p.spec.vec == 8


def test_zero_tokens_still_validated_and_allocated():
    p = plan("rq", **{f: desc((0,) + d.shape[1:], d.dtype) for f, d in base_arrays("rq")[1].items()
                      if f != "cos_sin_cache"})
    assert p.spec is None and len(p.outputs) == 4
    with pytest.raises(ValueError, match="k_rope"):
        plan("rq", q_rope=desc((0, HQ, R)), k_rope=desc((0, HK, R + 2)), pos_ids=desc((0,), "int64"))


# ------------------------------------------------------------------ vector widths

VEC_CASES = [
    ("aligned", {}, 8),
    ("q-misaligned-8B", dict(q_rope=desc((T, HQ, R), ptr=BASE + 8)), 4),
    ("k-odd-element", dict(k_rope=desc((T, HK, R), ptr=BASE + 2)), 1),
    ("nope-width-4", dict(q_nope=desc((T, HQ, 4)), q_nope_out=None), 4),
    ("fp32-outputs", dict(call=dict(quantize_dtype="float32")), 4),
    ("out-misaligned", dict(q_rope_out=desc((T, HQ, R), "float8_e4m3fn", ptr=BASE + 4)), 4),
    ("token-stride-2", dict(k_rope=desc((T, HK, R), strides=(HK * R + 2, R, 1))), 2),
]


@pytest.mark.parametrize("overrides, want", [c[1:] for c in VEC_CASES], ids=[c[0] for c in VEC_CASES])
def test_vector_width(overrides, want):
    assert plan("rq", **overrides).spec.vec == want


def test_vector_width_follows_the_cache():
    cache = desc((P, PS, HK, R + N), "float8_e4m3fn", ptr=BASE + 4)
    assert plan("ap", cache0=cache).spec.vec == 4
    assert plan("kv", cache0=desc((NB, BS, HK, D), strides=(BS * HK * 100, HK * 100, 100, 1))).spec.vec == 4


def test_widest_vec_checks_each_type():
    assert widest_vec(2, [64, 128], [(BASE, 2), (BASE + 8, 1)]) == 8
    assert widest_vec(2, [64], [(BASE, 2), (BASE + 4, 1)]) == 4
    assert widest_vec(2, [64], [(0, 4)]) == 4   # a float32 output: at most 4 per 16 bytes
    assert widest_vec(4, [6], [(BASE, 4)]) == 2


# ------------------------------------------------------------------ launch

@pytest.mark.parametrize("tokens", [1, 7, 128, 1000, 8192, 32768])
@pytest.mark.parametrize("items", [12, 448, 2628, 9000])
@pytest.mark.parametrize("chunks", [0, 4, 8, 6])
@pytest.mark.parametrize("cap, batches", [(ITEM_BATCH, THREAD_BATCHES), (8, 1), (2, 1), (1, 3)])
def test_launch_covers_every_item_of_every_token(tokens, items, chunks, cap, batches):
    fl = choose_fused_launch(tokens, items, 32, 132, chunks, batch_cap=cap,
                             thread_batches=batches)
    launch, split = fl.launch, fl.split_items
    lanes, block_tokens, _ = launch.block
    gx, splits, _ = launch.grid
    assert gx * block_tokens >= tokens and splits * split >= items
    assert (splits - 1) * split < items  # no empty split
    few = items <= 4 * FEW_BLOCK_THREADS and tokens * items <= 132 * FEW_BLOCK_THREADS
    threads = max(BLOCK_THREADS, FEW_BLOCK_THREADS) if few else BLOCK_THREADS
    assert lanes & (lanes - 1) == 0 and 32 <= lanes <= threads
    assert lanes * block_tokens <= threads and 1 <= block_tokens <= 16
    # a thread does at most `batches` batches of item_batch items, item_batch a power of
    # two up to the cap, no larger than what a thread does (few tokens: a lean kernel)
    per_thread = -(-split // lanes)
    assert per_thread <= cap * batches and fl.item_batch <= cap
    assert fl.item_batch & (fl.item_batch - 1) == 0
    assert fl.item_batch == min(cap, 1 << (per_thread - 1).bit_length()) or per_thread < fl.item_batch
    # cos/sin in registers exactly when every thread's rotated items are one chunk: the
    # lanes and each block's first item are multiples of the chunks; else the shared tile
    assert fl.cos_sin_in_regs == (chunks in (4, 8))
    if fl.cos_sin_in_regs:
        assert lanes % chunks == 0 and split % chunks == 0 and launch.smem == 0
    else:
        assert launch.smem == block_tokens * 32 * 8


def test_few_tokens_spread_over_the_gpu():
    """One decode token of DeepSeek-V3 MLA shapes: many blocks, one item per thread, the
    one-item kernel."""
    fl = choose_fused_launch(1, 2628, 32, 132, batch_cap=8)
    assert fl.launch.grid[1] >= 10 and fl.split_items <= fl.launch.block[0]
    assert fl.item_batch == 1
    fl = choose_fused_launch(32768, 2628, 32, 132, batch_cap=4, thread_batches=1,
                             block_threads=256)
    assert fl.launch.grid[1] == 3 and -(-fl.split_items // fl.launch.block[0]) == 4
    fl = choose_fused_launch(32768, 2628, 32, 132, batch_cap=2, thread_batches=4,
                             block_threads=128)  # 4 batches of 2 items a thread
    assert fl.launch.grid[1] == 3 and -(-fl.split_items // fl.launch.block[0]) == 7
    assert fl.item_batch == 2


def test_few_tokens_of_few_items_take_larger_blocks():
    """Llama-3-8B's paged append (768 items a token): 256-thread blocks, three a token, at 1
    and 16 tokens; 128 again once the grid would pass one block an SM (128 tokens) and for
    a token of many items (DeepSeek-V3 absorbed MLA, 9288)."""
    for tokens in (1, 16):
        fl = choose_fused_launch(tokens, 768, 64, 132, 8)
        assert fl.launch.block[0] == FEW_BLOCK_THREADS == 256 and fl.launch.grid == (tokens, 3, 1)
        assert fl.item_batch == 1 and fl.cos_sin_in_regs
    assert choose_fused_launch(128, 768, 64, 132, 8).launch.block[0] == BLOCK_THREADS
    assert choose_fused_launch(1, 9288, 32, 132, 4).launch.block[0] == BLOCK_THREADS
    off = choose_fused_launch(16, 768, 64, 132, 8, few_block_threads=0)
    assert off.launch.block[0] == BLOCK_THREADS and off.launch.grid == (16, 6, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_knobs_follow_the_call(kind):
    """The batch of ITEM_BATCH items for many tokens, of one for few; cos/sin in registers with a cache when the
    chunks (R/2 / vec: 4 here, 6 for the head of 96 of "kv" and "buf") divide the lanes,
    else and on the fly the shared tile."""
    p = plan(kind)
    big = plan(kind, **{f: desc((1 << 16,) + d.shape[1:], d.dtype) for f, d in
                        base_arrays(kind)[1].items() if d.shape and d.shape[0] == T})
    assert big.spec.item_batch == ITEM_BATCH
    assert p.spec.item_batch == 1  # few tokens: the one-item kernel
    chunks = p.spec.rotary_dim // 2 // p.spec.vec
    assert chunks == (6 if kind in ("kv", "buf") else 4)
    assert p.spec.cos_sin_in_regs == (chunks == 4) and (p.launch.smem == 0) == (chunks == 4)
    fly = plan(kind, call=dict(frequencies=frequencies_json()),
               cos_sin_cache=None)
    assert not fly.spec.cos_sin_in_regs and fly.launch.smem > 0


@pytest.mark.parametrize("kind", KINDS)
def test_enable_pdl_reaches_the_kernel(kind):
    """enable_pdl: a PDL kernel (its wait comes before any read), the same launch."""
    plain, pdl = plan(kind), plan(kind, call=dict(pdl=True))
    assert pdl.spec == replace(plain.spec, pdl=True) and pdl.launch == plain.launch
    assert "constexpr bool PDL = true;" in pdl.spec.prelude()
    assert "constexpr bool PDL = false;" in plain.spec.prelude()


def test_fused_items_match_the_kernel_layout():
    s = plan("rq_mla").spec                     # 4 q heads + 1 k head, R=64 at vec 8
    assert fused_items(s) == (5 * 4, 5 * 4 + HQ * N // 8 + L // 8)
    s = plan("ap").spec
    assert fused_items(s) == (6 * 4, 6 * 4 + HQ * N // 8 + HK * N // 8 + HK * (R + N) // 8)


# ------------------------------------------------------------------ QK RMSNorm + RoPE

def qk(*, call=(4, 2, 2, 128, 1e-6, True), **arrays):
    c = qk_norm_rope_call(*call)
    hq, hk, hv, d = call[:4]
    base = dict(qkv=desc((T, (hq + hk + hv) * d)), q_weight=desc((d,)), k_weight=desc((d,)),
                position_ids=desc((T,), "int64"), cos_sin_cache=desc((4096, d), "float32"))
    base.update(arrays)
    return plan_qk_norm_rope(c, QKNormRopeArrays(**base))


QK_ERRORS = [
    ("qkv-fp32", dict(qkv=desc((T, 8 * 128), "float32")), TypeError, r"^qkv: expected dtype float16 or bfloat16, got float32"),
    ("qkv-3d", dict(qkv=desc((T, 8, 128))), ValueError, r"^qkv: expected shape \[num_tokens, \(num_heads_q"),
    ("qkv-width", dict(qkv=desc((T, 7 * 128))), ValueError, r"^qkv: last dim 896 must equal \(num_heads_q \+ num_heads_k \+ num_heads_v\) \* head_dim = 1024"),
    ("qkv-strided", dict(qkv=desc((T, 1024), strides=(2048, 2))), ValueError, r"^qkv: the last dim must be contiguous"),
    ("qkv-host", dict(qkv=desc((T, 1024), device=HOST)), TypeError, r"^qkv: expected a CUDA device array"),
    ("weight-shape", dict(k_weight=desc((64,))), ValueError, r"^k_weight: expected shape \[head_dim\] = \[128\], got \[64\]"),
    ("weight-none", dict(q_weight=None), TypeError, r"^q_weight: expected a float16, bfloat16 or float32 array, got None"),
    ("weight-dtypes", dict(k_weight=desc((128,), "float32")), TypeError, r"^k_weight: dtype float32 differs from q_weight dtype bfloat16"),
    ("weight-device", dict(q_weight=ArrayDesc(BASE, (128,), (1,), "bfloat16", 2)), ValueError, r"^q_weight is on cuda:2 but qkv is on cuda:0"),
    ("positions-short", dict(position_ids=desc((2,), "int64")), ValueError, r"^position_ids: expected a 1-D array of at least 6 entries"),
    ("positions-float", dict(position_ids=desc((T,), "float32")), TypeError, r"^position_ids: expected dtype int32 or int64"),
    ("cache-too-wide", dict(cos_sin_cache=desc((4096, 130), "float32")), ValueError, r"^cos_sin_cache width \(rotary_dim\): 130 exceeds the head size 128"),
    ("cache-odd", dict(cos_sin_cache=desc((4096, 63), "float32")), ValueError, r"^cos_sin_cache width \(rotary_dim\): expected a positive even number, got 63"),
    ("cache-int", dict(cos_sin_cache=desc((4096, 128), "int64")), TypeError, r"^cos_sin_cache: expected dtype float16 or bfloat16 or float32"),
]


@pytest.mark.parametrize("overrides, exc, match", [e[1:] for e in QK_ERRORS], ids=[e[0] for e in QK_ERRORS])
def test_qk_norm_rope_invalid(overrides, exc, match):
    with pytest.raises(exc, match=match):
        qk(**overrides)


def test_qk_norm_rope_rotary_dim_errors():
    with pytest.raises(ValueError, match=r"^cos_sin_cache: width 128 must equal rotary_dim 64"):
        qk(call=(4, 2, 2, 128, 1e-6, True, None, 64))
    with pytest.raises(ValueError, match=r"^rotary_dim: 256 exceeds the head size 128"):
        qk(call=(4, 2, 2, 128, 1e-6, True, frequencies_json(), 256), cos_sin_cache=None)
    with pytest.raises(ValueError, match=r"^cos_sin_cache: pass either"):
        qk(call=(4, 2, 2, 128, 1e-6, True, frequencies_json(), None))
    with pytest.raises(ValueError, match=r"^head_dim: 1024 needs 32 vector accesses per thread at vector width 1"):
        qk(call=(1, 1, 0, 1024, 1e-6, True), qkv=desc((T, 2048), ptr=BASE + 2), q_weight=desc((1024,)),
           k_weight=desc((1024,)), cos_sin_cache=desc((4096, 1024), "float32"))


@pytest.mark.parametrize("head, rot", [(64, 64), (80, 80), (128, 128), (128, 64), (256, 256),
                                       (512, 512), (512, 64), (96, 32), (66, 66), (2, 2)])
def test_qk_norm_rope_launch(head, rot):
    p = qk(call=(8, 3, 3, head, 1e-6, False), qkv=desc((T, 14 * head)), q_weight=desc((head,)),
           k_weight=desc((head,), "bfloat16"), cos_sin_cache=desc((4096, rot), "bfloat16"))
    s, (lanes, block_heads, block_tokens) = p.spec, p.launch.block
    assert s.head_dim == head and s.rotary_dim == rot and lanes == s.lanes
    assert lanes & (lanes - 1) == 0 and lanes <= 32 and (lanes * block_heads) % 32 == 0
    assert p.launch.grid[1] * block_heads >= 11 and p.launch.grid[0] * block_tokens >= T
    chunks, pass_vecs = rot // 2 // s.vec, (head - rot) // s.vec
    assert 2 * -(-chunks // lanes) + -(-pass_vecs // lanes) <= 16
    assert s.cos_sin_in_regs and p.launch.smem == 0  # few tokens, a cache: no shared memory
    big = qk(call=(8, 3, 3, head, 1e-6, False), qkv=desc((1 << 16, 14 * head)),
             q_weight=desc((head,)), k_weight=desc((head,), "bfloat16"),
             position_ids=desc((1 << 16,), "int64"), cos_sin_cache=desc((4096, rot), "bfloat16"))
    assert not big.spec.cos_sin_in_regs  # many: the shared tile (registers cost more)
    assert big.launch.smem == 2 * head * 4 + big.launch.block[2] * rot // 2 * 8
    v = dict(zip(QK_NORM_ROPE_PARAMS.static_names, p.static))
    assert (v["eps"], v["token_stride"], v["max_position"]) == (1e-6, 14 * head, 4096)


def test_qk_norm_rope_forced_token_heads_per_warp():
    """vLLM's forced_token_heads_per_warp N > 0: N (token, head) rows a warp, 32 / N threads
    a row (the kernel's LANES); <= 0 is the planner's choice (-1 in the call, one plan)."""
    auto = qk().spec.lanes
    for n in (1, 2, 4, 8, 16):
        p = qk(call=(4, 2, 2, 128, 1e-6, True, None, None, n))
        lanes, block_heads, _ = p.launch.block
        assert p.spec.lanes == lanes == 32 // n and (lanes * block_heads) % 32 == 0
    for n in (0, -1, -7):
        assert qk_norm_rope_call(4, 2, 2, 128, 1e-6, True, None, None, n).token_heads_per_warp == -1
        assert qk(call=(4, 2, 2, 128, 1e-6, True, None, None, n)).spec.lanes == auto
    # one thread a 128-wide head at vector width 8: 16 vector accesses, the most allowed
    assert qk(call=(4, 2, 2, 128, 1e-6, True, None, None, 32)).spec.lanes == 1
    with pytest.raises(ValueError, match=r"^forced_token_heads_per_warp: 32 leaves 1 threads for a "
                                         r"head of 256: 32 vector accesses each"):
        qk(call=(4, 2, 2, 256, 1e-6, True, None, None, 32), qkv=desc((T, 8 * 256)),
           q_weight=desc((256,)), k_weight=desc((256,)), cos_sin_cache=desc((4096, 256), "float32"))


def test_qk_norm_rope_on_the_fly_and_strided_rows():
    p = qk(call=(4, 2, 2, 128, 1e-5, True, frequencies_json(1e6), 64), cos_sin_cache=None,
           qkv=desc((T, 1024), strides=(1100, 1)))
    v = dict(zip(QK_NORM_ROPE_PARAMS.static_names, p.static))
    assert p.spec.cache_dtype is None and p.spec.rotary_dim == 64 and p.spec.vec == 4
    assert not p.spec.cos_sin_in_regs  # on the fly: the shared tile of weights and cos/sin
    assert p.launch.smem == 2 * 128 * 4 + p.launch.block[2] * 64 // 2 * 8
    assert v["token_stride"] == 1100 and v["max_position"] == 0
    assert qk(qkv=desc((0, 1024))).spec is None


# ------------------------------------------------------------------ the argument structs

# What a decode call of each function reads of FusedRopeParams (kernels/rope_fused.cu; the
# sets SASS of sm_90 builds showed): the token test, the position, the cos/sin row, the
# q/k/v item addressing (v's even without v) and the q multiplier, then each function's own.
_EVERY = ("num_tokens", "split_items", "pos_stride", "pos_ids", "cos_sin_cache", "max_position",
          "cache_stride", "q_rope", "k_rope", "v", "qr_st", "qr_sh", "kr_st", "kr_sh", "v_st",
          "v_sh", "q_mul")
_SLOTS = ("num_slots", "slot_stride", "slot_mapping", "num_pages", "cache0", "kc_mul",
          "krc_page", "krc_entry", "krc_head", "krc_off")
_V_CACHE = ("cache1", "vc_mul", "vc_page", "vc_entry", "vc_head")
_K_NOPE = ("k_nope", "kn_st", "kn_sh", "kn_off")
_K_NOPE_CACHE = ("knc_page", "knc_entry", "knc_head", "knc_off")
_Q_OUT = ("q_nope", "qn_st", "qn_sh", "q_rope_out", "q_nope_out", "qro_st", "qro_sh",
          "qno_st", "qno_sh")
_PAGED = ("batch_stride", "positions_stride", "batch_indices", "positions", "batch_size",
          "kv_indptr", "kv_indptr_stride", "num_indices", "kv_indices", "kv_indices_stride",
          "num_pages", "cache0", "kc_mul", "krc_page", "krc_entry", "krc_head", "krc_off")
# (what it reads, the 64-byte lines that holds at most)
_DECODE_READS = {
    "vLLM / SGLang KV cache": (_EVERY + _SLOTS + _V_CACHE + ("k_mul", "k_scale", "v_scale"), 5),
    "vLLM MLA cache": (_EVERY + _SLOTS + _K_NOPE + _K_NOPE_CACHE + ("k_mul", "k_scale"), 6),
    "rope_quantize_fp8": (_EVERY + _K_NOPE + _Q_OUT + (
        "k_mul", "k_rope_out", "k_nope_out", "kro_st", "kro_sh", "kno_st", "kno_sh"), 7),
    "append paged": (_EVERY + _PAGED + _V_CACHE + _K_NOPE + _K_NOPE_CACHE + _Q_OUT, 9),
}


def _lines(params, names) -> set:
    """The constant-bank lines of struct fields on sm_90 (arguments at c[0x0][0x210])."""
    return {(0x210 + 8 * params.names.index(n)) // 64 for n in names}


@pytest.mark.parametrize("params, hot", [
    (FUSED_ROPE_PARAMS, ("num_tokens", "split_items", "pos_stride", "pos_ids", "num_slots",
                         "slot_stride")),
    (QK_NORM_ROPE_PARAMS, ("num_tokens", "token_stride", "qkv", "pos_stride", "position_ids",
                           "cos_sin_cache")),
], ids=["rope_fused", "qk_norm_rope"])
def test_fused_argument_struct_layout_and_packing(params, hot):
    """As tests/test_plan.py's for the plain kernel: what a decode call reads first (the
    token test, the first row or index loads) shares the first 64-byte constant-cache line
    on sm_90; the pointers are contiguous, packed alone at pointer_offset (in the struct's
    order, which the warm path maps the arrays onto by name); the plan's values fill the
    rest, in static_names order."""
    assert _lines(params, hot) == {0x210 // 64}
    first = params.pointer_offset // 8
    assert params.names[first:first + len(params.pointers)] == params.pointers
    assert set(params.static_names).isdisjoint(params.pointers)
    assert len(params.static_names) + len(params.pointers) == len(params.names)
    static = tuple(range(1, len(params.static_names) + 1))  # distinct values (doubles too)
    pointers = tuple(1000 + i for i in range(len(params.pointers)))
    fields = dict(zip(params.names, params.packer.unpack(params.pack(pointers, static))))
    assert all(fields[n] == v for n, v in zip(params.pointers, pointers))
    assert all(fields[n] == v for n, v in zip(params.static_names, static))


@pytest.mark.parametrize("function", _DECODE_READS)
def test_fused_decode_reads_few_constant_lines(function):
    """Each function's decode call reads its fields from few 64-byte lines (specs_fused)."""
    reads, most = _DECODE_READS[function]
    assert set(reads) <= set(FUSED_ROPE_PARAMS.names)
    assert len(_lines(FUSED_ROPE_PARAMS, reads)) <= most


def test_qk_norm_rope_decode_reads_two_constant_lines():
    """With a cos/sin cache, every field but the on-the-fly frequencies: two lines."""
    reads = [n for n in QK_NORM_ROPE_PARAMS.names if n not in ROPE_FREQ]
    assert len(_lines(QK_NORM_ROPE_PARAMS, reads)) == 2


def test_plans_fill_the_struct_by_name():
    """The plans' static values land in the fields of their names (the planner produces
    them in static_names order, whatever the struct's order)."""
    v = values(plan("ap"))
    assert (v["num_tokens"], v["batch_size"], v["max_position"]) == (T, B, 4096)
    assert v["q_mul"] == 1.0 and v["kc_mul"] == 1.0
    q = dict(zip(QK_NORM_ROPE_PARAMS.static_names, qk().static))
    assert (q["num_tokens"], q["token_stride"], q["eps"]) == (T, 8 * 128, 1e-6)
