// Rotary position embedding, specialized at run time.
//
// rope_jit renders this file after common.cuh and a generated prelude that defines, as
// compile-time constants: scalar_t (q/k storage), cache_t (cos/sin cache storage),
// index_t (positions, indptr and offsets), HEAD_SIZE, ROT_DIM, VEC (elements per vector
// access), CACHE_VEC, HEAD_BATCH (heads whose loads are issued together), NEOX,
// OUT_OF_PLACE, INDPTR, COS_SIN_FROM_CACHE, COS_SIN_PER_TOKEN (cos and sin arrays given per
// token, no positions), OUT_NEOX (the outputs' pair order), SCALING (on-the-fly frequency variant),
// MROPE with MROPE_T/H/W/MROPE_INTERLEAVED (multimodal sections), INVERSE (rotate by the
// negative angle: the backward pass), and the RopeParams struct
// (every field 8 bytes; its order is fixed by rope_jit/specs.py, which also packs it on the
// host).
//
// Work split. A thread owns one token and one "chunk" of VEC consecutive frequencies,
// i.e. VEC rotated pairs = two vector accesses per head:
//   NeoX:  x[c*VEC .. c*VEC+VEC)      paired with x[R/2 + c*VEC ..]
//   GPT-J: x[2*c*VEC .. 2*c*VEC+2*VEC) (pairs are adjacent elements)
// It fetches (or computes) cos/sin for its chunk once, then applies them to every head of
// its head group, HEAD_BATCH heads at a time with all their loads in flight before the
// first store. Block = (CHUNKS, head groups, tokens); grid = (token tiles, head-group
// tiles). In place, the pass-through part of a partially rotated head is never touched;
// out of place, the same threads copy it.
//
// Tuning knobs (compile-time constants of the prelude, picked per device and shape by the
// planner or the tuner; the first value of each is the original kernel):
//
//   INDEX_BITS = 64 | 32. Width of the element-offset arithmetic (token x stride, head x
//     stride, position x cache stride). 64-bit multiplies and divisions take twice the
//     registers and several instructions each; 32 is correct only when the host has
//     checked that every element offset the kernel forms fits in an int: for q, k, q_out,
//     k_out, sum over dims of (extent - 1) * |stride| + HEAD_SIZE < 2^31, the same for the
//     positions (or indptr/offsets) array, max_position * cache_stride < 2^31, and
//     num_tokens < 2^31. Pointers stay 64-bit. Meant for every shape that passes the check
//     (all but tensors of more than 2^31 elements): fewer registers per byte in flight.
//
//   STAGING = 0 | 1 | 2. Where a thread's q/k bytes wait while in flight.
//     0: in registers (the original kernel; HEAD_BATCH and PREFETCH apply). Bytes in
//        flight cost registers, registers cost occupancy: 95 registers/thread and 25%
//        occupancy at Llama-3-8B shapes on the H200, 63% DRAM throughput.
//     1: in shared memory, through cp.async (16-byte LDGSTS per thread; 4 and 8 bytes for
//        narrower vectors). A block walks over tiles of STAGE_TOKENS tokens x all heads,
//        STAGES tiles deep: the copies of tile i+STAGES-1 are in flight while tile i is
//        rotated and stored, and they hold no registers. The tile's positions are read one
//        pass ahead, and its cos/sin rows travel with its q/k rows (cache: cp.async of the
//        cache rows; on the fly: computed into shared memory while the copies fly), so
//        neither the position -> cache-row chain nor the sincos math stalls the stores.
//     2: as 1, but each head row (or a token's run of heads, when they are contiguous) is
//        one Hopper bulk copy (cp.async.bulk, the TMA engine without a tensor map)
//        completing on an mbarrier: one instruction per row instead of one per 16 bytes.
//        Needs sm_90 and 16-byte vectors (VEC * sizeof(scalar_t) == 16); otherwise it
//        compiles as 1.
//     Block for STAGING 1 and 2: (CHUNKS, lanes, 1), any number of lanes (a lane walks the
//     tile's head rows); grid: (blocks, 1, 1), each block takes tiles blockIdx.x,
//     blockIdx.x + gridDim.x, ... (grid = tile count: one tile per block; fewer blocks: a
//     persistent pipeline). Dynamic shared memory: staged_smem_bytes() below.
//     Meant for large token counts (>= ~1024), where bytes in flight decide.
//
//   STAGE_TOKENS >= 1: tokens per tile (STAGING 1, 2). Larger tiles: more bytes per
//     barrier and fewer position/cache-row loads per byte, more shared memory per stage.
//
//   STAGES >= 1: tiles in flight per block (STAGING 1, 2). 1: no pipeline inside the
//     block (the blocks resident on an SM overlap each other); 2-3: double/triple buffer.
//
//   PDL = false | true. Programmatic dependent launch: the position and cos/sin work
//     (which reads nothing the previous kernel writes: positions and the cache are made
//     before the step's attention layers) runs before griddepcontrol.wait, q/k loads
//     after it. Only with a host that launches with the programmatic-serialization
//     attribute (FlashInfer's enable_pdl); the caller promises that the previous kernel
//     does not write the positions or the cache. Meant for decode, where the prologue
//     (position -> cache row, or the sincos) is most of the kernel's latency.
//
//   FEW_TOKENS = false | true. The planner's few-token regime (plan.head_parallel: decode
//     and small prefill, where the chain of dependent latencies decides, not bytes in
//     flight). From a cache the position load is issued before the q/k addressing
//     instead of after the first q/k loads (position -> cache row is the critical path),
//     and every mode rounds a chunk a pair of elements per conversion (rotate_chunk).
//     Both cost 2-5% at 8192 tokens, so many tokens keep the original order.
//
//   TOKENS_2D = false | true. Token dims [batch, seq] with their own strides (a division
//     per token, when the planner's runtime test says so) or, false, one token dim: the
//     split and its code are compiled out (72 fewer instructions ahead of a one-token
//     call's first loads). The planner compiles it out in the FEW_TOKENS path of the
//     few-token regime only: with many tokens that build measured 2-41% slower (ptxas
//     schedules it differently).

