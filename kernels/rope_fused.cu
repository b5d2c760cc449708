// RoPE fused with quantization and the KV-cache write, specialized at run time: FlashInfer's
// rope_quantize_fp8 / mla_rope_quantize_fp8 / rope_quantize_fp8_append_paged_kv_cache,
// vLLM's concat_and_cache_mla_rope_fused and RoPE + reshape_and_cache_flash, SGLang's
// fused_set_kv_buffer (rope_jit/plan_fused.py maps each onto this kernel).
//
// Rendered after common.cuh, a prelude (rope_jit/specs_fused.py FusedRopeSpec) and
// rope_chunk.cuh. Per token t (one position, one cache row):
//   q_rope [Hq, R] and k_rope [Hk, R]: rotated in fp32, then each destination gets
//     round(x * its multiplier) in its own type: q -> q_rope_out (or q_rope in place);
//     k -> k_rope_out (or k_rope in place) and/or the K cache.
//   q_nope [Hq, NQ] -> q_nope_out; k_nope [Hk, NK] -> k_nope_out and/or the K cache (at
//     its own offset, e.g. after the rotated part; K_NOPE_IN_K_ROPE: read from k_rope's
//     rows past the rotated part, vLLM's key); v [Hk, DV] -> the V cache: copied, scaled
//     and rounded the same way.
// Cache rows: CACHE_MODE_SLOTS (vLLM slot_mapping, SGLang cache_loc): slot -> (page,
// entry) = (slot / PAGE_SIZE, slot % PAGE_SIZE), negative slots and tokens past the
// mapping not cached. CACHE_MODE_PAGED (FlashInfer): request b = batch_indices[t] (< 0:
// a padding token, nothing of it written), page kv_indices[kv_indptr[b] + pos / PAGE_SIZE],
// entry pos % PAGE_SIZE with pos = positions[t]. A row outside the cache is not written.
//
// Work split. The work of one token is a list of ITEMS items: first a rotated chunk of each
// q and k head (two vector loads), then one vector of each nope / v row. Block =
// (item lanes, tokens); grid = (token tiles, item splits): block (x, y) does items
// [y * split_items, (y+1) * split_items) of its tokens, each thread ITEM_BATCH items with all
// their loads in flight before the first store. While the first batch's loads are in
// flight, each thread works out its token's cache row (every thread of the token the same
// few index loads, served by L1) and its cos/sin:
//   COS_SIN_IN_REGS (from a cache; the planner makes blockDim.x and split_items multiples of
//     CHUNKS, so all rotated items of a thread are the same chunk): the thread reads its
//     chunk's VEC cos/sin once into registers. No shared memory, no barrier: ncu showed the
//     barrier and the shared-memory reads of a per-block tile as 40% of the stall cycles.
//   otherwise (on the fly: the sincos is worth sharing): the block computes its tokens'
//     cos/sin into a shared tile, one barrier.

enum { CACHE_MODE_NONE = 0, CACHE_MODE_SLOTS = 1, CACHE_MODE_PAGED = 2 };
enum { OUT_NONE = 0, OUT_ARRAY = 1, OUT_INPLACE = 2 };  // where a rotated k head goes
constexpr int NUM_ROPE_HEADS = NUM_Q_HEADS + NUM_K_HEADS;
constexpr int ROT_ITEMS = NUM_ROPE_HEADS * CHUNKS;
constexpr bool K_NOPE_ANY = K_NOPE_OUT || K_NOPE_CACHE >= 0;
constexpr int QN_VECS = Q_NOPE_OUT ? Q_NOPE_DIM / VEC : 0;  // vectors per head row
constexpr int KN_VECS = K_NOPE_ANY ? K_NOPE_DIM / VEC : 0;
constexpr int V_VECS = V_CACHE >= 0 ? V_DIM / VEC : 0;
constexpr int QN_END = ROT_ITEMS + NUM_Q_HEADS * QN_VECS;
constexpr int KN_END = QN_END + NUM_K_HEADS * KN_VECS;
constexpr int ITEMS = KN_END + NUM_K_HEADS * V_VECS;

static_assert(Q_NOPE_DIM % VEC == 0 && K_NOPE_DIM % VEC == 0 && V_DIM % VEC == 0,
              "VEC must divide every row length");
static_assert(CACHE_MODE != CACHE_MODE_NONE || (K_ROPE_CACHE < 0 && K_NOPE_CACHE < 0 && V_CACHE < 0),
              "cache destinations need a cache mode");

