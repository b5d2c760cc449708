"""Validation and launch planning (rope_jit.plan) on ArrayDesc values: no GPU, no CuPy.

* every error of docs/errors.md: exception type AND a message that names the argument;
* layouts and strides landing in the right named kernel parameters (specs.ROPE_PARAMS);
* vector widths (choose_vec), cache vector widths, and the dispatch rules (choose_launch).
"""

from __future__ import annotations

import dataclasses

import pytest

from rope_jit.arrays import HOST, ArrayDesc, contiguous_strides
from rope_jit.call import INDPTR, POSITIONS, RopeCall, check_mrope_section, frequencies_json
from rope_jit.plan import DEFAULT_TUNING as TUNING
from rope_jit.plan import RopeArrays, choose_launch, choose_vec, head_parallel, plan_positions
from rope_jit.plan import plan_rope as plan_call
from rope_jit.specs import ROPE_LEAD, ROPE_PARAMS, ROPE_POINTERS, ParamStruct
from rope_jit.warm import SCALING_EXAMPLES


def plan_rope(query, key, *, head_size, is_neox, inplace, rotary_dim=None, positions=None,
              indptr=None, offsets=None, cos_sin_cache=None, scaling="linear",
              mrope_section=None, mrope_interleaved=False, inverse=False, num_sms=132,
              tuning=TUNING):
    """The planner fed the way the public functions feed it: a RopeCall (cache when a
    cos_sin_cache is given, else on the fly with the named scaling variant) and the
    arrays."""
    frequencies = (None if cos_sin_cache is not None
                   else frequencies_json(rope_scaling=SCALING_EXAMPLES[scaling]))
    call = RopeCall(inplace, head_size, rotary_dim, is_neox,
                    POSITIONS if positions is not None else INDPTR,
                    frequencies,
                    None if mrope_section is None else check_mrope_section(mrope_section),
                    mrope_interleaved, inverse)
    return plan_call(call, RopeArrays(query, key, positions, indptr, offsets, cos_sin_cache),
                     num_sms=num_sms, tuning=tuning)

BASE = 1 << 32  # a 16-byte aligned fake device pointer
ITEM = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8,
        "int16": 2, "uint8": 1}


def desc(shape, dtype="bfloat16", *, strides=None, ptr=BASE, device=0):
    """An ArrayDesc; contiguous unless strides (in elements) are given."""
    shape = tuple(shape)
    return ArrayDesc(ptr, shape, tuple(strides) if strides is not None else contiguous_strides(shape),
                     dtype, device)


T, HQ, HK, D = 8, 4, 2, 128


def call(**overrides):
    """plan_rope of a valid vLLM-style call ([T, H*D], positions, fp32 cache), with
    arguments replaced by `overrides`."""
    args = dict(query=desc((T, HQ * D)), key=desc((T, HK * D)), head_size=D, is_neox=True,
                positions=desc((T,), "int64"), cos_sin_cache=desc((4096, D), "float32"),
                inplace=True)
    args.update(overrides)
    return plan_rope(**args)


def call_fly(**overrides):
    """plan_rope of a valid FlashInfer-style call ([nnz, H, D], indptr + offsets, on the fly)."""
    args = dict(query=desc((T, HQ, D)), key=desc((T, HK, D)), head_size=None, is_neox=True,
                indptr=desc((3,), "int32"), offsets=desc((2,), "int32"), inplace=True)
    args.update(overrides)
    return plan_rope(**args)


def static(plan) -> dict:
    assert len(plan.static) == len(ROPE_PARAMS.static_names)
    return dict(zip(ROPE_PARAMS.static_names, plan.static))


def test_valid_baselines():
    """The two baseline calls the error tests start from are valid."""
    p = call()
    assert p.spec is not None and p.spec.cache_dtype == "float32" and not p.spec.indptr
    p = call_fly()
    assert p.spec is not None and p.spec.cache_dtype is None and p.spec.indptr


# ------------------------------------------------------------------ docs/errors.md

ERRORS = [
    # rotary dim
    ("odd-rotary", call_fly, dict(rotary_dim=63), ValueError,
     r"rotary_dim: expected a positive even number, got 63"),
    ("zero-rotary", call_fly, dict(rotary_dim=0), ValueError, r"rotary_dim: expected a positive even"),
    ("negative-rotary", call_fly, dict(rotary_dim=-2), ValueError, r"rotary_dim: expected a positive even"),
    ("odd-cache-width", call, dict(cos_sin_cache=desc((4096, 63), "float32")), ValueError,
     r"cos_sin_cache width \(rotary_dim\): expected a positive even number, got 63"),
    ("rotary-too-large", call_fly, dict(rotary_dim=130), ValueError,
     r"rotary_dim: 130 exceeds head_size 128"),
    ("cache-wider-than-head", call, dict(cos_sin_cache=desc((4096, 256), "float32")), ValueError,
     r"cos_sin_cache width \(rotary_dim\): 256 exceeds head_size 128"),
    ("rotary-not-int", call_fly, dict(rotary_dim=64.0), TypeError, r"rotary_dim: expected an integer"),
    ("cache-width-vs-rotary", call, dict(rotary_dim=64), ValueError,
     r"cos_sin_cache: width 128 must equal rotary_dim 64"),
    # head_size
    ("head-not-dividing-query", call, dict(query=desc((T, 500))), ValueError,
     r"query: last dim 500 is not a multiple of head_size 128"),
    ("head-not-dividing-key", call, dict(key=desc((T, 200))), ValueError,
     r"key: last dim 200 is not a multiple of head_size 128"),
    ("3d-last-dim", call, dict(query=desc((T, HQ, 64))), ValueError,
     r"query: last dim 64 must equal head_size 128"),
    ("head-size-str", call, dict(head_size="128"), TypeError, r"head_size: expected an integer, got str"),
    ("head-size-float", call, dict(head_size=128.0), TypeError, r"head_size: expected an integer"),
    ("head-size-zero", call, dict(head_size=0), ValueError, r"head_size: expected a positive integer"),
    ("head-size-none-2d-query", call_fly, dict(query=desc((T, HQ * D))), ValueError,
     r"query: expected shape \[nnz, num_heads, head_dim\]"),
    ("head-size-none-2d-key", call_fly, dict(key=desc((T, HK * D))), ValueError,
     r"key: expected shape \[nnz, num_heads, head_dim\]"),
    # token counts and layouts
    ("key-tokens", call, dict(key=desc((T + 1, HK * D))), ValueError,
     r"key: token dims \[9\] do not match the positions shape \[8\]"),
    ("positions-tokens", call, dict(positions=desc((T + 1,), "int64")), ValueError,
     r"query: token dims \[8\] do not match the positions shape \[9\]"),
    ("batch-seq-tokens", call, dict(positions=desc((2, 4), "int64"), query=desc((2, 5, HQ * D)),
                                    key=desc((2, 4, HK * D))), ValueError,
     r"query: token dims \[2, 5\] do not match the positions shape \[2, 4\]"),
    ("indptr-key-tokens", call_fly, dict(key=desc((T + 1, HK, D))), ValueError,
     r"key: token dims \[9\] do not match"),
    ("query-1d", call, dict(query=desc((T * HQ * D,))), ValueError, r"query: expected \[num_tokens, "),
    ("query-4d", call, dict(query=desc((T, HQ, 2, 64))), ValueError, r"query: expected \[num_tokens, "),
    ("query-2d-with-batch-positions", call, dict(positions=desc((2, 4), "int64")), ValueError,
     r"query: expected \[batch, seq, num_heads \* head_size\]"),
    ("indptr-query-4d", call_fly, dict(query=desc((T, HQ, 2, D))), ValueError,
     r"query: expected \[nnz, num_heads, head_size\]"),
    ("positions-3d", call, dict(positions=desc((2, 2, 2), "int64")), ValueError,
     r"positions: expected shape \[num_tokens\] or \[batch, seq\]"),
    # dtypes
    ("qk-dtype-mismatch", call, dict(key=desc((T, HK * D), "float16")), TypeError,
     r"key: dtype float16 differs from query dtype bfloat16"),
    ("query-float64", call, dict(query=desc((T, HQ * D), "float64"), key=None), TypeError,
     r"query: expected dtype float16 or bfloat16 or float32, got float64"),
    ("key-float64", call, dict(key=desc((T, HK * D), "float64")), TypeError,
     r"key: expected dtype float16 or bfloat16 or float32, got float64"),
    ("query-int32", call, dict(query=desc((T, HQ * D), "int32")), TypeError,
     r"query: expected dtype .* got int32"),
    ("cache-float64", call, dict(cos_sin_cache=desc((4096, D), "float64")), TypeError,
     r"cos_sin_cache: expected dtype float16 or bfloat16 or float32, got float64"),
    ("positions-float32", call, dict(positions=desc((T,), "float32")), TypeError,
     r"positions: expected dtype int32 or int64, got float32"),
    ("positions-int16", call, dict(positions=desc((T,), "int16")), TypeError,
     r"positions: expected dtype int32 or int64, got int16"),
    ("indptr-float", call_fly, dict(indptr=desc((3,), "float32")), TypeError,
     r"indptr: expected dtype int32 or int64, got float32"),
    ("offsets-float", call_fly, dict(offsets=desc((2,), "float64")), TypeError,
     r"offsets: expected dtype int32 or int64, got float64"),
    ("indptr-offsets-dtype", call_fly, dict(offsets=desc((2,), "int64")), TypeError,
     r"offsets: dtype int64 differs from indptr dtype int32"),
    # indptr / offsets shapes
    ("offsets-length", call_fly, dict(offsets=desc((3,), "int32")), ValueError,
     r"offsets: expected shape \[2\] \(batch_size, one less than indptr\), got \[3\]"),
    ("offsets-2d", call_fly, dict(offsets=desc((2, 1), "int32")), ValueError, r"offsets: expected shape \[2\]"),
    ("indptr-2d", call_fly, dict(indptr=desc((3, 1), "int32")), ValueError,
     r"indptr: expected shape \[batch_size \+ 1\]"),
    ("indptr-empty", call_fly, dict(indptr=desc((0,), "int32"), offsets=desc((0,), "int32")),
     ValueError, r"indptr: expected shape \[batch_size \+ 1\], got \[0\]"),
    ("no-positions", call_fly, dict(indptr=None, offsets=None), TypeError,
     r"indptr: expected an integer array, got None"),
    ("offsets-missing", call_fly, dict(offsets=None), TypeError, r"offsets: expected an integer array, got None"),
    ("query-none", call, dict(query=None), TypeError,
     r"query: expected a float16, bfloat16 or float32 array, got None"),
    # the cache
    ("cache-1d", call, dict(cos_sin_cache=desc((4096 * D,), "float32")), ValueError,
     r"cos_sin_cache: expected shape \[max_position, rotary_dim\], got \[524288\]"),
    ("cache-3d", call, dict(cos_sin_cache=desc((4096, 1, D), "float32")), ValueError,
     r"cos_sin_cache: expected shape \[max_position, rotary_dim\]"),
    # contiguity of the last dim
    ("query-last-dim-strided", call, dict(query=desc((T, HQ * D), strides=(2 * HQ * D, 2))), ValueError,
     r"query: the last dim must be contiguous \(stride 1\), got stride 2"),
    ("key-last-dim-strided", call, dict(key=desc((T, HK, D), strides=(HK * D * 3, D * 3, 3))), ValueError,
     r"key: the last dim must be contiguous \(stride 1\), got stride 3"),
    ("cache-last-dim-strided", call, dict(cos_sin_cache=desc((4096, D), "float32", strides=(2 * D, 2))),
     ValueError, r"cos_sin_cache: the last dim must be contiguous \(stride 1\)"),
]


