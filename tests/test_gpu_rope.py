"""Every entry point against the float64 reference on the GPU (marker: gpu).

Fresh random inputs (seeded per case, never zeros), q/k as strided views of one fused QKV
buffer so bytes outside the views are checked untouched, poisoned outputs out of place,
pass-through dims bit-identical, ulp-level tolerances (docs/math.md#precision).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

from gpu_cases import (  # noqa: E402
    TORCH_DTYPE,
    CAIOnly,
    DLPackOnly,
    as_heads,
    assert_rope_close,
    expected,
    fused_qkv,
    max_ulp_error,
    poison_allocator,
    to_numpy64,
)

POS_DTYPE = {"int32": torch.int32, "int64": torch.int64}
MAX_POS = 4096


def _outside_mask(buf, views):
    """True where buf's bytes belong to none of the views."""
    mask = torch.ones_like(buf, dtype=torch.bool)
    base = buf.data_ptr()
    item = buf.element_size()
    for v in views:
        if v is None:
            continue
        flat = torch.zeros(buf.numel(), dtype=torch.bool, device=buf.device)
        idx = torch.as_strided(torch.arange(buf.numel(), device=buf.device), v.shape, v.stride(),
                               (v.data_ptr() - base) // item)
        flat[idx.reshape(-1)] = True
        mask &= ~flat.view_as(buf)
    return mask


def run_cache_case(api, dtype, cache_dtype, is_neox, head_size, rot, *, layout="2d",
                   strided=False, with_key=True, pos_dtype="int64", num_tokens=37, hq=4, hk=2,
                   batch_shape=None, seed=0):
    buf, q, k = fused_qkv(num_tokens, hq, hk if with_key else 0, head_size, dtype,
                          layout=layout, strided=strided, batch_shape=batch_shape, seed=seed)
    tok_shape = batch_shape or (num_tokens,)
    tok_ndim = len(tok_shape)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    pos = torch.randint(0, MAX_POS, tok_shape, generator=g, device="cuda").to(POS_DTYPE[pos_dtype])
    cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, dtype=cache_dtype, like=q)
    assert cache.dtype == TORCH_DTYPE[cache_dtype] and cache.device == q.device
    cos, sin = reference.cos_sin_from_cache(to_numpy64(cache), pos.cpu().numpy())
    before = buf.clone()
    q64 = as_heads(q, head_size, tok_ndim)
    k64 = as_heads(k, head_size, tok_ndim) if k is not None else None
    ref_q = expected(q, head_size, tok_ndim, cos, sin, is_neox)
    ref_k = expected(k, head_size, tok_ndim, cos, sin, is_neox) if k is not None else None

    if api == "vllm":
        assert rope_jit.apply_rope_inplace_with_cache(pos, q, k, head_size, cache, is_neox) is None
        outs = (q, k)
    elif api == "fi_inplace":
        assert rope_jit.apply_rope_with_cos_sin_cache_inplace(pos, q, k, head_size, cache, is_neox) is None
        outs = (q, k)
    else:
        poison_allocator(q.numel() * q.element_size() * 2)
        outs = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, head_size, cache, is_neox)
        assert isinstance(outs, tuple) and len(outs) == 2
        assert outs[0].shape == q.shape and outs[0].dtype == q.dtype and outs[0].is_contiguous()
        assert (outs[1] is None) == (k is None)
        assert torch.equal(buf, before), "out of place changed its inputs"
    torch.cuda.synchronize()
    assert_rope_close(outs[0], q64, ref_q, dtype, head_size, rot, tok_ndim, "query")
    if k is not None:
        assert outs[1].shape == k.shape
        assert_rope_close(outs[1], k64, ref_k, dtype, head_size, rot, tok_ndim, "key")
    if api != "fi":
        mask = _outside_mask(buf, [q, k])
        assert torch.equal(buf[mask], before[mask]), "bytes outside q and k changed"
    return outs


# ---------------------------------------------------------------- cache-mode grids