// The decode build (FEW_TOKENS with one token dim): a call is one latency chain, so its
// addressing takes the fewest dependent instructions (one 32-bit offset per pointer, the
// output pointer the input's in place, the cache row's address worked out before its range
// test, results put into vectors a word at a time).
// Builds for many tokens keep the original code: ptxas schedules those loops differently
// when their code changes (session 6 measured 2-41% swings at 8192 tokens).
constexpr bool DECODE = FEW_TOKENS && !TOKENS_2D;

constexpr int HALF = ROT_DIM / 2;
constexpr int CHUNKS = HALF / VEC;
constexpr int PASS_VECS = OUT_OF_PLACE ? (HEAD_SIZE - ROT_DIM) / VEC : 0;
constexpr int PASS_PER_THREAD = (PASS_VECS + CHUNKS - 1) / CHUNKS;
constexpr int OFF_A = 0;                           // first vector of a chunk, per chunk index
constexpr int OFF_B = NEOX ? HALF : VEC;           // its partner vector
constexpr int CHUNK_STRIDE = NEOX ? VEC : 2 * VEC; // elements between consecutive chunks
// The outputs' pair order: the input's, or the other one (DeepSeek's interleaved RoPE writes
// GPT-J pairs de-interleaved into NeoX order; its backward does the reverse).
constexpr int OUT_OFF_B = OUT_NEOX ? HALF : VEC;
constexpr int OUT_CHUNK_STRIDE = OUT_NEOX ? VEC : 2 * VEC;

static_assert(ROT_DIM % 2 == 0 && ROT_DIM <= HEAD_SIZE, "rotary dim");
static_assert(HALF % VEC == 0, "VEC must divide ROT_DIM/2");
static_assert(VEC % CACHE_VEC == 0, "CACHE_VEC must divide VEC");
static_assert(!MROPE || MROPE_T + MROPE_H + MROPE_W == HALF, "mrope sections must sum to R/2");
static_assert(INDEX_BITS == 32 || INDEX_BITS == 64, "INDEX_BITS is 32 or 64");
static_assert(STAGING >= 0 && STAGING <= 2, "STAGING is 0, 1 or 2");
static_assert(STAGE_TOKENS >= 1 && STAGES >= 1 && STAGES <= 4, "STAGE_TOKENS, STAGES");
static_assert(OUT_NEOX == NEOX || OUT_OF_PLACE, "reordering pairs needs separate outputs");
// Per-token cos/sin and reordered pairs are served by the register path; PDL's prologue
// would read cos/sin that the previous kernel may still be writing.
static_assert(!(COS_SIN_PER_TOKEN || OUT_NEOX != NEOX) || (STAGING == 0 && !PDL),
              "per-token cos/sin and reordered pairs: STAGING 0, no PDL");

// Element offsets: 64-bit, or 32-bit where the host has checked the extents (INDEX_BITS).
template <int BITS> struct OffsetType { typedef long long type; };
template <> struct OffsetType<32> { typedef int type; };
typedef OffsetType<INDEX_BITS>::type idx_t;

// Positions per token: 3 (temporal, height, width) for mRoPE, else 1.
constexpr int NPOS = MROPE ? 3 : 1;

// mRoPE: the position row (0 = t, 1 = h, 2 = w) that frequency j takes its angle from.
// Qwen2-VL: consecutive sections [MROPE_T | MROPE_H | MROPE_W] of the R/2 frequencies.
// Qwen3-VL (interleaved): j % 3 == 1 is h and j % 3 == 2 is w while j < 3 * that section,
// everything else t (transformers' apply_interleaved_mrope).
__device__ __forceinline__ int mrope_row(int j) {
  if constexpr (!MROPE) {
    return 0;
  } else if constexpr (MROPE_INTERLEAVED) {
    const int m = j % 3;
    return (m == 1 && j < 3 * MROPE_H) ? 1 : (m == 2 && j < 3 * MROPE_W) ? 2 : 0;
  } else {
    return j < MROPE_T ? 0 : (j < MROPE_T + MROPE_H ? 1 : 2);
  }
}

typedef Vec<scalar_t, VEC> vec_t;

// cos/sin of the VEC frequencies starting at crow / srow, converted to fp32. ok false (the
// decode build's predicated loads): the identity, cos 1 and sin 0.
__device__ __forceinline__ void load_cos_sin(const cache_t* crow, const cache_t* srow,
                                             float (&c)[VEC], float (&s)[VEC], bool ok = true) {
#pragma unroll
  for (int i = 0; i < VEC; i += CACHE_VEC) {
    Vec<cache_t, CACHE_VEC> cv, sv;
    if constexpr (DECODE) {
#pragma unroll
      for (int j = 0; j < CACHE_VEC; ++j) {
        cv.e[j] = one_value<cache_t>();
        sv.e[j] = zero_value<cache_t>();
      }
      load_vec_if<cache_t, CACHE_VEC>(ok, crow + i, cv);
      load_vec_if<cache_t, CACHE_VEC>(ok, srow + i, sv);
    } else {
      cv = load_vec<cache_t, CACHE_VEC>(crow + i);
      sv = load_vec<cache_t, CACHE_VEC>(srow + i);
    }
#pragma unroll
    for (int j = 0; j < CACHE_VEC; ++j) {
      c[i + j] = to_float(cv.e[j]);
      s[i + j] = to_float(sv.e[j]);
    }
  }
}

// cos/sin of the VEC frequencies of chunk `chunk` at position `pos`, from the cache.
// `valid` false, or a position outside the cache, gives the identity rotation: the cache
// is never read out of bounds.
__device__ __forceinline__ void cos_sin(const RopeParams& p, i64 pos, bool valid, int chunk,
                                        float (&c)[VEC], float (&s)[VEC]) {
  if constexpr (DECODE) {
    // The row's address does not wait on the range test (only the load is predicated on
    // it), so the load goes out a few instructions after the position lands.
    const bool in_cache = valid && (unsigned long long)pos < (unsigned long long)p.max_position;
    const cache_t* row =
        ((const cache_t*)p.cache + chunk * VEC) + (idx_t)pos * (idx_t)p.cache_stride;
    load_cos_sin(row, row + HALF, c, s, in_cache);
    return;
  }
  if (!(valid && pos >= 0 && pos < p.max_position)) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) { c[v] = 1.f; s[v] = 0.f; }
    return;
  }
  const cache_t* row = (const cache_t*)p.cache + (idx_t)pos * (idx_t)p.cache_stride + chunk * VEC;
  load_cos_sin(row, row + HALF, c, s);
}

