"""The fused kernels run on the CPU (tests/host_emulator.py: the exact rendered source as
host C++ under an emulation of CUDA's threads, blocks and barriers), planned by the real
planner, against the float64 reference: every public function's mapping (what is rotated,
quantized and written where), padding and guard entries, several items per thread and
item splits (planned for a 1-SM GPU), both styles, caches and on the fly. Needs g++, not a
GPU; the GPU suite repeats these checks on the hardware (tests/test_gpu_fused*.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import host_emulator as emu
from fused_checks import (assert_fp8_close, assert_only_rows_written, assert_ulp_close,
                          head_magnitude, paged_batch, pair_magnitude, rows_at, slot_mapping)
from rope_jit import reference
from rope_jit.call import frequencies_json
from rope_jit.call_fused import (APPEND_PAGED, KV_BUFFER, KV_CACHE, MLA_CACHE, ROPE_QUANTIZE,
                                 fused_rope_call, qk_norm_rope_call)
from rope_jit.dtypes import numpy_dtype
from rope_jit.plan_fused import (FusedRopeArrays, QKNormRopeArrays, plan_qk_norm_rope,
                                 plan_rope_fused)
from rope_jit.specs_fused import FUSED_ROPE_POINTERS, QK_NORM_ROPE_POINTERS

pytestmark = pytest.mark.skipif(not emu.available(), reason="needs g++ to emulate the kernels")

MAX_POS = 4096
FP8 = ("float8_e4m3fn", "float8_e5m2")
CALL = dict(frequencies=None, head_size=None, rotary_dim=None, quantize_dtype=None,
            quant_scale_q=1.0, quant_scale_kv=1.0, quant_scale_v=1.0, page_size=0,
            kv_layout="NHD", kv_cache_dtype="auto")


def call_of(op, is_neox, **kw):
    return fused_rope_call(op, is_neox, *dict(CALL, **kw).values())


def rand(rng, shape, dtype, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(numpy_dtype(dtype))


def poisoned(shape, dtype):
    a = np.empty(shape, dtype=numpy_dtype(dtype))
    a.view(np.uint8).fill(0x7F)
    return a


def guarded(rng, shape, dtype):
    a = np.empty(shape, dtype=numpy_dtype(dtype))
    a.view(np.uint8)[...] = rng.integers(0, 256, a.view(np.uint8).shape, dtype=np.uint8)
    return a


def f64(a, fmt=None):
    return (a.view(numpy_dtype(fmt)) if fmt else a).astype(np.float64)


def check(got, ref, dtype, what, mag=None, fmt=None):
    fmt = fmt or (dtype if dtype in FP8 else None)
    if fmt:
        assert_fp8_close(f64(got, fmt if got.dtype == np.uint8 else None), ref, fmt, what, mag)
    else:
        assert_ulp_close(f64(got), ref, dtype, what, mag)


def run(call, arrays: dict, num_sms=132) -> dict:
    """Plan the call on host arrays (as if on device 0), allocate (poisoned) the outputs
    the plan allocates, run the kernel under emulation; returns the arrays."""
    arrays = dict(arrays)
    plan = plan_rope_fused(call, FusedRopeArrays(**{f: emu.desc(v) for f, v in arrays.items()}),
                           num_sms=num_sms)
    for field, shape, dtype in plan.outputs:
        arrays[field] = poisoned(shape, dtype)
    emu.run(plan, [emu.pointer(arrays.get(f)) for f in FUSED_ROPE_POINTERS])
    return arrays


def cos_sin(rng, rot, pos, cache_dtype, theta=1e4):
    """(cache or None, cos, sin) for positions pos: the reference reads the cache's values."""
    if cache_dtype is None:
        return (None, *reference.cos_sin(pos, reference.inv_frequencies(rot, theta)))
    cache = reference.round_to(reference.cos_sin_cache(rot, MAX_POS, base=theta), cache_dtype)
    return (cache, *reference.cos_sin_from_cache(cache, pos))


