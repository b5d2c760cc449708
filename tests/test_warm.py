"""Ahead-of-time warming (rope_jit.warm): the specs a model's calls use are derived by the
planner over token and SM counts, compiled for a named arch with no GPU, and then found
by the call path's build() with zero compiles. Tests that compile are marked ``nvrtc``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from rope_jit import jit, plan, warm
from rope_jit.specs import PositionsSpec
from rope_jit.warm import CallShape

LLAMA = warm.model_call("llama3-8b")
# Shapes whose planner choices differ: GQA, many heads and one key head, partial rotary
# with an odd head size, GPT-J pairs, no key, fused QKV slices out of place, on the fly.
CALLS = [
    LLAMA,
    warm.model_call("deepseek-v3", cache_dtype=None, indptr=True, index_dtype="int32"),
    warm.model_call("phi-2", dtype="float16", cache_dtype="bfloat16", inplace=False),
    warm.model_call("gpt-j-6b", tp=4, dtype="float32"),
    CallShape(12, 0, 96, 48, fused_qkv=True, inplace=False),
    CallShape(7, 3, 80, 64, cache_dtype=None, fused_qkv=True),
]


pytestmark = pytest.mark.usefixtures("cache_dir")  # conftest: a fresh cache per test


# ------------------------------------------------------------------ deriving specs (CPU)

def test_token_counts_grid():
    """Sorted, unique, from 1 to max_tokens, every count to 64 and every power of two with
    its neighbours, steps of at most 4% above 64, and few points in all."""
    counts = warm.token_counts(131072)
    assert counts == sorted(set(counts)) and counts[0] == 1 and counts[-1] == 131072
    assert set(range(1, 65)) <= set(counts)
    assert {2 ** k + d for k in range(1, 17) for d in (-1, 0, 1)} <= set(counts)
    assert all(b / a <= 1.04 + 1e-9 or b - a <= 1 for a, b in zip(counts, counts[1:]))
    assert len(counts) < 400
    assert warm.token_counts(5) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("call", CALLS[:4], ids=lambda c: c.words())
def test_grid_finds_every_spec_of_a_dense_sweep(call):
    """Sampling token counts on the grid finds exactly the specs that planning every
    count from 1 to 16384 finds, on a small and a large GPU."""
    for sms in (28, 132):
        dense = {warm.plan_call(call, n, sms).spec for n in range(1, 16385)}
        assert set(warm.specs_for_call(call, max_tokens=16384, sm_counts=(sms,))) == dense


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.words())
def test_specs_are_the_planners(call):
    """Each derived spec carries the call's compile-time constants (the planner's own
    choice, not a copy of its rules): dtype, cache dtype, style, placement, positions."""
    specs = warm.specs_for_call(call, max_tokens=65536)
    assert specs and len(set(specs)) == len(specs)
    for s in specs:
        assert (s.dtype, s.cache_dtype, s.neox, s.out_of_place, s.indptr, s.index_dtype) == (
            call.dtype, call.cache_dtype, call.is_neox, not call.inplace, call.indptr,
            call.index_dtype)
        assert (s.head_size, s.rotary_dim) == (call.head_size, call.rotary_dim or call.head_size)


def test_decode_only_warming_is_a_subset():
    """A smaller max_tokens warms a subset: decode-sized calls (one head per thread) only."""
    decode = warm.specs_for_call(LLAMA, max_tokens=8, sm_counts=(132,))
    full = warm.specs_for_call(LLAMA, sm_counts=(132,))
    assert set(decode) < set(full)
    assert {s.head_batch for s in decode} == {1}


def test_plan_kwargs_reach_the_planner(monkeypatch):
    """plan_kwargs set the call's RopeCall fields (and the on-the-fly scaling variant); the
    planner is looked up at call time (a new planner version is what runs); a name that is
    no call field is refused by name."""
    seen = []

    def recording_planner(call, arrays, **kwargs):
        seen.append(call)
        return real(call, arrays, **kwargs)

    real = plan.plan_rope
    monkeypatch.setattr(plan, "plan_rope", recording_planner)
    call = replace(LLAMA, plan_kwargs={"inverse": True})
    assert call.plan_kwargs == (("inverse", True),)  # a dict becomes hashable pairs
    specs = warm.specs_for_call(call, max_tokens=64, sm_counts=(132,))
    assert specs and seen and all(c.inverse for c in seen) and all(s.inverse for s in specs)
    with pytest.raises(ValueError, match=r"^plan_kwargs: unknown new_knob; expected scaling, "):
        warm.specs_for_call(replace(LLAMA, plan_kwargs={"new_knob": 1}), max_tokens=4)


def test_call_is_described_as_the_api_passes_it(monkeypatch):
    """vLLM style (cache): [T, H*D] arrays and head_size; FlashInfer style (on the fly):
    [T, H, D] and rotary_dim; fused QKV: token stride of the whole QKV row and k right
    after q's columns; mRoPE: positions [3, T]."""
    seen = []
    monkeypatch.setattr(plan, "plan_rope", lambda call, arrays, **kw: seen.append((call, arrays))
                        or plan.RopePlan(None, None, (), 0, arrays.query.shape, None))
    warm.plan_call(CallShape(8, 2, 128, fused_qkv=True, plan_kwargs={"mrope_section": (16, 24, 24)}),
                   5, 132)
    call, a = seen[-1]
    q, k = a.query, a.key
    assert q.shape == (5, 8 * 128) and q.strides == ((8 + 4) * 128, 1)
    assert k.ptr - q.ptr == 8 * 128 * 2 and k.strides == q.strides
    assert call.head_size == 128 and call.rotary_dim is None and call.from_cache
    assert call.mrope_section == (16, 24, 24)
    assert a.cos_sin_cache.shape[1] == 128 and a.positions.shape == (3, 5)
    warm.plan_call(CallShape(8, 0, 64, 32, cache_dtype=None, indptr=True, index_dtype="int32"), 5, 132)
    call, a = seen[-1]
    assert a.query.shape == (5, 8, 64) and a.key is None
    assert call.head_size is None and call.rotary_dim == 32 and a.cos_sin_cache is None
    assert a.indptr.dtype == a.offsets.dtype == "int32" and a.positions is None
    assert all(d.ptr % 256 == 0 for d in (a.query, a.indptr, a.offsets))


