"""Property-based tests (hypothesis) of the public API on a machine with no GPU (SPEC
sections 2, 3 and 7), and the strategies tests/test_gpu_properties.py runs on the GPU.

A drawn case (``RopeCase``) is one random valid call: entry point, dtype, head size,
rotary dim (full, partial, odd-looking), q and k head counts (k may be None), token
count (0 and 1 included), [tokens] or [batch, seq] tokens, 2-D or 3-D layout, q and k as
strided views of one fused buffer (token stride larger than the row, a non-zero offset
into it, padded head strides), positions or indptr + offsets, int32/int64, strided
positions, NeoX or GPT-J, a cos/sin cache of any float dtype (strided rows, some
positions outside it) or cos/sin on the fly (plain, rope_scale, Llama 3.1). ``build``
makes the arrays on any torch device; a ``Mutation`` turns the call into an invalid one.

Here, without a GPU:

* calls on meta tensors go through the torch.library op, whose fake implementation runs
  the planner's validation of a real call and gives outputs of the right shape (README
  "Frameworks"): every drawn valid call is accepted; every invalid mutation raises
  TypeError/ValueError whose message names the argument;
* host (CPU) tensors, mutated or not, raise TypeError/ValueError naming an argument and
  stay untouched;
* positions_from_offsets on host arrays: valid ragged batches give the reference's
  positions; invalid ones raise naming indptr or offsets.

The number of cases each test ran is printed in pytest's terminal summary.
"""

from __future__ import annotations

import collections
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
               "float64": torch.float64, "int32": torch.int32, "int64": torch.int64,
               "int16": torch.int16}

# ================================================================== reporting the case counts


class CaseCounts:
    """Examples each property test ran, printed in pytest's terminal summary (also under
    -q) by the plugin hook below, registered by the autouse fixture of each module."""

    def __init__(self):
        self.counts = collections.Counter()

    def add(self, what: str) -> None:
        self.counts[what] += 1

    def pytest_terminal_summary(self, terminalreporter):
        if not self.counts:
            return
        terminalreporter.write_sep("-", f"hypothesis cases run: {sum(self.counts.values())}")
        for what, n in sorted(self.counts.items()):
            terminalreporter.write_line(f"{n:6d}  {what}")


COUNTS = CaseCounts()


@pytest.fixture(autouse=True, scope="session")
def report_case_counts(request):
    manager = request.config.pluginmanager
    if not manager.is_registered(COUNTS):
        manager.register(COUNTS, "rope_jit_property_case_counts")
    yield


def property_settings(max_examples: int, *, shrink: bool = True):
    """Hypothesis settings of these tests: `max_examples` scaled by the environment
    variable ROPE_JIT_PROPERTY_SCALE (default 1; longer campaigns), no deadline (a first
    call compiles), no example database (nothing written into the checkout), and no
    shrinking where a device budget is at stake (each shrink step would compile)."""
    scale = float(os.environ.get("ROPE_JIT_PROPERTY_SCALE", "1"))
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=max(1, int(max_examples * scale)), deadline=None,
                    database=None, phases=phases, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


# ================================================================== entry points


@dataclass(frozen=True)
class Entry:
    name: str
    cache: bool        # cos/sin from a cos_sin_cache (else on the fly)
    inplace: bool
    indptr: bool       # indptr + offsets (else one position per token)
    llama31: bool = False

    def param(self, role: str) -> str:
        """This entry point's parameter name for a role (vLLM's names with a cache,
        FlashInfer's on the fly)."""
        if self.cache:
            return {"query": "query", "key": "key", "positions": "positions",
                    "style": "is_neox"}[role]
        return {"query": "q", "key": "k", "positions": "pos_ids", "style": "interleave"}[role]


ENTRIES = {e.name: e for e in [
    Entry("apply_rope_inplace_with_cache", True, True, False),
    Entry("apply_rope_with_cos_sin_cache", True, False, False),
    Entry("apply_rope_with_cos_sin_cache_inplace", True, True, False),
    Entry("apply_rope", False, False, True),
    Entry("apply_rope_inplace", False, True, True),
    Entry("apply_rope_pos_ids", False, False, False),
    Entry("apply_rope_pos_ids_inplace", False, True, False),
    Entry("apply_llama31_rope", False, False, True, True),
    Entry("apply_llama31_rope_inplace", False, True, True, True),
    Entry("apply_llama31_rope_pos_ids", False, False, False, True),
    Entry("apply_llama31_rope_pos_ids_inplace", False, True, False, True),
]}

# Synonyms a message may use for an argument (the vLLM and FlashInfer names of one thing).
SYNONYMS = {"query": ("query", "q"), "q": ("query", "q"), "key": ("key", "k"),
            "k": ("key", "k"), "positions": ("positions", "pos_ids"),
            "pos_ids": ("positions", "pos_ids")}


