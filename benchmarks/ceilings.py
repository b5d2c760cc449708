"""The pattern ceiling: what an in-place access pattern alone allows on this GPU.

A trivial kernel reads and writes back, in place, the first ``touched_bytes`` of every
row of a buffer whose rows are ``row_bytes`` apart (16-byte vectors, one per thread, fully
coalesced within a row, no arithmetic beyond one add, no positions, no cache). For RoPE a
row is one head of q or k and the touched bytes are its rotated part: a partially rotated
head (GPT-J's 64 of 128 dims, Phi-2's 32 of 80) leaves holes in every DRAM burst, which
caps any in-place kernel below the copy bandwidth. Measured in the same run as the
implementations, it separates what the layout allows from kernel inefficiency.

Bytes are counted like the benchmark's: touched bytes read + written.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

VECTOR_BYTES = 16
BLOCK_THREADS = 256

TOUCH_SOURCE = r"""
extern "C" __global__ void touch_prefix(uint4* x, long long rows, int vecs_per_row,
                                        int row_stride_vecs) {
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
TOUCH_KERNEL = "touch_prefix"


@dataclass(frozen=True)
class TouchPattern:
    """Rows of ``row_bytes`` back to back; the first ``touched_bytes`` of each are loaded
    and stored back."""
    rows: int
    row_bytes: int
    touched_bytes: int

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError(f"TouchPattern: rows must be >= 1, got {self.rows}")
        if not 0 < self.touched_bytes <= self.row_bytes:
            raise ValueError(f"TouchPattern: touched_bytes {self.touched_bytes} must be in "
                             f"(0, row_bytes={self.row_bytes}]")
        for what, n in (("row_bytes", self.row_bytes), ("touched_bytes", self.touched_bytes)):
            if n % VECTOR_BYTES:
                raise ValueError(f"TouchPattern: {what} {n} is not a multiple of the "
                                 f"{VECTOR_BYTES}-byte vector")

    @property
    def buffer_bytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def moved_bytes(self) -> int:
        """Touched bytes read + written: the bytes a call is charged."""
        return 2 * self.rows * self.touched_bytes


def _cupy_stream(torch_stream):
    """CuPy's view of a torch stream (inside a graph capture, the capture stream). CuPy 14
    deprecated ExternalStream(ptr) for Stream.from_external(obj), which takes torch's
    streams as they are where torch implements the CUDA stream protocol."""
    import cupy as cp

    if hasattr(cp.cuda.Stream, "from_external") and hasattr(torch_stream, "__cuda_stream__"):
        return cp.cuda.Stream.from_external(torch_stream)
    return cp.cuda.ExternalStream(torch_stream.cuda_stream)


class _CupyKernel:
    """A CuPy RawKernel compiled on first use, launched on torch's current stream (inside a
    graph capture, the capture stream; one GPU, device 0 for torch and CuPy alike)."""

    def __init__(self, source: str, name: str):
        self._source, self._name, self._kernel = source, name, None

    def launch(self, grid: tuple, block: tuple, args: tuple) -> None:
        import cupy as cp

        if self._kernel is None:
            self._kernel = cp.RawKernel(self._source, self._name)
        with _cupy_stream(torch.cuda.current_stream()):
            self._kernel(grid, block, args)


class PrefixTouch:
    """The touch kernel on the GPU."""

    def __init__(self):
        self._kernel = _CupyKernel(TOUCH_SOURCE, TOUCH_KERNEL)

    def __call__(self, buf: torch.Tensor, pattern: TouchPattern) -> None:
        import cupy as cp

        if buf.numel() * buf.element_size() < pattern.buffer_bytes:
            raise ValueError(f"buffer of {buf.numel() * buf.element_size()} bytes is smaller "
                             f"than the pattern's {pattern.buffer_bytes}")
        vecs_per_row = pattern.touched_bytes // VECTOR_BYTES
        threads = pattern.rows * vecs_per_row
        grid = ((threads + BLOCK_THREADS - 1) // BLOCK_THREADS,)
        self._kernel.launch(grid, (BLOCK_THREADS,),
                            (cp.uint64(buf.data_ptr()), cp.int64(pattern.rows),
                             cp.int32(vecs_per_row), cp.int32(pattern.row_bytes // VECTOR_BYTES)))


# The narrowing ceiling of the fused FP8 ops: every input byte read once in 16-byte vectors
# and written at half width (the high byte of each 16-bit element: bf16 -> e5m2 by
# truncation) to another buffer in 8-byte vectors, one vector per thread: what reading
# bf16 and writing FP8 allows on this GPU, with no positions, cos/sin or rotation.
NARROW_SOURCE = r"""
extern "C" __global__ void narrow_copy(const uint4* src, uint2* dst, long long vecs) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= vecs) return;
  const uint4 a = src[i];
  dst[i] = make_uint2(__byte_perm(a.x, a.y, 0x7531), __byte_perm(a.z, a.w, 0x7531));
}
"""
_narrow = _CupyKernel(NARROW_SOURCE, "narrow_copy")


def narrow_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst (half of src's bytes) <- the high byte of each 16-bit element of src."""
    import cupy as cp

    nbytes = src.numel() * src.element_size()
    if nbytes % VECTOR_BYTES or dst.numel() * dst.element_size() != nbytes // 2:
        raise ValueError(f"narrow_copy: {nbytes} source bytes must be a multiple of "
                         f"{VECTOR_BYTES} and twice the destination's")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("narrow_copy: source and destination must be contiguous")
    vecs = nbytes // VECTOR_BYTES
    _narrow.launch(((vecs + BLOCK_THREADS - 1) // BLOCK_THREADS,), (BLOCK_THREADS,),
                   (cp.uint64(src.data_ptr()), cp.uint64(dst.data_ptr()), cp.int64(vecs)))


def touch_prefix_torch(buf: torch.Tensor, pattern: TouchPattern) -> None:
    """The same bytes touched with a torch op: the dry run's stand-in on the CPU."""
    rows = buf.view(torch.uint8)[:pattern.buffer_bytes].view(pattern.rows, pattern.row_bytes)
    rows[:, :pattern.touched_bytes].add_(1)


def pattern_calls(pattern: TouchPattern, sets: int, device: torch.device) -> list:
    """One touch per buffer set (each its own buffer), as the rows' implementations rotate."""
    bufs = [torch.empty(pattern.buffer_bytes, dtype=torch.uint8, device=device) for _ in range(sets)]
    touch = _gpu_touch if device.type == "cuda" else touch_prefix_torch
    return [(lambda b=b: touch(b, pattern)) for b in bufs]


_gpu_touch = PrefixTouch()  # one kernel object for every row (CuPy compiles it once)
