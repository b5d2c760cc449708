"""Runs a rendered rope_jit kernel on the CPU: the exact NVRTC source, compiled with g++ as
host C++ under a small emulation of the CUDA execution model, so CPU tests can check a
kernel's indexing, layouts and arithmetic against the float64 reference without a GPU.

Emulated: threadIdx/blockIdx/blockDim/gridDim, one std::thread per CUDA thread of a block
and blocks one after another, __syncthreads (a block barrier), __shfl_xor_sync (through a
slot per thread and two barriers: every thread of the block must reach it, which the
kernels guarantee), __shared__ memory (static storage: one block runs at a time), and the
two fp16 conversions written in PTX (as _Float16 casts, round to nearest even). Everything
else is the kernel's own code; __CUDA_ARCH__ is undefined, so the bf16 and FP8 roundings
take their integer/software paths (tests/test_gpu_fused.py checks those against the
hardware instructions on a GPU). Not emulated: memory ordering between threads beyond the
barriers, alignment faults, timing.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from rope_jit.arrays import ArrayDesc
from rope_jit.dtypes import dtype_name

_HARNESS = r"""
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>
struct dim3_ { unsigned x, y, z; };
static thread_local dim3_ threadIdx, blockIdx;
static dim3_ blockDim, gridDim;
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
// common.cuh's staged-copy helpers take shared addresses (never called by fused kernels)
inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)p; }
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
static inline float2 make_float2(float a, float b) { return {a, b}; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float emu_h2f(unsigned short b) { _Float16 h; std::memcpy(&h, &b, 2); return (float)h; }
static inline unsigned short emu_f2h(float f) { _Float16 h = (_Float16)f; unsigned short b; std::memcpy(&b, &h, 2); return b; }
using std::min; using std::max;
static std::barrier<>* emu_barrier;
static float emu_slots[2048];
static inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
static inline int emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int t = emu_tid();
  emu_slots[t] = v;
  __syncthreads();
  const float r = emu_slots[t ^ o];
  __syncthreads();
  return r;
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
"""

_RUNNER = r"""
extern "C" void emulate(const void* params, int gx, int gy, int gz, int bx, int by, int bz) {
  %(params)s p;
  std::memcpy(&p, params, sizeof(p));
  blockDim = {(unsigned)bx, (unsigned)by, (unsigned)bz};
  gridDim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
  const int n = bx * by * bz;
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x) {
        std::barrier<> bar(n);
        emu_barrier = &bar;
        std::vector<std::thread> threads;
        for (int t = 0; t < n; ++t)
          threads.emplace_back([&, t] {
            threadIdx = {(unsigned)(t %% bx), (unsigned)((t / bx) %% by), (unsigned)(t / (bx * by))};
            blockIdx = {(unsigned)x, (unsigned)y, (unsigned)z};
            %(kernel)s(p);
          });
        for (auto& th : threads) th.join();
      }
}
"""

_CACHE = Path(tempfile.gettempdir()) / "rope_jit_host_emulator"
_LOADED: dict = {}


def available() -> bool:
    return shutil.which("g++") is not None


_GUARDS = ("__CUDA_ARCH__", "ROPE_HOST_EMULATION", "ROPE_HAS_BULK_COPY")


def _unguarded_ptx(src: str) -> list:
    """Lines with inline PTX outside every preprocessor conditional on the arch (g++ sees
    no __CUDA_ARCH__) or on the staged-copy emulation hooks of benchmarks/kernel_lab.py,
    which no fused kernel calls."""
    stack, bad = [], []
    for line in src.splitlines():
        t = line.strip()
        if t.startswith("#if"):
            stack.append(any(g in t for g in _GUARDS))
        elif t.startswith(("#elif", "#else")):
            stack[-1] = stack[-1] or any(g in t for g in _GUARDS)
        elif t.startswith("#endif"):
            stack.pop()
        elif "asm(" in t or "asm volatile(" in t:
            if not any(stack):
                bad.append(t)
    return bad


def host_source(spec) -> str:
    """The spec's NVRTC source made host C++, plus the runner."""
    src = spec.render()
    src = src.replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));', "f = emu_h2f(x.bits);")
    src = src.replace('asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));', "r.bits = emu_f2h(x);")
    assert not _unguarded_ptx(src), "PTX outside an arch guard: not emulated"
    dynamic = re.findall(r"extern __shared__ (\w+) (\w+)\[\];", src)
    src = src.replace("extern __shared__", "extern").replace("__shared__", "static")
    storage = "".join(f"{t} {n}[16384];\n" for t, n in dynamic)
    return (_HARNESS + src + "\n" + storage +
            _RUNNER % {"params": spec.params.c_name, "kernel": spec.kernel_name})


def _library(spec):
    src = host_source(spec)
    key = hashlib.sha256(src.encode()).hexdigest()[:24]
    lib = _LOADED.get(key)
    if lib is None:
        _CACHE.mkdir(parents=True, exist_ok=True)
        so = _CACHE / f"{key}.so"
        if not so.exists():
            cpp = _CACHE / f"{key}.cpp"
            cpp.write_text(src)
            tmp = _CACHE / f"{key}.{id(src)}.so"
            subprocess.run(["g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC",
                            "-pthread", "-w", "-o", str(tmp), str(cpp)], check=True,
                           capture_output=True, text=True)
            tmp.replace(so)
        lib = _LOADED[key] = ctypes.CDLL(str(so))
        lib.emulate.argtypes = [ctypes.c_char_p] + [ctypes.c_int] * 6
    return lib


def run(plan, pointers) -> None:
    """Run a plan (rope_jit.plan_fused.FusedPlan) with its kernel pointers (host addresses,
    in the params struct's order)."""
    if plan.spec is None:
        return
    run_struct(plan.spec, plan.spec.params.pack(pointers, plan.static), plan.launch)


def run_struct(spec, struct_bytes: bytes, launch) -> None:
    """Run spec's kernel on a packed kernel-argument struct with a launch shape."""
    assert launch.smem <= 16384 * 8
    _library(spec).emulate(struct_bytes, *launch.grid, *launch.block)


def desc(a: np.ndarray | None) -> ArrayDesc | None:
    """A host NumPy array described as if it were on device 0, its pointer a host address."""
    if a is None:
        return None
    item = a.dtype.itemsize
    return ArrayDesc(a.ctypes.data, tuple(a.shape), tuple(s // item for s in a.strides),
                     dtype_name(a.dtype), 0)


def pointer(a: np.ndarray | None) -> int:
    return 0 if a is None else a.ctypes.data
