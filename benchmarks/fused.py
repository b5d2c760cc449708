#!/usr/bin/env python
"""Fused RoPE benchmark: rope_jit's fused ops against FlashInfer's fused kernels and against
the unfused sequence each one replaces, on one GPU, in one process::

    python benchmarks/fused.py [--out FILE.json] [--flashinfer .peers/libfi_rope.so]
                               [--tokens 1,16,...] [--ops rope_quantize,...] [--quick]

What is measured
----------------
* The device copy bandwidth (``timing.copy_bandwidth``): every percentage is of it.
* Per op, shape and token count T, the median GPU time of one call of each implementation:

  - ``rope_jit``: the fused function (outputs preallocated, as in an engine step);
  - ``flashinfer``: FlashInfer's fused kernels through the C ABI of ``libfi_rope.so``
    (../shared/peers/flashinfer: ``fi_rope_quantize_bf16_e4m3``,
    ``fi_rope_quantize_append_paged_bf16_e4m3``), where FlashInfer has the op and shape;
  - ``unfused``: the sequence the fused op replaces: rope_jit's plain RoPE, then the
    quantization and the cache write (or the RMSNorm) in PyTorch.

  Ops and shapes: ``rope_quantize_fp8`` (Llama-3-8B GQA: 32/8 heads of 128; DeepSeek-V3
  MLA: 128 q heads, rope 64, q nope 128 (FlashInfer needs equal nope dims: n/a) and the
  absorbed decode form, q nope 512; kv 512 + 64), ``rope_quantize_fp8_append_paged_kv_cache``
  (Llama-3-8B into an NHD FP8 cache of page 16; DeepSeek-V3 MLA into ckv/kpe caches),
  ``concat_and_cache_mla_rope_fused`` (vLLM, DeepSeek-V3, FP8 cache of block 64),
  ``rope_and_reshape_and_cache_flash`` (vLLM, Llama-3-8B, bf16 cache) and
  ``fused_qk_norm_rope`` (Qwen3-8B: 32/8/8 heads of 128). Inputs bf16, FP8 e4m3 outputs,
  fp32 cos/sin cache (FlashInfer's only kind; bf16 for vLLM's MLA op, as vLLM passes it),
  int64 positions uniform in [0, 32768), NeoX style.

* Bytes are what the fused op must move, counted once per array: inputs read, outputs and
  cache rows written (in place: read and written), one cos/sin cache row and the index
  entries per token. Every implementation of a row is charged the same count, so the
  percentages compare; achieved bandwidth = bytes / time.
* ``ceiling`` (the FP8 ops ``rope_quantize_fp8`` and the paged append): the narrowing copy of
  ``ceilings.py``: the call's 16-bit input bytes read in 16-byte vectors and written at half
  width to another buffer, nothing else: what this read/write mix allows on the GPU
  (below the copy: on the H200 a cast of q and k to FP8 reaches about 75-80% of it).
  Charged the op's bytes; ``%ceil`` is the ceiling's time over the implementation's.

How
---
Correctness first: before an implementation is timed on a shape, its results on fresh
random inputs (T = 200) are compared with the float64 reference (rope_jit.reference, fed
the same cache values): the fused ones must be within half an FP8 step (one rounding), the
unfused ones within one step (they round to bf16 in between). One that fails is reported
WRONG and not timed. Timing is ``timing.time_calls``: one CUDA graph holding one call per
buffer set, the sets rotated so their total is several times L2, median over replays.
Output: a table on stdout and JSON (--out).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import platform
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # this checkout's rope_jit, installed or not
sys.path.insert(0, str(HERE))

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402
from ceilings import narrow_copy  # noqa: E402
from timing import buffer_sets, copy_bandwidth, time_calls  # noqa: E402

E4M3 = torch.float8_e4m3fn
BF16 = torch.bfloat16
MAX_POS = 32768
CHECK_TOKENS = 200
TOKENS = (1, 16, 128, 1024, 8192, 32768)
QUICK_TOKENS = (1, 128, 8192)


def rnd(*shape, dtype=BF16):
    return torch.randn(*shape, device="cuda").to(dtype)


def positions(T):
    return torch.randint(0, MAX_POS, (T,), device="cuda")


def f64(t) -> np.ndarray:
    return t.float().double().cpu().numpy()


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


_CACHES: dict = {}


def cos_sin_cache(rot, dtype=torch.float32):
    key = (rot, dtype)
    if key not in _CACHES:
        _CACHES[key] = rope_jit.compute_cos_sin_cache(rot, MAX_POS, dtype=str(dtype)[6:],
                                                      like=torch.empty(0, device="cuda"))
    return _CACHES[key]


def cos_sin(cache, pos):
    return reference.cos_sin_from_cache(f64(cache), pos.cpu().numpy())


def rotate(x64, cos, sin):
    return reference.apply_rotary(x64[:, None] if x64.ndim == 2 else x64, cos, sin, True).reshape(x64.shape)


def _row_scale(ref):
    """The rms of each row: the size of the operands, for the arithmetic slack."""
    return np.sqrt(np.mean(np.square(ref), axis=-1, keepdims=True))


def fp8_ok(got, ref, strict: bool) -> bool:
    """Within half an FP8 step of the reference (one rounding; fp32 slack) or, not strict,
    one step plus the bf16 rounding an unfused sequence makes first."""
    want = np.clip(ref, -448.0, 448.0)
    step = reference.fp8_ulp(want, "float8_e4m3fn")
    scale = _row_scale(ref)
    tol = (0.5 * step + 2.0 ** -20 * scale) if strict else (step + 2.0 ** -7 * np.abs(ref) + 2.0 ** -8 * scale)
    return bool(np.all(np.abs(got - want) <= tol))


def bf16_ok(got, ref, strict: bool) -> bool:
    """Within one bf16 ulp (fp32 slack) or, not strict, two plus an intermediate rounding."""
    scale = _row_scale(ref)
    tol = reference.ulp(ref, "bfloat16") * (1 if strict else 2) + (2.0 ** -20 if strict else 2.0 ** -6) * scale
    return bool(np.all(np.abs(got - ref) <= tol))


# ------------------------------------------------------------------ FlashInfer through its C ABI

class FlashInfer:
    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        P, U, F, I = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_float, ctypes.c_int
        S = ctypes.POINTER(ctypes.c_size_t)
        self.lib.fi_rope_quantize_bf16_e4m3.argtypes = (
            [P] * 10 + [U] * 5 + [S, F, F, I, P])
        self.lib.fi_rope_quantize_append_paged_bf16_e4m3.argtypes = (
            [P] * 16 + [U] * 7 + [I, S, F, F, I, P])

    @staticmethod
    def _strides(*pairs):
        return (ctypes.c_size_t * len(pairs))(*pairs)

    def rope_quantize(self, q_rope, k_rope, q_nope, k_nope, q_out, k_out, qn_out, kn_out, cache,
                      pos, sq, skv):
        mla = k_rope.dim() == 2
        nope = q_nope.shape[-1] if q_nope is not None else 0
        q_nope = q_nope if q_nope is not None else q_rope  # never read with no_rope_dim 0
        k_nope = k_nope if k_nope is not None else k_rope
        qn_out = qn_out if qn_out is not None else q_out
        kn_out = kn_out if kn_out is not None else k_out

        def nh(t, two_d=False):
            return (t.stride(0), 0 if two_d else t.stride(1))

        s = self._strides(*nh(q_rope), *nh(q_nope), *nh(q_out), *nh(qn_out), *nh(k_rope, mla),
                          *nh(k_nope, mla), *nh(k_out, mla), *nh(kn_out, mla))
        rc = self.lib.fi_rope_quantize_bf16_e4m3(
            q_rope.data_ptr(), k_rope.data_ptr(), q_nope.data_ptr(), k_nope.data_ptr(),
            q_out.data_ptr(), k_out.data_ptr(), qn_out.data_ptr(), kn_out.data_ptr(),
            cache.data_ptr(), pos.data_ptr(), q_rope.shape[0], q_rope.shape[1],
            1 if mla else k_rope.shape[1], q_rope.shape[-1], nope, s, sq, skv, 0,
            torch.cuda.current_stream().cuda_stream)
        assert rc == 0, f"fi_rope_quantize_bf16_e4m3 returned {rc}"

    def append_paged(self, q_rope, k_rope, v, q_out, k_cache, v_cache, kv_indices, kv_indptr,
                     last_page_len, batch, ppos, cache, pos, page_size, sq, skv):
        s = self._strides(q_rope.stride(0), q_rope.stride(1), q_rope.stride(0), q_rope.stride(1),
                          q_out.stride(0), q_out.stride(1), q_out.stride(0), q_out.stride(1),
                          k_rope.stride(0), k_rope.stride(1), k_rope.stride(0), k_rope.stride(1),
                          v.stride(0), v.stride(1))
        rc = self.lib.fi_rope_quantize_append_paged_bf16_e4m3(
            q_rope.data_ptr(), k_rope.data_ptr(), q_rope.data_ptr(), k_rope.data_ptr(),
            v.data_ptr(), q_out.data_ptr(), q_out.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), kv_indices.data_ptr(), kv_indptr.data_ptr(),
            last_page_len.data_ptr(), batch.data_ptr(), ppos.data_ptr(), cache.data_ptr(),
            pos.data_ptr(), q_rope.shape[0], q_rope.shape[1], k_rope.shape[1], q_rope.shape[-1],
            0, page_size, kv_indptr.shape[0] - 1, 0, s, sq, skv, 0,
            torch.cuda.current_stream().cuda_stream)
        assert rc == 0, f"fi_rope_quantize_append_paged_bf16_e4m3 returned {rc}"


# ------------------------------------------------------------------ the ops
#
# Each op is a class: make(T) builds one buffer set (inputs, preallocated outputs, caches),
# impls() names the implementations (callables of a set), check(set, impl) compares an
# implementation's results on a fresh set with the float64 reference, bytes(set) counts
# what the fused op must move.

class RopeQuantize:
    op = "rope_quantize_fp8"

    def __init__(self, shape, hq, hk, rot, q_nope, k_nope, fi):
        self.shape, self.hq, self.hk, self.rot = shape, hq, hk, rot
        self.nq, self.nk, self.fi = q_nope, k_nope, fi
        self.mla = hk == 0

    def make(self, T):
        k_shape = (T, self.rot) if self.mla else (T, self.hk, self.rot)
        kn_shape = (T, self.nk) if self.mla else (T, self.hk, self.nk)
        x = dict(q=rnd(T, self.hq, self.rot), k=rnd(*k_shape),
                 qn=rnd(T, self.hq, self.nq) if self.nq else None,
                 kn=rnd(*kn_shape) if self.nk else None, pos=positions(T),
                 cache=cos_sin_cache(self.rot))
        x["outs"] = [torch.empty(t.shape, dtype=E4M3, device="cuda") if t is not None else None
                     for t in (x["q"], x["k"], x["qn"], x["kn"])]
        return x

    def bytes(self, x):
        T = x["q"].shape[0]
        return nbytes(x["q"], x["k"], x["qn"], x["kn"], *x["outs"]) + T * (8 + self.rot * 4)

    def input_bytes(self, x):
        """The 16-bit inputs, every one written at FP8 width (the narrowing ceiling's)."""
        return nbytes(x["q"], x["k"], x["qn"], x["kn"])

    def impls(self):
        out = {"rope_jit": self.rope_jit, "unfused": self.unfused}
        if self.fi is not None and self.nq == self.nk:
            out["flashinfer"] = lambda x: self.fi.rope_quantize(
                x["q"], x["k"], x["qn"], x["kn"], *x["outs"], x["cache"], x["pos"], 1.0, 1.0)
        return out

    def rope_jit(self, x):
        q_out, k_out, qn_out, kn_out = x["outs"]
        rope_jit.rope_quantize_fp8(x["q"], x["k"], x["qn"], x["kn"], x["cache"], x["pos"],
                                   q_rope_out=q_out, k_rope_out=k_out, q_nope_out=qn_out,
                                   k_nope_out=kn_out)

    def unfused(self, x):
        k = x["k"] if not self.mla else x["k"][:, None]
        q_rot, k_rot = rope_jit.apply_rope_with_cos_sin_cache(x["pos"], x["q"], k, self.rot,
                                                              x["cache"])
        outs = x["outs"]
        outs[0].copy_(q_rot)
        outs[1].copy_(k_rot.view(outs[1].shape))
        for src, dst in ((x["qn"], outs[2]), (x["kn"], outs[3])):
            if src is not None:
                dst.copy_(src)

    def check(self, x, impl, fn):
        fn(x)
        cos, sin = cos_sin(x["cache"], x["pos"])
        strict = impl != "unfused"
        refs = (rotate(f64(x["q"]), cos, sin), rotate(f64(x["k"]), cos, sin),
                f64(x["qn"]) if self.nq else None, f64(x["kn"]) if self.nk else None)
        return all(fp8_ok(f64(o), r, strict) for o, r in zip(x["outs"], refs) if r is not None)


class AppendPaged:
    op = "rope_quantize_fp8_append_paged_kv_cache"
    page_size = 16

    def __init__(self, shape, hq, hk, rot, nope, fi):
        self.shape, self.hq, self.hk, self.rot, self.nope, self.fi = shape, hq, hk, rot, nope, fi
        self.mla = hk == 0

    def make(self, T):
        ps = self.page_size
        pages = -(-T // ps) + 1
        i32 = dict(dtype=torch.int32, device="cuda")
        x = dict(q=rnd(T, self.hq, self.rot), qn=rnd(T, self.hq, self.nope) if self.nope else None,
                 pos=positions(T), cache=cos_sin_cache(self.rot),
                 kv_indices=torch.randperm(pages, device="cuda").to(torch.int32),
                 kv_indptr=torch.tensor([0, pages], **i32), last=torch.tensor([1], **i32),
                 batch=torch.zeros(T, **i32), ppos=torch.arange(T, **i32))
        x["q_out"] = torch.empty(x["q"].shape, dtype=E4M3, device="cuda")
        x["qn_out"] = torch.empty(x["qn"].shape, dtype=E4M3, device="cuda") if self.nope else None
        if self.mla:
            x.update(k=rnd(T, self.rot), kn=rnd(T, self.nope), v=None,
                     caches=(torch.zeros(pages, ps, self.nope, dtype=E4M3, device="cuda"),
                             torch.zeros(pages, ps, self.rot, dtype=E4M3, device="cuda")))
        else:
            head = self.rot + self.nope
            x.update(k=rnd(T, self.hk, self.rot), kn=None, v=rnd(T, self.hk, head),
                     caches=(torch.zeros(pages, ps, self.hk, head, dtype=E4M3, device="cuda"),
                             torch.zeros(pages, ps, self.hk, head, dtype=E4M3, device="cuda")))
        return x

    def bytes(self, x):
        T = x["q"].shape[0]
        kv = (x["k"].numel() + (x["kn"].numel() if x["kn"] is not None else 0)
              + (x["v"].numel() if x["v"] is not None else 0))
        return (nbytes(x["q"], x["qn"], x["k"], x["kn"], x["v"], x["q_out"], x["qn_out"]) + kv
                + T * (8 + 4 + 4 + self.rot * 4))

    def input_bytes(self, x):
        """The 16-bit inputs, every one written at FP8 width (the narrowing ceiling's)."""
        return nbytes(x["q"], x["qn"], x["k"], x["kn"], x["v"])

    def impls(self):
        out = {"rope_jit": self.rope_jit, "unfused": self.unfused}
        if self.fi is not None and not self.mla and not self.nope:
            out["flashinfer"] = lambda x: self.fi.append_paged(
                x["q"], x["k"], x["v"], x["q_out"], *x["caches"], x["kv_indices"], x["kv_indptr"],
                x["last"], x["batch"], x["ppos"], x["cache"], x["pos"], self.page_size, 1.0, 1.0)
        return out

    def rope_jit(self, x):
        rope_jit.rope_quantize_fp8_append_paged_kv_cache(
            x["q"], x["k"], x["qn"], x["kn"], x["v"], x["cache"], x["pos"], x["caches"],
            x["kv_indices"], x["kv_indptr"], x["batch"], x["ppos"], page_size=self.page_size,
            q_rope_out=x["q_out"], q_nope_out=x["qn_out"])

    def _rows(self, x):
        ps = self.page_size
        page = x["kv_indices"][x["kv_indptr"][x["batch"]] + x["ppos"] // ps].long()
        return page, (x["ppos"] % ps).long()

    def unfused(self, x):
        k = x["k"] if not self.mla else x["k"][:, None]
        q_rot, k_rot = rope_jit.apply_rope_with_cos_sin_cache(x["pos"], x["q"], k, self.rot,
                                                              x["cache"])
        x["q_out"].copy_(q_rot)
        if self.nope:
            x["qn_out"].copy_(x["qn"])
        page, entry = self._rows(x)
        c0, c1 = (c.view(torch.uint8) for c in x["caches"])  # index_put of raw bytes
        if self.mla:
            c0[page, entry] = x["kn"].to(E4M3).view(torch.uint8)
            c1[page, entry] = k_rot[:, 0].to(E4M3).view(torch.uint8)
        else:
            c0[page, entry] = k_rot.to(E4M3).view(torch.uint8)
            c1[page, entry] = x["v"].to(E4M3).view(torch.uint8)

    def check(self, x, impl, fn):
        fn(x)
        cos, sin = cos_sin(x["cache"], x["pos"])
        strict = impl != "unfused"
        page, entry = (t.cpu().numpy() for t in self._rows(x))
        ok = fp8_ok(f64(x["q_out"]), rotate(f64(x["q"]), cos, sin), strict)
        if self.nope:
            ok &= fp8_ok(f64(x["qn_out"]), f64(x["qn"]), strict)
        c0, c1 = (f64(c) for c in x["caches"])
        k_ref = rotate(f64(x["k"]), cos, sin)
        if self.mla:
            return ok and fp8_ok(c1[page, entry], k_ref, strict) and fp8_ok(c0[page, entry], f64(x["kn"]), strict)
        return ok and fp8_ok(c0[page, entry], k_ref, strict) and fp8_ok(c1[page, entry], f64(x["v"]), strict)


class MlaCache:
    op = "concat_and_cache_mla_rope_fused"
    block = 64

    def __init__(self, shape, hq, rot, lora):
        self.shape, self.hq, self.rot, self.lora = shape, hq, rot, lora

    def make(self, T):
        blocks = -(-T // self.block) + 1
        return dict(q=rnd(T, self.hq, self.rot), k=rnd(T, self.rot), kv_c=rnd(T, self.lora),
                    pos=positions(T), cache=cos_sin_cache(self.rot, BF16),
                    slots=torch.randperm(blocks * self.block, device="cuda")[:T],
                    kv_cache=torch.zeros(blocks, self.block, self.lora + self.rot,
                                         dtype=torch.uint8, device="cuda"),
                    scale=torch.tensor([0.5], device="cuda"))

    def bytes(self, x):
        T = x["q"].shape[0]
        return 2 * nbytes(x["q"], x["k"]) + nbytes(x["kv_c"]) + T * (self.lora + self.rot) + T * (16 + self.rot * 2)

    def impls(self):
        return {"rope_jit": self.rope_jit, "unfused": self.unfused}

    def rope_jit(self, x):
        rope_jit.concat_and_cache_mla_rope_fused(x["pos"], x["q"], x["k"], x["kv_c"], x["cache"], True,
                                                 x["slots"], x["kv_cache"], "fp8", x["scale"])

    def unfused(self, x):
        rope_jit.apply_rope_with_cos_sin_cache_inplace(x["pos"], x["q"], x["k"][:, None], self.rot,
                                                       x["cache"])
        row = torch.cat([x["kv_c"], x["k"]], dim=-1).float().div(x["scale"]).to(E4M3)
        x["kv_cache"].view(-1, self.lora + self.rot)[x["slots"]] = row.view(torch.uint8)

    def check(self, x, impl, fn):
        cos, sin = cos_sin(x["cache"], x["pos"])
        q0, k0, c0 = f64(x["q"]), f64(x["k"]), f64(x["kv_c"])
        fn(x)
        strict = impl != "unfused"
        rows = f64(x["kv_cache"].view(-1, self.lora + self.rot)[x["slots"]].view(E4M3))
        k_ref = rotate(k0, cos, sin)
        return (bf16_ok(f64(x["q"]), rotate(q0, cos, sin), strict) and bf16_ok(f64(x["k"]), k_ref, strict)
                and fp8_ok(rows[:, :self.lora], c0 / 0.5, strict)
                and fp8_ok(rows[:, self.lora:], k_ref / 0.5, strict))


class KvCache:
    op = "rope_and_reshape_and_cache_flash"
    block = 16

    def __init__(self, shape, hq, hk, head):
        self.shape, self.hq, self.hk, self.head = shape, hq, hk, head

    def make(self, T):
        blocks = -(-T // self.block) + 1
        qkv = rnd(T, (self.hq + 2 * self.hk) * self.head)
        q, k, v = qkv.split([self.hq * self.head, self.hk * self.head, self.hk * self.head], -1)
        shape = (blocks, self.block, self.hk, self.head)
        return dict(q=q, k=k, v=v, pos=positions(T), cache=cos_sin_cache(self.head),
                    slots=torch.randperm(blocks * self.block, device="cuda")[:T],
                    kc=torch.zeros(shape, dtype=BF16, device="cuda"),
                    vc=torch.zeros(shape, dtype=BF16, device="cuda"))

    def bytes(self, x):
        """q and k read and written in place, k and v read once and written to the caches,
        positions, slots, a cos/sin row per token."""
        T = x["q"].shape[0]
        return (2 * nbytes(x["q"]) + 3 * nbytes(x["k"]) + 2 * nbytes(x["v"])
                + T * (8 + 8 + self.head * 4))

    def impls(self):
        return {"rope_jit": self.rope_jit, "unfused": self.unfused}

    def rope_jit(self, x):
        rope_jit.rope_and_reshape_and_cache_flash(x["pos"], x["q"], x["k"], x["v"], self.head, x["cache"],
                                                  True, x["kc"], x["vc"], x["slots"])

    def unfused(self, x):
        rope_jit.apply_rope_inplace_with_cache(x["pos"], x["q"], x["k"], self.head, x["cache"], True)
        T = x["q"].shape[0]
        x["kc"].view(-1, self.hk, self.head)[x["slots"]] = x["k"].view(T, self.hk, self.head)
        x["vc"].view(-1, self.hk, self.head)[x["slots"]] = x["v"].view(T, self.hk, self.head)

    def check(self, x, impl, fn):
        T = x["q"].shape[0]
        cos, sin = cos_sin(x["cache"], x["pos"])
        q0 = f64(x["q"]).reshape(T, self.hq, self.head)
        k0 = f64(x["k"]).reshape(T, self.hk, self.head)
        fn(x)
        k_ref = reference.apply_rotary(k0, cos, sin, True)
        rows = f64(x["kc"].view(-1, self.hk, self.head)[x["slots"]])
        return (bf16_ok(f64(x["q"]).reshape(q0.shape), reference.apply_rotary(q0, cos, sin, True), True)
                and bf16_ok(rows, k_ref, True)
                and np.array_equal(f64(x["vc"].view(-1, self.hk, self.head)[x["slots"]]),
                                   f64(x["v"]).reshape(T, self.hk, self.head)))


class QKNormRope:
    op = "fused_qk_norm_rope"

    def __init__(self, shape, hq, hk, head):
        self.shape, self.hq, self.hk, self.head = shape, hq, hk, head

    def make(self, T):
        return dict(qkv=rnd(T, (self.hq + 2 * self.hk) * self.head), w=1 + 0.1 * rnd(self.head),
                    pos=positions(T), cache=cos_sin_cache(self.head))

    def bytes(self, x):
        T = x["qkv"].shape[0]
        return 2 * T * (self.hq + self.hk) * self.head * 2 + T * (8 + self.head * 4)

    def impls(self):
        return {"rope_jit": self.rope_jit, "unfused": self.unfused}

    def rope_jit(self, x):
        rope_jit.fused_qk_norm_rope(x["qkv"], self.hq, self.hk, self.hk, self.head, 1e-6, x["w"], x["w"],
                                    x["cache"], True, x["pos"])

    def unfused(self, x):
        T, D = x["qkv"].shape[0], self.head
        qk = x["qkv"][:, :(self.hq + self.hk) * D].view(T, -1, D)
        xf = qk.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * x["w"].float()).to(BF16)
        q, k = normed[:, :self.hq], normed[:, self.hq:]
        rope_jit.apply_rope_inplace_with_cache(x["pos"], q, k, D, x["cache"], True)
        qk.copy_(normed)

    def check(self, x, impl, fn):
        cos, sin = cos_sin(x["cache"], x["pos"])
        x0 = f64(x["qkv"])
        fn(x)
        n = self.hq + self.hk
        ref = reference.qk_norm_rope(x0, self.hq, self.hk, self.head, 1e-6, f64(x["w"]), f64(x["w"]),
                                     cos, sin, True).reshape(x0.shape[0], -1, self.head)[:, :n]
        got = f64(x["qkv"]).reshape(x0.shape[0], -1, self.head)[:, :n]
        return bf16_ok(got, ref, impl != "unfused")


def cases(fi):
    return [
        RopeQuantize("llama3-8b", 32, 8, 128, 0, 0, fi),
        RopeQuantize("dsv3-mla-absorbed", 128, 0, 64, 512, 512, fi),
        RopeQuantize("dsv3-mla", 128, 0, 64, 128, 512, fi),
        AppendPaged("llama3-8b", 32, 8, 128, 0, fi),
        AppendPaged("dsv3-mla", 128, 0, 64, 512, fi),
        MlaCache("dsv3-mla", 128, 64, 512),
        KvCache("llama3-8b", 32, 8, 128),
        QKNormRope("qwen3-8b", 32, 8, 128),
    ]


# ------------------------------------------------------------------ running

def _check(case, name, fn) -> bool:
    """The implementation on fresh inputs against the float64 reference."""
    ok = case.check(case.make(CHECK_TOKENS), name, fn)
    torch.cuda.synchronize()
    return ok


def _narrow_ceiling(case, T) -> tuple:
    """(seconds, bytes charged) of the narrowing ceiling on the inputs of T tokens: each set
    its own source of the call's input bytes and destination of half; charged the op's
    bytes, so its percentages compare with the op's."""
    probe = case.make(T)
    per_set, src_bytes = case.bytes(probe), case.input_bytes(probe)
    del probe
    pairs = [(torch.empty(src_bytes, dtype=torch.uint8, device="cuda").random_(),
              torch.empty(src_bytes // 2, dtype=torch.uint8, device="cuda"))
             for _ in range(buffer_sets(src_bytes * 3 // 2, max_sets=16))]
    t = time_calls([lambda p=p: narrow_copy(*p) for p in pairs], replays=20)
    return t, per_set


def run(args) -> dict:
    fi = None
    notes = []
    if args.flashinfer and Path(args.flashinfer).exists():
        fi = FlashInfer(args.flashinfer)
    else:
        notes.append(f"FlashInfer library not found at {args.flashinfer}: its rows are missing")
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (
        QUICK_TOKENS if args.quick else TOKENS)
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for case in cases(fi):
        if args.ops and case.op not in args.ops.split(","):
            continue
        impls = case.impls()
        verdict = {}
        for name, fn in impls.items():
            try:
                verdict[name] = "ok" if _check(case, name, fn) else "WRONG"
            except Exception as e:  # an implementation that fails is reported, never fatal
                verdict[name] = f"error: {type(e).__name__}: {e}"
                traceback.print_exc()
        for T in tokens:
            results = {}
            for name, fn in impls.items():
                if verdict[name] != "ok":
                    results[name] = None
                    continue
                try:
                    probe = case.make(T)
                    per_set = case.bytes(probe)
                    sets = [probe] + [case.make(T) for _ in range(buffer_sets(per_set, max_sets=16) - 1)]
                    t = time_calls([lambda s=s, fn=fn: fn(s) for s in sets], replays=20)
                    results[name] = (t, per_set)
                except Exception as e:
                    notes.append(f"{case.op} {case.shape} T={T} {name}: {type(e).__name__}: {e}")
                    results[name] = None
                finally:
                    sets = probe = None
                    gc.collect()
                    torch.cuda.empty_cache()
            if hasattr(case, "input_bytes"):
                results["ceiling"] = _narrow_ceiling(case, T)
                verdict["ceiling"] = "pattern"
            fi_t, ceiling_t = results.get("flashinfer"), results.get("ceiling")
            for name, r in results.items():
                row = dict(op=case.op, shape=case.shape, tokens=T, impl=name, check=verdict[name])
                if r is not None:
                    t, b = r
                    row.update(time_us=t * 1e6, bytes=b, bandwidth_tbs=b / t / 1e12,
                               copy_pct=100 * b / t / copy_bw,
                               ceiling_pct=100 * ceiling_t[0] / t if ceiling_t else None,
                               vs_flashinfer=(fi_t[0] / t) if fi_t else None)
                rows.append(row)
    return dict(gpu=torch.cuda.get_device_name(), copy_bandwidth_tbs=copy_bw / 1e12,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, python=platform.python_version(),
                rope_jit=rope_jit.__version__, rows=rows, notes=notes)


def table(result) -> str:
    lines = [f"{'op':40} {'shape':18} {'T':>6} {'impl':10} {'us':>9} {'TB/s':>6} "
             f"{'%copy':>6} {'%ceil':>6} {'FI/this':>7}"]
    for r in result["rows"]:
        if "time_us" not in r:
            lines.append(f"{r['op']:40} {r['shape']:18} {r['tokens']:>6} {r['impl']:10} "
                         f"{'-':>9}  ({r['check']})")
            continue
        vs = f"{r['vs_flashinfer']:.2f}x" if r.get("vs_flashinfer") else ""
        ceil = f"{r['ceiling_pct']:5.1f}%" if r.get("ceiling_pct") else ""
        lines.append(f"{r['op']:40} {r['shape']:18} {r['tokens']:>6} {r['impl']:10} "
                     f"{r['time_us']:9.2f} {r['bandwidth_tbs']:6.2f} {r['copy_pct']:5.1f}% "
                     f"{ceil:>6} {vs:>7}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "fused.json"))
    p.add_argument("--flashinfer", default=str(REPO / ".peers" / "libfi_rope.so"))
    p.add_argument("--tokens", default=None, help="comma-separated token counts")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    p.add_argument("--quick", action="store_true", help=f"token counts {QUICK_TOKENS}")
    args = p.parse_args(argv)
    result = run(args)
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
