#!/usr/bin/env python
"""Side-by-side RoPE benchmark: rope_jit against FlashInfer, PyTorch and a device copy.

One command, one GPU, one process::

    python benchmarks/run.py [--out DIR] [--flashinfer PATH/libfi_rope.so]
                             [--tokens 1,16,...] [--shapes llama3-8b,...] [--quick]

What is measured
----------------
* The device copy bandwidth (``timing.copy_bandwidth``): every percentage below is of it.
* For each shape and token count T, bf16 q ``[T, Hq, D]`` and k ``[T, Hk, D]`` (contiguous),
  int64 positions uniform in [0, 100000), the median GPU time of one in-place call of:

  - ``rope_jit/cache_fp32``, ``rope_jit/cache_bf16``: ``apply_rope_inplace_with_cache``;
  - ``rope_jit/on_the_fly``: ``apply_rope_pos_ids_inplace``;
  - ``flashinfer/cache_fp32``, ``flashinfer/on_the_fly``: FlashInfer's own kernels through
    the C ABI of ``.peers/libfi_rope.so`` (see ../shared/peers/flashinfer), via ctypes;
  - ``torch_eager``: vLLM's native PyTorch formula (``RotaryEmbedding.forward_static``,
    bf16 cache as vLLM casts it), written back into q and k with ``copy_``;
  - ``torch_compile``: the same function under ``torch.compile`` (default mode,
    ``dynamic=False``), compiled once per (shape, T);
  - ``liger_kernel``, ``vllm/rotary_embedding``: when importable (otherwise a note);
  - ``copy``: a torch device copy of a buffer as large as q and k together: the launch
    floor at a few tokens and the ceiling at many.

* Host time per call: 10,000 back-to-back calls at one token (Llama-3-8B, in place),
  ``time.perf_counter`` around the loop.

How
---
Correctness first: before an implementation is timed on a shape, its output on fresh
random inputs (at one moderate T, the largest requested T <= 1024) is compared with the
float64 reference of ``rope_jit.reference``, fed the same rounded cos/sin cache the
implementation reads, under a tolerance suited to its arithmetic (``TOLERANCES``). One
that fails is reported as WRONG and not timed.

Timing is ``timing.time_calls``: one CUDA graph holding one call per buffer set, the sets
rotated so their total is several times L2, median over replays. An implementation that
cannot be captured (``torch.compile`` may not) falls back to CUDA events around each eager
call (``timing.time_calls_eager``), and the output says so.

Bytes per call are the SPEC's roofline for an in-place call: read + write of the rotated
part of q and k (``T*(Hq+Hk)*R*2`` bytes each way) + positions (``8*T``) + cache rows read
(``T*R*itemsize``; 0 on the fly). Every implementation is charged the same count, even
those that move whole heads (FlashInfer, torch), so the percentages compare. Achieved
bandwidth = bytes / time. At T <= 128 the time is also given as a multiple of the copy's.

Every implementation runs wrapped: a failure, refusal or missing package becomes a note
in the output, never a crash. Outputs (``--out``, default benchmarks/results):
``results.json`` (everything, rewritten after each shape), ``RESULTS.md`` (one table per
shape, host overhead, notes; also printed at the end) and ``bandwidth.png``.

``--dry-run`` runs the same pipeline on the CPU (the PyTorch formula, its correctness
check, the report and the plot; the GPU-only implementations report errors) to test this
script on a machine without a GPU. Its timings mean nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # this checkout's rope_jit, installed or not
sys.path.insert(0, str(HERE))  # timing.py

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402
from rope_jit.scaling import resolve_rope_scaling  # noqa: E402
from timing import buffer_sets, copy_bandwidth, time_calls, time_calls_eager  # noqa: E402

MAX_POSITION = 100_000          # positions uniform in [0, MAX_POSITION); rows of every cache
ROPE_THETA = 1e4                # every cache's base; the on-the-fly calls' default rope_theta
DEFAULT_TOKENS = (1, 16, 128, 1024, 8192, 32768)
QUICK_TOKENS = (1, 1024, 8192)
DRY_RUN_TOKENS = (1, 16, 128)
CHECK_TOKENS_MAX = 1024         # correctness is checked once per shape, at T <= this
SMALL_TOKENS = 128              # at or below: also report time / copy time
DEFAULT_REPLAYS, QUICK_REPLAYS = 30, 10
DEFAULT_HOST_CALLS, QUICK_HOST_CALLS, DRY_RUN_HOST_CALLS = 10_000, 2_000, 200
DTYPE = torch.bfloat16
SEED = 1234


# ================================================================== shapes and bytes

@dataclass(frozen=True)
class Shape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    rotary_dim: int
    is_neox: bool

    def describe(self) -> str:
        style = "NeoX" if self.is_neox else "GPT-J (interleaved)"
        return (f"{self.num_q_heads} q / {self.num_kv_heads} kv heads, head {self.head_size}, "
                f"rotary {self.rotary_dim}, {style}")

    def qk_bytes(self, tokens: int) -> int:
        """Size of q and k together (whole heads, bf16)."""
        return tokens * (self.num_q_heads + self.num_kv_heads) * self.head_size * 2


SHAPES = {s.name: s for s in (
    Shape("llama3-8b", 32, 8, 128, 128, True),
    Shape("gptj", 32, 2, 128, 64, False),
    Shape("dsv3", 128, 1, 64, 64, False),
    Shape("phi2", 32, 32, 80, 32, True),
)}
HOST_OVERHEAD_SHAPE = "llama3-8b"


def bytes_per_call(shape: Shape, tokens: int, cache_itemsize: int) -> int:
    """The SPEC's roofline for an in-place call (see the module docstring)."""
    rotated = tokens * (shape.num_q_heads + shape.num_kv_heads) * shape.rotary_dim * 2
    return 2 * rotated + 8 * tokens + tokens * shape.rotary_dim * cache_itemsize


# ================================================================== the PyTorch formula

