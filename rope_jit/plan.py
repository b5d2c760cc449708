"""Validation and launch planning: pure functions over a ``RopeCall`` and ``ArrayDesc``s, no
GPU needed.

``plan_rope`` checks a call (every error names the argument and what was expected, and is
raised before anything runs: docs/errors.md), normalizes the layouts, picks the
specialization (vector widths, head batch) and the launch shape. Its steps are named
functions below, in the order it runs them. The dispatch rules are all in
``choose_launch``; their knobs are a ``Tuning`` value passed in (part of every plan key).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .arrays import HOST, ArrayDesc, contiguous_strides
from .call import COS_SIN, INDPTR, RopeCall, check_int
from .dtypes import FLOAT_DTYPES, INDEX_DTYPES
from .scaling import OnTheFly, on_the_fly_values
from .specs import ROPE_PARAMS, RopeSpec


class RopeArrays(NamedTuple):
    """The arrays of one call, described; None where the call has none."""

    query: ArrayDesc
    key: ArrayDesc | None = None
    positions: ArrayDesc | None = None
    indptr: ArrayDesc | None = None
    offsets: ArrayDesc | None = None
    cos_sin_cache: ArrayDesc | None = None
    cos: ArrayDesc | None = None    # per-token cos/sin (transformers, flash-attn)
    sin: ArrayDesc | None = None


@dataclass(frozen=True)
class Tuning:
    """Knobs of the dispatch rules (``choose_launch``). Frozen: a plan's key holds it."""

    small_waves: float = 1.0     # problems up to this many GPU waves at 1 head/thread: head-parallel
    fill_waves: float = 4.0      # otherwise: threads launched, in waves of 2048 threads per SM
    fill_waves_fly: float = 4.0  # the same on the fly
    head_batch: int = 2          # heads whose loads are in flight together, large problems
    block: int = 256             # threads per block, large problems
    small_block: int = 128       # threads per block, head-parallel problems, cos/sin from a cache
    small_block_fly: int = 256   # the same on the fly: fewer blocks recompute the same cos/sin tile
    prefetch: bool = True        # software-pipeline the head batches of a thread
    min_blocks: int = 1          # register cap (kernels/rope.cu __launch_bounds__): 1 = 128 regs
    few_tokens: bool | None = None  # kernels/rope.cu FEW_TOKENS; None: in the head-parallel regime
    few_vec: int = 0             # head-parallel regime: at most this many elements a q/k access
                                 # (0: the widest aligned), so a thread's chunk is shorter


DEFAULT_TUNING = Tuning()  # measured on an H100 (benchmarks/NOTES.md)


class ShapeClass(NamedTuple):
    """What a call's launch knobs are chosen for, besides its token count (rope_jit.tuning
    keeps tuned knobs per shape class and token bucket)."""

    dtype: str
    cos_sin: str        # the cache's dtype, or "on-the-fly"
    head_size: int
    rotary_dim: int
    num_heads: int      # q heads + k heads
    neox: bool
    inplace: bool


@dataclass(frozen=True)
class Launch:
    grid: tuple
    block: tuple
    smem: int = 0    # dynamic shared memory bytes (on the fly: the block's cos/sin tile)


@dataclass(frozen=True)
class RopePlan:
    spec: RopeSpec | None     # None: nothing to do (no tokens or no heads)
    launch: Launch | None
    static: tuple             # values of specs.ROPE_PARAMS.static_names, in order
    device: int
    q_out_shape: tuple
    k_out_shape: tuple | None
    shape: ShapeClass | None = None
    num_tokens: int = 0
    tuning: Tuning | None = None  # the knobs the launch was planned with


# ------------------------------------------------------------------ validation helpers

def device_array(d: ArrayDesc | None, name: str, dtypes: tuple, what: str) -> None:
    if d is None:
        raise TypeError(f"{name}: expected {what}, got None")
    if d.device == HOST:
        raise TypeError(f"{name}: expected a CUDA device array ({what}), got an array in host memory")
    if d.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(dtypes)}, got {d.dtype}")


def float_array(d: ArrayDesc | None, name: str) -> None:
    device_array(d, name, FLOAT_DTYPES, "a float16, bfloat16 or float32 array")