RQ = [  # attention, heads q/k, rope, q nope, k nope, dtype, output, neox, cos/sin, tokens, SMs
    ("gqa", 4, 2, 64, 32, 32, "bfloat16", "float8_e4m3fn", True, "float32", 9, 132),
    ("mla", 8, 1, 32, 64, 128, "float16", "float8_e5m2", False, "bfloat16", 5, 1),
    ("mha", 3, 3, 16, 0, 0, "bfloat16", "float8_e4m3fn", False, None, 40, 1),
    ("gqa", 2, 1, 24, 8, 8, "float32", "bfloat16", True, "float16", 6, 132),
]


@pytest.mark.parametrize("case", RQ, ids=[f"{c[0]}-{c[6]}-{c[7]}-{'neox' if c[8] else 'gptj'}-"
                                          f"{c[9] or 'fly'}-sms{c[11]}" for c in RQ])
def test_rope_quantize(case):
    attn, hq, hk, rot, nq, nk, dtype, out, neox, cdt, T, sms = case
    rng = np.random.default_rng(len(RQ) + T)
    mla = attn == "mla"
    q = rand(rng, (T, hq, rot + nq), dtype)
    k = rand(rng, (T, rot + nk) if mla else (T, hk, rot + nk), dtype, 40.0)  # saturates e4m3
    pos = rng.integers(0, MAX_POS, T)
    cache, cos, sin = cos_sin(rng, rot, pos, cdt, 5e5)
    call = call_of(ROPE_QUANTIZE, neox, quantize_dtype=out, quant_scale_q=0.5, quant_scale_kv=4.0,
                   frequencies=None if cdt else frequencies_json(5e5))
    a = run(call, dict(q_rope=q[..., :rot], k_rope=k[..., :rot], q_nope=q[..., rot:] if nq else None,
                       k_nope=k[..., rot:] if nk else None, pos_ids=pos, cos_sin_cache=cache), sms)
    q64, k64 = f64(q), f64(k)
    ref = reference.rope_quantize(q64[..., :rot], k64[..., :rot], q64[..., rot:] if nq else None,
                                  k64[..., rot:] if nk else None, cos, sin, neox, 0.5, 4.0)
    check(a["q_rope_out"], ref[0], out, "q_rope_out", 0.5 * pair_magnitude(q64[..., :rot], neox))
    check(a["k_rope_out"], ref[1], out, "k_rope_out", 4.0 * pair_magnitude(k64[..., :rot], neox))
    if nq:
        check(a["q_nope_out"], ref[2], out, "q_nope_out")
        check(a["k_nope_out"], ref[3], out, "k_nope_out")
    else:
        assert a["q_nope_out"].shape == (T, hq, 0) and a["k_nope_out"].shape == (T, hk, 0)


PAGED = [  # attention, layout, page size, dtype, cache dtype, neox, heads q/k, rope, nope, SMs
    ("gqa", "NHD", 4, "bfloat16", "float8_e4m3fn", True, 4, 2, 32, 32, 132),
    ("gqa", "HND", 5, "float16", "float8_e5m2", False, 2, 2, 16, 0, 1),
    ("gqa", "NHD", 1, "bfloat16", "bfloat16", False, 4, 1, 32, 16, 1),
    ("mla", "NHD", 3, "bfloat16", "float8_e4m3fn", True, 4, 1, 16, 64, 132),
]


