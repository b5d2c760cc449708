"""Validation and launch planning of the fused ops: pure functions over a call
(``rope_jit.call_fused``) and ``ArrayDesc``s, no GPU needed.

``plan_rope_fused`` maps each public fused function onto the one kernel of
``kernels/rope_fused.cu`` (what is rotated, copied, quantized, and written where), checking
every array first: each error is a TypeError/ValueError naming the argument as the public
function calls it, and the expectation, raised before anything runs. ``plan_qk_norm_rope``
does the same for ``kernels/qk_norm_rope.cu``. Their steps are the named functions below,
in the order they run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from .arrays import ArrayDesc, contiguous_strides
from .call_fused import (APPEND_PAGED, KV_BUFFER, KV_CACHE, KV_CACHE_DTYPES, MLA_CACHE,
                         QUANTIZE_DTYPES, ROPE_QUANTIZE, FusedRopeCall, QKNormRopeCall)
from .dtypes import FLOAT_DTYPES, FP8_DTYPES, ITEMSIZE
from .plan import (Launch, choose_vec, device_array, float_array, index_array, norm_strides,
                   same_device)
from .scaling import OnTheFly, on_the_fly_values
from .specs_fused import (FUSED_ROPE_PARAMS, QK_NORM_ROPE_PARAMS, FusedRopeSpec,
                          QKNormRopeSpec)

_HALF_DTYPES = ("float16", "bfloat16")


class FusedRopeArrays(NamedTuple):
    """The arrays of one fused RoPE call, described; None where the call has none. The
    fields are the kernel's pointers (specs_fused.FUSED_ROPE_POINTERS, which orders them
    as the kernel reads them), in the public functions' order: q_rope first."""

    q_rope: ArrayDesc
    k_rope: ArrayDesc | None = None
    q_nope: ArrayDesc | None = None
    k_nope: ArrayDesc | None = None
    v: ArrayDesc | None = None
    q_rope_out: ArrayDesc | None = None
    k_rope_out: ArrayDesc | None = None
    q_nope_out: ArrayDesc | None = None
    k_nope_out: ArrayDesc | None = None
    cache0: ArrayDesc | None = None
    cache1: ArrayDesc | None = None
    pos_ids: ArrayDesc | None = None
    cos_sin_cache: ArrayDesc | None = None
    slot_mapping: ArrayDesc | None = None
    batch_indices: ArrayDesc | None = None
    positions: ArrayDesc | None = None
    kv_indices: ArrayDesc | None = None
    kv_indptr: ArrayDesc | None = None
    k_scale: ArrayDesc | None = None
    v_scale: ArrayDesc | None = None


assert sorted(FusedRopeArrays._fields) == sorted(FUSED_ROPE_PARAMS.pointers), \
    "FusedRopeArrays must have the kernel's pointers"

# What each public function calls the arrays (errors name them so); fields not listed keep
# their own name.
ARG_NAMES = {
    ROPE_QUANTIZE: {},
    APPEND_PAGED: {"cache0": "paged_kv_cache[0]", "cache1": "paged_kv_cache[1]"},
    MLA_CACHE: {"q_rope": "q_pe", "k_rope": "k_pe", "k_nope": "kv_c", "pos_ids": "positions",
                "cache0": "kv_cache", "k_scale": "kv_cache_scale"},
    KV_CACHE: {"q_rope": "query", "k_rope": "key", "v": "value",
               "pos_ids": "positions", "cache0": "key_cache", "cache1": "value_cache"},
    KV_BUFFER: {"q_rope": "query", "k_rope": "key", "v": "fused_set_kv_buffer_arg.value",
                "pos_ids": "positions",
                "cache0": "fused_set_kv_buffer_arg.k_buffer",
                "cache1": "fused_set_kv_buffer_arg.v_buffer",
                "slot_mapping": "fused_set_kv_buffer_arg.cache_loc"},
}

# The outputs each function returns, in order (the others return None).
RETURNS = {
    ROPE_QUANTIZE: ("q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out"),
    APPEND_PAGED: ("q_rope_out", "q_nope_out"),
}

# The arrays each function writes (the torch ops declare them mutated).
MUTATES = {
    ROPE_QUANTIZE: ("q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out"),
    APPEND_PAGED: ("q_rope_out", "q_nope_out", "cache0", "cache1"),
    MLA_CACHE: ("q_rope", "k_rope", "cache0"),
    KV_CACHE: ("q_rope", "k_rope", "cache0", "cache1"),
    KV_BUFFER: ("q_rope", "k_rope", "cache0", "cache1"),
}


def arg_name(call, field: str) -> str:
    """What the public function behind `call` calls the array of `field`."""
    if isinstance(call, FusedRopeCall):
        return ARG_NAMES[call.op].get(field, field)
    return field


# Launch knobs of kernels/rope_fused.cu, measured on the H200 (benchmarks/fused_lab.py,
# benchmarks/NOTES.md section 13): 128-thread blocks; a thread issues the loads of up to 2
# items together and does up to 4 such batches, so its token's position -> cos/sin and
# cache-row loads (dependent, two or three latencies) are paid over up to 8 items.
ITEM_BATCH = 2
THREAD_BATCHES = 4
BLOCK_THREADS = 128
# Few tokens of few items (a token in at most four such blocks, the grid at most one block
# an SM): blocks this large instead (0: never). H200, Llama-3-8B, 1 / 16 tokens: paged
# append 2.29 -> 2.19 / 2.47 -> 2.31 us, rope_quantize_fp8 1.74 -> 1.70 / 1.86 -> 1.81 us;
# slower where one token fills many blocks (DeepSeek-V3 absorbed MLA, 9288 items a token:
# 1.83 -> 1.94 us) or the grid is larger (Llama at 128 tokens: 2.81 -> 2.90 us).
FEW_BLOCK_THREADS = 256
MIN_BLOCKS = 1          # kernels/rope_fused.cu register cap (1: none below 128)
MAX_BLOCK_TOKENS = 16   # tokens of a block (blockDim.y), at most
QK_BLOCK_THREADS = 256  # kernels/qk_norm_rope.cu
QK_COS_SIN_IN_REGS = True  # kernels/qk_norm_rope.cu: few tokens from a cache, no shared tile


@dataclass(frozen=True)
class FusedPlan:
    spec: FusedRopeSpec | QKNormRopeSpec | None   # None: nothing to launch
    launch: Launch | None
    static: tuple          # the struct's other values, in its params' static_names order
    device: int
    outputs: tuple = ()    # (field, shape, dtype) of each output to allocate, in field order


# ------------------------------------------------------------------ shared steps