def index_array(d: ArrayDesc | None, name: str) -> None:
    device_array(d, name, INDEX_DTYPES, "an integer array")


def same_device(ref: ArrayDesc, d: ArrayDesc | None, name: str, ref_name: str = "query") -> None:
    if d is not None and d.device != ref.device:
        raise ValueError(f"{name} is on cuda:{d.device} but {ref_name} is on cuda:{ref.device}; "
                         "all arrays of one call must be on the same device")


def norm_strides(d: ArrayDesc) -> tuple:
    """Strides with those of size-1 dims zeroed: they never move an index."""
    return tuple(0 if n == 1 else s for n, s in zip(d.shape, d.strides))


# ------------------------------------------------------------------ step 1: query and key

def _check_query_key(a: RopeArrays) -> None:
    float_array(a.query, "query")
    if a.key is not None:
        float_array(a.key, "key")
        if a.key.dtype != a.query.dtype:
            raise TypeError(f"key: dtype {a.key.dtype} differs from query dtype {a.query.dtype}")
        same_device(a.query, a.key, "key")


# ------------------------------------------------------------------ step 2: tokens and positions

class _Tokens(NamedTuple):
    shape: tuple          # token dims of query: (num_tokens,) or (batch, seq)
    index_dtype: str
    pos_strides: tuple    # (outer, inner) element strides of positions
    pos_row_stride: int   # mRoPE: stride between the t, h, w rows
    batch_size: int       # indptr + offsets: requests; else 0
    source: str = "positions"  # what the token dims were read from (for errors)


def _heads_axis(heads_dim: int, d: ArrayDesc, name: str) -> int:
    """The dim of `d` that holds its heads, from transformers' unsqueeze_dim (cos gets a
    heads dim inserted there, so it counts from the left or the right of d's dims)."""
    h = check_int(heads_dim, "unsqueeze_dim")
    h_norm = h + d.ndim if h < 0 else h
    if not 0 <= h_norm <= d.ndim - 2:
        raise ValueError(f"unsqueeze_dim: {h} does not name a heads dim of {name} with shape "
                         f"{list(d.shape)} (expected {-d.ndim} .. -2 or 0 .. {d.ndim - 2}: "
                         "any dim but the last)")
    return h_norm


def _token_layout(call: RopeCall, a: RopeArrays) -> _Tokens:
    mrope = call.mrope_section is not None
    if call.heads_dim is not None and not call.token_cos_sin:
        raise ValueError("unsqueeze_dim: a heads dim other than the one before head_size is "
                         "supported with per-token cos/sin only")
    if call.token_cos_sin:
        # No positions: the token dims are those of query other than heads and head_size.
        q = a.query
        if mrope:
            raise ValueError("mrope_section: not supported with per-token cos/sin; select each "
                             "frequency's position row into cos and sin first")
        if q.ndim not in (3, 4):
            raise ValueError(f"query: expected [num_tokens, num_heads, head_size] or [batch, seq, "
                             f"num_heads, head_size] (heads at unsqueeze_dim), got shape "
                             f"{list(q.shape)}")
        h = q.ndim - 2 if call.heads_dim is None else _heads_axis(call.heads_dim, q, "query")
        shape = tuple(n for i, n in enumerate(q.shape[:-1]) if i != h)
        return _Tokens(shape, "int32", (0, 0), 0, 0, "query")  # index dtype unused
    if call.convention == INDPTR:
        if mrope:
            raise TypeError("positions: mRoPE needs positions of shape [3, num_tokens]; "
                            "indptr + offsets give one position per token")
        index_array(a.indptr, "indptr")
        index_array(a.offsets, "offsets")
        if a.indptr.dtype != a.offsets.dtype:
            raise TypeError(f"offsets: dtype {a.offsets.dtype} differs from indptr dtype "
                            f"{a.indptr.dtype}")
        if a.indptr.ndim != 1 or a.indptr.shape[0] < 1:
            raise ValueError(f"indptr: expected shape [batch_size + 1], got {list(a.indptr.shape)}")
        if a.offsets.ndim != 1 or a.offsets.shape[0] != a.indptr.shape[0] - 1:
            raise ValueError(f"offsets: expected shape [{a.indptr.shape[0] - 1}] (batch_size, "
                             f"one less than indptr), got {list(a.offsets.shape)}")
        same_device(a.query, a.indptr, "indptr")
        same_device(a.query, a.offsets, "offsets")
        if a.query.ndim not in (2, 3):
            raise ValueError(f"query: expected [nnz, num_heads, head_size] or "
                             f"[nnz, num_heads * head_size], got shape {list(a.query.shape)}")
        return _Tokens(tuple(a.query.shape[:1]), a.indptr.dtype, (0, 0), 0, a.offsets.shape[0])

    p = a.positions
    index_array(p, "positions")
    same_device(a.query, p, "positions")
    strides = norm_strides(p)
    row_stride = 0
    if mrope:
        if p.ndim not in (2, 3) or p.shape[0] != 3:
            raise ValueError(f"positions: mRoPE expects shape [3, num_tokens] or "
                             f"[3, batch, seq] (t, h, w rows), got {list(p.shape)}")
        row_stride, strides = strides[0], strides[1:]
    elif p.ndim not in (1, 2):
        raise ValueError(f"positions: expected shape [num_tokens] or [batch, seq], "
                         f"got {list(p.shape)}")
    shape = tuple(p.shape[1:] if mrope else p.shape)
    pos_strides = (0, strides[0]) if len(strides) == 1 else (strides[0], strides[1])
    return _Tokens(shape, p.dtype, pos_strides, row_stride, 0)