def test_mrope_specs_through_plan_kwargs():
    """mRoPE sections, passed as a planner keyword, reach the specs."""
    call = replace(warm.model_call("qwen2.5-7b", cache_dtype=None),
                   plan_kwargs={"mrope_section": (16, 24, 24)})
    specs = warm.specs_for_call(call, max_tokens=4096)
    assert specs and all(s.mrope_section == (16, 24, 24) for s in specs)


def test_planner_refusal_is_raised():
    """A call the planner refuses raises its error (the CLI turns it into one line)."""
    with pytest.raises(ValueError, match="exceeds head_size"):
        warm.specs_for_call(CallShape(8, 2, 64, 128), max_tokens=8)
    with pytest.raises(ValueError, match="max_tokens"):
        warm.specs_for_call(LLAMA, max_tokens=0)


def test_heads_per_rank_and_models():
    assert warm.heads_per_rank(32, 8, 1) == (32, 8)
    assert warm.heads_per_rank(32, 8, 8) == (4, 1)
    assert warm.heads_per_rank(32, 8, 16) == (2, 1)    # kv heads replicated per rank
    assert warm.heads_per_rank(32, 0, 4) == (8, 0)     # no key
    for bad in ((32, 8, 3), (32, 12, 8), (32, 8, 0)):
        with pytest.raises(ValueError, match="tp"):
            warm.heads_per_rank(*bad)
    m = warm.model_call("llama3-70b", tp=8, dtype="float16")
    assert (m.num_q_heads, m.num_kv_heads, m.head_size, m.dtype) == (8, 1, 128, "float16")
    with pytest.raises(ValueError, match="unknown 'nope'"):
        warm.model_call("nope")


def test_sm_counts_for():
    assert 132 in warm.sm_counts_for("sm_90") and 132 in warm.sm_counts_for("90")
    assert warm.sm_counts_for("sm_37") == warm.ANY_SM_COUNTS