class _Rows(NamedTuple):
    """An array seen as [tokens, heads, width]: strides in elements."""

    heads: int
    tok_stride: int
    head_stride: int
    width: int


_NO_ROWS = _Rows(0, 0, 0, 0)


def _rows(d: ArrayDesc, name: str, num_tokens: int, layouts: str, *, head_size: int | None = None,
          ndims: tuple = (2, 3)) -> _Rows:
    """d as token rows. 3-D: [tokens, heads, width]; 2-D: [tokens, heads * head_size] when
    head_size is given, else one row of its width per token (MLA's k)."""
    if d.ndim not in ndims:
        raise ValueError(f"{name}: expected {layouts}, got shape {list(d.shape)}")
    if d.shape[0] != num_tokens:
        raise ValueError(f"{name}: expected {num_tokens} tokens (its first dim), got {d.shape[0]}")
    strides = norm_strides(d)
    if d.shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got stride "
                         f"{d.strides[-1]}")
    if d.ndim == 3:
        return _Rows(d.shape[1], strides[0], strides[1], d.shape[2])
    if head_size is None:
        return _Rows(1, strides[0], 0, d.shape[1])
    if d.shape[1] % head_size:
        raise ValueError(f"{name}: last dim {d.shape[1]} is not a multiple of head_size {head_size}")
    return _Rows(d.shape[1] // head_size, strides[0], head_size, head_size)


def _index_vector(d: ArrayDesc | None, name: str, ref: ArrayDesc, ref_name: str, *,
                  min_len: int = 0) -> int:
    """A 1-D integer array on ref's device with at least min_len entries; its stride."""
    index_array(d, name)
    same_device(ref, d, name, ref_name)
    if d.ndim != 1 or d.shape[0] < min_len:
        raise ValueError(f"{name}: expected a 1-D array of at least {min_len} entries, got shape "
                         f"{list(d.shape)}")
    return norm_strides(d)[0]


class _CosSin(NamedTuple):
    max_position: int
    cache_stride: int
    fly: OnTheFly


_FROM_CACHE = OnTheFly("linear", 0.0, 1.0, 0.0, 0.0, 1.0)  # unused by cache kernels


def _cos_sin(call, c: ArrayDesc | None, rot: int, rot_name: str, ref: ArrayDesc,
             ref_name: str) -> _CosSin:
    """The cos/sin cache ([max_position, rot], any float dtype), or the on-the-fly values."""
    if not call.from_cache:
        if c is not None:
            raise ValueError("cos_sin_cache: pass either a cos/sin cache or on-the-fly "
                             "frequencies (rope_theta, rope_scale, rope_scaling), not both")
        return _CosSin(0, 0, on_the_fly_values(call.frequencies, rot))
    float_array(c, "cos_sin_cache")
    same_device(ref, c, "cos_sin_cache", ref_name)
    if c.ndim != 2:
        raise ValueError(f"cos_sin_cache: expected shape [max_position, rotary_dim], got "
                         f"{list(c.shape)}")
    strides = norm_strides(c)
    if c.shape[1] > 1 and strides[1] != 1:
        raise ValueError("cos_sin_cache: the last dim must be contiguous (stride 1)")
    if c.shape[1] != rot:
        raise ValueError(f"cos_sin_cache: width {c.shape[1]} must equal {rot_name} {rot}")
    return _CosSin(c.shape[0], strides[0], _FROM_CACHE)


def _check_rotary(rot: int, name: str, head: int | None = None) -> None:
    if rot <= 0 or rot % 2:
        raise ValueError(f"{name}: expected a positive even number, got {rot}")
    if head is not None and rot > head:
        raise ValueError(f"{name}: {rot} exceeds the head size {head}")


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def widest_vec(itemsize: int, must_divide: list, aligned: list) -> int:
    """The widest vector (elements of `itemsize` bytes, at most 16 bytes) such that every
    count and stride of must_divide is a multiple of it and every (pointer, item size) of
    aligned is aligned to it in its own type (plan.choose_vec, one type after another)."""
    by_size: dict = {}
    for ptr, size in aligned:
        by_size.setdefault(size, []).append(ptr)
    vec = choose_vec(itemsize, must_divide, by_size.pop(itemsize, []))
    for size, ptrs in by_size.items():
        vec = min(vec, choose_vec(size, must_divide + [vec], ptrs))
    return vec


# ------------------------------------------------------------------ fused RoPE: steps

class _Inputs(NamedTuple):
    num_tokens: int
    dtype: str
    q: _Rows
    k: _Rows
    q_nope: _Rows
    k_nope: _Rows
    v: _Rows
    rot: int
    kn_off: int      # element offset of the k nope part in its rows (KV ops: the rotary dim)
    mla: bool        # one 2-D key row per token


def _inputs(call: FusedRopeCall, a: FusedRopeArrays, name) -> _Inputs:
    """q/k (and nope, v) inputs: dtypes, devices, layouts, the rotary dim."""
    q = a.q_rope
    float_array(q, name("q_rope"))
    T = q.shape[0] if q.ndim else 0
    for field in ("k_rope", "q_nope", "k_nope", "v"):
        d = getattr(a, field)
        if d is None:
            continue
        float_array(d, name(field))
        if d.dtype != q.dtype:
            raise TypeError(f"{name(field)}: dtype {d.dtype} differs from {name('q_rope')} dtype "
                            f"{q.dtype}")
        same_device(q, d, name(field), name("q_rope"))
    if a.k_rope is None:
        raise TypeError(f"{name('k_rope')}: expected a float16, bfloat16 or float32 array, got None")

    if call.op in (KV_CACHE, KV_BUFFER):
        return _kv_inputs(call, a, name, T)
    fi = call.op != MLA_CACHE
    q_layout = "[nnz, num_qo_heads, rope_dim]" if fi else "[num_tokens, num_heads, rot_dim]"
    qr = _rows(q, name("q_rope"), T, q_layout, ndims=(3,))
    k_layout = ("[nnz, num_kv_heads, rope_dim] (GQA/MHA) or [nnz, rope_dim] (MLA)" if fi
                else "[num_tokens, rot_dim]")
    kr = _rows(a.k_rope, name("k_rope"), T, k_layout, ndims=(2, 3) if fi else (2,))
    rot = qr.width
    if kr.width != rot:
        raise ValueError(f"{name('k_rope')}: last dim {kr.width} must equal the rope dim "
                         f"{rot} of {name('q_rope')}")
    _check_rotary(rot, f"{name('q_rope')} last dim (rope dim)")
    if call.rotary_dim is not None:
        raise ValueError(f"rotary_dim: {call.op} rotates the whole width of "
                         f"{name('q_rope')}; got rotary_dim={call.rotary_dim}")
    mla = a.k_rope.ndim == 2
    qn = kn = vr = _NO_ROWS
    if a.q_nope is not None:
        qn = _rows(a.q_nope, name("q_nope"), T, "[nnz, num_qo_heads, no_rope_dim]", ndims=(3,))
        if qn.heads != qr.heads:
            raise ValueError(f"{name('q_nope')}: {qn.heads} heads, {name('q_rope')} has {qr.heads}")
    if a.k_nope is not None:
        kn_layout = (f"[nnz, no_rope_dim] (MLA, as {name('k_rope')})" if mla
                     else "[nnz, num_kv_heads, no_rope_dim]")
        kn = _rows(a.k_nope, name("k_nope"), T, kn_layout, ndims=(2,) if mla else (3,))
        if kn.heads != kr.heads:
            raise ValueError(f"{name('k_nope')}: {kn.heads} heads, {name('k_rope')} has {kr.heads}")
    if call.op == MLA_CACHE and a.k_nope is None:
        raise TypeError(f"{name('k_nope')}: expected the latent array [num_tokens, kv_lora_rank], "
                        "got None")
    if a.v is not None:
        if mla:
            raise ValueError(f"{name('v')}: MLA (a 2-D {name('k_rope')}) takes no v: pass None")
        vr = _rows(a.v, name("v"), T, "[nnz, num_kv_heads, head_dim]", ndims=(3,))
        if vr.heads != kr.heads:
            raise ValueError(f"{name('v')}: {vr.heads} heads, {name('k_rope')} has {kr.heads}")
    elif call.op == APPEND_PAGED and not mla:
        raise TypeError(f"{name('v')}: GQA/MHA (a 3-D {name('k_rope')}) needs the value array "
                        "[nnz, num_kv_heads, head_dim], got None")
    return _Inputs(T, q.dtype, qr, kr, qn, kn, vr, rot, 0, mla)


def _kv_inputs(call: FusedRopeCall, a: FusedRopeArrays, name, T: int) -> _Inputs:
    """vLLM's / SGLang's query, key, value: [tokens, heads * head_size] or [tokens, heads,
    head_size] (value: its own head size, key's head count). The part of a key head past
    the rotary dim is copied to the cache (as k nope, read from key at that offset)."""
    head = call.head_size
    if head is None:
        raise TypeError("head_size: expected a positive integer, got None")
    layouts = "[num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size]"
    qr = _rows(a.q_rope, name("q_rope"), T, layouts, head_size=head)
    kr = _rows(a.k_rope, name("k_rope"), T, layouts, head_size=head)
    for r, field in ((qr, "q_rope"), (kr, "k_rope")):
        if r.width != head:
            raise ValueError(f"{name(field)}: last dim {r.width} must equal head_size {head}")
    if a.v is None:
        raise TypeError(f"{name('v')}: expected the value array, got None")
    v = a.v
    if v.ndim == 2 and kr.heads and v.shape[1] % kr.heads:
        raise ValueError(f"{name('v')}: last dim {v.shape[1]} is not a multiple of the "
                         f"{kr.heads} key heads")
    head_v = v.shape[-1] if v.ndim != 2 else v.shape[1] // max(kr.heads, 1)
    vr = _rows(v, name("v"), T, "[num_tokens, num_kv_heads * head_size_v] or "
               "[num_tokens, num_kv_heads, head_size_v]", head_size=head_v)
    if vr.heads != kr.heads:
        raise ValueError(f"{name('v')}: {vr.heads} heads, {name('k_rope')} has {kr.heads}")
    rot = call.rotary_dim if call.rotary_dim is not None else head
    if a.cos_sin_cache is not None and a.cos_sin_cache.ndim == 2:
        rot = a.cos_sin_cache.shape[1]  # vLLM: the rotary dim is the cache's width
        if call.rotary_dim is not None and call.rotary_dim != rot:
            raise ValueError(f"cos_sin_cache: width {rot} must equal rotary_dim {call.rotary_dim}")
    _check_rotary(rot, "rotary_dim" if a.cos_sin_cache is None else "cos_sin_cache width "
                  "(rotary_dim)", head)
    kn = _Rows(kr.heads, kr.tok_stride, kr.head_stride, head - rot) if rot < head else _NO_ROWS
    return _Inputs(T, a.q_rope.dtype, _Rows(qr.heads, qr.tok_stride, qr.head_stride, rot),
                   _Rows(kr.heads, kr.tok_stride, kr.head_stride, rot), _NO_ROWS, kn, vr, rot,
                   rot, False)


class _Outputs(NamedTuple):
    dtype: str              # q (and k) outputs' storage
    q: _Rows
    k: _Rows
    q_nope: _Rows
    k_nope: _Rows
    allocate: tuple         # (field, shape, dtype)


def _resolve_quantize_dtype(call: FusedRopeCall, a: FusedRopeArrays, fields, name) -> str:
    """FlashInfer's rule: quantize_dtype, else the dtype of the first output given, else
    float8_e4m3fn; for the paged append without outputs, the cache's dtype (so a 16-bit
    cache means an unquantized append)."""
    given = [(f, getattr(a, f)) for f in fields if getattr(a, f) is not None]
    if call.quantize_dtype is not None:
        dt = call.quantize_dtype
    elif given:
        dt = given[0][1].dtype
    elif call.op == APPEND_PAGED and a.cache0 is not None:
        dt = a.cache0.dtype
    else:
        dt = "float8_e4m3fn"
    for f, d in given:
        if d.dtype != dt:
            source = "quantize_dtype" if call.quantize_dtype is not None else name(given[0][0])
            raise TypeError(f"{name(f)}: dtype {d.dtype} differs from {source} ({dt})")
    if dt not in QUANTIZE_DTYPES:
        raise TypeError(f"{name(given[0][0]) if given else name('cache0')}: expected dtype "
                        f"float8_e4m3fn or float8_e5m2 (or float16, bfloat16, float32), got {dt}")
    return dt


def output_shapes(op: str, q_rope_shape, k_rope_shape, q_nope_shape, k_nope_shape) -> dict:
    """Shapes of a FlashInfer function's outputs (field -> shape): those of their inputs,
    [nnz, heads, 0] (MLA's k: [nnz, 0]) for an absent nope part, as FlashInfer makes them."""
    T, hq = q_rope_shape[0], q_rope_shape[1]
    k_nope_empty = (T, 0) if len(k_rope_shape) == 2 else (T, k_rope_shape[1], 0)
    shapes = {"q_rope_out": tuple(q_rope_shape), "k_rope_out": tuple(k_rope_shape),
              "q_nope_out": (T, hq, 0) if q_nope_shape is None else tuple(q_nope_shape),
              "k_nope_out": k_nope_empty if k_nope_shape is None else tuple(k_nope_shape)}
    return {f: shapes[f] for f in RETURNS[op]}


def _outputs(call: FusedRopeCall, a: FusedRopeArrays, x: _Inputs, name) -> _Outputs:
    """The FlashInfer functions' outputs: given ones checked, missing ones to allocate
    (contiguous, shaped like their input; [nnz, heads, 0] for an absent nope part)."""
    if call.op not in RETURNS:
        return _Outputs(x.dtype, x.q, x.k, _NO_ROWS, _NO_ROWS, ())
    fields = RETURNS[call.op]
    dt = _resolve_quantize_dtype(call, a, fields, name)
    T = x.num_tokens
    shapes = output_shapes(call.op, a.q_rope.shape, a.k_rope.shape,
                           None if a.q_nope is None else a.q_nope.shape,
                           None if a.k_nope is None else a.k_nope.shape)
    rows, allocate = {}, []
    for f in fields:
        d = getattr(a, f)
        if d is None:
            allocate.append((f, shapes[f], dt))
            d = ArrayDesc(0, shapes[f], contiguous_strides(shapes[f]), dt, a.q_rope.device)
        else:
            device_array(d, name(f), QUANTIZE_DTYPES, "an output array")
            same_device(a.q_rope, d, name(f), name("q_rope"))
            if tuple(d.shape) != shapes[f]:
                raise ValueError(f"{name(f)}: expected shape {list(shapes[f])}, got {list(d.shape)}")
        rows[f] = _rows(d, name(f), T, "its input's layout", ndims=(2, 3))
    return _Outputs(dt, rows["q_rope_out"], rows.get("k_rope_out", _NO_ROWS),
                    rows["q_nope_out"], rows.get("k_nope_out", _NO_ROWS), tuple(allocate))


class _CacheDest(NamedTuple):
    which: int           # cache pointer: 0, 1; -1 not written
    page: int = 0        # strides in elements
    entry: int = 0
    head: int = 0
    offset: int = 0      # element offset in the row


_NOWHERE = _CacheDest(-1)


class _Caches(NamedTuple):
    mode: str            # specs_fused.CACHE_MODES
    dtype: str | None    # storage
    page_size: int
    num_pages: int
    k_rope: _CacheDest
    k_nope: _CacheDest
    v: _CacheDest
    k_scale_on_device: bool
    v_scale_on_device: bool
    k_mul: float
    v_mul: float


_NO_CACHE = _Caches("none", None, 1, 0, _NOWHERE, _NOWHERE, _NOWHERE, False, False, 1.0, 1.0)


def _cache_array(d: ArrayDesc | None, name: str, ref: ArrayDesc, ref_name: str, ndims: tuple,
                 layout: str) -> tuple:
    device_array(d, name, FLOAT_DTYPES + FP8_DTYPES + ("uint8",), "a KV cache array")
    same_device(ref, d, name, ref_name)
    if d.ndim not in ndims:
        raise ValueError(f"{name}: expected {layout}, got shape {list(d.shape)}")
    strides = norm_strides(d)
    if d.shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got stride "
                         f"{d.strides[-1]}")
    return strides


