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

// Rounding to the storage type: round to nearest even, once, as docs/math.md#precision asks.
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

// OCP FP8 storage (float8_e4m3fn: 4 exponent bits, bias 7, no infinity, largest 448;
// float8_e5m2: 5 exponent bits, bias 15, largest finite 57344). Outputs only: rounded to
// nearest even and saturated to the largest finite value (PTX cvt.rn.satfinite, as
// FlashInfer's and vLLM's FP8 stores), NaN stays NaN. M mantissa bits, the exponent BIAS,
// MAX_BITS the encoding of the largest finite value.
struct fp8_e4m3_t {
  unsigned char bits;
  static constexpr bool E4M3 = true;
  static constexpr int M = 3, BIAS = 7, MAX_BITS = 0x7e;
};
struct fp8_e5m2_t {
  unsigned char bits;
  static constexpr bool E4M3 = false;
  static constexpr int M = 2, BIAS = 15, MAX_BITS = 0x7b;
};

// The same rounding in integer and float arithmetic, for GPUs without the FP8 conversion
// instructions (before sm_89). a = n * 2^(e - M) with e the binade of |x| (clamped to the
// smallest normal one, below which the grid is uniform) and n = rint(|x| / 2^(e - M)); the
// encoding is then ((e + BIAS - 1) << M) + n, which also gives subnormals (n < 2^M) and the
// carry into the next binade (n == 2^(M+1)) right.
template <int M, int BIAS, int MAX_BITS>
__device__ __forceinline__ unsigned char fp8_from_float_sw(float x) {
  const unsigned int u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7f;  // NaN
  const unsigned char sign = (unsigned char)((u >> 24) & 0x80u);
  int e = (int)((u >> 23) & 0xffu) - 127;
  if (e > BIAS + 1) return sign | MAX_BITS;  // far past the largest finite value, or inf
  if (e < 1 - BIAS) e = 1 - BIAS;
  const int n = (int)rintf(ldexpf(fabsf(x), M - e));  // exact scaling, round half to even
  const int bits = ((e + BIAS - 1) << M) + n;
  return sign | (unsigned char)(bits > MAX_BITS ? MAX_BITS : bits);
}

// Two values as FP8 format F: hi in the upper byte, lo in the lower one.
template <typename F>
__device__ __forceinline__ unsigned short fp8x2_bits(float hi, float lo) {
#if __CUDA_ARCH__ >= 890
  unsigned short r;
  if constexpr (F::E4M3) {
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  }
  return r;
#else
  return (unsigned short)((fp8_from_float_sw<F::M, F::BIAS, F::MAX_BITS>(hi) << 8) |
                          fp8_from_float_sw<F::M, F::BIAS, F::MAX_BITS>(lo));
#endif
}

template <typename F>
__device__ __forceinline__ F fp8_from_float(float x) {
#if __CUDA_ARCH__ >= 890
  return {(unsigned char)(fp8x2_bits<F>(0.f, x) & 0xffu)};
#else
  return {fp8_from_float_sw<F::M, F::BIAS, F::MAX_BITS>(x)};
#endif
}
template <> __device__ __forceinline__ fp8_e4m3_t from_float<fp8_e4m3_t>(float x) {
  return fp8_from_float<fp8_e4m3_t>(x);
}
template <> __device__ __forceinline__ fp8_e5m2_t from_float<fp8_e5m2_t>(float x) {
  return fp8_from_float<fp8_e5m2_t>(x);
}

