// RMSNorm of every q and k head, then RoPE, in place on a packed QKV buffer (vLLM's
// fused_qk_norm_rope), specialized at run time.
//
// Rendered after common.cuh, a prelude (rope_jit/specs_fused.py QKNormRopeSpec: scalar_t
// qkv storage, weight_t, cache_t, index_t, HEAD_DIM, ROT_DIM, VEC, LANES, NUM_Q_HEADS,
// NUM_K_HEADS, NEOX, COS_SIN_FROM_CACHE, SCALING, the QKNormRopeParams struct) and
// rope_chunk.cuh.
//
// Row t of qkv holds NUM_Q_HEADS q heads, then NUM_K_HEADS k heads, then the v heads (left
// alone), HEAD_DIM elements each. For each q/k head x, in fp32:
//   y = x * (1 / sqrt(mean(x^2) + eps) * w)       (w: q_weight or k_weight)
// then the first ROT_DIM elements of y are rotated; the result is rounded once.
//
// Work split. LANES threads (a power of two) share one head of one token: each holds its
// chunks of the rotated part (rope_chunk.cuh layout) and its vectors of the rest, so the
// rotation needs no exchange and the sum of squares is one shuffle reduction within the
// group. Block = (LANES, heads, tokens), a multiple of 32 threads; grid = (token tiles, head
// tiles). While the heads' loads are in flight, the block puts both weights (as fp32) and
// its tokens' cos/sin in shared memory (one barrier); or, COS_SIN_IN_REGS (from a cache,
// few tokens: the planner's choice), each thread reads its own chunks' cos/sin into
// registers and its weights from global memory (L1 serves every head the same values): no
// shared memory and no barrier on a latency-bound call, at the price of registers.

constexpr int NUM_HEADS = NUM_Q_HEADS + NUM_K_HEADS;
constexpr int PASS_VECS = (HEAD_DIM - ROT_DIM) / VEC;
constexpr int CPL = (CHUNKS + LANES - 1) / LANES;     // rotated chunks per lane
constexpr int PPL = (PASS_VECS + LANES - 1) / LANES;  // pass-through vectors per lane

static_assert(ROT_DIM <= HEAD_DIM && (HEAD_DIM - ROT_DIM) % VEC == 0, "head layout");
static_assert(LANES >= 1 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "LANES: a power of two");

typedef Vec<scalar_t, VEC> vec_t;

// Shared memory: q and k weights as fp32 [2][HEAD_DIM], then cos/sin [blockDim.z][HALF].
extern __shared__ float4 qk_norm_smem[];

extern "C" __global__ void __launch_bounds__(512) qk_norm_rope_kernel(const QKNormRopeParams p) {
  const int lane = threadIdx.x;
  const int head = blockIdx.y * blockDim.y + threadIdx.y;
  const i64 t = (i64)blockIdx.x * blockDim.z + threadIdx.z;
  const bool active = t < p.num_tokens && head < NUM_HEADS;
  scalar_t* row = (scalar_t*)p.qkv + t * p.token_stride + head * HEAD_DIM;

  vec_t ra[CPL > 0 ? CPL : 1], rb[CPL > 0 ? CPL : 1], rp[PPL > 0 ? PPL : 1];
  if (active) {
#pragma unroll
    for (int m = 0; m < CPL; ++m) {
      const int c = lane + m * LANES;
      if (c < CHUNKS) {
        ra[m] = load_vec<scalar_t, VEC>(row + c * CHUNK_STRIDE + OFF_A);
        rb[m] = load_vec<scalar_t, VEC>(row + c * CHUNK_STRIDE + OFF_B);
      }
    }
#pragma unroll
    for (int m = 0; m < PPL; ++m) {
      const int v = lane + m * LANES;
      if (v < PASS_VECS) rp[m] = load_vec<scalar_t, VEC>(row + ROT_DIM + v * VEC);
    }
  }

  float* weights = (float*)qk_norm_smem;
  float2* tile = (float2*)(weights + 2 * HEAD_DIM);
  float2 cs_regs[CPL > 0 ? CPL : 1][VEC];
  if constexpr (COS_SIN_IN_REGS) {
    const i64 pos = active ? (i64)((const index_t*)p.position_ids)[t * p.pos_stride] : 0;
#pragma unroll
    for (int m = 0; m < CPL; ++m) {
      const int c = lane + m * LANES;
#pragma unroll
      for (int v = 0; v < VEC; ++v) cs_regs[m][v] = cos_sin_at(p, pos, active && c < CHUNKS, c * VEC + v);
    }
  } else {
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int nthreads = blockDim.x * blockDim.y * blockDim.z;
    for (int i = tid; i < 2 * HEAD_DIM; i += nthreads) {
      weights[i] = i < HEAD_DIM ? to_float(((const weight_t*)p.q_weight)[i * p.q_weight_stride])
                                : to_float(((const weight_t*)p.k_weight)[(i - HEAD_DIM) * p.k_weight_stride]);
    }
    const int ntok = blockDim.z;
    for (int i = tid; i < ntok * HALF; i += nthreads) {
      const int z = i / HALF, j = i - z * HALF;
      const i64 tt = (i64)blockIdx.x * ntok + z;
      const bool valid = tt < p.num_tokens;
      const i64 pos = valid ? (i64)((const index_t*)p.position_ids)[tt * p.pos_stride] : 0;
      tile[i] = cos_sin_at(p, pos, valid, j);
    }
    __syncthreads();
  }

  float a[CPL > 0 ? CPL : 1][VEC], b[CPL > 0 ? CPL : 1][VEC], r[PPL > 0 ? PPL : 1][VEC];
  float sum_sq = 0.f;
#pragma unroll
  for (int m = 0; m < CPL; ++m) {
    const bool here = active && lane + m * LANES < CHUNKS;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      a[m][v] = here ? to_float(ra[m].e[v]) : 0.f;
      b[m][v] = here ? to_float(rb[m].e[v]) : 0.f;
      sum_sq = fmaf(a[m][v], a[m][v], fmaf(b[m][v], b[m][v], sum_sq));
    }
  }