def _expect_dims(d: ArrayDesc, name: str, want: dict) -> None:
    """want: {dim index: (expected size, what it is)}."""
    for i, (n, what) in want.items():
        if d.shape[i] != n:
            raise ValueError(f"{name}: dim {i} ({what}) must be {n}, got {d.shape[i]} "
                             f"(shape {list(d.shape)})")


def _cache_dtype(call: FusedRopeCall, d: ArrayDesc, name: str, x: _Inputs, out_dtype: str) -> str:
    """The storage of a cache: FlashInfer's must be the outputs' dtype; vLLM's follows
    kv_cache_dtype ("auto": the input dtype; fp8: uint8 or that float8 dtype); SGLang's
    buffers are any 16-bit or FP8 dtype."""
    if call.op == APPEND_PAGED:
        if d.dtype != out_dtype:
            raise TypeError(f"{name}: expected dtype {out_dtype} (the quantized outputs' dtype), "
                            f"got {d.dtype}")
        return d.dtype
    if call.op == KV_BUFFER:
        if d.dtype not in FLOAT_DTYPES + FP8_DTYPES:
            raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float8 buffer, got "
                            f"{d.dtype}")
        return d.dtype
    fp8 = KV_CACHE_DTYPES[call.kv_cache_dtype]
    if fp8 is None:
        if d.dtype != x.dtype:
            raise TypeError(f"{name}: kv_cache_dtype 'auto' stores the input dtype {x.dtype}, got "
                            f"a {d.dtype} cache")
        return d.dtype
    if d.dtype not in ("uint8", fp8):
        raise TypeError(f"{name}: kv_cache_dtype {call.kv_cache_dtype!r} needs a uint8 or {fp8} "
                        f"cache, got {d.dtype}")
    return fp8


