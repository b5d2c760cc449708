"""Every rope_jit kernel family, once or twice, with small but non-trivial shapes, each
result checked against the float64 reference: the program scripts/compute_sanitizer.py
runs under compute-sanitizer (issue 12 item 6), so that a kernel that reads or writes out
of bounds, reads uninitialized memory, races on shared memory or misuses a barrier shows
up there, and a silent wrong result shows up here.

Families: cos/sin from a cache (fp16/bf16/fp32 caches, NeoX and GPT-J, partial rotary,
[tokens] and [batch, seq] positions) and on the fly (plain, Llama 3.1, llama3 and yarn
through rope_scaling), positions and indptr + offsets, in place and out of place, mRoPE
(cache and on the fly, interleaved too), the inverse rotation (the backward of an
out-of-place call on tensors that require grad), the positions_from_offsets kernel,
positions outside the cache (negative and >= max_position: never read past it), zero
tokens, strided views of a fused buffer (token and head strides larger than the data, a
non-zero offset), and the head-batched, prefetching dispatch of large token counts.

Inputs are made on the host and copied over, and results are compared on the host, so
the program launches few kernels besides rope_jit's own. Torch tensors throughout; every
case synchronizes the device before it checks.

    python scripts/sanitizer_cases.py            # all cases; exit 1 if any failed
    python scripts/sanitizer_cases.py --list
    python scripts/sanitizer_cases.py --case zero_tokens --case positions_from_offsets
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

from fused_checks import assert_fp8_close, assert_only_rows_written, paged_batch  # noqa: E402
from gpu_cases import assert_rope_close, covered, poison_allocator, to_numpy64  # noqa: E402

TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INDEX_DTYPE = {"int32": torch.int32, "int64": torch.int64}
LLAMA31 = (1.0, 4.0, 8192)
LLAMA3_DICT = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
YARN_DICT = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
# With the caching allocator off (the sanitizer runs of memcheck and initcheck) every
# tensor is its own cudaMalloc, and poisoning its free blocks would only cost time.
CACHING_ALLOCATOR = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1"

CASES: dict = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------ inputs


def host_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def device_randn(shape, dtype: str, seed: int) -> torch.Tensor:
    """Standard-normal values made on the host, copied to the GPU (no kernel)."""
    return torch.randn(*shape, generator=host_gen(seed)).to(TORCH_DTYPE[dtype]).cuda()


def device_ints(values, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(INDEX_DTYPE[dtype]).cuda()


class Fused:
    """q, k and v as views of one flat GPU buffer, like a fused QKV projection: each
    token's row starts with `lead` unused elements and ends with `pad` of them, and heads
    sit `head_gap` elements apart beyond head_size (3-D layout only)."""

    def __init__(self, token_shape, hq, hk, head_size, dtype, seed, *, layout="2d", lead=8,
                 pad=24, head_gap=0, with_v=True):
        assert layout == "3d" or head_gap == 0
        self.token_shape, self.head_size, self.dtype = tuple(token_shape), head_size, dtype
        hs = head_size + head_gap
        hv = hk if with_v else 0
        row = lead + (hq + hk + hv) * hs + pad
        n_tok = math.prod(self.token_shape)
        strides = (row,) if len(self.token_shape) == 1 else (self.token_shape[1] * row, row)
        self.buf = device_randn((max(n_tok, 1) * row,), dtype, seed)
        self.before = self.buf.cpu()

        def view(heads, start):
            if heads == 0:
                return None
            if layout == "3d":
                return torch.as_strided(self.buf, (*self.token_shape, heads, head_size),
                                        (*strides, hs, 1), start)
            return torch.as_strided(self.buf, (*self.token_shape, heads * head_size),
                                    (*strides, 1), start)

        self.q = view(hq, lead)
        self.k = view(hk, lead + hq * hs)
        self.v = view(hv, lead + (hq + hk) * hs)

    def heads64(self, x, before: bool = True) -> np.ndarray:
        """A view's float64 values [tokens..., heads, head_size], before the call by default."""
        if x is None:
            return None
        src = torch.as_strided(self.before, x.shape, x.stride(), x.storage_offset()) if before else x
        a = to_numpy64(src)
        return a.reshape(*self.token_shape, -1, self.head_size)

    def check_outside_unchanged(self, views) -> None:
        """Bytes of the buffer that no view in `views` covers are bit-identical."""
        mask = ~covered(self.buf.numel(), views)
        after = bits(self.buf.cpu()).numpy()
        before = bits(self.before).numpy()
        changed = (after != before) & mask
        assert not changed.any(), f"{int(changed.sum())} elements outside the views changed"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ------------------------------------------------------------------ references


