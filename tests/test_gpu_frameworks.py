"""Every framework on the GPU (marker: gpu): torch.compile and CUDA graphs through the
torch.library ops, autograd against the PyTorch formula, JAX (ordering and zero copy
through DLPack), CuPy, protocol-only arrays, Numba, and devices.

Fresh random inputs per case; results against the float64 reference (rope_jit.reference)
or, for gradients, against autograd of the PyTorch formula written out below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

# JAX otherwise preallocates 75% of the GPU at its first use and starves torch and CuPy in
# the same process. Set before anything initialises a JAX backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

from gpu_cases import CAIOnly, DLPackOnly, assert_rope_close, to_numpy64  # noqa: E402
from test_torch_ops import CALLS, _inputs  # noqa: E402  (every entry point, one call each)

MAX_POS = 4096
SLEEP_CYCLES = 50_000_000  # torch.cuda._sleep: ~25 ms of GPU time on an H100


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


# ================================================================== torch.compile

def _outputs(call, x):
    """Run one entry point; in place: the mutated q and k, else its results."""
    out = call(x)
    if out is None:
        return (x["q"], x["k"])
    return out if isinstance(out, tuple) else (out,)


def _clone_inputs(x):
    return {n: t.clone() for n, t in x.items()}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_compiled_entry_point_equals_eager(name):
    """Each entry point in a function compiled with fullgraph=True (aot_eager: Dynamo,
    fake tensors, functionalization; the graph runs the real op) gives bit-identical results
    to the eager call: same kernel, same inputs."""
    _, call = CALLS[name]
    x = _inputs(device="cuda", dtype=torch.bfloat16)

    def fn(q, k, pos):
        y = dict(x, q=q, k=k, pos=pos)
        return tuple(t * 1 if t is not None else None for t in _outputs(call, y))

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    a, b = _clone_inputs(x), _clone_inputs(x)
    eager = fn(a["q"], a["k"], a["pos"])
    got = compiled(b["q"], b["k"], b["pos"])
    for e, g in zip(eager, got):
        assert (e is None) == (g is None)
        if e is not None:
            assert torch.equal(e, g), name
    assert torch.equal(a["q"], b["q"]) and torch.equal(a["k"], b["k"])  # same mutations


def test_all_entry_points_inductor_no_graph_break():
    """One function calling every entry point: torch._dynamo.explain counts one graph and no
    break, and Inductor's compiled function equals eager."""
    x = _inputs(device="cuda", dtype=torch.float16)

    def fn(q, k, pos):
        outs = []
        for _, call in CALLS.values():
            y = dict(x, q=q.clone(), k=k.clone(), pos=pos)
            outs += [t for t in _outputs(call, y) if t is not None]
        return outs

    torch._dynamo.reset()
    explain = torch._dynamo.explain(fn)(x["q"], x["k"], x["pos"])
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x["q"], x["k"], x["pos"])
    eager = fn(x["q"], x["k"], x["pos"])
    assert len(got) == len(eager)
    for e, g in zip(eager, got):
        assert torch.equal(e, g)