@pytest.mark.parametrize("api", ["vllm", "fi_inplace", "fi"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("is_neox", [True, False])
def test_cache_dtypes(api, dtype, cache_dtype, is_neox):
    i = hash((api, dtype, cache_dtype, is_neox)) & 0xFF
    run_cache_case(api, dtype, cache_dtype, is_neox, 128, 128, layout="3d" if i % 2 else "2d",
                   strided=bool(i & 2), pos_dtype="int32" if i & 4 else "int64",
                   num_tokens=(1, 37, 600)[i % 3], seed=i)


HEAD_ROT = [(64, 64), (64, 20), (80, 80), (80, 32), (96, 96), (96, 48), (112, 112), (128, 128),
            (128, 64), (128, 6), (160, 160), (192, 192), (192, 64), (256, 256), (256, 128),
            (512, 512), (512, 64), (2, 2), (34, 18)]


@pytest.mark.parametrize("head_size,rot", HEAD_ROT)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("inplace", [True, False])
def test_head_sizes(head_size, rot, is_neox, inplace):
    i = (head_size * 7 + rot + is_neox * 3 + inplace) % 8
    dtype = ("bfloat16", "float16", "float32")[i % 3]
    run_cache_case("vllm" if inplace else "fi", dtype, ("float32", "bfloat16")[i % 2], is_neox,
                   head_size, rot, layout="3d" if i & 1 else "2d", strided=bool(i & 2),
                   with_key=bool(i != 5), pos_dtype="int32" if i & 4 else "int64",
                   num_tokens=(3, 129, 1000)[i % 3], hq=(8, 3)[i % 2], hk=(1, 2)[i % 2], seed=i)


LAYOUTS = list(itertools.product(["2d", "3d"], [False, True], [True, False], ["int32", "int64"],
                                 [None, (3, 11)]))


@pytest.mark.parametrize("layout,strided,with_key,pos_dtype,batch_shape", LAYOUTS)
def test_layouts_and_strides(layout, strided, with_key, pos_dtype, batch_shape):
    T = 33 if batch_shape is None else 33
    run_cache_case("vllm", "bfloat16", "float32", True, 128, 64, layout=layout, strided=strided,
                   with_key=with_key, pos_dtype=pos_dtype, num_tokens=T, batch_shape=batch_shape,
                   hq=5, hk=3)


@pytest.mark.parametrize("num_tokens", [1, 2, 16, 255, 256, 4096, 20000])
def test_token_counts_cross_dispatch_boundaries(num_tokens):
    """Token counts on both sides of the head-parallel / batched-heads switch."""
    run_cache_case("vllm", "bfloat16", "float32", True, 128, 128, num_tokens=num_tokens, hq=32, hk=8)
    run_cache_case("fi", "float16", "bfloat16", False, 64, 64, num_tokens=num_tokens, hq=16, hk=1)


def test_zero_tokens_is_a_noop():
    for T in (0,):
        buf, q, k = fused_qkv(1, 4, 2, 64, "bfloat16")
        q0, k0 = q[:0], k[:0]
        pos = torch.zeros(0, dtype=torch.int64, device="cuda")
        cache = rope_jit.compute_cos_sin_cache(64, 16, like=q)
        assert rope_jit.apply_rope_inplace_with_cache(pos, q0, k0, 64, cache, True) is None
        qo, ko = rope_jit.apply_rope_with_cos_sin_cache(pos, q0, k0, 64, cache, True)
        assert qo.shape == q0.shape and ko.shape == k0.shape


# ---------------------------------------------------------------- on the fly

FLY_APIS = ["apply_rope", "apply_rope_inplace", "apply_rope_pos_ids", "apply_rope_pos_ids_inplace",
            "apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
            "apply_llama31_rope_pos_ids_inplace"]


def run_fly_case(name, dtype, interleave, head_size, rot, *, num_tokens=50, hq=4, hk=2,
                 max_pos=2 ** 20, rope_scale=None, rope_theta=None, seed=0, strided=False):
    llama = "llama31" in name
    buf, q, k = fused_qkv(num_tokens, hq, hk, head_size, dtype, layout="3d", strided=strided,
                          seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 7)
    kw = {}
    if rot != head_size:
        kw["rotary_dim"] = rot
    kw["interleave"] = interleave
    if rope_scale is not None:
        kw["rope_scale"] = rope_scale
    if rope_theta is not None:
        kw["rope_theta"] = rope_theta
    scale = rope_scale if rope_scale is not None else (8.0 if llama else 1.0)
    theta = rope_theta if rope_theta is not None else (5e5 if llama else 1e4)
    inv = reference.inv_frequencies(rot, theta, scale, (1.0, 4.0, 8192) if llama else None)
    if "pos_ids" in name:
        pos = torch.randint(0, max_pos, (num_tokens,), generator=g, device="cuda")
        args = (pos,)
        pos_np = pos.cpu().numpy()
    else:
        cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, num_tokens), 3, replace=False))
        indptr_np = np.concatenate([[0], cuts, [num_tokens]]).astype(np.int32)
        offsets_np = np.random.default_rng(seed + 1).integers(0, max_pos - num_tokens, 4).astype(np.int32)
        args = (torch.from_numpy(indptr_np).cuda(), torch.from_numpy(offsets_np).cuda())
        pos_np = reference.positions_from_offsets(indptr_np, offsets_np)
    cos, sin = reference.cos_sin(pos_np, inv)
    q64, k64 = as_heads(q, head_size, 1), as_heads(k, head_size, 1)
    ref_q = reference.apply_rotary(q64, cos, sin, not interleave)
    ref_k = reference.apply_rotary(k64, cos, sin, not interleave)
    before = buf.clone()
    fn = getattr(rope_jit, name)
    if name.endswith("_inplace"):
        assert fn(q, k, *args, **kw) is None
        qo, ko = q, k
    else:
        poison_allocator(q.numel() * q.element_size() * 2)
        qo, ko = fn(q, k, *args, **kw)
        assert torch.equal(buf, before)
    torch.cuda.synchronize()
    assert_rope_close(qo, q64, ref_q, dtype, head_size, rot, 1, "q")
    assert_rope_close(ko, k64, ref_k, dtype, head_size, rot, 1, "k")
    return qo, ko