def _scale(d: ArrayDesc | None, name: str, ref: ArrayDesc, ref_name: str) -> bool:
    """A scale the caller keeps on the device: one float32 element. True if given."""
    if d is None:
        return False
    device_array(d, name, ("float32",), "a float32 scale on the device")
    same_device(ref, d, name, ref_name)
    if d.size != 1:
        raise ValueError(f"{name}: expected one element, got shape {list(d.shape)}")
    return True


def _caches(call: FusedRopeCall, a: FusedRopeArrays, x: _Inputs, out_dtype: str, name) -> _Caches:
    """Where K and V go: page/entry/head strides of each destination, the page size and
    the cache's storage."""
    if call.op == ROPE_QUANTIZE:
        return _NO_CACHE
    ref, ref_name = a.q_rope, name("q_rope")
    if call.op == APPEND_PAGED:
        return _paged_caches(call, a, x, out_dtype, name)
    if call.op == MLA_CACHE:
        layout = "[num_blocks, block_size, kv_lora_rank + rot_dim]"
        s = _cache_array(a.cache0, name("cache0"), ref, ref_name, (3,), layout)
        lora = x.k_nope.width
        _expect_dims(a.cache0, name("cache0"), {2: (lora + x.rot, f"kv_lora_rank {lora} + rot_dim {x.rot}")})
        dt = _cache_dtype(call, a.cache0, name("cache0"), x, out_dtype)
        quantized = KV_CACHE_DTYPES[call.kv_cache_dtype] is not None
        on_device = _scale(a.k_scale, name("k_scale"), ref, ref_name)
        if quantized and not on_device:
            raise TypeError(f"{name('k_scale')}: an fp8 cache needs the scale (a float32 array of "
                            "one element), got None")
        return _Caches("slots", dt, a.cache0.shape[1], a.cache0.shape[0],
                       _CacheDest(0, s[0], s[1], 0, lora), _CacheDest(0, s[0], s[1], 0, 0),
                       _NOWHERE, quantized and on_device, False, 1.0, 1.0)
    # KV_CACHE (vLLM's [num_blocks, block_size, num_kv_heads, head_size]) or KV_BUFFER
    # (SGLang's [slots, num_kv_heads * head_size]: one entry per page)
    hk = x.k.heads
    head = x.rot + x.k_nope.width
    if call.op == KV_CACHE:
        layout = "[num_blocks, block_size, num_kv_heads, head_size]"
        ks = _cache_array(a.cache0, name("cache0"), ref, ref_name, (4,), layout)
        vs = _cache_array(a.cache1, name("cache1"), ref, ref_name, (4,),
                          layout.replace("head_size", "head_size_v"))
        _expect_dims(a.cache0, name("cache0"), {2: (hk, "num_kv_heads"), 3: (head, "head_size")})
        _expect_dims(a.cache1, name("cache1"), {0: (a.cache0.shape[0], "num_blocks"),
                                                1: (a.cache0.shape[1], "block_size"),
                                                2: (hk, "num_kv_heads"),
                                                3: (x.v.width, "head_size_v of value")})
        page_size, num_pages = a.cache0.shape[1], a.cache0.shape[0]
        k_dest = (ks[0], ks[1], ks[2])
        v_dest = (vs[0], vs[1], vs[2])
    else:
        layout = "[num_slots, num_kv_heads * head_size] or [num_slots, num_kv_heads, head_size]"
        ks = _cache_array(a.cache0, name("cache0"), ref, ref_name, (2, 3), layout)
        vs = _cache_array(a.cache1, name("cache1"), ref, ref_name, (2, 3), layout)
        for d, n, width in ((a.cache0, name("cache0"), head), (a.cache1, name("cache1"), x.v.width)):
            fits = (tuple(d.shape[1:]) == (hk, width) if d.ndim == 3 else d.shape[1] == hk * width)
            if not fits:
                raise ValueError(f"{n}: expected {hk} heads of {width} per slot, got shape "
                                 f"{list(d.shape)}")
        _expect_dims(a.cache1, name("cache1"), {0: (a.cache0.shape[0], "slots")})
        page_size, num_pages = 1, a.cache0.shape[0]
        k_dest = (ks[0], 0, ks[1] if a.cache0.ndim == 3 else head)
        v_dest = (vs[0], 0, vs[1] if a.cache1.ndim == 3 else x.v.width)
    dt = _cache_dtype(call, a.cache0, name("cache0"), x, out_dtype)
    if _cache_dtype(call, a.cache1, name("cache1"), x, out_dtype) != dt:
        raise TypeError(f"{name('cache1')}: dtype {a.cache1.dtype} differs from {name('cache0')} "
                        f"dtype {a.cache0.dtype}")
    k_dev = _scale(a.k_scale, name("k_scale"), ref, ref_name)
    v_dev = _scale(a.v_scale, name("v_scale"), ref, ref_name)
    # A scale converts to another storage type (vLLM: fp8 caches; SGLang: a buffer of
    # another dtype); a cache of the input dtype stores the values as they are.
    scaled = dt != x.dtype
    return _Caches("slots", dt, page_size, num_pages, _CacheDest(0, *k_dest, 0),
                   _CacheDest(0, *k_dest, x.rot) if x.k_nope.width else _NOWHERE,
                   _CacheDest(1, *v_dest, 0), scaled and k_dev, scaled and v_dev,
                   call.quant_scale_kv if scaled else 1.0, call.quant_scale_v if scaled else 1.0)