__device__ constexpr int nonzero(int n) { return n > 0 ? n : 1; }  // divisor of an index that cannot occur

typedef Vec<in_t, VEC> vec_t;

// One item's loads: a rotated chunk uses both vectors, a copied vector `a` only.
struct Item {
  vec_t a, b;
};

// Where a token's K and V go.
struct TokenDest {
  i64 page;
  int entry;
  int flags;
};
enum { WRITE = 1, WRITE_CACHE = 2 };

template <typename T>
__device__ __forceinline__ T load_index(long long ptr, i64 i, i64 stride) {
  return ((const T*)ptr)[i * stride];
}

// The first index loads of a token's cache row: the slot, or the request and position
// (-1: none). Issued before anything waits on them, so they fly with the position ->
// cos/sin loads and the page-table walk costs two more latencies, not three.
struct DestIndex {
  i64 a, b;
};

__device__ __forceinline__ DestIndex dest_index(const FusedRopeParams& p, i64 t) {
  DestIndex x{-1, -1};
  if (t >= p.num_tokens) return x;
  if constexpr (CACHE_MODE == CACHE_MODE_SLOTS) {
    if (t < p.num_slots) x.a = (i64)load_index<slot_t>(p.slot_mapping, t, p.slot_stride);
  } else if constexpr (CACHE_MODE == CACHE_MODE_PAGED) {
    x.a = (i64)load_index<slot_t>(p.batch_indices, t, p.batch_stride);
    x.b = (i64)load_index<ppos_t>(p.positions, t, p.positions_stride);
  }
  return x;
}

__device__ __forceinline__ TokenDest token_dest(const FusedRopeParams& p, i64 t,
                                                const DestIndex& x) {
  TokenDest d{0, 0, 0};
  if (t >= p.num_tokens) return d;
  if constexpr (CACHE_MODE == CACHE_MODE_NONE) {
    d.flags = WRITE;
  } else if constexpr (CACHE_MODE == CACHE_MODE_SLOTS) {
    d.flags = WRITE;
    const i64 slot = x.a;  // -1 past the mapping
    if (slot >= 0 && slot < p.num_pages * PAGE_SIZE) {
      d.page = slot / PAGE_SIZE;  // constant divisor: a multiply, no division
      d.entry = (int)(slot - d.page * PAGE_SIZE);
      d.flags |= WRITE_CACHE;
    }
  } else {
    const i64 b = x.a;
    if (b < 0 || b >= p.batch_size) return d;  // padding: FlashInfer writes nothing of it
    d.flags = WRITE;
    const i64 pos = x.b;
    if (pos >= 0) {
      const i64 it = (i64)load_index<kvptr_t>(p.kv_indptr, b, p.kv_indptr_stride) + pos / PAGE_SIZE;
      if (it >= 0 && it < p.num_indices) {
        const i64 page = (i64)load_index<kvidx_t>(p.kv_indices, it, p.kv_indices_stride);
        if (page >= 0 && page < p.num_pages) {
          d.page = page;
          d.entry = (int)(pos % PAGE_SIZE);
          d.flags |= WRITE_CACHE;
        }
      }
    }
  }
  return d;
}

// Source of copied item j (ROT_ITEMS <= j < ITEMS) of token t.
__device__ __forceinline__ const in_t* copy_src(const FusedRopeParams& p, i64 t, int j) {
  if (j < QN_END) {
    const int i = j - ROT_ITEMS, h = i / nonzero(QN_VECS), v = i - h * QN_VECS;
    return (const in_t*)p.q_nope + t * p.qn_st + h * p.qn_sh + v * VEC;
  }
  if (j < KN_END) {
    const int i = j - QN_END, h = i / nonzero(KN_VECS), v = i - h * KN_VECS;
    const long long base = K_NOPE_IN_K_ROPE ? p.k_rope : p.k_nope;
    return (const in_t*)base + t * p.kn_st + h * p.kn_sh + p.kn_off + v * VEC;
  }
  const int i = j - KN_END, h = i / nonzero(V_VECS), v = i - h * V_VECS;
  return (const in_t*)p.v + t * p.v_st + h * p.v_sh + v * VEC;
}

__device__ __forceinline__ void load_item(const FusedRopeParams& p, i64 t, int j, Item& it) {
  if (j < ROT_ITEMS) {
    const int h = j / CHUNKS, c = j - h * CHUNKS;
    const in_t* src = h < NUM_Q_HEADS
                          ? (const in_t*)p.q_rope + t * p.qr_st + h * p.qr_sh
                          : (const in_t*)p.k_rope + t * p.kr_st + (h - NUM_Q_HEADS) * p.kr_sh;
    src += c * CHUNK_STRIDE;
    it.a = load_vec<in_t, VEC>(src + OFF_A);
    it.b = load_vec<in_t, VEC>(src + OFF_B);
  } else {
    it.a = load_vec<in_t, VEC>(copy_src(p, t, j));
  }
}