#pragma unroll
  for (int m = 0; m < PPL; ++m) {
    const bool here = active && lane + m * LANES < PASS_VECS;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      r[m][v] = here ? to_float(rp[m].e[v]) : 0.f;
      sum_sq = fmaf(r[m][v], r[m][v], sum_sq);
    }
  }
  // Every lane of the warp takes part (inactive ones add 0); groups are aligned runs of
  // LANES lanes, so xor offsets below LANES stay inside a group.
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, o);
  if (!active) return;

  const float inv_rms = 1.0f / sqrtf(sum_sq / (float)HEAD_DIM + (float)p.eps);
  const bool is_q = head < NUM_Q_HEADS;
  const float* w = weights + (is_q ? 0 : HEAD_DIM);
  // weight i of this head: from shared memory, or (COS_SIN_IN_REGS) from global memory
  const weight_t* gw = (const weight_t*)(is_q ? p.q_weight : p.k_weight);
  const i64 gw_stride = is_q ? p.q_weight_stride : p.k_weight_stride;
  auto weight = [&](int i) -> float {
    if constexpr (COS_SIN_IN_REGS) return to_float(gw[i * gw_stride]);
    else return w[i];
  };
  const float2* cs = tile + threadIdx.z * HALF;
#pragma unroll
  for (int m = 0; m < CPL; ++m) {
    const int c = lane + m * LANES;
    if (c < CHUNKS) {
      const int ia = c * CHUNK_STRIDE + OFF_A, ib = c * CHUNK_STRIDE + OFF_B;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        a[m][v] *= inv_rms * weight(ia + v);
        b[m][v] *= inv_rms * weight(ib + v);
      }
      if constexpr (COS_SIN_IN_REGS) {
        rotate_chunk(a[m], b[m], cs_regs[m]);
      } else {
        rotate_chunk(a[m], b[m], cs + c * VEC);
      }
      store_vec<scalar_t, VEC>(row + c * CHUNK_STRIDE + OFF_A, round_vec<scalar_t, VEC>(a[m]));
      store_vec<scalar_t, VEC>(row + c * CHUNK_STRIDE + OFF_B, round_vec<scalar_t, VEC>(b[m]));
    }
  }
#pragma unroll
  for (int m = 0; m < PPL; ++m) {
    const int v = lane + m * LANES;
    if (v < PASS_VECS) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) r[m][e] *= inv_rms * weight(ROT_DIM + v * VEC + e);
      store_vec<scalar_t, VEC>(row + ROT_DIM + v * VEC, round_vec<scalar_t, VEC>(r[m]));
    }
  }
}