// Two values at once (one instruction for FP8 on sm_89+, for bf16 and fp16 on sm_80+:
// the same rounding as two, and the pair lands in one register, so a vector of results
// needs no byte shuffling; SASS of the plain kernel's store: ~120 -> ~60 instructions).
template <typename T>
__device__ __forceinline__ void from_float2(float lo, float hi, T& a, T& b) {
  a = from_float<T>(lo);
  b = from_float<T>(hi);
}
// PairWord<T>::cvt: a pair converted by one instruction into one 32-bit word (lo in the
// low half), where T has such an instruction (ok).
template <typename T> struct PairWord { static constexpr bool ok = false; };
#if __CUDA_ARCH__ >= 800
template <bool BF16> struct HalfPairWord {  // cvt.rn.{bf16x2,f16x2}.f32 takes hi first
  static constexpr bool ok = true;
  static __device__ __forceinline__ unsigned int cvt(float lo, float hi) {
    unsigned int r;
    if constexpr (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};
template <> struct PairWord<bf16_t> : HalfPairWord<true> {};
template <> struct PairWord<f16_t> : HalfPairWord<false> {};
template <typename T>  // a converted pair, lo in the low half
__device__ __forceinline__ void split_pair(unsigned int r, T& a, T& b) {
  a.bits = (unsigned short)(r & 0xffffu);
  b.bits = (unsigned short)(r >> 16);
}
template <>
__device__ __forceinline__ void from_float2<bf16_t>(float lo, float hi, bf16_t& a, bf16_t& b) {
  split_pair(PairWord<bf16_t>::cvt(lo, hi), a, b);
}
template <>
__device__ __forceinline__ void from_float2<f16_t>(float lo, float hi, f16_t& a, f16_t& b) {
  split_pair(PairWord<f16_t>::cvt(lo, hi), a, b);
}
#endif
template <typename F>
__device__ __forceinline__ void fp8_from_float2(float lo, float hi, F& a, F& b) {
  const unsigned short r = fp8x2_bits<F>(hi, lo);
  a.bits = (unsigned char)(r & 0xffu);
  b.bits = (unsigned char)(r >> 8);
}
template <>
__device__ __forceinline__ void from_float2<fp8_e4m3_t>(float lo, float hi, fp8_e4m3_t& a,
                                                        fp8_e4m3_t& b) {
  fp8_from_float2(lo, hi, a, b);
}
template <>
__device__ __forceinline__ void from_float2<fp8_e5m2_t>(float lo, float hi, fp8_e5m2_t& a,
                                                        fp8_e5m2_t& b) {
  fp8_from_float2(lo, hi, a, b);
}

// The widest plain word of a given byte size: one of these is one memory instruction.
template <int BYTES> struct Word;
template <> struct Word<16> { typedef uint4 type; };
template <> struct Word<8> { typedef uint2 type; };
template <> struct Word<4> { typedef unsigned int type; };
template <> struct Word<2> { typedef unsigned short type; };
template <> struct Word<1> { typedef unsigned char type; };

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

// 1 and 0 in a cos/sin cache's storage type, as constants (no conversion instruction).
template <typename T> __device__ __forceinline__ T one_value();
template <> __device__ __forceinline__ float one_value<float>() { return 1.f; }
template <> __device__ __forceinline__ bf16_t one_value<bf16_t>() { return {0x3f80}; }
template <> __device__ __forceinline__ f16_t one_value<f16_t>() { return {0x3c00}; }
template <typename T> __device__ __forceinline__ T zero_value() { return T{}; }

// v = *p when ok, else v unchanged. On the GPU a predicated load whose address is worked
// out whether or not ok holds: as a plain `if`, ptxas moves the address arithmetic (and its
// constant loads) under the predicate, behind the test that decides it (decode's
// position -> cache row chain: ~10 more dependent instructions).
template <typename T, int N>
__device__ __forceinline__ void load_vec_if(bool ok, const T* p, Vec<T, N>& v) {
#if defined(__CUDA_ARCH__)
  typedef typename Vec<T, N>::word_t word_t;
  const word_t* w = reinterpret_cast<const word_t*>(p);
  if constexpr (sizeof(word_t) == 16) {
    asm volatile("{ .reg .pred q; setp.ne.u32 q, %4, 0;\n"
                 "@q ld.global.v4.u32 {%0, %1, %2, %3}, [%5]; }\n"
                 : "+r"(v.word.x), "+r"(v.word.y), "+r"(v.word.z), "+r"(v.word.w)
                 : "r"((unsigned)ok), "l"(w));
  } else if constexpr (sizeof(word_t) == 8) {
    asm volatile("{ .reg .pred q; setp.ne.u32 q, %2, 0;\n"
                 "@q ld.global.v2.u32 {%0, %1}, [%3]; }\n"
                 : "+r"(v.word.x), "+r"(v.word.y) : "r"((unsigned)ok), "l"(w));
  } else if constexpr (sizeof(word_t) == 4) {
    asm volatile("{ .reg .pred q; setp.ne.u32 q, %1, 0;\n"
                 "@q ld.global.u32 %0, [%2]; }\n"
                 : "+r"(v.word) : "r"((unsigned)ok), "l"(w));
  } else {
    if (ok) v.word = *w;
  }
#else
  if (ok) v = load_vec<T, N>(p);
#endif
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<typename Vec<T, N>::word_t*>(p) = v.word;
}

// N fp32 values rounded once to storage type T, as one vector.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> round_vec(const float (&x)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int i = 0; i + 1 < N; i += 2) from_float2<T>(x[i], x[i + 1], v.e[i], v.e[i + 1]);
  if constexpr (N % 2 == 1) v.e[N - 1] = from_float<T>(x[N - 1]);
  return v;
}

// The same values, the converted words put into the vector whole: through the 16-bit
// elements (round_vec) ptxas leaves a no-op shift-and-permute per word. Used where the
// rotate-to-store path is a call's latency (decode); other kernels keep round_vec, whose
// schedules were measured.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> round_vec_words(const float (&x)[N]) {
  if constexpr (PairWord<T>::ok && (N == 2 || N == 4 || N == 8)) {
    unsigned int w[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) w[i] = PairWord<T>::cvt(x[2 * i], x[2 * i + 1]);
    Vec<T, N> v;
    if constexpr (N == 2) v.word = w[0];
    else if constexpr (N == 4) v.word = uint2{w[0], w[1]};
    else v.word = uint4{w[0], w[1], w[2], w[3]};
    return v;
  } else {
    return round_vec<T, N>(x);
  }
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

// ------------------------------------------------------------------ asynchronous copies
// Bytes in flight that occupy no registers (kernels/rope.cu, STAGING): a copy from global
// into shared memory is issued and forgotten until its group or barrier is waited on.
// Older architectures get the same functions as plain synchronous copies, so every kernel
// still compiles (and runs) for any arch rope_jit is asked to build.
//
// ROPE_HOST_EMULATION: benchmarks/kernel_lab.py also compiles the kernels as host C++ to
// check their logic on a CPU (one OS thread per CUDA thread). It defines these hooks, which
// emulate the asynchronous copies faithfully enough to catch ordering bugs: data lands in
// shared memory only when its group or barrier is waited on. NVRTC never defines it.
typedef unsigned long long mbarrier_t;
#ifdef ROPE_HOST_EMULATION
void rope_host_copy_async(void* dst, const void* src, int bytes);
void rope_host_copy_commit();
void rope_host_copy_wait(int pending);
void rope_host_mbarrier_init(mbarrier_t* bar, unsigned arrivals);
void rope_host_mbarrier_arrive_expect(mbarrier_t* bar, unsigned bytes);
void rope_host_bulk_copy(void* dst, const void* src, unsigned bytes, mbarrier_t* bar);
void rope_host_mbarrier_wait(mbarrier_t* bar, unsigned parity);
unsigned rope_host_dynamic_smem_bytes();
#endif

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}