def _paged_caches(call: FusedRopeCall, a: FusedRopeArrays, x: _Inputs, out_dtype: str,
                  name) -> _Caches:
    """FlashInfer's paged caches: (k_cache, v_cache) 4-D, NHD [pages, page_size, heads, D]
    or HND [pages, heads, page_size, D]; MLA (ckv_cache [pages, page_size, no_rope_dim],
    kpe_cache [pages, page_size, rope_dim])."""
    ref, ref_name, ps = a.q_rope, name("q_rope"), call.page_size
    if x.mla:
        layout = "(ckv_cache [max_pages, page_size, no_rope_dim], kpe_cache [max_pages, page_size, rope_dim])"
        cs = _cache_array(a.cache0, name("cache0"), ref, ref_name, (3,), layout)
        ks = _cache_array(a.cache1, name("cache1"), ref, ref_name, (3,), layout)
        _expect_dims(a.cache0, name("cache0"), {1: (ps, "page_size"), 2: (x.k_nope.width, "no_rope_dim")})
        _expect_dims(a.cache1, name("cache1"), {1: (ps, "page_size"), 2: (x.rot, "rope_dim")})
        k_rope, k_nope, v = (_CacheDest(1, ks[0], ks[1], 0, 0),
                             _CacheDest(0, cs[0], cs[1], 0, 0) if x.k_nope.width else _NOWHERE,
                             _NOWHERE)
    else:
        nhd = call.kv_layout == "NHD"
        layout = ("[max_pages, page_size, num_kv_heads, head_dim] (NHD)" if nhd
                  else "[max_pages, num_kv_heads, page_size, head_dim] (HND)")
        ks = _cache_array(a.cache0, name("cache0"), ref, ref_name, (4,), layout)
        vs = _cache_array(a.cache1, name("cache1"), ref, ref_name, (4,), layout)
        e, h = (1, 2) if nhd else (2, 1)
        head = x.rot + x.k_nope.width
        _expect_dims(a.cache0, name("cache0"), {e: (ps, "page_size"), h: (x.k.heads, "num_kv_heads"),
                                                3: (head, "rope_dim + no_rope_dim")})
        _expect_dims(a.cache1, name("cache1"), {e: (ps, "page_size"), h: (x.k.heads, "num_kv_heads"),
                                                3: (x.v.width, "the head_dim of v")})
        k_rope = _CacheDest(0, ks[0], ks[e], ks[h], 0)
        k_nope = _CacheDest(0, ks[0], ks[e], ks[h], x.rot) if x.k_nope.width else _NOWHERE
        v = _CacheDest(1, vs[0], vs[e], vs[h], 0)
    dt = _cache_dtype(call, a.cache0, name("cache0"), x, out_dtype)
    _cache_dtype(call, a.cache1, name("cache1"), x, out_dtype)
    return _Caches("paged", dt, ps, min(a.cache0.shape[0], a.cache1.shape[0]), k_rope, k_nope, v,
                   False, False, call.quant_scale_kv, call.quant_scale_kv)