# ------------------------------------------------------------------ step 3: heads

class _Heads(NamedTuple):
    """A q or k array (or output) seen as [token dims..., heads, head_size]."""

    num_heads: int
    tok_strides: tuple   # (outer, inner) in elements
    head_stride: int


_NO_HEADS = _Heads(0, (0, 0), 0)


def _as_heads(d: ArrayDesc, name: str, tok_shape: tuple, head_size: int,
              heads_dim: int | None = None, source: str = "positions") -> _Heads:
    nt = len(tok_shape)
    if heads_dim is not None:
        # Heads elsewhere (transformers' [batch, heads, seq, head_dim]): the same array seen
        # with its dims permuted to [tokens..., heads, head_size], no copy.
        if d.ndim != nt + 2:
            raise ValueError(f"{name}: expected {nt} token dims, a heads dim and head_size, "
                             f"got shape {list(d.shape)}")
        h = _heads_axis(heads_dim, d, name)
        perm = [i for i in range(d.ndim - 1) if i != h] + [h, d.ndim - 1]
        d = ArrayDesc(d.ptr, tuple(d.shape[i] for i in perm), tuple(d.strides[i] for i in perm),
                      d.dtype, d.device, d.readonly)
    if d.ndim not in (nt + 1, nt + 2):
        layouts = ("[num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size]"
                   if nt == 1 else
                   "[batch, seq, num_heads * head_size] or [batch, seq, num_heads, head_size]")
        raise ValueError(f"{name}: expected {layouts}, got shape {list(d.shape)}")
    if tuple(d.shape[:nt]) != tuple(tok_shape):
        raise ValueError(f"{name}: token dims {list(d.shape[:nt])} do not match the "
                         f"{source if nt else 'token'} shape {list(tok_shape)}")
    strides = norm_strides(d)
    if d.shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got stride {d.strides[-1]}")
    if d.ndim == nt + 1:
        if d.shape[-1] % head_size:
            raise ValueError(f"{name}: last dim {d.shape[-1]} is not a multiple of head_size {head_size}")
        heads, head_stride = d.shape[-1] // head_size, head_size
    else:
        if d.shape[-1] != head_size:
            raise ValueError(f"{name}: last dim {d.shape[-1]} must equal head_size {head_size}")
        heads, head_stride = d.shape[-2], strides[-2]
    tok = strides[:nt]
    return _Heads(heads, (0, tok[0]) if nt == 1 else (tok[0], tok[1]), head_stride)