def test_bad_dtypes_are_named():
    """Dtypes are checked before planning, named as the option a warming user gave."""
    for field, value in (("dtype", "float64"), ("cache_dtype", "int8"), ("index_dtype", "int16")):
        with pytest.raises(ValueError, match=rf"^{field.replace('_', ' ')}: .*'{value}'"):
            warm.specs_for_call(replace(LLAMA, **{field: value}), max_tokens=1)


# ------------------------------------------------------------------ compiling (NVRTC)

@pytest.mark.nvrtc
def test_aot_entries_are_found_by_build_with_zero_compiles(cache_dir):
    """Warm sm_90 on this GPU-less machine for a few call shapes; then, as a fresh process
    would (memory cleared), every spec the planner picks for those calls at every token
    count up to 4096, on an H100 and an H100 PCIe, loads from disk: zero compiles."""
    calls = CALLS[:3]
    specs = [s for c in calls for s in warm.specs_for_call(c, max_tokens=4096,
                                                          sm_counts=warm.sm_counts_for("sm_90"))]
    report = warm.warm(specs, ["sm_90"], jobs=2)
    assert report.compiled == len(set(specs)) and report.already_cached == 0
    assert len(list(cache_dir.glob("*.cubin"))) == len(set(specs))
    jit.clear_memory()
    c0 = jit.stats.compiles
    for call in calls:
        for sms in (132, 114):
            for n in range(1, 4097):
                jit.build(warm.plan_call(call, n, sms).spec, "sm_90")
    assert jit.stats.compiles == c0


@pytest.mark.nvrtc
def test_warm_again_compiles_nothing(cache_dir):
    """A second warm finds every entry (verified on disk, not this process's memory)."""
    specs = warm.specs_for_call(LLAMA, sm_counts=(132,)) + [PositionsSpec("int32")]
    first = warm.warm(specs, ["sm_80", "90"])
    assert first.compiled == 2 * len(specs)
    assert {(i.arch, i.origin) for i in first.items} == {("sm_80", jit.COMPILED), ("sm_90", jit.COMPILED)}
    c0 = jit.stats.compiles
    second = warm.warm(specs, ["sm_80", "sm_90"])
    assert second.compiled == 0 and second.already_cached == 2 * len(specs)
    assert jit.stats.compiles == c0
    for entry in cache_dir.glob("*.cubin"):  # warming into memory only would leave none
        entry.unlink()
    assert warm.warm(specs, ["sm_90"]).compiled == len(specs)


@pytest.mark.nvrtc
def test_warm_reports_progress_per_item(cache_dir):
    done = []
    specs = warm.specs_for_call(LLAMA, sm_counts=(132,))
    report = warm.warm(specs, ["sm_90"], jobs=3, on_done=done.append)
    assert sorted(done, key=id) == sorted(report.items, key=id)
    assert all(i.seconds > 0 for i in done)


@pytest.mark.nvrtc
def test_warm_refuses_an_unwritable_directory(tmp_path, monkeypatch):
    """Warming into a cache that cannot be written would keep nothing: WarmError naming the
    directory and the env var, before anything is compiled."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(jit.ENV_CACHE_DIR, str(blocker / "cache"))
    c0 = jit.stats.compiles
    with pytest.raises(warm.WarmError, match=jit.ENV_CACHE_DIR):
        warm.warm(warm.specs_for_call(LLAMA, max_tokens=8), ["sm_90"])
    assert jit.stats.compiles == c0


@pytest.mark.nvrtc
def test_warm_refuses_an_arch_nvrtc_lacks():
    with pytest.raises(ValueError, match=r"cannot compile for sm_12\b.*supports .*sm_90"):
        warm.warm([PositionsSpec("int32")], ["sm_12"])


@pytest.mark.nvrtc
def test_warm_stops_at_a_compile_error(cache_dir, monkeypatch):
    """A kernel that fails to compile raises its CompileError from warm()."""
    real = jit.compile_cubin

    def failing(source, arch, *args, **kwargs):
        if "positions_from_offsets int64" in source:
            raise jit.CompileError("NVRTC failed for sm_90: injected")
        return real(source, arch, *args, **kwargs)

    monkeypatch.setattr(jit, "compile_cubin", failing)
    with pytest.raises(jit.CompileError, match="injected"):
        warm.warm([PositionsSpec("int32"), PositionsSpec("int64")], ["sm_90"], jobs=1)