// One pair (x1, x2) -> (x1*c - x2*s, x2*c + x1*s), in fp32, rounded once.
__device__ __forceinline__ void rotate(scalar_t& a, scalar_t& b, float c, float s) {
  const float x1 = to_float(a), x2 = to_float(b);
  a = from_float<scalar_t>(fmaf(x1, c, -x2 * s));
  b = from_float<scalar_t>(fmaf(x2, c, x1 * s));
}
// The same in fp32, not rounded (FEW_TOKENS rounds a whole vector afterwards).
__device__ __forceinline__ void rotate_pair(float& x1, float& x2, float c, float s) {
  const float a = x1, b = x2;
  x1 = fmaf(a, c, -b * s);
  x2 = fmaf(b, c, a * s);
}

// The chunk's pairs rotated in fp32 and rounded once. FEW_TOKENS: in float arrays, rounded
// a vector at a time (round_vec: a pair per conversion), ~60 instructions fewer between the
// loads and the stores; otherwise element by element in place (measured 2-5% faster at
// 8192 tokens with an fp32 cache, for reasons the SASS does not show).
__device__ __forceinline__ void rotate_chunk(vec_t& va, vec_t& vb, const float (&c)[VEC],
                                             const float (&s)[VEC]) {
  if constexpr (!FEW_TOKENS) {
    if constexpr (NEOX || VEC == 1) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) rotate(va.e[v], vb.e[v], c[v], s[v]);
    } else {
#pragma unroll
      for (int u = 0; u < VEC / 2; ++u) {
        rotate(va.e[2 * u], va.e[2 * u + 1], c[u], s[u]);
        rotate(vb.e[2 * u], vb.e[2 * u + 1], c[VEC / 2 + u], s[VEC / 2 + u]);
      }
    }
    return;
  }
  float a[VEC], b[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) { a[v] = to_float(va.e[v]); b[v] = to_float(vb.e[v]); }
  if constexpr (NEOX || VEC == 1) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) rotate_pair(a[v], b[v], c[v], s[v]);
  } else {
    // GPT-J: va holds pairs 0 .. VEC/2-1 of the chunk, vb pairs VEC/2 .. VEC-1.
#pragma unroll
    for (int u = 0; u < VEC / 2; ++u) {
      rotate_pair(a[2 * u], a[2 * u + 1], c[u], s[u]);
      rotate_pair(b[2 * u], b[2 * u + 1], c[VEC / 2 + u], s[VEC / 2 + u]);
    }
  }
  if constexpr (DECODE) {
    va = round_vec_words<scalar_t, VEC>(a);
    vb = round_vec_words<scalar_t, VEC>(b);
  } else {
    va = round_vec<scalar_t, VEC>(a);
    vb = round_vec<scalar_t, VEC>(b);
  }
}

// Token dims are [tokens] or [batch, seq] with independent strides. TOKENS_2D false (the
// planner saw one token dim): no division, and none of its code ahead of the first loads.
__device__ __forceinline__ void split_token(const RopeParams& p, idx_t t, idx_t& outer,
                                            idx_t& inner) {
  outer = 0;
  inner = t;
  if constexpr (TOKENS_2D) {
    if (p.inner_tokens != p.num_tokens) {
      outer = t / (idx_t)p.inner_tokens;
      inner = t - outer * (idx_t)p.inner_tokens;
    }
  }
}

// Position of token t in position row `row` (mRoPE: 0, 1, 2; else 0). valid false: no
// request owns the token, or t is past the end.
__device__ __forceinline__ i64 token_position(const RopeParams& p, idx_t t, bool& valid,
                                              int row = 0) {
  valid = t < p.num_tokens;
  if (!valid) return 0;
  if constexpr (INDPTR) {
    const index_t* indptr = (const index_t*)p.positions;
    const int b = find_request<index_t>(indptr, (int)p.batch_size, (i64)t);
    valid = b >= 0;
    return valid ? (i64)((const index_t*)p.offsets)[b] + ((i64)t - (i64)indptr[b]) : 0;
  } else {
    idx_t outer, inner;
    split_token(p, t, outer, inner);
    return (i64)((const index_t*)p.positions)[row * (idx_t)p.pos_stride_row +
                                              outer * (idx_t)p.pos_stride_outer +
                                              inner * (idx_t)p.pos_stride_inner];
  }
}

// mRoPE from a cache: frequency j of the chunk takes cos/sin from the cache row of
// position row mrope_row(j). Each position row the chunk uses costs one vector read of the
// cache (Qwen2-VL sections aligned to VEC: one; interleaved: up to three); positions past
// the cache give the identity for the frequencies that use them.
__device__ __forceinline__ void mrope_cos_sin(const RopeParams& p, idx_t t, int chunk,
                                              float (&c)[VEC], float (&s)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) { c[v] = 1.f; s[v] = 0.f; }
#pragma unroll
  for (int r = 0; r < 3; ++r) {
    bool used = false;
#pragma unroll
    for (int v = 0; v < VEC; ++v) used |= mrope_row(chunk * VEC + v) == r;
    if (!used) continue;
    bool valid;
    const i64 pos = token_position(p, t, valid, r);
    float cr[VEC], sr[VEC];
    cos_sin(p, pos, valid, chunk, cr, sr);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (mrope_row(chunk * VEC + v) == r) { c[v] = cr[v]; s[v] = sr[v]; }
    }
  }
}

// On the fly, the block first computes cos/sin of its blockDim.z tokens x HALF frequencies
// into shared memory, each (token, frequency) once, spread over all its threads; every
// thread then reads its chunk. Without this, the double-precision sincos would be repeated
// by every head group (40 times at 1024 tokens on Llama-3-8B shapes). Dynamic shared
// memory: blockDim.z * (HALF float2 + 2 * NPOS i64) bytes, sized by the planner.
// (One dynamic shared array for every path; 16-byte aligned for the staged copies.)
extern __shared__ uint4 dynamic_smem[];

// The loads of one batch of HEAD_BATCH heads of one token (and where they go).
struct Batch {
  vec_t va[HEAD_BATCH], vb[HEAD_BATCH];
  vec_t pass[HEAD_BATCH][PASS_PER_THREAD > 0 ? PASS_PER_THREAD : 1];
  scalar_t* dst[HEAD_BATCH];
};