@pytest.mark.parametrize("name", FLY_APIS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("interleave", [False, True])
def test_on_the_fly_entry_points(name, dtype, interleave):
    run_fly_case(name, dtype, interleave, 128, 128, seed=len(name))


@pytest.mark.parametrize("head_size,rot", [(64, 64), (80, 80), (80, 32), (96, 48), (256, 128), (512, 512)])
@pytest.mark.parametrize("interleave", [False, True])
def test_on_the_fly_head_sizes(head_size, rot, interleave):
    run_fly_case("apply_rope_pos_ids", "bfloat16", interleave, head_size, rot, num_tokens=300)
    run_fly_case("apply_llama31_rope", "float16", interleave, head_size, rot, num_tokens=300,
                 strided=True)


def test_on_the_fly_custom_scale_and_theta():
    run_fly_case("apply_rope_pos_ids", "float32", False, 128, 128, rope_scale=4.0, rope_theta=5e5)
    run_fly_case("apply_llama31_rope_pos_ids", "float32", True, 128, 64, rope_scale=16.0,
                 rope_theta=1e6)


def test_on_the_fly_as_accurate_as_fp32_cache_at_long_context():
    """docs/math.md#precision: on the fly must be no less accurate than an fp32 cache, to 2^20."""
    T, H, D = 4096, 8, 128
    max_pos = 2 ** 20
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(T, H, D, generator=g, device="cuda")
    pos = torch.randint(max_pos - 2 ** 16, max_pos, (T,), generator=g, device="cuda")
    cache = rope_jit.compute_cos_sin_cache(D, max_pos, dtype="float32", like=q)
    q_fly, _ = rope_jit.apply_rope_pos_ids(q, None, pos)
    q_cache, _ = rope_jit.apply_rope_with_cos_sin_cache(pos, q, None, D, cache, True)
    cos, sin = reference.cos_sin(pos.cpu().numpy(), reference.inv_frequencies(D))
    ref = reference.apply_rotary(to_numpy64(q), cos, sin, True)
    err_fly = np.abs(to_numpy64(q_fly) - ref)
    err_cache = np.abs(to_numpy64(q_cache) - ref)
    assert np.sqrt((err_fly ** 2).mean()) <= 1.05 * np.sqrt((err_cache ** 2).mean())
    assert err_fly.max() <= 1.05 * err_cache.max()
    for dtype in ("bfloat16", "float16"):
        x = q.to(TORCH_DTYPE[dtype])
        out, _ = rope_jit.apply_rope_pos_ids(x, None, pos)
        refx = reference.apply_rotary(to_numpy64(x), cos, sin, True)
        assert_rope_close(out, to_numpy64(x), refx, dtype, D, D, 1, f"{dtype} at long context")


def test_indptr_and_positions_paths_are_bit_identical():
    T, D = 1000, 128
    buf, q, k = fused_qkv(T, 8, 2, D, "bfloat16", layout="3d")
    indptr = torch.tensor([0, 1, 5, 10, 500, 500, 1000], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([4, 6, 3, 100000, 7, 999999], dtype=torch.int32, device="cuda")
    pos = rope_jit.positions_from_offsets(indptr, offsets)
    assert pos.dtype == torch.int32 and pos.device == q.device
    np.testing.assert_array_equal(pos.cpu().numpy(), reference.positions_from_offsets(
        indptr.cpu().numpy(), offsets.cpu().numpy()))
    for interleave in (False, True):
        a = rope_jit.apply_rope(q, k, indptr, offsets, interleave=interleave)
        b = rope_jit.apply_rope_pos_ids(q, k, pos, interleave=interleave)
        c = rope_jit.apply_llama31_rope(q, k, indptr, offsets, interleave=interleave)
        d = rope_jit.apply_llama31_rope_pos_ids(q, k, pos.long(), interleave=interleave)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    # and in place equals out of place
    q2, k2 = q.clone(), k.clone()
    rope_jit.apply_rope_inplace(q2, k2, indptr, offsets)
    a = rope_jit.apply_rope(q, k, indptr, offsets)
    assert torch.equal(q2, a[0]) and torch.equal(k2, a[1])


def test_inplace_equals_out_of_place_with_cache():
    for neox in (True, False):
        buf, q, k = fused_qkv(300, 6, 2, 96, "float16", strided=True)
        pos = torch.randint(0, MAX_POS, (300,), device="cuda")
        cache = rope_jit.compute_cos_sin_cache(48, MAX_POS, dtype="bfloat16", like=q)
        qo, ko = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, 96, cache, neox)
        rope_jit.apply_rope_inplace_with_cache(pos, q, k, 96, cache, neox)
        assert torch.equal(qo, q) and torch.equal(ko, k)


def test_positions_from_offsets_on_device_and_host():
    indptr = np.array([0, 1, 5, 10])
    offsets = np.array([4, 6, 3])
    expect = [4, 6, 7, 8, 9, 3, 4, 5, 6, 7]
    for dt in (np.int32, np.int64):
        t = rope_jit.positions_from_offsets(torch.tensor(indptr.astype(dt), device="cuda"),
                                            torch.tensor(offsets.astype(dt), device="cuda"), nnz=10)
        assert t.device.type == "cuda" and t.dtype == (torch.int32 if dt == np.int32 else torch.int64)
        assert t.tolist() == expect
    cp = pytest.importorskip("cupy")
    c = rope_jit.positions_from_offsets(cp.asarray(indptr), cp.asarray(offsets))
    assert isinstance(c, cp.ndarray) and c.get().tolist() == expect


# ---------------------------------------------------------------- positions outside the cache

def test_positions_outside_cache_never_read_and_checked_mode_raises():
    buf, q, k = fused_qkv(8, 2, 1, 64, "bfloat16")
    cache = rope_jit.compute_cos_sin_cache(64, 16, like=q)
    pos = torch.tensor([0, 3, 16, -1, 15, 1 << 40, 2, 5], device="cuda")
    before = buf.clone()
    with pytest.raises(ValueError, match="positions"):
        rope_jit.apply_rope_inplace_with_cache(pos, q, k, 64, cache, True, check_positions=True)
    assert torch.equal(buf, before), "checked mode must fail before writing anything"
    rope_jit.apply_rope_inplace_with_cache(pos, q, k, 64, cache, True)
    torch.cuda.synchronize()
    for t in (2, 3, 5):  # out of range: token left as it was
        assert torch.equal(q[t], before[t, :128])


def test_invalid_inplace_call_leaves_inputs_untouched():
    buf, q, k = fused_qkv(16, 4, 2, 64, "bfloat16")
    before = buf.clone()
    pos = torch.arange(16, device="cuda")
    cache = rope_jit.compute_cos_sin_cache(64, 32, like=q)
    bad = [
        dict(head_size=48),                                   # not dividing the last dim
        dict(cache=rope_jit.compute_cos_sin_cache(96, 32, like=q)),  # wider than the head
        dict(cache=rope_jit.compute_cos_sin_cache(64, 32, like=q)[:, :63]),  # odd width
        dict(pos=pos.float()),
        dict(pos=pos[:15]),
        dict(k=k.float()),
        dict(pos=pos.cpu()),
        dict(cache=cache.cpu()),
    ]
    for b in bad:
        with pytest.raises((TypeError, ValueError)):
            rope_jit.apply_rope_inplace_with_cache(b.get("pos", pos), q, b.get("k", k),
                                                   b.get("head_size", 64), b.get("cache", cache), True)
    torch.cuda.synchronize()
    assert torch.equal(buf, before)


# ---------------------------------------------------------------- streams, graphs, processes

def test_runs_on_the_current_torch_stream():
    buf, q, k = fused_qkv(4096, 32, 8, 128, "bfloat16")
    pos = torch.randint(0, MAX_POS, (4096,), device="cuda")
    cache = rope_jit.compute_cos_sin_cache(128, MAX_POS, like=q)
    expect_q, expect_k = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, 128, cache, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time queued ahead of RoPE on s
        rope_jit.apply_rope_inplace_with_cache(pos, q, k, 128, cache, True)
        ev = torch.cuda.Event()
        ev.record(s)
    assert not ev.query(), "work must be queued on stream s behind the sleep"
    s.synchronize()
    assert torch.equal(q, expect_q) and torch.equal(k, expect_k)


def test_cuda_graph_capture_and_replay_with_new_inputs():
    T, D = 64, 128
    buf, q, k = fused_qkv(T, 8, 2, D, "bfloat16", layout="3d")
    pos = torch.randint(0, MAX_POS, (T,), device="cuda")
    cache = rope_jit.compute_cos_sin_cache(D, MAX_POS, like=q)
    rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, True)  # compile + warm up
    rope_jit.apply_rope_pos_ids_inplace(q, k, pos)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, True)
        rope_jit.apply_rope_pos_ids_inplace(q, k, pos, interleave=False)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(100 + seed)
        buf.copy_(torch.randn(buf.shape, generator=g, device="cuda").to(buf.dtype))
        pos.copy_(torch.randint(0, MAX_POS, (T,), generator=g, device="cuda"))
        q_in, k_in = q.clone(), k.clone()
        eq, ek = rope_jit.apply_rope_with_cos_sin_cache(pos, q_in, k_in, D, cache, True)
        eq, ek = rope_jit.apply_rope_pos_ids(eq, ek, pos)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(q, eq) and torch.equal(k, ek)


