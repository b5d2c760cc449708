#!/usr/bin/env python
"""Kernel lab: the RoPE kernel's code paths and launch shapes, checked and timed in one GPU run.

    PYTHONPATH=. python3 benchmarks/kernel_lab.py --out $OUT/lab    # full run, ~2 min (<= 4)
    PYTHONPATH=. python3 benchmarks/kernel_lab.py --quick            # a few rows, ~30 s
    PYTHONPATH=. python3 benchmarks/kernel_lab.py --dry-run          # CPU: compile, registers
    PYTHONPATH=. python3 benchmarks/kernel_lab.py --dry-run --emulate  # + every check on the
                                                                     # CPU emulator (minutes)

Self-contained: it does not import rope_jit (whose host code is being refactored). It
renders the kernel itself, exactly as rope_jit/specs.py does (kernels/common.cuh + a
prelude of compile-time constants + kernels/rope.cu), with the knobs kernels/rope.cu added
(INDEX_BITS, STAGING, STAGE_TOKENS, STAGES, PDL) as extra prelude lines, packs the
RopeParams struct in the field order of rope_jit/specs.py, compiles with NVRTC (through
CuPy's binding; many processes at once), loads the cubins with CuPy and launches them on
torch's current stream with cuLaunchKernel (cuLaunchKernelEx through ctypes for the PDL
experiment).

What one run does
-----------------
* Compiles every kernel variant (every shape x mode x knob setting, plus a feature matrix)
  before touching the GPU, in parallel, into a cubin cache under the output directory.
* Smoke test, in a child process with a time limit: every variant on small problems of
  every shape and on a feature matrix (out of place with poisoned outputs, indptr +
  offsets, int32 positions, key absent, [batch, seq] token dims with fused-QKV strides,
  narrow vectors, mRoPE, INVERSE, fp16/fp32 q, bf16/fp16 caches, llama3/yarn on the fly,
  positions outside the cache, tokens no request owns). A variant that fails, faults or
  hangs there is dropped from the timing run (a fault would end the main process's CUDA
  context), and the report says so.
* For the four shapes (Llama-3-8B, GPT-J, DeepSeek-V3 rope, Phi-2; bf16, in place) at 1, 4,
  16, 128, 1024, 8192 and 32768 tokens, fp32 cache and on the fly: times a device copy of
  q and k, the in-place pattern-ceiling touch kernel (only the rotated bytes, 16-byte
  vectors), the current kernel with the current launch rules (rope_jit/plan.py
  choose_launch, replicated below) and every variant with a few launch shapes each.
  Before a configuration is timed on a row, its output on that row's fresh random inputs
  is compared with a float64 reference (and with the current kernel's, bit for bit);
  a configuration that fails is reported WRONG and never timed.
* Timing: one CUDA graph holding one call per buffer set, the sets rotated so that their
  total is several times the L2 (512 MB at least), median of the replays' per-call time.
* PDL experiment (decode): back-to-back calls in a graph, launched with and without the
  programmatic-serialization attribute.
* Prints a compact table and writes lab.json (everything), smoke.json and smoke.log to
  --out (default $OUT/lab). Rows run most important first; after --budget seconds (200) no
  new row starts, so the JSON is written well inside a 5-minute call.

Without a GPU, --dry-run compiles every variant with NVRTC for sm_90 and prints nvcc's
register counts; --emulate adds the smoke test's checks run on a CPU emulator of the
kernels (kernels/common.cuh ROPE_HOST_EMULATION; fp16 excluded: its conversions are PTX).

Percentages are of the device-copy bandwidth measured at the start, with docs/performance.md's
bytes (rotated part of q and k read + written, positions, cache rows), like
benchmarks/run.py; at <= 128 tokens the table gives times and time / copy time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KERNELS = REPO / "kernels"

MAX_POSITION = 100_000        # positions uniform in [0, MAX_POSITION); rows of every cache
ROPE_THETA = 1e4
TOKENS = (1, 4, 16, 128, 1024, 8192, 32768)
QUICK_ROWS = (("llama3-8b", "cache", 1), ("llama3-8b", "cache", 8192), ("dsv3", "fly", 8192))
SMALL_TOKENS = 128            # at or below: report times and time / copy time
MIN_SET_BYTES = 1 << 29       # rotating buffer sets add up to at least this (L2 is 50-60 MB)
ARCH = "sm_90"
NVRTC_OPTIONS = ("-std=c++17",)   # rope_jit/jit.py NVRTC_OPTIONS
SEED = 20250117


# ====================================================================== the kernel spec

# rope_jit/specs.py: RopeParams, every field 8 bytes ('q' long long or pointer, 'd' double).
ROPE_POINTERS = ("q", "k", "q_out", "k_out", "positions", "offsets", "cache", "cos", "sin")
ROPE_FREQ = ("freq_exponent", "inv_scale", "ramp_a", "ramp_b", "attention_factor")
ROPE_STATIC = (
    "num_tokens", "inner_tokens", "num_q_heads", "num_k_heads", "batch_size",
    "max_position", "cache_stride",
    "q_stride_outer", "q_stride_inner", "q_stride_head",
    "k_stride_outer", "k_stride_inner", "k_stride_head",
    "qo_stride_outer", "qo_stride_inner", "qo_stride_head",
    "ko_stride_outer", "ko_stride_inner", "ko_stride_head",
    "pos_stride_outer", "pos_stride_inner", "pos_stride_row",
    "rot_offset",
    "cos_stride_outer", "cos_stride_inner", "sin_stride_outer", "sin_stride_inner",
)
PARAM_FIELDS = ([(n, "q") for n in ROPE_POINTERS] + [(n, "d") for n in ROPE_FREQ]
                + [(n, "q") for n in ROPE_STATIC])
PARAM_PACKER = struct.Struct("<" + "".join(code for _, code in PARAM_FIELDS))
PARAM_DECL = ("struct RopeParams {\n" + "".join(
    f"  {'long long' if code == 'q' else 'double'} {n};\n" for n, code in PARAM_FIELDS) + "};\n")

C_TYPE = {"float16": "f16_t", "bfloat16": "bf16_t", "float32": "float",
          "int32": "int", "int64": "long long"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}


def _c_bool(b: bool) -> str:
    return "true" if b else "false"


@dataclass(frozen=True)
class KSpec:
    """rope_jit.specs.RopeSpec plus the knobs kernels/rope.cu added (same prelude)."""

    head_size: int
    rotary_dim: int
    dtype: str
    cache_dtype: str | None
    index_dtype: str
    indptr: bool
    neox: bool
    out_of_place: bool
    vec: int
    cache_vec: int
    head_batch: int
    prefetch: bool = True
    scaling: str = "linear"
    mrope_section: tuple | None = None
    mrope_interleaved: bool = False
    inverse: bool = False
    min_blocks: int = 1
    # new knobs (kernels/rope.cu header); defaults = the original kernel
    index_bits: int = 64
    staging: int = 0
    stage_tokens: int = 1
    stages: int = 1
    pdl: bool = False

    def knobs(self) -> str:
        """The knob setting in a few words (the variant's name in tables)."""
        if self.staging:
            path = f"{'bulk' if self.staging == 2 else 'async'} t{self.stage_tokens}s{self.stages}"
        else:
            path = f"reg hb{self.head_batch}{'p' if self.prefetch else ''}"
        if self.min_blocks != 1:
            path += f" mb{self.min_blocks}"
        return f"{path} i{self.index_bits}{' pdl' if self.pdl else ''}"

    def prelude(self) -> str:
        cache_t = C_TYPE[self.cache_dtype] if self.cache_dtype else "float"
        t, h, w = self.mrope_section or (0, 0, 0)
        lines = [
            f"// kernel_lab specialization: {self}",
            f"typedef {C_TYPE[self.dtype]} scalar_t;",
            f"typedef {cache_t} cache_t;",
            f"typedef {C_TYPE[self.index_dtype]} index_t;",
            f"constexpr int HEAD_SIZE = {self.head_size};",
            f"constexpr int ROT_DIM = {self.rotary_dim};",
            f"constexpr int VEC = {self.vec};",
            f"constexpr int CACHE_VEC = {self.cache_vec};",
            f"constexpr int HEAD_BATCH = {self.head_batch};",
            f"constexpr bool PREFETCH = {_c_bool(self.prefetch)};",
            f"constexpr bool NEOX = {_c_bool(self.neox)};",
            "constexpr bool OUT_NEOX = NEOX;",  # pairs written in the order they are read
            f"constexpr bool OUT_OF_PLACE = {_c_bool(self.out_of_place)};",
            f"constexpr bool INDPTR = {_c_bool(self.indptr)};",
            f"constexpr bool COS_SIN_FROM_CACHE = {_c_bool(self.cache_dtype is not None)};",
            "constexpr bool COS_SIN_PER_TOKEN = false;",  # the lab measures cache and on the fly
            f"constexpr int SCALING = SCALING_{self.scaling.upper()};",
            f"constexpr bool MROPE = {_c_bool(self.mrope_section is not None)};",
            f"constexpr bool MROPE_INTERLEAVED = {_c_bool(self.mrope_interleaved)};",
            f"constexpr bool INVERSE = {_c_bool(self.inverse)};",
            f"constexpr int MIN_BLOCKS = {self.min_blocks};",
            f"constexpr int MROPE_T = {t}, MROPE_H = {h}, MROPE_W = {w};",
            # the knobs this lab measures (rope_jit will add them as RopeSpec fields)
            f"constexpr int INDEX_BITS = {self.index_bits};",
            f"constexpr int STAGING = {self.staging};",
            f"constexpr int STAGE_TOKENS = {self.stage_tokens};",
            f"constexpr int STAGES = {self.stages};",
            f"constexpr bool PDL = {_c_bool(self.pdl)};",
            "constexpr bool FEW_TOKENS = false;",  # rope_jit's few-token path (position first)
            "constexpr bool TOKENS_2D = true;",    # rope_jit's [batch, seq] token split
        ]
        return "\n".join(lines) + "\n" + PARAM_DECL

    def source(self) -> str:
        return "\n".join([(KERNELS / "common.cuh").read_text(), self.prelude(),
                          (KERNELS / "rope.cu").read_text()])

    # shared memory of the staged paths (kernels/rope.cu STAGED_FIXED_BYTES + rows)
    def staged_smem(self, num_heads: int) -> int:
        npos = 3 if self.mrope_section else 1
        half = self.rotary_dim // 2
        r16 = lambda b: (b + 15) // 16 * 16  # noqa: E731
        cs = (self.stage_tokens * npos * self.rotary_dim * ITEMSIZE[self.cache_dtype]
              if self.cache_dtype else self.stage_tokens * half * 8)
        pos = self.stage_tokens * npos * 8
        bulk = (self.staging == 2 and self.vec * ITEMSIZE[self.dtype] == 16)
        fixed = self.stages * (r16(cs) + r16(pos)) + (r16(self.stages * 8) if bulk else 0)
        row = self.head_size if self.out_of_place else self.rotary_dim
        return fixed + self.stages * self.stage_tokens * num_heads * row * ITEMSIZE[self.dtype]


def spec_key(spec: KSpec) -> str:
    src = spec.source()
    return hashlib.sha256((src + ARCH + " ".join(NVRTC_OPTIONS)).encode()).hexdigest()[:24]


# ====================================================================== compiling

def _nvrtc_compile(job) -> tuple:
    """(key, None) after writing the cubin, or (key, error text). Runs in a worker process."""
    key, source, path = job
    if os.path.exists(path):
        return key, None
    try:
        from cupy_backends.cuda.libs import nvrtc
        prog = nvrtc.createProgram(source, "rope_lab.cu", [], [])
        try:
            try:
                nvrtc.compileProgram(prog, [f"--gpu-architecture={ARCH}", *NVRTC_OPTIONS])
            except nvrtc.NVRTCError as e:
                return key, f"{e}\n{nvrtc.getProgramLog(prog)}"
            cubin = nvrtc.getCUBIN(prog)
        finally:
            nvrtc.destroyProgram(prog)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
        return key, None
    except Exception as e:  # noqa: BLE001
        return key, f"{type(e).__name__}: {e}"


def compile_all(specs, cache_dir: Path, jobs: int | None = None) -> dict:
    """Compile every spec (in parallel processes) into cache_dir/<key>.cubin.
    Returns {spec: error text} for those that failed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo, keys = [], {}
    for s in set(specs):
        k = spec_key(s)
        keys[k] = s
        todo.append((k, s.source(), str(cache_dir / f"{k}.cubin")))
    errors = {}
    jobs = jobs or min(32, os.cpu_count() or 4)
    # spawn, not fork: the parent may already hold a CUDA context (workers use NVRTC only)
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for k, err in pool.map(_nvrtc_compile, todo, chunksize=1):
            if err:
                errors[keys[k]] = err
    return errors


def ptxas_report(spec: KSpec, workdir: Path) -> dict:
    """Registers, spills and stack of `spec` for sm_90 from `nvcc -Xptxas -v` (None if no nvcc)."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return {}
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"{spec_key(spec)}.cu"
    src.write_text(spec.source())
    r = subprocess.run([nvcc, "-cubin", f"-arch={ARCH}", "-std=c++17", "-Xptxas", "-v",
                        "-o", str(src.with_suffix(".cubin")), str(src)],
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    info = {"nvcc_rc": r.returncode}
    import re
    m = re.search(r"Used (\d+) registers", out)
    if m:
        info["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if m:
        info["stack"], info["spill_stores"], info["spill_loads"] = map(int, m.groups())
    if r.returncode:
        info["error"] = out[-2000:]
    return info


# ====================================================================== CPU emulation

# The kernel compiled as host C++ (kernels/common.cuh ROPE_HOST_EMULATION): one OS thread
# per CUDA thread, blocks one after another, __syncthreads a std::barrier, cp.async and bulk
# copies that land only when waited on, shared memory poisoned per block. Slow, but it runs
# the kernels' logic (every path, every feature but fp16, whose PTX conversions have no
# host form) where there is no GPU. Used by --dry-run.
EMU_HEAD = r"""// kernel_lab: host emulation of one rope_jit kernel specialization (see kernels/common.cuh).
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <vector>
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(a, b)
#define __shared__
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float a, float b) { return float2{a, b}; }
struct emu_dim3 { unsigned x, y, z; };
thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
using std::max;
using std::min;
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)p; }
static std::barrier<>* emu_barrier;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
"""

EMU_TAIL = r"""// ---- emulation state
alignas(16) uint4 dynamic_smem[(256 << 10) / 16];
static unsigned emu_smem_bytes;
static std::atomic<int> emu_error{0};
static char emu_error_text[512];
static void emu_fail(const char* what) {
  int expected = 0;
  if (emu_error.compare_exchange_strong(expected, 1)) std::snprintf(emu_error_text, sizeof emu_error_text, "%s", what);
}
unsigned rope_host_dynamic_smem_bytes() { return emu_smem_bytes; }
static bool emu_in_smem(const void* p, size_t n) {
  const char* b = (const char*)dynamic_smem;
  return (const char*)p >= b && (const char*)p + n <= b + emu_smem_bytes;
}
// cp.async: a copy's source is read when it is issued; it lands when its group is waited on.
struct EmuCopy { void* dst; std::vector<unsigned char> data; };
thread_local std::vector<EmuCopy> emu_open;
thread_local std::deque<std::vector<EmuCopy>> emu_groups;
static void emu_land(std::vector<EmuCopy>& g) { for (auto& c : g) std::memcpy(c.dst, c.data.data(), c.data.size()); }
void rope_host_copy_async(void* dst, const void* src, int bytes) {
  if (!emu_in_smem(dst, bytes)) emu_fail("cp.async destination outside the dynamic shared memory");
  if (((size_t)dst | (size_t)src) % bytes) emu_fail("cp.async misaligned");
  EmuCopy c{dst, std::vector<unsigned char>((const unsigned char*)src, (const unsigned char*)src + bytes)};
  emu_open.push_back(std::move(c));
}
void rope_host_copy_commit() { emu_groups.push_back(std::move(emu_open)); emu_open.clear(); }
void rope_host_copy_wait(int pending) {
  while ((int)emu_groups.size() > pending) { emu_land(emu_groups.front()); emu_groups.pop_front(); }
}
// mbarrier + bulk copies: copies land (and count their bytes) when a thread waits.
struct EmuBarrier { unsigned expected = 0, pending = 0; long long tx = 0; unsigned phase = 0; std::vector<EmuCopy> copies; };
static std::mutex emu_bar_mutex;
static std::map<mbarrier_t*, EmuBarrier> emu_bars;
static void emu_try_complete(EmuBarrier& b) {
  if (b.pending == 0 && b.tx == 0) { ++b.phase; b.pending = b.expected; }
}
void rope_host_mbarrier_init(mbarrier_t* bar, unsigned arrivals) {
  std::lock_guard<std::mutex> l(emu_bar_mutex);
  if (!emu_in_smem(bar, 8)) emu_fail("mbarrier outside the dynamic shared memory");
  EmuBarrier b; b.expected = b.pending = arrivals; emu_bars[bar] = b;
}
void rope_host_mbarrier_arrive_expect(mbarrier_t* bar, unsigned bytes) {
  std::lock_guard<std::mutex> l(emu_bar_mutex);
  auto it = emu_bars.find(bar);
  if (it == emu_bars.end()) { emu_fail("arrive on an uninitialized mbarrier"); return; }
  if (it->second.pending == 0) { emu_fail("mbarrier: more arrivals than expected"); return; }
  it->second.tx += bytes; --it->second.pending; emu_try_complete(it->second);
}
void rope_host_bulk_copy(void* dst, const void* src, unsigned bytes, mbarrier_t* bar) {
  std::lock_guard<std::mutex> l(emu_bar_mutex);
  if (!emu_in_smem(dst, bytes)) emu_fail("bulk copy destination outside the dynamic shared memory");
  if (bytes % 16 || ((size_t)dst | (size_t)src) % 16) emu_fail("bulk copy: size or address not a multiple of 16");
  auto it = emu_bars.find(bar);
  if (it == emu_bars.end()) { emu_fail("bulk copy on an uninitialized mbarrier"); return; }
  EmuCopy c{dst, std::vector<unsigned char>((const unsigned char*)src, (const unsigned char*)src + bytes)};
  it->second.copies.push_back(std::move(c));
}
void rope_host_mbarrier_wait(mbarrier_t* bar, unsigned parity) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    {
      std::lock_guard<std::mutex> l(emu_bar_mutex);
      auto it = emu_bars.find(bar);
      if (it == emu_bars.end()) { emu_fail("wait on an uninitialized mbarrier"); return; }
      EmuBarrier& b = it->second;
      if ((b.phase & 1u) != parity) return;  // the phase of that parity has completed
      for (auto& c : b.copies) { std::memcpy(c.dst, c.data.data(), c.data.size()); b.tx -= (long long)c.data.size(); }
      b.copies.clear();
      emu_try_complete(b);
      if ((b.phase & 1u) != parity) return;
    }
    if (emu_error.load()) return;
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(5)) {
      emu_fail("mbarrier wait never completed (announced bytes != delivered bytes?)");
      return;
    }
    std::this_thread::yield();
  }
}

extern "C" int rope_emulate(const void* params, unsigned gx, unsigned gy, unsigned gz,
                            unsigned bx, unsigned by, unsigned bz, unsigned smem,
                            char* err, int errlen) {
  RopeParams p;
  std::memcpy(&p, params, sizeof p);
  blockDim = {bx, by, bz};
  gridDim = {gx, gy, gz};
  emu_smem_bytes = smem;
  emu_error = 0;
  const unsigned nthreads = bx * by * bz;
  for (unsigned z = 0; z < gz && !emu_error; ++z)
    for (unsigned y = 0; y < gy && !emu_error; ++y)
      for (unsigned x = 0; x < gx && !emu_error; ++x) {
        std::memset(dynamic_smem, 0xA5, sizeof dynamic_smem);  // poison: stale reads show
        emu_bars.clear();
        std::barrier<> bar((std::ptrdiff_t)nthreads);
        emu_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned tz = 0; tz < bz; ++tz)
          for (unsigned ty = 0; ty < by; ++ty)
            for (unsigned tx = 0; tx < bx; ++tx)
              threads.emplace_back([=, &bar] {
                threadIdx = {tx, ty, tz};
                blockIdx = {x, y, z};
                emu_open.clear();
                emu_groups.clear();
                rope_kernel(p);
                bar.arrive_and_drop();
              });
        for (auto& t : threads) t.join();
      }
  if (emu_error) { std::snprintf(err, errlen, "%s", emu_error_text); return 1; }
  return 0;
}
"""


def emulatable(spec: KSpec) -> bool:
    return "float16" not in (spec.dtype, spec.cache_dtype)


def build_emulator(spec: KSpec, workdir: Path) -> Path:
    """g++ build of spec's emulator (a shared library with rope_emulate())."""
    workdir.mkdir(parents=True, exist_ok=True)
    lib = workdir / f"emu_{spec_key(spec)}.so"
    if lib.exists():
        return lib
    src = lib.with_suffix(".cc")
    src.write_text(EMU_HEAD + spec.source() + EMU_TAIL)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                        "-DROPE_HOST_EMULATION", "-w", "-o", str(tmp), str(src)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"g++ failed for {spec.knobs()}:\n{r.stderr[-3000:]}")
    os.replace(tmp, lib)
    return lib


def _build_emulator_job(args):
    spec, workdir = args
    try:
        build_emulator(spec, Path(workdir))
        return spec, None
    except Exception as e:  # noqa: BLE001
        return spec, str(e)


class Emulator:
    """Launches of one spec on the CPU, on tensors in host memory."""

    def __init__(self, lib: Path):
        self.lib = ctypes.CDLL(str(lib))
        self.fn = self.lib.rope_emulate
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_char_p, ctypes.c_int]

    def launch(self, params: bytes, grid, block, smem: int) -> None:
        buf = ctypes.create_string_buffer(params, len(params))
        err = ctypes.create_string_buffer(512)
        rc = self.fn(buf, *grid, *block, smem, err, 512)
        if rc:
            raise RuntimeError(f"emulated kernel failed: {err.value.decode()}")


# ====================================================================== problems

@dataclass(frozen=True)
class Shape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    rotary_dim: int
    is_neox: bool


SHAPES = {s.name: s for s in (
    Shape("llama3-8b", 32, 8, 128, 128, True),
    Shape("gptj", 32, 2, 128, 64, False),
    Shape("dsv3", 128, 1, 64, 64, False),
    Shape("phi2", 32, 32, 80, 32, True),
)}


@dataclass(frozen=True)
class Case:
    """One call: sizes, dtypes, layout and features (rows of the table, or feature checks)."""

    name: str
    tokens: int
    num_q_heads: int
    num_k_heads: int               # 0: key absent
    head_size: int
    rotary_dim: int
    neox: bool
    dtype: str = "bfloat16"
    cache_dtype: str | None = "float32"   # None: on the fly
    index_dtype: str = "int64"
    indptr: bool = False
    out_of_place: bool = False
    batch: int = 0                 # > 0: token dims [batch, tokens // batch]
    fused_pad: int | None = None   # q, k are slices of one [T, (Hq + 2 Hk) * D + pad] buffer
    misalign: int = 0              # elements by which q and k start past an aligned address
    mrope: tuple | None = None
    mrope_interleaved: bool = False
    inverse: bool = False
    scaling: str = "linear"        # on the fly: linear | llama3 | yarn
    rope_theta: float = ROPE_THETA
    rope_scale: float = 1.0
    bad_positions: bool = False    # positions outside the cache; tokens no request owns
    max_position: int = MAX_POSITION

    @property
    def num_heads(self) -> int:
        return self.num_q_heads + self.num_k_heads

    @property
    def mode(self) -> str:
        return "fly" if self.cache_dtype is None else "cache"

    @property
    def npos(self) -> int:
        return 3 if self.mrope else 1


def row_case(shape: Shape, mode: str, tokens: int) -> Case:
    return Case(f"{shape.name}/{mode}", tokens, shape.num_q_heads, shape.num_kv_heads,
                shape.head_size, shape.rotary_dim, shape.is_neox,
                cache_dtype="float32" if mode == "cache" else None)


def feature_cases() -> list:
    """Every feature of the kernel, small, each a different specialization."""
    B = Case
    return [
        B("out-of-place phi2", 37, 4, 4, 80, 32, True, out_of_place=True),
        B("out-of-place gptj fly", 37, 4, 2, 128, 64, False, cache_dtype=None, out_of_place=True),
        B("indptr int32 fly", 45, 4, 2, 128, 128, True, cache_dtype=None, index_dtype="int32",
          indptr=True, bad_positions=True),
        B("indptr bf16 cache", 45, 4, 2, 64, 64, False, cache_dtype="bfloat16", indptr=True),
        B("key absent", 29, 6, 0, 64, 64, True),
        B("batch x seq fused qkv fp16 cache", 39, 4, 2, 128, 128, True, cache_dtype="float16",
          index_dtype="int32", batch=3, fused_pad=8),
        B("vec 1 gptj (misaligned)", 23, 3, 1, 64, 32, False, misalign=1),
        B("vec 2 neox fly (padded rows)", 23, 3, 1, 64, 64, True, cache_dtype=None, fused_pad=2),
        B("mrope bf16 cache", 31, 4, 2, 128, 128, True, cache_dtype="bfloat16",
          mrope=(16, 24, 24)),
        B("mrope interleaved fly", 31, 4, 2, 128, 128, True, cache_dtype=None,
          mrope=(24, 20, 20), mrope_interleaved=True),
        B("inverse gptj", 33, 4, 2, 64, 64, False, inverse=True),
        B("fp16 q, fp16 cache", 33, 4, 2, 128, 128, True, dtype="float16", cache_dtype="float16"),
        B("fp32 q", 33, 4, 2, 64, 64, True, dtype="float32"),
        B("llama3 fly", 33, 4, 2, 128, 128, True, cache_dtype=None, scaling="llama3",
          rope_theta=5e5, rope_scale=8.0),
        B("yarn fly gptj", 33, 4, 2, 128, 128, False, cache_dtype=None, scaling="yarn",
          rope_scale=40.0),
        B("positions outside the cache", 41, 4, 2, 128, 128, True, bad_positions=True),
    ]


# on-the-fly scaling parameters of the feature cases (rope_jit/launch.py _freq_values)
LLAMA3 = dict(low=1.0, high=4.0, old_ctx=8192.0)
YARN = dict(low=10.25, high=23.5, attention_factor=1.18)


def freq_values(case: Case) -> tuple:
    """(freq_exponent, inv_scale, ramp_a, ramp_b, attention_factor) as rope_jit passes them."""
    if case.cache_dtype is not None:
        return (0.0, 1.0, 0.0, 0.0, 1.0)
    exponent = -2.0 * math.log2(case.rope_theta) / case.rotary_dim
    if case.scaling == "linear":
        return (exponent, 1.0 / case.rope_scale, 0.0, 0.0, 1.0)
    if case.scaling == "llama3":
        lo, hi, old = LLAMA3["low"], LLAMA3["high"], LLAMA3["old_ctx"]
        return (exponent, 1.0 / case.rope_scale, old / (2 * math.pi * hi - 2 * math.pi * lo),
                -1.0 / (hi / lo - 1.0), 1.0)
    lo, hi = YARN["low"], YARN["high"]
    return (exponent, 1.0 / case.rope_scale, -1.0 / (hi - lo), 1.0 + lo / (hi - lo),
            YARN["attention_factor"])


def mrope_rows(case: Case) -> list:
    """The position row (0 t, 1 h, 2 w) of each frequency (kernels/rope.cu mrope_row)."""
    half = case.rotary_dim // 2
    if not case.mrope:
        return [0] * half
    t, h, w = case.mrope
    rows = []
    for j in range(half):
        if case.mrope_interleaved:
            m = j % 3
            rows.append(1 if (m == 1 and j < 3 * h) else 2 if (m == 2 and j < 3 * w) else 0)
        else:
            rows.append(0 if j < t else 1 if j < t + h else 2)
    return rows


# ====================================================================== tensors

TORCH_DTYPE = {}


def _torch():
    import torch
    if not TORCH_DTYPE:
        TORCH_DTYPE.update(float16=torch.float16, bfloat16=torch.bfloat16, float32=torch.float32,
                           int32=torch.int32, int64=torch.int64)
    return torch


@dataclass
class Tensors:
    """One set of a case's arrays (views with the case's layout) and what the kernel reads."""

    q: object
    k: object | None
    q_out: object
    k_out: object | None
    positions: object | None       # positions mode
    indptr: object | None
    offsets: object | None
    cache: object | None
    storage: list                  # everything to keep alive
    fused: object | None = None    # the fused [T, row] buffer, when the case has one
    pos_table: object | None = None  # [NPOS, T] int64 positions (host numpy), for the reference
    owned: object | None = None      # [T] bool: a request owns the token (host numpy)


def make_cache(case: Case, device):
    """[max_position, R] cos | sin rows (theta 1e4), in the case's cache dtype."""
    torch = _torch()
    half = case.rotary_dim // 2
    inv = torch.pow(torch.tensor(case.rope_theta, dtype=torch.float64, device=device),
                    -torch.arange(half, dtype=torch.float64, device=device) * 2 / case.rotary_dim)
    ang = torch.arange(case.max_position, dtype=torch.float64, device=device)[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.sin()], dim=1).to(TORCH_DTYPE[case.cache_dtype]).contiguous()


