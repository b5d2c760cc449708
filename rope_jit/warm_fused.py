"""Ahead-of-time warming of the fused kernels (``rope_jit.api_fused``), as ``rope_jit.warm``
does for plain RoPE: describe the arrays an engine passes to each fused function for a
model, run ``plan_fused``'s planner on them and collect the specs it returns, for
``warm.warm`` to compile.

A fused kernel's spec depends on the token count and the GPU's SM count only through how
many items a thread does (the one-item kernel for few tokens, batches of two for many), so
the planner is run at every power of two up to the most tokens, on each SM count. It also
depends on what each function is given (dtypes, head counts, rope/nope widths, page or
block size, FP8 type, where the scales live) and on the vector width the arrays' strides
and alignment allow. The arrays below are laid out as the peers'
callers lay them out (vLLM's q/k/v as column slices of one QKV buffer, its MLA q_pe and
k_pe as slices of wider rows), so the planner picks the width a real call gets; tests
check the derived specs against calls built independently from the peers' layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arrays import ArrayDesc, contiguous_strides
from .call import frequencies_json
from .call_fused import (APPEND_PAGED, KV_BUFFER, KV_CACHE, MLA_CACHE, ROPE_QUANTIZE,
                         fused_rope_call, qk_norm_rope_call)
from .dtypes import FP8_DTYPES, ITEMSIZE
from .plan_fused import FusedRopeArrays, QKNormRopeArrays, plan_qk_norm_rope, plan_rope_fused
from .warm import (ANY_SM_COUNTS, DEFAULT_MAX_TOKENS, SCALING_EXAMPLES, CallShape,
                   check_call_dtypes, model_call)

QK_NORM_ROPE = "fused_qk_norm_rope"
# Public function -> which attention it serves: "gqa" (per-head keys), "mla" (one latent row
# and one rope key per token) or both.
FUSED_FUNCTIONS = {
    "rope_quantize_fp8": ("gqa", "mla"),             # FlashInfer (MLA: mla_rope_quantize_fp8)
    "rope_quantize_fp8_append_paged_kv_cache": ("gqa", "mla"),   # FlashInfer
    "rope_and_reshape_and_cache_flash": ("gqa",),    # vLLM rotary_embedding + reshape_and_cache_flash
    "concat_and_cache_mla_rope_fused": ("mla",),     # vLLM
    "apply_rope_with_cos_sin_cache_inplace": ("gqa",),  # SGLang, with fused_set_kv_buffer_arg
    QK_NORM_ROPE: ("gqa",),                          # vLLM
}

# MLA presets' latent dims (config.json kv_lora_rank, qk_nope_head_dim): FlashInfer's MLA
# callers pass q_nope at either width (absorbed into the latent space, or not).
MLA_DIMS = {"deepseek-v3": dict(kv_lora_rank=512, qk_nope_head_dim=128)}

# vLLM's kv_cache_dtype string of each cache storage (None: the input dtype)
_VLLM_KV_CACHE_DTYPE = {None: "auto", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8_e5m2"}

_PTR = 1 << 32       # a synthetic 256-byte aligned base address (alignment is all planning reads)
_CACHE_ROWS = 4096   # cos/sin rows; the count changes no specialization
_PAGES = 64          # pages or blocks of a synthetic KV cache


@dataclass(frozen=True)
class FusedCallShape:
    """One way a model calls one fused function: everything its spec depends on.

    function: a FUSED_FUNCTIONS name. num_q_heads/num_kv_heads/head_size/rotary_dim: the
    model's per-rank heads, as in ``warm.CallShape``. kv_lora_rank > 0 makes it MLA: one
    key row per token, rope part rotary_dim wide, latent part kv_lora_rank wide, and
    q_nope_dim the no-rope part of q per head. kv_dtype: the FP8 type of FlashInfer's
    outputs and of every KV cache, or None for the input dtype (no quantization).
    page_size: FlashInfer's page size, vLLM's block size. kv_layout: FlashInfer's paged
    layout (GQA). scaling: the on-the-fly frequency variant when cache_dtype is None.
    """

    function: str
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    rotary_dim: int | None = None
    dtype: str = "bfloat16"
    cache_dtype: str | None = "float32"
    scaling: str = "linear"
    is_neox: bool = True
    index_dtype: str = "int64"
    kv_dtype: str | None = "float8_e4m3fn"
    page_size: int = 16
    kv_layout: str = "NHD"
    kv_lora_rank: int = 0
    q_nope_dim: int = 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rot(self) -> int:
        return self.rotary_dim or self.head_size

    def words(self) -> str:
        heads = (f"MLA {self.num_q_heads} heads rope {self.rot} q nope {self.q_nope_dim} latent "
                 f"{self.kv_lora_rank}" if self.mla else
                 f"{self.num_q_heads}/{self.num_kv_heads} heads x {self.head_size} (rotary {self.rot})")
        cs = f"{self.cache_dtype} cache" if self.cache_dtype else f"on the fly {self.scaling}"
        return (f"{self.function}: {heads} {self.dtype} {'neox' if self.is_neox else 'gptj'} {cs} "
                f"{self.index_dtype} kv {self.kv_dtype or 'unquantized'} page {self.page_size}"
                f"{' ' + self.kv_layout if self.function == 'rope_quantize_fp8_append_paged_kv_cache' else ''}")


def inapplicable(shape: FusedCallShape) -> str | None:
    """Why `shape` is not a call its function takes (None: it is)."""
    kinds = FUSED_FUNCTIONS.get(shape.function)
    if kinds is None:
        return f"unknown fused function {shape.function!r}; known: {', '.join(FUSED_FUNCTIONS)}"
    if ("mla" if shape.mla else "gqa") not in kinds:
        need = "an MLA model (a latent KV row)" if "mla" in kinds else "per-head keys (not MLA)"
        return f"{shape.function} needs {need}"
    if shape.function == "apply_rope_with_cos_sin_cache_inplace" and shape.cache_dtype is None:
        return f"{shape.function} takes a cos/sin cache (SGLang's function has no on-the-fly mode)"
    if shape.function == QK_NORM_ROPE and shape.dtype not in ("float16", "bfloat16"):
        return f"{shape.function} takes float16 or bfloat16 qkv, not {shape.dtype}"
    if shape.kv_dtype is not None and shape.kv_dtype not in FP8_DTYPES:
        return f"kv dtype: expected one of {', '.join(FP8_DTYPES)} or None, got {shape.kv_dtype!r}"
    return None


def fused_model_calls(model: str, function: str, *, tp: int = 1, **fields) -> list[FusedCallShape]:
    """The FusedCallShapes of a preset model (warm.MODELS) per rank of `tp` for one
    function: for an MLA preset (MLA_DIMS) q_nope at both widths where it is passed."""
    call = model_call(model, tp=tp)
    base = dict(function=function, num_q_heads=call.num_q_heads, num_kv_heads=call.num_kv_heads,
                head_size=call.head_size, rotary_dim=call.rotary_dim, is_neox=call.is_neox)
    mla = MLA_DIMS.get(model)
    if mla is None:
        return [FusedCallShape(**{**base, **fields})]
    lora, nope = mla["kv_lora_rank"], mla["qk_nope_head_dim"]
    q_nopes = (lora, nope) if function in ("rope_quantize_fp8",
                                           "rope_quantize_fp8_append_paged_kv_cache") else (nope,)
    return [FusedCallShape(**{**base, **fields}, kv_lora_rank=lora, q_nope_dim=qn) for qn in q_nopes]


# ------------------------------------------------------------------ describing a call

def _desc(shape: tuple, dtype: str, strides: tuple | None = None, offset: int = 0) -> ArrayDesc:
    shape = tuple(shape)
    return ArrayDesc(_PTR + offset, shape, contiguous_strides(shape) if strides is None else strides,
                     dtype, 0)


def _frequencies(s: FusedCallShape) -> str | None:
    return None if s.cache_dtype else frequencies_json(rope_scaling=SCALING_EXAMPLES[s.scaling])


def _cos_sin(s: FusedCallShape) -> ArrayDesc | None:
    return _desc((_CACHE_ROWS, s.rot), s.cache_dtype) if s.cache_dtype else None


def _qkv_slices(s: FusedCallShape, T: int, *, heads_3d: bool = False) -> tuple:
    """query, key, value as vLLM/SGLang pass them: column slices of one QKV projection
    output [T, (q + 2 kv heads) * head_size]; value [T, kv heads, head_size] if heads_3d."""
    d, hq, hk, size = s.head_size, s.num_q_heads, s.num_kv_heads, ITEMSIZE[s.dtype]
    row = (hq + 2 * hk) * d
    q = _desc((T, hq * d), s.dtype, (row, 1))
    k = _desc((T, hk * d), s.dtype, (row, 1), hq * d * size)
    v_offset = (hq + hk) * d * size
    v = (_desc((T, hk, d), s.dtype, (row, d, 1), v_offset) if heads_3d
         else _desc((T, hk * d), s.dtype, (row, 1), v_offset))
    return q, k, v


def _flashinfer_inputs(s: FusedCallShape, T: int) -> dict:
    """q_rope, k_rope, q_nope, k_nope (and v) as FlashInfer's callers pass them: separate
    contiguous arrays; MLA keys 2-D."""
    hq, hk, r = s.num_q_heads, s.num_kv_heads, s.rot
    if s.mla:
        return dict(q_rope=_desc((T, hq, r), s.dtype), k_rope=_desc((T, r), s.dtype),
                    q_nope=_desc((T, hq, s.q_nope_dim), s.dtype) if s.q_nope_dim else None,
                    k_nope=_desc((T, s.kv_lora_rank), s.dtype))
    nope = s.head_size - r
    return dict(q_rope=_desc((T, hq, r), s.dtype), k_rope=_desc((T, hk, r), s.dtype),
                q_nope=_desc((T, hq, nope), s.dtype) if nope else None,
                k_nope=_desc((T, hk, nope), s.dtype) if nope else None)


def _rope_quantize(s: FusedCallShape, T: int) -> tuple:
    call = fused_rope_call(ROPE_QUANTIZE, s.is_neox, _frequencies(s), None, None,
                           s.kv_dtype or s.dtype)
    return call, FusedRopeArrays(**_flashinfer_inputs(s, T), pos_ids=_desc((T,), s.index_dtype),
                                 cos_sin_cache=_cos_sin(s))


def _append_paged(s: FusedCallShape, T: int) -> tuple:
    ps, hk, store = s.page_size, s.num_kv_heads, s.kv_dtype or s.dtype
    x = _flashinfer_inputs(s, T)
    if s.mla:
        caches = dict(cache0=_desc((_PAGES, ps, s.kv_lora_rank), store),
                      cache1=_desc((_PAGES, ps, s.rot), store))
    else:
        page = (ps, hk, s.head_size) if s.kv_layout == "NHD" else (hk, ps, s.head_size)
        caches = dict(cache0=_desc((_PAGES, *page), store), cache1=_desc((_PAGES, *page), store))
        x["v"] = _desc((T, hk, s.head_size), s.dtype)
    tables = dict(batch_indices=_desc((T,), "int32"), positions=_desc((T,), "int32"),
                  kv_indices=_desc((_PAGES,), "int32"), kv_indptr=_desc((2,), "int32"))
    call = fused_rope_call(APPEND_PAGED, s.is_neox, _frequencies(s), None, None, s.kv_dtype,
                           1.0, 1.0, 1.0, ps, s.kv_layout)
    return call, FusedRopeArrays(**x, **caches, **tables, pos_ids=_desc((T,), s.index_dtype),
                                 cos_sin_cache=_cos_sin(s))


def _vllm_cache_storage(s: FusedCallShape) -> str:
    return "uint8" if s.kv_dtype else s.dtype  # vLLM allocates FP8 caches as bytes


def _kv_cache(s: FusedCallShape, T: int) -> tuple:
    """vLLM: rotary_embedding on q/k slices, then reshape_and_cache_flash into
    [num_blocks, block_size, kv heads, head_size] caches with device scales."""
    q, k, v = _qkv_slices(s, T)
    cache = _desc((_PAGES, s.page_size, s.num_kv_heads, s.head_size), _vllm_cache_storage(s))
    scale = _desc((1,), "float32")
    call = fused_rope_call(KV_CACHE, s.is_neox, _frequencies(s), s.head_size,
                           None if s.cache_dtype else s.rotary_dim, None, 1.0, 1.0, 1.0, 0, "NHD",
                           _VLLM_KV_CACHE_DTYPE[s.kv_dtype])
    return call, FusedRopeArrays(q, k, v=v, cache0=cache, cache1=cache,
                                 pos_ids=_desc((T,), s.index_dtype), cos_sin_cache=_cos_sin(s),
                                 slot_mapping=_desc((T,), "int64"), k_scale=scale, v_scale=scale)


def _mla_cache(s: FusedCallShape, T: int) -> tuple:
    """vLLM's MLA: q_pe the rope part of q [T, heads, q nope + rope]; k_pe and kv_c the
    two parts of the latent projection's rows [T, kv_lora_rank + rope]."""
    r, lora, size = s.rot, s.kv_lora_rank, ITEMSIZE[s.dtype]
    q_head = s.q_nope_dim + r
    q_pe = _desc((T, s.num_q_heads, r), s.dtype, (s.num_q_heads * q_head, q_head, 1),
                 s.q_nope_dim * size)
    kv_c = _desc((T, lora), s.dtype, (lora + r, 1))
    k_pe = _desc((T, r), s.dtype, (lora + r, 1), lora * size)
    call = fused_rope_call(MLA_CACHE, s.is_neox, _frequencies(s), None, None, None, 1.0, 1.0,
                           1.0, 0, "NHD", _VLLM_KV_CACHE_DTYPE[s.kv_dtype])
    return call, FusedRopeArrays(
        q_pe, k_pe, k_nope=kv_c, cache0=_desc((_PAGES, s.page_size, lora + r), _vllm_cache_storage(s)),
        pos_ids=_desc((T,), s.index_dtype), cos_sin_cache=_cos_sin(s),
        slot_mapping=_desc((T,), "int64"), k_scale=_desc((1,), "float32"))


