"""Ahead-of-time warming of the fused kernels (rope_jit.warm_fused): the specs derived for a
model are the ones its real calls plan. The real calls here are built independently of
warm_fused, as the peers' callers build them (meta tensors: FlashInfer's separate
q/k/nope arrays and paged caches, vLLM's q/k/v slices of one QKV output and its MLA
slices, SGLang's token-slot buffers), described as the torch ops describe them at trace
time and planned by the planner the call path runs. Tests that compile are marked
``nvrtc``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rope_jit import jit, warm  # noqa: E402
from rope_jit.call import frequencies_json  # noqa: E402
from rope_jit.call_fused import (APPEND_PAGED, KV_BUFFER, KV_CACHE, MLA_CACHE,  # noqa: E402
                                 ROPE_QUANTIZE, fused_rope_call, qk_norm_rope_call)
from rope_jit.plan_fused import (FusedRopeArrays, QKNormRopeArrays,  # noqa: E402
                                 plan_qk_norm_rope, plan_rope_fused)
from rope_jit.torch_ops import fake_descs  # noqa: E402
from rope_jit.warm_fused import (FUSED_FUNCTIONS, FusedCallShape, fused_model_calls,  # noqa: E402
                                 fused_token_counts, inapplicable, specs_for_fused_call)

pytestmark = pytest.mark.usefixtures("cache_dir")  # conftest: a fresh cache per test

META = dict(device="meta")
T = 37  # tokens of the real calls: warm plans other counts


def t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, **META)


def cos_sin(s: FusedCallShape):
    if s.cache_dtype is None:
        return None
    return t(8192, s.rot, dtype=getattr(torch, s.cache_dtype))


def freqs(s: FusedCallShape):
    return None if s.cache_dtype else frequencies_json(rope_scaling=warm.SCALING_EXAMPLES[s.scaling])


def plan_fused(call, num_sms, **arrays):
    fields = FusedRopeArrays._fields
    descs = fake_descs(*(arrays.get(f) for f in fields))
    return plan_rope_fused(call, FusedRopeArrays(*descs), num_sms=num_sms).spec


def real_spec(s: FusedCallShape, T: int = T, num_sms: int = 132):
    """The spec of `s`'s function called as an engine calls it, with T tokens."""
    dt = getattr(torch, s.dtype)
    ix = getattr(torch, s.index_dtype)
    kv = getattr(torch, s.kv_dtype) if s.kv_dtype else dt
    hq, hk, d, r = s.num_q_heads, s.num_kv_heads, s.head_size, s.rot
    pos = t(T, dtype=ix)
    i32 = dict(dtype=torch.int32)
    if s.function in ("rope_quantize_fp8", "rope_quantize_fp8_append_paged_kv_cache"):
        q = t(T, hq, r, dtype=dt)
        if s.mla:  # mla_rope_quantize_fp8: 2-D k_rope / k_nope
            k, qn, kn = t(T, r, dtype=dt), t(T, hq, s.q_nope_dim, dtype=dt), t(T, s.kv_lora_rank, dtype=dt)
        else:
            k = t(T, hk, r, dtype=dt)
            qn = t(T, hq, d - r, dtype=dt) if d > r else None
            kn = t(T, hk, d - r, dtype=dt) if d > r else None
        if s.function == "rope_quantize_fp8":  # outputs given, as engines preallocate them
            outs = {f: None if x is None else torch.empty_like(x, dtype=kv)
                    for f, x in (("q_rope_out", q), ("k_rope_out", k), ("q_nope_out", qn),
                                 ("k_nope_out", kn))}
            call = fused_rope_call(ROPE_QUANTIZE, s.is_neox, freqs(s))
            return plan_fused(call, num_sms, q_rope=q, k_rope=k, q_nope=qn, k_nope=kn, pos_ids=pos,
                              cos_sin_cache=cos_sin(s), **outs)
        ps, pages = s.page_size, 9
        if s.mla:
            caches, v = (t(pages, ps, s.kv_lora_rank, dtype=kv), t(pages, ps, r, dtype=kv)), None
        else:
            both = torch.empty(pages, 2, ps, hk, d, dtype=kv, **META)  # FlashInfer's combined cache
            if s.kv_layout == "HND":
                both = torch.empty(pages, 2, hk, ps, d, dtype=kv, **META)
            caches, v = (both[:, 0], both[:, 1]), t(T, hk, d, dtype=dt)
        call = fused_rope_call(APPEND_PAGED, s.is_neox, freqs(s), None, None, s.kv_dtype, 1.0, 1.0,
                               1.0, ps, s.kv_layout)  # the builder takes positions only
        return plan_fused(call, num_sms, q_rope=q, k_rope=k, q_nope=qn, k_nope=kn, v=v, pos_ids=pos,
                          cos_sin_cache=cos_sin(s), cache0=caches[0], cache1=caches[1],
                          kv_indices=t(pages, **i32), kv_indptr=t(3, **i32),
                          batch_indices=t(T, **i32), positions=t(T, **i32),
                          q_rope_out=torch.empty_like(q, dtype=kv),
                          q_nope_out=None if qn is None else torch.empty_like(qn, dtype=kv))
    vllm_kv = {None: "auto", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8_e5m2"}[s.kv_dtype]
    if s.function == "rope_and_reshape_and_cache_flash":
        qkv = t(T, (hq + 2 * hk) * d, dtype=dt)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        kv_cache = torch.empty(2, 11, s.page_size, hk, d, dtype=torch.uint8 if s.kv_dtype else dt, **META)
        scale = t(1, dtype=torch.float32)  # vLLM's layer._k_scale / _v_scale
        call = fused_rope_call(KV_CACHE, s.is_neox, freqs(s), d,
                               None if s.cache_dtype else s.rotary_dim, None, 1.0, 1.0, 1.0, 0,
                               "NHD", vllm_kv)
        return plan_fused(call, num_sms, q_rope=q, k_rope=k, v=v, cache0=kv_cache[0], cache1=kv_cache[1],
                          pos_ids=pos, cos_sin_cache=cos_sin(s), slot_mapping=t(T, dtype=torch.int64),
                          k_scale=scale, v_scale=scale)
    if s.function == "concat_and_cache_mla_rope_fused":
        q = t(T, hq, s.q_nope_dim + r, dtype=dt)
        latent = t(T, s.kv_lora_rank + r, dtype=dt)
        kv_c, k_pe = latent.split([s.kv_lora_rank, r], dim=-1)
        cache = t(13, s.page_size, s.kv_lora_rank + r, dtype=torch.uint8 if s.kv_dtype else dt)
        call = fused_rope_call(MLA_CACHE, s.is_neox, freqs(s), None, None, None, 1.0, 1.0, 1.0, 0,
                               "NHD", vllm_kv)
        return plan_fused(call, num_sms, q_rope=q[..., s.q_nope_dim:], k_rope=k_pe, k_nope=kv_c, cache0=cache,
                          pos_ids=pos, cos_sin_cache=cos_sin(s), slot_mapping=t(T, dtype=torch.int64),
                          k_scale=t(1, dtype=torch.float32))
    if s.function == "apply_rope_with_cos_sin_cache_inplace":
        qkv = t(T, (hq + 2 * hk) * d, dtype=dt)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        k_buffer, v_buffer = t(500, hk, d, dtype=kv), t(500, hk, d, dtype=kv)
        call = fused_rope_call(KV_BUFFER, s.is_neox, None, d)
        return plan_fused(call, num_sms, q_rope=q, k_rope=k, v=v.view(T, hk, d), cache0=k_buffer,
                          cache1=v_buffer, pos_ids=pos, cos_sin_cache=cos_sin(s),
                          slot_mapping=t(T, dtype=torch.int64))
    assert s.function == "fused_qk_norm_rope"
    qkv = t(T, (hq + 2 * hk) * d, dtype=dt)
    w = t(d, dtype=dt)
    call = qk_norm_rope_call(hq, hk, hk, d, 1e-6, s.is_neox, freqs(s),
                             None if s.cache_dtype else s.rotary_dim)
    descs = fake_descs(qkv, w, w, pos, cos_sin(s))
    return plan_qk_norm_rope(call, QKNormRopeArrays(*descs), num_sms=num_sms).spec


# Models x variations: full and partial rotary, GPT-J pairs, MLA, fp16, e5m2, unquantized
# (16-bit caches), int32 ids, on the fly with llama3 scaling, page/block sizes, HND.
VARIATIONS = [
    dict(),
    dict(dtype="float16", kv_dtype="float8_e5m2", index_dtype="int32", page_size=64),
    dict(kv_dtype=None, cache_dtype="bfloat16", kv_layout="HND", page_size=1),
    dict(cache_dtype=None, scaling="llama3", is_neox=False),
]
SHAPES = [shape for model in ("llama3-8b", "phi-2", "gpt-j-6b", "deepseek-v3")
          for function in FUSED_FUNCTIONS for v in VARIATIONS
          for shape in fused_model_calls(model, function, **v) if inapplicable(shape) is None]


def test_every_function_is_covered():
    assert {s.function for s in SHAPES} == set(FUSED_FUNCTIONS)
    assert {s.mla for s in SHAPES} == {True, False}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.words())