def cache_cos_sin(cache: torch.Tensor, pos: np.ndarray) -> tuple:
    """The cache's own rows at `pos`; identity (cos 1, sin 0) outside [0, rows)."""
    c = to_numpy64(cache)
    half = c.shape[1] // 2
    inside = (pos >= 0) & (pos < c.shape[0])
    rows = c[np.where(inside, pos, 0)]
    return (np.where(inside[..., None], rows[..., :half], 1.0),
            np.where(inside[..., None], rows[..., half:], 0.0))


def fly_cos_sin(pos: np.ndarray, rot: int, theta=1e4, scale=1.0, llama31=None) -> tuple:
    return reference.cos_sin(pos, reference.inv_frequencies(rot, theta, scale, llama31))


def scaled_cos_sin(pos: np.ndarray, rot: int, theta: float, rope_scaling: dict) -> tuple:
    info = rope_jit.resolve_rope_scaling(rope_scaling, rot, base=theta, max_position=1 << 20)
    cos, sin = reference.cos_sin(pos, info.inv_freq)
    return cos * info.attention_factor, sin * info.attention_factor


def expect_rotated(out, x64, cos, sin, is_neox, dtype, head_size, rot, tok_ndim, what):
    """`out` (any torch tensor) is x64 rotated by cos/sin, within one ulp of `dtype`."""
    ref = reference.apply_rotary(x64, cos, sin, is_neox)
    assert_rope_close(out, x64, ref, dtype, head_size, rot, tok_ndim, what)


def poison_outputs(*like) -> None:
    if CACHING_ALLOCATOR:
        poison_allocator(sum(x.numel() * x.element_size() for x in like if x is not None))


def run_cache(f: Fused, pos_np, cache, is_neox, *, inplace, fn=None, index="int64"):
    """One cos/sin-cache call on f's views, checked (in place: bytes outside untouched;
    out of place: inputs untouched, outputs complete)."""
    pos = device_ints(pos_np, index)
    D, rot = f.head_size, cache.shape[1]
    if inplace:
        fn = fn or rope_jit.apply_rope_inplace_with_cache
        assert fn(pos, f.q, f.k, D, cache, is_neox) is None
        outs = (f.q, f.k)
    else:
        poison_outputs(f.q, f.k)
        outs = (fn or rope_jit.apply_rope_with_cos_sin_cache)(pos, f.q, f.k, D, cache, is_neox)
    torch.cuda.synchronize()
    cos, sin = cache_cos_sin(cache, pos_np)
    for out, x, what in zip(outs, (f.q, f.k), ("query", "key")):
        if x is not None:
            expect_rotated(out, f.heads64(x), cos, sin, is_neox, f.dtype, D, rot,
                           len(f.token_shape), what)
    f.check_outside_unchanged([f.q, f.k] if inplace else [])
    return outs


# ------------------------------------------------------------------ cos/sin from a cache


@case
def cache_vllm_inplace_bf16_fp32cache_neox():
    f = Fused((37,), 4, 2, 128, "bfloat16", 1)
    cache = rope_jit.compute_cos_sin_cache(128, 4096, dtype="float32", like=f.q)
    run_cache(f, np.random.default_rng(1).integers(0, 4096, 37), cache, True, inplace=True)


@case
def cache_out_of_place_fp16_bf16cache_gptj_partial():
    f = Fused((45,), 3, 2, 96, "float16", 2, layout="3d")
    cache = rope_jit.compute_cos_sin_cache(48, 1000, dtype="bfloat16", like=f.q)
    pos = np.random.default_rng(2).integers(0, 1000, 45)
    run_cache(f, pos, cache, False, inplace=False, index="int32")
    f.k = None  # and query only
    run_cache(f, pos, cache, False, inplace=False, index="int32")


@case
def cache_flashinfer_inplace_fp32_fp16cache_batch_seq():
    f = Fused((3, 11), 5, 1, 80, "float32", 3)
    cache = rope_jit.compute_cos_sin_cache(32, 500, dtype="float16", like=f.q)
    run_cache(f, np.random.default_rng(3).integers(0, 500, (3, 11)), cache, False, inplace=True,
              fn=rope_jit.apply_rope_with_cos_sin_cache_inplace, index="int32")


