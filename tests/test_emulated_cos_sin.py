"""The plain kernel's per-token cos/sin paths, and its cache path in both code shapes (the
few-token one: position first, vector rounding; the many-token one), run on the CPU:
kernels/rope.cu compiled as host C++ by
benchmarks/kernel_lab.py's emulator (g++ -DROPE_HOST_EMULATION, one OS thread per CUDA
thread, shared memory poisoned per block), launched with rope_jit's own plan and packed
kernel arguments on CPU tensors, against the float64 reference. So the kernel's index
arithmetic, per-token cos/sin fetch, pair reordering, inverse and partial rotary are run
where there is no GPU. fp16 has no host form (PTX conversions): bf16 and fp32 here, the
GPU tests (tests/test_gpu_cos_sin.py) cover fp16.
"""

from __future__ import annotations

import dataclasses

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rope_jit import reference  # noqa: E402
from rope_jit.arrays import ArrayDesc  # noqa: E402
from rope_jit.call import COS_SIN, POSITIONS, RopeCall, token_cos_sin_call  # noqa: E402
from rope_jit.plan import DEFAULT_TUNING, RopeArrays, plan_rope  # noqa: E402
from rope_jit.specs import ROPE_PARAMS, ROPE_POINTERS  # noqa: E402

from gpu_cases import assert_rope_close  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")

LAB = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_lab.py"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def emulate(tmp_path_factory):
    """launch(spec, params, grid, block, smem) on the host emulation of spec's kernel."""
    spec = importlib.util.spec_from_file_location("kernel_lab_for_tests", LAB)
    lab = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = lab
    spec.loader.exec_module(lab)
    work = tmp_path_factory.mktemp("emulated")
    built = {}

    def launch(kernel_spec, params, grid, block, smem):
        if kernel_spec not in built:
            src = work / f"emu_{len(built)}.cc"
            src.write_text(lab.EMU_HEAD + kernel_spec.render() + lab.EMU_TAIL)
            lib = src.with_suffix(".so")
            r = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                                "-DROPE_HOST_EMULATION", "-w", "-o", str(lib), str(src)],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
            built[kernel_spec] = lab.Emulator(lib)
        built[kernel_spec].launch(params, grid, block, smem)

    return launch


def _desc(t):
    if t is None:
        return None
    return ArrayDesc(t.data_ptr(), tuple(t.shape), tuple(t.stride()),
                     str(t.dtype).replace("torch.", ""), 0)


def pack(plan, **pointers) -> bytes:
    """The kernel's argument struct: the named pointers (others 0) and the plan's values."""
    return ROPE_PARAMS.pack(tuple(pointers.get(n, 0) for n in ROPE_POINTERS), plan.static)


def run(emulate, call, q, k, cos, sin):
    """What launch.run_rope does, on CPU tensors: plan, outputs (NaN-poisoned), the packed
    argument struct, one launch."""
    plan = plan_rope(call, RopeArrays(_desc(q), _desc(k), cos=_desc(cos), sin=_desc(sin)),
                     num_sms=132)
    if call.inplace:
        qo, ko = q, k
    else:
        qo = torch.full(plan.q_out_shape, float("nan"), dtype=q.dtype)
        ko = torch.full(plan.k_out_shape, float("nan"), dtype=k.dtype) if k is not None else None
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    params = pack(plan, q=ptr(q), k=ptr(k), q_out=ptr(qo), k_out=ptr(ko), cos=ptr(cos),
                  sin=ptr(sin))
    emulate(plan.spec, params, plan.launch.grid, plan.launch.block, plan.launch.smem)
    return plan.spec, qo, ko


CASES = [
    # id, q dtype, cos dtype, layout, rot, neox, out_neox, in place, inverse, row padding
    ("bf16-bhsd-neox", "bfloat16", "float32", "bhsd", 64, True, None, False, False, 8),
    ("bf16-bhsd-partial-inplace", "bfloat16", "bfloat16", "bhsd", 32, True, None, True, False, 8),
    ("fp32-bshd-gptj-inverse", "float32", "bfloat16", "bshd", 48, False, None, False, True, 8),
    ("bf16-bhsd-gptj-to-neox", "bfloat16", "float32", "bhsd", 64, False, True, False, False, 8),
    ("fp32-bhsd-neox-to-gptj-inverse", "float32", "float32", "bhsd", 48, True, False, False, True, 8),
    ("bf16-bhsd-narrow-vectors-gptj-to-neox", "bfloat16", "float32", "bhsd", 64, False, True, False, False, 2),
]


