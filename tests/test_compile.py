"""NVRTC compiles every kernel template for sm_80 and sm_90 over a covering set of
specializations (docs/jit.md). Needs CuPy's NVRTC, not a GPU: the tests that compile
are marked ``nvrtc`` (conftest skips them where NVRTC is missing); rendering checks run
everywhere.

The spec set is a covering design, not the cartesian product: every dtype x cache dtype
pair, every (rotation style, placement, index dtype, positions convention) combination,
every head size with a full and a partial rotary dim, every vector width and head batch,
and odd chunk counts (rotary 20 at vec 2, rotary 6 at vec 1), each compiled for both
archs. ``test_design_covers`` checks those claims; the session's compile count is reported
in pytest's terminal summary (tests/conftest.py) so CI logs show it.
"""

from __future__ import annotations

import itertools
import re

import pytest

import rope_jit
from rope_jit import jit
from rope_jit.specs import POSITIONS_PARAMS, ROPE_PARAMS, PositionsSpec, RopeSpec, template

ARCHS = ("sm_80", "sm_90")
DTYPES = ("float16", "bfloat16", "float32")
CACHE_DTYPES = ("float16", "bfloat16", "float32", None)
HEAD_SIZES = (64, 80, 96, 112, 128, 160, 192, 256, 512)
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
# (neox, out_of_place, index_dtype, indptr): all 16 combinations
STYLES = list(itertools.product((True, False), (False, True), ("int32", "int64"), (False, True)))
HEAD_BATCHES = (1, 2, 4, 3)