// Element offsets of one token's q, k, q_out and k_out rows (and, per-token cos/sin, of its
// cos and sin rows).
struct TokenRows {
  idx_t q, k, qo, ko, cos_row, sin_row;
};

__device__ __forceinline__ TokenRows token_rows(const RopeParams& p, idx_t t) {
  idx_t outer, inner;
  split_token(p, t, outer, inner);
  // rot_offset: the rotated dims start that far into each head (vLLM's rope_dim_offset;
  // in place only, so the outputs are the inputs)
  const idx_t off = (idx_t)p.rot_offset;
  if constexpr (DECODE && !OUT_OF_PLACE) {  // load_batch writes where it reads
    return {inner * (idx_t)p.q_stride_inner + off, inner * (idx_t)p.k_stride_inner + off, 0, 0,
            inner * (idx_t)p.cos_stride_inner, inner * (idx_t)p.sin_stride_inner};
  }
  return {outer * (idx_t)p.q_stride_outer + inner * (idx_t)p.q_stride_inner + off,
          outer * (idx_t)p.k_stride_outer + inner * (idx_t)p.k_stride_inner + off,
          outer * (idx_t)p.qo_stride_outer + inner * (idx_t)p.qo_stride_inner + off,
          outer * (idx_t)p.ko_stride_outer + inner * (idx_t)p.ko_stride_inner + off,
          outer * (idx_t)p.cos_stride_outer + inner * (idx_t)p.cos_stride_inner,
          outer * (idx_t)p.sin_stride_outer + inner * (idx_t)p.sin_stride_inner};
}

// cos/sin given per token (transformers' apply_rotary_pos_emb, flash-attn): frequency j at
// index j of the token's cos and sin rows. A row of width ROT_DIM repeats its halves (as
// transformers builds it); only the first is read.
__device__ __forceinline__ void token_cos_sin(const RopeParams& p, const TokenRows& r, int chunk,
                                              float (&c)[VEC], float (&s)[VEC]) {
  load_cos_sin((const cache_t*)p.cos + r.cos_row + chunk * VEC,
               (const cache_t*)p.sin + r.sin_row + chunk * VEC, c, s);
}

// The rotated pairs of a chunk moved from the input's order into the outputs' (OUT_NEOX).
// NeoX holds pair v of the chunk as (va[v], vb[v]); GPT-J as adjacent elements, pairs
// 0 .. VEC/2-1 in va and the rest in vb. With VEC == 1 both hold it as (va[0], vb[0]).
__device__ __forceinline__ void reorder_pairs(vec_t& va, vec_t& vb) {
  if constexpr (OUT_NEOX != NEOX && VEC > 1) {
    vec_t a, b;
#pragma unroll
    for (int u = 0; u < VEC / 2; ++u) {
      if constexpr (NEOX) {  // interleave into GPT-J order
        a.e[2 * u] = va.e[u];
        a.e[2 * u + 1] = vb.e[u];
        b.e[2 * u] = va.e[VEC / 2 + u];
        b.e[2 * u + 1] = vb.e[VEC / 2 + u];
      } else {               // de-interleave into NeoX order
        a.e[u] = va.e[2 * u];
        b.e[u] = va.e[2 * u + 1];
        a.e[VEC / 2 + u] = vb.e[2 * u];
        b.e[VEC / 2 + u] = vb.e[2 * u + 1];
      }
    }
    va = a;
    vb = b;
  }
}

__device__ __forceinline__ void load_batch(const RopeParams& p, const TokenRows& r, int h0,
                                           int num_heads, int chunk, Batch& b) {
  const int off = chunk * CHUNK_STRIDE;
#pragma unroll
  for (int i = 0; i < HEAD_BATCH; ++i) {
    const int h = h0 + i;
    if (h < num_heads) {
      if constexpr (DECODE && !OUT_OF_PLACE) {
        // one 32-bit offset, one pointer, no branch; in place the output is the input (and
        // there is no pass-through part to copy)
        const bool is_q = h < p.num_q_heads;
        const idx_t o = is_q ? r.q + h * (idx_t)p.q_stride_head
                             : r.k + (h - (idx_t)p.num_q_heads) * (idx_t)p.k_stride_head;
        const scalar_t* at = (is_q ? (const scalar_t*)p.q : (const scalar_t*)p.k) + (o + off);
        b.dst[i] = const_cast<scalar_t*>(at) - off;  // rotate_store_batch adds the chunk back
        b.va[i] = load_vec<scalar_t, VEC>(at + OFF_A);
        b.vb[i] = load_vec<scalar_t, VEC>(at + OFF_B);
      } else {
        const scalar_t* src;
        if (h < p.num_q_heads) {
          src = (const scalar_t*)p.q + r.q + h * (idx_t)p.q_stride_head;
          b.dst[i] = (scalar_t*)p.q_out + r.qo + h * (idx_t)p.qo_stride_head;
        } else {
          const idx_t hk = h - (idx_t)p.num_q_heads;
          src = (const scalar_t*)p.k + r.k + hk * (idx_t)p.k_stride_head;
          b.dst[i] = (scalar_t*)p.k_out + r.ko + hk * (idx_t)p.ko_stride_head;
        }
        b.va[i] = load_vec<scalar_t, VEC>(src + off + OFF_A);
        b.vb[i] = load_vec<scalar_t, VEC>(src + off + OFF_B);
#pragma unroll
        for (int m = 0; m < PASS_PER_THREAD; ++m) {
          const int pv = chunk + m * CHUNKS;
          if (pv < PASS_VECS) b.pass[i][m] = load_vec<scalar_t, VEC>(src + ROT_DIM + pv * VEC);
        }
      }
    }
  }
}

