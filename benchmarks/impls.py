"""The implementations registry: op families, their shapes, and how each implementation is
prepared and called.

An op family (``OpFamily``) is everything the sweep needs to know about one kind of op:
its shapes; its implementations (rope_jit's modes and the peers', each an ``Impl`` whose
``prepare(context, tokens)`` returns ``apply(*inputs)``); how to make one row's input sets;
the bytes each call is charged; the access pattern of its pattern ceiling; its
correctness check; which implementations are compared with which, and the targets. The
sweep (run.py), the timing (timing.py, ceilings.py) and the report (report.py) take a
family as it is: a new family (fused RoPE + FP8 quantize, RoPE + paged-KV append) is a new
``OpFamily`` subclass registered in ``FAMILIES``, with no change to them.

Family ``rope``: bf16 q ``[T, Hq, D]`` and k ``[T, Hk, D]`` (contiguous), int64 positions
uniform in [0, 100000), caches built by ``rope_jit.compute_cos_sin_cache``.

* ``rope_jit/cache_fp32``, ``rope_jit/cache_bf16``: ``apply_rope_inplace_with_cache``;
* ``rope_jit/on_the_fly``: ``apply_rope_pos_ids_inplace``; ``rope_jit/fly_llama3``,
  ``rope_jit/fly_yarn``: the same with a ``rope_scaling`` variant;
* ``rope_jit/cos_sin``: ``apply_rotary_pos_emb_inplace`` fed what Liger is fed (bf16 cos/sin
  per token, gathered outside the call): no position -> cache-row load in the kernel;
* ``flashinfer/cache_fp32``, ``flashinfer/on_the_fly``: FlashInfer's own kernels (ctypes);
* ``liger_kernel``: ``liger_rotary_pos_emb`` on the ``[1, H, T, D]`` views of the
  ``[1, T, H, D]`` storage that Hugging Face models pass it, bf16 cos/sin ``[1, T, R]``
  gathered outside the call (HF builds them once per forward for all layers); NeoX only
  (partial rotary included);
* ``vllm/rotary_embedding``: vLLM's CUDA op, bf16 cache (vLLM casts it to q's dtype);
* ``torch_eager``, ``torch_compile``: vLLM's native PyTorch formula, bf16 cache, OUT OF
  PLACE (new q and k returned, as vLLM runs it), eager and under ``torch.compile``.

Bytes per call (docs/performance.md): in place, read + write of the rotated part of q and k;
out of place, of whole heads (the pass-through part is copied and counts); + positions
(8 per token) + cache rows read (R x the cache's item size per token; 0 on the fly). The
copy row moves q and k whole (read + write); the pattern ceiling touches the rotated part.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import rope_jit
from ceilings import ChainPattern, TouchPattern
from checks import TOLERANCES, check_rope, make_rope_check_case
from errors import Unavailable
from peers import CompiledRope, Peers, liger_resolved_impl, torch_rope

ApplyFn = Callable[..., object]  # apply(*inputs): None in place, the outputs out of place

ITEMSIZE = {None: 0, "float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Impl:
    """One implementation of a family's op, as the sweep prepares, checks and times it."""
    name: str
    prepare: Callable[[object, int], ApplyFn]  # (shape context, tokens) -> apply
    role: str                       # "rope_jit" (the library benchmarked) or "peer"
    about: str
    inplace: bool = True            # False: returns new outputs (whole heads are moved)
    cache_dtype: str | None = None  # the cos/sin cache it reads; None: computed on the fly
    tolerance: str = "fp32"         # key of checks.TOLERANCES
    rope_scaling: dict | None = field(default=None, hash=False)  # an on-the-fly variant
    eager_fallback: bool = False    # time eagerly when CUDA-graph capture fails

    @property
    def cache_itemsize(self) -> int:
        return ITEMSIZE[self.cache_dtype]

    def describe(self) -> dict:
        return dict(about=self.about, role=self.role, inplace=self.inplace,
                    cache_dtype=self.cache_dtype, cache_itemsize=self.cache_itemsize,
                    tolerance=self.tolerance, tolerance_text=TOLERANCES[self.tolerance][0],
                    rope_scaling=self.rope_scaling)