// BYTES (2, 4, 8 or 16) from global to shared memory, both aligned to BYTES. cp.async moves
// 4, 8 or 16 bytes; 16-byte copies bypass L1 (.cg: streamed data is never re-read there).
template <int BYTES>
__device__ __forceinline__ void copy_async(void* smem_dst, const void* gmem_src) {
#if defined(ROPE_HOST_EMULATION)
  rope_host_copy_async(smem_dst, gmem_src, BYTES);
  return;
#elif __CUDA_ARCH__ >= 800
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :: "r"(smem_addr(smem_dst)), "l"(gmem_src) : "memory");
    return;
  } else if constexpr (BYTES == 8 || BYTES == 4) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n"
                 :: "r"(smem_addr(smem_dst)), "l"(gmem_src), "n"(BYTES) : "memory");
    return;
  }
#endif
  typedef typename Word<BYTES>::type word_t;
  *reinterpret_cast<word_t*>(smem_dst) = *reinterpret_cast<const word_t*>(gmem_src);
}

// Close the group of copies this thread issued since the last commit.
__device__ __forceinline__ void copy_async_commit() {
#if defined(ROPE_HOST_EMULATION)
  rope_host_copy_commit();
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most PENDING of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void copy_async_wait() {
#if defined(ROPE_HOST_EMULATION)
  rope_host_copy_wait(PENDING);
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory");
#endif
}

// Hopper bulk copies (the copy engine of TMA, one-dimensional: no tensor map needed). One
// instruction moves a contiguous run of a multiple of 16 bytes, 16-byte aligned at both
// ends, and reports its bytes to an mbarrier in shared memory; the waiting threads test
// the barrier's phase.
#if __CUDA_ARCH__ >= 900 || defined(ROPE_HOST_EMULATION)
#define ROPE_HAS_BULK_COPY 1
#else
#define ROPE_HAS_BULK_COPY 0
#endif

__device__ __forceinline__ void mbarrier_init(mbarrier_t* bar, unsigned arrivals) {
#if defined(ROPE_HOST_EMULATION)
  rope_host_mbarrier_init(bar, arrivals);
#elif ROPE_HAS_BULK_COPY
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_addr(bar)), "r"(arrivals)
               : "memory");
  // make the initialized barrier visible to the copy engine (the async proxy)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// One arrival that also announces `bytes` more to come from bulk copies in this phase.
