"""NVRTC compiles the fused kernel templates (kernels/rope_fused.cu, kernels/qk_norm_rope.cu)
for sm_90 over a covering set of the specializations the planner picks, and a few for
sm_80 (FP8 by the software rounding there). Needs CuPy's NVRTC, not a GPU: the compiling
tests are marked ``nvrtc``; the rendering checks run everywhere.

The set is a covering design, not a product: every public function's mapping (FlashInfer
GQA/MLA quantize and paged append in NHD/HND, vLLM MLA and KV caches, SGLang buffers), both
FP8 formats and the unquantized caches, fp16/bf16/fp32 inputs, every cos/sin source
(fp32/bf16/fp16 caches, on the fly linear/llama3/yarn), both styles, vector widths 1 to 8,
a page size that is no power of two, int32 and int64 tables, scales on the device.
``test_design_covers`` checks those claims.
"""

from __future__ import annotations

import re

import pytest

from fused_cases import BASE, HK, HQ, KINDS, PS, L, N, P, R, T, base_arrays, desc, plan
from rope_jit import jit
from rope_jit.call import frequencies_json
from rope_jit.call_fused import qk_norm_rope_call
from rope_jit.plan_fused import QKNormRopeArrays, plan_qk_norm_rope
from rope_jit.specs import template
from rope_jit.specs_fused import (FUSED_ROPE_PARAMS, QK_NORM_ROPE_PARAMS, FusedRopeSpec,
                                  QKNormRopeSpec)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
INPUTS = ("q_rope", "k_rope", "q_nope", "k_nope", "v")


def retyped(kind, dtype, **more):
    """The inputs of a kind's baseline in another dtype."""
    _, base = base_arrays(kind)
    out = {f: desc(d.shape, dtype, strides=d.strides) for f, d in base.items() if f in INPUTS}
    return dict(out, **more)


def fly(scaling=None, **kw):
    return dict(call=dict(frequencies=frequencies_json(rope_scaling=scaling), **kw),
                cos_sin_cache=None)


def _fused_specs() -> list:
    gptj = dict(is_neox=False)
    hnd = desc((P, HK, 7, R + N), "bfloat16")
    return [
        plan("rq").spec,
        plan("rq_mla", **retyped("rq_mla", "float16"), cos_sin_cache=desc((4096, R), "bfloat16"),
             call=dict(quantize_dtype="float8_e5m2", **gptj)).spec,
        plan("rq", **retyped("rq", "float32"), call=dict(quantize_dtype="float32")).spec,
        plan("rq", **fly(LLAMA3, quantize_dtype="bfloat16")).spec,
        plan("ap", pos_ids=desc((T,), "int32"), batch_indices=desc((T,), "int64"),
             kv_indices=desc((P,), "int64"), kv_indptr=desc((4,), "int64")).spec,
        plan("ap", cache0=hnd, cache1=hnd, **fly(YARN, kv_layout="HND", page_size=7, **gptj)).spec,
        plan("ap_mla", cache0=desc((P, PS, N), "float8_e5m2"),
             cache1=desc((P, PS, R), "float8_e5m2")).spec,
        plan("mla", cos_sin_cache=desc((4096, R), "bfloat16"), cache0=desc((8, 64, L + R), "uint8")).spec,
        plan("mla", call=dict(kv_cache_dtype="auto", **gptj), cache0=desc((8, 16, L + R))).spec,
        plan("kv", call=dict(kv_cache_dtype="fp8", **gptj), cos_sin_cache=desc((4096, 32), "float16"),
             cache0=desc((8, 16, HK, 96), "uint8"), cache1=desc((8, 16, HK, 96), "float8_e4m3fn"),
             slot_mapping=desc((T,), "int32"), k_scale=desc((1,), "float32"),
             v_scale=desc((1,), "float32")).spec,
        plan("kv", **retyped("kv", "float16"), cache0=desc((8, 16, HK, 96), "float16"),
             cache1=desc((8, 16, HK, 96), "float16")).spec,
        plan("buf", cache0=desc((50, HK, 96), "float8_e4m3fn", ptr=BASE + 4),
             cache1=desc((50, HK * 96), "float8_e4m3fn"), call=dict(quant_scale_kv=0.5)).spec,
        plan("rq", k_rope=desc((T, HK, R), ptr=BASE + 2)).spec,                   # vec 1
        plan("rq", q_nope=desc((T, HQ, N), ptr=BASE + 4), call=gptj).spec,       # vec 2
    ]


def _qk(head, rot, *, dtype="bfloat16", weight="bfloat16", cache="float32", index="int64",
        neox=True, scaling=None, ptr=BASE):
    frequencies = None if cache else frequencies_json(rope_scaling=scaling)
    call = qk_norm_rope_call(8, 2, 2, head, 1e-6, neox, frequencies, None if cache else rot)
    arrays = QKNormRopeArrays(desc((T, 12 * head), dtype, ptr=ptr), desc((head,), weight),
                              desc((head,), weight), desc((T,), index),
                              desc((4096, rot), cache) if cache else None)
    return plan_qk_norm_rope(call, arrays).spec