class OpFamily(abc.ABC):
    """One op family. Subclass, fill the class attributes, implement the methods, and
    register an instance in FAMILIES."""
    name: str                       # key in FAMILIES and in every row of the results
    title: str                      # one line for the report
    shapes: dict                    # shape name -> shape (with .name and .describe())
    host_overhead_shape: str        # the shape host time per call is measured on (1 token)
    host_overhead_impls: dict       # impl name -> what that measurement is
    decode_max_tokens: int = 16     # rows up to here: the decode table
    small_tokens: int = 128         # rows up to here: time / copy time in the cells

    @abc.abstractmethod
    def build_impls(self, peers: Peers) -> tuple[list[Impl], dict]:
        """(implementations, {name: why not}) given the peers found."""

    @abc.abstractmethod
    def make_context(self, shape, device: torch.device, peers: Peers):
        """What every implementation of one shape shares (caches, peers...); has .shape."""

    @abc.abstractmethod
    def input_bytes(self, shape, tokens: int) -> int:
        """Size of one input set: the copy row copies this many bytes."""

    @abc.abstractmethod
    def touch_pattern(self, shape, tokens: int) -> TouchPattern | None:
        """The in-place access pattern of the pattern-ceiling row, or None for no such row."""

    def chain_pattern(self, shape, tokens: int) -> ChainPattern | None:
        """The chain floor row's pattern (the touch plus a position -> table row chain per
        token), or None for no such row (the default; the rope family: above its decode
        rows)."""
        return None

    @abc.abstractmethod
    def bytes_per_call(self, shape, tokens: int, impl: Impl) -> int:
        """Bytes one call is charged (achieved bandwidth = this / time)."""

    @abc.abstractmethod
    def make_inputs(self, ctx, tokens: int, sets: int) -> list[tuple]:
        """`sets` input sets, each the arguments of one apply call."""

    @abc.abstractmethod
    def make_check_case(self, ctx, tokens: int):
        """Fresh inputs and the reference for one check row."""

    @abc.abstractmethod
    def check(self, impl: Impl, apply: ApplyFn, ctx, case) -> dict:
        """Check record: shape, impl, tokens, ok, problems, tolerance, max_abs_err,
        worst_err_over_tol."""

    @abc.abstractmethod
    def comparisons(self) -> list[dict]:
        """[{subject, peers: [...], label}]: subject's time over the fastest peer's."""

    @abc.abstractmethod
    def targets(self, shapes: list) -> list[dict]:
        """[{what, impls, shapes, min_tokens, max_tokens, metric, at_least | at_most}]."""

    @abc.abstractmethod
    def bytes_formula(self) -> str:
        """The byte count in words, for the report."""

    def describe_shape(self, shape) -> dict:
        return dict(family=self.name, name=shape.name, description=shape.describe())

    def describe(self, impls: list[Impl], shapes: list) -> dict:
        return dict(title=self.title, bytes_formula=self.bytes_formula(),
                    decode_max_tokens=self.decode_max_tokens, small_tokens=self.small_tokens,
                    implementations={i.name: i.describe() for i in impls},
                    references=dict(
                        chain_floor="the pattern ceiling's kernel with a position -> fp32 "
                                    "cache-row load chain per token (benchmarks/ceilings.py): "
                                    "what that latency chain costs a bare kernel (decode rows); "
                                    "charged as a call with an fp32 cache",
                        pattern_ceiling="benchmarks/ceilings.py's kernel loading and storing "
                                        "back, in place, the bytes an in-place call must touch "
                                        "(16-byte vectors); charged those bytes read + written",
                        copy="a torch device copy of one input set; charged its bytes read "
                             "+ written (the latency floor at few tokens)"),
                    comparisons=self.comparisons(), targets=self.targets(shapes))


# ================================================================== family: rope