def _rotate_like_vllm(x, cos, sin, is_neox: bool):
    """vLLM's ``apply_rotary_emb_torch``: cos/sin ``[T, R/2]`` broadcast over the heads,
    arithmetic in x's dtype (bf16 here: every product is rounded)."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def torch_rope_inplace(positions, query, key, cos_sin_cache, rotary_dim: int, is_neox: bool):
    """vLLM's ``RotaryEmbedding.forward_static`` on ``[T, H, D]`` q and k, its result copied
    back into them so it is in place like the kernels (it moves whole heads, as vLLM's)."""
    cos_sin = cos_sin_cache.index_select(0, positions.flatten())
    cos, sin = cos_sin.chunk(2, dim=-1)
    for x in (query, key):
        rotated = _rotate_like_vllm(x[..., :rotary_dim], cos, sin, is_neox)
        x.copy_(torch.cat((rotated, x[..., rotary_dim:]), dim=-1))


class CompiledRope:
    """``torch.compile(torch_rope_inplace, dynamic=False)``, one specialization at a time.

    Dynamo keeps its compiled variants on the function's code object and, past its
    recompile limit (8), silently runs the function eagerly, which would time eager code
    as compiled. So its caches are reset before each new (shape, T): every row gets its own
    fresh compile, reused for that row's check and timing."""

    def __init__(self):
        self.key = None
        self.fn = None

    def get(self, key):
        if key != self.key:
            import torch._dynamo

            torch._dynamo.reset()
            self.fn = torch.compile(torch_rope_inplace, dynamic=False)
            self.key = key
        return self.fn


# ================================================================== FlashInfer via ctypes

class FlashInferError(RuntimeError):
    pass


class FlashInfer:
    """FlashInfer's in-place bf16 RoPE kernels behind ``libfi_rope.so``'s C ABI."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        P, U, S, I, F = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_int, ctypes.c_float
        lib.fi_cache_bf16.argtypes = [P, P, P, P, U, U, U, U, U, S, S, S, S, I, P]
        lib.fi_cache_bf16.restype = I
        lib.fi_posids_bf16.argtypes = [P, P, P, U, U, U, U, U, S, S, S, S, I, F, F, P]
        lib.fi_posids_bf16.restype = I
        self.lib = lib

    def bind(self, kind: str, shape: Shape, cache=None):
        """apply(pos, q, k) for kind 'cache' (fp32 cache) or 'posids' (on the fly).
        Raises Unavailable('refused') when FlashInfer returns -1 for this shape."""
        s = shape
        interleave = int(not s.is_neox)
        if kind == "cache":
            fn, cache_ptr = self.lib.fi_cache_bf16, cache.data_ptr()

            def call(pos, q, k, stream):
                return fn(q.data_ptr(), k.data_ptr(), cache_ptr, pos.data_ptr(), q.shape[0],
                          s.num_q_heads, s.num_kv_heads, s.rotary_dim, s.head_size,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), interleave, stream)
        else:
            fn = self.lib.fi_posids_bf16

            def call(pos, q, k, stream):
                return fn(q.data_ptr(), k.data_ptr(), pos.data_ptr(), q.shape[0],
                          s.num_q_heads, s.num_kv_heads, s.rotary_dim, s.head_size,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), interleave,
                          1.0, ROPE_THETA, stream)

        def apply(pos, q, k):
            # the stream is read per call: inside a graph capture it is the capture stream
            rc = call(pos, q, k, torch.cuda.current_stream().cuda_stream)
            if rc:
                raise FlashInferError(f"FlashInfer returned {rc}")

        self._probe(call, s)
        return apply

    @staticmethod
    def _probe(call, s: Shape):
        """One call on a one-token scratch problem: FlashInfer refuses (-1) by head size,
        not by token count, so this tells for the whole shape."""
        q = torch.zeros(1, s.num_q_heads, s.head_size, dtype=DTYPE, device="cuda")
        k = torch.zeros(1, s.num_kv_heads, s.head_size, dtype=DTYPE, device="cuda")
        pos = torch.zeros(1, dtype=torch.int64, device="cuda")
        rc = call(pos, q, k, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        if rc == -1:
            raise Unavailable("refused", f"FlashInfer refuses this shape (head size "
                                         f"{s.head_size}, rotary {s.rotary_dim}): returned -1")
        if rc:
            raise FlashInferError(f"FlashInfer returned CUDA error {rc}")


def load_flashinfer(path_arg: str | None, device: torch.device):
    """(FlashInfer or None, a note saying why not)."""
    if device.type != "cuda":
        return None, "FlashInfer: not loaded (no CUDA device: dry run)"
    path = Path(path_arg) if path_arg else REPO / ".peers" / "libfi_rope.so"
    if not path.exists():
        how = "--flashinfer" if path_arg else "default path"
        return None, (f"FlashInfer: {path} not found ({how}); build it with "
                      f"`bash ../shared/peers/flashinfer/build.sh 90 .peers` and carry .peers")
    try:
        return FlashInfer(path), f"FlashInfer: {path}"
    except Exception as e:  # a missing symbol, a wrong architecture...
        return None, f"FlashInfer: {path} did not load ({short(e)})"


# ================================================================== implementations

class Unavailable(Exception):
    """An implementation does not run a shape: status 'n/a' (outside what its API does)
    or 'refused' (its library said no)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# apply(positions, q, k): rotates q and k in place
ApplyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class ShapeContext:
    """What every implementation of one shape shares."""
    shape: Shape
    device: torch.device
    host_caches: dict            # 'float32' / 'bfloat16' -> NumPy [MAX_POSITION, R]
    caches: dict                 # the same values as torch tensors on the device
    flashinfer: FlashInfer | None
    compiled: CompiledRope


@dataclass(frozen=True)
class Impl:
    name: str
    prepare: Callable[[ShapeContext, int], ApplyFn]   # (context, tokens) -> apply
    cache_dtype: str | None      # the cos/sin cache it reads; None: computed on the fly
    tolerance: str               # key of TOLERANCES
    eager_fallback: bool = False  # time eagerly when CUDA-graph capture fails
    about: str = ""
    variant: str | None = None   # key of FLY_VARIANTS: an on-the-fly scaling variant

    @property
    def cache_itemsize(self) -> int:
        return {None: 0, "float32": 4, "bfloat16": 2}[self.cache_dtype]


def _rope_jit_cache(dtype: str):
    def prepare(ctx: ShapeContext, tokens: int) -> ApplyFn:
        s, cache = ctx.shape, ctx.caches[dtype]
        return lambda pos, q, k: rope_jit.apply_rope_inplace_with_cache(
            pos, q, k, s.head_size, cache, s.is_neox)
    return prepare


def _rope_jit_on_the_fly(ctx: ShapeContext, tokens: int) -> ApplyFn:
    rotary_dim, interleave = ctx.shape.rotary_dim, not ctx.shape.is_neox
    # rope_theta left at its default, 1e4 == ROPE_THETA
    return lambda pos, q, k: rope_jit.apply_rope_pos_ids_inplace(
        q, k, pos, rotary_dim=rotary_dim, interleave=interleave)


# On-the-fly scaling variants (issue: they must run at the speed of plain on-the-fly RoPE).
FLY_VARIANTS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
             "mscale": 1.0, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
}


def _rope_jit_fly_variant(name: str):
    def prepare(ctx: ShapeContext, tokens: int) -> ApplyFn:
        rotary_dim, interleave = ctx.shape.rotary_dim, not ctx.shape.is_neox
        rs = FLY_VARIANTS[name]
        return lambda pos, q, k: rope_jit.apply_rope_pos_ids_inplace(
            q, k, pos, rotary_dim=rotary_dim, interleave=interleave, rope_scaling=rs)
    return prepare