def make_tensors(case: Case, device, seed: int, cache=None, tokens: int | None = None) -> Tensors:
    """Fresh random q/k (never zeros) with the case's layout, positions and cache. The same
    seed gives the same values: a check recreates the inputs its reference was made from.
    tokens: build for this many tokens instead (the dry run's layout stand-ins)."""
    import numpy as np
    torch = _torch()
    T = case.tokens if tokens is None else tokens
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dt = TORCH_DTYPE[case.dtype]
    D, Hq, Hk = case.head_size, case.num_q_heads, case.num_k_heads
    tok = (case.batch, T // case.batch) if case.batch else (T,)
    keep = []

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    fused = None
    if case.fused_pad is not None or case.misalign:
        row = (Hq + 2 * Hk) * D + (case.fused_pad or 0)
        flat = randn(T * row + case.misalign + 64)
        keep.append(flat)
        fused = flat[case.misalign:case.misalign + T * row].view(*tok, row)
        q = fused[..., :Hq * D].unflatten(-1, (Hq, D))
        k = fused[..., Hq * D:(Hq + Hk) * D].unflatten(-1, (Hk, D)) if Hk else None
    else:
        q = randn(*tok, Hq, D)
        k = randn(*tok, Hk, D) if Hk else None
        keep += [q] + ([k] if k is not None else [])
    if case.out_of_place:  # poisoned: every element must be written
        q_out = torch.full(q.shape, float("nan"), dtype=dt, device=device)
        k_out = torch.full(k.shape, float("nan"), dtype=dt, device=device) if k is not None else None
        keep += [q_out] + ([k_out] if k_out is not None else [])
    else:
        q_out, k_out = q, k

    limit = case.max_position if case.cache_dtype else 1 << 20
    positions = indptr = offsets = None
    owned = np.ones(T, dtype=bool)
    if case.indptr:
        # one empty request; with bad_positions the last 3 tokens belong to no request
        last = max(0, T - 3) if case.bad_positions else T
        cuts = np.sort(rng.integers(0, last + 1, size=3))
        ends = [0, int(cuts[0]), int(cuts[0]), int(cuts[1]), int(cuts[2]), last]
        ind = np.array(ends, dtype=np.int64)
        offs = rng.integers(0, limit - T, size=len(ind) - 1).astype(np.int64)
        pos = np.zeros(T, dtype=np.int64)
        owned[:] = False
        for b in range(len(offs)):
            for t in range(ind[b], ind[b + 1]):
                pos[t] = offs[b] + t - ind[b]
                owned[t] = True
        it = TORCH_DTYPE[case.index_dtype]
        indptr = torch.tensor(ind, dtype=it, device=device)
        offsets = torch.tensor(offs, dtype=it, device=device)
        keep += [indptr, offsets]
        pos_table = pos[None]
    else:
        pos_table = rng.integers(0, limit, size=(case.npos, T)).astype(np.int64)
        if case.bad_positions:
            pos_table[:, ::7] = limit + 7   # outside the cache (identity), or far on the fly
            pos_table[:, 3::11] = -3
        shape = ((3,) if case.mrope else ()) + tok
        positions = torch.tensor(pos_table.reshape(shape), dtype=TORCH_DTYPE[case.index_dtype],
                                 device=device)
        keep.append(positions)
    if case.cache_dtype and cache is None:
        cache = make_cache(case, device)
    return Tensors(q, k, q_out, k_out, positions, indptr, offsets, cache, keep, fused,
                   pos_table, owned)


# ====================================================================== planning (plan.py)

def _norm_strides(x) -> list:
    """Strides with those of size-1 dims zeroed (rope_jit/plan.py _norm_strides)."""
    return [0 if n == 1 else s for n, s in zip(x.shape, x.stride())]


def head_layout(x, ntok: int) -> tuple:
    """(outer, inner, head) element strides of a [*tok, H, D] view."""
    st = _norm_strides(x)
    tok = st[:ntok]
    outer, inner = (0, tok[0]) if ntok == 1 else (tok[0], tok[1])
    return outer, inner, st[ntok]


def choose_vec(itemsize: int, must_divide: list, pointers: list) -> int:
    vec = 16 // itemsize
    while vec > 1:
        if all(m % vec == 0 for m in must_divide) and all(p % (vec * itemsize) == 0 for p in pointers):
            break
        vec //= 2
    return vec


@dataclass(frozen=True)
class Layout:
    """What the planner derives from the arrays: vector widths and the static struct fields."""

    vec: int
    cache_vec: int
    chunks: int
    static: tuple


def plan_layout(case: Case, t: Tensors) -> Layout:
    """rope_jit/plan.py plan_rope for the case's arrays (validation left out)."""
    ntok = 2 if case.batch else 1
    R, D = case.rotary_dim, case.head_size
    zero = (0, 0, 0)
    q = head_layout(t.q, ntok)
    k = head_layout(t.k, ntok) if t.k is not None else zero
    qo = head_layout(t.q_out, ntok)
    ko = head_layout(t.k_out, ntok) if t.k_out is not None else zero
    must = [R // 2]
    for h, present in ((q, True), (k, t.k is not None), (qo, True), (ko, t.k_out is not None)):
        if present:
            must += list(h)
    if case.out_of_place:
        must.append(D - R)
    ptrs = [t.q.data_ptr()] + ([t.k.data_ptr()] if t.k is not None else [])
    itemsize = ITEMSIZE[case.dtype]
    vec = choose_vec(itemsize, must, ptrs)
    if case.cache_dtype:
        cache_stride = _norm_strides(t.cache)[0]
        cache_vec = min(vec, choose_vec(ITEMSIZE[case.cache_dtype], [vec, cache_stride],
                                        [t.cache.data_ptr()]))
        max_position = t.cache.shape[0]
    else:
        cache_stride, cache_vec, max_position = 0, 1, 0
    if case.indptr:
        pos_strides, pos_row, batch_size = (0, 0), 0, t.offsets.shape[0]
    else:
        ps = _norm_strides(t.positions)
        pos_row = 0
        if case.mrope:
            pos_row, ps = ps[0], ps[1:]
        pos_strides = (0, ps[0]) if len(ps) == 1 else (ps[0], ps[1])
        batch_size = 0
    values = dict(
        num_tokens=case.tokens, inner_tokens=(case.tokens // case.batch if case.batch else case.tokens),
        num_q_heads=case.num_q_heads, num_k_heads=case.num_k_heads, batch_size=batch_size,
        max_position=max_position, cache_stride=cache_stride,
        q_stride_outer=q[0], q_stride_inner=q[1], q_stride_head=q[2],
        k_stride_outer=k[0], k_stride_inner=k[1], k_stride_head=k[2],
        qo_stride_outer=qo[0], qo_stride_inner=qo[1], qo_stride_head=qo[2],
        ko_stride_outer=ko[0], ko_stride_inner=ko[1], ko_stride_head=ko[2],
        pos_stride_outer=pos_strides[0], pos_stride_inner=pos_strides[1], pos_stride_row=pos_row,
        rot_offset=0, cos_stride_outer=0, cos_stride_inner=0, sin_stride_outer=0,
        sin_stride_inner=0)
    return Layout(vec, cache_vec, R // 2 // vec, tuple(values[n] for n in ROPE_STATIC))


def pack_params(case: Case, t: Tensors, layout: Layout) -> bytes:
    ptr = lambda x: x.data_ptr() if x is not None else 0  # noqa: E731
    pointers = (ptr(t.q), ptr(t.k), ptr(t.q_out), ptr(t.k_out),
                ptr(t.indptr) if case.indptr else ptr(t.positions), ptr(t.offsets), ptr(t.cache),
                0, 0)  # no per-token cos/sin
    return PARAM_PACKER.pack(*pointers, *freq_values(case), *layout.static)


def base_spec(case: Case, layout: Layout, **knobs) -> KSpec:
    """The case's specialization (rope_jit's RopeSpec fields) with the given knobs."""
    fields_ = dict(head_size=case.head_size, rotary_dim=case.rotary_dim, dtype=case.dtype,
                   cache_dtype=case.cache_dtype, index_dtype=case.index_dtype,
                   indptr=case.indptr, neox=case.neox, out_of_place=case.out_of_place,
                   vec=layout.vec, cache_vec=layout.cache_vec, head_batch=1, prefetch=False,
                   scaling=case.scaling if case.cache_dtype is None else "linear",
                   mrope_section=case.mrope,
                   mrope_interleaved=case.mrope_interleaved and bool(case.mrope),
                   inverse=case.inverse)
    fields_.update(knobs)
    return KSpec(**fields_)


# rope_jit/plan.py TUNING and choose_launch (the current launch rules, measured on an H100)
TUNING = {
    "small_waves": 1.0, "fill_waves": 4.0, "fill_waves_fly": 4.0, "head_batch": 2,
    "block": 256, "small_block": 128, "small_block_fly": 256, "prefetch": True, "min_blocks": 1,
}


def register_launch(tokens: int, chunks: int, num_heads: int, sms: int, fly: bool, *,
                    head_parallel: bool | None = None, head_batch: int | None = None,
                    fill_waves: float | None = None, block_target: int | None = None) -> tuple:
    """choose_launch with its choices open: (head_batch, prefetch, grid, block).
    All None: exactly rope_jit's current rules."""
    t = TUNING
    wave = sms * 2048
    rows = tokens * chunks
    if head_parallel is None:
        head_parallel = rows * num_heads <= t["small_waves"] * wave
    if head_parallel:
        hb, per_group = 1, 1
        target = block_target or (t["small_block_fly"] if fly else t["small_block"])
    else:
        hb = min(head_batch or t["head_batch"], num_heads)
        fill = int(wave * (fill_waves or (t["fill_waves_fly"] if fly else t["fill_waves"])))
        groups = min(max(1, -(-fill // rows)), -(-num_heads // hb))
        per_group = -(-num_heads // groups)
        per_group = -(-per_group // hb) * hb
        target = block_target or t["block"]
    groups = -(-num_heads // per_group)
    g_block = max(1, min(groups, target // chunks))
    while groups % g_block:
        g_block -= 1
    tok_block = max(1, min(64, tokens, target // (chunks * g_block)))
    grid = (-(-tokens // tok_block), groups // g_block, 1)
    prefetch = bool(t["prefetch"]) and per_group > hb
    return hb, prefetch, grid, (chunks, g_block, tok_block)


@dataclass
class Config:
    """A kernel variant and its launch shape on one case."""

    name: str
    spec: KSpec
    block: tuple
    grid: tuple | None          # None: persistent, resolved from the occupancy
    smem: int
    persistent: float = 0.0     # grid = min(tiles, persistent x resident blocks x SMs)
    pdl_launch: bool = False    # launch with the programmatic-serialization attribute

    @property
    def variant(self) -> str:
        return self.spec.knobs()


def register_config(name: str, case: Case, layout: Layout, sms: int, knobs: dict,
                    **launch) -> Config:
    hb, prefetch, grid, block = register_launch(case.tokens, layout.chunks, case.num_heads, sms,
                                                case.cache_dtype is None, **launch)
    spec = base_spec(case, layout, head_batch=hb, prefetch=prefetch, **knobs)
    smem = block[2] * (case.rotary_dim // 2 * 8 + 16 * case.npos) if case.cache_dtype is None else 0
    return Config(name, spec, block, grid, smem)


def staged_config(name: str, case: Case, layout: Layout, *, staging: int, stage_tokens: int,
                  stages: int, min_blocks: int, index_bits: int = 32, max_threads: int = 512,
                  persistent: float = 1.0, grid_blocks: int | None = None,
                  tiles_per_block: int | None = None, pdl: bool = False) -> Config:
    spec = base_spec(case, layout, staging=staging, stage_tokens=stage_tokens, stages=stages,
                     min_blocks=min_blocks, index_bits=index_bits, pdl=pdl)
    rows = stage_tokens * case.num_heads
    max_lanes = max(1, max_threads // layout.chunks)
    lanes = -(-rows // -(-rows // max_lanes))   # rows spread evenly over at most max_lanes
    tiles = -(-case.tokens // stage_tokens)
    if grid_blocks is not None:
        grid, persistent = (min(tiles, grid_blocks), 1, 1), 0.0
    elif tiles_per_block is not None:  # the hardware balances the blocks; each walks a few tiles
        grid, persistent = (-(-tiles // tiles_per_block), 1, 1), 0.0
    elif stages == 1 or not persistent:
        grid, persistent = (tiles, 1, 1), 0.0
    else:
        grid = None
    return Config(name, spec, (layout.chunks, lanes, 1), grid, spec.staged_smem(case.num_heads),
                  persistent)


def row_configs(case: Case, layout: Layout, sms: int, quick: bool = False) -> list:
    """The configurations timed on one row (the current kernel first)."""
    T = case.tokens
    cur = lambda name, **kn: register_config(name, case, layout, sms, kn)  # noqa: E731
    out = [cur("current"), cur("i32", index_bits=32)]
    again = [cur("current again")]  # timed last: the run-to-run spread of the row
    flat = lambda bt, mb=1: register_config(  # noqa: E731
        f"i32 flat b{bt}" + (f" mb{mb}" if mb != 1 else ""), case, layout, sms,
        dict(index_bits=32, min_blocks=mb), head_parallel=True, block_target=bt)
    st = lambda kind, t, s, mb, **kw: staged_config(  # noqa: E731
        f"{kind} t{t}s{s} mb{mb}" + ("" if s == 1 else f" {kw['tiles_per_block']} tiles/block"
                                     if "tiles_per_block" in kw else " persistent"),
        case, layout, staging=1 if kind == "async" else 2, stage_tokens=t, stages=s,
        min_blocks=mb, **kw)
    if quick:
        if T <= 16:
            return out + [flat(64), st("async", 1, 1, 3)] + again
        return out + [flat(256, 3), st("async", 1, 2, 3), st("async", 2, 3, 3),
                      st("bulk", 1, 2, 3)] + again
    if T <= 16:
        out += [flat(32), flat(64), flat(128), flat(64, 3), st("async", 1, 1, 3)]
    elif T <= 128:
        out += [flat(128), flat(256), flat(256, 3), st("async", 1, 1, 3), st("async", 1, 2, 3),
                st("bulk", 1, 2, 3)]
    else:
        out += [flat(256), flat(512), flat(256, 3),
                register_config("i32 hb2 f8", case, layout, sms, dict(index_bits=32),
                                head_parallel=False, fill_waves=8.0),
                st("async", 1, 1, 3), st("async", 1, 2, 3), st("async", 1, 3, 3),
                st("async", 2, 2, 3), st("async", 2, 3, 3), st("async", 4, 2, 3),
                st("async", 1, 2, 4), st("async", 1, 2, 1),
                st("async", 1, 2, 3, tiles_per_block=4), st("async", 1, 3, 3, tiles_per_block=8),
                st("bulk", 1, 2, 3), st("bulk", 1, 3, 3), st("bulk", 2, 2, 3), st("bulk", 4, 2, 3),
                st("bulk", 1, 2, 3, tiles_per_block=4)]
    return out + again


def feature_configs(case: Case, layout: Layout, sms: int) -> list:
    """Every code path on a feature case, with small grids so blocks walk several tiles."""
    reg = lambda name, kn, **l: register_config(name, case, layout, sms, kn, **l)  # noqa: E731
    st = lambda name, **kw: staged_config(name, case, layout, **kw)  # noqa: E731
    return [
        reg("current small", {}, head_parallel=True),
        reg("current large", {}, head_parallel=False, block_target=64),
        reg("i32 flat", dict(index_bits=32, min_blocks=3), head_parallel=True, block_target=64),
        reg("i32 hb2", dict(index_bits=32), head_parallel=False, block_target=64),
        reg("pdl flat", dict(index_bits=32, pdl=True), head_parallel=True, block_target=64),
        st("async t1s1", staging=1, stage_tokens=1, stages=1, min_blocks=3),
        st("async t2s2 grid3", staging=1, stage_tokens=2, stages=2, min_blocks=3, grid_blocks=3),
        st("async t4s3 grid2", staging=1, stage_tokens=4, stages=3, min_blocks=1, grid_blocks=2,
           max_threads=128),
        st("bulk t1s2 grid3", staging=2, stage_tokens=1, stages=2, min_blocks=3, grid_blocks=3),
        st("bulk t2s3 grid2", staging=2, stage_tokens=2, stages=3, min_blocks=3, grid_blocks=2),
        st("pdl async t1s2 grid3", staging=1, stage_tokens=1, stages=2, min_blocks=3,
           grid_blocks=3, pdl=True),
    ]


# ====================================================================== reference and checks

PRECISION_BITS = {"bfloat16": 8, "float16": 11, "float32": 24}


def reference(case: Case, t: Tensors, device) -> dict:
    """float64 reference of q and k: {name: (expected [T, H, D], pair scale, input)}."""
    torch = _torch()
    T, D, R = case.tokens, case.head_size, case.rotary_dim
    half = R // 2
    f64 = torch.float64
    pos = torch.as_tensor(t.pos_table, device=device)           # [NPOS, T]
    owned = torch.as_tensor(t.owned, device=device)[None]       # [1, T]
    rows = torch.as_tensor(mrope_rows(case), device=device)     # [half]
    p = pos[rows]                                               # [half, T]
    j = torch.arange(half, device=device)
    if case.cache_dtype:
        table = t.cache.to(f64)
        ok = (p >= 0) & (p < table.shape[0]) & owned
        pc = p.clamp(0, table.shape[0] - 1)
        jj = j[:, None].expand_as(pc)
        cos = torch.where(ok, table[pc, jj], torch.ones((), dtype=f64, device=device))
        sin = torch.where(ok, table[pc, jj + half], torch.zeros((), dtype=f64, device=device))
    else:
        exponent, inv_scale, ramp_a, ramp_b, attention = freq_values(case)
        jd = j.to(f64)
        inv = torch.exp2(jd * exponent)
        if case.scaling == "linear":
            freq = inv * inv_scale
        else:
            x = inv if case.scaling == "llama3" else jd
            w = (x * ramp_a + ramp_b).clamp(0.0, 1.0)
            freq = (1 - w) * (inv * inv_scale) + w * inv
        ang = torch.where(owned, p.to(f64) * freq[:, None], torch.zeros((), dtype=f64, device=device))
        cos, sin = ang.cos(), ang.sin()
        if case.scaling == "yarn":
            cos, sin = cos * attention, sin * attention
    if case.inverse:
        sin = -sin
    cos, sin = cos.T[:, None, :], sin.T[:, None, :]             # [T, 1, half]
    if case.neox:
        i1, i2 = slice(0, half), slice(half, R)
    else:
        i1, i2 = slice(0, R, 2), slice(1, R, 2)
    out = {}
    for name, x in (("q", t.q), ("k", t.k)):
        if x is None:
            continue
        x64 = x.reshape(T, -1, D).to(f64)
        x1, x2 = x64[..., i1], x64[..., i2]
        ref = x64.clone()
        ref[..., i1] = x1 * cos - x2 * sin
        ref[..., i2] = x2 * cos + x1 * sin
        scale = torch.zeros_like(x64)
        pair = x1.abs() + x2.abs()
        scale[..., i1] = pair
        scale[..., i2] = pair
        out[name] = (ref, scale, x64)
    return out


def compare(case: Case, t: Tensors, ref: dict) -> dict:
    """Outputs against the float64 reference: rotated elements within one unit in the last
    place of the output dtype (plus fp32 arithmetic slack), pass-through elements exact,
    out-of-place inputs untouched. NaN (an unwritten poisoned output) never passes."""
    torch = _torch()
    T, D, R = case.tokens, case.head_size, case.rotary_dim
    bits = PRECISION_BITS[case.dtype]
    bad, worst, where = 0, 0.0, None
    for name, out in (("q", t.q_out), ("k", t.k_out)):
        if out is None:
            continue
        expected, scale, x64 = ref[name]
        o = out.reshape(T, -1, D).to(torch.float64)
        _, e = torch.frexp(expected[..., :R])
        ulp = torch.ldexp(torch.ones_like(expected[..., :R]), (e - bits).to(torch.int32))
        if case.dtype == "float16":
            ulp = ulp.clamp(min=2.0 ** -24)
        err = (o[..., :R] - expected[..., :R]).abs()
        bad_rot = ~(err <= ulp + scale[..., :R] * 2.0 ** -20)
        bad_pass = ~(o[..., R:] == expected[..., R:])
        n = int(bad_rot.sum()) + int(bad_pass.sum())
        ratio = torch.nan_to_num(err / ulp, nan=float("inf"))
        worst = max(worst, float(ratio.max()) if ratio.numel() else 0.0)
        if n and where is None:
            idx = torch.nonzero(torch.cat([bad_rot, bad_pass], dim=-1))[0].tolist()
            tt, hh, dd = idx
            where = (f"{name}[token {tt}, head {hh}, elem {dd}] = {float(o[tt, hh, dd]):.6g}, "
                     f"expected {float(expected[tt, hh, dd]):.6g}")
        bad += n
        if case.out_of_place:  # the inputs stay as they were
            src = t.q if name == "q" else t.k
            moved = int((src.reshape(T, -1, D).to(torch.float64) != x64).sum())
            if moved:
                bad += moved
                where = where or f"{name}: {moved} input elements changed by an out-of-place call"
    return {"ok": bad == 0, "bad": bad, "max_ulps": worst, "where": where}


def fused_guard(t: Tensors):
    """For fused/misaligned layouts: a check that nothing outside q and k was written."""
    if t.fused is None:
        return None
    torch = _torch()
    flat = t.storage[0]
    before = flat.clone()
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    for x in (t.q, t.k):  # mark the q and k elements: the same views taken on the mask
        if x is not None:
            torch.as_strided(mask, x.shape, x.stride(),
                             x.storage_offset() - flat.storage_offset()).fill_(True)

    def verify() -> int:
        return int((flat[~mask] != before[~mask]).sum())
    return verify


# ====================================================================== launching

class Skip(Exception):
    """A configuration that cannot run here (shared memory, occupancy)."""


def tiles_of(cfg: Config, case: Case) -> int:
    return -(-case.tokens // cfg.spec.stage_tokens)


class GpuLauncher:
    """Loads cubins with CuPy and launches them on torch's current stream."""

    ATTR_LOCAL_BYTES, ATTR_NUM_REGS, ATTR_MAX_DYNAMIC_SMEM = 3, 4, 8

    def __init__(self, cubin_dir: Path, sms: int, max_smem: int):
        import cupy
        from cupy_backends.cuda.api import driver
        self.cupy, self.driver = cupy, driver
        self.cubin_dir, self.sms, self.max_smem = cubin_dir, sms, max_smem
        self.funcs = {}
        self._ex = None

    def function(self, spec: KSpec) -> dict:
        key = spec_key(spec)
        f = self.funcs.get(key)
        if f is None:
            module = self.cupy.cuda.function.Module()
            module.load((self.cubin_dir / f"{key}.cubin").read_bytes())
            fn = module.get_function("rope_kernel")
            f = self.funcs[key] = dict(
                ptr=fn.ptr, module=module, fn=fn, smem_set=0, variant=spec.knobs(),
                registers=self.driver.funcGetAttribute(self.ATTR_NUM_REGS, fn.ptr),
                local_bytes=self.driver.funcGetAttribute(self.ATTR_LOCAL_BYTES, fn.ptr))
        return f

    def grid(self, cfg: Config, case: Case) -> tuple:
        f = self.function(cfg.spec)
        if cfg.smem > self.max_smem:
            raise Skip(f"needs {cfg.smem} B of shared memory (max {self.max_smem})")
        if cfg.smem > 48 * 1024 and f["smem_set"] < cfg.smem:
            self.driver.funcSetAttribute(f["ptr"], self.ATTR_MAX_DYNAMIC_SMEM, cfg.smem)
            f["smem_set"] = cfg.smem
        threads = cfg.block[0] * cfg.block[1] * cfg.block[2]
        occupancy = self.driver.occupancyMaxActiveBlocksPerMultiprocessor(f["ptr"], threads, cfg.smem)
        if occupancy < 1:
            raise Skip("no block fits on an SM")
        f["occupancy"] = occupancy
        if cfg.grid is not None:
            return cfg.grid
        return (min(tiles_of(cfg, case), max(1, int(cfg.persistent * occupancy * self.sms))), 1, 1)

    def call(self, cfg: Config, case: Case, params: bytes):
        """A closure that launches cfg once with these params on the current stream."""
        torch = _torch()
        f = self.function(cfg.spec)
        grid = self.grid(cfg, case)
        buf = ctypes.create_string_buffer(params, len(params))
        argv = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        ptr, block, smem, drv = f["ptr"], cfg.block, cfg.smem, self.driver
        if cfg.pdl_launch:
            ex = self.launch_ex()

            def run():
                ex(ptr, grid, block, smem, torch.cuda.current_stream().cuda_stream, argv)
        else:
            def run():
                drv.launchKernel(ptr, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                 smem, torch.cuda.current_stream().cuda_stream,
                                 ctypes.addressof(argv), 0)
        run.keep = (buf, argv, f)
        run.grid = grid
        return run

    def launch_ex(self):
        """cuLaunchKernelEx with the programmatic-stream-serialization attribute (PDL)."""
        if self._ex is None:
            class Value(ctypes.Union):
                _fields_ = [("pad", ctypes.c_char * 64), ("i", ctypes.c_int), ("p", ctypes.c_void_p)]

            class Attribute(ctypes.Structure):
                _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", Value)]

            class LaunchConfig(ctypes.Structure):
                _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                            ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                            ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                            ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                            ("attrs", ctypes.POINTER(Attribute)), ("numAttrs", ctypes.c_uint)]
            assert ctypes.sizeof(Attribute) == 72 and ctypes.sizeof(LaunchConfig) == 56
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuLaunchKernelEx
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p]
            PROGRAMMATIC_STREAM_SERIALIZATION = 6

            def ex(func, grid, block, smem, stream, argv):
                attr = Attribute()
                attr.id = PROGRAMMATIC_STREAM_SERIALIZATION
                attr.value.i = 1
                conf = LaunchConfig(grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                    smem, stream, ctypes.pointer(attr), 1)
                rc = fn(ctypes.byref(conf), func, ctypes.addressof(argv), None)
                if rc:
                    raise RuntimeError(f"cuLaunchKernelEx returned CUDA error {rc}")
            self._ex = ex
        return self._ex

    def run_once(self, cfg: Config, case: Case, params: bytes) -> tuple:
        run = self.call(cfg, case, params)
        run()
        _torch().cuda.synchronize()
        return run.grid

    def info(self, spec: KSpec) -> dict:
        f = self.function(spec)
        return {"registers": f["registers"], "local_bytes": f["local_bytes"],
                "blocks_per_sm": f.get("occupancy")}


class EmuLauncher:
    """The same interface on the CPU emulator (a pretend GPU of `sms` SMs, 1 block each)."""

    def __init__(self, workdir: Path, sms: int = 2):
        self.workdir, self.sms, self.libs = workdir, sms, {}

    def grid(self, cfg: Config, case: Case) -> tuple:
        if cfg.grid is not None:
            return cfg.grid
        return (min(tiles_of(cfg, case), max(1, int(cfg.persistent * self.sms))), 1, 1)

    def run_once(self, cfg: Config, case: Case, params: bytes) -> tuple:
        key = spec_key(cfg.spec)
        if key not in self.libs:
            self.libs[key] = Emulator(build_emulator(cfg.spec, self.workdir))
        grid = self.grid(cfg, case)
        self.libs[key].launch(params, grid, cfg.block, cfg.smem)
        return grid

    def info(self, spec: KSpec) -> dict:
        return {}


def check_config(case: Case, cfg: Config, launcher, device, seed: int, ref: dict,
                 cache, current=None) -> dict:
    """Run cfg once on fresh inputs (those the reference was made from) and compare."""
    t = make_tensors(case, device, seed, cache)
    layout = plan_layout(case, t)
    if layout.vec != cfg.spec.vec or layout.cache_vec != cfg.spec.cache_vec:
        return {"ok": False, "where": f"layout changed: vec {layout.vec}/{layout.cache_vec}"}
    guard = fused_guard(t)
    grid = launcher.run_once(cfg, case, pack_params(case, t, layout))
    result = compare(case, t, ref)
    result["grid"] = list(grid)
    if guard is not None:
        stray = guard()
        if stray:
            result.update(ok=False, bad=result["bad"] + stray,
                          where=result["where"] or f"{stray} elements outside q and k written")
    outs = [x for x in (t.q_out, t.k_out) if x is not None]
    if current is None:
        result["outputs"] = [x.clone() for x in outs]
    else:
        result["bitexact_vs_current"] = all(bool((a == b).all()) for a, b in zip(outs, current))
    return result


# ====================================================================== timing (benchmarks/timing.py)

def time_calls(calls, replays: int = 20, warmup: int = 3) -> float:
    """benchmarks/timing.py's CUDA-graph timing (median seconds per call, one call per
    buffer set, replays back to back), imported on first use: it needs torch, which the
    dry run does without."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from timing import time_calls as graph_time_calls

    return graph_time_calls(calls, replays, warmup)


def buffer_sets(bytes_per_set: int) -> int:
    return max(2, min(64, -(-MIN_SET_BYTES // max(bytes_per_set, 1))))


def copy_bandwidth(replays: int) -> float:
    """Device-copy bandwidth, bytes read + written per second (benchmarks/timing.py)."""
    torch = _torch()
    best = 0.0
    for size in (1 << 26, 1 << 28):
        srcs = [torch.empty(size // 4, dtype=torch.float32, device="cuda") for _ in range(4)]
        dst = torch.empty_like(srcs[0])
        t = time_calls([lambda s=s: dst.copy_(s) for s in srcs], replays=replays)
        best = max(best, 2 * size / t)
    return best


def time_copy(nbytes: int, sets: int, replays: int) -> float:
    """A torch device copy of nbytes (q and k's size), rotating over sets like the rows."""
    torch = _torch()
    srcs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(sets)]
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return time_calls([lambda s=s: dst.copy_(s) for s in srcs], replays=replays)


TOUCH_SRC = r"""
struct TouchParams { long long x, rows, vecs_per_row, row_stride_vecs; };
// The in-place pattern ceiling (benchmarks/pattern_ceiling.py): load and store back the
// rotated prefix of every head, 16-byte coalesced vectors, nothing else.
extern "C" __global__ void touch(const TouchParams p) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long r = i / p.vecs_per_row;
  if (r >= p.rows) return;
  long long v = i - r * p.vecs_per_row;
  uint4* q = (uint4*)p.x + r * p.row_stride_vecs + v;
  uint4 a = *q;
  a.x += 1u;  // a real change, or the compiler drops the load/store pair
  *q = a;
}
"""


_TOUCH = {}


def touch_function(cubin_dir: Path) -> int:
    """The pattern-ceiling kernel, compiled like the RoPE kernels; its CUfunction."""
    if "fn" not in _TOUCH:
        import cupy
        path = cubin_dir / "touch.cubin"
        _, err = _nvrtc_compile(("touch", TOUCH_SRC, str(path)))
        if err:
            raise RuntimeError(f"touch kernel: {err}")
        module = cupy.cuda.function.Module()
        module.load(path.read_bytes())
        fn = module.get_function("touch")
        _TOUCH.update(module=module, fn=fn)
    return _TOUCH["fn"].ptr


def time_ceiling(shape: Shape, tokens: int, sets: int, replays: int, cubin_dir: Path) -> float:
    torch = _torch()
    from cupy_backends.cuda.api import driver
    func = touch_function(cubin_dir)
    h = shape.num_q_heads + shape.num_kv_heads
    d, r = shape.head_size, shape.rotary_dim
    rows, vpr, stride = tokens * h, r * 2 // 16, d * 2 // 16
    bufs = [torch.randn(tokens * h * d, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
    calls = []
    for b in bufs:
        buf = ctypes.create_string_buffer(struct.pack("<4q", b.data_ptr(), rows, vpr, stride), 32)
        argv = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        grid = -(-rows * vpr // 256)

        def run(buf=buf, argv=argv, grid=grid, b=b):
            driver.launchKernel(func, grid, 1, 1, 256, 1, 1, 0,
                                torch.cuda.current_stream().cuda_stream, ctypes.addressof(argv), 0)
        calls.append(run)
    return time_calls(calls, replays=replays)


def roofline_bytes(shape: Shape, tokens: int, cache_itemsize: int) -> int:
    """docs/performance.md bytes of an in-place call (benchmarks/run.py bytes_per_call)."""
    rotated = tokens * (shape.num_q_heads + shape.num_kv_heads) * shape.rotary_dim * 2
    return 2 * rotated + 8 * tokens + tokens * shape.rotary_dim * cache_itemsize


# ====================================================================== the runs

class Caches:
    """One cos/sin cache per (rotary dim, theta, dtype, rows), shared by all sets of a row."""

    def __init__(self, device):
        self.device, self.caches = device, {}

    def get(self, case: Case):
        if not case.cache_dtype:
            return None
        key = (case.rotary_dim, case.rope_theta, case.cache_dtype, case.max_position)
        if key not in self.caches:
            self.caches[key] = make_cache(case, self.device)
        return self.caches[key]


def case_seed(case: Case) -> int:
    return SEED + int(hashlib.sha256(repr(case).encode()).hexdigest()[:6], 16)


def plan_case(case: Case, device, caches: Caches) -> Layout:
    """The layout the planner sees (strides and alignment of freshly made arrays; a stand-in
    of at most 64 tokens has the same strides)."""
    stand_in = case.tokens if case.tokens <= 64 or case.batch else 64
    t = make_tensors(case, device, case_seed(case), caches.get(case), tokens=stand_in)
    return plan_layout(case, t)


def row_list(quick: bool, shapes=None, tokens=None) -> list:
    """(shape, mode, tokens) rows, most important first (the run may stop on its budget)."""
    if quick:
        return [(SHAPES[s], m, t) for s, m, t in QUICK_ROWS]
    shapes = shapes or list(SHAPES)
    tokens = tokens or TOKENS
    order = [t for t in (8192, 32768, 1024, 1, 16, 128, 4) if t in tokens]
    order += [t for t in tokens if t not in order]
    return [(SHAPES[s], m, t) for t in order for s in shapes for m in ("cache", "fly")]


def smoke_items(device, caches: Caches, sms: int, quick: bool, emulate: bool = False) -> list:
    """(case, configs) checked by the smoke test: every row config of every shape and mode
    at a few token counts (staged ones also on small grids, so blocks walk several tiles),
    and every code path on every feature case."""
    items = []
    shapes = ["llama3-8b", "dsv3"] if quick else list(SHAPES)
    counts = (5, 37) if emulate else (5, 333)
    for name in shapes:
        for mode in ("cache", "fly"):
            for T in counts:
                case = row_case(SHAPES[name], mode, T)
                layout = plan_case(case, device, caches)
                # the large-problem variants too, on this small problem
                big = row_configs(replace(case, tokens=8192), layout, sms, quick)
                cfgs = row_configs(case, layout, sms, quick)
                cfgs += [rebind(c, case, layout) for c in big if c.spec.staging]
                for knobs in ({}, dict(index_bits=32)):  # head batches, with and without prefetch
                    for fill in (0.01, 8.0):
                        cfgs.append(register_config(f"hb2 fill {fill}", case, layout, sms, knobs,
                                                    head_parallel=False, fill_waves=fill))
                cfgs += [replace(c, name=c.name + " grid3", grid=(min(3, -(-T // c.spec.stage_tokens)), 1, 1),
                                 persistent=0.0) for c in cfgs if c.spec.staging and T > 5]
                items.append((case, dedupe(cfgs)))
    for case in ([] if quick else feature_cases()):
        if emulate and "float16" in (case.dtype, case.cache_dtype):
            continue
        layout = plan_case(case, device, caches)
        items.append((case, feature_configs(case, layout, sms)))
    return items


def rebind(cfg: Config, case: Case, layout: Layout) -> Config:
    """A staged config planned for another token count, re-planned for this case."""
    return staged_config(cfg.name, case, layout, staging=cfg.spec.staging,
                         stage_tokens=cfg.spec.stage_tokens, stages=cfg.spec.stages,
                         min_blocks=cfg.spec.min_blocks, index_bits=cfg.spec.index_bits,
                         persistent=cfg.persistent or (0.0 if cfg.grid else 1.0), pdl=cfg.spec.pdl)


def dedupe(cfgs: list) -> list:
    seen, out = set(), []
    for c in cfgs:
        key = (c.spec, c.block, c.grid, c.smem, c.persistent, c.pdl_launch)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def pdl_items(device, caches: Caches, sms: int) -> list:
    """Decode rows of the PDL experiment: the same kernel launched with and without the
    programmatic-serialization attribute, back to back in a graph."""
    items = []
    for name in ("llama3-8b", "dsv3"):
        for mode in ("cache", "fly"):
            for T in (1, 16):
                case = row_case(SHAPES[name], mode, T)
                layout = plan_case(case, device, caches)
                reg = lambda n, kn: register_config(n, case, layout, sms, kn,  # noqa: E731
                                                    head_parallel=True, block_target=64)
                pdl = reg("i32 flat b64 pdl kernel", dict(index_bits=32, pdl=True))
                staged = staged_config("async t1s1 pdl", case, layout, staging=1, stage_tokens=1,
                                       stages=1, min_blocks=3, pdl=True)
                items.append((case, [
                    register_config("current", case, layout, sms, {}),
                    reg("i32 flat b64", dict(index_bits=32)),
                    pdl,
                    replace(pdl, name="i32 flat b64 pdl kernel + pdl launch", pdl_launch=True),
                    replace(staged, name="async t1s1 pdl kernel + pdl launch", pdl_launch=True),
                ]))
    return items


def run_checks(items, launcher, device, caches: Caches, log, skip=lambda cfg, case: None,
               on_error=lambda: None) -> list:
    """Check every (case, config); one result dict each. log() gets a line before every
    launch, so a fault that kills the process names its configuration."""
    results = []
    for case, cfgs in items:
        cache = caches.get(case)
        seed = case_seed(case)
        ref = reference(case, make_tensors(case, device, seed, cache), device)
        current = None
        for cfg in cfgs:
            why = skip(cfg, case)
            if why:
                results.append(dict(case=case.name, config=cfg.name, variant=cfg.variant,
                                    status=why))
                continue
            log(f"CHECK\t{cfg.variant}\t{case.name}\t{cfg.name}")
            r = dict(case=case.name, tokens=case.tokens, config=cfg.name, variant=cfg.variant,
                     block=list(cfg.block))
            try:
                chk = check_config(case, cfg, launcher, device, seed, ref, cache, current)
                outputs = chk.pop("outputs", None)
                if current is None and chk["ok"]:
                    current = outputs
                r.update(chk)
                r["status"] = "ok" if chk["ok"] else "WRONG"
            except Skip as e:
                r["status"] = f"skip: {e}"
            except Exception as e:  # noqa: BLE001
                r["status"] = "error"
                r["error"] = f"{type(e).__name__}: {e}"[:800]
                on_error()
            log(f"RESULT\t{r['status']}\t{cfg.variant}\t{case.name}\t{cfg.name}\t"
                f"{r.get('where') or r.get('error') or ''}")
            results.append(r)
    return results


def shared_positions(sets: list) -> list:
    """All timing sets read the first set's positions, as benchmarks/run.py's rows do (one
    positions array per row, q/k rotated over the sets): the cache rows a row reads are
    the same in every replay, as in a model's layers."""
    for t in sets[1:]:
        t.positions, t.indptr, t.offsets = sets[0].positions, sets[0].indptr, sets[0].offsets
    return sets


def measure_row(shape: Shape, case: Case, layout: Layout, cfgs: list, launcher: GpuLauncher,
                caches: Caches, copy_bw: float, replays: int, excluded) -> dict:
    torch = _torch()
    device = torch.device("cuda")
    T = case.tokens
    per_set = T * (shape.num_q_heads + shape.num_kv_heads) * shape.head_size * 2
    sets = buffer_sets(per_set)
    cache_item = ITEMSIZE[case.cache_dtype] if case.cache_dtype else 0
    nbytes = roofline_bytes(shape, T, cache_item)
    rec = dict(shape=shape.name, mode=case.mode, tokens=T, bytes=nbytes, sets=sets, configs=[])
    rec["copy_seconds"] = time_copy(per_set, sets, replays)
    touch_bytes = 2 * T * (shape.num_q_heads + shape.num_kv_heads) * shape.rotary_dim * 2
    rec["ceiling_seconds"] = time_ceiling(shape, T, sets, replays, launcher.cubin_dir)
    rec["ceiling_pct"] = 100.0 * touch_bytes / rec["ceiling_seconds"] / copy_bw
    cache = caches.get(case)
    seed = case_seed(case)
    ref = reference(case, make_tensors(case, device, seed, cache), device)
    timing_sets = shared_positions([make_tensors(case, device, seed + 1 + i, cache)
                                    for i in range(sets)])
    current = None
    for cfg in cfgs:
        r = dict(name=cfg.name, variant=cfg.variant, block=list(cfg.block), smem=cfg.smem,
                 spec=asdict(cfg.spec))
        rec["configs"].append(r)
        why = excluded(cfg, case)
        if why:
            r["status"] = why
            continue
        try:
            chk = check_config(case, cfg, launcher, device, seed, ref, cache, current)
            outputs = chk.pop("outputs", None)
            if current is None and chk["ok"]:
                current = outputs
            r["check"] = chk
            r.update(launcher.info(cfg.spec))
            if not chk["ok"]:
                r["status"] = "WRONG"
                continue
            calls = [launcher.call(cfg, case, pack_params(case, ts, layout)) for ts in timing_sets]
            seconds = time_calls(calls, replays)
            r.update(status="ok", seconds=seconds, grid=list(calls[0].grid),
                     pct=100.0 * nbytes / seconds / copy_bw, x_copy=seconds / rec["copy_seconds"])
        except Skip as e:
            r["status"] = f"skip: {e}"
        except Exception as e:  # noqa: BLE001
            r["status"] = "error"
            r["error"] = f"{type(e).__name__}: {e}"[:800]
            torch.cuda.synchronize()  # a sticky CUDA error raises here and ends the run
    del timing_sets, ref
    torch.cuda.empty_cache()
    return rec


def measure_pdl(items, launcher: GpuLauncher, caches: Caches, replays: int, excluded) -> list:
    """Decode: the same kernels with and without PDL launches, back to back in a graph."""
    torch = _torch()
    device = torch.device("cuda")
    rows = []
    for case, cfgs in items:
        shape = SHAPES[case.name.split("/")[0]]
        per_set = case.tokens * case.num_heads * case.head_size * 2
        sets = buffer_sets(per_set)
        layout = plan_case(case, device, caches)
        cache = caches.get(case)
        seed = case_seed(case)
        ref = reference(case, make_tensors(case, device, seed, cache), device)
        timing_sets = shared_positions([make_tensors(case, device, seed + 1 + i, cache)
                                        for i in range(sets)])
        rec = dict(shape=shape.name, mode=case.mode, tokens=case.tokens,
                   copy_seconds=time_copy(per_set, sets, replays), configs=[])
        for cfg in cfgs:
            r = dict(name=cfg.name, variant=cfg.variant)
            rec["configs"].append(r)
            why = excluded(cfg, case)
            if why:
                r["status"] = why
                continue
            try:
                chk = check_config(case, cfg, launcher, device, seed, ref, cache, [])
                chk.pop("outputs", None)
                if not chk["ok"]:
                    r.update(status="WRONG", check=chk)
                    continue
                calls = [launcher.call(cfg, case, pack_params(case, ts, layout)) for ts in timing_sets]
                s = time_calls(calls, replays)
                r.update(status="ok", seconds=s, x_copy=s / rec["copy_seconds"])
            except Exception as e:  # noqa: BLE001
                r.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
                torch.cuda.synchronize()
        rows.append(rec)
    return rows


# ====================================================================== report

def fmt_us(s) -> str:
    return f"{s * 1e6:.2f}us" if s else "-"


def best_of(rec: dict):
    ok = [c for c in rec["configs"] if c.get("status") == "ok"]
    return min(ok, key=lambda c: c["seconds"]) if ok else None


def table(rows: list) -> str:
    """One line per row: copy time, pattern ceiling, the current kernel, the best config."""
    lines = [f"{'shape':9s} {'mode':5s} {'T':>5s} {'copy':>8s} {'ceil':>5s} | {'current':>15s} "
             f"{'again':>6s} | best (time, % of copy or x copy, config, grid/block/regs, % of ceiling)"]
    for rec in rows:
        if "configs" not in rec:
            continue
        by_name = {c["name"]: c for c in rec["configs"]}
        cur, again, best = by_name.get("current"), by_name.get("current again"), best_of(rec)
        small = rec["tokens"] <= SMALL_TOKENS

        def rel(c):
            return f"{c['x_copy']:.2f}x" if small else f"{c['pct']:.1f}%"

        def cell(c):
            if not c or c.get("status") != "ok":
                return (c or {}).get("status", "-")[:15]
            return f"{fmt_us(c['seconds'])} {rel(c)}"
        best_txt = "-"
        if best:
            best_txt = (f"{cell(best)} {best['name']} g{best.get('grid', ['?'])[0]}"
                        f"/b{'x'.join(map(str, best['block']))}/{best.get('registers', '?')}r")
            if not small and rec.get("ceiling_pct"):
                best_txt += f" {100 * best['pct'] / rec['ceiling_pct']:.0f}%c"
        lines.append(f"{rec['shape'][:9]:9s} {rec['mode']:5s} {rec['tokens']:5d} "
                     f"{fmt_us(rec['copy_seconds']):>8s} {rec.get('ceiling_pct', 0):5.1f} | "
                     f"{cell(cur):>15s} {rel(again) if again and again.get('status') == 'ok' else '-':>6s}"
                     f" | {best_txt}")
        wrong = [c["name"] for c in rec["configs"] if c.get("status") in ("WRONG", "error")]
        if wrong:
            lines.append(f"    WRONG/error: {', '.join(wrong)}")
    return "\n".join(lines)


def pdl_table(rows: list) -> str:
    lines = []
    for rec in rows:
        cells = []
        for c in rec["configs"]:
            v = f"{fmt_us(c['seconds'])} {c['x_copy']:.2f}x" if c.get("status") == "ok" else c.get("status")
            cells.append(f"{c['name']}: {v}")
        lines.append(f"PDL {rec['shape']:10s} {rec['mode']:5s} T={rec['tokens']:3d} copy "
                     f"{fmt_us(rec['copy_seconds'])} | " + " | ".join(cells))
    return "\n".join(lines)


# ====================================================================== drivers

def all_specs(items) -> list:
    return [c.spec for _, cfgs in items for c in cfgs]


def smoke_child(args) -> int:
    """--smoke-child: the checks of smoke_items on the GPU, one line per launch (the parent
    reads them to name a configuration that killed the process)."""
    torch = _torch()
    import cupy
    device = torch.device("cuda")
    props = cupy.cuda.runtime.getDeviceProperties(0)
    sms = props["multiProcessorCount"]
    caches = Caches(device)
    excluded = set(filter(None, (args.exclude or "").split(";")))
    items = smoke_items(device, caches, sms, args.quick)
    if not args.quick:
        items += pdl_items(device, caches, sms)
    launcher = GpuLauncher(Path(args.cubins), sms, props.get("sharedMemPerBlockOptin", 232448))

    def log(line):
        print(line, flush=True)
    def on_error():
        # A fault (illegal address, a trap) leaves the CUDA context unusable: every later
        # check would fail too. Exit; the parent excludes the variant of the last CHECK line.
        try:
            torch.cuda.synchronize()
            torch.ones(1, device=device).sum().item()
        except Exception as e:  # noqa: BLE001
            print(f"FATAL\t{type(e).__name__}: {e}", flush=True)
            os._exit(3)
    results = run_checks(items, launcher, device, caches, log,
                         skip=lambda cfg, case: "excluded" if cfg.variant in excluded else None,
                         on_error=on_error)
    Path(args.smoke_json).write_text(json.dumps(results, indent=1, default=str))
    print("SMOKE DONE", flush=True)
    return 0


def run_smoke(args, out: Path, cubins: Path, timeout: float) -> dict:
    """Run the smoke test in a child process; variants that crash or hang it are excluded
    and it is run again without them. Returns {"failed": {(variant, case)...} ...}."""
    crashed, log_lines, results = [], [], []
    smoke_json = out / "smoke.json"
    deadline = time.time() + timeout
    for attempt in range(4):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--smoke-child", "--cubins",
               str(cubins), "--smoke-json", str(smoke_json), "--exclude", ";".join(crashed)]
        if args.quick:
            cmd.append("--quick")
        left = max(10.0, deadline - time.time())
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            stdout, rc = p.stdout, p.returncode
            err = p.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, err = "timeout", f"timed out after {left:.0f} s"
        log_lines += stdout.splitlines()
        if "SMOKE DONE" in stdout and rc == 0:
            results = json.loads(smoke_json.read_text())
            break
        checks = [line for line in stdout.splitlines() if line.startswith("CHECK\t")]
        if not checks:
            print(f"smoke test failed before any check (rc {rc}):\n{err}", flush=True)
            break
        variant = checks[-1].split("\t")[1]
        print(f"smoke test: {checks[-1]!r} ended the process (rc {rc}); excluding {variant}",
              flush=True)
        crashed.append(variant)
        if time.time() > deadline:
            break
    failed = {}
    for r in results:
        if r.get("status") not in ("ok", "excluded") and not str(r.get("status")).startswith("skip"):
            failed.setdefault(r["variant"], []).append(f"{r['case']}: {r['config']}: {r['status']} "
                                                       f"{r.get('where') or r.get('error') or ''}")
    (out / "smoke.log").write_text("\n".join(log_lines))
    return dict(crashed=crashed, failed=failed, checks=len(results),
                passed=sum(r.get("status") == "ok" for r in results))


def gpu_run(args) -> int:
    t0 = time.time()
    torch = _torch()
    import cupy
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cubins = Path(args.work or tempfile.mkdtemp(prefix="kernel_lab_")) / "cubins"
    device = torch.device("cuda")
    props = cupy.cuda.runtime.getDeviceProperties(0)
    sms = props["multiProcessorCount"]
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    max_smem = props.get("sharedMemPerBlockOptin", 232448)
    replays = 10 if args.quick else args.replays
    caches = Caches(device)
    meta = dict(gpu=gpu, sms=sms, l2_bytes=props.get("l2CacheSize"), max_smem_optin=max_smem,
                torch=torch.__version__, cupy=cupy.__version__, replays=replays,
                nvrtc=".".join(map(str, __import__("cupy_backends.cuda.libs.nvrtc",
                                                  fromlist=["x"]).getVersion())),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv)
    print(f"{gpu}, {sms} SMs, torch {torch.__version__}, cupy {cupy.__version__}", flush=True)

    rows = row_list(args.quick, args.shapes, args.tokens)
    planned = []
    for shape, mode, T in rows:
        case = row_case(shape, mode, T)
        layout = plan_case(case, device, caches)
        planned.append((shape, case, layout, row_configs(case, layout, sms, args.quick)))
    specs = [c.spec for *_, cfgs in planned for c in cfgs]
    specs += all_specs(smoke_items(device, caches, sms, args.quick))
    if not args.quick:
        specs += all_specs(pdl_items(device, caches, sms))
    t = time.time()
    compile_errors = compile_all(specs, cubins)
    print(f"compiled {len(set(specs))} variants in {time.time() - t:.1f} s "
          f"({len(compile_errors)} failed)", flush=True)
    for spec, err in compile_errors.items():
        print(f"  COMPILE FAILED {spec.knobs()}: {err[:400]}", flush=True)
    bad_specs = set(compile_errors)

    smoke = {"skipped": True}
    if not args.no_smoke:
        t = time.time()
        smoke = run_smoke(args, out, cubins, timeout=args.smoke_timeout)
        print(f"smoke test: {smoke['passed']}/{smoke['checks']} checks passed in "
              f"{time.time() - t:.1f} s; crashed: {smoke['crashed'] or 'none'}; "
              f"failed: {sorted(smoke['failed']) or 'none'}", flush=True)
        for v, why in smoke["failed"].items():
            print(f"  {v}: {why[0]}" + (f" (+{len(why) - 1} more)" if len(why) > 1 else ""))
    dropped = set(smoke.get("crashed", [])) | set(smoke.get("failed", {}))

    def excluded(cfg, case):
        if cfg.spec in bad_specs:
            return "compile failed"
        if cfg.variant in dropped:
            return "dropped by the smoke test"
        return None

    copy_bw = copy_bandwidth(replays)
    meta["copy_bandwidth"] = copy_bw
    print(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s", flush=True)
    launcher = GpuLauncher(cubins, sms, max_smem)
    results = dict(meta=meta, smoke=smoke, compile_errors={k.knobs(): v for k, v in compile_errors.items()},
                   rows=[], pdl=[], skipped=[])

    def save():
        meta["elapsed_s"] = time.time() - t0
        (out / "lab.json").write_text(json.dumps(results, indent=1, default=str))

    fatal = None
    for shape, case, layout, cfgs in planned:
        if time.time() - t0 > args.budget:
            results["skipped"].append(f"{shape.name}/{case.mode}/{case.tokens}")
            continue
        try:
            rec = measure_row(shape, case, layout, cfgs, launcher, caches, copy_bw, replays, excluded)
        except Exception as e:  # noqa: BLE001  (a sticky CUDA error: nothing more can run)
            fatal = f"{shape.name}/{case.mode}/{case.tokens}: {type(e).__name__}: {e}"
            traceback.print_exc()
            break
        results["rows"].append(rec)
        print(table([rec]).splitlines()[1], flush=True)
        save()
    if fatal is None and not args.quick and time.time() - t0 < args.budget + 30:
        try:
            results["pdl"] = measure_pdl(pdl_items(device, caches, sms), launcher, caches, replays,
                                         excluded)
        except Exception as e:  # noqa: BLE001
            results["pdl_error"] = f"{type(e).__name__}: {e}"
    results["registers"] = {k: {"variant": v["variant"], "registers": v["registers"],
                                "local_bytes": v["local_bytes"]} for k, v in launcher.funcs.items()}
    results["fatal"] = fatal
    save()
    print("\n" + table(results["rows"]))
    if results["pdl"]:
        print(pdl_table(results["pdl"]))
    if results["skipped"]:
        print(f"skipped (time budget): {', '.join(results['skipped'])}")
    if fatal:
        print(f"FATAL: {fatal}")
    print(f"\n{len(results['rows'])} rows in {time.time() - t0:.0f} s; JSON: {out / 'lab.json'}")
    return 1 if fatal else 0


def dry_run(args) -> int:
    """No GPU: render and compile every variant (NVRTC, sm_90), registers from nvcc, and
    with --emulate the smoke test's checks on the CPU emulator."""
    t0 = time.time()
    torch = _torch()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    device = torch.device("cpu")
    caches = Caches(device)
    sms = 132
    rows = row_list(args.quick, args.shapes, args.tokens)
    planned = []
    for shape, mode, T in rows:
        case = row_case(shape, mode, T)
        layout = plan_case(case, device, caches)
        planned.append((shape, case, layout, row_configs(case, layout, sms, args.quick)))
    print(f"packed RopeParams: {PARAM_PACKER.size} bytes, {len(PARAM_FIELDS)} fields")
    specs = [c.spec for *_, cfgs in planned for c in cfgs]
    specs += all_specs(smoke_items(device, caches, sms, args.quick))
    specs += all_specs(pdl_items(device, caches, sms))
    t = time.time()
    errors = compile_all(specs, work / "cubins")
    print(f"NVRTC {ARCH}: {len(set(specs))} variants compiled in {time.time() - t:.1f} s, "
          f"{len(errors)} failed", flush=True)
    for spec, err in errors.items():
        print(f"  FAILED {spec}: {err[:1500]}")

    # registers per variant (nvcc -Xptxas -v), for each shape and mode
    seen, report_specs = set(), []
    for shape, case, layout, cfgs in planned:
        for c in cfgs:
            key = (shape.name, case.mode, c.spec)
            if key not in seen:
                seen.add(key)
                report_specs.append((shape.name, case.mode, c.spec))
    if shutil.which("nvcc"):
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            infos = list(pool.map(lambda x: ptxas_report(x[2], work / "ptxas"), report_specs))
        regs = {}
        for (sname, mode, spec), info in zip(report_specs, infos):
            regs.setdefault(spec.knobs(), {})[f"{sname}/{mode}"] = (
                f"{info.get('registers', '?')}" + (f"+{info['spill_stores']}sp"
                                                   if info.get("spill_stores") else ""))
        cols = [f"{s}/{m}" for s in (args.shapes or SHAPES) for m in ("cache", "fly")]
        print("\nregisters per thread (nvcc -Xptxas -v, sm_90; +N sp = N bytes of spill stores)")
        print(f"{'variant':24s} " + " ".join(f"{c[:13]:>13s}" for c in cols))
        for v in sorted(regs):
            print(f"{v:24s} " + " ".join(f"{regs[v].get(c, ''):>13s}" for c in cols))
        (out / "registers.json").write_text(json.dumps(regs, indent=1))
    else:
        print("nvcc not found: no register report")

    # launch plans and the size of the GPU run
    n_cfg = sum(len(c) for *_, c in planned)
    print(f"\n{len(planned)} rows, {n_cfg} timed configurations; staged shared memory per block "
          f"up to {max(c.smem for *_, cfgs in planned for c in cfgs)} B")

    if args.emulate:
        t = time.time()
        items = smoke_items(device, caches, 2, args.quick, emulate=True)
        specs = sorted({c.spec for _, cfgs in items for c in cfgs if emulatable(c.spec)},
                       key=spec_key)
        with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 2) as pool:
            for spec, err in pool.map(_build_emulator_job, [(s, str(work / "emu")) for s in specs]):
                if err:
                    print(f"emulator build failed: {err[:2000]}")
        print(f"\nemulators: {len(specs)} built in {time.time() - t:.0f} s", flush=True)
        launcher = EmuLauncher(work / "emu", sms=2)
        lines = []
        results = run_checks(items, launcher, device, caches, lines.append,
                             skip=lambda cfg, case: None if emulatable(cfg.spec) else "not emulated")
        bad = [r for r in results if r["status"] not in ("ok", "not emulated")]
        notexact = [r for r in results if r.get("bitexact_vs_current") is False]
        print(f"emulated checks: {sum(r['status'] == 'ok' for r in results)}/{len(results)} passed "
              f"in {time.time() - t:.0f} s; {len(notexact)} not bit-identical to the current kernel")
        for r in bad + notexact:
            print(f"  {r['status']:6s} {r['case']:32s} {r['config']:34s} {r['variant']}: "
                  f"{r.get('where') or r.get('error') or ''} max {r.get('max_ulps', 0):.2f} ulp")
        (out / "emulated_checks.json").write_text(json.dumps(results, indent=1, default=str))
        if bad:
            return 1
    print(f"\ndry run done in {time.time() - t0:.0f} s")
    return 1 if errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(HERE / "results")), "lab"))
    ap.add_argument("--quick", action="store_true", help="a few rows and variants (< 30 s)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: render, compile, registers")
    ap.add_argument("--emulate", action="store_true",
                    help="with --dry-run: run the smoke checks on the CPU emulator (minutes)")
    ap.add_argument("--shapes", type=lambda s: s.split(","), default=None)
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--work", default=None,
                    help="directory for compiled cubins and emulators (default: a temp dir; "
                         "the dry run uses --out)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds after which no new row is started")
    ap.add_argument("--smoke-timeout", type=float, default=120.0)
    ap.add_argument("--no-smoke", action="store_true")
    ap.add_argument("--smoke-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cubins", help=argparse.SUPPRESS)
    ap.add_argument("--smoke-json", help=argparse.SUPPRESS)
    ap.add_argument("--exclude", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke_child:
        return smoke_child(args)
    if args.dry_run:
        return dry_run(args)
    return gpu_run(args)


if __name__ == "__main__":
    sys.exit(main())