def _head_layouts(call: RopeCall, a: RopeArrays, tokens: _Tokens) -> tuple:
    """(head_size, q heads, k heads or None). A head size of None is FlashInfer's layout:
    [nnz, num_heads, head_dim], the head size being the last dim."""
    head_size = call.head_size
    if head_size is None:
        for d, name in ((a.query, "query"), (a.key, "key")):
            if d is not None and d.ndim != len(tokens.shape) + 2:
                layout = ("[nnz, num_heads, head_dim]" if len(tokens.shape) == 1
                          else "[batch, seq, num_heads, head_dim] (heads at unsqueeze_dim)")
                raise ValueError(f"{name}: expected shape {layout}, got {list(d.shape)}")
        head_size = a.query.shape[-1]
    head_size = check_int(head_size, "head_size")
    if head_size <= 0:
        raise ValueError(f"head_size: expected a positive integer, got {head_size}")
    q = _as_heads(a.query, "query", tokens.shape, head_size, call.heads_dim, tokens.source)
    k = (_as_heads(a.key, "key", tokens.shape, head_size, call.heads_dim, tokens.source)
         if a.key is not None else None)
    return head_size, q, k


# ------------------------------------------------------------------ step 4: rotary dim

class _Rotary(NamedTuple):
    dim: int
    name: str            # what errors about it call it
    max_position: int    # cache rows (0 on the fly)
    cache_stride: int
    cos_sin_strides: tuple = (0, 0, 0, 0)  # per-token cos/sin: (cos, sin) x (outer, inner)


def _token_cos_sin(call: RopeCall, a: RopeArrays, tokens: _Tokens) -> tuple:
    """(rotary dim, token strides) of per-token cos and sin: shape [..., width] whose
    leading dims broadcast to query's token dims (right-aligned; missing or size-1 dims
    repeat), width rotary_dim (COS_SIN) or rotary_dim / 2 (COS_SIN_HALF)."""
    c, s = a.cos, a.sin
    float_array(c, "cos")
    float_array(s, "sin")
    same_device(a.query, c, "cos")
    same_device(a.query, s, "sin")
    if s.dtype != c.dtype:
        raise TypeError(f"sin: dtype {s.dtype} differs from cos dtype {c.dtype}")
    if tuple(s.shape) != tuple(c.shape):
        raise ValueError(f"sin: shape {list(s.shape)} differs from cos shape {list(c.shape)}")
    nt = len(tokens.shape)
    lead = tuple(c.shape[:-1])
    width = "rotary_dim" if call.convention == COS_SIN else "rotary_dim / 2"
    if c.ndim < 1 or len(lead) > nt or any(
            n not in (1, m) for n, m in zip(lead, tokens.shape[nt - len(lead):])):
        raise ValueError(f"cos: expected shape [..., {width}] whose leading dims broadcast to "
                         f"the token dims {list(tokens.shape)} of query, got {list(c.shape)}")
    strides = []
    for d, name in ((c, "cos"), (s, "sin")):
        st = norm_strides(d)  # size-1 (broadcast) dims: stride 0
        if d.shape[-1] > 1 and st[-1] != 1:
            raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got stride "
                             f"{d.strides[-1]}")
        tok = (0,) * (nt - len(lead)) + st[:-1]
        strides += (0, tok[0]) if nt == 1 else (tok[0], tok[1])
    dim = c.shape[-1] * (1 if call.convention == COS_SIN else 2)
    if call.rotary_dim is not None and check_int(call.rotary_dim, "rotary_dim") != dim:
        raise ValueError(f"cos: width {c.shape[-1]} does not give rotary_dim {call.rotary_dim}")
    return dim, tuple(strides)