@pytest.mark.parametrize("dtype, cos_dtype, layout, rot, is_neox, out_neox, inplace, inverse, pad",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_emulated_kernel_against_reference(emulate, dtype, cos_dtype, layout, rot, is_neox,
                                           out_neox, inplace, inverse, pad):
    batch, seq, hq, hk, d = 2, 7, 3, 2, 64
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(batch, seq, (hq + 2 * hk) * d + pad, generator=g).to(DTYPES[dtype])
    q = buf[..., :hq * d].unflatten(-1, (hq, d))
    k = buf[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    angles = torch.rand(1, seq, rot // 2, generator=g, dtype=torch.float64) * 100 - 50
    # [1, seq, rot]: cos/sin, then a NaN half the kernel must not read; sin as a slice of
    # wider rows, so its token stride is its own
    nan = torch.full_like(angles, float("nan"))
    cos = torch.cat([angles.cos(), nan], -1).to(DTYPES[cos_dtype])
    sin = torch.cat([angles.sin(), nan, nan], -1).to(DTYPES[cos_dtype])[..., :rot]

    def heads_last(x):
        return x.transpose(1, 2) if layout == "bhsd" else x

    call = token_cos_sin_call(COS_SIN, is_neox, inplace, 1 if layout == "bhsd" else 2, out_neox)
    if inverse:
        call = call._replace(inverse=True)
    c64 = np.broadcast_to(cos[..., :rot // 2].double().numpy(), (batch, seq, rot // 2))
    s64 = np.broadcast_to(sin[..., :rot // 2].double().numpy(), (batch, seq, rot // 2))
    if inverse:
        s64 = -s64
    before = buf.clone()
    xs = [heads_last(x).double().numpy().copy() for x in (q, k)]
    spec, qo, ko = run(emulate, call, q, k, cos, sin)
    assert spec.token_cos_sin and (spec.vec == 2) == (pad == 2)
    for out, x64 in zip((qo, ko), xs):
        y = reference.apply_rotary(x64, c64, s64, is_neox)
        if out_neox is not None and out_neox != is_neox:
            order = reference.neox_order if out_neox else reference.gptj_order
            y, x64 = order(y, rot), order(x64, rot)
        assert_rope_close(heads_last(out), x64, y, dtype, d, rot, 2)
    rows = (hq + hk) * d
    assert torch.equal(buf[..., rows:], before[..., rows:])  # v and padding untouched
    if not inplace:
        assert torch.equal(buf, before)


@pytest.mark.parametrize("dtype, cache_dtype, rot, is_neox, inplace", [
    ("bfloat16", "float32", 64, True, True),
    ("bfloat16", "bfloat16", 32, False, False),
    ("float32", "float32", 48, False, True),
    ("float32", "bfloat16", 64, True, False),
])
def test_emulated_cache_path_few_and_many_token_code(emulate, dtype, cache_dtype, rot, is_neox,
                                                     inplace):
    """From a cache with positions (vLLM's call), the kernel the planner compiles for few
    tokens (FEW_TOKENS: the position load first, rotated values rounded a vector at a time),
    the one for many, and the few-token one with 2-element accesses (few_vec) all match the
    float64 reference, positions outside the cache giving the identity, and each other bit
    for bit (one rounding, to nearest even, any way). The few-token kernels here are the
    decode build (one token dim: predicated cache-row loads, 32-bit offsets)."""
    T, hq, hk, d, max_pos = 6, 3, 2, 64, 40
    g = torch.Generator().manual_seed(1)
    q0 = torch.randn(T, hq * d, generator=g).to(DTYPES[dtype])
    k0 = torch.randn(T, hk * d, generator=g).to(DTYPES[dtype])
    pos = torch.tensor([3, 39, 0, 40, 17, -1], dtype=torch.int64)  # 40, -1: outside the cache
    angles = torch.rand(max_pos, rot // 2, generator=g, dtype=torch.float64) * 100 - 50
    cache = torch.cat([angles.cos(), angles.sin()], -1).to(DTYPES[cache_dtype])
    call = RopeCall(inplace, d, rot, is_neox, POSITIONS, None)
    outs = []
    # the few-token kernel, the many-token one (small_waves=0 forces it on the same tiny
    # problem) and the few-token one with half-width accesses (few_vec: shorter chunks)
    tunings = (DEFAULT_TUNING, dataclasses.replace(DEFAULT_TUNING, small_waves=0.0),
               dataclasses.replace(DEFAULT_TUNING, few_vec=2))
    for tuning in tunings:
        q, k = q0.clone(), k0.clone()
        plan = plan_rope(call, RopeArrays(_desc(q), _desc(k), _desc(pos), cos_sin_cache=_desc(cache)),
                         num_sms=132, tuning=tuning)
        assert plan.spec.few_tokens == (tuning.small_waves > 0) == (not plan.spec.tokens_2d)
        assert (plan.spec.vec == 2) == (tuning.few_vec == 2)
        if inplace:
            qo, ko = q, k
        else:
            qo = torch.full(plan.q_out_shape, float("nan"), dtype=q.dtype)
            ko = torch.full(plan.k_out_shape, float("nan"), dtype=k.dtype)
        params = pack(plan, q=q.data_ptr(), k=k.data_ptr(), q_out=qo.data_ptr(),
                      k_out=ko.data_ptr(), positions=pos.data_ptr(), cache=cache.data_ptr())
        emulate(plan.spec, params, plan.launch.grid, plan.launch.block, plan.launch.smem)
        if not inplace:
            assert torch.equal(q, q0) and torch.equal(k, k0)
        outs.append((qo, ko))
    inside = ((pos >= 0) & (pos < max_pos)).numpy()
    c64 = np.zeros((T, rot // 2)) + 1.0
    s64 = np.zeros((T, rot // 2))
    cached = cache.double().numpy()[pos.clamp(0, max_pos - 1).numpy()]
    c64[inside], s64[inside] = cached[inside, :rot // 2], cached[inside, rot // 2:]
    for qo, ko in outs:
        for out, x, h in ((qo, q0, hq), (ko, k0, hk)):
            x64 = x.double().numpy().reshape(T, h, d)
            y = reference.apply_rotary(x64, c64, s64, is_neox)
            assert_rope_close(out.view(T, h, d), x64, y, dtype, d, rot, 1)
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(outs[0], o))