@pytest.mark.parametrize("case", PAGED, ids=[f"{c[0]}-{c[1]}-ps{c[2]}-{c[4]}-sms{c[10]}" for c in PAGED])
def test_append_paged(case):
    attn, layout, ps, dtype, cdt, neox, hq, hk, rot, nope, sms = case
    rng = np.random.default_rng(ps)
    mla = attn == "mla"
    total, indices, indptr, batch, ppos = paged_batch(ps, ps)
    T = batch.size
    q = rand(rng, (T, hq, rot + nope), dtype)
    k = rand(rng, (T, rot + nope) if mla else (T, hk, rot + nope), dtype)
    v = None if mla else rand(rng, (T, hk, rot + nope), dtype)
    pos = rng.integers(0, MAX_POS, T)
    cache, cos, sin = cos_sin(rng, rot, pos, "float32")
    if mla:
        caches = (guarded(rng, (total, ps, nope), cdt), guarded(rng, (total, ps, rot), cdt))
    else:
        shape = (total, ps, hk, rot + nope) if layout == "NHD" else (total, hk, ps, rot + nope)
        caches = (guarded(rng, shape, cdt), guarded(rng, shape, cdt))
    before = [c.copy() for c in caches]
    skv = 0.25 if cdt in FP8 else 1.0
    call = call_of(APPEND_PAGED, neox, quant_scale_q=2.0 if cdt in FP8 else 1.0, quant_scale_kv=skv,
                   page_size=ps, kv_layout=layout)
    i32 = np.int32
    a = run(call, dict(q_rope=q[..., :rot], k_rope=k[..., :rot], q_nope=q[..., rot:] if nope else None,
                       k_nope=k[..., rot:] if nope else None, v=v, cache0=caches[0], cache1=caches[1],
                       pos_ids=pos, cos_sin_cache=cache, batch_indices=batch.astype(i32),
                       positions=ppos.astype(np.int64), kv_indices=indices.astype(i32),
                       kv_indptr=indptr.astype(np.int64)), sms)
    real = batch >= 0
    q64, k64 = f64(q), f64(k)
    sq = 2.0 if cdt in FP8 else 1.0
    ref = reference.rope_quantize(q64[..., :rot], k64[..., :rot], q64[..., rot:] if nope else None,
                                  k64[..., rot:] if nope else None, cos, sin, neox, sq, skv)
    check(a["q_rope_out"][real], ref[0][real], cdt, "q_rope_out",
          sq * pair_magnitude(q64[..., :rot], neox)[real])
    assert (a["q_rope_out"][~real].view(np.uint8) == 0x7F).all(), "padding tokens' q written"
    pages, entries = reference.paged_locations(batch, ppos, indptr, indices, ps)
    pages, entries = pages[real], entries[real]
    for c, b, name in zip(caches, before, ("paged_kv_cache[0]", "paged_kv_cache[1]")):
        assert_only_rows_written(c, b, pages, entries, layout, name)
    kmag = skv * pair_magnitude(k64[..., :rot], neox)[real]
    if mla:
        check(rows_at(caches[1], pages, entries), ref[1][real], cdt, "kpe_cache", kmag)
        check(rows_at(caches[0], pages, entries), ref[3][real], cdt, "ckv_cache")
        return
    krows, vrows = rows_at(caches[0], pages, entries, layout), rows_at(caches[1], pages, entries, layout)
    check(krows[..., :rot], ref[1][real], cdt, "k_cache rope part", kmag)
    if cdt in FP8:
        check(vrows, f64(v)[real] * skv, cdt, "v_cache")
    else:
        assert np.array_equal(vrows.view(np.uint16), v[real].view(np.uint16))
        assert np.array_equal(krows[..., rot:].view(np.uint16), k[real][..., rot:].view(np.uint16))