def _rotary(call: RopeCall, a: RopeArrays, head_size: int, tokens: _Tokens) -> _Rotary:
    """The cache's width, the per-token cos/sin width, or the argument (None: the whole
    head)."""
    c = a.cos_sin_cache
    if call.token_cos_sin:
        dim, strides = _token_cos_sin(call, a, tokens)
        rot = _Rotary(dim, "cos width (rotary_dim)" if call.convention == COS_SIN
                      else "2 x cos width (rotary_dim)", 0, 0, strides)
    elif call.from_cache:
        float_array(c, "cos_sin_cache")
        same_device(a.query, c, "cos_sin_cache")
        if c.ndim != 2:
            raise ValueError(f"cos_sin_cache: expected shape [max_position, rotary_dim], got {list(c.shape)}")
        if c.shape[1] > 1 and norm_strides(c)[1] != 1:
            raise ValueError("cos_sin_cache: the last dim must be contiguous (stride 1)")
        dim = c.shape[1]
        if call.rotary_dim is not None and check_int(call.rotary_dim, "rotary_dim") != dim:
            raise ValueError(f"cos_sin_cache: width {dim} must equal rotary_dim {call.rotary_dim}")
        rot = _Rotary(dim, "cos_sin_cache width (rotary_dim)", c.shape[0], norm_strides(c)[0])
    else:
        dim = head_size if call.rotary_dim is None else check_int(call.rotary_dim, "rotary_dim")
        rot = _Rotary(dim, "rotary_dim", 0, 0)
    if rot.dim <= 0 or rot.dim % 2:
        raise ValueError(f"{rot.name}: expected a positive even number, got {rot.dim}")
    if rot.dim > head_size:
        raise ValueError(f"{rot.name}: {rot.dim} exceeds head_size {head_size}")
    if call.rope_dim_offset + rot.dim > head_size:
        raise ValueError(f"rope_dim_offset: {call.rope_dim_offset} + {rot.name} {rot.dim} "
                         f"exceeds head_size {head_size}")
    if call.mrope_section is not None and sum(call.mrope_section) != rot.dim // 2:
        raise ValueError(f"mrope_section: expected non-negative counts summing to rotary_dim/2 "
                         f"= {rot.dim // 2}, got {list(call.mrope_section)}")
    return rot


# ------------------------------------------------------------------ step 5: outputs, vector widths

def _outputs(call: RopeCall, a: RopeArrays, tokens: _Tokens, head_size: int, q: _Heads,
             k: _Heads | None) -> tuple:
    """Output layouts: the inputs themselves in place, new contiguous arrays out of place."""
    if call.inplace:
        return q, k
    def contiguous(d: ArrayDesc, name: str) -> _Heads:  # in the caller's dim order
        return _as_heads(ArrayDesc(0, d.shape, contiguous_strides(d.shape), d.dtype), name,
                         tokens.shape, head_size, call.heads_dim, tokens.source)
    return contiguous(a.query, "query"), (contiguous(a.key, "key") if a.key is not None else None)


def _pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def choose_vec(itemsize: int, must_divide: list[int], pointers: list[int]) -> int:
    """Widest power-of-two element count (at most 16 bytes) that divides every count and
    stride in must_divide and keeps every pointer aligned to the access size."""
    vec = 16 // itemsize
    while vec > 1:
        if all(m % vec == 0 for m in must_divide) and all(p % (vec * itemsize) == 0 for p in pointers):
            break
        vec //= 2
    return vec


def _vector_widths(call: RopeCall, a: RopeArrays, rot: _Rotary, head_size: int,
                   heads: list, max_vec: int = 0) -> tuple:
    """(vec, cache_vec, chunks): elements per q/k access, per cache access, and threads per
    head row (a thread owns `vec` frequencies); max_vec > 0 caps vec."""
    must_divide = [rot.dim // 2, call.rope_dim_offset]
    for h in heads:
        if h is not None:
            must_divide += [h.tok_strides[0], h.tok_strides[1], h.head_stride]
    if not call.inplace:
        must_divide.append(head_size - rot.dim)
    ptrs = [a.query.ptr] + ([a.key.ptr] if a.key is not None else [])
    vec = choose_vec(a.query.itemsize, must_divide, ptrs)
    if max_vec:
        vec = min(vec, max_vec)
    cache_vec = 1
    if call.from_cache:
        c = a.cos_sin_cache
        cache_vec = min(vec, choose_vec(c.itemsize, [vec, rot.cache_stride], [c.ptr]))
    elif call.token_cos_sin:
        c = a.cos
        cache_vec = min(vec, choose_vec(c.itemsize, [vec, *rot.cos_sin_strides],
                                        [c.ptr, a.sin.ptr]))
    chunks = rot.dim // 2 // vec
    if chunks > 512:
        raise ValueError(f"{rot.name}: {rot.dim} needs {chunks} threads per head row at this "
                         f"alignment (vector width {vec}); at most 512 are possible")
    return vec, cache_vec, chunks


def _span(d: ArrayDesc | None) -> int:
    """Elements between the lowest and highest an array's strides can reach, plus one."""
    if d is None:
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(d.shape, d.strides) if n > 0)