def _qk_specs() -> list:
    return [
        _qk(128, 128),
        _qk(64, 64, dtype="float16", weight="float32", cache=None, neox=False),
        _qk(80, 32, cache="bfloat16"),
        _qk(512, 512, cache=None, scaling=YARN),
        _qk(66, 66, cache="float16", index="int32", neox=False),
        _qk(256, 64, cache="bfloat16", index="int32", scaling=LLAMA3),
        _qk(128, 128, cache=None, scaling=LLAMA3, ptr=BASE + 8),
    ]


FUSED_SPECS = _fused_specs()
QK_SPECS = _qk_specs()
SM80 = [FUSED_SPECS[0], FUSED_SPECS[6], FUSED_SPECS[11], QK_SPECS[0]]
CASES = [("sm_90", s) for s in FUSED_SPECS + QK_SPECS] + [("sm_80", s) for s in SM80]


def test_design_covers():
    f, q = FUSED_SPECS, QK_SPECS
    assert len(CASES) <= 26 and len(set(FUSED_SPECS)) == len(FUSED_SPECS)
    assert {s.cache_mode for s in f} == {"none", "slots", "paged"}
    assert {s.kv_cache_dtype for s in f if s.cache_mode != "none"} >= {
        "float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"}
    assert {s.q_out_dtype for s in f} >= {"float8_e4m3fn", "float8_e5m2", "bfloat16", "float32"}
    assert {s.dtype for s in f} == {"float16", "bfloat16", "float32"}
    assert {s.cache_dtype for s in f} == {"float32", "bfloat16", "float16", None}
    assert {s.scaling for s in f + q if s.cache_dtype is None} == {"linear", "llama3", "yarn"}
    assert {s.neox for s in f} == {s.neox for s in q} == {True, False}
    assert {s.vec for s in f} == {1, 2, 4, 8} and {s.vec for s in q} == {1, 4, 8}
    assert {s.page_size for s in f} >= {1, 7, 16, 64}
    assert all({s.index_dtypes[i] for s in f} == {"int32", "int64"} for i in (0, 1, 3, 4))
    assert any(s.k_scale_on_device and s.v_scale_on_device for s in f)
    assert {s.k_rope_out for s in f} == {"none", "array", "inplace"}
    assert any(s.k_nope_in_k_rope for s in f) and any(s.num_k_heads == 1 for s in f)
    assert {s.lanes for s in q} >= {2, 4, 32} and any(s.head_dim > s.rotary_dim for s in q)
    assert {s.index_dtype for s in q} == {"int32", "int64"}


@pytest.mark.parametrize("spec", FUSED_SPECS[:1] + QK_SPECS[:1], ids=["fused", "qk_norm"])
def test_rendered_source_is_self_contained_and_struct_matches(spec):
    """No #include; the kernel-argument struct declared once, with the ParamStruct's
    fields in order, before the templates; every p.<field> the templates read exists."""
    src = spec.render()
    assert not re.search(r"^\s*#\s*include", src, re.M)
    params = spec.params
    m = re.search(r"struct\s+" + params.c_name + r"\s*\{(.*?)\};", src, re.S)
    fields = re.findall(r"^\s*(long long|double)\s+(\w+)\s*;", m.group(1), re.M)
    assert [n for _, n in fields] == list(params.names) and src.count(f"struct {params.c_name} {{") == 1
    kernel = "rope_fused.cu" if isinstance(spec, FusedRopeSpec) else "qk_norm_rope.cu"
    used = set(re.findall(r"\bp\.(\w+)", template(kernel) + template("rope_chunk.cuh")))
    assert used and used <= set(params.names), used - set(params.names)
    assert src.index(f"struct {params.c_name} {{") < src.index(template("rope_chunk.cuh"))
    assert params in (FUSED_ROPE_PARAMS, QK_NORM_ROPE_PARAMS)


def test_rendering_is_deterministic_and_distinct():
    sources = [s.render() for s in FUSED_SPECS + QK_SPECS]
    assert sources == [s.render() for s in FUSED_SPECS + QK_SPECS]
    assert len(set(sources)) == len(sources)


def _case_id(case):
    arch, s = case
    kind = "fused" if isinstance(s, FusedRopeSpec) else "qk"
    return f"{arch}-{kind}-" + re.sub(r"[^\w]+", "-", s.words())[:120]


@pytest.mark.nvrtc
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_compile(case):
    arch, spec = case
    cubin = jit.compile_cubin(spec.render(), arch)
    assert len(cubin) > 1024 and cubin[:4] == b"\x7fELF"
    assert spec.kernel_name.encode() in cubin


def test_every_kind_is_compiled():
    kinds = {(s.cache_mode, s.k_rope_out, s.num_k_heads == 1) for s in FUSED_SPECS}
    assert len(kinds) >= 5 and len(KINDS) == 7
    assert isinstance(QK_SPECS[0], QKNormRopeSpec)
