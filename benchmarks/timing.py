"""Timing: CUDA-graph replay over rotating buffer sets, its eager fallback, the device copy
(bandwidth and per-row time), host time per call, and a CPU stand-in for the dry run.

Each call closure works on its own buffer set; one graph holds one call per set, so a
replay walks through all of them (sizing the sets past L2 keeps the cache from
flattering the numbers) and launch gaps are those of graph replay. Time per call is the
replay time over the number of calls: CUDA events, warm-up, median of many replays.

Nothing here knows what the closures compute: op families (benchmarks/impls.py) build
them, so a new family is timed by this code unchanged. benchmarks/sweep.py also imports
``time_calls``, ``buffer_sets`` and ``copy_bandwidth``.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Sequence

import torch

from errors import FatalCuda, short_error

Call = Callable[[], object]

GPU_BUFFERS_TOTAL = 1 << 29  # bytes of rotating buffer sets at least: several times L2


def time_calls(calls: Sequence[Call], replays: int = 30, warmup: int = 3) -> float:
    """Median seconds per call of the closures in `calls`, replayed as one CUDA graph."""
    for c in calls:  # compile, load, allocate outside the capture
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for c in calls:
            c()
    for _ in range(warmup):
        graph.replay()
    # Queue every timed replay back to back and synchronize once: a host sync between
    # replays idles the GPU and lets its clocks drop (measured: a 1 GB copy read 2.4 TB/s
    # that way against 3.0 TB/s back to back).
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    for a, b in events:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) * 1e-3 / len(calls) for a, b in events]
    return statistics.median(times)


def time_calls_eager(calls: Sequence[Call], replays: int = 30, warmup: int = 3) -> float:
    """Median seconds per call of the closures in `calls`, each run eagerly between its own
    pair of CUDA events: the fallback for callables a CUDA graph cannot capture. Each
    sample includes that call's launch gaps (host time shows where it exceeds GPU time),
    so it reads higher than graph replay at few tokens."""
    for _ in range(warmup):
        for c in calls:
            c()
    torch.cuda.synchronize()
    events = []
    for _ in range(replays):
        for c in calls:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            c()
            b.record()
            events.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1e-3 for a, b in events)


def buffer_sets(bytes_per_set: int, min_total: int = GPU_BUFFERS_TOTAL, max_sets: int = 64) -> int:
    """How many buffer sets to rotate through so their total is several times L2."""
    return max(2, min(max_sets, -(-min_total // max(bytes_per_set, 1))))


def copy_bandwidth(nbytes: int = 1 << 28, sets: int = 4) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second: the best of
    rotating fp32 copies of a few sizes (a single 1 GB uint8 copy in a graph measured 20%
    below what the same-size rotating copies of the benchmark rows reach)."""
    best = 0.0
    for size in (nbytes // 4, nbytes):
        srcs = [torch.empty(size // 4, dtype=torch.float32, device="cuda") for _ in range(sets)]
        dst = torch.empty_like(srcs[0])
        t = time_calls([lambda s=s: dst.copy_(s) for s in srcs], replays=20)
        best = max(best, 2 * size / t)
    return best


class GpuTimer:
    """CUDA-graph replay (``graph``) or events around eager calls (``eager``)."""

    min_buffer_total = GPU_BUFFERS_TOTAL

    def __init__(self, replays: int):
        self.replays = replays

    def graph(self, calls: Sequence[Call]) -> float:
        return time_calls(calls, replays=self.replays)

    def eager(self, calls: Sequence[Call]) -> float:
        return time_calls_eager(calls, replays=self.replays)


class CpuTimer:
    """Dry run only: median wall time per call of a pass over `calls`."""

    min_buffer_total = 1 << 20  # no cache to defeat: the fewest sets (2), a quick dry run

    def __init__(self, replays: int):
        self.replays = replays

    def graph(self, calls: Sequence[Call]) -> float:
        for c in calls:
            c()
        times = []
        for _ in range(self.replays):
            t0 = time.perf_counter()
            for c in calls:
                c()
            times.append((time.perf_counter() - t0) / len(calls))
        return statistics.median(times)

    eager = graph


def cpu_copy_bandwidth() -> float:
    """Dry run: a host memory copy stands in for the device copy bandwidth."""
    src = torch.empty(1 << 26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / CpuTimer(5).graph([lambda: dst.copy_(src)])


def time_copy(nbytes: int, sets: int, timer, device: torch.device) -> float:
    """A torch device copy of `nbytes`, rotating over `sets` sources like the rows' buffers."""
    srcs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(sets)]
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return timer.graph([(lambda s=s: dst.copy_(s)) for s in srcs])


def time_with_fallback(calls: Sequence[Call], timer, device: torch.device,
                       eager_fallback: bool) -> tuple[float, str, str | None]:
    """(seconds per call, timing method, note): CUDA-graph replay, or, where allowed,
    eager calls between events when capture fails (the note says why)."""
    try:
        return timer.graph(calls), "cuda-graph", None
    except Exception as e:
        if not eager_fallback:
            raise
        capture_error = short_error(e)
    ensure_cuda_usable(device)
    seconds = timer.eager(calls)
    return seconds, "eager-loop", (f"CUDA-graph capture failed ({capture_error}); timed with "
                                   f"events around each eager call (includes launch gaps)")


def host_time_per_call(call: Call, calls: int, device: torch.device) -> tuple[float, float]:
    """Microseconds per call: (loop + final synchronize, loop alone), after a warm-up."""
    for _ in range(min(100, calls)):
        call()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    t1 = time.perf_counter()
    synchronize(device)
    t2 = time.perf_counter()
    return (t2 - t0) / calls * 1e6, (t1 - t0) / calls * 1e6


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ensure_cuda_usable(device: torch.device) -> None:
    """Raise FatalCuda when the context is gone (after a failure, before going on)."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
    except Exception as e:
        raise FatalCuda(short_error(e)) from e


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