def test_warm_specs_are_what_real_calls_plan(shape):
    """Real calls at any token count and SM count plan a warmed spec; the warmed specs are
    the one-item kernel and the longer batches, nothing else."""
    warmed = specs_for_fused_call(shape)
    for n, sms in ((1, 132), (T, 132), (700, 132), (3000, 78), (20000, 132), (100000, 170)):
        assert real_spec(shape, n, sms) in warmed, (n, sms)
    assert warmed[0] == real_spec(shape, 1) and 1 <= len(warmed) <= 4


def test_warm_token_counts_meet_every_item_batch():
    assert fused_token_counts(1) == [1]
    assert fused_token_counts(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    with pytest.raises(ValueError, match="max_tokens"):
        fused_token_counts(0)


def test_inapplicable_calls_are_named():
    llama = fused_model_calls("llama3-8b", "concat_and_cache_mla_rope_fused")[0]
    assert "needs an MLA model" in inapplicable(llama)
    dsv3 = fused_model_calls("deepseek-v3", "fused_qk_norm_rope")[0]
    assert "per-head keys" in inapplicable(dsv3)
    sglang = fused_model_calls("llama3-8b", "apply_rope_with_cos_sin_cache_inplace",
                               cache_dtype=None)[0]
    assert "cos/sin cache" in inapplicable(sglang)
    with pytest.raises(ValueError, match="needs an MLA model"):
        specs_for_fused_call(llama)
    with pytest.raises(ValueError, match="scaling: expected one of"):
        specs_for_fused_call(fused_model_calls("llama3-8b", "rope_quantize_fp8", cache_dtype=None,
                                               scaling="ntk")[0])
    with pytest.raises(ValueError, match="index dtype"):
        specs_for_fused_call(fused_model_calls("llama3-8b", "rope_quantize_fp8",
                                               index_dtype="int16")[0])


def test_mla_presets_warm_both_q_nope_widths():
    shapes = fused_model_calls("deepseek-v3", "rope_quantize_fp8")
    assert sorted(s.q_nope_dim for s in shapes) == [128, 512]
    assert all(s.kv_lora_rank == 512 and s.rot == 64 for s in shapes)
    assert len({specs_for_fused_call(s)[0] for s in shapes}) == 2


def test_tensor_parallel_heads():
    s = fused_model_calls("llama3-70b", "rope_and_reshape_and_cache_flash", tp=8)[0]
    assert (s.num_q_heads, s.num_kv_heads) == (8, 1)
    assert specs_for_fused_call(s)[0].num_q_heads == 8


@pytest.mark.nvrtc
def test_warmed_fused_kernels_load_with_zero_compiles(cache_dir):
    """Warm sm_90 for Llama-3-8B's and DeepSeek-V3's fused calls; then, as a fresh process
    would, the specs their real calls plan load from disk."""
    shapes = [s for model in ("llama3-8b", "deepseek-v3") for f in FUSED_FUNCTIONS
              for s in fused_model_calls(model, f) if inapplicable(s) is None]
    specs = list(dict.fromkeys(sp for s in shapes for sp in specs_for_fused_call(s)))
    report = warm.warm(specs, ["sm_90"], jobs=2)
    assert report.compiled == len(specs) >= 7
    jit.clear_memory()
    c0 = jit.stats.compiles
    for s in shapes:
        jit.build(real_spec(s), "sm_90")
    assert jit.stats.compiles == c0