__device__ __forceinline__ void rotate_store_batch(int h0, int num_heads, int chunk, Batch& b,
                                                   const float (&c)[VEC], const float (&s)[VEC]) {
  const int off = chunk * OUT_CHUNK_STRIDE;
#pragma unroll
  for (int i = 0; i < HEAD_BATCH; ++i) {
    if (h0 + i < num_heads) {
      rotate_chunk(b.va[i], b.vb[i], c, s);
      reorder_pairs(b.va[i], b.vb[i]);
      store_vec<scalar_t, VEC>(b.dst[i] + off + OFF_A, b.va[i]);
      store_vec<scalar_t, VEC>(b.dst[i] + off + OUT_OFF_B, b.vb[i]);
#pragma unroll
      for (int m = 0; m < PASS_PER_THREAD; ++m) {
        const int pv = chunk + m * CHUNKS;
        if (pv < PASS_VECS) store_vec<scalar_t, VEC>(b.dst[i] + ROT_DIM + pv * VEC, b.pass[i][m]);
      }
    }
  }
}

// ===================================================================== STAGING 0
// The original kernel: each thread's q/k vectors wait in registers.
__device__ __forceinline__ void register_rope(const RopeParams& p) {
  const idx_t t = (idx_t)blockIdx.x * blockDim.z + threadIdx.z;
  const int chunk = threadIdx.x;
  const int group = blockIdx.y * blockDim.y + threadIdx.y;
  const int step = gridDim.y * blockDim.y * HEAD_BATCH;
  const int num_heads = (int)(p.num_q_heads + p.num_k_heads);
  const bool active = t < p.num_tokens && group * HEAD_BATCH < num_heads;

  // The first batch's q/k loads go out before cos/sin are fetched (position -> cache row,
  // two dependent loads) or computed (double-precision math): their latencies overlap.
  // FEW_TOKENS, from a cache: the position load goes out even before the q/k addressing
  // (~70 instructions); ptxas then issues the q/k loads with the cos/sin loads (decode:
  // -0.1 us). With PDL the q/k loads must wait for the previous kernel, so they go out
  // after cos/sin instead.
  int h0 = group * HEAD_BATCH;
  bool pos_valid = false;
  i64 pos = 0;
  if constexpr (COS_SIN_FROM_CACHE && !MROPE && FEW_TOKENS) {
    if (active) pos = token_position(p, t, pos_valid);
  }
  TokenRows rows;
  Batch cur;
  if (active) {
    rows = token_rows(p, t);
    if constexpr (!PDL) load_batch(p, rows, h0, num_heads, chunk, cur);
  }

  float c[VEC], s[VEC];
  if constexpr (COS_SIN_FROM_CACHE) {
    if (!active) return;
    if constexpr (MROPE) {
      mrope_cos_sin(p, t, chunk, c, s);
    } else {
      if constexpr (!FEW_TOKENS) pos = token_position(p, t, pos_valid);
      cos_sin(p, pos, pos_valid, chunk, c, s);
    }
  } else if constexpr (COS_SIN_PER_TOKEN) {
    if (!active) return;
    token_cos_sin(p, rows, chunk, c, s);
  } else {
    float2* fly_tile = (float2*)dynamic_smem;
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int nthreads = blockDim.x * blockDim.y * blockDim.z;
    const int ntok = blockDim.z;
    i64* tile_pos = (i64*)(fly_tile + ntok * HALF);   // [ntok][NPOS]
    i64* tile_valid = tile_pos + ntok * NPOS;
    for (int i = tid; i < ntok * NPOS; i += nthreads) {
      const int tz = i / NPOS, r = i - tz * NPOS;
      bool valid;
      tile_pos[i] = token_position(p, (idx_t)blockIdx.x * ntok + tz, valid, r);
      tile_valid[i] = valid;
    }
    __syncthreads();
    for (int i = tid; i < ntok * HALF; i += nthreads) {
      const int tz = i / HALF, j = i - tz * HALF;
      const int slot = tz * NPOS + mrope_row(j);
      float cj, sj;
      fly_cos_sin<SCALING>(p, tile_pos[slot], tile_valid[slot] != 0, j, cj, sj);
      fly_tile[i] = make_float2(cj, sj);
    }
    __syncthreads();
    if (!active) return;
    const float2* mine = fly_tile + threadIdx.z * HALF + chunk * VEC;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float2 cs = mine[v];
      c[v] = cs.x;
      s[v] = cs.y;
    }
  }

  // The inverse rotation (the backward of RoPE: x = R(-a) y) is the same kernel with sin
  // negated, so gradients go through exactly the code and rounding of the forward pass.
  if constexpr (INVERSE) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) s[v] = -s[v];
  }

  if constexpr (PDL) {
    pdl_wait();
    pdl_launch_dependents();
    load_batch(p, rows, h0, num_heads, chunk, cur);
  }

  // Software pipeline over the thread's head batches: the next batch's loads are in flight
  // while the current one is rotated and stored.
  for (;;) {
    const int h1 = h0 + step;
    if (PREFETCH && h1 < num_heads) {
      Batch next;
      load_batch(p, rows, h1, num_heads, chunk, next);
      rotate_store_batch(h0, num_heads, chunk, cur, c, s);
      cur = next;
    } else {
      rotate_store_batch(h0, num_heads, chunk, cur, c, s);
      if (h1 >= num_heads) break;
      load_batch(p, rows, h1, num_heads, chunk, cur);
    }
    h0 = h1;
  }
}

// ===================================================================== STAGING 1 and 2
// A block walks over tiles of STAGE_TOKENS tokens x all heads. Per tile, each thread copies
// its own vectors of the tile's head rows into shared memory (STAGING 1: cp.async; 2: bulk
// copies of whole rows, one barrier per stage), and later rotates exactly the vectors it
// copied and stores them to global memory. So the q/k data never crosses threads: the
// only shared things are cos/sin (and the positions they come from), which is what the
// __syncthreads of each tile are for.
//
// Shared memory, STAGES slots of each:
//   cos/sin:   cache: the raw cache rows of the tile, [STAGE_TOKENS][NPOS][ROT_DIM] cache_t
//              (cos then sin, as in the cache; identity rows for invalid positions);
//              on the fly: [STAGE_TOKENS][HALF] float2 (cos, sin);
//   positions: [STAGE_TOKENS][NPOS] i64: the cache row to read (-1: identity), or on the
//              fly the position (0 where no request owns the token: the identity angle);
//   barriers:  one mbarrier per slot (STAGING 2);
//   rows:      [STAGE_TOKENS][num_heads][STAGE_ROW] scalar_t, q heads then k heads.
//
// Within a staged row, thread `chunk` owns vectors A = staged_a(chunk) and B =
// staged_b(chunk) (and out of place, the pass-through vectors chunk, chunk + CHUNKS, ...
// after ROT_DIM). NeoX: A = the chunk's VEC first-half elements, B their partners in the
// second half. GPT-J with VEC >= 2: A and B are the chunk-th vectors of each half, with
// whole pairs inside each vector; so the 8 threads of a quarter warp read 128 contiguous
// bytes of shared memory (no bank conflicts) in both styles.