@case
def cache_dtype_and_style_matrix():
    combos = [("float16", "float32", False), ("bfloat16", "bfloat16", True),
              ("float32", "float16", True), ("float16", "bfloat16", True),
              ("bfloat16", "float16", False), ("float32", "float32", False)]
    for i, (dtype, cache_dtype, neox) in enumerate(combos):
        f = Fused((19,), 2, 1, 64, dtype, 10 + i)
        cache = rope_jit.compute_cos_sin_cache(64, 256, dtype=cache_dtype, like=f.q)
        pos = np.random.default_rng(i).integers(0, 256, 19)
        run_cache(f, pos, cache, neox, inplace=bool(i % 2))


@case
def strided_head_views():
    """3-D views whose head stride exceeds head_size (odd gap: scalar accesses) and whose
    token stride exceeds the row, in place and out of place, cache and on the fly."""
    for gap, dtype in ((8, "bfloat16"), (3, "float16")):
        f = Fused((50,), 3, 2, 64, dtype, 20 + gap, layout="3d", head_gap=gap, lead=5, pad=7)
        cache = rope_jit.compute_cos_sin_cache(64, 128, like=f.q)
        pos = np.random.default_rng(gap).integers(0, 128, 50)
        run_cache(f, pos, cache, True, inplace=False)
        run_cache(f, pos, cache, False, inplace=True)
        f2 = Fused((50,), 3, 2, 64, dtype, 30 + gap, layout="3d", head_gap=gap, lead=5, pad=7)
        p = device_ints(pos * 97, "int64")
        assert rope_jit.apply_rope_pos_ids_inplace(f2.q, f2.k, p, interleave=True) is None
        torch.cuda.synchronize()
        cos, sin = fly_cos_sin(pos * 97, 64)
        for x, what in ((f2.q, "q"), (f2.k, "k")):
            expect_rotated(x, f2.heads64(x), cos, sin, False, dtype, 64, 64, 1, what)
        f2.check_outside_unchanged([f2.q, f2.k])


# ------------------------------------------------------------------ positions outside the cache


@case
def positions_outside_the_cache():
    """Rows the cache does not have (negative, >= max_position, far beyond) leave their
    token unrotated; the cache is its own exact allocation, so any read past it is out of
    bounds for memcheck."""
    rows = 37
    for index, far in (("int32", 2**31 - 1), ("int64", 1 << 40)):
        f = Fused((12,), 2, 1, 64, "bfloat16", 40)
        cache = rope_jit.compute_cos_sin_cache(64, rows, like=f.q)
        pos = np.array([0, -1, rows, rows - 1, -rows - 3, rows + 5, far, -far, 5, 36, 17, 2])
        run_cache(f, pos, cache, True, inplace=True, index=index)
        g = Fused((12,), 2, 1, 64, "float32", 41)
        run_cache(g, pos, cache, False, inplace=False, index=index)
    # mRoPE: a row past the cache leaves the frequencies that take their angle from it
    f = Fused((9,), 2, 1, 64, "float16", 42, layout="3d")
    cache = rope_jit.compute_cos_sin_cache(64, rows, like=f.q)
    pos3 = np.random.default_rng(4).integers(0, rows, (3, 9))
    pos3[0, 1], pos3[1, 2], pos3[2, 3], pos3[:, 4] = -1, rows, 1 << 40, rows + 9
    out = rope_jit.apply_mrope_with_cos_sin_cache(device_ints(pos3, "int64"), f.q, f.k, 64, cache,
                                                  True, (16, 8, 8))
    torch.cuda.synchronize()
    check_mrope(out, f, cache_cos_sin(cache, pos3), (16, 8, 8), False, True, 64)
    f.check_outside_unchanged([])


# ------------------------------------------------------------------ on the fly


def run_fly(name, f: Fused, *, pos_np=None, indptr=None, offsets=None, index="int64",
            rot=None, cos_sin=None, **kw):
    """One on-the-fly call on f's 3-D views, checked against cos_sin (the reference's)."""
    fn = getattr(rope_jit, name)
    inplace = name.endswith("_inplace")
    D = f.head_size
    rot = rot or D
    if indptr is not None:
        args = (device_ints(indptr, index), device_ints(offsets, index))
        pos_np = reference.positions_from_offsets(np.asarray(indptr), np.asarray(offsets))
    else:
        args = (device_ints(pos_np, index),)
    if rot != D:
        kw["rotary_dim"] = rot
    if inplace:
        assert fn(f.q, f.k, *args, **kw) is None
        outs = (f.q, f.k)
    else:
        poison_outputs(f.q, f.k)
        outs = fn(f.q, f.k, *args, **kw)
    torch.cuda.synchronize()
    cos, sin = cos_sin(pos_np)
    neox = not kw.get("interleave", False)
    for out, x, what in zip(outs, (f.q, f.k), ("q", "k")):
        if x is not None:
            expect_rotated(out, f.heads64(x), cos, sin, neox, f.dtype, D, rot, 1, what)
    f.check_outside_unchanged([f.q, f.k] if inplace else [])