def _kv_buffer(s: FusedCallShape, T: int) -> tuple:
    """SGLang: q/k slices rotated in place, key and value into its token-slot buffers
    [slots, kv heads, head_size] at cache_loc (host scales)."""
    q, k, v = _qkv_slices(s, T, heads_3d=True)
    buffer = _desc((_PAGES * s.page_size, s.num_kv_heads, s.head_size), s.kv_dtype or s.dtype)
    call = fused_rope_call(KV_BUFFER, s.is_neox, None, s.head_size)
    return call, FusedRopeArrays(q, k, v=v, cache0=buffer, cache1=buffer,
                                 pos_ids=_desc((T,), s.index_dtype), cos_sin_cache=_cos_sin(s),
                                 slot_mapping=_desc((T,), "int64"))


def _qk_norm_rope(s: FusedCallShape, T: int) -> tuple:
    hq, hk, d = s.num_q_heads, s.num_kv_heads, s.head_size
    call = qk_norm_rope_call(hq, hk, hk, d, 1e-6, s.is_neox, _frequencies(s),
                             None if s.cache_dtype else s.rotary_dim)
    weight = _desc((d,), s.dtype)
    return call, QKNormRopeArrays(_desc((T, (hq + 2 * hk) * d), s.dtype), weight, weight,
                                  _desc((T,), s.index_dtype), _cos_sin(s))