def test_compiled_dynamic_token_counts():
    """Token count marked dynamic: one compiled graph serves several sizes, each equal to
    eager (the op is looked up per call by its fingerprint, not baked in)."""
    def fn(q, k, pos, cache):
        qo, ko = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, 128, cache, True)
        return qo.float() * 2, ko

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    cache = rope_jit.compute_cos_sin_cache(128, MAX_POS, like=torch.empty(1, device="cuda"))
    for i, T in enumerate((5, 77, 300, 1)):
        g = _gen(i)
        q = torch.randn(T, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, 2, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        pos = torch.randint(0, MAX_POS, (T,), generator=g, device="cuda")
        for e, c in zip(fn(q, k, pos, cache), compiled(q, k, pos, cache)):
            assert torch.equal(e, c), T


# ------------------------------------------------------------------ opcheck

def _op_args(kind, *, requires_grad=False, with_key=True, seed=0):
    """Op arguments: the arrays (positions, indptr, offsets, cos_sin_cache, cos, sin), then
    the RopeCall as rope_jit.call.to_op_args packs it."""
    from rope_jit.call import (COS_SIN, COS_SIN_HALF, INDPTR, POSITIONS, RopeCall,
                               frequencies_json, to_op_args)

    g = _gen(seed)
    T, HQ, HK, D = 19, 4, 2, 64
    q = torch.randn(T, HQ, D, generator=g, device="cuda", requires_grad=requires_grad)
    k = (torch.randn(T, HK, D, generator=g, device="cuda", requires_grad=requires_grad)
         if with_key else None)
    pos = torch.randint(0, MAX_POS, (T,), generator=g, device="cuda")
    cache = rope_jit.compute_cos_sin_cache(48, MAX_POS, dtype="bfloat16", like=q)
    indptr = torch.tensor([0, 7, T], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([5, 900], dtype=torch.int32, device="cuda")
    plain = frequencies_json()
    if kind == "cache":
        arrays, call = (pos, None, None, cache, None, None), RopeCall(False, D, None, False)
    elif kind == "fly_llama3":
        arrays = (pos, None, None, None, None, None)
        call = RopeCall(False, None, 32, True, POSITIONS,
                        frequencies_json(5e5, 8.0, llama31=(1.0, 4.0, 8192)))
    elif kind == "indptr_yarn_inverse":
        arrays = (None, indptr, offsets, None, None, None)
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
        call = RopeCall(False, None, D, False, INDPTR, frequencies_json(rope_scaling=yarn),
                        inverse=True)
    elif kind == "mrope":
        arrays = (torch.stack([pos, pos.flip(0), pos // 2]), None, None, None, None, None)
        call = RopeCall(False, None, D, True, POSITIONS, plain, (16, 8, 8), True)
    elif kind == "cos_sin":  # transformers: q/k [batch, heads, seq, D], cos/sin [1, seq, R]
        q = torch.randn(1, HQ, T, D, generator=g, device="cuda", requires_grad=requires_grad)
        k = (torch.randn(1, HK, T, D, generator=g, device="cuda", requires_grad=requires_grad)
             if with_key else None)
        cos, sin = torch.rand(2, 1, T, 48, generator=g, device="cuda")
        arrays = (None, None, None, None, cos, sin)
        call = RopeCall(False, None, None, True, COS_SIN, heads_dim=1)
    elif kind == "cos_sin_half_reordered":  # flash-attn's [seq, R/2]; GPT-J pairs out in NeoX order
        cos, sin = torch.rand(2, T, 16, generator=g, device="cuda", dtype=torch.bfloat16)
        arrays = (None, None, None, None, cos, sin)
        call = RopeCall(False, None, None, False, COS_SIN_HALF, out_neox=True)
    else:
        raise ValueError(kind)
    return (q, k, *arrays, *to_op_args(call))


@pytest.mark.parametrize("kind", ["cache", "fly_llama3", "indptr_yarn_inverse", "mrope", "cos_sin",
                                  "cos_sin_half_reordered"])
@pytest.mark.parametrize("with_key", [True, False])
def test_opcheck(kind, with_key):
    """torch.library.opcheck on each op: schema (declared mutations match what the kernel
    writes), fake vs real metadata, autograd registration, AOT dispatch with dynamic shapes
    (which runs the backward through the real op). Pairs written in the other order are
    out of place only."""
    ops = torch.ops.rope_jit
    torch.library.opcheck(ops.rope.default, _op_args(kind, requires_grad=True, with_key=with_key))
    if kind != "cos_sin_half_reordered":
        torch.library.opcheck(ops.rope_.default, _op_args(kind, with_key=with_key))
    indptr = torch.tensor([0, 3, 3, 10], device="cuda")
    offsets = torch.tensor([7, 0, 100000], device="cuda")
    torch.library.opcheck(ops.positions_from_offsets.default, (indptr, offsets, 12))


# ------------------------------------------------------------------ CUDA graphs

class _Block(torch.nn.Module):
    """A small GQA attention block with RoPE on q and k sliced out of one fused QKV
    projection (vLLM's layout), in place or out of place."""

    def __init__(self, inplace, on_the_fly, hq=8, hk=2, d=64):
        super().__init__()
        self.hq, self.hk, self.d, self.inplace, self.fly = hq, hk, d, inplace, on_the_fly
        self.qkv = torch.nn.Linear(256, (hq + 2 * hk) * d, bias=False)
        self.out = torch.nn.Linear(hq * d, 256, bias=False)

    def forward(self, x, pos, cache):
        T, d = x.shape[0], self.d
        q, k, v = self.qkv(x).split([self.hq * d, self.hk * d, self.hk * d], dim=-1)
        q, k = q.view(T, self.hq, d), k.view(T, self.hk, d)
        if self.inplace and self.fly:
            rope_jit.apply_rope_pos_ids_inplace(q, k, pos, rope_theta=5e5)
        elif self.inplace:
            rope_jit.apply_rope_inplace_with_cache(pos, q, k, d, cache, True)
        elif self.fly:
            q, k = rope_jit.apply_llama31_rope_pos_ids(q, k, pos)
        else:
            q, k = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, d, cache, False)
        rep = self.hq // self.hk
        k = k.repeat_interleave(rep, dim=1)
        v = v.reshape(T, self.hk, d).repeat_interleave(rep, dim=1)
        a = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        return self.out(a.transpose(0, 1).reshape(T, self.hq * d))


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("on_the_fly", [True, False])
def test_reduce_overhead_captures_a_cuda_graph(inplace, on_the_fly, monkeypatch):
    """torch.compile(mode="reduce-overhead"): rope_jit's kernel is launched while a CUDA
    graph is being captured, later steps replay the graph without running rope_jit's Python
    at all, no cudagraph skip is counted, and every step (new inputs copied in) equals
    eager."""
    from torch._dynamo.utils import counters

    from rope_jit import launch

    launches = []
    real_launch = launch._launch_prepared

    def spy(prep, stream, argv):
        launches.append(torch.cuda.is_current_stream_capturing())
        real_launch(prep, stream, argv)

    monkeypatch.setattr(launch, "_launch_prepared", spy)
    torch.manual_seed(0)
    block = _Block(inplace, on_the_fly).cuda()
    T = 48
    cache = rope_jit.compute_cos_sin_cache(64, MAX_POS, like=torch.empty(1, device="cuda"))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    per_step = []
    with torch.no_grad():
        for i in range(6):
            g = _gen(10 + i)
            x = torch.randn(T, 256, generator=g, device="cuda")
            pos = torch.randint(0, MAX_POS, (T,), generator=g, device="cuda")
            launches.clear()
            got = step(x, pos, cache).clone()  # replay outputs are overwritten by the next
            per_step.append(list(launches))
            want = block(x, pos, cache)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert any(any(s) for s in per_step), f"never launched during a capture: {per_step}"
    assert per_step[-1] == [] and per_step[-2] == [], f"later steps must replay: {per_step}"
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


# ================================================================== autograd

def _torch_rope(x, cos, sin, rot, neox):
    """The PyTorch formula (fp32): x [T, H, D]; cos, sin [T, rot/2]."""
    xr, xp = x[..., :rot], x[..., rot:]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        x1, x2 = xr[..., :rot // 2], xr[..., rot // 2:]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    return torch.cat([out, xp], dim=-1)


GRAD_CASES = [
    # (mode, neox, head_size, rot, with_key)
    ("cache", True, 128, 128, True), ("cache", False, 128, 128, True),
    ("cache", True, 128, 64, True), ("cache", False, 80, 32, False),
    ("fly", True, 128, 128, True), ("fly", False, 128, 128, False),
    ("fly", True, 96, 48, True), ("fly", False, 64, 20, True),
    ("fly_llama31", True, 128, 128, True), ("indptr", False, 128, 64, True),
]


def _grad_case(mode, neox, D, rot, with_key, seed, loss_kind="weighted"):
    g = _gen(seed)
    T, HQ, HK = 57, 4, 2
    q = torch.randn(T, HQ, D, generator=g, device="cuda", requires_grad=True)
    k = torch.randn(T, HK, D, generator=g, device="cuda", requires_grad=True) if with_key else None
    pos = torch.randint(0, MAX_POS, (T,), generator=g, device="cuda")
    if mode == "cache":
        cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, like=q)
        rows = cache[pos]
        cos, sin = rows[:, :rot // 2], rows[:, rot // 2:]
        qo, ko = rope_jit.apply_rope_with_cos_sin_cache(pos, q.view(T, HQ * D),
                                                        k.view(T, HK * D) if with_key else None,
                                                        D, cache, neox)
        qo = qo.view(T, HQ, D)
        ko = ko.view(T, HK, D) if with_key else None
    else:
        llama = mode == "fly_llama31"
        inv = reference.inv_frequencies(rot, 5e5 if llama else 1e4, 8.0 if llama else 1.0,
                                        (1.0, 4.0, 8192) if llama else None)
        if mode == "indptr":
            indptr = torch.tensor([0, 20, T], dtype=torch.int32, device="cuda")
            offsets = torch.tensor([100, 3000], dtype=torch.int32, device="cuda")
            pos = rope_jit.positions_from_offsets(indptr, offsets, T)
            qo, ko = rope_jit.apply_rope(q, k, indptr, offsets, rotary_dim=rot,
                                         interleave=not neox)
        else:
            fn = rope_jit.apply_llama31_rope_pos_ids if llama else rope_jit.apply_rope_pos_ids
            qo, ko = fn(q, k, pos, rotary_dim=rot, interleave=not neox)
        c64, s64 = reference.cos_sin(pos.cpu().numpy(), inv)
        cos = torch.from_numpy(c64).float().cuda()
        sin = torch.from_numpy(s64).float().cuda()
    assert (ko is None) == (not with_key)
    wq = torch.randn(qo.shape, generator=g, device="cuda")
    wk = torch.randn(k.shape, generator=g, device="cuda") if with_key else None

    def loss(a, b):
        if loss_kind == "sum":  # expanded (stride 0) upstream gradients
            return a.sum() + (b.sum() if b is not None else 0)
        return (a * wq).sum() + ((b * wk).sum() if b is not None else 0)

    grads = torch.autograd.grad(loss(qo, ko), (q, k) if with_key else (q,))
    q2 = q.detach().clone().requires_grad_()
    k2 = k.detach().clone().requires_grad_() if with_key else None
    ref_q = _torch_rope(q2, cos, sin, rot, neox)
    ref_k = _torch_rope(k2, cos, sin, rot, neox) if with_key else None
    torch.testing.assert_close(qo.detach(), ref_q.detach(), rtol=1e-5, atol=2e-5)
    ref = torch.autograd.grad(loss(ref_q, ref_k), (q2, k2) if with_key else (q2,))
    return grads, ref


@pytest.mark.parametrize("mode, neox, head_size, rot, with_key", GRAD_CASES)
def test_gradients_match_the_pytorch_formula(mode, neox, head_size, rot, with_key):
    """Out-of-place entry points are differentiable w.r.t. q and k: gradients equal
    autograd of the PyTorch formula in fp32 (pass-through part: gradient unchanged)."""
    grads, ref = _grad_case(mode, neox, head_size, rot, with_key, seed=head_size + rot)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
        assert torch.equal(got[..., rot:], want[..., rot:])  # pass-through: exactly the grad


def test_gradients_from_expanded_upstream_grads():
    """loss = out.sum() hands backward a stride-0 gradient; it is made contiguous first."""
    for with_key in (True, False):
        grads, ref = _grad_case("fly", True, 64, 64, with_key, seed=3, loss_kind="sum")
        for got, want in zip(grads, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_only_k_requires_grad():
    """q without grad, k with: k gets the formula's gradient, q's result carries none."""
    g = _gen(4)
    q = torch.randn(9, 2, 64, generator=g, device="cuda")
    k = torch.randn(9, 1, 64, generator=g, device="cuda", requires_grad=True)
    w = torch.randn(9, 1, 64, generator=g, device="cuda")
    pos = torch.arange(9, device="cuda") * 37
    qo, ko = rope_jit.apply_rope_pos_ids(q, k, pos)
    assert ko.requires_grad
    (gk,) = torch.autograd.grad((ko * w).sum(), (k,))
    inv = reference.inv_frequencies(64)
    c, s = (torch.from_numpy(a).float().cuda() for a in reference.cos_sin(pos.cpu().numpy(), inv))
    k2 = k.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad((_torch_rope(k2, c, s, 64, True) * w).sum(), (k2,))
    torch.testing.assert_close(gk, ref, rtol=1e-5, atol=2e-5)


def test_compiled_training_step_gradients_equal_eager():
    """A compiled (Inductor) training step: forward and backward graphs both call the op
    (the backward with inverse=True); gradients equal the eager ones exactly."""
    block = _Block(inplace=False, on_the_fly=False).cuda()
    cache = rope_jit.compute_cos_sin_cache(64, MAX_POS, like=torch.empty(1, device="cuda"))
    g = _gen(5)
    x = torch.randn(40, 256, generator=g, device="cuda")
    pos = torch.randint(0, MAX_POS, (40,), generator=g, device="cuda")

    def grads(fn):
        block.zero_grad(set_to_none=True)
        fn(x, pos, cache).square().mean().backward()
        return [p.grad.clone() for p in block.parameters()]

    eager = grads(block)
    torch._dynamo.reset()
    compiled = grads(torch.compile(block, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, (op, _) in CALLS.items() if op == "rope_"))
def test_inplace_with_grad_raises_and_leaves_inputs(name):
    _, call = CALLS[name]
    x = _inputs(device="cuda")
    x["q"].requires_grad_()
    before = {n: t.detach().clone() for n, t in x.items()}
    with pytest.raises(RuntimeError, match=r"^query: requires grad"):
        call(x)
    torch.cuda.synchronize()
    for n, t in x.items():
        assert torch.equal(t.detach(), before[n])


# ================================================================== JAX

def _jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        return jax, jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")


def _jax_to_torch(a):
    return torch.from_dlpack(a)  # zero copy, bf16 included


JAX_CALLS = {
    "apply_rope_with_cos_sin_cache": lambda q, k, pos, cache, ind, off: (
        rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, 64, cache, False)),
    "apply_rope_pos_ids": lambda q, k, pos, cache, ind, off: rope_jit.apply_rope_pos_ids(
        q, k, pos, rotary_dim=32),
    "apply_rope": lambda q, k, pos, cache, ind, off: rope_jit.apply_rope(q, k, ind, off,
                                                                         interleave=True),
    "apply_llama31_rope_pos_ids": lambda q, k, pos, cache, ind, off: (
        rope_jit.apply_llama31_rope_pos_ids(q, None, pos)),
}


@pytest.mark.parametrize("name", sorted(JAX_CALLS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_jax_out_of_place_against_reference(name, dtype):
    """jax.Array in, jax.Array out, on the same device, within 1 ulp of the float64
    reference; pass-through bit-identical."""
    jax, gpu = _jax_gpu()
    import jax.numpy as jnp

    rng = np.random.default_rng(hash((name, dtype)) & 0xFFFF)
    T, D = 33, 64
    put = lambda a, dt: jax.device_put(jnp.asarray(a, dtype=dt), gpu)  # noqa: E731
    q = put(rng.standard_normal((T, 4, D)), dtype)
    k = put(rng.standard_normal((T, 2, D)), dtype)
    pos_np = rng.integers(0, MAX_POS, T)
    pos = put(pos_np, jnp.int32)
    cache = put(reference.cos_sin_cache(64, MAX_POS), jnp.float32)
    ind_np, off_np = np.array([0, 10, T], np.int32), np.array([7, 2000], np.int32)
    qo, ko = JAX_CALLS[name](q, k, pos, cache, put(ind_np, jnp.int32), put(off_np, jnp.int32))
    assert isinstance(qo, jax.Array) and qo.dtype == q.dtype and qo.shape == q.shape
    assert qo.devices() == {gpu}
    rot = 32 if name == "apply_rope_pos_ids" else D
    llama = "llama31" in name
    inv = reference.inv_frequencies(rot, 5e5 if llama else 1e4, 8.0 if llama else 1.0,
                                    (1.0, 4.0, 8192) if llama else None)
    p = reference.positions_from_offsets(ind_np, off_np) if name == "apply_rope" else pos_np
    cos, sin = reference.cos_sin(p, inv)
    neox = name in ("apply_rope_pos_ids", "apply_llama31_rope_pos_ids")
    for src, out, what in ((q, qo, "q"), (k, ko, "k")):
        if out is None:
            continue
        x64 = to_numpy64(_jax_to_torch(src))
        ref = reference.apply_rotary(x64, cos, sin, neox)
        assert_rope_close(_jax_to_torch(out), x64, ref, dtype, D, rot, 1, f"jax {what}")


def test_jax_ordering_without_host_sync_and_zero_copy(monkeypatch):
    """No stale reads in either direction, and no block_until_ready anywhere:
    * producer: q comes from a JAX computation of tens of milliseconds, dispatched
      asynchronously, and rope_jit reads it at once on a non-blocking CuPy stream (no
      implicit ordering with JAX's streams): only the DLPack handshake (CuPy passes its
      stream to jax.Array.__dlpack__, JAX makes it wait for the buffer) orders the read
      after the write. The warm-up ran on other values, so a read of a recycled buffer or
      of a half-written one shows;
    * consumer: the RoPE kernel is queued behind ~25 ms of sleep on that stream and JAX
      consumes the result at once: only jax.numpy.from_dlpack's handshake (JAX passes its
      stream to CuPy's __dlpack__, CuPy makes it wait) orders JAX's read after our write.
      The CuPy pool of that stream is poisoned with NaN, so an early read shows.
    * zero copy: the CuPy view rope_jit reads is JAX's buffer, and the jax.Array returned
      is a view of the CuPy output."""
    jax, gpu = _jax_gpu()
    import cupy as cp
    import jax.numpy as jnp

    from rope_jit import arrays

    views, outs = [], []
    prepare, from_cupy = arrays.DLPackFramework.prepare, arrays.DLPackFramework.from_cupy
    monkeypatch.setattr(arrays.DLPackFramework, "prepare",
                        lambda self, obj: views.append(prepare(self, obj)) or views[-1])
    monkeypatch.setattr(arrays.DLPackFramework, "from_cupy",
                        lambda self, arr, like: outs.append(arr) or from_cupy(self, arr, like))

    T, H, D, N = 4096, 8, 128, 2048
    rng = np.random.default_rng(0)
    w = jax.device_put(jnp.asarray(rng.standard_normal((N, N)) / 45, jnp.float32), gpu)

    @jax.jit
    def slow_q(x):  # 200 chained 2048^3 matmuls (3.4 TFLOP), then q [T, H, D]
        x = jax.lax.fori_loop(0, 200, lambda i, y: jnp.tanh(y @ w), x)
        return x.reshape(T, H, D).astype(jnp.bfloat16)

    consume = jax.jit(lambda a: a.astype(jnp.float32) * 2.0)
    put = lambda a, dt: jax.device_put(jnp.asarray(a, dt), gpu)  # noqa: E731
    pos_np = rng.integers(0, 1 << 20, T)
    pos = put(pos_np, jnp.int32)
    x_warm, x_real = put(rng.standard_normal((N, N)), jnp.float32), put(
        rng.standard_normal((N, N)), jnp.float32)
    cos, sin = reference.cos_sin(pos_np, reference.inv_frequencies(D))

    def expected(q):  # read after everything, by JAX itself
        return reference.apply_rotary(to_numpy64(_jax_to_torch(q)), cos, sin, True)

    # warm up: kernels, both jits, the plan cache (so the timed part is only dispatch)
    warm, _ = rope_jit.apply_rope_pos_ids(slow_q(x_warm), None, pos)
    jax.block_until_ready(consume(warm))

    with cp.cuda.Device(gpu.id):
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            # producer side
            q = slow_q(x_real)
            views.clear(), outs.clear()
            qo, _ = rope_jit.apply_rope_pos_ids(q, None, pos)
            in_ptr, out_ptr = views[0].data.ptr, outs[0].data.ptr
            # consumer side, on an input that is ready: only our own lateness matters
            q_ready = jax.block_until_ready(slow_q(x_warm))
            poison = cp.full(64 << 20, cp.nan, dtype=cp.float32)  # this stream's pool
            del poison
            with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)):
                torch.cuda._sleep(SLEEP_CYCLES)  # delays the RoPE kernel below
            late, _ = rope_jit.apply_rope_pos_ids(q_ready, None, pos)
            doubled = consume(late)  # JAX reads the result at once
            assert not stream.done, "the RoPE kernel should still be queued behind the sleep"
    # 1 ulp of bf16 (plus fp32 slack under cancellation) against the float64 reference of
    # the finished q: a read of a recycled or half-written buffer is far off
    q64 = to_numpy64(_jax_to_torch(q))
    assert_rope_close(_jax_to_torch(qo), q64, expected(q), "bfloat16", D, D, 1,
                      "producer ordering (read q before JAX wrote it?)")
    half = _jax_to_torch(doubled) / 2.0  # exact: bf16 values doubled in fp32
    assert_rope_close(half, to_numpy64(_jax_to_torch(q_ready)), expected(q_ready), "bfloat16",
                      D, D, 1, "consumer ordering (JAX read before the kernel wrote?)")
    assert in_ptr == q.unsafe_buffer_pointer(), "the input was copied"
    assert out_ptr == qo.unsafe_buffer_pointer(), "the result was copied"


def test_jax_inplace_refused_and_tracers_refused():
    jax, gpu = _jax_gpu()
    import jax.numpy as jnp

    q = jax.device_put(jnp.ones((4, 2, 64), jnp.float16), gpu)
    pos = jax.device_put(jnp.arange(4, dtype=jnp.int32), gpu)
    for fn in (rope_jit.apply_rope_pos_ids_inplace, rope_jit.apply_llama31_rope_pos_ids_inplace):
        with pytest.raises(TypeError, match=r"^q(uery)?: .* arrays are immutable"):
            fn(q, None, pos)
    cache = jax.device_put(jnp.ones((8, 64), jnp.float32), gpu)
    with pytest.raises(TypeError, match="immutable"):
        rope_jit.apply_rope_inplace_with_cache(pos, q.reshape(4, 128), None, 64, cache, True)
    with pytest.raises(TypeError, match=r"^query: .*JAX tracer"):
        jax.jit(lambda a: rope_jit.apply_rope_pos_ids(a, None, pos)[0])(q)


# ================================================================== CuPy and protocols

def _cupy():
    return pytest.importorskip("cupy")


def _np_inputs(seed, T=45, HQ=4, HK=2, D=64, dtype="float16"):
    import ml_dtypes

    rng = np.random.default_rng(seed)
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return dict(q=rng.standard_normal((T, HQ, D)).astype(dt),
                k=rng.standard_normal((T, HK, D)).astype(dt),
                pos=rng.integers(0, MAX_POS, T), pos3=rng.integers(0, MAX_POS, (3, T)),
                cache=reference.cos_sin_cache(D, MAX_POS).astype(np.float32),
                indptr=np.array([0, 11, 12, T], np.int64),
                offsets=rng.integers(0, MAX_POS - T, 3))


def _expected(x, case, D=64):
    """(q, k) float64 references for one of PROTOCOL_CASES."""
    q64, k64 = x["q"].astype(np.float64), x["k"].astype(np.float64)
    if case == "cache":
        cos, sin = reference.cos_sin_from_cache(x["cache"], x["pos"])
        neox = False
    elif case == "indptr":
        cos, sin = reference.cos_sin(reference.positions_from_offsets(x["indptr"], x["offsets"]),
                                     reference.inv_frequencies(D))
        neox = True
    elif case == "llama31":
        cos, sin = reference.cos_sin(x["pos"], reference.inv_frequencies(D, 5e5, 8.0,
                                                                         (1.0, 4.0, 8192)))
        neox = False
    else:  # mrope: per frequency, the angle of the section's row
        inv = reference.inv_frequencies(D)
        rows = reference.mrope_rows([16, 8, 8])
        ang = np.stack([x["pos3"][r] for r in rows], axis=-1) * inv
        cos, sin = np.cos(ang), np.sin(ang)
        neox = True
    return (reference.apply_rotary(q64, cos, sin, neox),
            reference.apply_rotary(k64, cos, sin, neox))


PROTOCOL_CASES = {
    "cache": lambda a: rope_jit.apply_rope_with_cos_sin_cache(
        a["pos"], a["q"], a["k"], 64, a["cache"], False),
    "indptr": lambda a: rope_jit.apply_rope(a["q"], a["k"], a["indptr"], a["offsets"]),
    "llama31": lambda a: rope_jit.apply_llama31_rope_pos_ids(a["q"], a["k"], a["pos"],
                                                            interleave=True),
    "mrope": lambda a: rope_jit.apply_mrope_pos_ids(a["q"], a["k"], a["pos3"], [16, 8, 8]),
}


def _as_torch(o):
    """A torch view of a result (CuPy, JAX, NumPy): CuPy bf16 goes through uint16, since
    not every CuPy exports bf16 by DLPack."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(o, cp.ndarray):
        if o.dtype.name == "bfloat16":
            return torch.from_dlpack(o.view(cp.uint16)).view(torch.bfloat16)
        return torch.from_dlpack(o)
    if isinstance(o, np.ndarray):
        return torch.from_numpy(o)
    return torch.from_dlpack(o)


def _check(out, x, case, dtype, what):
    ref_q, ref_k = _expected(x, case)
    for o, src, ref, name in ((out[0], x["q"], ref_q, "q"), (out[1], x["k"], ref_k, "k")):
        assert_rope_close(_as_torch(o), src.astype(np.float64), ref, dtype, 64, 64, 1,
                          f"{what} {name}")


@pytest.mark.parametrize("case", sorted(PROTOCOL_CASES))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cupy_in_cupy_out(case, dtype):
    """CuPy arrays natively: CuPy results, within 1 ulp of the float64 reference."""
    cp = _cupy()
    x = _np_inputs(hash((case, dtype)) & 0xFFFF, dtype=dtype)
    a = {n: cp.asarray(v) for n, v in x.items()}
    out = PROTOCOL_CASES[case](a)
    assert all(isinstance(o, cp.ndarray) for o in out)
    _check(out, x, case, dtype, f"cupy {case}")


def test_cupy_runs_on_cupys_current_stream():
    """CuPy inputs: the kernel is queued on CuPy's current stream (behind a sleep there),
    and the host does not wait for it."""
    cp = _cupy()
    x = _np_inputs(7, T=2048, HQ=16, D=64)
    a = {n: cp.asarray(v) for n, v in x.items()}
    want = PROTOCOL_CASES["cache"](a)
    b = {n: v.copy() for n, v in a.items()}  # warm the in-place kernel too: nothing compiles
    rope_jit.apply_rope_with_cos_sin_cache_inplace(b["pos"], b["q"], b["k"], 64, b["cache"], False)
    cp.cuda.Device().synchronize()  # below, while the sleep runs
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        with torch.cuda.stream(torch.cuda.ExternalStream(s.ptr)):
            torch.cuda._sleep(SLEEP_CYCLES)
        qo, ko = PROTOCOL_CASES["cache"](a)
        rope_jit.apply_rope_with_cos_sin_cache_inplace(a["pos"], a["q"], a["k"], 64, a["cache"],
                                                       False)
        assert not s.done, "work must be queued on CuPy's current stream behind the sleep"
    s.synchronize()
    for got in ((qo, ko), (a["q"], a["k"])):
        assert cp.array_equal(got[0], want[0]) and cp.array_equal(got[1], want[1])


@pytest.mark.parametrize("wrap", [CAIOnly, DLPackOnly])
@pytest.mark.parametrize("case", sorted(PROTOCOL_CASES))
def test_protocol_only_arrays_against_reference(wrap, case):
    """Objects with only __cuda_array_interface__ or only __dlpack__ (fp16: CAI has no bf16
    typestr): CuPy results (the documented fallback type), within 1 ulp of the reference."""
    cp = _cupy()
    x = _np_inputs(hash((wrap.__name__, case)) & 0xFFFF)
    a = {n: wrap(torch.from_numpy(np.ascontiguousarray(v)).cuda()) for n, v in x.items()}
    out = PROTOCOL_CASES[case](a)
    assert all(isinstance(o, cp.ndarray) for o in out)
    _check(out, x, case, "float16", f"{wrap.__name__} {case}")


def test_numba_device_arrays():
    """Numba device arrays in, Numba device arrays out (skipped without a working
    numba.cuda)."""
    numba_cuda = pytest.importorskip("numba.cuda")
    try:
        if not numba_cuda.is_available():
            pytest.skip("numba.cuda sees no GPU")
    except Exception as e:  # a numba built for another CUDA
        pytest.skip(f"numba.cuda unusable: {e}")
    for case in sorted(PROTOCOL_CASES):
        x = _np_inputs(hash(case) & 0xFFFF, dtype="float32")
        a = {n: numba_cuda.to_device(np.ascontiguousarray(v)) for n, v in x.items()}
        out = PROTOCOL_CASES[case](a)
        assert all(type(o).__module__.split(".")[0] in ("numba", "numba_cuda") for o in out)
        _check([o.copy_to_host() for o in out], x, case, "float32", f"numba {case}")


def test_no_cupy_deprecation_warnings_on_stream_paths():
    """check_positions and positions_from_offsets without nnz wrap the caller's stream
    for CuPy; with CuPy 14 that must not use the deprecated ExternalStream."""
    cp = _cupy()
    q = torch.randn(8, 2, 64, device="cuda")
    cache = rope_jit.compute_cos_sin_cache(64, 16, like=q)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with pytest.raises(ValueError, match="positions"):
            rope_jit.apply_rope_with_cos_sin_cache(torch.full((8,), 16, device="cuda"), q, None,
                                                   64, cache, check_positions=True)
        got = rope_jit.positions_from_offsets(cp.asarray([0, 2, 5]), cp.asarray([10, 0]))
        assert got.get().tolist() == [10, 11, 0, 1, 2]
        got = rope_jit.positions_from_offsets(torch.tensor([0, 2, 5], device="cuda"),
                                              torch.tensor([10, 0], device="cuda"))
        assert got.tolist() == [10, 11, 0, 1, 2]


# ================================================================== devices

def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")


def test_tensors_on_a_device_other_than_the_current():
    """q, k on cuda:1 while cuda:0 is current: the kernel runs on cuda:1 (its module loaded
    there), on cuda:1's current stream, results are right and the current device stays 0."""
    _two_gpus()
    torch.cuda.set_device(0)
    g = torch.Generator(device="cuda:1").manual_seed(0)
    q = torch.randn(300, 8, 128, generator=g, device="cuda:1", dtype=torch.bfloat16)
    k = torch.randn(300, 2, 128, generator=g, device="cuda:1", dtype=torch.bfloat16)
    pos = torch.randint(0, MAX_POS, (300,), generator=g, device="cuda:1")
    cache = rope_jit.compute_cos_sin_cache(128, MAX_POS, like=q)
    assert cache.device == q.device
    qo, ko = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, 128, cache, True)
    assert qo.device == q.device and torch.cuda.current_device() == 0
    cos, sin = reference.cos_sin_from_cache(to_numpy64(cache), pos.cpu().numpy())
    ref = reference.apply_rotary(to_numpy64(q), cos, sin, True)
    assert_rope_close(qo, to_numpy64(q), ref, "bfloat16", 128, 128, 1, "cuda:1 q")
    s1 = torch.cuda.Stream(device="cuda:1")
    torch.cuda.set_stream(s1)  # cuda:1's current stream
    torch.cuda.set_device(0)
    with torch.cuda.device(1):
        torch.cuda._sleep(SLEEP_CYCLES)
    rope_jit.apply_rope_inplace_with_cache(pos, q, k, 128, cache, True)
    ev = torch.cuda.Event()
    ev.record(s1)
    assert not ev.query(), "must be queued on cuda:1's current stream"
    s1.synchronize()
    assert torch.equal(q, qo) and torch.equal(k, ko)
    torch.cuda.set_stream(torch.cuda.default_stream(1))
    torch.cuda.set_device(0)


def test_cupy_and_jax_on_the_second_device():
    _two_gpus()
    cp = _cupy()
    x = _np_inputs(11)
    with cp.cuda.Device(1):
        a = {n: cp.asarray(v) for n, v in x.items()}
    out = PROTOCOL_CASES["cache"](a)  # called with device 0 current
    assert out[0].device.id == 1
    _check(out, x, "cache", "float16", "cupy cuda:1")
    jax = pytest.importorskip("jax")
    gpus = jax.devices("gpu")
    if len(gpus) < 2:
        pytest.skip("JAX sees one GPU")
    import jax.numpy as jnp

    j = {n: jax.device_put(jnp.asarray(v), gpus[1]) for n, v in x.items()}
    out = PROTOCOL_CASES["llama31"](j)
    assert out[0].devices() == {gpus[1]}
    _check(out, x, "llama31", "float16", "jax cuda:1")


@pytest.mark.parametrize("moved", ["key", "positions", "cos_sin_cache"])
def test_arrays_on_two_devices_raise_before_launch(moved):
    _two_gpus()
    q = torch.randn(8, 2 * 64, device="cuda:0")
    k = torch.randn(8, 64, device="cuda:1" if moved == "key" else "cuda:0")
    pos = torch.arange(8, device="cuda:1" if moved == "positions" else "cuda:0")
    cache = rope_jit.compute_cos_sin_cache(64, 16, like=q).to(
        "cuda:1" if moved == "cos_sin_cache" else "cuda:0")
    before = (q.clone(), k.clone())
    with pytest.raises(ValueError, match=rf"^{moved} is on cuda:1 but query is on cuda:0"):
        rope_jit.apply_rope_inplace_with_cache(pos, q, k, 64, cache, True)
    torch.cuda.synchronize(0), torch.cuda.synchronize(1)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1].to(k.device))


def test_device_ordinals_follow_cuda_visible_devices(tmp_path):
    """In a process that sees the GPUs in reverse order (CUDA_VISIBLE_DEVICES=1,0), cuda:0
    is the physical GPU 1: arrays on it run there and match the reference."""
    _two_gpus()
    code = r"""
import numpy as np, torch, rope_jit
from rope_jit import reference
for dev in ("cuda:0", "cuda:1"):
    q = torch.randn(64, 4, 64, device=dev)
    pos = torch.arange(64, device=dev) * 7
    out, _ = rope_jit.apply_rope_pos_ids(q, None, pos, interleave=True)
    c, s = reference.cos_sin(pos.cpu().numpy(), reference.inv_frequencies(64))
    ref = reference.apply_rotary(q.double().cpu().numpy(), c, s, False)
    assert out.device == q.device
    assert np.abs(out.double().cpu().numpy() - ref).max() < 1e-5, dev
print("OK")
"""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1,0", ROPE_JIT_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-3000:]