def names_argument(message: str, names) -> bool:
    """True if `message` contains one of `names` (or a synonym) as a whole word."""
    alternatives = {s for n in names for s in SYNONYMS.get(n, (n,))}
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message)
               for n in alternatives)


# ================================================================== valid calls


@dataclass(frozen=True)
class RopeCase:
    """One valid call, before any array exists (``build`` makes them)."""

    entry: str
    dtype: str
    head_size: int
    rotary_dim: int
    explicit_rotary_dim: bool   # on the fly, full rotation: rotary_dim=head_size, not None
    num_q_heads: int
    num_k_heads: int            # 0: key=None
    token_shape: tuple          # (num_tokens,) or (batch, seq)
    layout: str                 # "2d": [tokens..., heads * head_size]; "3d": [tokens..., heads, head_size]
    head_stride: int            # elements from one head to the next (head_size in 2d)
    row_lead: int               # elements of each fused row before q: q starts inside the buffer
    row_pad: int                # elements of each row after k: token stride > q + k row
    batch_gap: int              # unused rows between batches of [batch, seq] tokens
    index_dtype: str
    position_step: int          # positions are a view with this element stride
    is_neox: bool
    cache_dtype: str | None     # None: on the fly
    cache_pad: int              # cache rows are rotary_dim + cache_pad apart
    max_position: int           # cache rows; on the fly: positions drawn below this
    out_of_range: bool          # cache: some positions outside [0, max_position)
    request_bounds: tuple       # indptr + offsets: indptr's entries
    rope_theta: float
    rope_scale: float
    llama31: tuple | None       # (low_freq_factor, high_freq_factor, old_context_len)
    seed: int

    @property
    def spec(self) -> Entry:
        return ENTRIES[self.entry]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.token_shape)


# 64 and 128 (most models) twice as often
HEAD_SIZES = (2, 6, 7, 8, 16, 20, 32, 33, 34, 48, 64, 64, 80, 96, 112, 128, 128, 160, 192, 256, 512)
NAMED_ROTARY_DIMS = (2, 6, 20, 32, 64, 80, 128)
LLAMA31_PARAMS = ((1.0, 4.0, 8192), (2.0, 8.0, 4096))


