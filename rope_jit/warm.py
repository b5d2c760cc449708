"""Ahead-of-time cache warming: compile the specializations a model's RoPE calls will use,
for named archs, with no GPU present, into the disk cache the call path reads. On a GPU of
such an arch the first call then loads a kernel instead of compiling one.

Which specialization a call uses is the planner's decision: vector widths, heads per
batch and prefetching depend on the token count and on the GPU's SM count. Nothing here
restates those rules. ``specs_for_call`` describes a call the way the API would (its
``RopeCall`` and the ``ArrayDesc``s of q, k, positions and cache), runs ``plan.plan_rope``
on it over a sweep of token counts and SM counts, and collects the distinct specs the
planner returns. ``CallShape.plan_kwargs`` sets the call's other fields (``PLAN_ARGS``:
the on-the-fly scaling variant, mRoPE sections, the inverse rotation).

``warm`` compiles (spec, arch) pairs on a thread pool: NVRTC releases the GIL, so the
compiles run in parallel.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from . import jit
from . import plan as planner  # looked up at call time: tests and new planner versions swap it
from .arrays import ArrayDesc, contiguous_strides
from .call import INDPTR, POSITIONS, RopeCall, cache_call, frequencies_json, on_the_fly_call
from .dtypes import FLOAT_DTYPES, INDEX_DTYPES, ITEMSIZE
from .plan import RopeArrays

DEFAULT_MAX_TOKENS = 131072

# SM counts of the GPUs of each arch (vendor data sheets). The planner's choices depend on
# the SM count, so warming covers every count listed for the arch; archs not listed get
# ANY_SM_COUNTS. --sms overrides both.
SM_COUNTS = {
    "sm_70": (80,),                    # V100
    "sm_75": (40, 72),                 # T4, RTX 8000
    "sm_80": (108, 56),                # A100, A30
    "sm_86": (84, 82, 72, 28),         # A40/A6000, RTX 3090, A10, A2... (A16 per GPU 10)
    "sm_89": (142, 128, 58),           # L40/L40S, RTX 4090, L4
    "sm_90": (132, 114, 78),           # H100 SXM/H200/GH200, H100 PCIe, H20
    "sm_100": (148,),                  # B200
    "sm_120": (170, 188),              # RTX 5090, RTX PRO 6000
}
ANY_SM_COUNTS = (28, 58, 84, 108, 132, 148, 170)

# Public config.json values: q heads, kv heads, head size, rotary dim, NeoX (rotate_half)
# or GPT-J (interleaved) pairs. Heads are totals; --tp divides them.
MODELS = {
    "llama3-8b": dict(num_q_heads=32, num_kv_heads=8, head_size=128, rotary_dim=128, is_neox=True),
    "llama3-70b": dict(num_q_heads=64, num_kv_heads=8, head_size=128, rotary_dim=128, is_neox=True),
    "mistral-7b": dict(num_q_heads=32, num_kv_heads=8, head_size=128, rotary_dim=128, is_neox=True),
    "qwen2.5-7b": dict(num_q_heads=28, num_kv_heads=4, head_size=128, rotary_dim=128, is_neox=True),
    "gpt-j-6b": dict(num_q_heads=16, num_kv_heads=16, head_size=256, rotary_dim=64, is_neox=False),
    "phi-2": dict(num_q_heads=32, num_kv_heads=32, head_size=80, rotary_dim=32, is_neox=True),
    # MLA: the rope part of q per head and one shared rope key (qk_rope_head_dim 64)
    "deepseek-v3": dict(num_q_heads=128, num_kv_heads=1, head_size=64, rotary_dim=64, is_neox=False),
}

# Rows of cos/sin in the synthetic cache; its length changes no specialization.
_CACHE_ROWS = 4096
# Synthetic base addresses, 256-byte aligned like every CUDA allocation: alignment is all
# the planner reads of a pointer.
_BASE = {"q": 1 << 32, "k": 2 << 32, "positions": 3 << 32, "offsets": 4 << 32, "cache": 5 << 32}


# On-the-fly kernel variants (specs.SCALINGS) and a HuggingFace dict of each: the compiled
# kernel depends on the variant only, not on its parameter values.
SCALING_EXAMPLES = {
    "linear": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}
# CallShape.plan_kwargs names: RopeCall fields, and the on-the-fly scaling variant.
PLAN_ARGS = ("scaling", "mrope_section", "mrope_interleaved", "inverse")


class WarmError(RuntimeError):
    """Warming cannot do its job (the cache directory cannot be written)."""


@dataclass(frozen=True)
class CallShape:
    """One way a model calls RoPE: everything the planner sees except the token count.

    cache_dtype None: cos/sin on the fly (FlashInfer's entry points: [tokens, heads,
    head_size] arrays, head size from the last dim); otherwise a [max_position,
    rotary_dim] cache (vLLM's entry points: [tokens, heads * head_size] arrays).
    num_kv_heads 0: key is None. fused_qkv: q and k are column slices of one
    [tokens, (q + 2 kv heads) * head_size] buffer, as vLLM passes them. plan_kwargs: further
    plan_rope keyword arguments as sorted (name, value) pairs (hashable); a non-None
    ``mrope_section`` there makes positions [3, tokens], as mRoPE callers pass them.
    """

    num_q_heads: int
    num_kv_heads: int
    head_size: int
    rotary_dim: int | None = None
    dtype: str = "bfloat16"
    cache_dtype: str | None = "float32"
    is_neox: bool = True
    index_dtype: str = "int64"
    indptr: bool = False
    inplace: bool = True
    fused_qkv: bool = False
    plan_kwargs: tuple = ()

    def __post_init__(self):
        if isinstance(self.plan_kwargs, dict):
            object.__setattr__(self, "plan_kwargs", tuple(sorted(self.plan_kwargs.items())))

    def words(self) -> str:
        cs = f"{self.cache_dtype} cache" if self.cache_dtype else "on the fly"
        extra = "".join(f" {k}={v}" for k, v in self.plan_kwargs)
        return (f"{self.num_q_heads}/{self.num_kv_heads} heads x {self.head_size} "
                f"(rotary {self.rotary_dim or self.head_size}) {self.dtype} "
                f"{'neox' if self.is_neox else 'gptj'} {cs} "
                f"{'indptr+offsets' if self.indptr else 'positions'} {self.index_dtype} "
                f"{'in-place' if self.inplace else 'out-of-place'}"
                f"{' fused-qkv' if self.fused_qkv else ''}{extra}")


# ------------------------------------------------------------------ describing a call

def _desc(name: str, shape: tuple, dtype: str, strides: tuple | None = None,
          offset_bytes: int = 0) -> ArrayDesc:
    strides = contiguous_strides(shape) if strides is None else strides
    return ArrayDesc(_BASE[name] + offset_bytes, shape, strides, dtype, device=0)


def _heads_desc(call: CallShape, which: str, heads: int, num_tokens: int) -> ArrayDesc:
    """q or k as the API's caller passes it: [T, H*D] with a cache, [T, H, D] on the fly;
    a column slice of the fused QKV buffer when fused_qkv."""
    d = call.head_size
    row = (call.num_q_heads + 2 * call.num_kv_heads) * d if call.fused_qkv else heads * d
    offset = call.num_q_heads * d * ITEMSIZE[call.dtype] if call.fused_qkv and which == "k" else 0
    base = "q" if call.fused_qkv else which
    if call.cache_dtype is None:
        return _desc(base, (num_tokens, heads, d), call.dtype, (row, d, 1), offset)
    return _desc(base, (num_tokens, heads * d), call.dtype, (row, 1), offset)


def _position_kwargs(call: CallShape, num_tokens: int) -> dict:
    if call.indptr:  # one sequence of num_tokens tokens
        return {"indptr": _desc("positions", (2,), call.index_dtype),
                "offsets": _desc("offsets", (1,), call.index_dtype)}
    mrope = dict(call.plan_kwargs).get("mrope_section") is not None
    shape = (3, num_tokens) if mrope else (num_tokens,)
    return {"positions": _desc("positions", shape, call.index_dtype)}


def rope_call(call: CallShape) -> RopeCall:
    """The RopeCall the API builds for `call`. ValueError naming an unknown plan_kwargs
    name or an unknown scaling variant."""
    extra = dict(call.plan_kwargs)
    unknown = sorted(set(extra) - set(PLAN_ARGS))
    if unknown:
        raise ValueError(f"plan_kwargs: unknown {', '.join(unknown)}; expected "
                         f"{', '.join(PLAN_ARGS)}")
    scaling = extra.pop("scaling", "linear")
    if scaling not in SCALING_EXAMPLES:
        raise ValueError(f"scaling: expected one of {', '.join(SCALING_EXAMPLES)}, got {scaling!r}")
    convention = INDPTR if call.indptr else POSITIONS
    if call.cache_dtype is None:
        rc = on_the_fly_call(convention, call.rotary_dim or call.head_size, not call.is_neox,
                             call.inplace, frequencies_json(rope_scaling=SCALING_EXAMPLES[scaling]))
    else:  # a cache holds whatever variant built it: its kernels are the same for every one
        rc = cache_call(call.head_size, call.is_neox, call.inplace)._replace(convention=convention)
    if extra.get("mrope_section") is not None:
        extra["mrope_section"] = tuple(extra["mrope_section"])
    return rc._replace(**extra)


def plan_call(call: CallShape, num_tokens: int, num_sms: int, tuning=None):
    """The planner's plan for `call` at `num_tokens` tokens on a GPU of `num_sms` SMs.
    Raises the planner's TypeError/ValueError for a call it refuses."""
    rot = call.rotary_dim or call.head_size
    fly = call.cache_dtype is None
    q = _heads_desc(call, "q", call.num_q_heads, num_tokens)
    k = _heads_desc(call, "k", call.num_kv_heads, num_tokens) if call.num_kv_heads else None
    arrays = RopeArrays(
        q, k, cos_sin_cache=None if fly else _desc("cache", (_CACHE_ROWS, rot), call.cache_dtype),
        **_position_kwargs(call, num_tokens))
    return planner.plan_rope(rope_call(call), arrays, num_sms=num_sms,
                             tuning=tuning or planner.DEFAULT_TUNING)


def token_counts(max_tokens: int) -> list[int]:
    """1..64 one by one, then steps of at most 4% up to max_tokens, plus every power of two
    and its neighbours: dense enough that no specialization the planner switches to over
    this range is skipped (tests check it against every count)."""
    counts = set(range(1, min(64, max_tokens) + 1))
    n = 64
    while n < max_tokens:
        n = max(n + 1, int(n * 1.04))
        counts.add(min(n, max_tokens))
    p = 1
    while p <= max_tokens:
        counts.update(n for n in (p - 1, p, p + 1) if 1 <= n <= max_tokens)
        p *= 2
    counts.add(max_tokens)
    return sorted(counts)


def sm_counts_for(arch: str) -> tuple:
    return SM_COUNTS.get(jit.arch_name(arch), ANY_SM_COUNTS)


def specs_for_call(call: CallShape, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                   sm_counts=ANY_SM_COUNTS, knobs=None) -> list:
    """The distinct specs the planner picks for `call` over 1..max_tokens tokens, the given
    SM counts and dispatch knobs (``tuning.knob_choices()``: defaults, built-in sets and
    stored tuned tables), in the order first met."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive token count, got {max_tokens}")
    check_call_dtypes(call)
    found: dict = {}
    for tuning in knobs or [planner.DEFAULT_TUNING]:
        for sms in sm_counts:
            for n in token_counts(max_tokens):
                spec = plan_call(call, n, sms, tuning).spec
                if spec is not None:  # None: no heads, nothing to launch
                    found.setdefault(spec, None)
    return list(found)


# ------------------------------------------------------------------ model shapes

def heads_per_rank(num_q_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """Heads one GPU holds under tensor parallelism of `tp` ranks: q heads split evenly;
    kv heads split, or replicated to one per rank when there are fewer than ranks (vLLM)."""
    if tp < 1:
        raise ValueError(f"tp: expected a positive number of ranks, got {tp}")
    if num_q_heads % tp:
        raise ValueError(f"tp: {num_q_heads} q heads do not split over {tp} ranks")
    if num_kv_heads >= tp and num_kv_heads % tp:
        raise ValueError(f"tp: {num_kv_heads} kv heads do not split over {tp} ranks")
    return num_q_heads // tp, (max(1, num_kv_heads // tp) if num_kv_heads else 0)


def model_call(model: str, *, tp: int = 1, **overrides) -> CallShape:
    """A CallShape of a preset model (MODELS) per rank of `tp`; overrides set any field."""
    try:
        base = MODELS[model]
    except KeyError:
        raise ValueError(f"model: unknown {model!r}; known: {', '.join(MODELS)}") from None
    nq, nk = heads_per_rank(base["num_q_heads"], base["num_kv_heads"], tp)
    return replace(CallShape(**{**base, "num_q_heads": nq, "num_kv_heads": nk}), **overrides)


def check_call_dtypes(call: CallShape) -> None:
    """The planner reports dtypes too, but in terms of arrays ('query: expected dtype...');
    a warming user named them as options."""
    if call.dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(FLOAT_DTYPES)}, got {call.dtype!r}")
    if call.cache_dtype is not None and call.cache_dtype not in FLOAT_DTYPES:
        raise ValueError(f"cache dtype: expected one of {', '.join(FLOAT_DTYPES)} or on the fly, "
                         f"got {call.cache_dtype!r}")
    if call.index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index dtype: expected one of {', '.join(INDEX_DTYPES)}, "
                         f"got {call.index_dtype!r}")


# ------------------------------------------------------------------ compiling

@dataclass(frozen=True)
class WarmedItem:
    spec: object
    arch: str
    origin: str        # jit.COMPILED, or jit.FROM_DISK: it was cached already
    seconds: float


@dataclass
class WarmReport:
    items: list
    seconds: float

    @property
    def compiled(self) -> int:
        return sum(i.origin == jit.COMPILED for i in self.items)

    @property
    def already_cached(self) -> int:
        return len(self.items) - self.compiled


def check_archs(archs) -> list[str]:
    """'sm_NN' names of `archs`, each one this NVRTC compiles for (ValueError otherwise)."""
    names = [jit.arch_name(a) for a in archs]
    supported = jit.supported_archs()
    for a in names:
        if a not in supported:
            raise ValueError(f"arch: NVRTC {jit.nvrtc_version()} cannot compile for {a}; "
                             f"it supports {', '.join(supported)}")
    return list(dict.fromkeys(names))


def default_jobs() -> int:
    """CPUs this process may use, at most 16 (each NVRTC compile holds a few hundred MB)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def warm(specs, archs, *, jobs: int | None = None, on_done=None) -> WarmReport:
    """Compile every spec for every arch into the disk cache (entries already there are
    verified and kept). on_done(WarmedItem) is called as each finishes (progress bars).
    Raises WarmError if the cache directory cannot be written and an entry is missing
    from it (all there: they are verified, nothing is written), ValueError for an arch
    NVRTC does not support, CompileError if a kernel does not compile (the first failure
    stops the run)."""
    archs = check_archs(archs)
    work = [(spec, arch) for arch in archs for spec in dict.fromkeys(specs)]
    _require_writable_or_cached(work)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs or default_jobs()) as pool:
        futures = [pool.submit(_warm_one, spec, arch, on_done) for spec, arch in work]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in pending:
            fut.cancel()
    failed = [f for f in futures if f.done() and not f.cancelled() and f.exception()]
    if failed:
        raise failed[0].exception()
    return WarmReport([f.result() for f in futures], time.perf_counter() - t0)


def _require_writable_or_cached(work) -> None:
    """WarmError if the cache directory cannot be written and some (spec, arch) of `work`
    has no intact entry there. A read-only directory that holds them all (a pre-warmed
    cache) is fine: there is nothing to write."""
    reason = jit.unwritable_reason()
    if reason is None:
        return
    cached = {e.key for e in jit.cache_entries() if e.intact}
    missing = sum(jit.binary_key(spec.render(), arch) not in cached for spec, arch in work)
    if missing:
        raise WarmError(f"cache directory {jit.cache_dir()} is not writable ({reason}) and "
                        f"{missing} of {len(work)} kernels are not cached there; set "
                        f"{jit.ENV_CACHE_DIR} to a writable directory")


def _warm_one(spec, arch: str, on_done) -> WarmedItem:
    t0 = time.perf_counter()
    _, origin = jit.build_entry(spec, arch, use_memory=False)
    item = WarmedItem(spec, arch, origin, time.perf_counter() - t0)
    if on_done is not None:
        on_done(item)
    return item