def _flashinfer(kind: str):
    def prepare(ctx: ShapeContext, tokens: int) -> ApplyFn:
        cache = ctx.caches["float32"] if kind == "cache" else None
        return ctx.flashinfer.bind(kind, ctx.shape, cache)
    return prepare


def _torch_eager(ctx: ShapeContext, tokens: int) -> ApplyFn:
    s, cache = ctx.shape, ctx.caches["bfloat16"]
    return lambda pos, q, k: torch_rope_inplace(pos, q, k, cache, s.rotary_dim, s.is_neox)


def _torch_compile(ctx: ShapeContext, tokens: int) -> ApplyFn:
    s, cache = ctx.shape, ctx.caches["bfloat16"]
    fn = ctx.compiled.get((s.name, tokens))  # compiles on its first call
    return lambda pos, q, k: fn(pos, q, k, cache, s.rotary_dim, s.is_neox)


def _liger(rope_fn):
    def prepare(ctx: ShapeContext, tokens: int) -> ApplyFn:
        s, cache = ctx.shape, ctx.caches["bfloat16"]
        if not s.is_neox or s.rotary_dim != s.head_size:
            raise Unavailable("n/a", "Liger's kernel does NeoX style over the whole head only")
        last = {}

        def cos_sin(pos):
            # HF models build cos/sin [1, T, D] once per forward and share them across
            # layers, so the gather stays out of the timed call: it is done on the first
            # call with these positions (the warm-up, outside the graph).
            if last.get("pos") is not pos:
                c, sn = cache.index_select(0, pos).chunk(2, dim=-1)
                last.update(pos=pos, cos=torch.cat((c, c), -1)[None], sin=torch.cat((sn, sn), -1)[None])
            return last["cos"], last["sin"]

        def apply(pos, q, k):
            # Liger takes [B, H, T, D] views of [B, T, H, D] storage and rotates that storage
            cos, sin = cos_sin(pos)
            rope_fn(q[None].transpose(1, 2), k[None].transpose(1, 2), cos, sin)
        return apply
    return prepare


def _vllm(ops):
    def prepare(ctx: ShapeContext, tokens: int) -> ApplyFn:
        s, cache = ctx.shape, ctx.caches["bfloat16"]  # vLLM casts its cache to q's dtype
        return lambda pos, q, k: ops.rotary_embedding(pos, q, k, s.head_size, cache, s.is_neox)
    return prepare


def probe_optional() -> tuple[dict, dict]:
    """Liger and vLLM, when importable: ({name: Impl}, {name: why not})."""
    found, missing = {}, {}
    try:
        try:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb as liger_fn
        except ImportError:
            from liger_kernel.ops.rope import LigerRopeFunction
            liger_fn = LigerRopeFunction.apply
        found["liger_kernel"] = Impl("liger_kernel", _liger(liger_fn), "bfloat16", "bf16_math",
                                     eager_fallback=True,
                                     about="Liger's Triton kernel, bf16 cos/sin gathered outside the call")
    except Exception as e:
        missing["liger_kernel"] = f"not importable ({short(e)})"
    try:
        from vllm import _custom_ops as vllm_ops

        if not hasattr(vllm_ops, "rotary_embedding"):
            raise ImportError("vllm._custom_ops has no rotary_embedding")
        found["vllm/rotary_embedding"] = Impl("vllm/rotary_embedding", _vllm(vllm_ops), "bfloat16",
                                              "bf16_math", eager_fallback=True,
                                              about="vLLM's CUDA op, bf16 cache")
    except Exception as e:
        missing["vllm/rotary_embedding"] = f"not importable ({short(e)})"
    return found, missing


IMPL_ORDER = ("rope_jit/cache_fp32", "rope_jit/cache_bf16", "rope_jit/on_the_fly",
              "rope_jit/fly_llama3", "rope_jit/fly_yarn",
              "flashinfer/cache_fp32", "flashinfer/on_the_fly", "torch_eager", "torch_compile",
              "liger_kernel", "vllm/rotary_embedding", "copy")


def build_impls(flashinfer, optional: dict) -> list[Impl]:
    impls = [
        Impl("rope_jit/cache_fp32", _rope_jit_cache("float32"), "float32", "fp32",
             about="apply_rope_inplace_with_cache, fp32 cache"),
        Impl("rope_jit/cache_bf16", _rope_jit_cache("bfloat16"), "bfloat16", "fp32",
             about="apply_rope_inplace_with_cache, bf16 cache"),
        Impl("rope_jit/on_the_fly", _rope_jit_on_the_fly, None, "fp32",
             about="apply_rope_pos_ids_inplace"),
        Impl("rope_jit/fly_llama3", _rope_jit_fly_variant("llama3"), None, "fp32",
             about="apply_rope_pos_ids_inplace, rope_scaling llama3 (factor 8)", variant="llama3"),
        Impl("rope_jit/fly_yarn", _rope_jit_fly_variant("yarn"), None, "fp32",
             about="apply_rope_pos_ids_inplace, rope_scaling yarn (DeepSeek-V3's)", variant="yarn"),
    ]
    if flashinfer is not None:
        impls += [
            Impl("flashinfer/cache_fp32", _flashinfer("cache"), "float32", "fp32_2ulp",
                 about="BatchQKApplyRotaryPosIdsCosSinCache (ctypes), fp32 cache"),
            Impl("flashinfer/on_the_fly", _flashinfer("posids"), None, "fp32_angle",
                 about="BatchQKApplyRotaryPosIds (ctypes)"),
        ]
    impls += [
        Impl("torch_eager", _torch_eager, "bfloat16", "bf16_math",
             about="vLLM's forward_static formula + copy_, bf16 cache"),
        Impl("torch_compile", _torch_compile, "bfloat16", "bf16_math", eager_fallback=True,
             about="torch.compile of torch_eager (default mode, dynamic=False)"),
    ]
    impls += list(optional.values())
    return impls


def select_impls(impls: list[Impl], selection: str | None) -> list[Impl]:
    """--impls: names or prefixes ('rope_jit' picks all three)."""
    if not selection:
        return impls
    wanted = [w.strip() for w in selection.split(",") if w.strip()]
    return [i for i in impls if any(i.name.startswith(w) for w in wanted)]


# ================================================================== correctness

def pair_layout(per_pair: np.ndarray, is_neox: bool) -> np.ndarray:
    """Spread per-pair values [..., R/2] over the R elements of those pairs."""
    if is_neox:
        return np.concatenate([per_pair, per_pair], axis=-1)
    return np.repeat(per_pair, 2, axis=-1)


def pair_magnitude(x_rot: np.ndarray, is_neox: bool) -> np.ndarray:
    """|x1| + |x2| of each element's pair: the scale of arithmetic error under cancellation."""
    half = x_rot.shape[-1] // 2
    if is_neox:
        m = np.abs(x_rot[..., :half]) + np.abs(x_rot[..., half:])
    else:
        m = np.abs(x_rot[..., 0::2]) + np.abs(x_rot[..., 1::2])
    return pair_layout(m, is_neox)