@pytest.mark.parametrize("kv_dtype, bs, short", [("fp8", 4, 1), ("auto", 1, 0)])
def test_vllm_mla_cache(kv_dtype, bs, short):
    rng = np.random.default_rng(bs)
    T, hq, rot, lora, nb = 11, 4, 32, 64, 8
    q_pe, k_pe, kv_c = rand(rng, (T, hq, rot), "bfloat16"), rand(rng, (T, rot), "bfloat16"), rand(rng, (T, lora), "bfloat16")
    q64, k64, c64 = f64(q_pe), f64(k_pe), f64(kv_c)
    pos = rng.integers(0, MAX_POS, T)
    cache, cos, sin = cos_sin(rng, rot, pos, "bfloat16")
    kv_cache = guarded(rng, (nb, bs, lora + rot), "uint8" if kv_dtype == "fp8" else "bfloat16")
    before = kv_cache.copy()
    slots = slot_mapping(T, nb * bs, bs, skipped=(2,), short=short)
    scale = np.array([0.5], np.float32)
    run(call_of(MLA_CACHE, False, kv_cache_dtype=kv_dtype),
        dict(q_rope=q_pe, k_rope=k_pe, k_nope=kv_c, cache0=kv_cache, pos_ids=pos, cos_sin_cache=cache,
             slot_mapping=slots, k_scale=scale))
    k_ref = reference.apply_rotary(k64[:, None], cos, sin, False)[:, 0]
    check(q_pe, reference.apply_rotary(q64, cos, sin, False), "bfloat16", "q_pe", pair_magnitude(q64, False))
    check(k_pe, k_ref, "bfloat16", "k_pe", pair_magnitude(k64, False))
    blocks, entries = reference.slot_locations(slots, bs, T)
    cached = blocks >= 0
    blocks, entries = blocks[cached], entries[cached]
    assert_only_rows_written(kv_cache, before, blocks, entries, "NHD", "kv_cache")
    rows = rows_at(kv_cache, blocks, entries)
    if kv_dtype == "fp8":
        check(rows[:, :lora], c64[cached] / 0.5, None, "latent", fmt="float8_e4m3fn")
        check(rows[:, lora:], k_ref[cached] / 0.5, None, "rope", pair_magnitude(k64, False)[cached] / 0.5,
              fmt="float8_e4m3fn")
    else:
        assert np.array_equal(rows[:, :lora].view(np.uint16), kv_c[cached].view(np.uint16))
        assert np.array_equal(rows[:, lora:].view(np.uint16), k_pe[cached].view(np.uint16))


@pytest.mark.parametrize("kv_dtype, rot, neox", [("fp8_e5m2", 16, True), ("auto", 32, False)])
def test_vllm_kv_cache_split_views(kv_dtype, rot, neox):
    rng = np.random.default_rng(rot)
    T, hq, hk, head, nb, bs = 9, 4, 2, 32, 4, 8
    qkv = rand(rng, (T, (hq + 2 * hk) * head + 8), "bfloat16")
    before_qkv = qkv.copy()
    query, key = qkv[:, :hq * head], qkv[:, hq * head:(hq + hk) * head]
    value = qkv[:, (hq + hk) * head:(hq + 2 * hk) * head]
    q64, k64 = f64(query).reshape(T, hq, head), f64(key).reshape(T, hk, head)
    pos = rng.integers(0, MAX_POS, T).astype(np.int32)
    cache, cos, sin = cos_sin(rng, rot, pos, "float32")
    fp8 = kv_dtype != "auto"
    kv = guarded(rng, (nb, hk, bs, 2 * head), "uint8" if fp8 else "bfloat16")
    key_cache, value_cache = np.swapaxes(kv, 1, 2)[..., :head], np.swapaxes(kv, 1, 2)[..., head:]
    before = [key_cache.copy(), value_cache.copy()]
    slots = slot_mapping(T, nb * bs, rot, skipped=(0,))
    scales = dict(k_scale=np.array([0.5], np.float32), v_scale=np.array([2.0], np.float32)) if fp8 else {}
    run(call_of(KV_CACHE, neox, head_size=head, kv_cache_dtype=kv_dtype),
        dict(q_rope=query, k_rope=key, v=value, cache0=key_cache, cache1=value_cache, pos_ids=pos,
             cos_sin_cache=cache, slot_mapping=slots, **scales))
    k_ref = reference.apply_rotary(k64, cos, sin, neox)
    check(query.reshape(T, hq, head), reference.apply_rotary(q64, cos, sin, neox), "bfloat16", "query",
          head_magnitude(q64, rot, neox))
    check(key.reshape(T, hk, head), k_ref, "bfloat16", "key", head_magnitude(k64, rot, neox))
    assert np.array_equal(qkv[:, (hq + hk) * head:].view(np.uint16), before_qkv[:, (hq + hk) * head:].view(np.uint16))
    blocks, entries = reference.slot_locations(slots, bs, T)
    cached = blocks >= 0
    blocks, entries = blocks[cached], entries[cached]
    for c, b, name in zip((key_cache, value_cache), before, ("key_cache", "value_cache")):
        assert_only_rows_written(np.ascontiguousarray(c), b, blocks, entries, "NHD", name)
    krows, vrows = rows_at(key_cache, blocks, entries), rows_at(value_cache, blocks, entries)
    if fp8:
        check(krows, k_ref[cached] / 0.5, None, "key_cache", head_magnitude(k64, rot, neox)[cached] / 0.5,
              fmt="float8_e5m2")
        check(vrows, f64(value).reshape(T, hk, head)[cached] / 2.0, None, "value_cache", fmt="float8_e5m2")
    else:
        assert np.array_equal(krows.view(np.uint16), key.reshape(T, hk, head)[cached].view(np.uint16))
        assert np.array_equal(vrows.view(np.uint16), value.reshape(T, hk, head)[cached].view(np.uint16))