__device__ __forceinline__ void mbarrier_arrive_expect(mbarrier_t* bar, unsigned bytes) {
#if defined(ROPE_HOST_EMULATION)
  rope_host_mbarrier_arrive_expect(bar, bytes);
#elif ROPE_HAS_BULK_COPY
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
               :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void bulk_copy_to_smem(void* smem_dst, const void* gmem_src,
                                                  unsigned bytes, mbarrier_t* bar) {
#if defined(ROPE_HOST_EMULATION)
  rope_host_bulk_copy(smem_dst, gmem_src, bytes, bar);
#elif ROPE_HAS_BULK_COPY
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      :: "r"(smem_addr(smem_dst)), "l"(gmem_src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
#endif
}

// Block until the barrier's phase of parity `parity` has completed. A phase that never
// completes is a bug (bytes announced that no copy delivers): after about a second of
// spinning, trap, so the launch fails with an error instead of hanging the GPU.
__device__ __forceinline__ void mbarrier_wait(mbarrier_t* bar, unsigned parity) {
#if defined(ROPE_HOST_EMULATION)
  rope_host_mbarrier_wait(bar, parity);
#elif ROPE_HAS_BULK_COPY
  const long long start = clock64();
  for (;;) {
    unsigned done;
    asm volatile(
        "{\n .reg .pred P;\n mbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2;\n"
        " selp.u32 %0, 1, 0, P;\n}\n"
        : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
    if (done) return;
    if (clock64() - start > (1ll << 31)) __trap();
  }
#endif
}

// Programmatic dependent launch (sm_90): when the host launches with the programmatic
// stream serialization attribute, this kernel may start before the previous kernel in the
// stream has finished; griddepcontrol.wait blocks until that kernel has completed and its
// memory is visible. Launched without the attribute, both instructions do nothing.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel (launched with the attribute) be scheduled once every block of this
// one has issued it or exited; that kernel's own pdl_wait still waits for this one to finish.
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The dynamic shared memory the block was launched with.
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
#if defined(ROPE_HOST_EMULATION)
  return rope_host_dynamic_smem_bytes();
#else
  unsigned bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(bytes));
  return bytes;
#endif
}

// On-the-fly frequency variants (rope_jit/specs.py SCALINGS; a kernel's prelude picks one
// as SCALING).
enum { SCALING_LINEAR = 0, SCALING_LLAMA3 = 1, SCALING_YARN = 2 };

// cos/sin of frequency j at position pos, computed on the fly in double precision and
// rounded once to fp32: an fp32 angle pos*inv_freq has lost nearly all its fraction by
// position 2^20, and fast-math sincos adds more; this is as accurate as an fp32 cache
// built in float64. `freq` is any kernel-argument struct with the five frequency fields
// (rope_jit/specs.py ROPE_FREQ, packed from rope_jit.scaling.OnTheFly).
//   inv_freq = theta^(-2j/R) = 2^(j * freq_exponent)
//   SCALING_LINEAR: f = inv_freq * inv_scale (FlashInfer's rope_scale divides; 1 = plain).
//   SCALING_LLAMA3 and SCALING_YARN blend the scaled and the unscaled frequency,
//     f = (1-w) * inv_freq * inv_scale + w * inv_freq,  w = clamp(x * ramp_a + ramp_b, 0, 1)
//   with x = inv_freq for Llama 3 (its ramp is on the wavelength) and x = j for YaRN (its
//   ramp is on the frequency index, between the beta_fast and beta_slow corrections);
//   YaRN then scales cos and sin by its attention factor. The host derives ramp_a/ramp_b
//   (rope_jit/scaling.py) so that this equals transformers' piecewise definitions.
template <int SCALING, typename Freq>
__device__ __forceinline__ void fly_cos_sin(const Freq& freq, i64 pos, bool valid, int j,
                                            float& c, float& s) {
  const double inv_freq = exp2((double)j * freq.freq_exponent);
  double f;
  if constexpr (SCALING == SCALING_LINEAR) {
    f = inv_freq * freq.inv_scale;
  } else {
    const double x = SCALING == SCALING_LLAMA3 ? inv_freq : (double)j;
    const double w = fmin(fmax(fma(x, freq.ramp_a, freq.ramp_b), 0.0), 1.0);
    f = (1.0 - w) * (inv_freq * freq.inv_scale) + w * inv_freq;
  }
  double sd, cd;
  sincos(valid ? (double)pos * f : 0.0, &sd, &cd);
  if constexpr (SCALING == SCALING_YARN) {
    cd *= freq.attention_factor;
    sd *= freq.attention_factor;
  }
  c = (float)cd;
  s = (float)sd;
}