@case
def fly_pos_ids_out_of_place_bf16():
    f = Fused((300,), 8, 1, 128, "bfloat16", 50, layout="3d")  # several cos/sin tiles
    run_fly("apply_rope_pos_ids", f, pos_np=np.random.default_rng(5).integers(0, 1 << 20, 300),
            cos_sin=lambda p: fly_cos_sin(p, 128))


@case
def fly_pos_ids_inplace_fp16_gptj_partial_query_only():
    f = Fused((77,), 4, 0, 80, "float16", 51, layout="3d")
    run_fly("apply_rope_pos_ids_inplace", f, pos_np=np.random.default_rng(6).integers(0, 5000, 77),
            index="int32", rot=32, interleave=True, rope_theta=5e5,
            cos_sin=lambda p: fly_cos_sin(p, 32, 5e5))


@case
def fly_indptr_out_of_place_fp32():
    f = Fused((61,), 3, 2, 64, "float32", 52, layout="3d")
    run_fly("apply_rope", f, indptr=[0, 5, 5, 40, 61], offsets=[7, 0, 100000, 3], index="int32",
            rope_scale=2.0, cos_sin=lambda p: fly_cos_sin(p, 64, 1e4, 2.0))


@case
def fly_indptr_inplace_llama31_bf16():
    f = Fused((70,), 4, 2, 128, "bfloat16", 53, layout="3d")
    run_fly("apply_llama31_rope_inplace", f, indptr=[0, 1, 70], offsets=[9000, 17],
            cos_sin=lambda p: fly_cos_sin(p, 128, 5e5, 8.0, LLAMA31))


@case
def fly_llama31_pos_ids_out_of_place_gptj():
    f = Fused((33,), 2, 2, 64, "float16", 54, layout="3d")
    run_fly("apply_llama31_rope_pos_ids", f, pos_np=np.random.default_rng(7).integers(0, 1 << 17, 33),
            interleave=True, cos_sin=lambda p: fly_cos_sin(p, 64, 5e5, 8.0, LLAMA31))


@case
def fly_llama3_rope_scaling():
    f = Fused((40,), 4, 1, 128, "bfloat16", 55, layout="3d")
    run_fly("apply_rope_pos_ids", f, pos_np=np.random.default_rng(8).integers(0, 1 << 20, 40),
            rope_theta=5e5, rope_scaling=LLAMA3_DICT,
            cos_sin=lambda p: scaled_cos_sin(p, 128, 5e5, LLAMA3_DICT))


@case
def fly_yarn_rope_scaling_inplace_partial():
    f = Fused((40,), 4, 2, 96, "float32", 56, layout="3d")
    run_fly("apply_rope_pos_ids_inplace", f, pos_np=np.random.default_rng(9).integers(0, 1 << 16, 40),
            rot=64, rope_scaling=YARN_DICT, interleave=True,
            cos_sin=lambda p: scaled_cos_sin(p, 64, 1e4, YARN_DICT))


# ------------------------------------------------------------------ mRoPE


def check_mrope(outs, f: Fused, cos_sin3, section, interleaved, is_neox, rot):
    cos = reference.mrope_select(cos_sin3[0], section, interleaved)
    sin = reference.mrope_select(cos_sin3[1], section, interleaved)
    for out, x, what in zip(outs, (f.q, f.k), ("query", "key")):
        if x is not None:
            expect_rotated(out, f.heads64(x), cos, sin, is_neox, f.dtype, f.head_size, rot,
                           1, f"mRoPE {what}")


@case
def mrope_cache_out_of_place_then_inplace():
    section = (8, 12, 12)
    f = Fused((45,), 4, 2, 80, "bfloat16", 60, layout="3d")   # rotary 64 of 80
    cache = rope_jit.compute_cos_sin_cache(64, 4096, like=f.q)
    pos3 = np.random.default_rng(10).integers(0, 4096, (3, 45))
    p = device_ints(pos3, "int64")
    poison_outputs(f.q, f.k)
    out = rope_jit.apply_mrope_with_cos_sin_cache(p, f.q, f.k, 80, cache, True, section)
    torch.cuda.synchronize()
    check_mrope(out, f, cache_cos_sin(cache, pos3), section, False, True, 64)
    f.check_outside_unchanged([])
    rope_jit.apply_mrope_inplace_with_cache(p, f.q, f.k, 80, cache, True, section)
    torch.cuda.synchronize()
    check_mrope((f.q, f.k), f, cache_cos_sin(cache, pos3), section, False, True, 64)
    f.check_outside_unchanged([f.q, f.k])