def test_new_process_loads_from_disk_cache_without_compiling(tmp_path):
    code = r"""
import torch, rope_jit
from rope_jit import jit
q = torch.randn(5, 4, 80, device='cuda', dtype=torch.float16)
pos = torch.arange(5, device='cuda')
cache = rope_jit.compute_cos_sin_cache(40, 64, dtype='bfloat16', like=q)
rope_jit.apply_rope_inplace_with_cache(pos, q, None, 80, cache, False)
torch.cuda.synchronize()
print("STATS", jit.stats.compiles, jit.stats.disk_hits)
"""
    env = dict(os.environ, ROPE_JIT_CACHE_DIR=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    c1, h1 = map(int, first.stdout.split("STATS")[1].split())
    c2, h2 = map(int, second.stdout.split("STATS")[1].split())
    assert c1 >= 1 and h1 == 0
    assert c2 == 0 and h2 == c1


# ---------------------------------------------------------------- other array types

def test_cupy_arrays_in_and_out():
    cp = pytest.importorskip("cupy")
    import ml_dtypes

    rng = np.random.default_rng(5)
    T, H, D = 40, 4, 64
    for dt in (np.float16, np.float32, ml_dtypes.bfloat16):
        q = cp.asarray(rng.standard_normal((T, H * D)).astype(dt))
        k = cp.asarray(rng.standard_normal((T, 2 * D)).astype(dt))
        pos = cp.asarray(rng.integers(0, 1000, T))
        cache = rope_jit.compute_cos_sin_cache(D, 1000, like=q)
        assert isinstance(cache, cp.ndarray)
        qo, ko = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, D, cache, True)
        assert isinstance(qo, cp.ndarray) and isinstance(ko, cp.ndarray)
        cos, sin = reference.cos_sin_from_cache(cache.get(), pos.get())
        name = np.dtype(dt).name
        q64 = q.get().astype(np.float64).reshape(T, H, D)
        assert_rope_close(torch.from_dlpack(qo) if name != "bfloat16" else _bf16_torch(qo), q64,
                          reference.apply_rotary(q64, cos, sin, True), name, D, D, 1, "cupy q")
        rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, True)
        assert cp.array_equal(q.view(cp.uint16 if q.dtype.itemsize == 2 else cp.uint32),
                              qo.view(cp.uint16 if q.dtype.itemsize == 2 else cp.uint32))