_DESCRIBE = {"rope_quantize_fp8": _rope_quantize,
             "rope_quantize_fp8_append_paged_kv_cache": _append_paged,
             "rope_and_reshape_and_cache_flash": _kv_cache,
             "concat_and_cache_mla_rope_fused": _mla_cache,
             "apply_rope_with_cos_sin_cache_inplace": _kv_buffer,
             QK_NORM_ROPE: _qk_norm_rope}
assert set(_DESCRIBE) == set(FUSED_FUNCTIONS)


def fused_call(shape: FusedCallShape, num_tokens: int) -> tuple:
    """(call, arrays) of `shape` at `num_tokens` tokens, as the public function builds them."""
    return _DESCRIBE[shape.function](shape, num_tokens)


def fused_token_counts(max_tokens: int) -> list[int]:
    """Every power of two up to max_tokens, and max_tokens: a thread's item count (ceil of
    tokens x items / a wave of threads, rounded up to a power of two) doubles at most per
    doubling of the tokens, so these meet every item batch the planner can pick."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive token count, got {max_tokens}")
    return sorted({1 << i for i in range(max_tokens.bit_length())} | {max_tokens})


def specs_for_fused_call(shape: FusedCallShape, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                         sm_counts=ANY_SM_COUNTS) -> list:
    """The distinct specs the planner picks for `shape` over 1..max_tokens tokens and the
    given SM counts, in the order first met. ValueError for a call its function does not
    take, or the planner's TypeError / ValueError for one it refuses."""
    reason = inapplicable(shape)
    if reason is not None:
        raise ValueError(reason)
    if shape.scaling not in SCALING_EXAMPLES:
        raise ValueError(f"scaling: expected one of {', '.join(SCALING_EXAMPLES)}, "
                         f"got {shape.scaling!r}")
    check_call_dtypes(CallShape(1, 0, shape.head_size, dtype=shape.dtype,
                                 cache_dtype=shape.cache_dtype, index_dtype=shape.index_dtype))
    planner = plan_qk_norm_rope if shape.function == QK_NORM_ROPE else plan_rope_fused
    found: dict = {}
    for n in fused_token_counts(max_tokens):
        call, arrays = fused_call(shape, n)
        for sms in sm_counts:
            found.setdefault(planner(call, arrays, num_sms=sms).spec, None)
    return list(found)