# name -> (what it allows, tol(ulp_of_ref, pair_magnitude, |angle|))
TOLERANCES = {
    "fp32": ("1 bf16 ulp + 2^-21·(|x1|+|x2|): fp32 math rounded once "
             "(as tests/gpu_cases.assert_rope_close)",
             lambda ulp, mag, ang: ulp + 2.0 ** -21 * mag),
    "fp32_2ulp": ("2 bf16 ulps + 2^-21·(|x1|+|x2|)",
                  lambda ulp, mag, ang: 2 * ulp + 2.0 ** -21 * mag),
    # FlashInfer's on-the-fly path forms the angle p*freq in fp32 from __powf frequencies
    # and takes __sincosf of it: about |angle|*2^-22 rad of error at these positions
    # (SPEC section 1), tens of bf16 ulps of the output at p ~ 1e5. Allowed with 4x margin
    # so a precision property is not reported as a bug; wrong style, layout or theta still
    # fail (their errors are of the order of |x|, and at the mid and low frequencies the
    # angle term is small).
    "fp32_angle": ("2 bf16 ulps + (2^-21 + 2^-18·(1+|angle|))·(|x1|+|x2|): fp32 angles "
                   "(__powf, __sincosf) lose about |angle|·2^-22 rad",
                   lambda ulp, mag, ang: 2 * ulp + (2.0 ** -21 + 2.0 ** -18 * (1 + ang)) * mag),
    # bf16 arithmetic rounds each product and the sum (unit roundoff 2^-8 each)
    "bf16_math": ("4 bf16 ulps + 2^-7·(|x1|+|x2|): bf16 arithmetic rounds every product",
                  lambda ulp, mag, ang: 4 * ulp + 2.0 ** -7 * mag),
}


def to_float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


@dataclass
class CheckCase:
    """Fresh random inputs for one shape's check: pristine device copies (each
    implementation gets clones) and float64 host copies; references memoized per cos/sin
    source so every implementation reading the same cache shares one."""
    shape: Shape
    tokens: int
    pos: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    pos_host: np.ndarray
    q_host: np.ndarray
    k_host: np.ndarray
    refs: dict = field(default_factory=dict)

    def reference(self, cache_dtype: str | None, host_caches: dict, variant: str | None = None):
        """(ref_q, ref_k, |angle| per rotary element [T, 1, R]) for this cos/sin source."""
        key = (cache_dtype, variant)
        if key not in self.refs:
            s = self.shape
            inv_freq = reference.inv_frequencies(s.rotary_dim, ROPE_THETA)
            if variant is not None:
                scaled = resolve_rope_scaling(FLY_VARIANTS[variant], s.rotary_dim, base=ROPE_THETA)
                inv_freq = scaled.inv_freq
                cos, sin = reference.cos_sin(self.pos_host, inv_freq)
                cos, sin = cos * scaled.attention_factor, sin * scaled.attention_factor
            elif cache_dtype is None:
                cos, sin = reference.cos_sin(self.pos_host, inv_freq)
            else:  # exactly the rounded values the implementation reads
                cos, sin = reference.cos_sin_from_cache(host_caches[cache_dtype], self.pos_host)
            angle = pair_layout(np.abs(self.pos_host[:, None] * inv_freq), s.is_neox)[:, None, :]
            self.refs[key] = (reference.apply_rotary(self.q_host, cos, sin, s.is_neox),
                              reference.apply_rotary(self.k_host, cos, sin, s.is_neox),
                              angle)
        return self.refs[key]


def make_check_case(shape: Shape, tokens: int, device: torch.device) -> CheckCase:
    g = torch.Generator(device=device).manual_seed(SEED + tokens)
    q = torch.randn(tokens, shape.num_q_heads, shape.head_size, generator=g, device=device).to(DTYPE)
    k = torch.randn(tokens, shape.num_kv_heads, shape.head_size, generator=g, device=device).to(DTYPE)
    pos = torch.randint(0, MAX_POSITION, (tokens,), generator=g, device=device, dtype=torch.int64)
    return CheckCase(shape, tokens, pos, q, k, pos.cpu().numpy(), to_float64(q), to_float64(k))


def compare(what: str, got: np.ndarray, before: np.ndarray, ref: np.ndarray, angle: np.ndarray,
            shape: Shape, tol_fn) -> dict:
    """Rotated part within tolerance, pass-through bit-identical, everything finite."""
    R = shape.rotary_dim
    problems = []
    if not np.isfinite(got).all():
        problems.append(f"{what}: {int((~np.isfinite(got)).sum())} non-finite values")
        got = np.nan_to_num(got, nan=1e30, posinf=1e30, neginf=-1e30)
    err = np.abs(got[..., :R] - ref[..., :R])
    tol = tol_fn(reference.ulp(ref[..., :R], "bfloat16"), pair_magnitude(before[..., :R], shape.is_neox),
                 np.broadcast_to(angle, err.shape))
    ratio = err / tol
    bad = int((ratio > 1).sum())
    if bad:
        at = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        problems.append(f"{what}: {bad} of {err.size} rotated elements beyond tolerance; worst "
                        f"at (token, head, dim) {tuple(int(i) for i in at)}: got {got[..., :R][at]:.6g}, "
                        f"expected {ref[..., :R][at]:.6g}, tolerance {tol[at]:.3g}")
    if R < shape.head_size and not np.array_equal(got[..., R:], before[..., R:]):
        problems.append(f"{what}: pass-through part (dims {R}..{shape.head_size - 1}) changed")
    return dict(problems=problems, max_abs_err=float(err.max(initial=0.0)),
                worst_err_over_tol=float(ratio.max(initial=0.0)))


def check_impl(impl: Impl, apply: ApplyFn, ctx: ShapeContext, case: CheckCase) -> dict:
    """Run `apply` once on clones of the case's inputs and compare q and k with the float64
    reference. Returns a record with ok, problems, max_abs_err, worst_err_over_tol."""
    q, k, pos = case.q.clone(), case.k.clone(), case.pos.clone()
    apply(pos, q, k)
    synchronize(ctx.device)
    ref_q, ref_k, angle = case.reference(impl.cache_dtype, ctx.host_caches, impl.variant)
    tol_fn = TOLERANCES[impl.tolerance][1]
    parts = [compare("q", to_float64(q), case.q_host, ref_q, angle, ctx.shape, tol_fn),
             compare("k", to_float64(k), case.k_host, ref_k, angle, ctx.shape, tol_fn)]
    problems = [p for part in parts for p in part["problems"]]
    return dict(shape=ctx.shape.name, impl=impl.name, tokens=case.tokens, ok=not problems,
                tolerance=TOLERANCES[impl.tolerance][0], problems=problems,
                max_abs_err=max(p["max_abs_err"] for p in parts),
                worst_err_over_tol=max(p["worst_err_over_tol"] for p in parts))