MAX_POSITION = 100_000  # positions uniform in [0, MAX_POSITION); rows of every cache
ROPE_THETA = 1e4        # every cache's base; the on-the-fly calls' default rope_theta
DTYPE = torch.bfloat16
SEED = 1234


@dataclass(frozen=True)
class RopeShape:
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

    @property
    def fully_rotated(self) -> bool:
        return self.rotary_dim == self.head_size


ROPE_SHAPES = {s.name: s for s in (
    RopeShape("llama3-8b", 32, 8, 128, 128, True),
    RopeShape("gptj", 32, 2, 128, 64, False),       # also GLM's layout
    RopeShape("dsv3", 128, 1, 64, 64, False),       # DeepSeek-V3's rope part (MLA)
    RopeShape("phi2", 32, 32, 80, 32, True),
)}

# On-the-fly scaling variants: they must run at the speed of plain on-the-fly RoPE.
FLY_VARIANTS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
             "mscale": 1.0, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
}


def rope_bytes(shape: RopeShape, tokens: int, cache_itemsize: int, inplace: bool) -> int:
    """docs/performance.md: q and k read + written (their rotated part in place, whole heads out
    of place), int64 positions, cache rows read (R values per token)."""
    per_head = shape.rotary_dim if inplace else shape.head_size
    moved = tokens * (shape.num_q_heads + shape.num_kv_heads) * per_head * 2  # bf16
    return 2 * moved + 8 * tokens + tokens * shape.rotary_dim * cache_itemsize


@dataclass
class RopeContext:
    """What every implementation of one rope shape shares."""
    shape: RopeShape
    device: torch.device
    host_caches: dict    # 'float32' / 'bfloat16' -> NumPy [MAX_POSITION, R]
    caches: dict         # the same values as torch tensors on the device
    peers: Peers
    compiled: CompiledRope


def host_tensor_to_torch(host: np.ndarray, device: torch.device) -> torch.Tensor:
    if host.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16: exact via fp32
        return torch.from_numpy(host.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(host)).to(device)


# ------------------------------------------------------------------ rope: how each is called

def _rope_jit_cache(dtype: str):
    def prepare(ctx: RopeContext, tokens: int) -> ApplyFn:
        s, cache = ctx.shape, ctx.caches[dtype]
        return lambda pos, q, k: rope_jit.apply_rope_inplace_with_cache(
            pos, q, k, s.head_size, cache, s.is_neox)
    return prepare


def _rope_jit_on_the_fly(rope_scaling: dict | None):
    def prepare(ctx: RopeContext, tokens: int) -> ApplyFn:
        rotary_dim, interleave = ctx.shape.rotary_dim, not ctx.shape.is_neox
        # rope_theta left at its default, 1e4 == ROPE_THETA
        if rope_scaling is None:
            return lambda pos, q, k: rope_jit.apply_rope_pos_ids_inplace(
                q, k, pos, rotary_dim=rotary_dim, interleave=interleave)
        return lambda pos, q, k: rope_jit.apply_rope_pos_ids_inplace(
            q, k, pos, rotary_dim=rotary_dim, interleave=interleave, rope_scaling=rope_scaling)
    return prepare


def _flashinfer(kind: str):
    def prepare(ctx: RopeContext, tokens: int) -> ApplyFn:
        cache = ctx.caches["float32"] if kind == "cache" else None
        return ctx.peers.flashinfer.bind(kind, ctx.shape, ROPE_THETA, cache)
    return prepare


def _torch_eager(ctx: RopeContext, tokens: int) -> ApplyFn:
    s, cache = ctx.shape, ctx.caches["bfloat16"]
    return lambda pos, q, k: torch_rope(pos, q, k, cache, s.rotary_dim, s.is_neox)


def _torch_compile(ctx: RopeContext, tokens: int) -> ApplyFn:
    s, cache = ctx.shape, ctx.caches["bfloat16"]
    fn = ctx.compiled.get((s.name, tokens))  # compiles on its first call
    return lambda pos, q, k: fn(pos, q, k, cache, s.rotary_dim, s.is_neox)


