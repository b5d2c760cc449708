// Storage types, conversions and vector memory access shared by every rope_jit kernel.
//
// rope_jit compiles each translation unit with NVRTC and no #include at all: cuda_fp16.h
// and cuda_bf16.h alone take longer to parse than the whole kernel takes to compile, and
// a CPU-only machine (CI, a container build warming the cache) may not have them. Half
// and bfloat16 are therefore plain 16-bit words here, converted with single PTX
// instructions (or exact bit arithmetic where that is just as fast).

typedef long long i64;

struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(f16_t x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
// bf16 is the upper half of an fp32: widening is exact and needs no instruction.
__device__ __forceinline__ float to_float(bf16_t x) {
  return __uint_as_float(((unsigned int)x.bits) << 16);
}

// Rounding to the storage type: round to nearest even, once, as SPEC section 1 asks.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float x) {
  f16_t r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
  bf16_t r;
#if __CUDA_ARCH__ >= 800
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else  // no bf16 conversion instruction before sm_80: the same rounding in integer math
  unsigned int u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.bits = (unsigned short)((u >> 16) | 0x40u);  // quiet NaN, sign kept
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
  }
#endif
  return r;
}

// The widest plain word of a given byte size: one of these is one memory instruction.
template <int BYTES> struct Word;
template <> struct Word<16> { typedef uint4 type; };
template <> struct Word<8> { typedef uint2 type; };
template <> struct Word<4> { typedef unsigned int type; };
template <> struct Word<2> { typedef unsigned short type; };

// N elements of storage type T moved as one aligned access.
template <typename T, int N> struct Vec {
  typedef typename Word<sizeof(T) * N>::type word_t;
  union {
    word_t word;
    T e[N];
  };
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  Vec<T, N> v;
  v.word = *reinterpret_cast<const typename Vec<T, N>::word_t*>(p);
  return v;
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<typename Vec<T, N>::word_t*>(p) = v.word;
}

// Ragged batches (FlashInfer's indptr + offsets): request b owns tokens
// indptr[b] .. indptr[b+1]-1. Returns the request that owns token t, or -1 when no request
// does. Binary search for the last b with indptr[b] <= t, so empty requests (equal
// neighbouring entries) are skipped. indptr has batch_size + 1 entries.
template <typename index_t>
__device__ __forceinline__ int find_request(const index_t* indptr, int batch_size, i64 t) {
  if (batch_size <= 0 || t < (i64)indptr[0] || t >= (i64)indptr[batch_size]) return -1;
  int lo = 0, hi = batch_size;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if ((i64)indptr[mid] <= t) lo = mid; else hi = mid;
  }
  return lo;
}