def test_sglang_kv_buffer_fp8_host_scale():
    rng = np.random.default_rng(5)
    T, hq, hk, head, slots_n = 7, 2, 2, 16, 20
    q, k, v = rand(rng, (T, hq, head), "float16"), rand(rng, (T, hk, head), "float16"), rand(rng, (T, hk, head), "float16")
    k64 = f64(k)
    pos = rng.integers(0, MAX_POS, T)
    cache, cos, sin = cos_sin(rng, head, pos, "float32")
    kb, vb = guarded(rng, (slots_n, hk * head), "float8_e4m3fn"), guarded(rng, (slots_n, hk, head), "float8_e4m3fn")
    before = [kb.copy(), vb.copy()]
    loc = slot_mapping(T, slots_n, 5, skipped=(4,))
    run(call_of(KV_BUFFER, True, head_size=head, quant_scale_kv=1 / 0.5, quant_scale_v=1 / 4.0),
        dict(q_rope=q, k_rope=k, v=v, cache0=kb, cache1=vb, pos_ids=pos, cos_sin_cache=cache, slot_mapping=loc))
    w = loc >= 0
    for c, b, name in zip((kb, vb), before, ("k_buffer", "v_buffer")):
        assert_only_rows_written(c[:, None], b[:, None], loc[w], np.zeros(w.sum(), int), "NHD", name)
    k_ref = reference.apply_rotary(k64, cos, sin, True)
    check(kb[loc[w]].reshape(-1, hk, head), k_ref[w] / 0.5, "float8_e4m3fn", "k_buffer",
          pair_magnitude(k64, True)[w] / 0.5)
    check(vb[loc[w]], f64(v)[w] / 4.0, "float8_e4m3fn", "v_buffer")


QK = [  # head, rotary, dtype, weights, neox, cos/sin, heads q/k/v, tokens
    (64, 64, "bfloat16", "bfloat16", True, "float32", (4, 2, 2), 5),
    (48, 16, "float16", "float32", False, None, (3, 1, 1), 7),
    (34, 34, "bfloat16", "float16", True, "bfloat16", (2, 2, 0), 3),
    (256, 256, "bfloat16", "bfloat16", False, "float32", (2, 1, 1), 2),
]


@pytest.mark.parametrize("case", QK, ids=[f"h{c[0]}r{c[1]}-{c[2]}-{'neox' if c[4] else 'gptj'}-{c[5] or 'fly'}"
                                          for c in QK])
def test_qk_norm_rope(case):
    check_qk_norm_rope(case)