def _gathered_cos_sin(cache: torch.Tensor, lead: tuple = ()) -> Callable:
    """cos_sin(pos) -> (cos, sin), each [*lead, T, R] (halves duplicated), as Hugging Face
    models build them once per forward and share them across layers: the gather stays out
    of the timed call (it runs on the first call with these positions, the warm-up, outside
    the graph)."""
    last = {}

    def cos_sin(pos):
        if last.get("pos") is not pos:
            c, sn = cache.index_select(0, pos).chunk(2, dim=-1)
            shape = (*lead, pos.shape[0], 2 * c.shape[-1])
            last.update(pos=pos, cos=torch.cat((c, c), -1).view(shape),
                        sin=torch.cat((sn, sn), -1).view(shape))
        return last["cos"], last["sin"]
    return cos_sin


def _neox_only(shape: RopeShape, who: str) -> None:
    if not shape.is_neox:
        raise Unavailable("n/a", f"{who} NeoX (rotate-half) style only")


def _liger(ctx: RopeContext, tokens: int) -> ApplyFn:
    s, rope = ctx.shape, ctx.peers.liger_rope
    _neox_only(s, "Liger's kernel does")
    cos_sin = _gathered_cos_sin(ctx.caches["bfloat16"], lead=(1,))

    def apply(pos, q, k):
        # Liger takes [B, H, T, D] views of [B, T, H, D] storage and rotates that storage;
        # the rotary width is that of cos/sin (R: partial rotary rotates the first R dims)
        cos, sin = cos_sin(pos)
        rope(q[None].transpose(1, 2), k[None].transpose(1, 2), cos, sin)
    return apply


def _rope_jit_cos_sin(ctx: RopeContext, tokens: int) -> ApplyFn:
    """Liger's inputs exactly (bf16 cos/sin per token, gathered outside the call), through
    transformers' in-place form: the same kernel without the position -> cache row load."""
    _neox_only(ctx.shape, "apply_rotary_pos_emb takes")
    cos_sin = _gathered_cos_sin(ctx.caches["bfloat16"])

    def apply(pos, q, k):
        cos, sin = cos_sin(pos)
        rope_jit.apply_rotary_pos_emb_inplace(q, k, cos, sin, unsqueeze_dim=-2)
    return apply


def _vllm(ctx: RopeContext, tokens: int) -> ApplyFn:
    s, cache, ops = ctx.shape, ctx.caches["bfloat16"], ctx.peers.vllm_ops
    return lambda pos, q, k: ops.rotary_embedding(pos, q, k, s.head_size, cache, s.is_neox)


CACHE_PEERS = ("flashinfer/cache_fp32", "liger_kernel", "vllm/rotary_embedding",
               "torch_compile", "torch_eager")