# ================================================================== timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuTimer:
    def __init__(self, replays: int):
        self.replays = replays

    def graph(self, calls) -> float:
        return time_calls(calls, replays=self.replays)

    def eager(self, calls) -> float:
        return time_calls_eager(calls, replays=self.replays)


class CpuTimer:
    """Dry run only: median wall time per call of a pass over `calls`."""

    def __init__(self, replays: int):
        self.replays = replays

    def graph(self, calls) -> float:
        for c in calls:
            c()
        times = []
        for _ in range(self.replays):
            t0 = time.perf_counter()
            for c in calls:
                c()
            times.append((time.perf_counter() - t0) / len(calls))
        return statistics.median(times)

    eager = graph


def time_apply(impl: Impl, apply: ApplyFn, pos, qs, ks, timer, device) -> tuple[float, str, str | None]:
    """(seconds per call, timing method, note): CUDA-graph replay over the buffer sets, or,
    for implementations allowed to, eager calls between events when capture fails."""
    calls = [(lambda q=q, k=k: apply(pos, q, k)) for q, k in zip(qs, ks)]
    try:
        return timer.graph(calls), "cuda-graph", None
    except Exception as e:
        if not impl.eager_fallback:
            raise
        capture_error = short(e)
    ensure_cuda_usable(device)
    seconds = timer.eager(calls)
    return seconds, "eager-loop", (f"CUDA-graph capture failed ({capture_error}); timed with "
                                   f"events around each eager call (includes launch gaps)")


def time_copy(nbytes: int, sets: int, timer, device) -> float:
    """A torch device copy of `nbytes`, rotating over `sets` sources like the rows' buffers."""
    srcs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(sets)]
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return timer.graph([(lambda s=s: dst.copy_(s)) for s in srcs])


class FatalCuda(RuntimeError):
    """The CUDA context no longer works (a sticky error): nothing after can be measured."""


def ensure_cuda_usable(device: torch.device) -> None:
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
    except Exception as e:
        raise FatalCuda(short(e)) from e


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ================================================================== the sweep

def short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def host_tensor_to_torch(host: np.ndarray, device: torch.device) -> torch.Tensor:
    if host.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16: exact via fp32
        return torch.from_numpy(host.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(host)).to(device)


def make_shape_context(shape: Shape, device, flashinfer, compiled) -> ShapeContext:
    """Caches built by rope_jit (float64 math, rounded once); the device copies hold exactly
    the host values, which the correctness check feeds the reference."""
    host = {dt: rope_jit.compute_cos_sin_cache(shape.rotary_dim, MAX_POSITION, base=ROPE_THETA, dtype=dt)
            for dt in ("float32", "bfloat16")}
    caches = {dt: host_tensor_to_torch(h, device) for dt, h in host.items()}
    return ShapeContext(shape, device, host, caches, flashinfer, compiled)


def check_tokens_for(tokens: list[int]) -> int:
    """The moderate T every implementation is checked at: the largest <= 1024 asked for."""
    small = [t for t in tokens if t <= CHECK_TOKENS_MAX]
    return max(small) if small else min(tokens)


class Recorder:
    """Rows, checks, errors; prints progress."""

    def __init__(self, copy_bw: float):
        self.copy_bw = copy_bw
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.errors: list[dict] = []

    def row(self, shape: Shape, tokens: int, impl: str, status: str, nbytes: int,
            seconds: float | None = None, copy_seconds: float | None = None,
            timing: str | None = None, note: str | None = None) -> dict:
        r = dict(shape=shape.name, tokens=tokens, impl=impl, status=status, seconds=seconds,
                 bytes=nbytes, bandwidth=None, percent_of_copy=None, x_copy=None,
                 timing=timing, note=note)
        if seconds:
            r["bandwidth"] = nbytes / seconds
            r["percent_of_copy"] = 100.0 * r["bandwidth"] / self.copy_bw
            if tokens <= SMALL_TOKENS and copy_seconds:
                r["x_copy"] = seconds / copy_seconds
        self.rows.append(r)
        return r

    def error(self, where: str, e: BaseException) -> None:
        self.errors.append(dict(where=where, error=short(e),
                                traceback="".join(traceback.format_exception(type(e), e, e.__traceback__))))


def measure_impl(impl: Impl, ctx: ShapeContext, tokens: int, pos, qs, ks, case: CheckCase | None,
                 verdicts: dict, copy_seconds, timer, rec: Recorder) -> dict:
    """Check (on the shape's check row) then time one implementation on one row."""
    s = ctx.shape
    nbytes = bytes_per_call(s, tokens, impl.cache_itemsize)
    row = lambda status, **kw: rec.row(s, tokens, impl.name, status, nbytes, copy_seconds=copy_seconds, **kw)
    where = f"{s.name} T={tokens} {impl.name}"
    verdict = verdicts.get(impl.name)
    if verdict is not None and verdict[0] != "ok":
        return row(verdict[0], note=verdict[1])
    if verdict is None and case is None:  # its check never ran: never time it unchecked
        return row("error", note="not checked (its check row failed)")
    try:
        apply = impl.prepare(ctx, tokens)
        if case is not None:
            result = check_impl(impl, apply, ctx, case)
            rec.checks.append(result)
            if not result["ok"]:
                verdicts[impl.name] = ("WRONG", "; ".join(result["problems"]))
                return row("WRONG", note=verdicts[impl.name][1])
            verdicts[impl.name] = ("ok", None)
        seconds, method, note = time_apply(impl, apply, pos, qs, ks, timer, ctx.device)
        return row("ok", seconds=seconds, timing=method, note=note)
    except Unavailable as u:
        verdicts[impl.name] = (u.status, u.reason)
        return row(u.status, note=u.reason)
    except FatalCuda:
        raise
    except Exception as e:
        rec.error(where, e)
        ensure_cuda_usable(ctx.device)
        unchecked = case is not None and impl.name not in verdicts
        stage = "prepare/check" if unchecked else "prepare/time"
        if unchecked:
            # an implementation that cannot even be checked on this shape (a compile
            # failure, an exception) is skipped for the shape's other rows
            verdicts[impl.name] = ("error", f"{stage}: {short(e)}")
        return row("error", note=f"{stage}: {short(e)}")