def _bf16_torch(a):
    cp = pytest.importorskip("cupy")
    return torch.from_dlpack(a.view(cp.uint16)).view(torch.bfloat16)


@pytest.mark.parametrize("wrap", [CAIOnly, DLPackOnly])
def test_protocol_only_arrays(wrap):
    cp = pytest.importorskip("cupy")
    buf, q, k = fused_qkv(30, 4, 2, 64, "float16", layout="3d")
    pos = torch.randint(0, MAX_POS, (30,), device="cuda")
    cache = rope_jit.compute_cos_sin_cache(64, MAX_POS, like=q)
    expect_q, expect_k = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, 64, cache, True)
    qo, ko = rope_jit.apply_rope_with_cos_sin_cache(wrap(pos), wrap(q), wrap(k), 64, wrap(cache), True)
    assert isinstance(qo, cp.ndarray)
    assert torch.equal(torch.from_dlpack(qo), expect_q) and torch.equal(torch.from_dlpack(ko), expect_k)
    rope_jit.apply_rope_inplace_with_cache(wrap(pos), wrap(q), wrap(k), 64, wrap(cache), True)
    torch.cuda.synchronize()
    assert torch.equal(q, expect_q) and torch.equal(k, expect_k)


def test_jax_arrays_out_of_place_and_inplace_refused():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    rng = np.random.default_rng(9)
    q = jax.device_put(jnp.asarray(rng.standard_normal((20, 4, 64)), dtype=jnp.bfloat16), gpu)
    k = jax.device_put(jnp.asarray(rng.standard_normal((20, 1, 64)), dtype=jnp.bfloat16), gpu)
    pos = jax.device_put(jnp.asarray(rng.integers(0, 5000, 20), dtype=jnp.int32), gpu)
    qo, ko = rope_jit.apply_rope_pos_ids(q, k, pos)
    assert isinstance(qo, jax.Array) and qo.dtype == jnp.bfloat16 and qo.shape == q.shape
    q64 = np.asarray(q.astype(jnp.float32), dtype=np.float64)
    cos, sin = reference.cos_sin(np.asarray(pos), reference.inv_frequencies(64))
    ref = reference.apply_rotary(q64, cos, sin, True)
    got = np.asarray(qo.astype(jnp.float32), dtype=np.float64)
    assert np.max(np.abs(got - ref) / reference.ulp(ref, "bfloat16")) <= 1.0
    with pytest.raises(TypeError, match="immutable"):
        rope_jit.apply_rope_pos_ids_inplace(q, k, pos)


