// What the fused kernels (rope_fused.cu, qk_norm_rope.cu) share: the chunk layout of the
// rotated part of a head, cos/sin from a cache or on the fly, and the rotation in fp32.
//
// Rendered after common.cuh and a prelude that defines ROT_DIM, VEC, NEOX, cache_t,
// COS_SIN_FROM_CACHE, SCALING and a kernel-argument struct with the fields cos_sin_cache,
// max_position, cache_stride and the on-the-fly frequency values (rope_jit/specs_fused.py).
//
// A chunk is VEC consecutive frequencies c*VEC .. c*VEC+VEC-1 of a head, i.e. VEC rotated
// pairs held in two vector accesses (the layout of rope.cu):
//   NeoX:  a = x[c*VEC .. c*VEC+VEC)          paired with b = x[R/2 + c*VEC ..]
//   GPT-J: a, b = x[2*c*VEC .. 2*c*VEC+2*VEC)  (pairs are adjacent elements)
// cos/sin depend on the token and the frequency only: the kernels compute them once per
// token into a shared-memory tile (cos_sin_at per frequency) that every head reads.

constexpr int HALF = ROT_DIM / 2;
constexpr int CHUNKS = HALF / VEC;
constexpr int OFF_A = 0;                            // first vector of a chunk
constexpr int OFF_B = NEOX ? HALF : VEC;            // its partner vector
constexpr int CHUNK_STRIDE = NEOX ? VEC : 2 * VEC;  // elements between consecutive chunks

static_assert(ROT_DIM % 2 == 0 && HALF % VEC == 0, "VEC must divide ROT_DIM/2");

// cos and sin of frequency j at position pos. From the cache, `valid` false or a position
// outside it gives the identity (the cache is never read out of bounds).
template <typename P>
__device__ __forceinline__ float2 cos_sin_at(const P& p, i64 pos, bool valid, int j) {
  float c = 1.f, s = 0.f;
  if constexpr (COS_SIN_FROM_CACHE) {
    if (valid && pos >= 0 && pos < p.max_position) {
      const cache_t* row = (const cache_t*)p.cos_sin_cache + pos * p.cache_stride;
      c = to_float(row[j]);
      s = to_float(row[HALF + j]);
    }
  } else {
    fly_cos_sin<SCALING>(p, pos, valid, j, c, s);
  }
  return make_float2(c, s);
}

template <typename T, int N>
__device__ __forceinline__ void to_floats(const Vec<T, N>& v, float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = to_float(v.e[i]);
}

// Rotate one chunk in place, in fp32: each pair (x1, x2) -> (x1*c - x2*s, x2*c + x1*s).
// cs: the chunk's VEC (cos, sin) from the tile.
__device__ __forceinline__ void rotate_chunk(float (&a)[VEC], float (&b)[VEC], const float2* cs) {
  if constexpr (NEOX || VEC == 1) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float2 f = cs[v];
      const float x1 = a[v], x2 = b[v];
      a[v] = fmaf(x1, f.x, -x2 * f.y);
      b[v] = fmaf(x2, f.x, x1 * f.y);
    }
  } else {
    // GPT-J: a holds pairs 0 .. VEC/2-1 of the chunk, b pairs VEC/2 .. VEC-1.
#pragma unroll
    for (int u = 0; u < VEC / 2; ++u) {
      const float2 fa = cs[u], fb = cs[VEC / 2 + u];
      const float a1 = a[2 * u], a2 = a[2 * u + 1], b1 = b[2 * u], b2 = b[2 * u + 1];
      a[2 * u] = fmaf(a1, fa.x, -a2 * fa.y);
      a[2 * u + 1] = fmaf(a2, fa.x, a1 * fa.y);
      b[2 * u] = fmaf(b1, fb.x, -b2 * fb.y);
      b[2 * u + 1] = fmaf(b2, fb.x, b1 * fb.y);
    }
  }
}

// x * mul rounded once to T, stored as one vector (mul 1 is exact: unquantized stores are
// the rounding of the fp32 value, as the plain RoPE kernel's).
template <typename T>
__device__ __forceinline__ void store_scaled(T* dst, const float (&x)[VEC], float mul) {
  float y[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) y[v] = x[v] * mul;
  store_vec<T, VEC>(dst, round_vec<T, VEC>(y));
}