class _Indices(NamedTuple):
    dtypes: tuple      # pos_ids, slot_mapping/batch_indices, positions, kv_indices, kv_indptr
    strides: dict      # static field -> stride
    num_slots: int
    num_indices: int
    batch_size: int


def _indices(call: FusedRopeCall, a: FusedRopeArrays, x: _Inputs, name) -> _Indices:
    """The RoPE positions and the cache row of each token: slot_mapping (vLLM, SGLang) or
    FlashInfer's page tables (batch_indices, positions, kv_indices, kv_indptr)."""
    ref, ref_name, T = a.q_rope, name("q_rope"), x.num_tokens
    strides = {"pos_stride": _index_vector(a.pos_ids, name("pos_ids"), ref, ref_name, min_len=T)}
    dt = [a.pos_ids.dtype, "int32", "int32", "int32", "int32"]
    num_slots = num_indices = batch_size = 0
    if call.op in (MLA_CACHE, KV_CACHE, KV_BUFFER):
        strides["slot_stride"] = _index_vector(a.slot_mapping, name("slot_mapping"), ref, ref_name)
        dt[1], num_slots = a.slot_mapping.dtype, a.slot_mapping.shape[0]
    elif call.op == APPEND_PAGED:
        for field, static, i, min_len in (("batch_indices", "batch_stride", 1, T),
                                          ("positions", "positions_stride", 2, T),
                                          ("kv_indices", "kv_indices_stride", 3, 0),
                                          ("kv_indptr", "kv_indptr_stride", 4, 1)):
            d = getattr(a, field)
            strides[static] = _index_vector(d, name(field), ref, ref_name, min_len=min_len)
            dt[i] = d.dtype
        num_indices, batch_size = a.kv_indices.shape[0], a.kv_indptr.shape[0] - 1
    return _Indices(tuple(dt), strides, num_slots, num_indices, batch_size)