constexpr int STAGE_ROW = OUT_OF_PLACE ? HEAD_SIZE : ROT_DIM;  // elements staged per head
constexpr bool PAIRS_IN_VEC = !NEOX && VEC >= 2;
constexpr int VEC_BYTES = VEC * (int)sizeof(scalar_t);
constexpr bool USE_BULK = STAGING == 2 && ROPE_HAS_BULK_COPY && VEC_BYTES == 16;
constexpr int STAGE_POS = STAGE_TOKENS * NPOS;  // position entries per slot

__host__ __device__ constexpr int round_up16(int bytes) { return (bytes + 15) / 16 * 16; }
constexpr int CS_SLOT_BYTES = round_up16(
    COS_SIN_FROM_CACHE ? STAGE_POS * ROT_DIM * (int)sizeof(cache_t) : STAGE_TOKENS * HALF * 8);
constexpr int POS_SLOT_BYTES = round_up16(STAGE_POS * 8);
constexpr int BARRIER_BYTES = USE_BULK ? round_up16(STAGES * 8) : 0;
// Shared memory before the q/k rows; the host adds STAGES * STAGE_TOKENS * num_heads *
// STAGE_ROW * sizeof(scalar_t) for the rows (see staged_smem_bytes).
constexpr int STAGED_FIXED_BYTES = STAGES * (CS_SLOT_BYTES + POS_SLOT_BYTES) + BARRIER_BYTES;

__device__ __forceinline__ unsigned staged_smem_bytes(int num_heads) {
  return STAGED_FIXED_BYTES +
         (unsigned)STAGES * STAGE_TOKENS * num_heads * STAGE_ROW * (unsigned)sizeof(scalar_t);
}

__device__ __forceinline__ int staged_a(int chunk) {
  return PAIRS_IN_VEC ? chunk * VEC : chunk * CHUNK_STRIDE + OFF_A;
}
__device__ __forceinline__ int staged_b(int chunk) {
  return PAIRS_IN_VEC ? HALF + chunk * VEC : chunk * CHUNK_STRIDE + OFF_B;
}
// The frequency of cos/sin slot v of a chunk, in rotate_chunk's order (GPT-J: slots
// 0 .. VEC/2-1 rotate A's pairs, VEC/2 .. VEC-1 B's).
__device__ __forceinline__ int staged_freq(int chunk, int v) {
  if constexpr (PAIRS_IN_VEC) {
    return v < VEC / 2 ? chunk * (VEC / 2) + v : HALF / 2 + chunk * (VEC / 2) + (v - VEC / 2);
  } else {
    return chunk * VEC + v;
  }
}
// cos/sin slots come in runs of consecutive frequencies this long: read a run at a time.
constexpr int FREQ_RUN = PAIRS_IN_VEC ? VEC / 2 : VEC;
constexpr int CS_READ = MROPE ? 1 : (CACHE_VEC < FREQ_RUN ? CACHE_VEC : FREQ_RUN);

struct Slot {
  unsigned char* cs;
  i64* pos;
  mbarrier_t* bar;
  scalar_t* rows;
};

__device__ __forceinline__ Slot stage_slot(int s, int num_heads) {
  unsigned char* base = (unsigned char*)dynamic_smem;
  Slot slot;
  slot.cs = base + s * CS_SLOT_BYTES;
  slot.pos = (i64*)(base + STAGES * CS_SLOT_BYTES + s * POS_SLOT_BYTES);
  slot.bar = (mbarrier_t*)(base + STAGES * (CS_SLOT_BYTES + POS_SLOT_BYTES)) + s;
  slot.rows = (scalar_t*)(base + STAGED_FIXED_BYTES) + s * STAGE_TOKENS * num_heads * STAGE_ROW;
  return slot;
}

// The value a position slot keeps for token t, position row `row` (see above).
__device__ __forceinline__ i64 staged_position(const RopeParams& p, idx_t t, int row) {
  bool valid;
  const i64 pos = token_position(p, t, valid, row);
  if constexpr (COS_SIN_FROM_CACHE) {
    return valid && pos >= 0 && pos < p.max_position ? pos : -1;
  } else {
    return valid ? pos : 0;
  }
}

// Head h (q heads first, then k heads) of token t, in the inputs and in the outputs.
__device__ __forceinline__ const scalar_t* head_in(const RopeParams& p, idx_t t, int h) {
  idx_t outer, inner;
  split_token(p, t, outer, inner);
  if (h < p.num_q_heads) {
    return (const scalar_t*)p.q + outer * (idx_t)p.q_stride_outer +
           inner * (idx_t)p.q_stride_inner + h * (idx_t)p.q_stride_head;
  }
  return (const scalar_t*)p.k + outer * (idx_t)p.k_stride_outer +
         inner * (idx_t)p.k_stride_inner + (h - (int)p.num_q_heads) * (idx_t)p.k_stride_head;
}
__device__ __forceinline__ scalar_t* head_out(const RopeParams& p, idx_t t, int h) {
  idx_t outer, inner;
  split_token(p, t, outer, inner);
  if (h < p.num_q_heads) {
    return (scalar_t*)p.q_out + outer * (idx_t)p.qo_stride_outer +
           inner * (idx_t)p.qo_stride_inner + h * (idx_t)p.qo_stride_head;
  }
  return (scalar_t*)p.k_out + outer * (idx_t)p.ko_stride_outer +
         inner * (idx_t)p.ko_stride_inner + (h - (int)p.num_q_heads) * (idx_t)p.ko_stride_head;
}

// Walks a lane's head rows of a tile: rows lane, lane + lanes, ... of the token-major
// [STAGE_TOKENS][num_heads] rows, as (token in tile, head), with no division per step.
struct RowWalk {
  int row, tt, h, dtt, dh;
  __device__ __forceinline__ RowWalk(int lane, int lanes, int num_heads)
      : row(lane), tt(lane / num_heads), h(lane % num_heads), dtt(lanes / num_heads),
        dh(lanes % num_heads) {}
  __device__ __forceinline__ void next(int lanes, int num_heads) {
    row += lanes;
    tt += dtt;
    h += dh;
    if (h >= num_heads) {
      h -= num_heads;
      ++tt;
    }
  }
};

