"""Validation and launch planning: pure functions over ArrayDescs, no GPU needed.

``plan_rope`` checks a call (SPEC section 7: every error names the argument and what was
expected, and is raised before anything runs), normalizes the layouts, picks the
specialization (vector widths, head batch) and the launch shape. The dispatch rules are
all in ``choose_launch``; they are documented there and in README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .arrays import FLOAT_DTYPES, HOST, INDEX_DTYPES, ArrayDesc, contiguous_strides
from .specs import ROPE_STATIC, SCALINGS, RopeSpec

@dataclass(frozen=True)
class Launch:
    grid: tuple
    block: tuple
    smem: int = 0    # dynamic shared memory bytes (on the fly: the block's cos/sin tile)


@dataclass(frozen=True)
class RopePlan:
    spec: RopeSpec | None     # None: nothing to do (no tokens or no heads)
    launch: Launch | None
    static: tuple             # values of specs.ROPE_STATIC, in order
    device: int
    q_out_shape: tuple
    k_out_shape: tuple | None


# ------------------------------------------------------------------ validation helpers

def _device_array(d: ArrayDesc | None, name: str, dtypes: tuple, what: str) -> None:
    if d is None:
        raise TypeError(f"{name}: expected {what}, got None")
    if d.device == HOST:
        raise TypeError(f"{name}: expected a CUDA device array ({what}), got an array in host memory")
    if d.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(dtypes)}, got {d.dtype}")


def _same_device(ref: ArrayDesc, ref_name: str, d: ArrayDesc | None, name: str) -> None:
    if d is not None and d.device != ref.device:
        raise ValueError(f"{name} is on cuda:{d.device} but {ref_name} is on cuda:{ref.device}; "
                         "all arrays of one call must be on the same device")


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import operator

            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name}: expected an integer, got {type(value).__name__}") from None
    return int(value)


def _norm_strides(d: ArrayDesc) -> tuple:
    """Strides with those of size-1 dims zeroed: they never move an index."""
    return tuple(0 if n == 1 else s for n, s in zip(d.shape, d.strides))


@dataclass(frozen=True)
class _Heads:
    """A q or k array seen as [token dims..., heads, head_size]."""

    num_heads: int
    tok_strides: tuple   # (outer, inner) in elements
    head_stride: int


def _as_heads(d: ArrayDesc, name: str, tok_shape: tuple, head_size: int) -> _Heads:
    nt = len(tok_shape)
    if d.ndim not in (nt + 1, nt + 2):
        layouts = ("[num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size]"
                   if nt == 1 else
                   "[batch, seq, num_heads * head_size] or [batch, seq, num_heads, head_size]")
        raise ValueError(f"{name}: expected {layouts}, got shape {list(d.shape)}")
    if tuple(d.shape[:nt]) != tuple(tok_shape):
        raise ValueError(f"{name}: token dims {list(d.shape[:nt])} do not match the "
                         f"{'positions' if nt else 'token'} shape {list(tok_shape)}")
    strides = _norm_strides(d)
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
    tok_strides = (0, tok[0]) if nt == 1 else (tok[0], tok[1])
    return _Heads(heads, tok_strides, head_stride)


def _index_array(d: ArrayDesc, name: str) -> None:
    _device_array(d, name, INDEX_DTYPES, "an integer array")


# ------------------------------------------------------------------ vector widths

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


# ------------------------------------------------------------------ dispatch rules

# Knobs of the dispatch rules below, measured on an H100 (benchmarks/ sweeps them).
TUNING = {
    "small_waves": 1.0,     # problems up to this many GPU waves at 1 head/thread: head-parallel
    "fill_waves": 4.0,      # otherwise: threads launched, in waves of 2048 threads per SM
    "fill_waves_fly": 4.0,  # the same on the fly
    "head_batch": 2,        # heads whose loads are in flight together, large problems
    "block": 256,           # threads per block, large problems
    "small_block": 128,     # threads per block, head-parallel problems, cos/sin from a cache
    "small_block_fly": 256, # the same on the fly: fewer blocks recompute the same cos/sin tile
    "prefetch": True,       # software-pipeline the head batches of a thread
    "min_blocks": 1,        # register cap (kernels/rope.cu __launch_bounds__): 1 = 128 regs
}


def choose_launch(num_tokens: int, chunks: int, num_heads: int, num_sms: int,
                  on_the_fly: bool) -> tuple[int, int, Launch]:
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
    t = TUNING
    wave = num_sms * 2048
    rows = num_tokens * chunks
    if rows * num_heads <= t["small_waves"] * wave:
        head_batch, per_group = 1, 1
        block_target = t["small_block_fly"] if on_the_fly else t["small_block"]
    else:
        head_batch = min(t["head_batch"], num_heads)
        fill = int(wave * (t["fill_waves_fly"] if on_the_fly else t["fill_waves"]))
        groups = min(max(1, -(-fill // rows)), -(-num_heads // head_batch))
        per_group = -(-num_heads // groups)
        per_group = -(-per_group // head_batch) * head_batch
        block_target = t["block"]
    groups = -(-num_heads // per_group)
    # Block = (chunks, groups in block, tokens in block), about block_target threads.
    g_block = max(1, min(groups, block_target // chunks))
    while groups % g_block:
        g_block -= 1
    tok_block = max(1, min(64, num_tokens, block_target // (chunks * g_block)))
    grid = (-(-num_tokens // tok_block), groups // g_block, 1)
    return head_batch, per_group, Launch(grid, (chunks, g_block, tok_block))


# ------------------------------------------------------------------ the planner

def plan_rope(query: ArrayDesc, key: ArrayDesc | None, *, head_size, rotary_dim=None,
              is_neox: bool, positions: ArrayDesc | None = None,
              indptr: ArrayDesc | None = None, offsets: ArrayDesc | None = None,
              cos_sin_cache: ArrayDesc | None = None, inplace: bool,
              scaling: str = "linear", mrope_section=None, mrope_interleaved: bool = False,
              inverse: bool = False, num_sms: int = 132) -> RopePlan:
    """Validate one RoPE call and plan its launch. Raises TypeError/ValueError naming the
    argument at fault; returns a plan whose spec is None when there is nothing to do.

    scaling: the on-the-fly frequency variant (specs.SCALINGS); ignored with a cache.
    mrope_section: (t, h, w) frequency counts summing to rotary_dim / 2 for multimodal RoPE;
    positions are then [3, num_tokens] (or [3, batch, seq]), one row per section.
    inverse: rotate by the negative angle (the backward pass of RoPE).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling: expected one of {', '.join(SCALINGS)}, got {scaling!r}")
    mrope = mrope_section is not None
    _device_array(query, "query", FLOAT_DTYPES, "a float16, bfloat16 or float32 array")
    if key is not None:
        _device_array(key, "key", FLOAT_DTYPES, "a float16, bfloat16 or float32 array")
        if key.dtype != query.dtype:
            raise TypeError(f"key: dtype {key.dtype} differs from query dtype {query.dtype}")
        _same_device(query, "query", key, "key")

    # Positions: one per token, or indptr + offsets (one token dim).
    use_indptr = positions is None
    pos_stride_row = 0
    if use_indptr and mrope:
        raise TypeError("positions: mRoPE needs positions of shape [3, num_tokens]; "
                        "indptr + offsets give one position per token")
    if use_indptr:
        if indptr is None or offsets is None:
            raise TypeError("expected positions, or both indptr and offsets")
        _index_array(indptr, "indptr")
        _index_array(offsets, "offsets")
        if indptr.dtype != offsets.dtype:
            raise TypeError(f"offsets: dtype {offsets.dtype} differs from indptr dtype {indptr.dtype}")
        if indptr.ndim != 1 or indptr.shape[0] < 1:
            raise ValueError(f"indptr: expected shape [batch_size + 1], got {list(indptr.shape)}")
        if offsets.ndim != 1 or offsets.shape[0] != indptr.shape[0] - 1:
            raise ValueError(f"offsets: expected shape [{indptr.shape[0] - 1}] (batch_size, one "
                             f"less than indptr), got {list(offsets.shape)}")
        _same_device(query, "query", indptr, "indptr")
        _same_device(query, "query", offsets, "offsets")
        if query.ndim not in (2, 3):
            raise ValueError(f"query: expected [nnz, num_heads, head_size] or "
                             f"[nnz, num_heads * head_size], got shape {list(query.shape)}")
        tok_shape = tuple(query.shape[:1])
        index_dtype = indptr.dtype
        pos_strides = (0, 0)
        batch_size = offsets.shape[0]
    else:
        _index_array(positions, "positions")
        _same_device(query, "query", positions, "positions")
        ps = _norm_strides(positions)
        if mrope:
            if positions.ndim not in (2, 3) or positions.shape[0] != 3:
                raise ValueError(f"positions: mRoPE expects shape [3, num_tokens] or "
                                 f"[3, batch, seq] (t, h, w rows), got {list(positions.shape)}")
            pos_stride_row, ps = ps[0], ps[1:]
        elif positions.ndim not in (1, 2):
            raise ValueError(f"positions: expected shape [num_tokens] or [batch, seq], "
                             f"got {list(positions.shape)}")
        tok_shape = tuple(positions.shape[1:] if mrope else positions.shape)
        index_dtype = positions.dtype
        pos_strides = (0, ps[0]) if len(ps) == 1 else (ps[0], ps[1])
        batch_size = 0

    if head_size is None:
        # FlashInfer's on-the-fly layout: [nnz, num_heads, head_dim], head size = last dim.
        for d, name in ((query, "query"), (key, "key")):
            if d is not None and d.ndim != len(tok_shape) + 2:
                raise ValueError(f"{name}: expected shape [nnz, num_heads, head_dim], "
                                 f"got {list(d.shape)}")
        head_size = query.shape[-1]
    head_size = _int(head_size, "head_size")
    if head_size <= 0:
        raise ValueError(f"head_size: expected a positive integer, got {head_size}")
    q = _as_heads(query, "query", tok_shape, head_size)
    k = _as_heads(key, "key", tok_shape, head_size) if key is not None else None

    # Rotary dim: the cache's width, or the argument (None: the whole head).
    if cos_sin_cache is not None:
        c = cos_sin_cache
        _device_array(c, "cos_sin_cache", FLOAT_DTYPES, "a float16, bfloat16 or float32 array")
        _same_device(query, "query", c, "cos_sin_cache")
        if c.ndim != 2:
            raise ValueError(f"cos_sin_cache: expected shape [max_position, rotary_dim], got {list(c.shape)}")
        if c.shape[1] > 1 and _norm_strides(c)[1] != 1:
            raise ValueError("cos_sin_cache: the last dim must be contiguous (stride 1)")
        rot = c.shape[1]
        if rotary_dim is not None and _int(rotary_dim, "rotary_dim") != rot:
            raise ValueError(f"cos_sin_cache: width {rot} must equal rotary_dim {rotary_dim}")
        rot_name = "cos_sin_cache width (rotary_dim)"
        max_position, cache_stride = c.shape[0], _norm_strides(c)[0]
    else:
        rot = head_size if rotary_dim is None else _int(rotary_dim, "rotary_dim")
        rot_name = "rotary_dim"
        max_position, cache_stride = 0, 0
    if rot <= 0 or rot % 2:
        raise ValueError(f"{rot_name}: expected a positive even number, got {rot}")
    if rot > head_size:
        raise ValueError(f"{rot_name}: {rot} exceeds head_size {head_size}")
    if mrope:
        mrope_section = _mrope_section(mrope_section, rot)

    num_tokens = math.prod(tok_shape)
    nq, nk = q.num_heads, (k.num_heads if k is not None else 0)
    q_out_shape = tuple(query.shape)
    k_out_shape = tuple(key.shape) if key is not None else None
    if num_tokens == 0 or nq + nk == 0:
        return RopePlan(None, None, (), query.device, q_out_shape, k_out_shape)

    # Outputs: the inputs themselves in place, new contiguous arrays out of place.
    if inplace:
        qo, ko = q, k
    else:
        qo = _as_heads(ArrayDesc(0, q_out_shape, contiguous_strides(q_out_shape), query.dtype),
                       "query", tok_shape, head_size)
        ko = (_as_heads(ArrayDesc(0, k_out_shape, contiguous_strides(k_out_shape), query.dtype),
                        "key", tok_shape, head_size) if key is not None else None)

    itemsize = query.itemsize
    must_divide = [rot // 2]
    for h in (q, k, qo, ko):
        if h is not None:
            must_divide += [h.tok_strides[0], h.tok_strides[1], h.head_stride]
    if not inplace:
        must_divide.append(head_size - rot)
    ptrs = [query.ptr] + ([key.ptr] if key is not None else [])
    vec = choose_vec(itemsize, must_divide, ptrs)
    if cos_sin_cache is not None:
        cache_vec = min(vec, choose_vec(cos_sin_cache.itemsize, [vec, cache_stride], [cos_sin_cache.ptr]))
    else:
        cache_vec = 1
    chunks = rot // 2 // vec
    if chunks > 512:
        raise ValueError(f"{rot_name}: {rot} needs {chunks} threads per head row at this "
                         f"alignment (vector width {vec}); at most 512 are possible")

    head_batch, per_group, launch = choose_launch(num_tokens, chunks, nq + nk, num_sms,
                                                  on_the_fly=cos_sin_cache is None)
    # Prefetching the next batch costs registers (occupancy); it pays only when a thread
    # has more than one batch (measured: GPT-J shapes at 8192 tokens lost 10% without
    # this rule).
    prefetch = bool(TUNING["prefetch"]) and per_group > head_batch
    if cos_sin_cache is None:  # kernels/rope.cu: tokens x (R/2 float2 + NPOS x (position, flag))
        npos = 3 if mrope else 1
        launch = Launch(launch.grid, launch.block, launch.block[2] * (rot // 2 * 8 + 16 * npos))
    spec = RopeSpec(
        head_size=head_size, rotary_dim=rot, dtype=query.dtype,
        cache_dtype=cos_sin_cache.dtype if cos_sin_cache is not None else None,
        index_dtype=index_dtype, indptr=use_indptr, neox=bool(is_neox),
        out_of_place=not inplace, vec=vec, cache_vec=cache_vec, head_batch=head_batch,
        prefetch=prefetch, scaling=scaling if cos_sin_cache is None else "linear",
        mrope_section=mrope_section, mrope_interleaved=bool(mrope_interleaved) and mrope,
        inverse=bool(inverse), min_blocks=int(TUNING["min_blocks"]))

    none = _Heads(0, (0, 0), 0)
    k, ko = k or none, ko or none
    inner_tokens = tok_shape[-1]
    values = dict(
        num_tokens=num_tokens, inner_tokens=inner_tokens, num_q_heads=nq, num_k_heads=nk,
        batch_size=batch_size, max_position=max_position, cache_stride=cache_stride,
        q_stride_outer=q.tok_strides[0], q_stride_inner=q.tok_strides[1], q_stride_head=q.head_stride,
        k_stride_outer=k.tok_strides[0], k_stride_inner=k.tok_strides[1], k_stride_head=k.head_stride,
        qo_stride_outer=qo.tok_strides[0], qo_stride_inner=qo.tok_strides[1],
        qo_stride_head=qo.head_stride,
        ko_stride_outer=ko.tok_strides[0], ko_stride_inner=ko.tok_strides[1],
        ko_stride_head=ko.head_stride,
        pos_stride_outer=pos_strides[0], pos_stride_inner=pos_strides[1],
        pos_stride_row=pos_stride_row)
    static = tuple(values[n] for n in ROPE_STATIC)
    return RopePlan(spec, launch, static, query.device, q_out_shape, k_out_shape)


def _mrope_section(section, rot: int) -> tuple:
    """mrope_section as a tuple of 3 non-negative ints summing to rot / 2."""
    try:
        sec = tuple(section)
    except TypeError:
        raise TypeError(f"mrope_section: expected 3 integers (t, h, w), got {section!r}") from None
    if len(sec) != 3:
        raise ValueError(f"mrope_section: expected 3 integers (t, h, w), got {list(sec)}")
    sec = tuple(_int(v, "mrope_section") for v in sec)
    if min(sec) < 0 or sum(sec) != rot // 2:
        raise ValueError(f"mrope_section: expected non-negative counts summing to rotary_dim/2 "
                         f"= {rot // 2}, got {list(sec)}")
    return sec


def plan_positions(indptr: ArrayDesc, offsets: ArrayDesc, num_tokens: int) -> tuple:
    """Validate positions_from_offsets arguments; returns (index dtype, batch_size)."""
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
    if num_tokens < 0:
        raise ValueError(f"nnz: expected a non-negative token count, got {num_tokens}")
    return indptr.dtype, offsets.shape[0]