def _widest_vec(dtype, head, rot, out_of_place, cap=None):
    """What the planner picks for aligned, contiguous inputs: the widest power of two of at
    most 16 bytes dividing rot/2 (and the pass-through length out of place)."""
    vec = 16 // ITEMSIZE[dtype] if cap is None else cap
    while vec > 1 and ((rot // 2) % vec or (out_of_place and (head - rot) % vec)):
        vec //= 2
    return vec


def _spec(i, dtype, cache, head, rot, *, vec=None, cache_vec=None, style=None, head_batch=None,
          **variant):
    neox, oop, index, indptr = STYLES[i % len(STYLES)] if style is None else style
    vec = _widest_vec(dtype, head, rot, oop) if vec is None else vec
    if cache_vec is None:
        cache_vec = min(vec, 16 // ITEMSIZE[cache]) if cache else 1
    hb = HEAD_BATCHES[i % len(HEAD_BATCHES)] if head_batch is None else head_batch
    return RopeSpec(head_size=head, rotary_dim=rot, dtype=dtype, cache_dtype=cache, index_dtype=index,
                    indptr=indptr, neox=neox, out_of_place=oop, vec=vec, cache_vec=cache_vec,
                    head_batch=hb, **variant)


def _design() -> list:
    specs = []
    # A: every dtype x cache dtype pair (head 128, full rotary), styles 0..11
    for i, (dtype, cache) in enumerate(itertools.product(DTYPES, CACHE_DTYPES)):
        specs.append(_spec(i, dtype, cache, 128, 128))
    # B: every head size, full and partial rotary; styles 12.. (wrapping), dtypes and
    # caches cycled
    for j, (head, partial) in enumerate(itertools.product(HEAD_SIZES, (False, True))):
        rot = head // 2 if partial else head
        specs.append(_spec(12 + j, DTYPES[j % 3], CACHE_DTYPES[j % 4], head, rot))
    # C: narrow vectors and odd chunk counts
    specs += [
        _spec(0, "bfloat16", "float32", 64, 20, style=(True, True, "int64", False)),     # vec 2, 5 chunks
        _spec(1, "bfloat16", None, 64, 20, style=(False, False, "int32", True)),         # vec 2, GPT-J
        _spec(2, "float16", "float16", 64, 6, style=(False, True, "int64", False)),      # vec 1, 3 chunks
        _spec(3, "float32", "float32", 80, 6, style=(True, False, "int32", False)),      # vec 1, fp32
        _spec(4, "float32", None, 96, 20, style=(True, False, "int32", True)),           # vec 2, fp32
        _spec(5, "bfloat16", "bfloat16", 128, 128, vec=1, cache_vec=1, head_batch=4),    # misaligned
        _spec(6, "float16", "float16", 128, 128, vec=8, cache_vec=2),                    # strided cache
        _spec(7, "bfloat16", None, 512, 512, style=(True, True, "int64", True), head_batch=4),
        _spec(8, "float32", "bfloat16", 112, 112, vec=2, cache_vec=2, head_batch=3),
    ]
    # D: on-the-fly scaling variants and mRoPE (cache and on the fly, both section layouts)
    pos = (True, False, "int64", False)
    specs += [
        _spec(0, "bfloat16", None, 128, 128, style=pos, scaling="llama3"),
        _spec(0, "float16", None, 64, 64, style=(False, True, "int32", True), scaling="yarn"),
        _spec(0, "bfloat16", "float32", 128, 128, style=pos, mrope_section=(16, 24, 24)),
        _spec(0, "bfloat16", "bfloat16", 128, 128, style=pos, mrope_section=(24, 20, 20),
              mrope_interleaved=True),
        _spec(0, "float32", None, 80, 64, style=(True, True, "int32", False), scaling="yarn",
              mrope_section=(8, 12, 12)),
        _spec(0, "bfloat16", None, 128, 128, style=pos, mrope_section=(24, 20, 20),
              mrope_interleaved=True),
        _spec(0, "float32", "float32", 128, 64, style=(True, True, "int64", False), inverse=True),
        _spec(0, "float32", None, 128, 128, style=(False, True, "int32", True), scaling="yarn",
              inverse=True),
    ]
    return specs


SPECS = _design()
POSITION_SPECS = [PositionsSpec("int32"), PositionsSpec("int64")]
CASES = [(arch, s) for s in SPECS + POSITION_SPECS for arch in ARCHS]


def _case_id(case):
    arch, s = case
    if isinstance(s, PositionsSpec):
        return f"{arch}-positions-{s.index_dtype}"
    return (f"{arch}-{s.dtype}-{s.cache_dtype or 'fly'}-h{s.head_size}r{s.rotary_dim}-"
            f"{'neox' if s.neox else 'gptj'}-{'oop' if s.out_of_place else 'inpl'}-{s.index_dtype}-"
            f"{'indptr' if s.indptr else 'pos'}-v{s.vec}c{s.cache_vec}b{s.head_batch}"
            f"{'' if s.scaling == 'linear' else '-' + s.scaling}"
            f"{'-mrope' + ('i' if s.mrope_interleaved else '') if s.mrope_section else ''}"
            f"{'-inverse' if s.inverse else ''}")


def test_design_covers():
    """The spec set covers what the module docstring claims, within the compile budget."""
    assert len(CASES) <= 136
    assert {(s.dtype, s.cache_dtype) for s in SPECS} == set(itertools.product(DTYPES, CACHE_DTYPES))
    assert {(s.neox, s.out_of_place, s.index_dtype, s.indptr) for s in SPECS} == set(STYLES)
    for head in HEAD_SIZES:
        rots = {s.rotary_dim for s in SPECS if s.head_size == head}
        assert head in rots and any(r < head for r in rots), head
    assert {s.vec for s in SPECS} == {1, 2, 4, 8}
    assert {s.cache_vec for s in SPECS if s.cache_dtype} >= {1, 2, 4, 8}
    assert {s.head_batch for s in SPECS} == {1, 2, 3, 4}
    chunks = {s.rotary_dim // 2 // s.vec for s in SPECS}
    assert 5 in chunks and 3 in chunks  # odd chunk counts (rotary 20 at vec 2, rotary 6 at vec 1)
    for s in SPECS:  # every spec is one the kernel's static_asserts accept
        assert (s.rotary_dim // 2) % s.vec == 0 and s.vec % s.cache_vec == 0
        assert s.vec * ITEMSIZE[s.dtype] <= 16
        assert not s.cache_dtype or s.cache_vec * ITEMSIZE[s.cache_dtype] <= 16
        assert not s.out_of_place or (s.head_size - s.rotary_dim) % s.vec == 0
    assert {s.scaling for s in SPECS if not s.cache_dtype} == {"linear", "llama3", "yarn"}
    assert {(s.cache_dtype is None, s.mrope_interleaved) for s in SPECS if s.mrope_section} == {
        (False, False), (False, True), (True, False), (True, True)}
    assert {arch for arch, _ in CASES} == set(ARCHS)
    assert len(set(SPECS)) == len(SPECS)


def test_rendered_source_has_no_include():
    """Every rendered translation unit is self-contained: no #include at all (CI and
    cache-warming containers may have no CUDA headers)."""
    for s in SPECS + POSITION_SPECS:
        src = s.render()
        assert not re.search(r"^\s*#\s*include", src, re.M), s  # (comments may say the word)
        assert re.search(rf"__global__ void (__launch_bounds__\(\d+(, \w+)?\) )?{s.kernel_name}\(", src), s


def test_rendering_is_deterministic_and_distinct():
    """Equal specs render identical source and different specs different source (the
    source hash is part of the binary key, so this keeps keys apart)."""
    sources = [s.render() for s in SPECS]
    assert sources == [s.render() for s in SPECS]
    assert len(set(sources)) == len(SPECS)


def _struct_fields(src: str, c_name: str) -> list:
    m = re.search(r"struct\s+" + c_name + r"\s*\{(.*?)\};", src, re.S)
    assert m, f"struct {c_name} not found"
    return re.findall(r"^\s*(long long|double)\s+(\w+)\s*;", m.group(1), re.M)


def test_prelude_struct_matches_param_fields():
    """The RopeParams struct the kernel sees has ROPE_PARAMS' fields, in order, with the
    C types the host packer uses ('q' = long long, 'd' = double); every p.<field> the
    kernel template reads exists in it. Likewise PositionsParams."""
    for spec, params, kernel in ((SPECS[0], ROPE_PARAMS, "rope.cu"),
                                 (POSITION_SPECS[0], POSITIONS_PARAMS, "positions.cu")):
        src = spec.render()
        assert src.count(f"struct {params.c_name} {{") == 1
        fields = _struct_fields(src, params.c_name)
        assert [n for _, n in fields] == list(params.names)
        codes = params.packer.format.lstrip("<")
        assert [t for t, _ in fields] == [{"q": "long long", "d": "double"}[c] for c in codes]
        assert params.size == 8 * len(params.names)
        used = set(re.findall(r"\bp\.(\w+)", template(kernel) + template("common.cuh")))
        assert used, kernel
        assert used <= set(params.names), used - set(params.names)
        # the struct is declared before the kernel template that uses it
        assert src.index(f"struct {params.c_name} {{") < src.index(template(kernel))


@pytest.mark.nvrtc
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_compile(case):
    """NVRTC compiles the rendered source to a non-empty ELF cubin for the arch."""
    arch, spec = case
    cubin = jit.compile_cubin(spec.render(), arch)
    assert isinstance(cubin, bytes)
    assert len(cubin) > 1024 and cubin[:4] == b"\x7fELF"
    assert spec.kernel_name.encode() in cubin  # extern "C": the symbol keeps its name


@pytest.mark.nvrtc
def test_compile_error_carries_nvrtc_log():
    """A source that does not compile raises rope_jit.CompileError with NVRTC's log,
    which names the offending identifier."""
    broken = SPECS[0].render() + "\n__device__ int rope_jit_broken = undefined_symbol_xyz;\n"
    with pytest.raises(rope_jit.CompileError) as info:
        jit.compile_cubin(broken, "sm_90")
    msg = str(info.value)
    assert "undefined_symbol_xyz" in msg
    assert "sm_90" in msg
    assert rope_jit.CompileError is jit.CompileError and issubclass(jit.CompileError, RuntimeError)


def test_bad_arch_name():
    """An arch that is no compute capability is a ValueError naming arch (no NVRTC needed)."""
    assert jit.arch_name("90") == jit.arch_name(90) == jit.arch_name("9.0") == "sm_90"
    assert jit.arch_name("compute_80") == jit.arch_name("SM_80") == "sm_80"
    with pytest.raises(ValueError, match=r"^arch: expected a compute capability"):
        jit.arch_name("hopper")