def measure_row(ctx: ShapeContext, tokens: int, impls: list[Impl], is_check_row: bool,
                verdicts: dict, timer, rec: Recorder) -> None:
    s, device = ctx.shape, ctx.device
    per_set = s.qk_bytes(tokens)
    sets = buffer_sets(per_set)
    copy_seconds = None
    try:
        copy_seconds = time_copy(per_set, sets, timer, device)
        rec.row(s, tokens, "copy", "ok", 2 * per_set, seconds=copy_seconds,
                copy_seconds=copy_seconds, timing="cuda-graph")
    except Exception as e:
        rec.error(f"{s.name} T={tokens} copy", e)
        ensure_cuda_usable(device)
        rec.row(s, tokens, "copy", "error", 2 * per_set, note=short(e))
    free_memory(device)
    try:
        pos = torch.randint(0, MAX_POSITION, (tokens,), device=device, dtype=torch.int64)
        qs = [torch.randn(tokens, s.num_q_heads, s.head_size, device=device, dtype=DTYPE)
              for _ in range(sets)]
        ks = [torch.randn(tokens, s.num_kv_heads, s.head_size, device=device, dtype=DTYPE)
              for _ in range(sets)]
        case = make_check_case(s, tokens, device) if is_check_row else None
    except Exception as e:  # out of memory, most likely
        rec.error(f"{s.name} T={tokens} buffers", e)
        ensure_cuda_usable(device)
        for impl in impls:
            if is_check_row:
                verdicts.setdefault(impl.name, ("error", f"check row: {short(e)}"))
            rec.row(s, tokens, impl.name, "error", bytes_per_call(s, tokens, impl.cache_itemsize),
                    note=f"buffers: {short(e)}")
        return
    for impl in impls:
        measure_impl(impl, ctx, tokens, pos, qs, ks, case, verdicts, copy_seconds, timer, rec)
    del pos, qs, ks, case
    free_memory(device)


def progress_line(rec: Recorder, shape: Shape, tokens: int) -> str:
    cells = []
    for r in rec.rows:
        if r["shape"] == shape.name and r["tokens"] == tokens:
            if r["status"] == "ok":
                cells.append(f"{r['impl']} {fmt_us(r['seconds'])} {fmt_pct(r['percent_of_copy'])}")
            else:
                cells.append(f"{r['impl']} {r['status']}")
    return f"{shape.name:10s} T={tokens:6d} | " + " | ".join(cells)


def sweep_shape(shape: Shape, tokens: list[int], impls: list[Impl], device, flashinfer,
                compiled: CompiledRope, timer, rec: Recorder) -> None:
    ctx = make_shape_context(shape, device, flashinfer, compiled)
    check_tokens = check_tokens_for(tokens)
    verdicts: dict = {}  # impl name -> (status, note), settled by the check row
    # the check row first, so every implementation is checked before it is timed
    for t in [check_tokens] + [t for t in tokens if t != check_tokens]:
        t0 = time.perf_counter()
        measure_row(ctx, t, impls, t == check_tokens, verdicts, timer, rec)
        print(f"{progress_line(rec, shape, t)}  [{time.perf_counter() - t0:.1f} s]", flush=True)
    for c in rec.checks:
        if c["shape"] == shape.name and not c["ok"]:
            print(f"  WRONG {c['impl']}: {'; '.join(c['problems'])}", flush=True)


# ================================================================== host overhead

def host_time_per_call(apply: ApplyFn, pos, q, k, calls: int, device) -> tuple[float, float]:
    """Microseconds per call: (loop + final synchronize, loop alone), after a warm-up."""
    for _ in range(min(100, calls)):
        apply(pos, q, k)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        apply(pos, q, k)
    t1 = time.perf_counter()
    synchronize(device)
    t2 = time.perf_counter()
    return (t2 - t0) / calls * 1e6, (t1 - t0) / calls * 1e6


HOST_OVERHEAD_IMPLS = {  # name -> what is measured
    "rope_jit/cache_fp32": "fp32 cache",
    "rope_jit/on_the_fly": "on the fly (extra)",
    "torch_eager": "bf16 cache, as its sweep rows",
    "torch_compile": "bf16 cache, as its sweep rows",
    "flashinfer/cache_fp32": "fp32 cache, through ctypes (extra)",
}


def measure_host_overhead(impls: list[Impl], device, flashinfer, calls: int, rec: Recorder) -> list[dict]:
    shape = SHAPES[HOST_OVERHEAD_SHAPE]
    ctx = make_shape_context(shape, device, flashinfer, CompiledRope())
    q = torch.randn(1, shape.num_q_heads, shape.head_size, device=device, dtype=DTYPE)
    k = torch.randn(1, shape.num_kv_heads, shape.head_size, device=device, dtype=DTYPE)
    pos = torch.randint(0, MAX_POSITION, (1,), device=device, dtype=torch.int64)
    out = []
    by_name = {i.name: i for i in impls}
    for name, what in HOST_OVERHEAD_IMPLS.items():
        impl = by_name.get(name)
        if impl is None:
            continue
        entry = dict(impl=name, calls=calls, what=what, us_per_call=None, us_per_call_loop_only=None, note=None)
        try:
            apply = impl.prepare(ctx, 1)
            entry["us_per_call"], entry["us_per_call_loop_only"] = host_time_per_call(
                apply, pos, q, k, calls, device)
        except FatalCuda:
            raise
        except Exception as e:
            rec.error(f"host overhead {name}", e)
            ensure_cuda_usable(device)
            entry["note"] = short(e)
        print(f"host overhead {name:24s} "
              + (f"{entry['us_per_call']:.2f} us/call" if entry["us_per_call"] else entry["note"]),
              flush=True)
        out.append(entry)
    return out


# ================================================================== report

def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.2f} µs" if us < 10 else f"{us:.1f} µs" if us < 100 else f"{us:.0f} µs"


def fmt_pct(p: float) -> str:
    return f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def table_columns(rows: list[dict], shape_name: str) -> list[str]:
    present = {r["impl"] for r in rows if r["shape"] == shape_name}
    return [n for n in IMPL_ORDER if n in present] + sorted(present - set(IMPL_ORDER))