// Starts the copies of tile `tile` into `slot`: its q/k rows and, with a cache, its cos/sin
// cache rows (positions already in the slot).
__device__ __forceinline__ void issue_tile(const RopeParams& p, idx_t tile, const Slot& slot,
                                           int num_heads, int chunk, int lane, int lanes,
                                           int tid, int nthreads) {
  const idx_t t0 = tile * STAGE_TOKENS;
  const int ntok = (int)min((i64)STAGE_TOKENS, (i64)p.num_tokens - (i64)t0);
  if constexpr (USE_BULK) {
    // Rows of the same token and tensor are one copy when they are adjacent in memory.
    const int nq = (int)p.num_q_heads, nk = (int)p.num_k_heads;
    const bool q_run = p.q_stride_head == STAGE_ROW, k_run = p.k_stride_head == STAGE_ROW;
    const int q_copies = nq == 0 ? 0 : (q_run ? 1 : nq);
    const int k_copies = nk == 0 ? 0 : (k_run ? 1 : nk);
    const int per_token = q_copies + k_copies;
    if (tid == 0) {
      mbarrier_arrive_expect(slot.bar, (unsigned)(ntok * num_heads * STAGE_ROW) *
                                           (unsigned)sizeof(scalar_t));
    }
    for (int i = tid; i < ntok * per_token; i += nthreads) {
      const int tt = i / per_token, c = i - tt * per_token;
      int h, heads;
      if (c < q_copies) {
        h = q_run ? 0 : c;
        heads = q_run ? nq : 1;
      } else {
        h = nq + (k_run ? 0 : c - q_copies);
        heads = k_run ? nk : 1;
      }
      bulk_copy_to_smem(slot.rows + (tt * num_heads + h) * STAGE_ROW, head_in(p, t0 + tt, h),
                        (unsigned)(heads * STAGE_ROW) * (unsigned)sizeof(scalar_t), slot.bar);
    }
  } else {
    for (RowWalk w(lane, lanes, num_heads); w.row < STAGE_TOKENS * num_heads;
         w.next(lanes, num_heads)) {
      if (w.tt >= ntok) break;
      const scalar_t* src = head_in(p, t0 + w.tt, w.h);
      scalar_t* dst = slot.rows + w.row * STAGE_ROW;
      copy_async<VEC_BYTES>(dst + staged_a(chunk), src + staged_a(chunk));
      copy_async<VEC_BYTES>(dst + staged_b(chunk), src + staged_b(chunk));
#pragma unroll
      for (int m = 0; m < PASS_PER_THREAD; ++m) {
        const int pv = chunk + m * CHUNKS;
        if (pv < PASS_VECS) copy_async<VEC_BYTES>(dst + ROT_DIM + pv * VEC, src + ROT_DIM + pv * VEC);
      }
    }
  }
  if constexpr (COS_SIN_FROM_CACHE) {
    constexpr int PIECES = ROT_DIM / CACHE_VEC;  // cache vectors per row (cos, then sin)
    constexpr int PIECE_BYTES = CACHE_VEC * (int)sizeof(cache_t);
    cache_t* cs = (cache_t*)slot.cs;
    for (int i = tid; i < ntok * NPOS * PIECES; i += nthreads) {
      const int e = i / PIECES, piece = i - e * PIECES;
      const i64 row = slot.pos[e];
      cache_t* dst = cs + e * ROT_DIM + piece * CACHE_VEC;
      if (row >= 0) {
        copy_async<PIECE_BYTES>(dst, (const cache_t*)p.cache + (idx_t)row * (idx_t)p.cache_stride +
                                         piece * CACHE_VEC);
      } else {  // identity: cos 1, sin 0
        Vec<cache_t, CACHE_VEC> v;
        const cache_t value = from_float<cache_t>(piece * CACHE_VEC < HALF ? 1.f : 0.f);
#pragma unroll
        for (int u = 0; u < CACHE_VEC; ++u) v.e[u] = value;
        store_vec<cache_t, CACHE_VEC>(dst, v);
      }
    }
  }
}

// On the fly: cos/sin of the tile's tokens x HALF frequencies into the slot, once each.
__device__ __forceinline__ void fly_tile_cos_sin(const RopeParams& p, idx_t tile,
                                                 const Slot& slot, int tid, int nthreads) {
  const int ntok = (int)min((i64)STAGE_TOKENS, (i64)p.num_tokens - (i64)tile * STAGE_TOKENS);
  float2* cs = (float2*)slot.cs;
  for (int i = tid; i < ntok * HALF; i += nthreads) {
    const int tt = i / HALF, j = i - tt * HALF;
    float c, s;
    fly_cos_sin<SCALING>(p, slot.pos[tt * NPOS + mrope_row(j)], true, j, c, s);
    cs[i] = make_float2(c, s);
  }
}

// This thread's cos/sin slots for token tt of the slot, in rotate_chunk's order.
__device__ __forceinline__ void staged_cos_sin(const Slot& slot, int tt, int chunk,
                                               float (&c)[VEC], float (&s)[VEC]) {
  if constexpr (COS_SIN_FROM_CACHE) {
    const cache_t* rows = (const cache_t*)slot.cs + tt * NPOS * ROT_DIM;
#pragma unroll
    for (int v = 0; v < VEC; v += CS_READ) {
      const int j = staged_freq(chunk, v);
      const cache_t* row = rows + mrope_row(j) * ROT_DIM;
      const Vec<cache_t, CS_READ> cv = load_vec<cache_t, CS_READ>(row + j);
      const Vec<cache_t, CS_READ> sv = load_vec<cache_t, CS_READ>(row + HALF + j);
#pragma unroll
      for (int u = 0; u < CS_READ; ++u) {
        c[v + u] = to_float(cv.e[u]);
        s[v + u] = to_float(sv.e[u]);
      }
    }
  } else {
    const float2* tile = (const float2*)slot.cs + tt * HALF;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float2 cs = tile[staged_freq(chunk, v)];
      c[v] = cs.x;
      s[v] = cs.y;
    }
  }
  if constexpr (INVERSE) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) s[v] = -s[v];
  }
}