@pytest.mark.parametrize("per_warp", [1, 4, 32])
def test_qk_norm_rope_forced_token_heads_per_warp(per_warp):
    """vLLM's forced_token_heads_per_warp: 32, 8 and 1 threads a row (one of them more
    threads than the row has chunks) give the same result as the planner's choice."""
    check_qk_norm_rope(QK[0], per_warp, expect_lanes=32 // per_warp)


def check_qk_norm_rope(case, per_warp=-1, expect_lanes=None):
    head, rot, dtype, wdt, neox, cdt, (hq, hk, hv), T = case
    rng = np.random.default_rng(head)
    width = (hq + hk + hv) * head
    buf = rand(rng, (T, width + 8), dtype, 3.0)
    before = buf.copy()
    qkv = buf[:, 4:4 + width]
    x64 = f64(qkv)
    qw, kw = (1 + 0.2 * rng.normal(size=head)).astype(numpy_dtype(wdt)), (1 + 0.2 * rng.normal(size=head)).astype(numpy_dtype(wdt))
    pos = rng.integers(0, MAX_POS, T)
    cache, cos, sin = cos_sin(rng, rot, pos, cdt, 1e6)
    call = qk_norm_rope_call(hq, hk, hv, head, 1e-6, neox, None if cdt else frequencies_json(1e6),
                             None if cdt else rot, per_warp)
    arrays = QKNormRopeArrays(qkv, qw, kw, pos, cache)
    plan = plan_qk_norm_rope(call, QKNormRopeArrays(*map(emu.desc, arrays)))
    assert expect_lanes is None or plan.spec.lanes == expect_lanes
    emu.run(plan, [emu.pointer(getattr(arrays, f)) for f in QK_NORM_ROPE_POINTERS])
    ref = reference.qk_norm_rope(x64, hq, hk, head, 1e-6, f64(qw), f64(kw), cos, sin, neox).reshape(T, -1, head)
    n = hq + hk
    got = f64(qkv).reshape(T, -1, head)
    check(got[:, :n].astype(numpy_dtype(dtype)), ref[:, :n], dtype, "q/k heads",
          head_magnitude(np.abs(ref[:, :n]), rot, neox))
    assert np.array_equal(got[:, n:], x64.reshape(T, -1, head)[:, n:]), "v heads changed"
    assert np.array_equal(buf[:, :4].view(np.uint16), before[:, :4].view(np.uint16))
    assert np.array_equal(buf[:, 4 + width:].view(np.uint16), before[:, 4 + width:].view(np.uint16))


@pytest.mark.parametrize("item_batch, cache_vec", [(1, 4), (2, 1), (4, 2)])
def test_kernel_loops_over_several_batches_per_thread(item_batch, cache_vec):
    """The kernel takes any split: here one block column does all items of its tokens, 8
    lanes, several batches each, and cos/sin (in registers: 8 lanes are two threads per
    chunk) read in vectors of 1 to 4."""
    import dataclasses

    from rope_jit.plan import Launch
    from rope_jit.plan_fused import fused_items
    from rope_jit.specs_fused import FUSED_ROPE_PARAMS

    rng = np.random.default_rng(3)
    T, hq, hk, rot, nope = 5, 8, 2, 64, 64
    q, k = rand(rng, (T, hq, rot + nope), "bfloat16"), rand(rng, (T, hk, rot + nope), "bfloat16")
    pos = rng.integers(0, MAX_POS, T)
    cache, cos, sin = cos_sin(rng, rot, pos, "float32")
    arrays = dict(q_rope=q[..., :rot], k_rope=k[..., :rot], q_nope=q[..., rot:], k_nope=k[..., rot:],
                  pos_ids=pos, cos_sin_cache=cache)
    plan = plan_rope_fused(call_of(ROPE_QUANTIZE, False, quantize_dtype="float8_e5m2"),
                           FusedRopeArrays(**{f: emu.desc(v) for f, v in arrays.items()}))
    _, items = fused_items(plan.spec)
    static = list(plan.static)
    static[FUSED_ROPE_PARAMS.static_names.index("split_items")] = items
    assert plan.spec.cos_sin_in_regs and plan.spec.cache_vec == 4
    spec = dataclasses.replace(plan.spec, item_batch=item_batch, cache_vec=cache_vec)
    assert -(-items // 8) > 2 * item_batch
    plan = dataclasses.replace(plan, spec=spec, static=tuple(static),
                               launch=Launch((-(-T // 2), 1, 1), (8, 2, 1), 2 * rot // 2 * 8))
    for field, shape, dtype in plan.outputs:
        arrays[field] = poisoned(shape, dtype)
    emu.run(plan, [emu.pointer(arrays.get(f)) for f in FUSED_ROPE_POINTERS])
    q64, k64 = f64(q), f64(k)
    ref = reference.rope_quantize(q64[..., :rot], k64[..., :rot], q64[..., rot:], k64[..., rot:], cos, sin, False)
    for field, r in zip(("q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out"), ref):
        check(arrays[field], r, "float8_e5m2", field, np.abs(r) + 1.0)


# ------------------------------------------------------------------ the public functions, end to end

@pytest.fixture
def host_device(monkeypatch):
    """NumPy arrays taken for arrays on device 0 and kernels run under emulation: the
    public functions run their whole path (call builders, routing, the launcher's plan
    cache, fingerprints, output allocation, struct packing) on the CPU."""
    import ctypes

    from rope_jit import arrays, jit, launch_fused
    from rope_jit.arrays import ArrayDesc, contiguous_strides
    from rope_jit.plan import Launch

    numpy_fw = type(arrays._NUMPY)
    monkeypatch.setattr(numpy_fw, "native", True)
    monkeypatch.setattr(numpy_fw, "describe", lambda self, a: ArrayDesc(
        a.ctypes.data, tuple(a.shape),
        tuple(s // a.itemsize for s in a.strides) if a.size else contiguous_strides(a.shape),
        a.dtype.name if a.dtype.name in ("uint8",) else str(a.dtype), 0))
    monkeypatch.setattr(numpy_fw, "empty", lambda self, shape, dtype, device, like: poisoned(shape, dtype))
    monkeypatch.setattr(numpy_fw, "stream", lambda self, device: 0)
    specs = {}

    def get_function(spec, device):
        specs[id(spec)] = spec
        return id(spec)

    def launch_plan(prep, fw, argv):
        spec = specs[prep.func]
        blob = ctypes.string_at(ctypes.c_void_p.from_address(argv).value, spec.params.size)
        emu.run_struct(spec, blob, Launch(prep.grid, prep.block, prep.smem))

    monkeypatch.setattr(jit, "get_function", get_function)
    monkeypatch.setattr(launch_fused, "launch_plan", launch_plan)
    monkeypatch.setattr(launch_fused, "note_devices", lambda: None)
    monkeypatch.setattr(launch_fused, "num_sms", lambda device: 132)
    launch_fused.clear_fused_plans()
    yield
    launch_fused.clear_fused_plans()


def test_public_functions_end_to_end(host_device):
    import rope_jit

    rng = np.random.default_rng(7)
    T, hq, hk, rot, nope = 6, 4, 2, 32, 32
    pos = rng.integers(0, MAX_POS, T)
    cache = reference.round_to(reference.cos_sin_cache(rot, MAX_POS), "float32")
    cos, sin = reference.cos_sin_from_cache(cache, pos)
    for _ in range(2):  # the second round hits the plan cache with new arrays
        q, k = rand(rng, (T, hq, rot + nope), "bfloat16"), rand(rng, (T, rot + nope), "bfloat16")
        outs = rope_jit.mla_rope_quantize_fp8(q[..., :rot], k[..., :rot], q[..., rot:], k[..., rot:],
                                              cache, pos, False, quant_scale_kv=2.0)
        ref = reference.rope_quantize(f64(q)[..., :rot], f64(k)[..., :rot], f64(q)[..., rot:],
                                      f64(k)[..., rot:], cos, sin, False, 1.0, 2.0)
        for o, r, name in zip(outs, ref, ("q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out")):
            assert o.dtype == numpy_dtype("float8_e4m3fn")
            check(o, r, "float8_e4m3fn", name, np.abs(r) + 1)

    # FlashInfer's paged append, GQA NHD, without quantization (a bf16 cache)
    total, indices, indptr, batch, ppos = paged_batch(4, 1)
    T = batch.size
    q, k, v = (rand(rng, (T, h, rot), "bfloat16") for h in (hq, hk, hk))
    pos = rng.integers(0, MAX_POS, T)
    cos, sin = reference.cos_sin_from_cache(cache, pos)
    kc, vc = guarded(rng, (total, 4, hk, rot), "bfloat16"), guarded(rng, (total, 4, hk, rot), "bfloat16")
    q_out, qn_out = rope_jit.rope_quantize_fp8_append_paged_kv_cache(
        q, k, None, None, v, cache, pos, (kc, vc), indices.astype(np.int32), indptr.astype(np.int32),
        batch.astype(np.int32), ppos.astype(np.int32), page_size=4)
    real = batch >= 0
    assert q_out.dtype == numpy_dtype("bfloat16") and qn_out.shape == (T, hq, 0)
    check(q_out[real], reference.apply_rotary(f64(q), cos, sin, True)[real], "bfloat16", "q_rope_out",
          pair_magnitude(f64(q), True)[real])
    pages, entries = reference.paged_locations(batch, ppos, indptr, indices, 4)
    assert np.array_equal(rows_at(vc, pages[real], entries[real]).view(np.uint16), v[real].view(np.uint16))

    # vLLM: RoPE + reshape_and_cache_flash with number scales into FP8 caches
    query, key, value = rand(rng, (T, hq * rot), "float16"), rand(rng, (T, hk * rot), "float16"), rand(rng, (T, hk * rot), "float16")
    k64 = f64(key).reshape(T, hk, rot)
    kcache, vcache = np.zeros((4, 8, hk, rot), np.uint8), np.zeros((4, 8, hk, rot), np.uint8)
    slots = slot_mapping(T, 32, 2, skipped=(0,))
    rope_jit.rope_and_reshape_and_cache_flash(pos, query, key, value, rot, cache, True, kcache, vcache,
                                              slots, "fp8", 0.5, 4.0)
    blocks, ent = reference.slot_locations(slots, 8, T)
    c = blocks >= 0
    k_ref = reference.apply_rotary(k64, cos, sin, True)
    check(rows_at(kcache, blocks[c], ent[c]), k_ref[c] / 0.5, None, "key_cache", pair_magnitude(k64, True)[c] / 0.5,
          fmt="float8_e4m3fn")
    check(rows_at(vcache, blocks[c], ent[c]), f64(value).reshape(T, hk, rot)[c] / 4.0, None, "value_cache",
          fmt="float8_e4m3fn")

    # SGLang: the KV-buffer write through apply_rope_with_cos_sin_cache_inplace
    query, key, value = rand(rng, (T, hq * rot), "bfloat16"), rand(rng, (T, hk * rot), "bfloat16"), rand(rng, (T, hk * rot), "bfloat16")
    kb, vb = np.zeros((40, hk * rot), numpy_dtype("bfloat16")), np.zeros((40, hk * rot), numpy_dtype("bfloat16"))
    loc = slot_mapping(T, 40, 3, skipped=(2,))
    rope_jit.apply_rope_with_cos_sin_cache_inplace(pos, query, key, rot, cache, False,
                                                   rope_jit.FusedSetKVBufferArg(value, kb, vb, cache_loc=loc))
    w = loc >= 0
    assert np.array_equal(kb[loc[w]].view(np.uint16), key[w].view(np.uint16))
    assert np.array_equal(vb[loc[w]].view(np.uint16), value[w].view(np.uint16))

    # vLLM's fused_qk_norm_rope, on the fly
    qkv = rand(rng, (T, 8 * rot), "bfloat16")
    x64 = f64(qkv)
    wq = (1 + 0.1 * rng.normal(size=rot)).astype(np.float32)
    rope_jit.fused_qk_norm_rope(qkv, 4, 2, 2, rot, 1e-6, wq, wq, None, True, pos, rope_theta=1e5)
    cos, sin = reference.cos_sin(pos, reference.inv_frequencies(rot, 1e5))
    ref = reference.qk_norm_rope(x64, 4, 2, rot, 1e-6, wq, wq, cos, sin, True).reshape(T, -1, rot)[:, :6]
    check(qkv.reshape(T, -1, rot)[:, :6], ref, "bfloat16", "qkv", head_magnitude(np.abs(ref), rot, True))