_INT32_LIMIT = 2 ** 31 - 2 ** 16  # headroom for a block's last token and a head's last vector


def index_bits(a: RopeArrays, rot: _Rotary, num_tokens: int) -> int:
    """32 when every element offset the kernel forms fits an int (kernels/rope.cu,
    INDEX_BITS): 32-bit offset arithmetic takes fewer registers; 64 otherwise."""
    spans = [_span(d) for d in a] + [rot.max_position * max(rot.cache_stride, 1) + rot.dim,
                                      num_tokens]
    return 32 if max(spans) < _INT32_LIMIT else 64


# ------------------------------------------------------------------ step 6: dispatch rules

def head_parallel(num_tokens: int, chunks: int, num_heads: int, num_sms: int,
                  tuning: Tuning = DEFAULT_TUNING) -> bool:
    """Whether the problem at one head per thread fits in `small_waves` waves of the GPU
    (choose_launch's few-token rule: decode and small prefill, where latency decides)."""
    return num_tokens * chunks * num_heads <= tuning.small_waves * num_sms * 2048


def choose_launch(num_tokens: int, chunks: int, num_heads: int, num_sms: int,
                  on_the_fly: bool, tuning: Tuning = DEFAULT_TUNING) -> tuple[int, int, Launch]:
    """(head_batch, heads per group, launch) for a problem of num_tokens x num_heads heads
    with `chunks` threads per head row.

    Rules (all in one place; README "Dispatch" repeats them):
    * A thread owns one token, one chunk of VEC frequencies, and a group of heads; it
      loads or computes cos/sin once and applies them to every head of its group,
      head_batch heads with all their loads in flight at a time.
    * Few tokens (the whole problem at one head per thread fits in `small_waves` waves of
      the GPU): one head per thread and small blocks, so the work spreads over every SM
      (head-parallel grid). This is decode and small prefill. On the fly the blocks are
      larger, since each block computes the cos/sin tile of its tokens once (measured:
      DSv3 shapes at 128 tokens 5.4 -> 4.2 us). One wave, not two, is the limit: a 1.2-wave
      head-parallel grid left a tail (DSv3 at 1024 tokens: 73% -> 78% of copy bandwidth).
    * Many tokens: head_batch heads per batch and as few head groups as still launch
      `fill_waves` waves of threads, so cos/sin (fetched or computed) is shared by as many
      heads as possible while enough loads are in flight. Measured on an H100 (64
      registers/thread at most): 2 heads per batch and 4 waves beat 4 heads and 1 wave by
      15-20% (occupancy, not load width, was the limit: ncu showed 50% theoretical
      occupancy and 80% DRAM throughput there).
    """
    t = tuning
    wave = num_sms * 2048
    rows = num_tokens * chunks
    if head_parallel(num_tokens, chunks, num_heads, num_sms, t):
        head_batch, per_group = 1, 1
        block_target = t.small_block_fly if on_the_fly else t.small_block
    else:
        head_batch = min(t.head_batch, num_heads)
        fill = int(wave * (t.fill_waves_fly if on_the_fly else t.fill_waves))
        groups = min(max(1, -(-fill // rows)), -(-num_heads // head_batch))
        per_group = -(-num_heads // groups)
        per_group = -(-per_group // head_batch) * head_batch
        block_target = t.block
    groups = -(-num_heads // per_group)
    # Block = (chunks, groups in block, tokens in block), about block_target threads.
    g_block = max(1, min(groups, block_target // chunks))
    while groups % g_block:
        g_block -= 1
    tok_block = max(1, min(64, num_tokens, block_target // (chunks * g_block)))
    grid = (-(-num_tokens // tok_block), groups // g_block, 1)
    return head_batch, per_group, Launch(grid, (chunks, g_block, tok_block))


# ------------------------------------------------------------------ step 7: frequencies

_FROM_CACHE = OnTheFly("linear", 0.0, 1.0, 0.0, 0.0, 1.0)  # unused by cache kernels


def _frequencies(call: RopeCall, rot: _Rotary) -> OnTheFly:
    if call.frequencies is None:
        return _FROM_CACHE
    return on_the_fly_values(call.frequencies, rot.dim)


# ------------------------------------------------------------------ the planner

def plan_rope(call: RopeCall, arrays: RopeArrays, *, tuning=DEFAULT_TUNING,
              num_sms: int = 132) -> RopePlan:
    """Validate one RoPE call and plan its launch. Raises TypeError/ValueError naming the
    argument at fault; returns a plan whose spec is None when there is nothing to do.

    tuning: the dispatch knobs, or a function (ShapeClass, num_tokens) -> Tuning that picks
    them once the call's shape class is known (rope_jit.tuning.DeviceTuning)."""
    a = arrays
    _check_query_key(a)
    if call.inplace and call.out_neox not in (None, call.is_neox):
        raise ValueError("out_neox: writing the pairs in the other order needs separate "
                         "outputs; use the out-of-place function")
    tokens = _token_layout(call, a)
    head_size, q, k = _head_layouts(call, a, tokens)
    rot = _rotary(call, a, head_size, tokens)
    fly = _frequencies(call, rot)
    on_the_fly = call.frequencies is not None

    num_tokens = math.prod(tokens.shape)
    nq, nk = q.num_heads, (k.num_heads if k is not None else 0)
    q_out_shape = tuple(a.query.shape)
    k_out_shape = tuple(a.key.shape) if a.key is not None else None
    if num_tokens == 0 or nq + nk == 0:
        return RopePlan(None, None, (), a.query.device, q_out_shape, k_out_shape)

    # per-token cos/sin dispatches as a cache of its dtype does (read, not computed): it
    # takes that class's knobs
    shape = ShapeClass(a.query.dtype, a.cos_sin_cache.dtype if call.from_cache
                       else a.cos.dtype if call.token_cos_sin else "on-the-fly", head_size,
                       rot.dim, nq + nk, call.is_neox, call.inplace)
    if not isinstance(tuning, Tuning):
        tuning = tuning(shape, num_tokens)
    qo, ko = _outputs(call, a, tokens, head_size, q, k)
    vec, cache_vec, chunks = _vector_widths(call, a, rot, head_size, [q, k, qo, ko])
    fv = tuning.few_vec  # a power of two below the widest access, or nothing to do
    if 0 < fv < vec and fv & (fv - 1) == 0 and rot.dim // 2 // fv <= 512 and head_parallel(
            num_tokens, rot.dim // 2 // fv, nq + nk, num_sms, tuning):
        # decode: shorter chunks, more threads; the latency after the loads land is the
        # thread's rotate-and-round (FlashInfer's head-parallel GPT-J kernel: one 16-byte
        # q/k vector a thread, 43 instructions from its last load to its store; ours two
        # vectors and 85). Measured by the tuner on the H200: wins within decode noise
        # only, so a knob, not the rule (benchmarks/NOTES.md section 16).
        vec, cache_vec, chunks = _vector_widths(call, a, rot, head_size, [q, k, qo, ko], fv)
    head_batch, per_group, launch = choose_launch(num_tokens, chunks, nq + nk, num_sms,
                                                  on_the_fly, tuning)
    # Prefetching the next batch costs registers (occupancy); it pays only when a thread
    # has more than one batch (measured: GPT-J shapes at 8192 tokens lost 10% without
    # this rule).
    prefetch = tuning.prefetch and per_group > head_batch
    if on_the_fly:  # kernels/rope.cu: tokens x (R/2 float2 + NPOS x (position, flag))
        npos = 3 if call.mrope_section is not None else 1
        launch = Launch(launch.grid, launch.block, launch.block[2] * (rot.dim // 2 * 8 + 16 * npos))
    # kernels/rope.cu FEW_TOKENS: latency-bound, position first and paired rounding
    regime = head_parallel(num_tokens, chunks, nq + nk, num_sms, tuning)
    few = regime if tuning.few_tokens is None else tuning.few_tokens
    spec = RopeSpec(
        head_size=head_size, rotary_dim=rot.dim, dtype=a.query.dtype,
        cache_dtype=(a.cos_sin_cache.dtype if call.from_cache
                     else a.cos.dtype if call.token_cos_sin else None),
        index_dtype=tokens.index_dtype, indptr=call.convention == INDPTR, neox=call.is_neox,
        out_of_place=not call.inplace, vec=vec, cache_vec=cache_vec, head_batch=head_batch,
        prefetch=prefetch, scaling=fly.variant, mrope_section=call.mrope_section,
        mrope_interleaved=call.mrope_interleaved and call.mrope_section is not None,
        inverse=call.inverse, min_blocks=tuning.min_blocks,
        few_tokens=few,
        index_bits=index_bits(a, rot, num_tokens), pdl=call.pdl,
        # the [batch, seq] split compiled out for one token dim in the few-token path of the
        # few-token regime only: with many tokens (or few_tokens tuned on there) that build
        # measured 2-41% slower at 8192 tokens (ptxas schedules it differently;
        # benchmarks/NOTES.md section 15), so they keep the runtime test
        tokens_2d=tokens.shape[-1] != num_tokens or not (regime and few),
        token_cos_sin=call.token_cos_sin,
        out_neox=None if call.out_neox in (None, call.is_neox) else call.out_neox)

    k, ko = k or _NO_HEADS, ko or _NO_HEADS
    values = dict(
        fly._asdict(),
        num_tokens=num_tokens, inner_tokens=tokens.shape[-1], num_q_heads=nq, num_k_heads=nk,
        batch_size=tokens.batch_size, max_position=rot.max_position,
        cache_stride=rot.cache_stride,
        q_stride_outer=q.tok_strides[0], q_stride_inner=q.tok_strides[1], q_stride_head=q.head_stride,
        k_stride_outer=k.tok_strides[0], k_stride_inner=k.tok_strides[1], k_stride_head=k.head_stride,
        qo_stride_outer=qo.tok_strides[0], qo_stride_inner=qo.tok_strides[1],
        qo_stride_head=qo.head_stride,
        ko_stride_outer=ko.tok_strides[0], ko_stride_inner=ko.tok_strides[1],
        ko_stride_head=ko.head_stride,
        pos_stride_outer=tokens.pos_strides[0], pos_stride_inner=tokens.pos_strides[1],
        pos_stride_row=tokens.pos_row_stride, rot_offset=call.rope_dim_offset,
        **dict(zip(("cos_stride_outer", "cos_stride_inner", "sin_stride_outer",
                    "sin_stride_inner"), rot.cos_sin_strides)))
    static = tuple(values[n] for n in ROPE_PARAMS.static_names)
    return RopePlan(spec, launch, static, a.query.device, q_out_shape, k_out_shape, shape,
                    num_tokens, tuning)


# ------------------------------------------------------------------ positions_from_offsets

def plan_positions(indptr: ArrayDesc, offsets: ArrayDesc, num_tokens: int | None) -> tuple:
    """Validate positions_from_offsets arguments (num_tokens None: indptr[-1], read later);
    returns (index dtype, batch_size)."""
    for d, name in ((indptr, "indptr"), (offsets, "offsets")):
        if d.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name}: expected dtype int32 or int64, got {d.dtype}")
        if d.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {list(d.shape)}")
    if indptr.shape[0] < 1:
        raise ValueError("indptr: expected at least one entry (batch_size + 1)")
    if offsets.shape[0] != indptr.shape[0] - 1:
        raise ValueError(f"offsets: expected {indptr.shape[0] - 1} entries (one less than indptr), "
                         f"got {offsets.shape[0]}")
    if indptr.dtype != offsets.dtype:
        raise TypeError(f"offsets: dtype {offsets.dtype} differs from indptr dtype {indptr.dtype}")
    if (indptr.device == HOST) != (offsets.device == HOST) or indptr.device != offsets.device:
        raise ValueError("indptr and offsets must be in the same memory (both host or both on one device)")
    if num_tokens is not None and num_tokens < 0:
        raise ValueError(f"nnz: expected a non-negative token count, got {num_tokens}")
    return indptr.dtype, offsets.shape[0]
