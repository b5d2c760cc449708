"""The public API on a machine with no GPU (docs/api.md and docs/errors.md).

* ``import rope_jit`` needs only NumPy: it imports neither CuPy nor torch;
* every entry point has FlashInfer's / vLLM's exact parameter names and defaults;
* GPU entry points called with host arrays fail in validation, with a TypeError naming
  the argument, before CuPy, NVRTC or a kernel is touched (checked in a process where
  CuPy cannot even be imported);
* the on-the-fly frequency parameters the launcher derives reproduce the reference.
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rope_jit
from rope_jit import jit, launch, reference
from rope_jit.call import frequencies_json
from rope_jit.scaling import on_the_fly_values


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


# ------------------------------------------------------------------ import

def test_import_does_not_import_cupy():
    """`import rope_jit` leaves CuPy (and torch) unimported."""
    r = _run_python("import rope_jit, sys; print('cupy' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    r = _run_python("""
        import rope_jit, sys
        print(sorted(m for m in sys.modules
                     if m.split('.')[0] in ('cupy', 'cupy_backends', 'torch', 'jax', 'numba')))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_public_names():
    """__all__ lists what docs/api.md requires, and every name exists."""
    required = {
        "apply_rope_inplace_with_cache", "apply_rope_with_cos_sin_cache",
        "apply_rope_with_cos_sin_cache_inplace", "apply_rope", "apply_rope_inplace",
        "apply_rope_pos_ids", "apply_rope_pos_ids_inplace", "apply_llama31_rope",
        "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
        "apply_llama31_rope_pos_ids_inplace", "positions_from_offsets", "compute_cos_sin_cache",
    }
    assert required <= set(rope_jit.__all__)
    for name in rope_jit.__all__:
        assert hasattr(rope_jit, name), name
    assert isinstance(rope_jit.__version__, str) and rope_jit.__version__


# ------------------------------------------------------------------ signatures

_E = inspect.Parameter.empty
_FLY = [("rotary_dim", None), ("interleave", False), ("rope_scale", 1), ("rope_theta", 1e4)]
_LLAMA = [("rotary_dim", None), ("interleave", False), ("rope_scale", 8), ("rope_theta", 5e5),
          ("low_freq_factor", 1), ("high_freq_factor", 4), ("old_context_len", 8192)]
_CACHE = [("positions", _E), ("query", _E), ("key", _E), ("head_size", _E), ("cos_sin_cache", _E)]