@pytest.mark.parametrize("fn, overrides, exc, match", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_invalid_call(fn, overrides, exc, match):
    """docs/errors.md: the exception type and a message naming the argument."""
    with pytest.raises(exc, match=match):
        fn(**overrides)


HOST_CASES = [
    ("query", call, dict(query=desc((T, HQ * D), device=HOST))),
    ("key", call, dict(key=desc((T, HK * D), device=HOST))),
    ("positions", call, dict(positions=desc((T,), "int64", device=HOST))),
    ("cos_sin_cache", call, dict(cos_sin_cache=desc((4096, D), "float32", device=HOST))),
    ("indptr", call_fly, dict(indptr=desc((3,), "int32", device=HOST))),
    ("offsets", call_fly, dict(offsets=desc((2,), "int32", device=HOST))),
]


@pytest.mark.parametrize("name, fn, overrides", HOST_CASES, ids=[c[0] for c in HOST_CASES])
def test_host_array_refused(name, fn, overrides):
    """Every array argument must live on a CUDA device: TypeError naming it and 'host'."""
    with pytest.raises(TypeError, match=rf"^{name}: expected a CUDA device array .*host memory"):
        fn(**overrides)


DEVICE_CASES = [
    ("key", call, dict(key=desc((T, HK * D), device=1))),
    ("positions", call, dict(positions=desc((T,), "int64", device=1))),
    ("cos_sin_cache", call, dict(cos_sin_cache=desc((4096, D), "float32", device=1))),
    ("indptr", call_fly, dict(indptr=desc((3,), "int32", device=1))),
    ("offsets", call_fly, dict(offsets=desc((2,), "int32", device=1))),
]


@pytest.mark.parametrize("name, fn, overrides", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_arrays_on_different_devices(name, fn, overrides):
    """An array on another device than query: ValueError naming both arrays and devices."""
    with pytest.raises(ValueError, match=rf"^{name} is on cuda:1 but query is on cuda:0"):
        fn(**overrides)


def test_all_on_another_device_is_fine():
    """Everything on cuda:3 is valid, and the plan says device 3."""
    p = call(query=desc((T, HQ * D), device=3), key=desc((T, HK * D), device=3),
             positions=desc((T,), "int64", device=3), cos_sin_cache=desc((4096, D), "float32", device=3))
    assert p.device == 3 and p.spec is not None


def test_numpy_integer_head_size_accepted():
    """head_size may be any integer type (operator.index), not only int."""
    np = pytest.importorskip("numpy")
    assert call(head_size=np.int64(D)).spec.head_size == D


# ------------------------------------------------------------------ layouts and strides

def test_layout_tokens_by_heads_times_d():
    """[T, H*D]: one token dim, head stride D, token stride H*D; key with its own heads."""
    p = call()
    s = static(p)
    assert p.spec.head_size == D and p.spec.rotary_dim == D
    assert s["num_tokens"] == T and s["inner_tokens"] == T
    # one token dim: kernels/rope.cu compiles the split out, in the few-token path only
    assert p.spec.few_tokens and not p.spec.tokens_2d
    many = call(query=desc((8192, HQ * D)), key=desc((8192, HK * D)),
                positions=desc((8192,), "int64"))
    assert not many.spec.few_tokens and many.spec.tokens_2d
    forced = call(query=desc((8192, HQ * D)), key=desc((8192, HK * D)),
                  positions=desc((8192,), "int64"),
                  tuning=dataclasses.replace(TUNING, few_tokens=True))
    assert forced.spec.few_tokens and forced.spec.tokens_2d  # tuned on outside the regime
    assert (s["num_q_heads"], s["num_k_heads"]) == (HQ, HK)
    assert (s["q_stride_outer"], s["q_stride_inner"], s["q_stride_head"]) == (0, HQ * D, D)
    assert (s["k_stride_outer"], s["k_stride_inner"], s["k_stride_head"]) == (0, HK * D, D)
    assert (s["pos_stride_outer"], s["pos_stride_inner"]) == (0, 1)
    assert s["max_position"] == 4096 and s["cache_stride"] == D
    assert s["batch_size"] == 0
    # in place: the outputs are the inputs
    assert (s["qo_stride_inner"], s["qo_stride_head"]) == (HQ * D, D)
    assert (s["ko_stride_inner"], s["ko_stride_head"]) == (HK * D, D)
    assert p.q_out_shape == (T, HQ * D) and p.k_out_shape == (T, HK * D)


def test_fused_qkv_slices_and_padded_heads():
    """Views of a fused QKV buffer: arbitrary token strides, a padded head stride in 3-D,
    a padded cache row stride; all land in their named slots."""
    width = (HQ + 2 * HK) * D + 24          # row of the fused buffer
    q = desc((T, HQ * D), strides=(width, 1), ptr=BASE)
    k = desc((T, HK, D), strides=(width, D + 8, 1), ptr=BASE + HQ * D * 2)
    cache = desc((4096, D), "float32", strides=(D + 4, 1))
    p = call(query=q, key=k, cos_sin_cache=cache)
    s = static(p)
    assert (s["q_stride_inner"], s["q_stride_head"]) == (width, D)
    assert (s["k_stride_inner"], s["k_stride_head"]) == (width, D + 8)
    assert s["cache_stride"] == D + 4
    assert (s["num_q_heads"], s["num_k_heads"]) == (HQ, HK)


def test_layout_tokens_heads_d_arbitrary_strides():
    """[T, H, D] with token stride and head stride both unusual."""
    q = desc((T, HQ, D), strides=(1000 * 8, 136, 1))
    k = desc((T, HK, D), strides=(3 * 1024, 2 * D, 1))
    s = static(call(query=q, key=k))
    assert (s["q_stride_outer"], s["q_stride_inner"], s["q_stride_head"]) == (0, 8000, 136)
    assert (s["k_stride_outer"], s["k_stride_inner"], s["k_stride_head"]) == (0, 3072, 2 * D)


@pytest.mark.parametrize("four_d", [False, True], ids=["B,S,H*D", "B,S,H,D"])
def test_layout_batch_seq(four_d):
    """vLLM's [B, S, H*D] (and [B, S, H, D]) with positions [B, S]: two token dims with
    independent strides (here a strided, non-contiguous positions view too)."""
    Bn, Sn = 3, 5
    if four_d:
        q = desc((Bn, Sn, HQ, D), strides=(Sn * 1024, 1024, D, 1))
        k = desc((Bn, Sn, HK, D))
    else:
        q = desc((Bn, Sn, HQ * D), strides=(Sn * 1024, 1024, 1))
        k = desc((Bn, Sn, HK * D))
    pos = desc((Bn, Sn), "int32", strides=(4 * Sn, 2))
    p = call(query=q, key=k, positions=pos, inplace=False)
    s = static(p)
    assert s["num_tokens"] == Bn * Sn and s["inner_tokens"] == Sn
    assert p.spec.tokens_2d  # the kernel divides a token index into (batch, seq)
    assert (s["q_stride_outer"], s["q_stride_inner"], s["q_stride_head"]) == (Sn * 1024, 1024, D)
    assert (s["k_stride_outer"], s["k_stride_inner"], s["k_stride_head"]) == (Sn * HK * D, HK * D, D)
    assert (s["pos_stride_outer"], s["pos_stride_inner"]) == (4 * Sn, 2)
    # out of place: new contiguous outputs of the input shapes
    assert (s["qo_stride_outer"], s["qo_stride_inner"], s["qo_stride_head"]) == (Sn * HQ * D, HQ * D, D)
    assert (s["ko_stride_outer"], s["ko_stride_inner"], s["ko_stride_head"]) == (Sn * HK * D, HK * D, D)
    assert p.q_out_shape == q.shape and p.k_out_shape == k.shape
    assert p.spec.index_dtype == "int32" and p.spec.out_of_place


def test_size_one_dims_have_zero_strides():
    """A stride of a size-1 dim never moves an index: it is zeroed (so it cannot limit
    the vector width either)."""
    s = static(call(query=desc((1, HQ * D), strides=(12345, 1)), key=desc((1, HK * D)),
                    positions=desc((1,), "int64")))
    assert s["q_stride_inner"] == 0 and s["k_stride_inner"] == 0


def test_key_none():
    """key=None: query only; k heads and every k/ko stride are 0, no key output shape."""
    p = call(key=None, inplace=False)
    s = static(p)
    assert s["num_k_heads"] == 0
    assert all(s[n] == 0 for n in ROPE_PARAMS.static_names if n.startswith(("k_", "ko_")))
    assert p.k_out_shape is None and p.spec is not None


def test_indptr_plan():
    """indptr + offsets: spec.indptr, batch size = len(offsets), position strides 0,
    index dtype of indptr, head size = last dim, rotary dim = head (None) or given."""
    p = call_fly(indptr=desc((6,), "int64"), offsets=desc((5,), "int64"), rotary_dim=64)
    s = static(p)
    assert p.spec.indptr and p.spec.index_dtype == "int64"
    assert p.spec.head_size == D and p.spec.rotary_dim == 64 and p.spec.cache_dtype is None
    assert s["batch_size"] == 5 and s["max_position"] == 0 and s["cache_stride"] == 0
    assert (s["pos_stride_outer"], s["pos_stride_inner"]) == (0, 0)
    assert call_fly().spec.rotary_dim == D


@pytest.mark.parametrize("overrides", [
    dict(query=desc((0, HQ * D)), key=desc((0, HK * D)), positions=desc((0,), "int64")),
    dict(query=desc((0, 5, HQ * D)), key=desc((0, 5, HK * D)), positions=desc((0, 5), "int64")),
    dict(query=desc((T, 0)), key=None),
], ids=["no-tokens", "no-batch", "no-heads"])
def test_nothing_to_do(overrides):
    """Zero tokens (or zero heads): a valid plan with spec None and no launch."""
    p = call(**overrides)
    assert p.spec is None and p.launch is None
    assert p.q_out_shape == overrides["query"].shape


def test_zero_tokens_still_validated():
    """An empty call is still checked (a bad rotary dim is an error with no tokens too)."""
    with pytest.raises(ValueError, match="rotary_dim"):
        call_fly(query=desc((0, HQ, D)), key=desc((0, HK, D)), rotary_dim=7)


def test_spec_fields_follow_the_call():
    """dtype, cache dtype, style, placement and index dtype go into the spec."""
    p = call(query=desc((T, HQ * D), "float16"), key=desc((T, HK * D), "float16"),
             cos_sin_cache=desc((100, 64), "bfloat16"), is_neox=False, inplace=False,
             positions=desc((T,), "int32"))
    sp = p.spec
    assert (sp.dtype, sp.cache_dtype, sp.neox, sp.out_of_place, sp.index_dtype, sp.indptr) == \
        ("float16", "bfloat16", False, True, "int32", False)
    assert sp.rotary_dim == 64 and sp.head_size == D
    assert static(p)["max_position"] == 100


# ------------------------------------------------------------------ vector widths

@pytest.mark.parametrize("itemsize, must_divide, ptrs, want", [
    (2, [64, 512, 128], [BASE], 8),
    (4, [64, 512, 128], [BASE], 4),
    (8, [64], [BASE], 2),
    (2, [], [], 8),
    (2, [64, 512, 128], [BASE + 2], 1),      # 2-byte aligned pointer
    (2, [64, 512, 128], [BASE + 4], 2),
    (2, [64, 512, 128], [BASE + 8], 4),
    (4, [64, 512, 128], [BASE + 8], 2),
    (2, [64, 512, 128], [BASE, BASE + 6], 1),  # the worst pointer decides
    (2, [10, 512], [BASE], 2),               # rotary 20: half 10
    (2, [3, 512], [BASE], 1),                # rotary 6: half 3
    (2, [64, 1001], [BASE], 1),              # odd token stride
    (2, [64, 0, 0], [BASE], 8),              # zeroed strides never limit
    (4, [12], [BASE], 4),
    (4, [6], [BASE], 2),
])
def test_choose_vec(itemsize, must_divide, ptrs, want):
    """Widest power of two (<= 16 bytes) dividing all counts and keeping pointers aligned."""
    assert choose_vec(itemsize, must_divide, ptrs) == want


@pytest.mark.parametrize("dtype, rot, want", [
    ("bfloat16", 128, 8), ("float16", 64, 8), ("float32", 128, 4),
    ("bfloat16", 20, 2), ("bfloat16", 6, 1), ("float32", 20, 2), ("float32", 12, 2),
    ("bfloat16", 24, 4), ("float16", 2, 1),
])
def test_vec_from_rotary_dim(dtype, rot, want):
    """vec divides rotary_dim/2: rotary 20 -> 2, rotary 6 -> 1 (an odd chunk count)."""
    p = call_fly(query=desc((T, HQ, D), dtype), key=desc((T, HK, D), dtype), rotary_dim=rot)
    assert p.spec.vec == want
    assert (rot // 2) % p.spec.vec == 0


@pytest.mark.parametrize("what, overrides, want", [
    ("q-2-byte-aligned", dict(query=desc((T, HQ * D), ptr=BASE + 2)), 1),
    ("k-4-byte-aligned", dict(key=desc((T, HK * D), ptr=BASE + 4)), 2),
    ("q-8-byte-aligned", dict(query=desc((T, HQ * D), ptr=BASE + 8)), 4),
    ("odd-token-stride", dict(query=desc((T, HQ * D), strides=(HQ * D + 1, 1))), 1),
    ("token-stride-2-mod-4", dict(key=desc((T, HK * D), strides=(HK * D + 2, 1))), 2),
    ("head-stride-4-mod-8", dict(query=desc((T, HQ, D), strides=(HQ * (D + 4), D + 4, 1))), 4),
    ("head-stride-padded-by-8", dict(query=desc((T, HQ, D), strides=(HQ * (D + 8), D + 8, 1))), 8),
])
def test_vec_shrinks_with_alignment_and_strides(what, overrides, want):
    """Misaligned pointers and strides not divisible by the width shrink vec."""
    assert call(**overrides).spec.vec == want


def test_out_of_place_vec_divides_pass_through():
    """Out of place the threads also copy head_size - rotary_dim elements, so vec must
    divide it: one token, one head of 68 with rotary 64 (all strides zeroed) is 8 wide in
    place but 4 wide out of place."""
    kw = dict(query=desc((1, 1, 68)), key=None, indptr=desc((2,), "int32"),
              offsets=desc((1,), "int32"), rotary_dim=64)
    assert call_fly(inplace=True, **kw).spec.vec == 8
    p = call_fly(inplace=False, **kw)
    assert p.spec.vec == 4 and (68 - 64) % p.spec.vec == 0


def test_out_of_place_vec_follows_output_strides():
    """In place a padded head stride (128) allows 8; out of place the contiguous outputs
    have head stride 68 and allow only 4."""
    q = desc((T, HQ, 68), strides=(HQ * 128, 128, 1))
    kw = dict(query=q, key=None, rotary_dim=64)
    assert call_fly(inplace=True, **kw).spec.vec == 8
    assert call_fly(inplace=False, **kw).spec.vec == 4


@pytest.mark.parametrize("dtype, cache, cache_kw, want_vec, want_cache_vec", [
    ("bfloat16", "float32", {}, 8, 4),
    ("bfloat16", "bfloat16", {}, 8, 8),
    ("float16", "float16", {}, 8, 8),
    ("float32", "bfloat16", {}, 4, 4),
    ("float32", "float32", {}, 4, 4),
    ("bfloat16", "float32", dict(strides=(130, 1)), 8, 2),
    ("bfloat16", "float32", dict(ptr=BASE + 4), 8, 1),
    ("bfloat16", "bfloat16", dict(ptr=BASE + 4), 8, 2),
    ("bfloat16", "float16", dict(strides=(129, 1)), 8, 1),
])
def test_cache_vec(dtype, cache, cache_kw, want_vec, want_cache_vec):
    """cache_vec: at most 16 bytes of cache, at most vec, divides vec, and respects the
    cache's pointer alignment and row stride."""
    p = call(query=desc((T, HQ * D), dtype), key=desc((T, HK * D), dtype),
             cos_sin_cache=desc((4096, D), cache, **cache_kw))
    assert (p.spec.vec, p.spec.cache_vec) == (want_vec, want_cache_vec)
    assert p.spec.vec % p.spec.cache_vec == 0


def test_cache_vec_on_the_fly_is_one():
    """On the fly there is no cache: cache_dtype None, cache_vec 1."""
    sp = call_fly().spec
    assert sp.cache_dtype is None and sp.cache_vec == 1


# ------------------------------------------------------------------ dispatch (choose_launch)

def _heads_covered(head_batch, num_groups, num_heads):
    """How often the kernel's loop visits each head: group g starts at g*head_batch and
    strides by num_groups*head_batch, head_batch heads at a time (kernels/rope.cu)."""
    seen = [0] * num_heads
    for g in range(num_groups):
        for h0 in range(g * head_batch, num_heads, num_groups * head_batch):
            for i in range(head_batch):
                if h0 + i < num_heads:
                    seen[h0 + i] += 1
    return seen


def _check_launch(tokens, chunks, heads, sms, fly):
    hb, per_group, launch = choose_launch(tokens, chunks, heads, sms, fly)
    (gx, gy, gz), (bx, by, bz) = launch.grid, launch.block
    where = f"tokens={tokens} chunks={chunks} heads={heads} sms={sms} fly={fly}: {launch}"
    assert bx == chunks, where
    assert bx * by * bz <= 1024, where
    assert 1 <= bz <= 64 and by >= 1, where
    assert gz == 1 and 1 <= gy <= 65535 and 1 <= gx < 2 ** 31, where
    assert gx * bz >= tokens > (gx - 1) * bz, where          # all tokens, no idle block row
    groups = gy * by
    assert (groups - 1) * hb < heads, where                   # every head group has work
    assert groups * per_group >= heads, where
    assert 1 <= hb <= heads, where
    assert _heads_covered(hb, groups, heads) == [1] * heads, where
    return hb, per_group, launch


def test_launch_covers_tokens_and_heads():
    """Over a grid of problem sizes: blocks of at most 1024 threads and blockDim.z <= 64,
    grid x block covering every token and each head exactly once."""
    n = 0
    for sms in (108, 132):
        for chunks in (1, 3, 5, 8, 16, 32, 64, 256):
            for heads in (1, 2, 3, 5, 8, 40, 72):
                boundary = int(TUNING.small_waves * sms * 2048) // (chunks * heads)
                for tokens in (1, 2, 63, 64, 65, 1000, boundary, boundary + 1, 100_000):
                    for fly in (False, True):
                        if tokens >= 1:
                            _check_launch(tokens, chunks, heads, sms, fly)
                            n += 1
    assert n > 1000


def test_small_problems_are_head_parallel():
    """Decode-sized problems: one head per thread (head_batch 1) and one head group per
    head, so the heads spread over blocks."""
    for tokens in (1, 4, 64, 256):
        hb, per_group, launch = _check_launch(tokens, 8, 40, 132, False)
        assert (hb, per_group) == (1, 1)
        assert launch.grid[1] * launch.block[1] == 40


@pytest.mark.parametrize("chunks, heads, sms, fly", [
    (8, 40, 132, False), (8, 40, 132, True), (16, 12, 108, False), (5, 9, 132, True),
    (64, 48, 132, False),
])
def test_head_parallel_boundary(chunks, heads, sms, fly):
    """The switch happens exactly where tokens*chunks*heads exceeds TUNING['small_waves']
    waves of sms*2048 threads: head_batch 1 at the boundary token count, batched
    (min(TUNING['head_batch'], heads) heads) one token later."""
    limit = TUNING.small_waves * sms * 2048
    boundary = int(limit // (chunks * heads))
    assert boundary * chunks * heads <= limit < (boundary + 1) * chunks * heads
    hb, _, _ = _check_launch(boundary, chunks, heads, sms, fly)
    assert hb == 1
    hb, per_group, _ = _check_launch(boundary + 1, chunks, heads, sms, fly)
    assert hb == min(TUNING.head_batch, heads) > 1
    assert per_group % hb == 0


@pytest.mark.parametrize("tokens", [8192, 65536, 1 << 20])
def test_large_problems_batch_heads(tokens):
    """Many tokens: heads are batched (head_batch = TUNING['head_batch']) and each head
    group holds several heads, so cos/sin is shared across them."""
    hb, per_group, launch = _check_launch(tokens, 8, 40, 132, False)
    assert hb == TUNING.head_batch > 1
    assert per_group >= hb
    assert launch.grid[1] * launch.block[1] < 40


def test_one_head_large_problem():
    """A single head never asks for a head batch wider than the heads there are."""
    hb, per_group, _ = _check_launch(1 << 20, 8, 1, 132, False)
    assert hb == 1 and per_group == 1


def test_plan_uses_choose_launch():
    """plan_rope's spec.head_batch and launch are choose_launch's for its chunk count."""
    p = call(query=desc((65536, HQ * D)), key=desc((65536, HK * D)), positions=desc((65536,), "int64"))
    chunks = p.spec.rotary_dim // 2 // p.spec.vec
    hb, _, launch = choose_launch(65536, chunks, HQ + HK, 132, False)
    assert (p.spec.head_batch, p.launch) == (hb, launch)
    p1 = call()
    assert p1.spec.head_batch == 1


def test_few_token_path_exactly_in_the_head_parallel_regime():
    """FEW_TOKENS (position first from a cache, paired rounding) exactly where choose_launch
    goes head-parallel: decode's critical path is its chain of latencies; with many tokens
    the original order measured 2-5% faster. Every mode (cache, on the fly, mRoPE)."""
    few, many = 16, 65536
    assert head_parallel(few, D // 16, HQ + HK, 132) and not head_parallel(many, D // 16, HQ + HK, 132)

    def sized(n, **kw):
        return dict(query=desc((n, HQ * D)), key=desc((n, HK * D)), **kw)
    assert call(**sized(few, positions=desc((few,), "int64"))).spec.few_tokens
    assert not call(**sized(many, positions=desc((many,), "int64"))).spec.few_tokens
    assert call_fly().spec.few_tokens
    assert call_fly(query=desc((many, HQ, D)), key=desc((many, HK, D)),
                    indptr=None, offsets=None, positions=desc((many,), "int64")).spec.few_tokens is False
    assert _mrope(**sized(few, positions=desc((3, few), "int64"))).spec.few_tokens
    # the rule follows the tuned regime boundary, not a token count of its own
    assert not call(tuning=dataclasses.replace(TUNING, small_waves=0.0)).spec.few_tokens
    # a tuned entry may set it either way (rope-jit tune measures both)
    forced_on = dataclasses.replace(TUNING, few_tokens=True)
    assert call(**sized(many, positions=desc((many,), "int64")), tuning=forced_on).spec.few_tokens
    assert not call(tuning=dataclasses.replace(TUNING, few_tokens=False)).spec.few_tokens


def test_few_vec_shortens_chunks_in_the_head_parallel_regime_only():
    """Tuning.few_vec caps the q/k access at decode (more, shorter threads), never with many
    tokens, never above what alignment allows, and only to a power of two."""
    few, many = 16, 65536

    def sized(n):
        return dict(query=desc((n, HQ * D)), key=desc((n, HK * D)), positions=desc((n,), "int64"))
    widest = call(**sized(few))
    assert widest.spec.vec == 8 and widest.launch.block[0] == D // 2 // 8
    for cap in (4, 2):
        p = call(**sized(few), tuning=dataclasses.replace(TUNING, few_vec=cap))
        assert p.spec.vec == cap and p.spec.cache_vec <= cap and p.spec.few_tokens
        chunks = D // 2 // cap
        hb, _, launch = choose_launch(few, chunks, HQ + HK, 132, False)
        assert p.launch == launch and p.spec.head_batch == hb == 1
    capped_many = call(**sized(many), tuning=dataclasses.replace(TUNING, few_vec=2))
    assert capped_many.spec.vec == 8  # outside the regime: the widest access
    assert call(**sized(few), tuning=dataclasses.replace(TUNING, few_vec=3)).spec.vec == 8
    # a query only 4-byte aligned gets vec 2 anyway: a cap of 4 changes nothing
    odd = call(query=desc((few, HQ * D), ptr=BASE + 4), key=desc((few, HK * D)),
               positions=desc((few,), "int64"), tuning=dataclasses.replace(TUNING, few_vec=4))
    assert odd.spec.vec == 2


@pytest.mark.parametrize("head", [2050, 4096])
def test_huge_rotary_dim_is_refused_or_fits(head):
    """A rotary dim whose chunk count exceeds 1024 threads is either refused up front
    (ValueError naming rotary_dim or head_size) or planned within 1024 threads per block."""
    q = desc((3, 1, head), "float32", ptr=BASE + 4)  # 4-byte aligned: vec 1
    try:
        p = plan_rope(q, None, head_size=head, is_neox=True, positions=desc((3,), "int64"),
                      cos_sin_cache=desc((10, head), "float32"), inplace=True)
    except ValueError as e:
        assert "rotary_dim" in str(e) or "head_size" in str(e)
        return
    bx, by, bz = p.launch.block
    assert bx * by * bz <= 1024


# ------------------------------------------------------------------ shared memory (on the fly)

def test_on_the_fly_shared_memory():
    """On the fly the block keeps a cos/sin tile of its blockDim.z tokens x R/2 float2 plus
    a position and a flag per token (kernels/rope.cu): smem = block.z * (R/2 * 8 + 16)
    bytes, within the 48 KiB a launch gets without opting in, for every head size up to
    512, misaligned (vec 1) inputs and decode to prefill token counts. A cache needs none."""
    n = 0
    for dtype in ("bfloat16", "float32"):
        for head, rot in ((64, 64), (128, 64), (128, 128), (256, 256), (512, 512), (80, 20)):
            for ptr in (BASE, BASE + 2 if dtype == "bfloat16" else BASE + 4):
                for tokens in (1, 7, 64, 1000, 65536):
                    p = call_fly(query=desc((tokens, HQ, head), dtype, ptr=ptr),
                                 key=desc((tokens, HK, head), dtype), rotary_dim=rot,
                                 indptr=desc((2,), "int32"), offsets=desc((1,), "int32"))
                    smem = p.launch.smem
                    assert smem == p.launch.block[2] * (rot // 2 * 8 + 16), (head, rot, tokens)
                    assert 0 < smem <= 48 * 1024, (head, rot, tokens, p.launch)
                    n += 1
    assert n == 2 * 6 * 2 * 5
    assert call().launch.smem == 0


# ------------------------------------------------------------------ plan_positions

def test_plan_positions_ok():
    """Valid: returns (index dtype, batch size); host/host and device/device both fine."""
    assert plan_positions(desc((4,), "int32"), desc((3,), "int32"), 10) == ("int32", 3)
    assert plan_positions(desc((1,), "int64", device=HOST), desc((0,), "int64", device=HOST), 0) == \
        ("int64", 0)


def _i32(*shape, **kw):
    return desc(shape, "int32", **kw)


@pytest.mark.parametrize("indptr, offsets, nnz, exc, match", [
    (desc((4,), "float32"), _i32(3), 5, TypeError, r"indptr: expected dtype int32 or int64, got float32"),
    (_i32(4), desc((3,), "float64"), 5, TypeError, r"offsets: expected dtype int32 or int64, got float64"),
    (_i32(4, 1), _i32(3), 5, ValueError, r"indptr: expected a 1-D array, got shape \[4, 1\]"),
    (_i32(4), _i32(3, 1), 5, ValueError, r"offsets: expected a 1-D array"),
    (_i32(0), _i32(0), 0, ValueError, r"indptr: expected at least one entry"),
    (_i32(4), _i32(4), 5, ValueError, r"offsets: expected 3 entries \(one less than indptr\), got 4"),
    (_i32(4), desc((3,), "int64"), 5, TypeError, r"offsets: dtype int64 differs from indptr dtype int32"),
    (_i32(4, device=HOST), _i32(3), 5, ValueError, r"indptr and offsets must be in the same memory"),
    (_i32(4, device=0), _i32(3, device=1), 5, ValueError, r"indptr and offsets must be in the same memory"),
    (_i32(4), _i32(3), -1, ValueError, r"nnz: expected a non-negative token count"),
], ids=["float-indptr", "float-offsets", "2d-indptr", "2d-offsets", "empty-indptr", "length",
        "dtype-mismatch", "host-and-device", "two-devices", "negative-nnz"])
def test_plan_positions_errors(indptr, offsets, nnz, exc, match):
    """positions_from_offsets validation: type and a message naming the argument."""
    with pytest.raises(exc, match=match):
        plan_positions(indptr, offsets, nnz)


def test_plan_is_pure():
    """Planning the same call twice gives equal plans with equal, hashable specs (the
    launcher caches plans and the JIT keys modules by spec)."""
    a, b = call(), call()
    assert a == b and a is not b
    assert hash(a.spec) == hash(b.spec)
    assert {a.spec: 1}[b.spec] == 1


# ------------------------------------------------------------------ variants and mRoPE

def test_scaling_is_part_of_the_on_the_fly_spec_only():
    """The on-the-fly variant is compiled in; a cache already holds its variant, so a cache
    call keeps the plain kernel whatever scaling says."""
    assert call_fly(scaling="yarn").spec.scaling == "yarn"
    assert call_fly(scaling="llama3").spec.scaling == "llama3"
    assert call_fly().spec.scaling == "linear"
    assert call(scaling="yarn").spec.scaling == "linear"
    # the variants the kernel cannot compute are refused by name:
    q = desc((T, HQ, D))
    for rope_scaling, match in [({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not available"),
                                ({"rope_type": "ntk"}, "unknown RoPE type 'ntk'")]:
        c = RopeCall(True, None, None, True, INDPTR, frequencies_json(rope_scaling=rope_scaling))
        with pytest.raises(ValueError, match=match):
            plan_call(c, RopeArrays(q, None, None, desc((3,), "int32"), desc((2,), "int32")))


def _mrope(**overrides):
    args = dict(positions=desc((3, T), "int64"), mrope_section=(16, 24, 24))
    args.update(overrides)
    return call(**args)


def test_mrope_plan():
    """positions [3, T]: one row per section, row stride in pos_stride_row; the section is
    in the spec."""
    p = _mrope()
    assert p.spec.mrope_section == (16, 24, 24) and not p.spec.mrope_interleaved
    st = static(p)
    assert st["pos_stride_row"] == T and st["pos_stride_inner"] == 1 and st["num_tokens"] == T
    # a strided view: rows T+5 apart, tokens 2 apart
    p = _mrope(positions=desc((3, T), "int32", strides=(2 * T + 5, 2)), mrope_interleaved=True)
    st = static(p)
    assert (st["pos_stride_row"], st["pos_stride_inner"]) == (2 * T + 5, 2)
    assert p.spec.mrope_interleaved and p.spec.index_dtype == "int32"
    # [3, batch, seq] with [batch, seq, H*D] q/k
    p = _mrope(positions=desc((3, 2, 4), "int64"), query=desc((2, 4, HQ * D)),
               key=desc((2, 4, HK * D)))
    st = static(p)
    assert (st["pos_stride_row"], st["pos_stride_outer"], st["pos_stride_inner"]) == (8, 4, 1)
    assert st["inner_tokens"] == 4 and st["num_tokens"] == 8
    assert call(mrope_interleaved=True).spec.mrope_interleaved is False  # no mRoPE, no flag


def test_mrope_on_the_fly_shared_memory_holds_three_positions():
    p = call_fly(positions=desc((3, T), "int64"), indptr=None, offsets=None,
                 mrope_section=(16, 24, 24))
    tok = p.launch.block[2]
    assert p.launch.smem == tok * (D // 2 * 8 + 3 * 16)


@pytest.mark.parametrize("overrides, exc, match", [
    (dict(positions=desc((T,), "int64")), ValueError, r"^positions: mRoPE expects shape \[3, num_tokens\]"),
    (dict(positions=desc((2, T), "int64")), ValueError, r"^positions: mRoPE expects"),
    (dict(positions=desc((3, T + 1), "int64")), ValueError, r"^query: token dims"),
    (dict(mrope_section=(16, 24)), ValueError, r"^mrope_section: expected 3 integers"),
    (dict(mrope_section=(16, 24, 25)), ValueError, r"^mrope_section: expected non-negative counts summing to rotary_dim/2 = 64"),
    (dict(mrope_section=(-8, 36, 36)), ValueError, r"^mrope_section: expected non-negative"),
    (dict(mrope_section=(16.5, 23.5, 24)), TypeError, r"^mrope_section: expected an integer"),
    (dict(mrope_section=16), TypeError, r"^mrope_section: expected 3 integers"),
    (dict(positions=None, indptr=desc((3,), "int32"), offsets=desc((2,), "int32")), TypeError,
     r"^positions: mRoPE needs positions of shape \[3, num_tokens\]"),
])
def test_mrope_errors(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _mrope(**overrides)


def test_index_width_is_32_bits_only_when_every_offset_fits():
    """32-bit offset arithmetic (fewer registers) exactly when q, k, positions, the cache and
    the token count stay below 2^31 elements of reach; 64-bit beyond."""
    assert call().spec.index_bits == 32
    assert call_fly().spec.index_bits == 32
    big_stride = desc((T, HQ * D), strides=(2 ** 31 // (T - 1) + 1, 1))  # reach past 2^31
    assert call(query=big_stride).spec.index_bits == 64
    big_cache = desc((2 ** 24, D), "float32")                          # 2^24 rows x 128
    assert call(cos_sin_cache=big_cache).spec.index_bits == 64
    k_far = desc((T, HK * D), strides=(2 ** 29, 1))                    # 7 x 2^29 > 2^31
    assert call(key=k_far).spec.index_bits == 64


def test_rope_dim_offset_moves_the_rotated_dims():
    """vLLM's rope_dim_offset: the kernel's token offsets start that far into each head; the
    rotary dim must fit after it; the offset joins the vector-width constraints."""
    from rope_jit.call import with_rope_dim_offset

    base = RopeCall(True, D, None, True)
    a = RopeArrays(desc((T, HQ * D)), desc((T, HK * D)), desc((T,), "int64"),
                   cos_sin_cache=desc((4096, 64), "float32"))
    p = plan_call(with_rope_dim_offset(base, 64), a)
    assert static(p)["rot_offset"] == 64 and p.spec.vec == 8
    assert plan_call(with_rope_dim_offset(base, 4), a).spec.vec == 4  # 4 elements: 8 bytes
    with pytest.raises(ValueError, match=r"^rope_dim_offset: 65 \+ cos_sin_cache width "):
        plan_call(with_rope_dim_offset(base, 65), a)
    with pytest.raises(ValueError, match=r"^rope_dim_offset: supported in place only"):
        with_rope_dim_offset(base._replace(inplace=False), 8)
    with pytest.raises(ValueError, match=r"^rope_dim_offset: expected a non-negative"):
        with_rope_dim_offset(base, -2)
    with pytest.raises(TypeError, match=r"^rope_dim_offset: expected an integer"):
        with_rope_dim_offset(base, 2.0)


def test_enable_pdl_reaches_the_spec():
    from rope_jit.call import cache_call

    a = RopeArrays(desc((T, HQ * D)), desc((T, HK * D)), desc((T,), "int64"),
                   cos_sin_cache=desc((4096, D), "float32"))
    assert plan_call(cache_call(D, True, True, False, None, False, None, False, True), a).spec.pdl
    assert not plan_call(cache_call(D, True, True), a).spec.pdl
    with pytest.raises(TypeError, match=r"^enable_pdl: expected a bool"):
        cache_call(D, True, True, False, None, False, None, False, "yes")


# ------------------------------------------------------------------ cos/sin per token

B, S, HQ_T, HK_T, DT = 2, 5, 4, 2, 64  # transformers' shapes: [B, H, S, D] views of [B, S, H, D]


def _bhsd_view(heads, dtype="bfloat16", head_size=DT, row=None, offset=0):
    """[B, H, S, D] as transformers' attention holds q/k: q_proj's [B, S, H*D] (rows of
    `row` elements, e.g. a fused buffer) viewed as [B, S, H, D] and transposed."""
    row = row or heads * head_size
    return desc((B, heads, S, head_size), dtype, strides=(S * row, head_size, row, 1),
                ptr=BASE + offset * ITEM[dtype])


def cos_sin_call(**overrides):
    """plan_rope of transformers' apply_rotary_pos_emb: q/k [B, H, S, D] views, cos/sin
    [1, S, D] fp32 (a position_ids of batch 1), heads at dim 1, out of place."""
    from rope_jit.call import token_cos_sin_call

    args = dict(query=_bhsd_view(HQ_T), key=_bhsd_view(HK_T), cos=desc((1, S, DT), "float32"),
                sin=desc((1, S, DT), "float32", ptr=BASE + 4096), convention="cos_sin",
                is_neox=True, inplace=False, heads_dim=1, out_neox=None, num_sms=132)
    args.update(overrides)
    c = token_cos_sin_call(args.pop("convention"), args.pop("is_neox"), args.pop("inplace"),
                           args.pop("heads_dim"), args.pop("out_neox"))
    return plan_call(c, RopeArrays(args.pop("query"), args.pop("key"), cos=args.pop("cos"),
                                   sin=args.pop("sin")), num_sms=args.pop("num_sms"))


def test_cos_sin_transformers_layout():
    """q [B, H, S, D] with heads at dim 1: token dims (B, S) read through the view's strides
    (no copy); outputs contiguous in the caller's shape; cos [1, S, D] repeats over the
    batch (outer stride 0); the kernel reads cos/sin per token, not a cache by position."""
    p = cos_sin_call()
    st = static(p)
    assert p.spec.token_cos_sin and p.spec.cache_dtype == "float32" and p.spec.rotary_dim == DT
    assert p.spec.out_neox is None and p.spec.neox and p.spec.out_of_place
    assert (st["num_tokens"], st["inner_tokens"], st["num_q_heads"], st["num_k_heads"]) == (B * S, S, 4, 2)
    row = HQ_T * DT
    assert (st["q_stride_outer"], st["q_stride_inner"], st["q_stride_head"]) == (S * row, row, DT)
    # q_out: contiguous [B, H, S, D]
    assert (st["qo_stride_outer"], st["qo_stride_inner"], st["qo_stride_head"]) == (HQ_T * S * DT, DT, S * DT)
    assert (st["ko_stride_outer"], st["ko_stride_inner"], st["ko_stride_head"]) == (HK_T * S * DT, DT, S * DT)
    assert (st["cos_stride_outer"], st["cos_stride_inner"]) == (0, DT)
    assert (st["sin_stride_outer"], st["sin_stride_inner"]) == (0, DT)
    assert (st["max_position"], st["pos_stride_inner"]) == (0, 0)
    assert p.q_out_shape == (B, HQ_T, S, DT) and p.k_out_shape == (B, HK_T, S, DT)
    assert p.launch.smem == 0  # no on-the-fly tile


def test_cos_sin_layouts():
    """[B, S, H, D] (unsqueeze_dim=2 or None), [S, H, D] (-2), per-batch cos [B, S, R],
    flash-attn's [S, R/2] rows, and negative unsqueeze_dim counted as transformers does."""
    q = desc((B, S, HQ_T, DT))
    k = desc((B, S, HK_T, DT))
    cos = desc((B, S, DT), "bfloat16")
    for heads_dim in (2, -2, None):
        st = static(cos_sin_call(query=q, key=k, cos=cos, sin=cos, heads_dim=heads_dim))
        assert (st["q_stride_outer"], st["q_stride_inner"], st["q_stride_head"]) == (S * HQ_T * DT, HQ_T * DT, DT)
        assert (st["cos_stride_outer"], st["cos_stride_inner"]) == (S * DT, DT)
    assert static(cos_sin_call(heads_dim=-3))["q_stride_head"] == DT  # -3 of 4 dims is dim 1
    # [S, H, D] with cos [S, D] (Qwen2-VL's vision tower)
    p = cos_sin_call(query=desc((S, HQ_T, DT)), key=None, cos=desc((S, DT), "float32"),
                     sin=desc((S, DT), "float32"), heads_dim=-2)
    st = static(p)
    assert (st["num_tokens"], st["inner_tokens"], st["cos_stride_outer"], st["cos_stride_inner"]) == (S, S, 0, DT)
    # flash-attn: x [B, S, H, D], cos [S, R/2]: rotary_dim is twice the width
    p = cos_sin_call(query=q, key=None, cos=desc((S, 16), "float32"), sin=desc((S, 16), "float32"),
                     convention="cos_sin_half", heads_dim=None, is_neox=False)
    st = static(p)
    assert p.spec.rotary_dim == 32 and not p.spec.neox
    assert (st["cos_stride_outer"], st["cos_stride_inner"]) == (0, 16)


def test_cos_sin_partial_rotary_and_dtypes():
    """A cos narrower than the head rotates that many dims (the rest passes through); cos
    dtype is independent of q's; cos and sin may have their own strides."""
    cos = desc((B, S, 32), "float16", strides=(S * 64, 64, 1))  # a slice of wider rows
    sin = desc((B, S, 32), "float16", strides=(S * 32, 32, 1), ptr=BASE + 8192)
    p = cos_sin_call(query=_bhsd_view(HQ_T, "float32"), key=_bhsd_view(HK_T, "float32"),
                     cos=cos, sin=sin)
    st = static(p)
    assert p.spec.rotary_dim == 32 and p.spec.head_size == DT and p.spec.cache_dtype == "float16"
    assert p.spec.dtype == "float32"
    assert (st["cos_stride_outer"], st["cos_stride_inner"], st["sin_stride_outer"],
            st["sin_stride_inner"]) == (S * 64, 64, S * 32, 32)


def test_cos_sin_vector_widths_follow_alignment():
    """16-byte q/k accesses where strides and pointers allow; the cos/sin access width
    shrinks with their strides and pointers, never past q's."""
    p = cos_sin_call()
    assert (p.spec.vec, p.spec.cache_vec) == (8, 4)  # bf16 q, fp32 cos
    p = cos_sin_call(cos=desc((1, S, DT), "float32", ptr=BASE + 4))
    assert (p.spec.vec, p.spec.cache_vec) == (8, 1)
    p = cos_sin_call(sin=desc((1, S, DT), "float32", strides=(0, 66, 1)))
    assert p.spec.cache_vec == 2
    p = cos_sin_call(query=_bhsd_view(HQ_T, row=HQ_T * DT + 2))  # fused rows, 4-byte steps
    assert (p.spec.vec, p.spec.cache_vec) == (2, 2)
    # DeepSeek's k_rot: a 16-wide slice at offset 32 of [B, S, 48] rows
    k_rot = desc((B, 1, S, 16), strides=(S * 48, S * 48, 48, 1), ptr=BASE + 32 * 2)
    p = cos_sin_call(query=_bhsd_view(HQ_T, head_size=16), key=k_rot,
                     cos=desc((1, S, 16), "bfloat16"), sin=desc((1, S, 16), "bfloat16"))
    assert p.spec.rotary_dim == 16 and p.spec.vec == 8


def test_cos_sin_dispatch_is_the_cache_one():
    """Per-token cos/sin is read like a cache (no shared tile): the dispatch rules of cache
    kernels, with their block sizes."""
    p = cos_sin_call()
    chunks = DT // 2 // p.spec.vec
    assert p.launch == choose_launch(B * S, chunks, HQ_T + HK_T, 132, False, TUNING)[2]


def test_cos_sin_in_place_and_output_order():
    """In place writes the inputs; pairs written in the other order (DeepSeek's interleaved
    RoPE) are out of place only."""
    p = cos_sin_call(inplace=True)
    st = static(p)
    assert not p.spec.out_of_place and st["qo_stride_head"] == st["q_stride_head"]
    p = cos_sin_call(is_neox=False, out_neox=True)
    assert not p.spec.neox and p.spec.out_neox is True
    assert cos_sin_call(is_neox=True, out_neox=True).spec.out_neox is None  # the same order
    with pytest.raises(ValueError, match=r"^out_neox: writing the pairs in the other order needs separate"):
        cos_sin_call(is_neox=False, out_neox=True, inplace=True)


def test_transpose_is_the_backward_call():
    """RopeCall.transpose: the inverse rotation, reading pairs in the order the call
    writes them and writing them in the order it reads them."""
    from rope_jit.call import token_cos_sin_call

    c = token_cos_sin_call("cos_sin", False, False, 1, True)
    t = c.transpose()
    assert (t.inverse, t.is_neox, t.out_neox) == (True, True, False)
    assert t.transpose() == c
    plain = token_cos_sin_call("cos_sin", True, False, 1)
    assert plain.transpose() == plain._replace(inverse=True)
    cache = RopeCall(False, D, None, True, POSITIONS, None, None, False, False, True)
    assert cache.transpose() == cache._replace(inverse=True, check_positions=False)


COS_SIN_ERRORS = [
    ("cos-int", dict(cos=desc((1, S, DT), "int32")), TypeError, r"^cos: expected dtype float16 or bfloat16 or float32"),
    ("cos-none", dict(cos=None), TypeError, r"^cos: expected a float16, bfloat16 or float32 array, got None"),
    ("sin-dtype", dict(sin=desc((1, S, DT), "bfloat16")), TypeError, r"^sin: dtype bfloat16 differs from cos dtype float32"),
    ("sin-shape", dict(sin=desc((1, S, 32), "float32")), ValueError, r"^sin: shape \[1, 5, 32\] differs from cos shape \[1, 5, 64\]"),
    ("cos-host", dict(cos=desc((1, S, DT), "float32", device=HOST)), TypeError, r"^cos: expected a CUDA device array .*host memory"),
    ("sin-device", dict(sin=desc((1, S, DT), "float32", device=1)), ValueError, r"^sin is on cuda:1 but query is on cuda:0"),
    ("cos-seq", dict(cos=desc((1, S + 1, DT), "float32"), sin=desc((1, S + 1, DT), "float32")), ValueError,
     r"^cos: expected shape \[\.\.\., rotary_dim\] whose leading dims broadcast to the token dims \[2, 5\] of query, got \[1, 6, 64\]"),
    ("cos-too-many-dims", dict(cos=desc((1, 1, S, DT), "float32"), sin=desc((1, 1, S, DT), "float32")), ValueError,
     r"^cos: expected shape \[\.\.\., rotary_dim\] whose leading dims broadcast"),
    ("cos-batch", dict(cos=desc((3, S, DT), "float32"), sin=desc((3, S, DT), "float32")), ValueError, r"^cos: expected shape"),
    ("cos-last-dim", dict(cos=desc((1, S, DT), "float32", strides=(2 * S * DT, 2 * DT, 2))), ValueError,
     r"^cos: the last dim must be contiguous \(stride 1\), got stride 2"),
    ("cos-odd-width", dict(cos=desc((1, S, 63), "float32"), sin=desc((1, S, 63), "float32")), ValueError,
     r"^cos width \(rotary_dim\): expected a positive even number, got 63"),
    ("cos-wider-than-head", dict(cos=desc((1, S, 2 * DT), "float32"), sin=desc((1, S, 2 * DT), "float32")), ValueError,
     r"^cos width \(rotary_dim\): 128 exceeds head_size 64"),
    ("half-wider-than-head", dict(cos=desc((S, DT), "float32"), sin=desc((S, DT), "float32"), convention="cos_sin_half"),
     ValueError, r"^2 x cos width \(rotary_dim\): 128 exceeds head_size 64"),
    ("heads-dim-last", dict(heads_dim=3), ValueError, r"^unsqueeze_dim: 3 does not name a heads dim of query with shape \[2, 4, 5, 64\]"),
    ("heads-dim-range", dict(heads_dim=-5), ValueError, r"^unsqueeze_dim: -5 does not name a heads dim"),
    ("heads-dim-float", dict(heads_dim=1.0), TypeError, r"^unsqueeze_dim: expected an integer"),
    ("query-2d", dict(query=desc((B * S, HQ_T * DT)), key=None), ValueError, r"^query: expected \[num_tokens, num_heads, head_size\] or \[batch, seq"),
    ("key-tokens", dict(key=desc((B, HK_T, S + 1, DT))), ValueError, r"^key: token dims \[2, 6\] do not match the query shape \[2, 5\]"),
    ("key-ndim", dict(key=desc((B, S, HK_T * DT))), ValueError, r"^key: expected shape \[batch, seq, num_heads, head_dim\]"),
    ("key-head-size", dict(key=desc((B, HK_T, S, 32))), ValueError, r"^key: last dim 32 must equal head_size 64"),
    ("key-dtype", dict(key=_bhsd_view(HK_T, "float16")), TypeError, r"^key: dtype float16 differs from query dtype bfloat16"),
]


@pytest.mark.parametrize("overrides, exc, match", [e[1:] for e in COS_SIN_ERRORS],
                         ids=[e[0] for e in COS_SIN_ERRORS])
def test_cos_sin_invalid_call(overrides, exc, match):
    with pytest.raises(exc, match=match):
        cos_sin_call(**overrides)


def test_cos_sin_refuses_what_it_has_no_meaning_for():
    """mRoPE sections (transformers selects them into cos/sin) and a heads dim with
    positions: named errors."""
    from rope_jit.call import token_cos_sin_call

    c = token_cos_sin_call("cos_sin", True, False, 1)._replace(mrope_section=(8, 12, 12))
    with pytest.raises(ValueError, match=r"^mrope_section: not supported with per-token cos/sin"):
        plan_call(c, RopeArrays(_bhsd_view(HQ_T), None, cos=desc((1, S, DT), "float32"),
                                sin=desc((1, S, DT), "float32")))
    c = RopeCall(True, D, None, True, POSITIONS, heads_dim=1)
    with pytest.raises(ValueError, match=r"^unsqueeze_dim: a heads dim other than"):
        plan_call(c, RopeArrays(desc((1, HQ, T, D)), None, desc((1, T), "int64"), None, None,
                                desc((4096, D), "float32")))
    with pytest.raises(ValueError, match=r"^convention: expected one of"):
        token_cos_sin_call("positions", True, False)


@pytest.mark.nvrtc
@pytest.mark.parametrize("dtype, cos_dtype", [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                              ("float16", "float16"), ("float32", "bfloat16")])
def test_cos_sin_specializations_compile_for_sm_90(dtype, cos_dtype):
    """Every kind of per-token kernel compiles with NVRTC for sm_90: both styles, in and
    out of place, the other output order (and its backward), partial rotary, vector widths
    down to 1."""
    from rope_jit import jit

    seen = set()
    for is_neox, out_neox, inplace, inverse, width, row in [
            (True, None, False, False, DT, None), (True, None, True, False, 32, None),
            (False, None, False, True, DT, None), (False, None, True, False, 32, None),
            (False, True, False, False, DT, None), (True, False, False, True, DT, None),
            (False, True, False, False, 32, HQ_T * DT + 1), (True, None, False, False, 16, HQ_T * DT + 1)]:
        cos = desc((1, S, width), cos_dtype)
        p = cos_sin_call(query=_bhsd_view(HQ_T, dtype, row=row), key=_bhsd_view(HK_T, dtype, row=row),
                         cos=cos, sin=cos, is_neox=is_neox, out_neox=out_neox, inplace=inplace)
        spec = p.spec if not inverse else p.spec.__class__(**{**p.spec.__dict__, "inverse": True})
        seen.add(spec)
    assert any(s.vec == 1 for s in seen) and any(s.out_neox is not None for s in seen)
    assert {s.index_bits for s in seen} == {32}
    seen.add(dataclasses.replace(min(seen, key=lambda s: s.vec), index_bits=64))
    for spec in seen:
        assert jit.build(spec, "sm_90")[:4] == b"\x7fELF", spec.words()


@pytest.mark.nvrtc
@pytest.mark.parametrize("knob", [dict(staging=1), dict(staging=2), dict(pdl=True)])
@pytest.mark.parametrize("what", ["per-token", "reordered"])
def test_cos_sin_kernels_refuse_staging_and_pdl(knob, what):
    """Per-token cos/sin and reordered pairs exist in the register path only, and PDL's
    prologue would read cos/sin before the previous kernel is done: such a spec fails to
    compile (a static_assert), so no planner or tuner change can launch one."""
    from rope_jit import jit
    from rope_jit.jit import CompileError

    spec = cos_sin_call(is_neox=what == "per-token", out_neox=None if what == "per-token" else True).spec
    with pytest.raises(CompileError, match="STAGING 0, no PDL"):
        jit.build(dataclasses.replace(spec, **knob), "sm_90")


def test_cos_sin_reach_sets_the_index_width():
    """cos/sin are arrays the kernel indexes: their reach counts for 32-bit offsets."""
    assert cos_sin_call().spec.index_bits == 32
    far = desc((B, S, DT), "float32", strides=(2 ** 31, 64, 1))  # batch rows 2^31 apart
    assert cos_sin_call(cos=far, sin=far).spec.index_bits == 64


def test_cos_sin_shape_class_is_the_cache_one():
    """Tuned knobs are looked up by shape class: per-token cos/sin takes those of a cache of
    its dtype (read, not computed on the fly)."""
    seen = []

    def lookup(shape, num_tokens):
        seen.append((shape, num_tokens))
        return TUNING

    from rope_jit.call import token_cos_sin_call

    plan_call(token_cos_sin_call("cos_sin", True, False, 1),
              RopeArrays(_bhsd_view(HQ_T), _bhsd_view(HK_T), cos=desc((1, S, DT), "float16"),
                         sin=desc((1, S, DT), "float16")), tuning=lookup)
    ((shape, tokens),) = seen
    assert shape.cos_sin == "float16" and tokens == B * S and shape.num_heads == HQ_T + HK_T


def test_argument_struct_layout_and_packing():
    """The kernel's argument struct: the fields a decode call's exit test and position load
    read share one 64-byte constant-cache line on sm_90 (arguments at c[0x0][0x210]); the
    pointers are contiguous, packed alone at pointer_offset; the plan's values fill the
    rest, in static_names order."""
    p = ROPE_PARAMS
    offset = {n: 8 * i for i, n in enumerate(p.names)}
    hot = ("num_tokens", "num_q_heads", "num_k_heads", "pos_stride_inner", "positions")
    assert {(0x210 + offset[n]) // 64 for n in hot} == {0x210 // 64}
    assert p.pointer_offset == offset[ROPE_POINTERS[0]] == 8 * len(ROPE_LEAD)
    assert p.names[len(ROPE_LEAD):len(ROPE_LEAD) + len(ROPE_POINTERS)] == ROPE_POINTERS
    assert set(p.static_names).isdisjoint(ROPE_POINTERS)
    assert len(p.static_names) + len(ROPE_POINTERS) == len(p.names)
    assert p.c_decl.index("num_tokens;") < p.c_decl.index("positions;") < p.c_decl.index(
        "q;") < p.c_decl.index("freq_exponent;")

    static = tuple(range(1, len(p.static_names) + 1))  # distinct values (doubles too)
    pointers = tuple(1000 + i for i in range(len(ROPE_POINTERS)))
    fields = dict(zip(p.names, p.packer.unpack(p.pack(pointers, static))))
    assert all(fields[n] == v for n, v in zip(ROPE_POINTERS, pointers))
    assert all(fields[n] == v for n, v in zip(p.static_names, static))
    buf = bytearray(p.size)
    p.pack_static_into(buf, static)
    fields = dict(zip(p.names, p.packer.unpack(bytes(buf))))
    assert all(fields[n] == 0 for n in ROPE_POINTERS)
    assert all(fields[n] == v for n, v in zip(p.static_names, static))
    with pytest.raises(ValueError, match="contiguous"):
        ParamStruct("Bad", [("a", "q"), ("n", "q"), ("b", "q")], pointers=("a", "b"))
