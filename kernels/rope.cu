// Rotary position embedding, specialized at run time.
//
// rope_jit renders this file after common.cuh and a generated prelude that defines, as
// compile-time constants: scalar_t (q/k storage), cache_t (cos/sin cache storage),
// index_t (positions, indptr and offsets), HEAD_SIZE, ROT_DIM, VEC (elements per vector
// access), CACHE_VEC, HEAD_BATCH (heads whose loads are issued together), NEOX,
// OUT_OF_PLACE, INDPTR, COS_SIN_FROM_CACHE, SCALING (on-the-fly frequency variant),
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

constexpr int HALF = ROT_DIM / 2;
constexpr int CHUNKS = HALF / VEC;
constexpr int PASS_VECS = OUT_OF_PLACE ? (HEAD_SIZE - ROT_DIM) / VEC : 0;
constexpr int PASS_PER_THREAD = (PASS_VECS + CHUNKS - 1) / CHUNKS;
constexpr int OFF_A = 0;                           // first vector of a chunk, per chunk index
constexpr int OFF_B = NEOX ? HALF : VEC;           // its partner vector
constexpr int CHUNK_STRIDE = NEOX ? VEC : 2 * VEC; // elements between consecutive chunks

static_assert(ROT_DIM % 2 == 0 && ROT_DIM <= HEAD_SIZE, "rotary dim");
static_assert(HALF % VEC == 0, "VEC must divide ROT_DIM/2");
static_assert(VEC % CACHE_VEC == 0, "CACHE_VEC must divide VEC");
static_assert(!MROPE || MROPE_T + MROPE_H + MROPE_W == HALF, "mrope sections must sum to R/2");

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

// cos/sin of the VEC frequencies of chunk `chunk` at position `pos`, from the cache.
// `valid` false, or a position outside the cache, gives the identity rotation: the cache
// is never read out of bounds.
__device__ __forceinline__ void cos_sin(const RopeParams& p, i64 pos, bool valid, int chunk,
                                        float (&c)[VEC], float (&s)[VEC]) {
  if (!(valid && pos >= 0 && pos < p.max_position)) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) { c[v] = 1.f; s[v] = 0.f; }
    return;
  }
  const cache_t* row = (const cache_t*)p.cache + pos * p.cache_stride + chunk * VEC;
#pragma unroll
  for (int i = 0; i < VEC; i += CACHE_VEC) {
    const Vec<cache_t, CACHE_VEC> cv = load_vec<cache_t, CACHE_VEC>(row + i);
    const Vec<cache_t, CACHE_VEC> sv = load_vec<cache_t, CACHE_VEC>(row + HALF + i);
#pragma unroll
    for (int j = 0; j < CACHE_VEC; ++j) {
      c[i + j] = to_float(cv.e[j]);
      s[i + j] = to_float(sv.e[j]);
    }
  }
}

// One pair (x1, x2) -> (x1*c - x2*s, x2*c + x1*s), in fp32, rounded once.
__device__ __forceinline__ void rotate(scalar_t& a, scalar_t& b, float c, float s) {
  const float x1 = to_float(a), x2 = to_float(b);
  a = from_float<scalar_t>(fmaf(x1, c, -x2 * s));
  b = from_float<scalar_t>(fmaf(x2, c, x1 * s));
}

__device__ __forceinline__ void rotate_chunk(vec_t& va, vec_t& vb, const float (&c)[VEC],
                                             const float (&s)[VEC]) {
  if constexpr (NEOX || VEC == 1) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) rotate(va.e[v], vb.e[v], c[v], s[v]);
  } else {
    // GPT-J: va holds pairs 0 .. VEC/2-1 of the chunk, vb pairs VEC/2 .. VEC-1.
#pragma unroll
    for (int u = 0; u < VEC / 2; ++u) {
      rotate(va.e[2 * u], va.e[2 * u + 1], c[u], s[u]);
      rotate(vb.e[2 * u], vb.e[2 * u + 1], c[VEC / 2 + u], s[VEC / 2 + u]);
    }
  }
}

// Position of token t in position row `row` (mRoPE: 0, 1, 2; else 0). valid false: no
// request owns the token, or t is past the end.
__device__ __forceinline__ i64 token_position(const RopeParams& p, i64 t, bool& valid,
                                              int row = 0) {
  valid = t < p.num_tokens;
  if (!valid) return 0;
  if constexpr (INDPTR) {
    const index_t* indptr = (const index_t*)p.positions;
    const int b = find_request<index_t>(indptr, (int)p.batch_size, t);
    valid = b >= 0;
    return valid ? (i64)((const index_t*)p.offsets)[b] + (t - (i64)indptr[b]) : 0;
  } else {
    i64 outer = 0, inner = t;
    if (p.inner_tokens != p.num_tokens) {
      outer = t / p.inner_tokens;
      inner = t - outer * p.inner_tokens;
    }
    return (i64)((const index_t*)p.positions)[row * p.pos_stride_row + outer * p.pos_stride_outer +
                                              inner * p.pos_stride_inner];
  }
}

