"""The pattern ceiling: what an in-place access pattern alone allows on this GPU.

A trivial kernel reads and writes back, in place, the first ``touched_bytes`` of every
row of a buffer whose rows are ``row_bytes`` apart (16-byte vectors, one per thread, fully
coalesced within a row, no arithmetic beyond one add, no positions, no cache). For RoPE a
row is one head of q or k and the touched bytes are its rotated part: a partially rotated
head (GPT-J's 64 of 128 dims, Phi-2's 32 of 80) leaves holes in every DRAM burst, which
caps any in-place kernel below the copy bandwidth. Measured in the same run as the
implementations, it separates what the layout allows from kernel inefficiency.

Bytes are counted like the benchmark's: touched bytes read + written.

The chain floor adds what every position-indexed kernel must do on top: the touch kernel
whose threads also load their token's position and then, dependent on it, 16 bytes of that
position's row of a table shaped like an fp32 cos/sin cache (rows at random, as the
benchmark's positions), added in before the store. At a few tokens a call is one latency
chain (launch, position, cache row, store) where a copy is launch, load, store: this row is
what that chain costs a bare kernel on this GPU, the reference for "x copy time" with a
cache (a reference, not a proven bound: a kernel may schedule the chain better).
Charged like the implementations: touched bytes read + written, 8 bytes of position and
one cache row per token.
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

CHAIN_SOURCE = r"""
extern "C" __global__ void touch_prefix_chained(uint4* x, const long long* pos,
                                                const uint4* table, long long rows,
                                                int vecs_per_row, int row_stride_vecs,
                                                int rows_per_token, int table_row_vecs) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long r = i / vecs_per_row;
  if (r >= rows) return;
  int v = (int)(i - r * vecs_per_row);
  const long long p = pos[r / rows_per_token];  // in flight with the row's own load
  uint4* px = x + r * row_stride_vecs + v;
  uint4 a = *px;
  const uint4 c = table[p * table_row_vecs + v % table_row_vecs];  // waits for p
  a.x += c.x; a.y += c.y; a.z += c.z; a.w += c.w;
  *px = a;
}
"""
CHAIN_KERNEL = "touch_prefix_chained"


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


@dataclass(frozen=True)
class ChainPattern:
    """A TouchPattern whose rows belong to tokens of ``rows_per_token`` rows each, every
    token reading one random row of ``table_row_bytes`` from a table of ``table_rows``."""
    touch: TouchPattern
    rows_per_token: int
    table_row_bytes: int
    table_rows: int

    def __post_init__(self):
        if self.rows_per_token < 1 or self.touch.rows % self.rows_per_token:
            raise ValueError(f"ChainPattern: rows_per_token {self.rows_per_token} must divide "
                             f"the pattern's {self.touch.rows} rows")
        if self.table_row_bytes < VECTOR_BYTES or self.table_row_bytes % VECTOR_BYTES:
            raise ValueError(f"ChainPattern: table_row_bytes {self.table_row_bytes} is not a "
                             f"positive multiple of the {VECTOR_BYTES}-byte vector")
        if self.table_rows < 1:
            raise ValueError(f"ChainPattern: table_rows must be >= 1, got {self.table_rows}")

    @property
    def tokens(self) -> int:
        return self.touch.rows // self.rows_per_token

    @property
    def moved_bytes(self) -> int:
        """As a call with a cache is charged: touched bytes read + written, a position
        (8 bytes) and a table row per token."""
        return self.touch.moved_bytes + self.tokens * (8 + self.table_row_bytes)


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


_chained = _CupyKernel(CHAIN_SOURCE, CHAIN_KERNEL)


def touch_chained(buf: torch.Tensor, pos: torch.Tensor, table: torch.Tensor,
                  chain: ChainPattern) -> None:
    """The chained touch kernel on the GPU: buf's rows touched, each token's table row added."""
    import cupy as cp

    t = chain.touch
    vecs_per_row = t.touched_bytes // VECTOR_BYTES
    grid = ((t.rows * vecs_per_row + BLOCK_THREADS - 1) // BLOCK_THREADS,)
    _chained.launch(grid, (BLOCK_THREADS,),
                    (cp.uint64(buf.data_ptr()), cp.uint64(pos.data_ptr()),
                     cp.uint64(table.data_ptr()), cp.int64(t.rows), cp.int32(vecs_per_row),
                     cp.int32(t.row_bytes // VECTOR_BYTES), cp.int32(chain.rows_per_token),
                     cp.int32(chain.table_row_bytes // VECTOR_BYTES)))


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


def touch_chained_torch(buf: torch.Tensor, pos: torch.Tensor, table: torch.Tensor,
                        chain: ChainPattern) -> None:
    """The same bytes with torch ops (gather, add): the dry run's stand-in on the CPU."""
    t = chain.touch
    words = t.touched_bytes // 4
    rows = buf.view(torch.int32)[:t.buffer_bytes // 4].view(t.rows, t.row_bytes // 4)
    row_words = chain.table_row_bytes // 4
    cache = table.view(torch.int32)[:chain.table_rows * row_words].view(chain.table_rows, row_words)
    per_token = cache.index_select(0, pos).repeat_interleave(chain.rows_per_token, 0)
    rows[:, :words] += per_token[:, torch.arange(words, device=buf.device) % row_words]


def pattern_calls(pattern: TouchPattern, sets: int, device: torch.device) -> list:
    """One touch per buffer set (each its own buffer), as the rows' implementations rotate."""
    bufs = [torch.empty(pattern.buffer_bytes, dtype=torch.uint8, device=device) for _ in range(sets)]
    touch = _gpu_touch if device.type == "cuda" else touch_prefix_torch
    return [(lambda b=b: touch(b, pattern)) for b in bufs]


def chain_calls(chain: ChainPattern, sets: int, device: torch.device) -> list:
    """One chained touch per buffer set (each its own buffer and positions, uniform over
    the table's rows), one table for all, as the benchmark's cache."""
    t = chain.touch
    table = torch.randint(0, 2 ** 20, (chain.table_rows * chain.table_row_bytes // 4,),
                          dtype=torch.int32, device=device)
    bufs = [(torch.empty(t.buffer_bytes, dtype=torch.uint8, device=device),
             torch.randint(0, chain.table_rows, (chain.tokens,), dtype=torch.int64, device=device))
            for _ in range(sets)]
    touch = touch_chained if device.type == "cuda" else touch_chained_torch
    return [(lambda b=b, p=p: touch(b, p, table, chain)) for b, p in bufs]


_gpu_touch = PrefixTouch()  # one kernel object for every row (CuPy compiles it once)
