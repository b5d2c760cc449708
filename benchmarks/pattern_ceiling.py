"""Ceiling of the in-place access pattern alone (development aid).

A trivial kernel reads and writes back, in place, the first R elements of every head
(16-byte vectors, fully coalesced, one vector per thread, no arithmetic, no cache, no
positions). Its bandwidth, counted like the benchmark's (rotated bytes read + written),
is what any in-place RoPE kernel can reach on that layout: it separates DRAM-pattern limits
(partial heads) from kernel inefficiency.
"""
import os
import sys

import cupy as cp
import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import buffer_sets, copy_bandwidth, time_calls  # noqa: E402
from rope_jit._cuda import external_stream  # noqa: E402

SRC = r"""
extern "C" __global__ void touch(uint4* x, long long rows, int vecs_per_row, int row_stride_vecs) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long r = i / vecs_per_row;
  if (r >= rows) return;
  int v = (int)(i - r * vecs_per_row);
  uint4* p = x + r * row_stride_vecs + v;
  uint4 a = *p;
  a.x += 1u;  // a real change, or the compiler drops the load/store pair
  *p = a;
}
"""
kernel = cp.RawKernel(SRC, "touch")
bw = copy_bandwidth()
print(f"copy {bw / 1e12:.3f} TB/s")
for name, h, d, r in [("llama3-8b", 40, 128, 128), ("gptj", 34, 128, 64), ("dsv3", 129, 64, 64),
                      ("phi2", 64, 80, 32)]:
    for T in (8192, 32768):
        per = T * h * d * 2
        n = buffer_sets(per)
        bufs = [torch.randn(T * h * d, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        rows, vpr, stride = T * h, r * 2 // 16, d * 2 // 16
        threads = rows * vpr
        grid = ((threads + 255) // 256,)

        def call(b):
            with external_stream(torch.cuda.current_stream().cuda_stream):
                kernel(grid, (256,), (cp.uint64(b.data_ptr()), cp.int64(rows), cp.int32(vpr),
                                      cp.int32(stride)))

        t = time_calls([lambda b=b: call(b) for b in bufs])
        nbytes = 2 * rows * r * 2
        print(f"{name:10s} T={T:6d} rotated prefix {r}/{d}: {t * 1e6:8.2f} us  "
              f"{nbytes / t / bw * 100:5.1f}% of copy")
        del bufs