// mRoPE from a cache: frequency j of the chunk takes cos/sin from the cache row of
// position row mrope_row(j). Each position row the chunk uses costs one vector read of the
// cache (Qwen2-VL sections aligned to VEC: one; interleaved: up to three); positions past
// the cache give the identity for the frequencies that use them.
__device__ __forceinline__ void mrope_cos_sin(const RopeParams& p, i64 t, int chunk,
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
extern __shared__ float2 fly_tile[];

// The loads of one batch of HEAD_BATCH heads of one token (and where they go).
struct Batch {
  vec_t va[HEAD_BATCH], vb[HEAD_BATCH];
  vec_t pass[HEAD_BATCH][PASS_PER_THREAD > 0 ? PASS_PER_THREAD : 1];
  scalar_t* dst[HEAD_BATCH];
};

// Element offsets of one token's q, k, q_out and k_out rows.
struct TokenRows {
  i64 q, k, qo, ko;
};

__device__ __forceinline__ TokenRows token_rows(const RopeParams& p, i64 t) {
  // Token dims are [tokens] or [batch, seq] with independent strides.
  i64 outer = 0, inner = t;
  if (p.inner_tokens != p.num_tokens) {
    outer = t / p.inner_tokens;
    inner = t - outer * p.inner_tokens;
  }
  return {outer * p.q_stride_outer + inner * p.q_stride_inner,
          outer * p.k_stride_outer + inner * p.k_stride_inner,
          outer * p.qo_stride_outer + inner * p.qo_stride_inner,
          outer * p.ko_stride_outer + inner * p.ko_stride_inner};
}

__device__ __forceinline__ void load_batch(const RopeParams& p, const TokenRows& r, int h0,
                                           int num_heads, int chunk, Batch& b) {
  const int off = chunk * CHUNK_STRIDE;
#pragma unroll
  for (int i = 0; i < HEAD_BATCH; ++i) {
    const int h = h0 + i;
    if (h < num_heads) {
      const scalar_t* src;
      if (h < p.num_q_heads) {
        src = (const scalar_t*)p.q + r.q + h * p.q_stride_head;
        b.dst[i] = (scalar_t*)p.q_out + r.qo + h * p.qo_stride_head;
      } else {
        const i64 hk = h - p.num_q_heads;
        src = (const scalar_t*)p.k + r.k + hk * p.k_stride_head;
        b.dst[i] = (scalar_t*)p.k_out + r.ko + hk * p.ko_stride_head;
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

__device__ __forceinline__ void rotate_store_batch(int h0, int num_heads, int chunk, Batch& b,
                                                   const float (&c)[VEC], const float (&s)[VEC]) {
  const int off = chunk * CHUNK_STRIDE;
#pragma unroll
  for (int i = 0; i < HEAD_BATCH; ++i) {
    if (h0 + i < num_heads) {
      rotate_chunk(b.va[i], b.vb[i], c, s);
      store_vec<scalar_t, VEC>(b.dst[i] + off + OFF_A, b.va[i]);
      store_vec<scalar_t, VEC>(b.dst[i] + off + OFF_B, b.vb[i]);
#pragma unroll
      for (int m = 0; m < PASS_PER_THREAD; ++m) {
        const int pv = chunk + m * CHUNKS;
        if (pv < PASS_VECS) store_vec<scalar_t, VEC>(b.dst[i] + ROT_DIM + pv * VEC, b.pass[i][m]);
      }
    }
  }
}

// Block size is at most 512 threads (rope_jit/plan.py). MIN_BLOCKS (blocks of 512 per SM)
// caps the registers per thread: 1 allows 128, 2 caps at 64, 3 at 40; fewer registers mean
// more threads resident per SM, which decides whether a mid-sized grid fits in one wave.
extern "C" __global__ void __launch_bounds__(512, MIN_BLOCKS) rope_kernel(const RopeParams p) {
  const i64 t = (i64)blockIdx.x * blockDim.z + threadIdx.z;
  const int chunk = threadIdx.x;
  const int group = blockIdx.y * blockDim.y + threadIdx.y;
  const int step = gridDim.y * blockDim.y * HEAD_BATCH;
  const int num_heads = (int)(p.num_q_heads + p.num_k_heads);
  const bool active = t < p.num_tokens && group * HEAD_BATCH < num_heads;

  // The first batch's q/k loads go out before cos/sin are fetched (position -> cache row,
  // two dependent loads) or computed (double-precision math): their latencies overlap.
  int h0 = group * HEAD_BATCH;
  TokenRows rows;
  Batch cur;
  if (active) {
    rows = token_rows(p, t);
    load_batch(p, rows, h0, num_heads, chunk, cur);
  }

  float c[VEC], s[VEC];
  if constexpr (COS_SIN_FROM_CACHE) {
    if (!active) return;
    if constexpr (MROPE) {
      mrope_cos_sin(p, t, chunk, c, s);
    } else {
      bool valid;
      const i64 pos = token_position(p, t, valid);
      cos_sin(p, pos, valid, chunk, c, s);
    }
  } else {
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int nthreads = blockDim.x * blockDim.y * blockDim.z;
    const int ntok = blockDim.z;
    i64* tile_pos = (i64*)(fly_tile + ntok * HALF);   // [ntok][NPOS]
    i64* tile_valid = tile_pos + ntok * NPOS;
    for (int i = tid; i < ntok * NPOS; i += nthreads) {
      const int tz = i / NPOS, r = i - tz * NPOS;
      bool valid;
      tile_pos[i] = token_position(p, (i64)blockIdx.x * ntok + tz, valid, r);
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