@case
def mrope_cache_interleaved_gptj_inplace():
    section = (24, 20, 20)
    f = Fused((30,), 2, 2, 128, "float16", 61)
    cache = rope_jit.compute_cos_sin_cache(128, 2048, dtype="float16", like=f.q)
    pos3 = np.random.default_rng(11).integers(0, 2048, (3, 30))
    rope_jit.apply_mrope_inplace_with_cache(device_ints(pos3, "int32"), f.q, f.k, 128, cache,
                                            False, section, True)
    torch.cuda.synchronize()
    check_mrope((f.q, f.k), f, cache_cos_sin(cache, pos3), section, True, False, 128)
    f.check_outside_unchanged([f.q, f.k])


@case
def mrope_on_the_fly_plain_and_interleaved():
    for section, interleaved, seed in (((16, 8, 8), False, 62), ((4, 6, 6), True, 63)):
        rot = 2 * sum(section)
        f = Fused((130,), 3, 1, rot, "bfloat16", seed, layout="3d")
        pos3 = np.random.default_rng(seed).integers(0, 1 << 18, (3, 130))
        poison_outputs(f.q, f.k)
        out = rope_jit.apply_mrope_pos_ids(f.q, f.k, device_ints(pos3, "int64"), section,
                                           rope_theta=1e6, mrope_interleaved=interleaved)
        torch.cuda.synchronize()
        check_mrope(out, f, fly_cos_sin(pos3, rot, 1e6), section, interleaved, True, rot)
        f.check_outside_unchanged([])
        g = Fused((130,), 3, 1, rot, "float32", seed + 1, layout="3d")
        rope_jit.apply_mrope_pos_ids_inplace(g.q, g.k, device_ints(pos3, "int32"), section,
                                             rope_theta=1e6, mrope_interleaved=interleaved)
        torch.cuda.synchronize()
        check_mrope((g.q, g.k), g, fly_cos_sin(pos3, rot, 1e6), section, interleaved, True, rot)
        g.check_outside_unchanged([g.q, g.k])


# ------------------------------------------------------------------ inverse (backward)


def check_backward(qo, ko, q, k, cos, sin, is_neox, D, rot, seed):
    """Gradients of out-of-place results w.r.t. q and k: the upstream gradient rotated by
    the negative angle (the inverse kernel); pass-through part passed on unchanged."""
    wq, wk = device_randn(qo.shape, "float32", seed), device_randn(ko.shape, "float32", seed + 1)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (wq, wk))
    torch.cuda.synchronize()
    for g, w, what in ((gq, wq, "grad q"), (gk, wk, "grad k")):
        w64 = to_numpy64(w).reshape(*w.shape[:1], -1, D)
        expect_rotated(g, w64, cos, -sin, is_neox, "float32", D, rot, 1, what)


@case
def inverse_backward_cache():
    T, D = 41, 64
    q = device_randn((T, 4, D), "float32", 70).requires_grad_()
    k = device_randn((T, 2, D), "float32", 71).requires_grad_()
    pos_np = np.random.default_rng(12).integers(0, 512, T)
    cache = rope_jit.compute_cos_sin_cache(D, 512, dtype="bfloat16", like=q)
    qo, ko = rope_jit.apply_rope_with_cos_sin_cache(device_ints(pos_np, "int64"), q, k, D, cache,
                                                    False)
    cos, sin = cache_cos_sin(cache, pos_np)
    expect_rotated(qo.detach(), to_numpy64(q), cos, sin, False, "float32", D, D, 1, "forward q")
    check_backward(qo, ko, q, k, cos, sin, False, D, D, 72)


@case
def inverse_backward_on_the_fly_partial_indptr():
    T, D, rot = 52, 96, 48
    q = device_randn((T, 3, D), "float32", 73).requires_grad_()
    k = device_randn((T, 1, D), "float32", 74).requires_grad_()
    indptr, offsets = [0, 20, T], [100, 3000]
    qo, ko = rope_jit.apply_rope(q, k, device_ints(indptr, "int32"), device_ints(offsets, "int32"),
                                 rotary_dim=rot)
    cos, sin = fly_cos_sin(reference.positions_from_offsets(np.array(indptr), np.array(offsets)),
                           rot)
    check_backward(qo, ko, q, k, cos, sin, True, D, rot, 75)