class RopeFamily(OpFamily):
    name = "rope"
    title = "RoPE on q and k, bf16"
    shapes = ROPE_SHAPES
    host_overhead_shape = "llama3-8b"
    host_overhead_impls = {
        "rope_jit/cache_fp32": "fp32 cache",
        "rope_jit/on_the_fly": "on the fly",
        "flashinfer/cache_fp32": "fp32 cache, through ctypes",
        "liger_kernel": "bf16 cos/sin gathered once, as its sweep rows",
        "torch_eager": "bf16 cache, out of place",
        "torch_compile": "bf16 cache, out of place",
    }

    def build_impls(self, peers: Peers) -> tuple[list[Impl], dict]:
        impls = [
            Impl("rope_jit/cache_fp32", _rope_jit_cache("float32"), "rope_jit",
                 "apply_rope_inplace_with_cache, fp32 cache", cache_dtype="float32"),
            Impl("rope_jit/cache_bf16", _rope_jit_cache("bfloat16"), "rope_jit",
                 "apply_rope_inplace_with_cache, bf16 cache", cache_dtype="bfloat16"),
            Impl("rope_jit/on_the_fly", _rope_jit_on_the_fly(None), "rope_jit",
                 "apply_rope_pos_ids_inplace"),
            Impl("rope_jit/fly_llama3", _rope_jit_on_the_fly(FLY_VARIANTS["llama3"]), "rope_jit",
                 "apply_rope_pos_ids_inplace, rope_scaling llama3 (factor 8)",
                 rope_scaling=FLY_VARIANTS["llama3"]),
            Impl("rope_jit/fly_yarn", _rope_jit_on_the_fly(FLY_VARIANTS["yarn"]), "rope_jit",
                 "apply_rope_pos_ids_inplace, rope_scaling yarn (DeepSeek-V3's)",
                 rope_scaling=FLY_VARIANTS["yarn"]),
            Impl("rope_jit/cos_sin", _rope_jit_cos_sin, "rope_jit",
                 "apply_rotary_pos_emb_inplace, bf16 cos/sin [T, R] gathered outside the call "
                 "(Liger's inputs)", cache_dtype="bfloat16"),
        ]
        skipped = {}
        if peers.flashinfer is not None:
            impls += [
                Impl("flashinfer/cache_fp32", _flashinfer("cache"), "peer",
                     "BatchQKApplyRotaryPosIdsCosSinCache (ctypes), fp32 cache",
                     cache_dtype="float32", tolerance="fp32_2ulp"),
                Impl("flashinfer/on_the_fly", _flashinfer("posids"), "peer",
                     "BatchQKApplyRotaryPosIds (ctypes)", tolerance="fp32_angle"),
            ]
        else:
            skipped["flashinfer/*"] = peers.notes.get("flashinfer", "not loaded")
        if peers.liger_rope is not None:
            resolved = liger_resolved_impl(peers.device)
            impls.append(Impl("liger_kernel", _liger, "peer",
                              f"{peers.notes['liger_kernel']}"
                              + (f" (dispatcher: {resolved})" if resolved else "")
                              + "; bf16 cos/sin [1, T, R] gathered outside the call",
                              cache_dtype="bfloat16", tolerance="bf16_math", eager_fallback=True))
        else:
            skipped["liger_kernel"] = peers.notes.get("liger_kernel", "not loaded")
        if peers.vllm_ops is not None:
            impls.append(Impl("vllm/rotary_embedding", _vllm, "peer", "vLLM's CUDA op, bf16 cache",
                              cache_dtype="bfloat16", tolerance="bf16_math", eager_fallback=True))
        else:
            skipped["vllm/rotary_embedding"] = peers.notes.get("vllm", "not loaded")
        impls += [
            Impl("torch_eager", _torch_eager, "peer",
                 "vLLM's forward_static formula, bf16 cache, out of place (returns new q, k)",
                 inplace=False, cache_dtype="bfloat16", tolerance="bf16_math"),
            Impl("torch_compile", _torch_compile, "peer",
                 "torch.compile of torch_eager (default mode, dynamic=False), out of place",
                 inplace=False, cache_dtype="bfloat16", tolerance="bf16_math", eager_fallback=True),
        ]
        return impls, skipped

    def make_context(self, shape: RopeShape, device: torch.device, peers: Peers) -> RopeContext:
        """Caches built by rope_jit (float64 math, rounded once); the device copies hold
        exactly the host values, which the correctness check feeds the reference."""
        host = {dt: rope_jit.compute_cos_sin_cache(shape.rotary_dim, MAX_POSITION, base=ROPE_THETA,
                                                   dtype=dt)
                for dt in ("float32", "bfloat16")}
        caches = {dt: host_tensor_to_torch(h, device) for dt, h in host.items()}
        return RopeContext(shape, device, host, caches, peers, CompiledRope())

    def input_bytes(self, shape: RopeShape, tokens: int) -> int:
        return tokens * (shape.num_q_heads + shape.num_kv_heads) * shape.head_size * 2

    def touch_pattern(self, shape: RopeShape, tokens: int) -> TouchPattern:
        # q's heads then k's, one buffer: every head a row, its rotated prefix touched
        return TouchPattern(rows=tokens * (shape.num_q_heads + shape.num_kv_heads),
                            row_bytes=shape.head_size * 2, touched_bytes=shape.rotary_dim * 2)

    def chain_pattern(self, shape: RopeShape, tokens: int) -> ChainPattern | None:
        # decode rows only: there a call is one latency chain and this row its floor; with
        # many tokens a kernel hides the chain behind other tokens' loads (a one-vector
        # thread cannot), so the row would be no floor at all
        if tokens > self.decode_max_tokens:
            return None
        return ChainPattern(self.touch_pattern(shape, tokens),
                            rows_per_token=shape.num_q_heads + shape.num_kv_heads,
                            table_row_bytes=shape.rotary_dim * 4, table_rows=MAX_POSITION)

    def bytes_per_call(self, shape: RopeShape, tokens: int, impl: Impl) -> int:
        return rope_bytes(shape, tokens, impl.cache_itemsize, impl.inplace)

    def make_inputs(self, ctx: RopeContext, tokens: int, sets: int) -> list[tuple]:
        s, device = ctx.shape, ctx.device
        pos = torch.randint(0, MAX_POSITION, (tokens,), device=device, dtype=torch.int64)
        return [(pos,
                 torch.randn(tokens, s.num_q_heads, s.head_size, device=device, dtype=DTYPE),
                 torch.randn(tokens, s.num_kv_heads, s.head_size, device=device, dtype=DTYPE))
                for _ in range(sets)]

    def make_check_case(self, ctx: RopeContext, tokens: int):
        return make_rope_check_case(ctx.shape, tokens, ctx.device, DTYPE, MAX_POSITION,
                                    ROPE_THETA, SEED)

    def check(self, impl: Impl, apply: ApplyFn, ctx: RopeContext, case) -> dict:
        return check_rope(impl, apply, ctx.device, ctx.host_caches, case)

    def comparisons(self) -> list[dict]:
        return [dict(label="cache", subject="rope_jit/cache_fp32", peers=list(CACHE_PEERS)),
                dict(label="on the fly", subject="rope_jit/on_the_fly",
                     peers=["flashinfer/on_the_fly"]),
                dict(label="cos/sin per token", subject="rope_jit/cos_sin",
                     peers=["liger_kernel"])]

    def targets(self, shapes: list) -> list[dict]:
        ours = ["rope_jit/cache_fp32", "rope_jit/cache_bf16", "rope_jit/on_the_fly",
                "rope_jit/fly_llama3", "rope_jit/fly_yarn"]
        full = [s.name for s in shapes if s.fully_rotated]
        partial = [s.name for s in shapes if not s.fully_rotated]
        out = []
        if full:
            out.append(dict(what="≥ 95% of copy bandwidth at ≥ 8192 tokens (fully rotated heads)",
                            impls=ours, shapes=full, min_tokens=8192, max_tokens=None,
                            metric="percent_of_copy", at_least=95.0))
        if partial:
            out.append(dict(what="≥ 95% of the pattern ceiling at ≥ 8192 tokens (partially rotated heads)",
                            impls=ours, shapes=partial, min_tokens=8192, max_tokens=None,
                            metric="percent_of_pattern", at_least=95.0))
        out.append(dict(what="≤ 1.3x the copy time at 1 to 16 tokens, with a cache",
                        impls=["rope_jit/cache_fp32", "rope_jit/cache_bf16"],
                        shapes=[s.name for s in shapes], min_tokens=1, max_tokens=16,
                        metric="x_copy", at_most=1.3))
        return out

    def bytes_formula(self) -> str:
        return ("in place 2·T·(Hq+Hk)·R·2, out of place 2·T·(Hq+Hk)·D·2; + 8·T (positions) "
                "+ T·R·cache itemsize (0 on the fly); copy 2·T·(Hq+Hk)·D·2; "
                "pattern ceiling 2·T·(Hq+Hk)·R·2; chain floor as an fp32 cache")


FAMILIES: dict[str, OpFamily] = {f.name: f for f in (RopeFamily(),)}