// COS_SIN_IN_REGS: cos/sin of the VEC frequencies from c0 at position pos, from the cache
// in vectors of CACHE_VEC elements; a position outside the cache gives the identity (the
// cache is never read out of bounds).
__device__ __forceinline__ void chunk_cos_sin(const FusedRopeParams& p, i64 pos, int c0,
                                              float2 (&cs)[VEC]) {
  if (pos >= 0 && pos < p.max_position) {
    const cache_t* row = (const cache_t*)p.cos_sin_cache + pos * p.cache_stride + c0;
#pragma unroll
    for (int i = 0; i < VEC; i += CACHE_VEC) {
      const Vec<cache_t, CACHE_VEC> c = load_vec<cache_t, CACHE_VEC>(row + i);
      const Vec<cache_t, CACHE_VEC> s = load_vec<cache_t, CACHE_VEC>(row + HALF + i);
#pragma unroll
      for (int j = 0; j < CACHE_VEC; ++j) cs[i + j] = make_float2(to_float(c.e[j]), to_float(s.e[j]));
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) cs[v] = make_float2(1.f, 0.f);
  }
}

template <int WHICH>
__device__ __forceinline__ kvc_t* cache_base(const FusedRopeParams& p) {
  return (kvc_t*)(WHICH == 0 ? p.cache0 : p.cache1);
}

// Multipliers of the values written to the caches: the host's, or 1 / a scale the caller
// keeps on the device (vLLM's k_scale tensors, read when the kernel runs).
struct CacheMul {
  float k, v;
};

__device__ __forceinline__ void store_item(const FusedRopeParams& p, i64 t, const TokenDest& d,
                                           int j, const Item& it, const float2* tile,
                                           const float2 (&cs_regs)[VEC], const CacheMul& m) {
  const bool cache = (d.flags & WRITE_CACHE) != 0;
  if (j < ROT_ITEMS) {
    const int h = j / CHUNKS, c = j - h * CHUNKS;
    float a[VEC], b[VEC];
    to_floats(it.a, a);
    to_floats(it.b, b);
    if constexpr (COS_SIN_IN_REGS) {
      rotate_chunk(a, b, cs_regs);
    } else {
      rotate_chunk(a, b, tile + c * VEC);
    }
    const int off = c * CHUNK_STRIDE;
    if (h < NUM_Q_HEADS) {
      qout_t* dst = Q_INPLACE ? (qout_t*)p.q_rope + t * p.qr_st + h * p.qr_sh
                              : (qout_t*)p.q_rope_out + t * p.qro_st + h * p.qro_sh;
      store_scaled<qout_t>(dst + off + OFF_A, a, (float)p.q_mul);
      store_scaled<qout_t>(dst + off + OFF_B, b, (float)p.q_mul);
      return;
    }
    const int hk = h - NUM_Q_HEADS;
    if constexpr (K_ROPE_OUT != OUT_NONE) {
      kout_t* dst = K_ROPE_OUT == OUT_INPLACE ? (kout_t*)p.k_rope + t * p.kr_st + hk * p.kr_sh
                                              : (kout_t*)p.k_rope_out + t * p.kro_st + hk * p.kro_sh;
      store_scaled<kout_t>(dst + off + OFF_A, a, (float)p.k_mul);
      store_scaled<kout_t>(dst + off + OFF_B, b, (float)p.k_mul);
    }
    if constexpr (K_ROPE_CACHE >= 0) {
      if (cache) {
        kvc_t* dst = cache_base<K_ROPE_CACHE>(p) + d.page * p.krc_page + d.entry * p.krc_entry +
                     hk * p.krc_head + p.krc_off + off;
        store_scaled<kvc_t>(dst + OFF_A, a, m.k);
        store_scaled<kvc_t>(dst + OFF_B, b, m.k);
      }
    }
    return;
  }
  float x[VEC];
  to_floats(it.a, x);
  if (j < QN_END) {
    const int i = j - ROT_ITEMS, h = i / nonzero(QN_VECS), v = i - h * QN_VECS;
    store_scaled<qout_t>((qout_t*)p.q_nope_out + t * p.qno_st + h * p.qno_sh + v * VEC, x,
                         (float)p.q_mul);
  } else if (j < KN_END) {
    const int i = j - QN_END, h = i / nonzero(KN_VECS), v = i - h * KN_VECS;
    if constexpr (K_NOPE_OUT) {
      store_scaled<kout_t>((kout_t*)p.k_nope_out + t * p.kno_st + h * p.kno_sh + v * VEC, x,
                           (float)p.k_mul);
    }
    if constexpr (K_NOPE_CACHE >= 0) {
      if (cache) {
        store_scaled<kvc_t>(cache_base<K_NOPE_CACHE>(p) + d.page * p.knc_page +
                                d.entry * p.knc_entry + h * p.knc_head + p.knc_off + v * VEC,
                            x, m.k);
      }
    }
  } else if constexpr (V_CACHE >= 0) {
    const int i = j - KN_END, h = i / nonzero(V_VECS), v = i - h * V_VECS;
    if (cache) {
      store_scaled<kvc_t>(cache_base<V_CACHE>(p) + d.page * p.vc_page + d.entry * p.vc_entry +
                              h * p.vc_head + v * VEC,
                          x, m.v);
    }
  }
}