# ------------------------------------------------------------------ positions_from_offsets


@case
def positions_from_offsets_kernel():
    indptr, offsets = np.array([0, 1, 5, 5, 10, 300]), np.array([4, 6, 7, 3, 1 << 20])
    for index in ("int32", "int64"):
        ind, off = device_ints(indptr, index), device_ints(offsets, index)
        for nnz in (None, 300, 310, 123):   # nnz past indptr[-1]: those tokens get -1
            got = rope_jit.positions_from_offsets(ind, off, nnz)
            torch.cuda.synchronize()
            want = reference.positions_from_offsets(indptr, offsets.astype(np.dtype(index)), nnz)
            assert got.dtype == INDEX_DTYPE[index] and got.is_cuda
            np.testing.assert_array_equal(got.cpu().numpy(), want)


# ------------------------------------------------------------------ zero tokens


@case
def zero_tokens():
    f = Fused((0,), 4, 2, 64, "bfloat16", 80)
    q3 = f.q.view(0, 4, 64)
    k3 = f.k.view(0, 2, 64)
    cache = rope_jit.compute_cos_sin_cache(64, 16, like=f.q)
    pos = device_ints([], "int64")
    assert rope_jit.apply_rope_inplace_with_cache(pos, f.q, f.k, 64, cache, True) is None
    qo, ko = rope_jit.apply_rope_with_cos_sin_cache(pos, f.q, f.k, 64, cache)
    assert qo.shape == f.q.shape and ko.shape == f.k.shape
    qo, ko = rope_jit.apply_rope_pos_ids(q3, k3, pos)
    assert qo.shape == q3.shape and ko.shape == k3.shape
    rope_jit.apply_rope_pos_ids_inplace(q3, k3, device_ints([], "int32"))
    empty_batch = (device_ints([0, 0, 0], "int32"), device_ints([5, 9], "int32"))
    qo, _ = rope_jit.apply_rope(q3, None, *empty_batch)
    assert qo.shape == q3.shape
    rope_jit.apply_llama31_rope_inplace(q3, k3, *empty_batch)
    assert rope_jit.positions_from_offsets(*empty_batch).numel() == 0
    assert rope_jit.positions_from_offsets(*empty_batch, 0).numel() == 0
    torch.cuda.synchronize()
    f.check_outside_unchanged([])


# ------------------------------------------------------------------ large: batched heads


def check_sampled_tokens(out, x_before: torch.Tensor, cos, sin, is_neox, dtype, D, rot, seed,
                         what):
    """Check 256 random tokens of a large result (the float64 reference of all of them
    would take longer than the kernel under the sanitizer)."""
    idx = np.sort(np.random.default_rng(seed).choice(out.shape[0], 256, replace=False))
    t = torch.from_numpy(idx)
    got = out.cpu()[t]
    x64 = to_numpy64(x_before[t]).reshape(len(idx), -1, D)
    expect_rotated(got, x64, cos[idx], sin[idx], is_neox, dtype, D, rot, 1, what)


@case
def batched_heads_large_cache_inplace():
    """8192 tokens x 40 heads: the head-batched, prefetching dispatch (README "Dispatch")."""
    T, D = 8192, 128
    f = Fused((T,), 32, 8, D, "bfloat16", 90, with_v=False, lead=0, pad=0)
    cache = rope_jit.compute_cos_sin_cache(D, 8192, like=f.q)
    pos_np = np.random.default_rng(13).integers(0, 8192, T)
    q_before, k_before = f.q.cpu(), f.k.cpu()
    rope_jit.apply_rope_inplace_with_cache(device_ints(pos_np, "int64"), f.q, f.k, D, cache, True)
    torch.cuda.synchronize()
    cos, sin = cache_cos_sin(cache, pos_np)
    check_sampled_tokens(f.q, q_before, cos, sin, True, "bfloat16", D, D, 1, "query")
    check_sampled_tokens(f.k, k_before, cos, sin, True, "bfloat16", D, D, 2, "key")