@st.composite
def rope_cases(draw, entries=None, max_elements: int = 1 << 21, require_key: bool = False,
               require_tokens: bool = False):
    """A valid call of one of `entries` (default: all). `max_elements` bounds the q and k
    elements (the float64 reference runs on the host); `require_key`: key is not None;
    `require_tokens`: at least one token."""
    names = sorted(entries or ENTRIES)
    with_cache = [n for n in names if ENTRIES[n].cache]
    on_the_fly = [n for n in names if not ENTRIES[n].cache]
    # cache and on-the-fly calls equally often (there are 3 cache entry points, 8 on the fly)
    groups = [g for g in (with_cache, on_the_fly) if g]
    entry = ENTRIES[draw(st.sampled_from(draw(st.sampled_from(groups))))]
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    head_size = draw(st.sampled_from(HEAD_SIZES))
    kind = draw(st.sampled_from(["full", "full", "named", "random"]))
    if kind == "full" and head_size % 2 == 0:
        rotary_dim = head_size
    elif kind == "named":
        rotary_dim = draw(st.sampled_from([r for r in NAMED_ROTARY_DIMS if r <= head_size]))
    else:
        rotary_dim = 2 * draw(st.integers(1, head_size // 2))
    hq = draw(st.integers(1, 8))
    hk = draw(st.integers(1 if require_key else 0, 4))
    layout = "3d" if not entry.cache else draw(st.sampled_from(["2d", "3d"]))
    head_stride = head_size + (draw(st.sampled_from([0, 0, 0, 2, 8, 13])) if layout == "3d" else 0)

    size = draw(st.sampled_from(["zero", "one", "few", "few", "some", "some", "many"]))
    if require_tokens and size == "zero":
        size = "one"
    num_tokens = {"zero": st.just(0), "one": st.just(1), "few": st.integers(2, 40),
                  "some": st.integers(41, 700), "many": st.integers(701, 6000)}[size]
    num_tokens = draw(num_tokens)
    per_token = (hq + hk) * head_size
    if num_tokens > 1:
        num_tokens = max(1, min(num_tokens, max_elements // per_token))
    token_shape = (num_tokens,)
    if not entry.indptr and num_tokens and draw(st.integers(0, 3)) == 0:
        batch = draw(st.integers(1, 4))
        token_shape = (batch, -(-num_tokens // batch))
    elif not entry.indptr and num_tokens == 0 and draw(st.booleans()):
        token_shape = (draw(st.integers(0, 3)), 0)

    cache_dtype = draw(st.sampled_from(FLOAT_DTYPES)) if entry.cache else None
    if entry.cache:
        max_position = draw(st.sampled_from([1, 7, 64, 4096]))
    else:
        max_position = draw(st.sampled_from([4096, 1 << 20]))
    request_bounds = ()
    if entry.indptr:
        t = token_shape[0]
        cuts = draw(st.lists(st.integers(0, t), min_size=0, max_size=4))
        request_bounds = (0, *sorted(cuts), t)
    llama31 = draw(st.sampled_from(LLAMA31_PARAMS)) if entry.llama31 else None
    if entry.llama31:
        rope_scale = draw(st.sampled_from([8.0, 16.0]))
    else:
        rope_scale = draw(st.sampled_from([1.0, 1.0, 2.0, 8.0]))
    return RopeCase(
        entry=entry.name, dtype=dtype, head_size=head_size, rotary_dim=rotary_dim,
        explicit_rotary_dim=draw(st.booleans()), num_q_heads=hq, num_k_heads=hk,
        token_shape=token_shape, layout=layout, head_stride=head_stride,
        row_lead=draw(st.sampled_from([0, 0, 1, 8, 24])),
        row_pad=draw(st.sampled_from([0, 0, 3, 16])),
        batch_gap=draw(st.sampled_from([0, 1])) if len(token_shape) == 2 else 0,
        index_dtype=draw(st.sampled_from(["int32", "int64"])),
        position_step=1 if entry.indptr else draw(st.sampled_from([1, 1, 2])),
        is_neox=draw(st.booleans()), cache_dtype=cache_dtype,
        cache_pad=draw(st.sampled_from([0, 0, 2, 6])) if entry.cache else 0,
        max_position=max_position,
        out_of_range=entry.cache and draw(st.integers(0, 3)) == 0,
        request_bounds=request_bounds,
        rope_theta=draw(st.sampled_from([1e4, 5e5, 1e6])), rope_scale=rope_scale,
        llama31=llama31, seed=draw(st.integers(0, 2**31 - 1)))


@dataclass
class BuiltCall:
    """A case's arrays on one torch device and the keyword arguments of its call."""

    case: RopeCase
    device: torch.device
    buffer: torch.Tensor                  # the fused rows q and k are views of (1-D)
    query: torch.Tensor
    key: torch.Tensor | None
    token_positions: np.ndarray           # position of each token, token_shape, int64
    positions: torch.Tensor | None        # the positions argument (or None: indptr mode)
    indptr: torch.Tensor | None
    offsets: torch.Tensor | None
    cache: torch.Tensor | None
    kwargs: dict
    generator: torch.Generator = field(repr=False, default=None)

    @property
    def fn(self) -> Callable:
        return getattr(rope_jit, self.case.entry)

    def call(self, kwargs: dict | None = None):
        return self.fn(**(self.kwargs if kwargs is None else kwargs))

    def random_float(self, shape, dtype) -> torch.Tensor:
        """Fresh standard-normal values of `dtype` on this call's device."""
        return random_normal(shape, dtype, self.device, self.generator)

    def random_int(self, shape, high: int, dtype) -> torch.Tensor:
        if self.device.type == "meta":
            return torch.empty(tuple(shape), dtype=TORCH_DTYPE[dtype], device=self.device)
        t = torch.randint(0, max(1, high), tuple(shape), generator=self.generator)
        return t.to(device=self.device, dtype=TORCH_DTYPE[dtype])


def random_normal(shape, dtype: str, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Standard-normal values drawn on the host from `gen`, then moved to `device`; meta
    tensors have no values, so none are drawn for them."""
    if device.type == "meta":
        return torch.empty(tuple(shape), dtype=TORCH_DTYPE[dtype], device=device)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=TORCH_DTYPE[dtype])


def _out_of_range_values(max_position: int, index_dtype: str) -> list:
    big = 2**31 - 1 if index_dtype == "int32" else 2**40
    return [-1, -max_position - 3, max_position, max_position + 5, big, -big]


def token_positions(case: RopeCase, rng: np.random.Generator) -> tuple:
    """(positions of the tokens [token_shape] int64, offsets or None)."""
    if case.spec.indptr:
        t = case.num_tokens
        offsets = rng.integers(0, max(1, case.max_position - t), len(case.request_bounds) - 1)
        pos = reference.positions_from_offsets(np.array(case.request_bounds, np.int64),
                                               offsets.astype(np.int64))
        return pos.astype(np.int64), offsets
    pos = rng.integers(0, case.max_position, case.token_shape).astype(np.int64)
    if case.out_of_range and pos.size:
        flat = pos.reshape(-1)
        picks = rng.choice(flat.size, max(1, flat.size // 8), replace=False)
        flat[picks] = rng.choice(_out_of_range_values(case.max_position, case.index_dtype),
                                 picks.size)
    return pos, None


def build(case: RopeCase, device) -> BuiltCall:
    """The arrays of `case` on `device` (any torch device: cuda, cpu, meta): q and k are
    views of one flat buffer of random values with the case's strides and offsets."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(case.seed)
    rng = np.random.default_rng(case.seed)
    D, hq, hk = case.head_size, case.num_q_heads, case.num_k_heads
    hs = case.head_stride
    row = case.row_lead + (hq + hk) * hs + case.row_pad
    if len(case.token_shape) == 1:
        rows = case.token_shape[0]
        tok_strides = (row,)
    else:
        batch, seq = case.token_shape
        rows = batch * (seq + case.batch_gap)
        tok_strides = ((seq + case.batch_gap) * row, row)
    buffer = random_normal((max(rows, 1) * row,), case.dtype, device, gen)

    def view(heads, start):
        if case.layout == "3d":
            return torch.as_strided(buffer, (*case.token_shape, heads, D), (*tok_strides, hs, 1),
                                    start)
        return torch.as_strided(buffer, (*case.token_shape, heads * D), (*tok_strides, 1), start)

    query = view(hq, case.row_lead)
    key = view(hk, case.row_lead + hq * hs) if hk else None

    pos_np, offsets_np = token_positions(case, rng)
    idt = TORCH_DTYPE[case.index_dtype]
    positions = indptr = offsets = None
    if case.spec.indptr:
        indptr = torch.tensor(case.request_bounds, dtype=idt).to(device)
        offsets = torch.from_numpy(offsets_np).to(dtype=idt, device=device)
    elif case.position_step == 1:
        positions = torch.from_numpy(pos_np).to(dtype=idt, device=device)
    else:
        # every other element of a wider array; the skipped ones are other valid positions,
        # so reading one of them gives a wrong rotation
        wide = rng.integers(0, case.max_position, (*case.token_shape[:-1], 2 * case.token_shape[-1]))
        wide[..., ::2] = pos_np
        positions = torch.from_numpy(wide).to(dtype=idt, device=device)[..., ::2]

    cache = None
    if case.cache_dtype is not None:
        if device.type == "meta":  # no values: skip the float64 cache computation
            exact = torch.empty(case.max_position, case.rotary_dim,
                                dtype=TORCH_DTYPE[case.cache_dtype], device=device)
        else:
            exact = rope_jit.compute_cos_sin_cache(case.rotary_dim, case.max_position,
                                                   dtype=case.cache_dtype, like=buffer)
        if case.cache_pad:
            wide = random_normal((case.max_position, case.rotary_dim + case.cache_pad),
                                 case.cache_dtype, device, gen)
            wide[:, :case.rotary_dim].copy_(exact)
            cache = wide[:, :case.rotary_dim]
        else:
            cache = exact

    entry = case.spec
    if entry.cache:
        kwargs = dict(positions=positions, query=query, key=key, head_size=D,
                      cos_sin_cache=cache, is_neox=case.is_neox)
    else:
        kwargs = dict(q=query, k=key)
        if entry.indptr:
            kwargs.update(indptr=indptr, offsets=offsets)
        else:
            kwargs.update(pos_ids=positions)
        if case.rotary_dim != D or case.explicit_rotary_dim:
            kwargs["rotary_dim"] = case.rotary_dim
        kwargs.update(interleave=not case.is_neox, rope_scale=case.rope_scale,
                      rope_theta=case.rope_theta)
        if entry.llama31:
            low, high, old = case.llama31
            kwargs.update(low_freq_factor=low, high_freq_factor=high, old_context_len=old)
    return BuiltCall(case, device, buffer, query, key, pos_np, positions, indptr, offsets, cache,
                     kwargs, gen)


def tensors_of(kwargs: dict) -> dict:
    return {n: v for n, v in kwargs.items() if isinstance(v, torch.Tensor)}


def _describe(changes: dict) -> str:
    """The changed arguments in words (tensors by shape, stride, dtype and device)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"tensor{list(v.shape)} stride {v.stride()} {v.dtype} on {v.device}"
        return repr(v)
    return ", ".join(f"{n}={one(v)}" for n, v in changes.items())


# ================================================================== invalid mutations


@dataclass(frozen=True)
class Mutation:
    """Turns a valid call into an invalid one. `mutate(built, draw)` returns the changed
    keyword arguments; the call must then raise one of `errors` with a message naming one
    of `names(built, changes)`."""

    name: str
    mutate: Callable
    names: Callable
    errors: tuple = (TypeError, ValueError)
    cache: bool | None = None        # applies to cache entry points (True), on the fly (False), both
    indptr: bool | None = None       # indptr + offsets (True), positions (False), both
    needs_key: bool = False
    one_token_dim: bool = False      # only [num_tokens] tokens
    on_meta: bool = True             # meaningful on meta tensors (host arrays are not)

    def applies(self, case: RopeCase) -> bool:
        e = case.spec
        return ((self.cache is None or self.cache == e.cache)
                and (self.indptr is None or self.indptr == e.indptr)
                and (not self.needs_key or case.num_k_heads > 0)
                and (not self.one_token_dim or len(case.token_shape) == 1))

    def entries(self) -> list:
        return [n for n, e in ENTRIES.items()
                if (self.cache is None or self.cache == e.cache)
                and (self.indptr is None or self.indptr == e.indptr)]


def _arg(role):
    """names(): the entry point's own parameter name for `role`."""
    return lambda b, changes: (b.case.spec.param(role),)


def _fixed(*names):
    return lambda b, changes: names


def _odd_rotary_dim(b, draw):
    return {"rotary_dim": 2 * draw(st.integers(0, (b.case.head_size - 1) // 2)) + 1}


def _rotary_dim_past_head(b, draw):
    return {"rotary_dim": b.case.head_size + 2 * draw(st.integers(1, 4))
            + (b.case.head_size % 2)}


def _head_size_not_dividing(b, draw):
    D = b.case.head_size
    last = b.query.shape[-1]
    candidates = [h for h in range(max(1, D // 2), 2 * D + 3) if h != D and last % h]
    return {"head_size": draw(st.sampled_from(candidates))}


def _one_longer(shape) -> tuple:
    """A token shape with its last dim one longer."""
    return (*shape[:-1], shape[-1] + 1)


def _positions_count(b, draw):
    case = b.case
    shape = _one_longer(case.token_shape)
    if case.num_tokens > 0 and draw(st.booleans()):
        shape = (*case.token_shape[:-1], case.token_shape[-1] - 1)
    return {case.spec.param("positions"): b.random_int(shape, case.max_position, case.index_dtype)}


def _key_token_count(b, draw):
    k = b.key
    tok = len(b.case.token_shape)
    shape = (*_one_longer(tuple(k.shape[:tok])), *k.shape[tok:])
    return {b.case.spec.param("key"): b.random_float(shape, b.case.dtype)}


def _positions_dtype(b, draw):
    dt = draw(st.sampled_from(["float32", "float64", "int16"]))
    return {b.case.spec.param("positions"): b.positions.to(TORCH_DTYPE[dt])}


def _float_index(name):
    def mutate(b, draw):
        a = getattr(b, name)
        return {name: a.to(TORCH_DTYPE[draw(st.sampled_from(["float32", "float64"]))])}
    return mutate


def _query_dtype(b, draw):
    q = b.random_float(b.query.shape, "float64")
    out = {b.case.spec.param("query"): q}
    if b.key is not None:
        out[b.case.spec.param("key")] = b.random_float(b.key.shape, "float64")
    return out


def _mixed_dtypes(b, draw):
    other = draw(st.sampled_from([d for d in FLOAT_DTYPES if d != b.case.dtype]))
    return {b.case.spec.param("key"): b.random_float(b.key.shape, other)}


def _strided_last_dim(role):
    def mutate(b, draw):
        x = b.query if role == "query" else b.key
        step = draw(st.sampled_from([2, 3]))
        wide = b.random_float((*x.shape[:-1], x.shape[-1] * step), b.case.dtype)
        return {b.case.spec.param(role): wide[..., ::step]}
    return mutate


def _cache_of_width(b, width):
    rows = b.case.max_position
    return b.random_float((rows, width), b.case.cache_dtype)


def _cache_width_odd(b, draw):
    rot = b.case.rotary_dim
    return {"cos_sin_cache": _cache_of_width(b, draw(st.sampled_from([rot - 1, rot + 1])))}


def _cache_width_past_head(b, draw):
    D = b.case.head_size
    return {"cos_sin_cache": _cache_of_width(b, D + 2 * draw(st.integers(1, 3)) + D % 2)}


def _cache_rank(b, draw):
    c = b.random_float(b.cache.shape, b.case.cache_dtype)
    return {"cos_sin_cache": c.reshape(-1) if draw(st.booleans()) else c[None]}


def _cache_dtype(b, draw):
    return {"cos_sin_cache": b.random_float(b.cache.shape, "float64")}


def _cache_strided_last_dim(b, draw):
    rows, width = b.cache.shape
    return {"cos_sin_cache": b.random_float((rows, 2 * width), b.case.cache_dtype)[:, ::2]}


def _style_not_bool(b, draw):
    return {b.case.spec.param("style"): draw(st.sampled_from(["yes", "False", "neox", "no"]))}


def _offsets_count(b, draw):
    n = b.offsets.shape[0]
    count = draw(st.sampled_from([n + 1] + ([n - 1] if n > 1 else [])))
    return {"offsets": b.random_int((count,), 100, b.case.index_dtype)}


def _index_dtype_mismatch(b, draw):
    other = "int64" if b.case.index_dtype == "int32" else "int32"
    return {"offsets": b.offsets.to(TORCH_DTYPE[other])}


def _positions_rank(b, draw):
    p = b.positions
    return {b.case.spec.param("positions"): p[None, None] if p.dim() == 1 else p[None]}


def _query_2d(b, draw):
    q = b.query
    return {"q": b.random_float((q.shape[0], q.shape[1] * q.shape[2]), b.case.dtype)}


def _theta(b, draw):
    return {"rope_theta": draw(st.sampled_from([0.0, 1.0, -1e4, math.inf, math.nan]))}


def _scale(b, draw):
    return {"rope_scale": draw(st.sampled_from([0.0, -2.0, math.inf, math.nan]))}


HOST_ROLES = ("query", "key", "positions", "indptr", "offsets", "cos_sin_cache")


def _host_array(b, draw):
    present = {"query": b.query, "key": b.key, "positions": b.positions, "indptr": b.indptr,
               "offsets": b.offsets, "cos_sin_cache": b.cache}
    role = draw(st.sampled_from([r for r in HOST_ROLES if present[r] is not None]))
    name = b.case.spec.param(role) if role in ("query", "key", "positions") else role
    return {name: present[role].cpu()}


def _moved(b, changes):
    return tuple(changes)


MUTATIONS = {m.name: m for m in [
    Mutation("rotary_dim_odd", _odd_rotary_dim, _fixed("rotary_dim"), (ValueError,), cache=False),
    Mutation("rotary_dim_past_head_size", _rotary_dim_past_head, _fixed("rotary_dim"),
             (ValueError,), cache=False),
    Mutation("rotary_dim_zero", lambda b, d: {"rotary_dim": 0}, _fixed("rotary_dim"),
             (ValueError,), cache=False),
    Mutation("rotary_dim_negative", lambda b, d: {"rotary_dim": -2 * d(st.integers(1, 8))},
             _fixed("rotary_dim"), (ValueError,), cache=False),
    Mutation("rotary_dim_str", lambda b, d: {"rotary_dim": str(b.case.rotary_dim)},
             _fixed("rotary_dim"), cache=False),
    Mutation("rotary_dim_float", lambda b, d: {"rotary_dim": float(b.case.rotary_dim)},
             _fixed("rotary_dim"), cache=False),
    Mutation("head_size_not_dividing", _head_size_not_dividing, _fixed("head_size"),
             (ValueError,), cache=True),
    Mutation("head_size_not_int", lambda b, d: {"head_size": d(st.sampled_from(
        [str(b.case.head_size), float(b.case.head_size)]))}, _fixed("head_size"), cache=True),
    Mutation("positions_count", _positions_count, _fixed("positions", "query"), (ValueError,),
             indptr=False),
    Mutation("key_token_count", _key_token_count, _arg("key"), (ValueError,), needs_key=True),
    Mutation("positions_dtype", _positions_dtype, _arg("positions"), (TypeError,), indptr=False),
    Mutation("indptr_float", _float_index("indptr"), _fixed("indptr"), (TypeError,), indptr=True),
    Mutation("offsets_float", _float_index("offsets"), _fixed("offsets"), (TypeError,),
             indptr=True),
    Mutation("query_dtype", _query_dtype, _arg("query"), (TypeError,)),
    Mutation("mixed_query_key_dtypes", _mixed_dtypes, _fixed("key", "query"), (TypeError,),
             needs_key=True),
    Mutation("query_last_dim_strided", _strided_last_dim("query"), _arg("query"), (ValueError,)),
    Mutation("key_last_dim_strided", _strided_last_dim("key"), _arg("key"), (ValueError,),
             needs_key=True),
    Mutation("cache_width_odd", _cache_width_odd, _fixed("cos_sin_cache"), (ValueError,),
             cache=True),
    Mutation("cache_width_past_head_size", _cache_width_past_head, _fixed("cos_sin_cache"),
             (ValueError,), cache=True),
    Mutation("cache_rank", _cache_rank, _fixed("cos_sin_cache"), (ValueError,), cache=True),
    Mutation("cache_dtype", _cache_dtype, _fixed("cos_sin_cache"), (TypeError,), cache=True),
    Mutation("cache_last_dim_strided", _cache_strided_last_dim, _fixed("cos_sin_cache"),
             (ValueError,), cache=True),
    Mutation("style_not_bool", _style_not_bool, _arg("style")),
    Mutation("offsets_count", _offsets_count, _fixed("offsets", "indptr"), (ValueError,),
             indptr=True),
    Mutation("index_dtype_mismatch", _index_dtype_mismatch, _fixed("offsets", "indptr"),
             (TypeError,), indptr=True),
    Mutation("positions_rank", _positions_rank, _fixed("positions", "query"), (ValueError,),
             indptr=False),
    Mutation("query_2d_on_the_fly", _query_2d, _fixed("q"), (ValueError,), cache=False,
             one_token_dim=True),
    Mutation("rope_theta_invalid", _theta, _fixed("rope_theta"), (ValueError,), cache=False),
    Mutation("rope_scale_invalid", _scale, _fixed("rope_scale"), (ValueError,), cache=False),
    Mutation("host_array", _host_array, _moved, (TypeError,), on_meta=False),
]}

# Mutations the library accepts or answers with a raw Python error today (issue 12, item 4).
# Their tests are strict xfails: once the fix lands they XPASS and fail, so delete the entry.
CURRENTLY_FAILING: dict = {}  # mutation name -> why the library still gets it wrong


def mutation_params(on_meta: bool = False) -> list:
    """pytest params of MUTATIONS (the ones meaningful on meta tensors if `on_meta`),
    strict xfails for CURRENTLY_FAILING."""
    out = []
    for name, m in MUTATIONS.items():
        if on_meta and not m.on_meta:
            continue
        marks = ([pytest.mark.xfail(reason=CURRENTLY_FAILING[name], strict=True)]
                 if name in CURRENTLY_FAILING else [])
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def mutated_case(data, mutation: Mutation, max_elements: int = 1 << 16) -> RopeCase:
    """A small valid case `mutation` applies to."""
    return data.draw(rope_cases(entries=mutation.entries(), max_elements=max_elements,
                                require_key=mutation.needs_key).filter(mutation.applies),
                     label="case")


def check_rejected(built: BuiltCall, mutation: Mutation, changes: dict) -> BaseException:
    """Call with `changes`; the error must be one of the mutation's types and name one of
    its arguments. Returns the exception."""
    kwargs = {**built.kwargs, **changes}
    try:
        built.call(kwargs)
    except Exception as e:  # noqa: BLE001 (any exception is judged below)
        err = e
    else:
        pytest.fail(f"{mutation.name}: the invalid call was accepted ({_describe(changes)})")
    assert isinstance(err, mutation.errors), (
        f"{mutation.name}: expected {' or '.join(e.__name__ for e in mutation.errors)}, got "
        f"{type(err).__name__}: {err}")
    names = mutation.names(built, changes)
    assert names_argument(str(err), names), (
        f"{mutation.name}: the message does not name {' or '.join(names)}: {err}")
    return err


# ================================================================== CPU tests: meta tensors


@property_settings(150)
@given(case=rope_cases())
def test_valid_calls_accepted_on_meta(case):
    """Every drawn valid call passes validation (the real planner, run by the op's fake
    implementation) and returns outputs of its inputs' shapes and dtype."""
    COUNTS.add("meta: valid calls accepted")
    b = build(case, "meta")
    out = b.call()
    if case.spec.inplace:
        assert out is None
        return
    q_out, k_out = out
    assert q_out.shape == b.query.shape and q_out.dtype == b.query.dtype
    assert (k_out is None) == (b.key is None)
    if b.key is not None:
        assert k_out.shape == b.key.shape and k_out.dtype == b.key.dtype


@pytest.mark.parametrize("mutation_name", mutation_params(on_meta=True))
@property_settings(20)
@given(data=st.data())
def test_invalid_mutations_rejected_on_meta(mutation_name, data):
    """Each kind of invalid argument raises its documented exception type, with a message
    naming the argument, whatever the rest of the call."""
    COUNTS.add("meta: invalid calls rejected")
    mutation = MUTATIONS[mutation_name]
    b = build(mutated_case(data, mutation), "meta")
    check_rejected(b, mutation, mutation.mutate(b, data.draw))


# ================================================================== CPU tests: host arrays


@property_settings(80)
@given(data=st.data())
def test_host_arrays_refused_untouched(data):
    """Host tensors, with or without an invalid mutation on top: TypeError/ValueError
    naming one of the call's arguments (the host array or the invalid one), never another
    exception, and every tensor unchanged."""
    COUNTS.add("host: calls on CPU tensors refused")
    # mutations still failing have their own strict-xfail tests; once fixed they join here
    name = data.draw(st.sampled_from([None] + [n for n in MUTATIONS if n != "host_array"
                                               and n not in CURRENTLY_FAILING]),
                     label="mutation")
    mutation = MUTATIONS.get(name)
    case = (mutated_case(data, mutation) if mutation else
            data.draw(rope_cases(max_elements=1 << 16), label="case"))
    b = build(case, "cpu")
    kwargs = {**b.kwargs, **(mutation.mutate(b, data.draw) if mutation else {})}
    before = {n: t.clone() for n, t in tensors_of(kwargs).items()}
    buffer_before = b.buffer.clone()
    with pytest.raises(Exception) as info:
        b.call(kwargs)
    err = info.value
    assert isinstance(err, (TypeError, ValueError)), f"{type(err).__name__}: {err}"
    assert names_argument(str(err), [n for n in kwargs] + ["cos_sin_cache"]), str(err)
    assert torch.equal(b.buffer, buffer_before)
    for n, t in tensors_of(kwargs).items():
        assert torch.equal(t, before[n]), n


# ================================================================== positions_from_offsets on the host


@st.composite
def ragged_batches(draw):
    """(indptr, offsets, nnz or None, dtype): a valid ragged batch."""
    dtype = draw(st.sampled_from(["int32", "int64"]))
    batch = draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, 50), min_size=batch, max_size=batch))
    indptr = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    high = 2**31 - 1 if dtype == "int32" else 2**40
    offsets = np.array([draw(st.integers(0, high - n)) for n in lengths], dtype=np.int64)
    nnz = draw(st.none() | st.integers(0, int(indptr[-1]) + 5))
    return indptr.astype(dtype), offsets.astype(dtype), nnz, dtype


def _as_kind(a: np.ndarray, kind: str):
    return torch.from_numpy(a) if kind == "torch" else a


@property_settings(120)
@given(batch=ragged_batches(), kind=st.sampled_from(["numpy", "torch"]))
def test_positions_from_offsets_host_matches_reference(batch, kind):
    COUNTS.add("host: positions_from_offsets valid batches")
    indptr, offsets, nnz, dtype = batch
    got = rope_jit.positions_from_offsets(_as_kind(indptr, kind), _as_kind(offsets, kind), nnz)
    want = reference.positions_from_offsets(indptr, offsets, nnz)
    got = got.numpy() if kind == "torch" else got
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, want)


def _negative_offset(indptr, offsets, draw):
    offsets = offsets.copy()
    offsets[draw(st.integers(0, len(offsets) - 1))] = -draw(st.integers(1, 1000))
    return indptr, offsets


def _decreasing_indptr(indptr, offsets, draw):
    indptr = indptr.copy()
    i = draw(st.integers(1, len(indptr) - 1))
    indptr[i] = indptr[i - 1] - draw(st.integers(1, 5))
    return indptr, offsets


def _indptr_not_from_zero(indptr, offsets, draw):
    return indptr + draw(st.integers(1, 5)), offsets


def _int32_overflow(indptr, offsets, draw):
    # a request whose last position passes 2^31 - 1
    indptr = indptr.astype(np.int32)
    offsets = offsets.astype(np.int32).copy()
    lengths = np.diff(indptr)
    b = draw(st.sampled_from([i for i, n in enumerate(lengths) if n > 1]))
    n = int(lengths[b])
    # offsets[b] still fits in int32; its last token's position 2^31 + extra does not
    offsets[b] = 2**31 - n + 1 + draw(st.integers(0, n - 2))
    return indptr, offsets


POSITIONS_MUTATIONS = {
    "negative_offset": (_negative_offset, ("offsets",), lambda i, o: len(o) > 0),
    "decreasing_indptr": (_decreasing_indptr, ("indptr",), lambda i, o: len(i) > 1),
    "indptr_not_from_zero": (_indptr_not_from_zero, ("indptr",), lambda i, o: True),
    "int32_overflow": (_int32_overflow, ("offsets", "indptr"),
                       lambda i, o: (np.diff(i) > 1).any()),
    "offsets_count": (lambda i, o, d: (i, np.concatenate([o, o[:1] if len(o) else [3]])),
                      ("offsets", "indptr"), lambda i, o: True),
    "dtype_mismatch": (lambda i, o, d: (i, o.astype(np.int64 if o.dtype == np.int32 else np.int32)),
                       ("offsets", "indptr"), lambda i, o: True),
    "float_offsets": (lambda i, o, d: (i, o.astype(np.float32)), ("offsets",), lambda i, o: True),
}
POSITIONS_CURRENTLY_FAILING: dict = {}  # mutation name -> why the library still gets it wrong


@pytest.mark.parametrize("mutation", [
    pytest.param(n, id=n, marks=[pytest.mark.xfail(reason=POSITIONS_CURRENTLY_FAILING[n],
                                                   strict=True)]
                 if n in POSITIONS_CURRENTLY_FAILING else [])
    for n in POSITIONS_MUTATIONS])
@property_settings(25)
@given(batch=ragged_batches(), kind=st.sampled_from(["numpy", "torch"]), data=st.data())
def test_positions_from_offsets_host_rejects_invalid(mutation, batch, kind, data):
    """Invalid ragged batches on the host raise TypeError/ValueError naming indptr or
    offsets, and leave both arrays as they were."""
    mutate, names, applies = POSITIONS_MUTATIONS[mutation]
    indptr, offsets, nnz, _ = batch
    hypothesis.assume(applies(indptr, offsets))
    COUNTS.add("host: positions_from_offsets invalid batches rejected")
    indptr, offsets = mutate(indptr, offsets, data.draw)
    a, o = _as_kind(indptr.copy(), kind), _as_kind(offsets.copy(), kind)
    try:
        got = rope_jit.positions_from_offsets(a, o, nnz)
    except Exception as e:  # noqa: BLE001 (any exception is judged below)
        err = e
    else:
        pytest.fail(f"{mutation}: accepted indptr={indptr.tolist()} offsets={offsets.tolist()}, "
                    f"returned {np.asarray(got).tolist()[:20]}")
    assert isinstance(err, (TypeError, ValueError)), f"{type(err).__name__}: {err}"
    assert names_argument(str(err), names), str(err)
    np.testing.assert_array_equal(np.asarray(a), indptr)
    np.testing.assert_array_equal(np.asarray(o), offsets)
