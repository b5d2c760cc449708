"""Measure dispatch knobs on the present GPU and keep the winners (``rope-jit tune``).

For each call shape (a ``warm.CallShape``: heads, head size, dtypes, style, cache or on
the fly) and each token bucket (powers of two), the tuner times candidate ``plan.Tuning``
values through the real call path (``launch.run_rope`` with ``tuning=`` passed in, CuPy
arrays on the current device) and keeps the fastest in this GPU's ``TuningTable`` beside
the compiled kernels (``rope_jit.tuning``). Later calls of that shape class and bucket use
it; nothing is measured during a call unless ``ROPE_JIT_AUTOTUNE=1``.

Search: coordinate descent from the knobs the call would get today (tuned entry, built-in
or default): each knob in turn takes each of its candidate values with the others fixed;
the best is kept; a second round runs if anything moved. Timing: a CUDA graph of launches
over rotating q/k buffers (several times the L2 in total, so each launch reads from DRAM as
a real step would), replayed several times; the median launch time counts, and a candidate
must beat the incumbent by more than ``MIN_GAIN`` to replace it, so near-ties keep the
incumbent and two runs agree within the measurement noise.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from . import launch, warm
from ._cuda import cupy_module
from .dtypes import numpy_dtype
from .plan import Tuning
from .tuning import DeviceTuning, TuningTable, set_autotuner, table_for, token_bucket

# Candidate values of each knob, in search order (rope_jit.plan.Tuning documents them).
KNOBS = {
    "small_waves": (0.0, 0.5, 1.0, 2.0),
    "head_batch": (1, 2, 4),
    "fill_waves": (1.0, 2.0, 4.0, 8.0),
    "fill_waves_fly": (1.0, 2.0, 4.0, 8.0),
    "block": (128, 256, 512),
    # down to one head row a block (8 threads: Llama's chunks): decode spreads over more SMs
    "small_block": (8, 16, 32, 64, 128, 256, 512),
    "small_block_fly": (16, 32, 64, 128, 256, 512),
    "prefetch": (True, False),
    "min_blocks": (1, 2),
    # the few-token code path off or on against the regime rule (measured on the H200: 8%
    # slower to 5% faster at 1024 tokens, depending on the shape)
    "few_tokens": (None, False, True),
    # shorter chunks in the head-parallel regime (0: the widest aligned access)
    "few_vec": (0, 4, 2),
}
MIN_GAIN = 0.01          # a candidate must be 1% faster than the incumbent to replace it
L2_MULTIPLE = 4          # rotating buffers total at least this many L2 sizes
LAUNCHES_PER_GRAPH = 20
REPLAYS = 7


@dataclass
class Measured:
    shape: object
    bucket: int
    tuning: Tuning
    us: float            # the winner's median launch time
    start_us: float      # the knobs the call had before tuning
    candidates: int      # distinct kernels and launches measured


def _relevant(knob: str, on_the_fly: bool) -> bool:
    """Knobs the other mode never reads are not searched."""
    if knob in ("fill_waves_fly", "small_block_fly"):
        return on_the_fly
    if knob in ("fill_waves", "small_block"):
        return not on_the_fly
    return True


def _random(rng, shape, dtype: str):
    """Normal random values of a float dtype on the device (never zeros: real data moves
    differently through the memory system). bfloat16 is the upper half of an fp32, written
    through a uint16 view (CuPy has no bfloat16 arithmetic)."""
    cp = cupy_module()
    x = rng.standard_normal(shape, dtype="float32")
    if dtype != "bfloat16":
        return x.astype(numpy_dtype(dtype))
    out = cp.empty(shape, dtype=numpy_dtype("bfloat16"))
    out.view(cp.uint16)[...] = (x.view(cp.uint32) >> 16).astype(cp.uint16)
    return out


class _Bench:
    """Rotating CuPy buffers of one call shape at one token count, and a timer."""

    def __init__(self, call: warm.CallShape, num_tokens: int, device: int, seed: int = 0):
        cp = cupy_module()
        self.cp, self.call, self.T = cp, call, num_tokens
        self.rope_call = warm.rope_call(call)
        d = call.head_size
        fly = call.cache_dtype is None
        per_set = (num_tokens * (call.num_q_heads + call.num_kv_heads) * d
                   * numpy_dtype(call.dtype).itemsize)
        l2 = cp.cuda.Device(device).attributes["L2CacheSize"]
        n_sets = max(2, min(64, -(-L2_MULTIPLE * l2 // max(per_set, 1))))
        rng = cp.random.default_rng(seed)
        shape = (lambda h: (num_tokens, h, d)) if fly else (lambda h: (num_tokens, h * d))
        self.sets = []
        for _ in range(n_sets):
            q = _random(rng, shape(call.num_q_heads), call.dtype)
            k = _random(rng, shape(call.num_kv_heads), call.dtype) if call.num_kv_heads else None
            self.sets.append((q, k))
        rot = call.rotary_dim or d
        index = numpy_dtype(call.index_dtype)
        if call.indptr:
            self.arrays = dict(indptr=cp.asarray([0, num_tokens], dtype=index),
                               offsets=cp.asarray([7], dtype=index))
        else:
            self.arrays = dict(positions=rng.integers(0, 65536, num_tokens).astype(index))
        if not fly:
            self.arrays["cache"] = _random(rng, (65536, rot), call.cache_dtype)

    def plan(self, tuning):
        """The plan this call gets with `tuning` (knobs, or a ShapeClass -> Tuning lookup)."""
        q, k = self.sets[0]
        return launch.plan_of(self.rope_call, q, k, **self.arrays, tuning=tuning)

    def time_us(self, tuning: Tuning) -> float:
        """Median launch time of `tuning` (microseconds)."""
        cp = self.cp
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            for q, k in self.sets[:2]:  # plan, compile and load outside the capture
                launch.run_rope(self.rope_call, q, k, **self.arrays, tuning=tuning)
            stream.synchronize()
            stream.begin_capture()
            for i in range(LAUNCHES_PER_GRAPH):
                q, k = self.sets[i % len(self.sets)]
                launch.run_rope(self.rope_call, q, k, **self.arrays, tuning=tuning)
            graph = stream.end_capture()
            graph.launch()  # warm-up
            times = []
            for _ in range(REPLAYS):
                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                graph.launch()
                end.record()
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / LAUNCHES_PER_GRAPH)
        times.sort()
        return times[len(times) // 2]


def tune_call(call: warm.CallShape, num_tokens: int, *, device: int = 0,
              deadline: float | None = None) -> Measured:
    """Coordinate descent over KNOBS for one call shape and token count, from the knobs
    the call gets today (tuned entry, built-in or default)."""
    bench = _Bench(call, num_tokens, device)
    fly = call.cache_dtype is None
    today = bench.plan(DeviceTuning(device))
    start = today.tuning

    def kernel_of(t: Tuning) -> tuple:
        p = bench.plan(t)
        return p.spec, p.launch

    # Knobs that plan the same kernel and launch share one measurement: such a candidate
    # cannot win on timing noise (decode buckets, where several knobs change nothing).
    best, best_us = start, bench.time_us(start)
    start_us, tried, measured = best_us, {start}, {kernel_of(start): best_us}
    for _round in range(2):
        moved = False
        for knob, values in KNOBS.items():
            if not _relevant(knob, fly):
                continue
            for v in values:
                if deadline is not None and time.monotonic() > deadline:
                    break
                cand = dataclasses.replace(best, **{knob: v})
                if cand in tried:
                    continue
                tried.add(cand)
                kernel = kernel_of(cand)
                if kernel in measured:
                    continue
                us = measured[kernel] = bench.time_us(cand)
                if us < best_us * (1 - MIN_GAIN):
                    best, best_us, moved = cand, us, True
        if not moved:
            break
    return Measured(today.shape, token_bucket(num_tokens), best, best_us, start_us, len(measured))


def changed_knobs(t: Tuning) -> str:
    """The knobs of `t` that differ from the defaults, in words ('head_batch=1 block=512')."""
    base = Tuning()
    return " ".join(f"{f.name}={getattr(t, f.name)}" for f in dataclasses.fields(t)
                    if getattr(t, f.name) != getattr(base, f.name))


def tune(calls, token_counts, *, device: int = 0, max_seconds: float | None = None,
         on_done=None) -> TuningTable:
    """Tune every call shape at every token count on `device` (token counts are rounded up
    to their bucket) and save the winners in its table. on_done(Measured) after each. Stops
    starting new measurements after max_seconds; what was measured is kept."""
    cp = cupy_module()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    with cp.cuda.Device(device):
        table = table_for(device)
        for call in calls:
            for n in sorted({token_bucket(t) for t in token_counts}):
                if deadline is not None and time.monotonic() > deadline:
                    break
                m = tune_call(call, n, device=device, deadline=deadline)
                table.put(m.shape, m.bucket, m.tuning, us=round(m.us, 3),
                          start_us=round(m.start_us, 3), candidates=m.candidates)
                if on_done is not None:
                    on_done(m)
        table.save()
    launch.clear_caches()  # plans made before see the new entries
    return table


def autotune(device: int, shape, bucket: int) -> Tuning | None:
    """ROPE_JIT_AUTOTUNE=1: measure a missing (shape class, bucket) entry on a plan miss.
    Costs seconds once per entry; the table is saved for later processes."""
    call = warm.CallShape(
        num_q_heads=shape.num_heads, num_kv_heads=0, head_size=shape.head_size,
        rotary_dim=shape.rotary_dim, dtype=shape.dtype,
        cache_dtype=None if shape.cos_sin == "on-the-fly" else shape.cos_sin,
        is_neox=shape.neox, inplace=shape.inplace)
    m = tune_call(call, bucket, device=device)
    table = table_for(device)
    table.put(shape, bucket, m.tuning, us=round(m.us, 3), start_us=round(m.start_us, 3),
              candidates=m.candidates)
    try:
        table.save()
    except OSError:  # a read-only cache: keep the entry for this process
        pass
    return m.tuning


set_autotuner(autotune)