@case
def batched_heads_large_on_the_fly_out_of_place():
    T, D = 8192, 128
    q = device_randn((T, 32, D), "bfloat16", 91)
    k = device_randn((T, 8, D), "bfloat16", 92)
    pos_np = np.random.default_rng(14).integers(0, 1 << 20, T)
    q_before, k_before = q.cpu(), k.cpu()
    poison_outputs(q, k)
    qo, ko = rope_jit.apply_rope_pos_ids(q, k, device_ints(pos_np, "int32"))
    torch.cuda.synchronize()
    cos, sin = fly_cos_sin(pos_np, D)
    check_sampled_tokens(qo, q_before, cos, sin, True, "bfloat16", D, D, 3, "q")
    check_sampled_tokens(ko, k_before, cos, sin, True, "bfloat16", D, D, 4, "k")
    for x, before, what in ((q, q_before, "q"), (k, k_before, "k")):
        assert torch.equal(bits(x.cpu()), bits(before)), f"out of place changed {what}"


# ------------------------------------------------------------------ fused ops


def fp8_values(t: torch.Tensor) -> np.ndarray:
    return t.cpu().float().numpy().astype(np.float64)


@case
def fused_rope_quantize_gqa_many_tokens():
    """rope_quantize_fp8 at 8192 tokens: cos/sin in registers, several batches a thread;
    q_nope and k_nope copied; outputs poisoned first; 256 tokens checked."""
    T, hq, hk, R, N = 8192, 32, 8, 128, 64
    q, k = device_randn((T, hq, R), "bfloat16", 100), device_randn((T, hk, R), "bfloat16", 101)
    qn, kn = device_randn((T, hq, N), "bfloat16", 102), device_randn((T, hk, N), "bfloat16", 103)
    cache = rope_jit.compute_cos_sin_cache(R, 16384, like=q)
    pos_np = np.random.default_rng(15).integers(0, 16384, T)
    outs = [torch.empty(x.shape, dtype=torch.float8_e4m3fn, device="cuda") for x in (q, k, qn, kn)]
    for o in outs:
        o.view(torch.uint8).fill_(0x7F)  # NaN: an unwritten value fails the check
    rope_jit.rope_quantize_fp8(q, k, qn, kn, cache, device_ints(pos_np, "int64"),
                               quant_scale_q=0.5, quant_scale_kv=2.0, q_rope_out=outs[0],
                               k_rope_out=outs[1], q_nope_out=outs[2], k_nope_out=outs[3])
    torch.cuda.synchronize()
    idx = np.sort(np.random.default_rng(16).choice(T, 256, replace=False))
    cos, sin = cache_cos_sin(cache, pos_np[idx])
    ref = reference.rope_quantize(*(to_numpy64(x.cpu()[torch.from_numpy(idx)]) for x in (q, k, qn, kn)),
                                  cos, sin, True, 0.5, 2.0)
    for out, r, what in zip(outs, ref, ("q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out")):
        assert_fp8_close(fp8_values(out)[idx], r, "float8_e4m3fn", what, np.abs(r) + 1.0)


def _paged_append(cos_sin_cache, seed, **fly):
    """A paged append (fp8, page 16, NHD) of a batch with padding tokens and pages no
    request owns: q_out checked, only the appended cache rows written."""
    hq, hk, R, N, ps = 8, 2, 64, 64, 16
    total, indices, indptr, batch, ppos = paged_batch(ps, seed, existing=(3, 40, 0),
                                                      new=(20, 300, 22), padding=5)
    T = len(batch)
    q, k = device_randn((T, hq, R), "bfloat16", seed), device_randn((T, hk, R), "bfloat16", seed + 1)
    v = device_randn((T, hk, R + N), "bfloat16", seed + 2)
    kn = device_randn((T, hk, N), "bfloat16", seed + 3)
    pos_np = np.random.default_rng(seed).integers(0, 4096, T)
    kc = torch.empty(total, ps, hk, R + N, dtype=torch.float8_e4m3fn, device="cuda")
    vc = torch.empty_like(kc)
    for c in (kc, vc):
        c.view(torch.uint8).copy_(torch.randint(0, 256, c.shape, generator=host_gen(seed), dtype=torch.uint8))
    before = [c.cpu().view(torch.uint8).numpy() for c in (kc, vc)]
    q_out = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device="cuda")
    q_out.view(torch.uint8).fill_(0x7F)  # NaN: an unwritten value fails the check
    ix = [device_ints(a, "int32") for a in (indices, indptr, batch, ppos)]
    rope_jit.rope_quantize_fp8_append_paged_kv_cache(
        q, k, None, kn, v, cos_sin_cache, device_ints(pos_np, "int64"), (kc, vc), ix[0], ix[1],
        ix[2], ix[3], page_size=ps, q_rope_out=q_out, **fly)
    torch.cuda.synchronize()
    if cos_sin_cache is not None:
        cos, sin = cache_cos_sin(cos_sin_cache, pos_np)
    else:
        cos, sin = fly_cos_sin(pos_np, R)
    live = batch >= 0
    ref_q = reference.rope_quantize(to_numpy64(q.cpu()), to_numpy64(k.cpu()), None, None, cos, sin, True)
    assert_fp8_close(fp8_values(q_out)[live], ref_q[0][live], "float8_e4m3fn", "q_rope_out",
                     np.abs(ref_q[0][live]) + 1.0)
    pages, entries = reference.paged_locations(batch, ppos, indptr, indices, ps)
    pages, entries = pages[live], entries[live]
    k_rows = fp8_values(kc)[pages, entries]
    k_ref = np.concatenate([ref_q[1], to_numpy64(kn.cpu())], axis=-1)[live]
    assert_fp8_close(k_rows, k_ref, "float8_e4m3fn", "k cache", np.abs(k_ref) + 1.0)
    v_ref = to_numpy64(v.cpu())[live]
    assert_fp8_close(fp8_values(vc)[pages, entries], v_ref, "float8_e4m3fn", "v cache")
    for c, b, what in ((kc, before[0], "k cache"), (vc, before[1], "v cache")):
        assert_only_rows_written(c.cpu().view(torch.uint8).numpy(), b, pages, entries, "NHD", what)