SIGNATURES = {
    # vLLM's torch.ops._C.rotary_embedding
    "apply_rope_inplace_with_cache": _CACHE + [("is_neox", _E)],
    # FlashInfer
    "apply_rope_with_cos_sin_cache": _CACHE + [("is_neox", True)],
    "apply_rope_with_cos_sin_cache_inplace": _CACHE + [("is_neox", True)],
    "apply_rope": [("q", _E), ("k", _E), ("indptr", _E), ("offsets", _E)] + _FLY,
    "apply_rope_inplace": [("q", _E), ("k", _E), ("indptr", _E), ("offsets", _E)] + _FLY,
    "apply_rope_pos_ids": [("q", _E), ("k", _E), ("pos_ids", _E)] + _FLY,
    "apply_rope_pos_ids_inplace": [("q", _E), ("k", _E), ("pos_ids", _E)] + _FLY,
    "apply_llama31_rope": [("q", _E), ("k", _E), ("indptr", _E), ("offsets", _E)] + _LLAMA,
    "apply_llama31_rope_inplace": [("q", _E), ("k", _E), ("indptr", _E), ("offsets", _E)] + _LLAMA,
    "apply_llama31_rope_pos_ids": [("q", _E), ("k", _E), ("pos_ids", _E)] + _LLAMA,
    "apply_llama31_rope_pos_ids_inplace": [("q", _E), ("k", _E), ("pos_ids", _E)] + _LLAMA,
    "positions_from_offsets": [("indptr", _E), ("offsets", _E)],
    # transformers
    "apply_rotary_pos_emb": [("q", _E), ("k", _E), ("cos", _E), ("sin", _E), ("unsqueeze_dim", 1)],
    "apply_rotary_pos_emb_inplace": [("q", _E), ("k", _E), ("cos", _E), ("sin", _E),
                                     ("unsqueeze_dim", 1)],
    "apply_rotary_pos_emb_interleave": [("q", _E), ("k", _E), ("cos", _E), ("sin", _E),
                                        ("position_ids", None), ("unsqueeze_dim", 1)],
    # flash-attn (its cu_seqlens / max_seqlen are not offered)
    "apply_rotary_emb": [("x", _E), ("cos", _E), ("sin", _E), ("interleaved", False),
                         ("inplace", False), ("seqlen_offsets", 0)],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    """Positional parameters: exactly the reference library's names, order and defaults
    (compared by value: FlashInfer writes rope_scale=1, 1.0 is the same default).
    Anything extra must be optional, so every existing call keeps working."""
    params = list(inspect.signature(getattr(rope_jit, name)).parameters.values())
    want = SIGNATURES[name]
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional[:len(want)]] == [n for n, _ in want]
    for p, (n, default) in zip(positional, want):
        if default is _E:
            assert p.default is _E, f"{n} must be required"
        else:
            assert p.default is not _E and p.default == default, (n, p.default, default)
    for p in params[len(want):]:
        assert p.default is not _E, f"extra parameter {p.name} must have a default"
        assert p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    assert not any(p.kind in (p.VAR_POSITIONAL,) for p in params)


def test_rope_defaults_are_exact():
    """Spot-check the documented numbers once more, by name."""
    sig = inspect.signature(rope_jit.apply_llama31_rope_pos_ids_inplace).parameters
    assert (sig["rope_scale"].default, sig["rope_theta"].default, sig["low_freq_factor"].default,
            sig["high_freq_factor"].default, sig["old_context_len"].default) == (8, 5e5, 1, 4, 8192)
    sig = inspect.signature(rope_jit.apply_rope).parameters
    assert (sig["rope_scale"].default, sig["rope_theta"].default) == (1, 1e4)
    assert inspect.signature(rope_jit.apply_rope_with_cos_sin_cache).parameters["is_neox"].default is True


# ------------------------------------------------------------------ host arrays are refused

T, HQ, HK, D = 4, 2, 1, 64


