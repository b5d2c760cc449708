"""GPU timing by CUDA-graph replay with rotating buffers (shared by the benchmark scripts).

Each call closure works on its own buffer set; one graph holds one call per set, so a
replay walks through all of them (sizing the sets past L2 keeps the cache from
flattering the numbers) and launch gaps are those of graph replay. Time per call is the
replay time over the number of calls: CUDA events, warm-up, median of many replays.
"""
from __future__ import annotations

import statistics

import torch


def time_calls(calls, replays: int = 30, warmup: int = 3) -> float:
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


def time_calls_eager(calls, replays: int = 30, warmup: int = 3) -> float:
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


def buffer_sets(bytes_per_set: int, min_total: int = 1 << 29, max_sets: int = 64) -> int:
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