def test_dispatch_boundaries_from_the_rules():
    """Token counts on each side of the head-parallel / batched switch and of the prefetch
    switch, computed from this GPU's dispatch knobs (rope_jit.tuning) and SM count (not
    hard-coded)."""
    from rope_jit import plan
    from rope_jit._cuda import device_name, num_sms
    from rope_jit.tuning import BUILT_IN

    device = torch.cuda.current_device()  # no tuned table in the tests' fresh cache dir
    sms, tuning = num_sms(device), BUILT_IN.get(device_name(device), plan.DEFAULT_TUNING)
    hq, hk, D = 32, 8, 128
    chunks = D // 2 // 8  # bf16, 16-byte vectors
    wave = sms * 2048
    t_switch = int(tuning.small_waves * wave) // (chunks * (hq + hk))
    seen = set()
    for T in (t_switch, t_switch + 1, 4 * t_switch, 4 * t_switch + 1):
        for cache_dtype in ("float32", None):
            hb, per_group, _ = plan.choose_launch(T, chunks, hq + hk, sms, cache_dtype is None,
                                                  tuning)
            seen.add((hb, per_group > hb))
            if cache_dtype:
                run_cache_case("vllm", "bfloat16", cache_dtype, True, D, D, num_tokens=T, hq=hq, hk=hk)
            else:
                run_fly_case("apply_rope_pos_ids_inplace", "bfloat16", False, D, D, num_tokens=T,
                             hq=hq, hk=hk)
    assert (1, False) in seen and any(hb > 1 for hb, _ in seen), seen