@case
def fused_append_paged_cache():
    """Cos/sin from a cache (in registers), the page-table walk per thread."""
    _paged_append(rope_jit.compute_cos_sin_cache(64, 4096, like=torch.empty(0, device="cuda")), 110)


@case
def fused_append_paged_on_the_fly():
    """Cos/sin on the fly: the block's shared tile and its barrier (racecheck, synccheck)."""
    _paged_append(None, 120)


@case
def fused_qk_norm_rope_few_and_many_tokens():
    """fused_qk_norm_rope at 64 tokens (cos/sin and weights per thread, no shared memory)
    and 8192 (the shared tile and its barrier), q and k heads of 128 of a packed QKV
    buffer; v heads untouched; 256 tokens of the large call checked."""
    hq, hk, D = 8, 2, 128
    cache = rope_jit.compute_cos_sin_cache(D, 4096, like=torch.empty(0, device="cuda"))
    w_q, w_k = device_randn((D,), "bfloat16", 130), device_randn((D,), "bfloat16", 131)
    for T, seed in ((64, 132), (8192, 133)):
        qkv = device_randn((T, (hq + 2 * hk) * D), "bfloat16", seed)
        before = qkv.cpu()
        pos_np = np.random.default_rng(seed).integers(0, 4096, T)
        rope_jit.fused_qk_norm_rope(qkv, hq, hk, hk, D, 1e-6, w_q, w_k, cache, True,
                                    device_ints(pos_np, "int64"))
        torch.cuda.synchronize()
        idx = np.sort(np.random.default_rng(seed).choice(T, min(T, 256), replace=False))
        cos, sin = cache_cos_sin(cache, pos_np[idx])
        x64 = to_numpy64(before[torch.from_numpy(idx)])
        ref = reference.qk_norm_rope(x64, hq, hk, D, 1e-6, to_numpy64(w_q.cpu()),
                                     to_numpy64(w_k.cpu()), cos, sin, True)
        got = to_numpy64(qkv.cpu()[torch.from_numpy(idx)])
        n = (hq + hk) * D
        err = np.abs(got[:, :n] - ref[:, :n])
        tol = 2.0 ** -7 * np.abs(ref[:, :n]) + 2.0 ** -12  # one bf16 rounding of the result
        assert (err <= tol).all(), f"T={T}: {int((err > tol).sum())} q/k values off"
        assert np.array_equal(got[:, n:], x64[:, n:]), f"T={T}: v heads changed"


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--case", action="append", choices=sorted(CASES), metavar="NAME",
                        help="run only this case (repeatable; default: all)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    if not torch.cuda.is_available():
        print("sanitizer_cases: needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    names = args.case or list(CASES)
    failed = []
    for name in names:
        start = time.perf_counter()
        try:
            CASES[name]()
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 (report every case, then fail)
            failed.append(name)
            print(f"FAIL {name} ({time.perf_counter() - start:.2f} s)\n{traceback.format_exc()}",
                  flush=True)
        else:
            print(f"ok   {name} ({time.perf_counter() - start:.2f} s)", flush=True)
    print(f"sanitizer_cases: {len(names) - len(failed)} passed, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