def _torch_args(torch, name):
    """Valid-looking CPU torch arguments for entry point `name` (positional)."""
    g = torch.Generator().manual_seed(0)
    if name == "apply_rotary_emb":  # x [batch, seq, heads, head_dim], cos/sin [seq, R/2]
        return (torch.randn(1, T, HQ, D, generator=g), torch.randn(T, D // 2, generator=g),
                torch.randn(T, D // 2, generator=g))
    if "rotary" in name:  # transformers: q/k [batch, heads, seq, head_dim], cos/sin [batch, seq, R]
        return (torch.randn(1, HQ, T, D, generator=g), torch.randn(1, HK, T, D, generator=g),
                torch.randn(1, T, D, generator=g), torch.randn(1, T, D, generator=g))
    if "cache" in name:
        q = torch.randn(T, HQ * D, generator=g)
        k = torch.randn(T, HK * D, generator=g)
        return (torch.arange(T), q, k, D, torch.randn(32, D, generator=g), True)
    q = torch.randn(T, HQ, D, generator=g)
    k = torch.randn(T, HK, D, generator=g)
    if "pos_ids" in name:
        return (q, k, torch.arange(T, dtype=torch.int32))
    return (q, k, torch.tensor([0, 1, T], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32))


GPU_ENTRY_POINTS = sorted(n for n in SIGNATURES if n != "positions_from_offsets")


@pytest.mark.parametrize("name", GPU_ENTRY_POINTS)
def test_cpu_torch_tensors_refused(name):
    """CPU torch tensors: TypeError naming the query argument and 'host memory', raised in
    validation: nothing compiled, in-place inputs untouched."""
    torch = pytest.importorskip("torch")
    args = _torch_args(torch, name)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    compiles = jit.stats.compiles
    with pytest.raises(TypeError, match=r"^(q|query): expected a CUDA device array .*host memory"):
        getattr(rope_jit, name)(*args)
    assert jit.stats.compiles == compiles
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_cpu_torch_refused_without_cupy():
    """Validation needs no CuPy: in a process where `import cupy` fails, CPU tensors still
    get the TypeError (not an ImportError), for each kind of entry point."""
    pytest.importorskip("torch")
    r = _run_python("""
        import sys
        sys.modules['cupy'] = None  # import cupy raises ImportError
        import torch, rope_jit
        q3, k3 = torch.randn(4, 2, 64), torch.randn(4, 1, 64)
        calls = [
            lambda: rope_jit.apply_rope_inplace_with_cache(torch.arange(4), q3.view(4, 128),
                                                           None, 64, torch.randn(8, 64), True),
            lambda: rope_jit.apply_rope(q3, k3, torch.tensor([0, 4], dtype=torch.int32),
                                        torch.tensor([0], dtype=torch.int32)),
            lambda: rope_jit.apply_llama31_rope_pos_ids_inplace(q3, k3, torch.arange(4)),
        ]
        for call in calls:
            try:
                call()
                print('no error')
            except TypeError as e:
                print('TypeError', 'host' in str(e))
            except Exception as e:
                print(type(e).__name__, e)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["TypeError True"] * 3, r.stdout


def test_missing_cupy_names_the_extra():
    """Where CuPy is genuinely needed (NVRTC) and missing: ImportError naming the extra to
    install. Host-only features keep working without it."""
    r = _run_python("""
        import sys
        sys.modules['cupy'] = None
        import numpy as np, rope_jit
        from rope_jit import jit
        print(rope_jit.compute_cos_sin_cache(8, 4).shape)
        print(rope_jit.positions_from_offsets(np.array([0, 2], np.int32), np.array([5], np.int32)).tolist())
        try:
            jit.compile_cubin('extern "C" __global__ void f() {}', 'sm_90')
        except ImportError as e:
            print('ImportError', 'rope_jit[cuda12]' in str(e), 'cupy-cuda12x' in str(e))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["(4, 8)", "[5, 6]", "ImportError True True"], r.stdout


def _numpy_args(name):
    """The CPU torch arguments of `name`, as NumPy arrays."""
    import torch

    return tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in _torch_args(torch, name))


@pytest.mark.parametrize("name", ["apply_rope_inplace_with_cache", "apply_rope_with_cos_sin_cache",
                                  "apply_rope", "apply_rope_pos_ids_inplace"])
def test_numpy_arrays_refused(name):
    """NumPy arrays are host memory: TypeError naming the argument and 'host'."""
    pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^(q|query): .*host"):
        getattr(rope_jit, name)(*_numpy_args(name))


@pytest.mark.parametrize("name, position, names", [
    pytest.param("apply_rope_inplace_with_cache", 1, ("query",), id="vllm-query"),
    pytest.param("apply_rope_pos_ids", 0, ("q", "query"), id="flashinfer-q"),
    pytest.param("apply_rope_inplace_with_cache", 2, ("key",), id="vllm-key"),
    pytest.param("apply_rope_inplace_with_cache", 0, ("positions",), id="vllm-positions"),
    pytest.param("apply_rope_inplace_with_cache", 4, ("cos_sin_cache",), id="vllm-cache"),
    pytest.param("apply_rope", 1, ("k", "key"), id="flashinfer-k"),
    pytest.param("apply_rope", 2, ("indptr",), id="flashinfer-indptr"),
    pytest.param("apply_rope", 3, ("offsets",), id="flashinfer-offsets"),
    pytest.param("apply_rope_pos_ids", 2, ("pos_ids", "positions"), id="flashinfer-pos_ids",),
])
def test_unsupported_object_names_the_argument(name, position, names):
    """An argument that is no array at all (a list, a string): TypeError whose message
    starts with that argument's name (the function's own name for it, or its vLLM /
    FlashInfer synonym)."""
    torch = pytest.importorskip("torch")
    args = list(_torch_args(torch, name))
    args[position] = [[1.0, 2.0]] if position else "not an array"
    with pytest.raises(TypeError, match=rf"^({'|'.join(names)}): expected a torch tensor"):
        getattr(rope_jit, name)(*args)


def test_transformers_signatures_are_transformers_own():
    """The per-token functions take exactly the parameters of the transformers functions
    they stand in for (read from the installed transformers)."""
    pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    deepseek = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(rope_jit.apply_rotary_pos_emb) == params(llama.apply_rotary_pos_emb)
    assert (params(rope_jit.apply_rotary_pos_emb_interleave)
            == params(deepseek.apply_rotary_pos_emb_interleave))


@pytest.mark.parametrize("name", ["apply_rotary_pos_emb", "apply_rotary_pos_emb_inplace",
                                  "apply_rotary_pos_emb_interleave", "apply_rotary_emb"])
@pytest.mark.parametrize("which", ["cos", "sin"])
def test_cos_sin_requiring_grad_refused(name, which):
    """cos and sin get no gradient: one that requires grad under grad mode is refused with
    a ValueError naming it, before anything runs; under no_grad the call goes on (to the
    host-memory TypeError of CPU tensors)."""
    torch = pytest.importorskip("torch")
    args = list(_torch_args(torch, name))
    pos = (1 if name == "apply_rotary_emb" else 2) + (which == "sin")
    args[pos].requires_grad_()
    with pytest.raises(ValueError, match=rf"^{which}: requires grad, but rope_jit gives cos and sin no gradient"):
        getattr(rope_jit, name)(*args)
    with torch.no_grad(), pytest.raises(TypeError, match="host memory"):
        getattr(rope_jit, name)(*args)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(seqlen_offsets=1.5), TypeError, r"^seqlen_offsets: expected an integer"),
    (dict(seqlen_offsets=1), ValueError,
     r"^cos: expected shape \[seqlen_ro, rotary_dim / 2\] with seqlen_ro >= seqlen_offsets \+ seqlen = 5, got \[4, 32\]"),
    (dict(seqlen_offsets=-1), ValueError, r"^cos: expected shape"),
    (dict(x_shape=(T, HQ, D)), ValueError, r"^x: expected shape \[batch, seqlen, nheads, headdim\], got \[4, 2, 64\]"),
    (dict(cos_shape=(1, T, D // 2)), ValueError, r"^cos: expected shape \[seqlen_ro, rotary_dim / 2\]"),
])
def test_flash_attn_arguments_checked(kwargs, exc, match):
    torch = pytest.importorskip("torch")
    x, cos, sin = _torch_args(torch, "apply_rotary_emb")
    x = x.reshape(kwargs.pop("x_shape", x.shape))
    cos = sin = cos.reshape(kwargs.pop("cos_shape", cos.shape))
    with pytest.raises(exc, match=match):
        rope_jit.apply_rotary_emb(x, cos, sin, **kwargs)


def test_flash_attn_rows_from_seqlen_offsets(monkeypatch):
    """cos/sin with more rows than the sequence: the planner gets rows seqlen_offsets ..
    seqlen_offsets + seqlen as views (no copy), and the flash-attn call (half-width cos,
    heads before head_dim, GPT-J pairs when interleaved)."""
    torch = pytest.importorskip("torch")
    from rope_jit import route
    from rope_jit.call import COS_SIN_HALF

    seen = []
    monkeypatch.setattr(route, "rope", lambda call, q, k, **a: seen.append((call, q, k, a)) or (q, k))
    x, _, _ = _torch_args(torch, "apply_rotary_emb")
    cos, sin = torch.randn(3 * T, D // 2), torch.randn(3 * T, D // 2)
    assert rope_jit.apply_rotary_emb(x, cos, sin, interleaved=True, seqlen_offsets=2) is x
    call, q, k, a = seen[-1]
    assert q is x and k is None
    assert a["cos"].data_ptr() == cos[2].data_ptr() and a["cos"].shape == (T, D // 2)
    assert a["sin"].data_ptr() == sin[2].data_ptr() and a["sin"].shape == (T, D // 2)
    assert (call.convention, call.is_neox, call.inplace, call.heads_dim) == (COS_SIN_HALF, False, False, None)
    c, s = cos[:T], sin[:T]
    rope_jit.apply_rotary_emb(x, c, s, inplace=True)  # as many rows as tokens: passed as given
    call, _, _, a = seen[-1]
    assert a["cos"] is c and a["sin"] is s and call.inplace and call.is_neox


@pytest.mark.parametrize("nnz", [None, 10])
def test_positions_from_offsets_cpu_torch(nnz):
    """CPU torch tensors: either the positions as a CPU tensor, or a TypeError naming
    host memory; never a CUDA error."""
    torch = pytest.importorskip("torch")
    indptr = torch.tensor([0, 1, 5, 10], dtype=torch.int64)
    offsets = torch.tensor([4, 6, 3], dtype=torch.int64)
    try:
        got = rope_jit.positions_from_offsets(indptr, offsets, nnz)
    except TypeError as e:
        assert "host" in str(e)
        return
    assert isinstance(got, torch.Tensor) and got.device.type == "cpu"
    assert got.tolist() == [4, 6, 7, 8, 9, 3, 4, 5, 6, 7]


def test_positions_from_offsets_rejects_lists():
    """Plain Python lists are not arrays: TypeError naming indptr."""
    with pytest.raises(TypeError, match=r"^indptr: expected a torch tensor"):
        rope_jit.positions_from_offsets([0, 1], [3])


# ------------------------------------------------------------------ on-the-fly parameters

def _kernel_frequencies(rot, fly):
    """The kernel's formulation (kernels/rope.cu, fly_cos_sin) of the frequencies and the
    cos/sin factor, fed with the planner's values (scaling.OnTheFly): inv =
    2^(j*freq_exponent); linear: f = inv*inv_scale; llama3 / yarn: w = clamp(x*a + b, 0, 1)
    with x = inv / j, f = (1-w)*inv*inv_scale + w*inv."""
    j = np.arange(rot // 2, dtype=np.float64)
    inv = np.exp2(j * fly.freq_exponent)
    if fly.variant == "linear":
        return inv * fly.inv_scale, fly.attention_factor
    x = inv if fly.variant == "llama3" else j
    w = np.clip(x * fly.ramp_a + fly.ramp_b, 0.0, 1.0)
    return (1 - w) * (inv * fly.inv_scale) + w * inv, fly.attention_factor


def _fly_values(rot, theta, scale, llama):
    return on_the_fly_values(frequencies_json(theta, scale, llama31=llama), rot)


@pytest.mark.parametrize("rot, theta, scale, llama", [
    (128, 1e4, 1.0, None), (64, 5e5, 2.0, None), (20, 1e4, 1.0, None),
    (128, 5e5, 8.0, (1.0, 4.0, 8192)), (64, 1e4, 4.0, (2.0, 8.0, 2048)),
])
def test_on_the_fly_frequencies_match_reference(rot, theta, scale, llama):
    """The kernel's clamped-blend parameters reproduce the reference frequencies: linear
    scaling divides by rope_scale; Llama 3.1 matches transformers' piecewise bands."""
    want = reference.inv_frequencies(rot, base=theta, rope_scale=scale, llama31=llama)
    got, attention = _kernel_frequencies(rot, _fly_values(rot, theta, scale, llama))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    assert attention == 1.0


@pytest.mark.parametrize("theta, scale, llama, match", [
    (1.0, 1.0, None, "^rope_theta"), (0.0, 1.0, None, "^rope_theta"),
    (-1e4, 1.0, None, "^rope_theta"), (math.inf, 1.0, None, "^rope_theta"),
    (math.nan, 1.0, None, "^rope_theta"), ("1e4", 1.0, None, "^rope_theta"),
    (1e4, 0.0, None, "^rope_scale"), (1e4, -8.0, None, "^rope_scale"), (1e4, math.inf, None, "^rope_scale"),
    (5e5, 8.0, (0.0, 4.0, 8192), "^low_freq_factor"), (5e5, 8.0, (4.0, 4.0, 8192), "^high_freq_factor"),
    (5e5, 8.0, (1.0, 4.0, 0), "^old_context_len"), (5e5, "8", (1.0, 4.0, 8192), "^rope_scale"),
])
def test_on_the_fly_parameter_errors(theta, scale, llama, match):
    """Bad rope_theta / rope_scale / Llama 3.1 parameters: ValueError naming the argument
    as the FlashInfer-style functions call it."""
    with pytest.raises(ValueError, match=match):
        _fly_values(128, theta, scale, llama)


# ------------------------------------------------------------------ devices (docs/api.md)

def _desc(shape, dtype="bfloat16", device=0, ptr=0):
    from rope_jit.arrays import ArrayDesc, contiguous_strides

    return ArrayDesc(ptr, tuple(shape), contiguous_strides(shape), dtype, device)


@pytest.mark.parametrize("moved", ["key", "positions", "cos_sin_cache"])
def test_plan_refuses_arrays_on_two_devices_cache(moved):
    """Every array of a call on query's device, else ValueError naming the one that is not
    (the planner, on ArrayDescs: no GPU involved)."""
    from test_plan import plan_rope  # the planner fed as the public functions feed it

    dev = {moved: 1}
    with pytest.raises(ValueError, match=rf"^{moved} is on cuda:1 but query is on cuda:0"):
        plan_rope(_desc((8, 256)), _desc((8, 128), device=dev.get("key", 0)), head_size=64,
                  is_neox=True, positions=_desc((8,), "int64", dev.get("positions", 0)),
                  cos_sin_cache=_desc((32, 64), "float32", dev.get("cos_sin_cache", 0)),
                  inplace=True)


@pytest.mark.parametrize("moved", ["indptr", "offsets"])
def test_plan_refuses_arrays_on_two_devices_indptr(moved):
    from test_plan import plan_rope  # the planner fed as the public functions feed it

    with pytest.raises(ValueError, match=rf"^{moved} is on cuda:2 but query is on cuda:0"):
        plan_rope(_desc((8, 4, 64)), None, head_size=None, is_neox=True,
                  indptr=_desc((3,), "int32", 2 if moved == "indptr" else 0),
                  offsets=_desc((2,), "int32", 2 if moved == "offsets" else 0), inplace=False)


class _DLPackOnly:
    """Metadata-only stand-in for a foreign array: __dlpack_device__ is all rope_jit may
    read before the devices are checked (no export, no GPU)."""

    def __init__(self, device_type, device_id, shape=(4, 2, 64)):
        self._dev = (device_type, device_id)
        self.shape = shape

    def __dlpack__(self, *a, **kw):
        raise AssertionError("exported before the device check")

    def __dlpack_device__(self):
        return self._dev


@pytest.fixture
def no_gpu(monkeypatch):
    """Fail the test if anything reaches CuPy (views, streams, launches)."""
    def refuse():
        raise AssertionError("CuPy touched before the arguments were checked")
    monkeypatch.setattr(launch, "cupy_module", refuse)


@pytest.mark.parametrize("moved", ["key", "pos_ids"])
def test_foreign_arrays_on_two_devices_refused_before_any_gpu_work(moved, no_gpu):
    q = _DLPackOnly(2, 0)
    k = _DLPackOnly(2, 1 if moved == "key" else 0)
    pos = _DLPackOnly(2, 1 if moved == "pos_ids" else 0)
    name = "key" if moved == "key" else "positions"
    with pytest.raises(ValueError, match=rf"^{name} is on cuda:1 but query is on cuda:0"):
        rope_jit.apply_rope_pos_ids(q, k, pos)


@pytest.mark.parametrize("device_type, error", [(1, "host memory"), (3, "host memory"),
                                                (10, "DLPack device type 10")])
def test_foreign_arrays_not_on_a_cuda_device_refused(device_type, error, no_gpu):
    """DLPack CPU (1) and pinned host (3) memory, or a non-CUDA device (10, ROCm): TypeError
    naming the argument."""
    with pytest.raises(TypeError, match=rf"^positions: expected a CUDA device array.*{error}"):
        rope_jit.apply_rope_pos_ids(_DLPackOnly(2, 0), None, _DLPackOnly(device_type, 0))


def test_jax_like_arrays_refused_in_place(no_gpu):
    """Arrays of an immutable framework (JAX, recognised by its module) in an in-place
    function: TypeError saying why, before anything else."""
    fake_jax = type("ArrayImpl", (_DLPackOnly,), {"__module__": "jaxlib.xla_extension"})
    with pytest.raises(TypeError, match=r"^query: jaxlib.xla_extension.ArrayImpl arrays are "
                                        r"immutable; use the out-of-place function"):
        rope_jit.apply_rope_pos_ids_inplace(fake_jax(2, 0), None, _DLPackOnly(2, 0))


class _CAIOnly:
    def __init__(self, ptr, shape, typestr):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape,
                                         "typestr": typestr, "version": 3, "strides": None}


def test_cuda_array_interface_arrays_on_two_devices_refused(monkeypatch, no_gpu):
    """__cuda_array_interface__ carries a pointer only: its device comes from the driver
    (_cuda.pointer_device, replaced here by a table), and disagreeing devices raise before
    any view or launch."""
    from rope_jit import _cuda

    devices = {0x1000: 0, 0x2000: 1, 0x3000: -1}
    monkeypatch.setattr(_cuda, "pointer_device", lambda ptr: devices[ptr])
    q = _CAIOnly(0x1000, (4, 2, 64), "<f2")
    with pytest.raises(ValueError, match=r"^positions is on cuda:1 but query is on cuda:0"):
        rope_jit.apply_rope_pos_ids(q, None, _CAIOnly(0x2000, (4,), "<i8"))
    with pytest.raises(TypeError, match=r"^positions: expected a CUDA device array.*host memory"):
        rope_jit.apply_rope_pos_ids(q, None, _CAIOnly(0x3000, (4,), "<i8"))


def test_external_stream_without_deprecation_warning():
    """CuPy 14 deprecates cupy.cuda.ExternalStream; rope_jit wraps foreign streams with
    Stream.from_external (the CUDA stream protocol), which needs no GPU to construct."""
    cp = pytest.importorskip("cupy")
    import warnings

    from rope_jit import _cuda

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = _cuda.external_stream(0x1234)
    assert isinstance(s, cp.cuda.Stream) and s.ptr == 0x1234
    import pathlib

    src = pathlib.Path(launch.__file__).parent
    assert "ExternalStream(" not in (src / "launch.py").read_text()
    # in _cuda.py, only external_stream's fallback for CuPy < 14 remains
    assert (src / "_cuda.py").read_text().count("cp.cuda.ExternalStream(") == 1