def _fused_vec(a: FusedRopeArrays, x: _Inputs, o: _Outputs, c: _Caches) -> int:
    """One vector width for every row of the call: it divides R/2, every row length and
    stride, and keeps every pointer aligned in its own type."""
    rows = [x.q, x.k, x.q_nope, x.k_nope, x.v, o.q, o.k, o.q_nope, o.k_nope]
    must = [x.rot // 2, x.q_nope.width, x.k_nope.width, x.v.width, x.kn_off]
    for r in rows:
        if r.width:  # an empty row (an absent nope part) is never accessed
            must += [r.tok_stride, r.head_stride]
    for dest in (c.k_rope, c.k_nope, c.v):
        if dest.which >= 0:
            must += [dest.page, dest.entry, dest.head, dest.offset]
    in_size = ITEMSIZE[x.dtype]
    aligned = [(d.ptr, in_size) for d in (a.q_rope, a.k_rope, a.q_nope, a.k_nope, a.v) if d is not None]
    # Outputs allocated later (pointer 0 here) still cap the width at 16 bytes of their type.
    aligned += [(0 if d is None else d.ptr, ITEMSIZE[o.dtype])
                for d in (a.q_rope_out, a.k_rope_out, a.q_nope_out, a.k_nope_out)]
    if c.dtype is not None:
        aligned += [(d.ptr, ITEMSIZE[c.dtype]) for d in (a.cache0, a.cache1) if d is not None]
    return widest_vec(in_size, must, aligned)


# ------------------------------------------------------------------ fused RoPE: launch

def fused_items(spec: FusedRopeSpec) -> tuple:
    """(rotated items, all items) per token of a spec: the kernel's ROT_ITEMS and ITEMS."""
    vec = spec.vec
    rot = (spec.num_q_heads + spec.num_k_heads) * (spec.rotary_dim // 2 // vec)
    qn = spec.num_q_heads * (spec.q_nope_dim // vec) if spec.q_nope_out else 0
    k_nope = spec.k_nope_out or spec.k_nope_cache >= 0
    kn = spec.num_k_heads * (spec.k_nope_dim // vec) if k_nope else 0
    vv = spec.num_k_heads * (spec.v_dim // vec) if spec.v_cache >= 0 else 0
    return rot, rot + qn + kn + vv


_SMEM_LIMIT = 48 * 1024  # dynamic shared memory without an opt-in


class FusedLaunch(NamedTuple):
    launch: Launch
    split_items: int        # items of a token each block does (blockIdx.y splits them)
    item_batch: int         # the kernel's ITEM_BATCH
    cos_sin_in_regs: bool   # the kernel's COS_SIN_IN_REGS


def choose_fused_launch(num_tokens: int, items: int, half: int, num_sms: int, chunks: int = 0, *,
                        batch_cap: int = ITEM_BATCH, thread_batches: int = THREAD_BATCHES,
                        block_threads: int = BLOCK_THREADS,
                        few_block_threads: int = FEW_BLOCK_THREADS) -> FusedLaunch:
    """The fused kernel's launch and launch-dependent constants for num_tokens tokens of
    `items` items.

    A thread does up to batch_cap * thread_batches items of one token in batches of
    item_batch, each batch's loads in flight before its first store, when there is work for
    a full GPU (2048 threads per SM) of such threads; else one batch, and fewer items when
    the whole problem would not fill the GPU once, so few tokens still spread over every
    SM. item_batch is the next power of two of what a thread does, capped at batch_cap: few
    tokens compile a lean kernel of one item a thread. The item lanes of a
    block (a power of two, 32 to block_threads) cover a token's items in `splits` blocks;
    the rest of the threads take more tokens. Shared memory: the tokens' cos/sin tile.
    Few tokens of few items take blocks of few_block_threads (FEW_BLOCK_THREADS says when).

    chunks: the rotated chunks per head (kernels/rope_chunk.cuh CHUNKS) when cos/sin come
    from a cache, else 0. When they divide the item lanes, each block's items start at a
    multiple of them, so every rotated item of a thread is the same chunk and the kernel
    keeps its cos/sin in registers (COS_SIN_IN_REGS: no tile, no barrier).
    """
    wave_items = max(1, -(-num_tokens * items // (num_sms * 2048)))  # a thread's, GPU full
    # several batches a thread only with work for a full wave of such threads (DeepSeek-V3
    # absorbed MLA, 128 tokens: 11.0 us in single batches, 11.2-11.4 us in three)
    per_thread = (min(batch_cap * thread_batches, wave_items)
                  if wave_items >= batch_cap * thread_batches else min(batch_cap, wave_items))
    item_batch = min(batch_cap, _pow2_ceil(per_thread))
    if (per_thread == 1 and items <= 4 * few_block_threads
            and num_tokens * items <= num_sms * few_block_threads):
        block_threads = max(block_threads, few_block_threads)
    lanes = min(block_threads, max(32, _pow2_ceil(-(-items // per_thread))))
    in_regs = chunks > 0 and lanes % chunks == 0
    tokens = max(1, min(MAX_BLOCK_TOKENS, block_threads // lanes, num_tokens,
                        _SMEM_LIMIT // max(1, half * 8)))
    splits = -(-items // (lanes * per_thread))
    split_items = -(-items // splits)
    if in_regs:
        split_items = -(-split_items // chunks) * chunks
        splits = -(-items // split_items)
    launch = Launch((-(-num_tokens // tokens), splits, 1), (lanes, tokens, 1),
                    0 if in_regs else tokens * half * 8)
    return FusedLaunch(launch, split_items, item_batch, in_regs)


def plan_rope_fused(call: FusedRopeCall, arrays: FusedRopeArrays, *,
                    num_sms: int = 132) -> FusedPlan:
    """Validate one fused RoPE call and plan its launch. Raises TypeError/ValueError naming
    the argument at fault; returns a plan whose spec is None when there is nothing to do
    (its outputs are still allocated)."""
    a = arrays
    names = ARG_NAMES[call.op]

    def name(field: str) -> str:
        return names.get(field, field)

    x = _inputs(call, a, name)
    rot_name = ("rotary_dim" if call.op in (KV_CACHE, KV_BUFFER)
                else f"the rope dim ({name('q_rope')} last dim)")
    cs = _cos_sin(call, a.cos_sin_cache, x.rot, rot_name, a.q_rope, name("q_rope"))
    o = _outputs(call, a, x, name)
    c = _caches(call, a, x, o.dtype, name)
    ix = _indices(call, a, x, name)
    if x.rot // 2 * 8 > _SMEM_LIMIT:
        raise ValueError(f"{rot_name}: {x.rot} is too large (at most {_SMEM_LIMIT // 4})")
    T = x.num_tokens
    if T == 0 or x.q.heads + x.k.heads == 0:
        return FusedPlan(None, None, (), a.q_rope.device, o.allocate)

    fi = call.op in RETURNS
    q_nope_out = fi and x.q_nope.width > 0
    k_nope_out = call.op == ROPE_QUANTIZE and x.k_nope.width > 0
    k_nope_dim = x.k_nope.width if k_nope_out or c.k_nope.which >= 0 else 0
    spec = FusedRopeSpec(
        dtype=x.dtype, q_out_dtype=o.dtype if fi else x.dtype,
        k_out_dtype=o.dtype if call.op == ROPE_QUANTIZE else x.dtype,
        kv_cache_dtype=c.dtype or x.dtype,
        cache_dtype=a.cos_sin_cache.dtype if call.from_cache else None, scaling=cs.fly.variant,
        index_dtypes=ix.dtypes, num_q_heads=x.q.heads, num_k_heads=x.k.heads,
        rotary_dim=x.rot, q_nope_dim=x.q_nope.width if q_nope_out else 0,
        k_nope_dim=k_nope_dim, v_dim=x.v.width if c.v.which >= 0 else 0, neox=call.is_neox,
        vec=_fused_vec(a, x, o, c), item_batch=1, cos_sin_in_regs=False, cache_vec=1,
        q_inplace=not fi,
        k_rope_out=("array" if call.op == ROPE_QUANTIZE else "none" if fi else "inplace"),
        q_nope_out=q_nope_out, k_nope_out=k_nope_out,
        k_nope_in_k_rope=call.op in (KV_CACHE, KV_BUFFER) and k_nope_dim > 0,
        k_rope_cache=c.k_rope.which,
        k_nope_cache=c.k_nope.which, v_cache=c.v.which, cache_mode=c.mode,
        page_size=c.page_size, k_scale_on_device=c.k_scale_on_device,
        v_scale_on_device=c.v_scale_on_device, pdl=call.pdl)
    _, items = fused_items(spec)
    chunks = x.rot // 2 // spec.vec if call.from_cache else 0
    fl = choose_fused_launch(T, items, x.rot // 2, num_sms, chunks,
                             batch_cap=ITEM_BATCH, thread_batches=THREAD_BATCHES,
                             block_threads=BLOCK_THREADS, few_block_threads=FEW_BLOCK_THREADS)
    launch, split_items = fl.launch, fl.split_items
    cache_vec = 1
    if fl.cos_sin_in_regs:  # vector loads of the thread's cos/sin, as wide as the cache allows
        cache = a.cos_sin_cache
        cache_vec = min(spec.vec, choose_vec(ITEMSIZE[cache.dtype],
                                             [spec.vec, x.rot // 2, cs.cache_stride], [cache.ptr]))
    spec = replace(spec, item_batch=fl.item_batch, cos_sin_in_regs=fl.cos_sin_in_regs,
                   cache_vec=cache_vec, min_blocks=MIN_BLOCKS)

    values = dict(
        cs.fly._asdict(),
        q_mul=call.quant_scale_q if fi else 1.0,
        k_mul=call.quant_scale_kv if call.op == ROPE_QUANTIZE else 1.0,
        kc_mul=c.k_mul, vc_mul=c.v_mul,
        num_tokens=T, split_items=split_items, max_position=cs.max_position,
        cache_stride=cs.cache_stride, kn_off=x.kn_off,
        num_slots=ix.num_slots, num_pages=c.num_pages, num_indices=ix.num_indices,
        batch_size=ix.batch_size, **ix.strides)
    for prefix, r in (("qr", x.q), ("kr", x.k), ("qn", x.q_nope), ("kn", x.k_nope), ("v", x.v),
                      ("qro", o.q), ("kro", o.k), ("qno", o.q_nope), ("kno", o.k_nope)):
        values[f"{prefix}_st"], values[f"{prefix}_sh"] = r.tok_stride, r.head_stride
    for prefix, dest in (("krc", c.k_rope), ("knc", c.k_nope), ("vc", c.v)):
        values.update({f"{prefix}_page": dest.page, f"{prefix}_entry": dest.entry,
                       f"{prefix}_head": dest.head, f"{prefix}_off": dest.offset})
    static = tuple(values.get(n, 0) for n in FUSED_ROPE_PARAMS.static_names)
    return FusedPlan(spec, launch, static, a.q_rope.device, o.allocate)


# ------------------------------------------------------------------ QK RMSNorm + RoPE

class QKNormRopeArrays(NamedTuple):
    """The kernel's pointers (specs_fused.QK_NORM_ROPE_POINTERS), in the public order."""

    qkv: ArrayDesc
    q_weight: ArrayDesc | None = None
    k_weight: ArrayDesc | None = None
    position_ids: ArrayDesc | None = None
    cos_sin_cache: ArrayDesc | None = None


assert sorted(QKNormRopeArrays._fields) == sorted(QK_NORM_ROPE_PARAMS.pointers), \
    "QKNormRopeArrays must have the kernel's pointers"

MAX_LANE_VECTORS = 16  # vector accesses per thread (registers) in kernels/qk_norm_rope.cu


def plan_qk_norm_rope(call: QKNormRopeCall, arrays: QKNormRopeArrays, *,
                      num_sms: int = 132) -> FusedPlan:
    """Validate one fused_qk_norm_rope call and plan its launch (TypeError/ValueError
    naming the argument at fault)."""
    a = arrays
    qkv = a.qkv
    device_array(qkv, "qkv", _HALF_DTYPES, "a float16 or bfloat16 array")
    D, hq, hk = call.head_dim, call.num_heads_q, call.num_heads_k
    width = (hq + hk + call.num_heads_v) * D
    layout = "[num_tokens, (num_heads_q + num_heads_k + num_heads_v) * head_dim]"
    if qkv.ndim != 2:
        raise ValueError(f"qkv: expected shape {layout}, got {list(qkv.shape)}")
    if qkv.shape[1] != width:
        raise ValueError(f"qkv: last dim {qkv.shape[1]} must equal (num_heads_q + num_heads_k + "
                         f"num_heads_v) * head_dim = {width}")
    strides = norm_strides(qkv)
    if qkv.shape[1] > 1 and strides[1] != 1:
        raise ValueError(f"qkv: the last dim must be contiguous (stride 1), got stride {qkv.strides[1]}")
    weight_strides = []
    for d, n in ((a.q_weight, "q_weight"), (a.k_weight, "k_weight")):
        float_array(d, n)
        same_device(qkv, d, n, "qkv")
        if d.ndim != 1 or d.shape[0] != D:
            raise ValueError(f"{n}: expected shape [head_dim] = [{D}], got {list(d.shape)}")
        weight_strides.append(norm_strides(d)[0])
    if a.q_weight.dtype != a.k_weight.dtype:
        raise TypeError(f"k_weight: dtype {a.k_weight.dtype} differs from q_weight dtype "
                        f"{a.q_weight.dtype}")
    T = qkv.shape[0]
    pos_stride = _index_vector(a.position_ids, "position_ids", qkv, "qkv", min_len=T)
    c = a.cos_sin_cache
    if call.from_cache and c is not None and c.ndim == 2:
        rot, rot_name = c.shape[1], "cos_sin_cache width (rotary_dim)"
        if call.rotary_dim is not None and call.rotary_dim != rot:
            raise ValueError(f"cos_sin_cache: width {rot} must equal rotary_dim {call.rotary_dim}")
    else:
        rot, rot_name = (D if call.rotary_dim is None else call.rotary_dim), "rotary_dim"
    _check_rotary(rot, rot_name, D)
    cs = _cos_sin(call, c, rot, rot_name, qkv, "qkv")
    heads = hq + hk
    if T == 0 or heads == 0:
        return FusedPlan(None, None, (), qkv.device)

    vec = choose_vec(ITEMSIZE[qkv.dtype], [rot // 2, D - rot, D, strides[0]], [qkv.ptr])
    chunks, pass_vecs = rot // 2 // vec, (D - rot) // vec
    forced = call.token_heads_per_warp > 0
    lanes = (32 // call.token_heads_per_warp if forced  # vLLM's rows per warp: 32 / N threads a row
             else min(32, _pow2_ceil(-(-(2 * chunks + pass_vecs) // 4))))  # ~4 vectors a thread
    per_lane = 2 * -(-chunks // lanes) + -(-pass_vecs // lanes)
    if per_lane > MAX_LANE_VECTORS:
        if forced:
            raise ValueError(f"forced_token_heads_per_warp: {call.token_heads_per_warp} leaves "
                             f"{lanes} threads for a head of {D}: {per_lane} vector accesses "
                             f"each at vector width {vec}, at most {MAX_LANE_VECTORS}; use a "
                             f"smaller value or -1")
        raise ValueError(f"head_dim: {D} needs {per_lane} vector accesses per thread at vector "
                         f"width {vec} (rows aligned to {vec * ITEMSIZE[qkv.dtype]} bytes); at most "
                         f"{MAX_LANE_VECTORS}")
    per_warp = 32 // lanes
    block_heads = min(-(-heads // per_warp) * per_warp, QK_BLOCK_THREADS // lanes)
    weights_bytes = 2 * D * 4
    tile_row = rot // 2 * 8
    if weights_bytes + tile_row > _SMEM_LIMIT:
        raise ValueError(f"head_dim: {D} is too large (shared memory)")
    tokens = max(1, min(MAX_BLOCK_TOKENS, QK_BLOCK_THREADS // (lanes * block_heads), T,
                        (_SMEM_LIMIT - weights_bytes) // tile_row))
    # cos/sin and weights per thread from a cache for at most one wave of threads (measured:
    # 2.1 vs 2.7 us for one Qwen3-8B token; beyond, the registers cost more than the barrier:
    # 65 vs 78% of copy at 8192 tokens); on the fly a sincos is worth the shared tile
    in_regs = (call.from_cache and QK_COS_SIN_IN_REGS
               and T * heads * lanes <= num_sms * 2048)
    launch = Launch((-(-T // tokens), -(-heads // block_heads), 1), (lanes, block_heads, tokens),
                    0 if in_regs else weights_bytes + tokens * tile_row)
    spec = QKNormRopeSpec(
        dtype=qkv.dtype, weight_dtype=a.q_weight.dtype,
        cache_dtype=c.dtype if call.from_cache else None, scaling=cs.fly.variant,
        index_dtype=a.position_ids.dtype, head_dim=D, rotary_dim=rot, num_q_heads=hq,
        num_k_heads=hk, neox=call.is_neox, vec=vec, lanes=lanes, cos_sin_in_regs=in_regs)
    values = dict(cs.fly._asdict(), eps=call.eps, num_tokens=T, token_stride=strides[0],
                  pos_stride=pos_stride, max_position=cs.max_position,
                  cache_stride=cs.cache_stride, q_weight_stride=weight_strides[0],
                  k_weight_stride=weight_strides[1])
    static = tuple(values[n] for n in QK_NORM_ROPE_PARAMS.static_names)
    return FusedPlan(spec, launch, static, qkv.device)