def cell(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["status"] != "ok":
        return r["status"]
    text = f"{fmt_us(r['seconds'])} · {fmt_pct(r['percent_of_copy'])}"
    if r["x_copy"] is not None:
        text += f" · {r['x_copy']:.2f}x"
    if r["timing"] != "cuda-graph":
        text += " †"
    return text


def render_markdown(results: dict) -> str:
    meta, rows = results["meta"], results["rows"]
    out = ["# RoPE benchmark", ""]
    out += [f"{meta.get('device', '?')} · copy bandwidth **{results['copy_bandwidth'] / 1e12:.3f} TB/s** · "
            f"torch {meta.get('torch')} · CUDA {meta.get('cuda')} · CuPy {meta.get('cupy')} · "
            f"rope_jit {meta.get('rope_jit')} · {meta.get('date', '')}"
            + (" · **dry run on the CPU: timings mean nothing**" if meta.get("dry_run") else ""), ""]
    out += ["Cells: median time per call (CUDA-graph replay over rotating buffer sets totalling "
            "several times L2) · achieved bandwidth as a percent of the copy bandwidth, with "
            "bytes = read + write of the rotated part of q and k + positions + cache rows "
            "read (0 on the fly), the same count for every implementation (whole-head "
            "implementations are charged only this); at ≤ 128 tokens also time / time of "
            "the `copy` column (a device copy of q and k: the launch floor). "
            "bf16 q/k, int64 positions uniform in [0, 100000), everything in place. "
            "`WRONG`: failed its correctness check, not timed; `n/a`: outside what its API "
            "does; `refused`: the library declined the shape; `error`: see notes; "
            "`†`: eager-loop timing (CUDA-graph capture failed).", ""]
    for shape in results["shapes"]:
        cols = table_columns(rows, shape["name"])
        if not cols:
            continue
        out += [f"## {shape['name']}: {shape['description']}", ""]
        out += ["| tokens | " + " | ".join(f"`{c}`" for c in cols) + " |",
                "|---:|" + "---|" * len(cols)]
        by_key = {(r["tokens"], r["impl"]): r for r in rows if r["shape"] == shape["name"]}
        for t in sorted({r["tokens"] for r in rows if r["shape"] == shape["name"]}):
            out.append(f"| {t} | " + " | ".join(cell(by_key.get((t, c))) for c in cols) + " |")
        out.append("")
    out += render_host_overhead(results.get("host_overhead") or [])
    out += render_checks(results)
    out += render_notes(results)
    return "\n".join(out) + "\n"


def render_host_overhead(entries: list[dict]) -> list[str]:
    if not entries:
        return []
    calls = entries[0]["calls"]
    out = [f"## Host time per call ({HOST_OVERHEAD_SHAPE}, 1 token, in place, {calls:,} calls back to back)", "",
           "| implementation | µs per call (loop + final sync) | µs per call (loop only) | what |",
           "|---|---:|---:|---|"]
    for e in entries:
        if e["us_per_call"] is None:
            out.append(f"| `{e['impl']}` | error | error | {e['note']} |")
        else:
            out.append(f"| `{e['impl']}` | {e['us_per_call']:.2f} | {e['us_per_call_loop_only']:.2f} | {e['what']} |")
    return out + [""]


def render_checks(results: dict) -> list[str]:
    checks = results.get("checks") or []
    if not checks:
        return []
    shapes = [s["name"] for s in results["shapes"]]
    impls = [n for n in IMPL_ORDER if any(c["impl"] == n for c in checks)]
    by_key = {(c["impl"], c["shape"]): c for c in checks}
    out = ["## Correctness checks", "",
           "Worst |error| / tolerance over q and k (≤ 1 passes) against the float64 reference "
           "fed the same rounded cache, at the token count given; tolerances:", ""]
    out += [f"* `{c}`: {TOLERANCES[t][0]}" for c, t in results.get("tolerances", {}).items()]
    out += ["", "| implementation | " + " | ".join(shapes) + " |", "|---|" + "---:|" * len(shapes)]
    for name in impls:
        cells = []
        for sh in shapes:
            c = by_key.get((name, sh))
            cells.append("—" if c is None else
                         f"{'ok' if c['ok'] else '**WRONG**'} {c['worst_err_over_tol']:.2f} (T={c['tokens']})")
        out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return out + [""]


def render_notes(results: dict) -> list[str]:
    notes = list(results.get("notes") or [])
    for name, why in (results.get("skipped") or {}).items():
        notes.append(f"`{name}` skipped: {why}")
    # one note per (shape, implementation, status, text), with the token counts it covers
    grouped: dict = {}
    for r in results["rows"]:
        if r["status"] != "ok" or r["note"]:
            grouped.setdefault((r["shape"], r["impl"], r["status"], r["note"]), []).append(r["tokens"])
    for (shape, impl, status, note), tokens in grouped.items():
        status = "**WRONG**" if status == "WRONG" else "eager-loop timing (†)" if status == "ok" else status
        notes.append(f"`{impl}` on {shape}, T={','.join(map(str, sorted(tokens)))}: {status}: {note}")
    errors = results.get("errors") or []
    if errors:  # each is already a row or host-overhead note; the tracebacks are in the JSON
        notes.append(f"{len(errors)} exception(s) caught; tracebacks in results.json (`errors`)")
    if not notes:
        return []
    return ["## Notes", ""] + [f"* {n}" for n in notes] + [""]


def plot_bandwidth(results: dict, path: Path) -> None:
    """Achieved bandwidth (TB/s) vs tokens, one subplot per shape, one line per
    implementation, the measured copy bandwidth as a dashed ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = results["shapes"]
    ncols = 2 if len(shapes) > 1 else 1
    nrows = -(-len(shapes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.4 * nrows), squeeze=False)
    ceiling = results["copy_bandwidth"] / 1e12
    present = {r["impl"] for r in results["rows"]}
    names = [n for n in IMPL_ORDER if n in present] + sorted(present - set(IMPL_ORDER))
    palette = [plt.cm.tab10(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # gray (7) is the copy's
    colors = {n: palette[i % len(palette)] for i, n in enumerate(x for x in names if x != "copy")}
    handles = {}
    for ax, shape in zip(axes.flat, shapes):
        top, ticks = ceiling, set()
        for name in names:
            pts = sorted((r["tokens"], r["bandwidth"] / 1e12) for r in results["rows"]
                         if r["shape"] == shape["name"] and r["impl"] == name and r["status"] == "ok")
            if not pts:
                continue
            style = dict(ls=":", color="0.45") if name == "copy" else dict(color=colors[name])
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5,
                              label=name, **style)
            handles.setdefault(name, line)
            top = max(top, max(p[1] for p in pts))
            ticks.update(p[0] for p in pts)
        handles["copy bandwidth (ceiling)"] = ax.axhline(ceiling, ls="--", color="k", lw=1,
                                                         label="copy bandwidth (ceiling)")
        ax.set_xscale("log")
        if ticks:
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_ylim(0, top * 1.12)
        ax.set_title(f"{shape['name']}: {shape['description']}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("achieved bandwidth (TB/s, SPEC bytes)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(f"RoPE, bf16, in place: {results['meta'].get('device', '')}", fontsize=11)
    fig.tight_layout(rect=(0, 0.08 if len(handles) > 5 else 0.05, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(results: dict, out_dir: Path) -> None:
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_json_default))
    tmp.replace(out_dir / "results.json")


def write_reports(results: dict, out_dir: Path) -> str:
    """results.json, RESULTS.md, bandwidth.png; returns the Markdown. The plot is last and
    guarded: a plotting failure must not lose the numbers."""
    write_json(results, out_dir)
    md = render_markdown(results)
    (out_dir / "RESULTS.md").write_text(md)
    try:
        plot_bandwidth(results, out_dir / "bandwidth.png")
    except Exception as e:
        note = f"bandwidth.png not written: {short(e)}"
        print(note, flush=True)
        results["notes"].append(note)
        write_json(results, out_dir)
        md = render_markdown(results)
        (out_dir / "RESULTS.md").write_text(md)
    return md


# ================================================================== main

def environment(device: torch.device, dry_run: bool) -> dict:
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), dry_run=dry_run,
                python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                numpy=np.__version__, rope_jit=getattr(rope_jit, "__version__", "?"),
                host=platform.node())
    for mod in ("cupy", "triton"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception as e:
            meta[mod] = f"not importable ({type(e).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    l2_bytes=getattr(props, "L2_cache_size", None))
    else:
        meta["device"] = f"CPU ({platform.processor() or platform.machine()})"
    try:
        meta["git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        meta["git"] = None
    return meta


def parse_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark rope_jit's RoPE kernels side by side with FlashInfer, PyTorch "
                    "(eager and torch.compile), Liger and vLLM when installed, and a device copy. "
                    "Writes results.json, RESULTS.md and bandwidth.png.")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default: benchmarks/results)")
    p.add_argument("--flashinfer", default=None,
                   help="path to libfi_rope.so (default: .peers/libfi_rope.so in the repo, if it exists)")
    p.add_argument("--tokens", default=None,
                   help=f"comma-separated token counts (default {','.join(map(str, DEFAULT_TOKENS))}; "
                        f"--quick: {','.join(map(str, QUICK_TOKENS))})")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--impls", default=None,
                   help="only these implementations (names or prefixes, e.g. rope_jit,torch_eager); "
                        "the copy is always measured")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: tokens {','.join(map(str, QUICK_TOKENS))}, {QUICK_REPLAYS} replays, "
                        f"{QUICK_HOST_CALLS} host-overhead calls")
    p.add_argument("--replays", type=int, default=None,
                   help=f"graph replays per measurement (default {DEFAULT_REPLAYS}, --quick {QUICK_REPLAYS})")
    p.add_argument("--host-calls", type=int, default=None,
                   help=f"calls in the host-overhead loop (default {DEFAULT_HOST_CALLS:,})")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: run the pipeline on the CPU to test this script (timings mean nothing)")
    args = p.parse_args(argv)
    unknown = [s for s in parse_list(args.shapes) if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; known: {list(SHAPES)}")
    if args.tokens:
        try:
            tokens = parse_list(args.tokens, int)
        except ValueError:
            p.error("--tokens: expected comma-separated integers")
        if not tokens or min(tokens) < 1:
            p.error("--tokens: expected positive integers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("No CUDA device visible to torch. This benchmark needs a GPU "
              "(use --dry-run to test the script on the CPU).", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not dry else "cpu")
    default_tokens = DRY_RUN_TOKENS if dry else QUICK_TOKENS if args.quick else DEFAULT_TOKENS
    tokens = sorted(set(parse_list(args.tokens, int))) if args.tokens else list(default_tokens)
    shapes = [SHAPES[n] for n in parse_list(args.shapes)]
    replays = args.replays or (QUICK_REPLAYS if args.quick or dry else DEFAULT_REPLAYS)
    host_calls = args.host_calls or (DRY_RUN_HOST_CALLS if dry else
                                     QUICK_HOST_CALLS if args.quick else DEFAULT_HOST_CALLS)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    meta = environment(device, dry)
    print(f"device: {meta['device']} · torch {meta['torch']} · cupy {meta['cupy']} · "
          f"rope_jit {meta['rope_jit']}", flush=True)
    if dry:
        copy_bw, timer = cpu_copy_bandwidth(), CpuTimer(replays)
    else:
        copy_bw, timer = copy_bandwidth(), GpuTimer(replays)
    print(f"copy bandwidth: {copy_bw / 1e12:.3f} TB/s (read + write)", flush=True)

    flashinfer, fi_note = load_flashinfer(args.flashinfer, device)
    meta["flashinfer"] = fi_note
    print(fi_note, flush=True)
    optional, skipped = probe_optional()
    impls = select_impls(build_impls(flashinfer, optional), args.impls)
    if flashinfer is None:
        skipped["flashinfer/*"] = fi_note
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    print("implementations: " + ", ".join(i.name for i in impls), flush=True)
    compile_settings()

    rec = Recorder(copy_bw)
    results = dict(meta=meta, args=vars(args), copy_bandwidth=copy_bw, tokens=tokens, replays=replays,
                   shapes=[dict(name=s.name, description=s.describe(), num_q_heads=s.num_q_heads,
                                num_kv_heads=s.num_kv_heads, head_size=s.head_size,
                                rotary_dim=s.rotary_dim, is_neox=s.is_neox) for s in shapes],
                   implementations={i.name: dict(about=i.about, cache_dtype=i.cache_dtype,
                                                 cache_itemsize=i.cache_itemsize, tolerance=i.tolerance)
                                    for i in impls},
                   tolerances={i.name: i.tolerance for i in impls},
                   bytes_formula="2*T*(Hq+Hk)*R*2 + 8*T + T*R*cache_itemsize (copy: 2*T*(Hq+Hk)*D*2)",
                   rows=rec.rows, checks=rec.checks, errors=rec.errors, host_overhead=[],
                   skipped=skipped, notes=[], complete=False)
    compiled = CompiledRope()
    try:
        for shape in shapes:
            t0 = time.perf_counter()
            print(f"--- {shape.name}: {shape.describe()}", flush=True)
            try:
                sweep_shape(shape, tokens, impls, device, flashinfer, compiled, timer, rec)
            except FatalCuda:
                raise
            except Exception as e:  # anything not caught per row: note it, go on
                rec.error(f"shape {shape.name}", e)
                results["notes"].append(f"{shape.name}: sweep stopped early: {short(e)}")
                ensure_cuda_usable(device)
            print(f"--- {shape.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
            write_json(results, out_dir)  # partial results survive a later crash
        print("--- host overhead", flush=True)
        try:
            results["host_overhead"] = measure_host_overhead(impls, device, flashinfer, host_calls, rec)
        except FatalCuda:
            raise
        except Exception as e:
            rec.error("host overhead", e)
            results["notes"].append(f"host overhead not measured: {short(e)}")
        results["complete"] = True
    except FatalCuda as e:
        results["notes"].append(f"the CUDA context failed ({e}); the run stopped there")
        print(f"CUDA context failed: {e}; writing what was measured", flush=True)
    except KeyboardInterrupt:
        results["notes"].append("interrupted; partial results")
    results["elapsed_s"] = time.perf_counter() - started
    md = write_reports(results, out_dir)
    print()
    print(md)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'RESULTS.md'}, {out_dir / 'bandwidth.png'} "
          f"in {results['elapsed_s']:.0f} s", flush=True)
    return 0


def compile_settings() -> None:
    """Let torch.compile raise rather than silently run eagerly, so a failure is noted."""
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = False
    except Exception:
        pass


def cpu_copy_bandwidth() -> float:
    """Dry run: a host memory copy stands in for the device copy bandwidth."""
    src = torch.empty(1 << 26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / CpuTimer(5).graph([lambda: dst.copy_(src)])


if __name__ == "__main__":
    sys.exit(main())
