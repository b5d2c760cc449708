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