// Rotates and stores this thread's vectors of tile `tile` (its copies have landed).
__device__ __forceinline__ void finish_tile(const RopeParams& p, idx_t tile, const Slot& slot,
                                            int num_heads, int chunk, int lane, int lanes) {
  const idx_t t0 = tile * STAGE_TOKENS;
  const int ntok = (int)min((i64)STAGE_TOKENS, (i64)p.num_tokens - (i64)t0);
  for (RowWalk w(lane, lanes, num_heads); w.row < STAGE_TOKENS * num_heads;
       w.next(lanes, num_heads)) {
    if (w.tt >= ntok) break;
    float c[VEC], s[VEC];
    staged_cos_sin(slot, w.tt, chunk, c, s);
    const scalar_t* row = slot.rows + w.row * STAGE_ROW;
    vec_t va = load_vec<scalar_t, VEC>(row + staged_a(chunk));
    vec_t vb = load_vec<scalar_t, VEC>(row + staged_b(chunk));
    rotate_chunk(va, vb, c, s);
    scalar_t* dst = head_out(p, t0 + w.tt, w.h);
    store_vec<scalar_t, VEC>(dst + staged_a(chunk), va);
    store_vec<scalar_t, VEC>(dst + staged_b(chunk), vb);
#pragma unroll
    for (int m = 0; m < PASS_PER_THREAD; ++m) {
      const int pv = chunk + m * CHUNKS;
      if (pv < PASS_VECS) {
        store_vec<scalar_t, VEC>(dst + ROT_DIM + pv * VEC,
                                 load_vec<scalar_t, VEC>(row + ROT_DIM + pv * VEC));
      }
    }
  }
}

__device__ __forceinline__ void staged_rope(const RopeParams& p) {
  const int chunk = threadIdx.x, lane = threadIdx.y, lanes = blockDim.y;
  const int tid = threadIdx.x + blockDim.x * threadIdx.y;
  const int nthreads = blockDim.x * blockDim.y;
  const int num_heads = (int)(p.num_q_heads + p.num_k_heads);
  // A launch this path cannot serve (block not CHUNKS wide, too little shared memory for
  // its slots) does nothing rather than write out of bounds; tests catch it at once.
  if (blockDim.x != CHUNKS || blockDim.z != 1 || dynamic_smem_bytes() < staged_smem_bytes(num_heads))
    return;
  const idx_t num_tiles = (idx_t)((p.num_tokens + STAGE_TOKENS - 1) / STAGE_TOKENS);
  const idx_t first = blockIdx.x, stride = gridDim.x;
  if (first >= num_tiles) return;

  if constexpr (USE_BULK) {
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) mbarrier_init(stage_slot(s, num_heads).bar, 1);
    }
  }
  // Prologue: positions of the first STAGES tiles, then the copies of the first STAGES-1.
#pragma unroll
  for (int s = 0; s < STAGES; ++s) {
    const idx_t tile = first + s * stride;
    const Slot slot = stage_slot(s, num_heads);
    for (int i = tid; i < STAGE_POS; i += nthreads) {
      slot.pos[i] = tile < num_tiles ? staged_position(p, tile * STAGE_TOKENS + i / NPOS, i % NPOS)
                                     : (i64)-1;
    }
  }
  __syncthreads();
  if constexpr (PDL) {
    pdl_wait();
    pdl_launch_dependents();
  }
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    const idx_t tile = first + s * stride;
    if (tile < num_tiles) {
      const Slot slot = stage_slot(s, num_heads);
      issue_tile(p, tile, slot, num_heads, chunk, lane, lanes, tid, nthreads);
      if constexpr (!COS_SIN_FROM_CACHE) fly_tile_cos_sin(p, tile, slot, tid, nthreads);
    }
    copy_async_commit();
  }

  for (int k = 0;; ++k) {
    const idx_t tile = first + k * stride;
    if (tile >= num_tiles) break;
    const int s = k % STAGES;
    const Slot slot = stage_slot(s, num_heads);
    // Copies of the tile STAGES-1 ahead, into the slot the previous tile has left.
    const idx_t ahead = tile + (STAGES - 1) * stride;
    if (ahead < num_tiles) {
      const Slot next = stage_slot((k + STAGES - 1) % STAGES, num_heads);
      issue_tile(p, ahead, next, num_heads, chunk, lane, lanes, tid, nthreads);
      if constexpr (!COS_SIN_FROM_CACHE) fly_tile_cos_sin(p, ahead, next, tid, nthreads);
    }
    copy_async_commit();
    // Positions of the tile STAGES ahead: loaded now, stored into this slot once it is
    // done, so their latency hides behind this tile's wait and work.
    const idx_t later = tile + STAGES * stride;
    i64 later_pos = -1;
    if (tid < STAGE_POS && later < num_tiles) {
      later_pos = staged_position(p, later * STAGE_TOKENS + tid / NPOS, tid % NPOS);
    }
    copy_async_wait<STAGES - 1>();  // this thread's copies of `tile` have landed
    if constexpr (USE_BULK) mbarrier_wait(slot.bar, (unsigned)(k / STAGES) & 1u);
    __syncthreads();                // everyone's: the cos/sin rows of `tile`
    finish_tile(p, tile, slot, num_heads, chunk, lane, lanes);
    if (later < num_tiles) {
      for (int i = tid; i < STAGE_POS; i += nthreads) {
        slot.pos[i] = i == tid ? later_pos
                               : staged_position(p, later * STAGE_TOKENS + i / NPOS, i % NPOS);
      }
    }
    __syncthreads();                // the slot is free for the copies of tile + STAGES
  }
}

// Block size is at most 512 threads (rope_jit/plan.py). MIN_BLOCKS (blocks of 512 per SM)
// caps the registers per thread: 1 allows 128, 2 caps at 64, 3 at 40; fewer registers mean
// more threads resident per SM, which decides whether a mid-sized grid fits in one wave.
extern "C" __global__ void __launch_bounds__(512, MIN_BLOCKS) rope_kernel(const RopeParams p) {
  if constexpr (STAGING == 0) {
    register_rope(p);
  } else {
    staged_rope(p);
  }
}