extern __shared__ float2 cos_sin_tile[];  // [blockDim.y][HALF]: the block's tokens (tile mode)

// MIN_BLOCKS (blocks of 512 threads per SM) caps the registers per thread, as in rope.cu.
extern "C" __global__ void __launch_bounds__(512, MIN_BLOCKS) rope_fused_kernel(const FusedRopeParams p) {
  const int tx = threadIdx.x, ty = threadIdx.y, nx = blockDim.x;
  const i64 t = (i64)blockIdx.x * blockDim.y + ty;
  const int first = blockIdx.y * (int)p.split_items;
  const int last = min(ITEMS, first + (int)p.split_items);
  const bool live = t < p.num_tokens;

  // PDL: nothing is read before the previous kernel has finished (the index arrays and
  // even positions may be its outputs); only the launch overlaps its tail.
  if constexpr (PDL) {
    pdl_wait();
    pdl_launch_dependents();
  }
  // The heads of the dependent chains go out first: the cache row's first index loads (up
  // to three dependent loads in all) and the position (-> cos/sin, two); then the first
  // batch's item loads (one latency), before anything waits: their latencies overlap.
  const DestIndex dest_ix = dest_index(p, t);
  const bool rotates = first < ROT_ITEMS;
  const i64 pos = live && rotates ? (i64)load_index<pos_t>(p.pos_ids, t, p.pos_stride) : 0;
  Item batch[ITEM_BATCH];
  int j0 = first + tx;
  if (live) {
#pragma unroll
    for (int u = 0; u < ITEM_BATCH; ++u) {
      const int j = j0 + u * nx;
      if (j < last) load_item(p, t, j, batch[u]);
    }
  }
  float2 cs_regs[VEC];
  if constexpr (COS_SIN_IN_REGS) {
    if (live && rotates) chunk_cos_sin(p, pos, (j0 % CHUNKS) * VEC, cs_regs);  // the thread's chunk
  } else {
    if (rotates) {
      for (int j = tx; j < HALF; j += nx) cos_sin_tile[ty * HALF + j] = cos_sin_at(p, pos, live, j);
    }
    __syncthreads();
  }
  const TokenDest d = token_dest(p, t, dest_ix);
  if (!(d.flags & WRITE)) return;

  CacheMul m{(float)p.kc_mul, (float)p.vc_mul};
  if constexpr (K_SCALE_ON_DEVICE) m.k = 1.0f / *(const float*)p.k_scale;
  if constexpr (V_SCALE_ON_DEVICE) m.v = 1.0f / *(const float*)p.v_scale;
  const float2* tile = cos_sin_tile + ty * HALF;
  // The thread's batches one after another: its position, cos/sin and cache row are paid
  // once for all of them. (Issuing the next batch's loads before the current one's stores
  // measured slower: twice the registers.)
  for (;;) {
#pragma unroll
    for (int u = 0; u < ITEM_BATCH; ++u) {
      const int j = j0 + u * nx;
      if (j < last) store_item(p, t, d, j, batch[u], tile, cs_regs, m);
    }
    j0 += ITEM_BATCH * nx;
    if (j0 >= last) break;
#pragma unroll
    for (int u = 0; u < ITEM_BATCH; ++u) {
      const int j = j0 + u * nx;
      if (j < last) load_item(p, t, j, batch[u]);
    }
  }
}
