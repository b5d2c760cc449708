"""The peers rope_jit is measured against, loaded as their users load them.

* FlashInfer: its own RoPE kernels (``include/flashinfer/pos_enc.cuh``) compiled behind the
  small C ABI of ``../shared/peers/flashinfer`` into ``.peers/libfi_rope.so``, called through
  ctypes (FlashInfer's Python package does not import on the GPU machine).
* Liger-Kernel: ``liger_kernel.transformers.rope.liger_rotary_pos_emb``, the function its
  Hugging Face patching puts in place of ``apply_rotary_pos_emb`` (it dispatches to the
  Triton kernel ``liger_kernel.ops.rope._triton_rope`` through ``LigerRopeFunction``; the
  benchmark notes which implementation its dispatcher resolved). Liger is a pure-Python
  wheel over Triton; the GPU machine has Triton but not Liger, so carry the wheel
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
          -d .whl liger-kernel==0.8.5                                   # here
      pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl  # GPU machine
      export PYTHONPATH=/tmp/site:$PYTHONPATH
  and name ``.whl`` in the device call's ``carry`` (see benchmarks/README.md).
* vLLM's CUDA op ``vllm._custom_ops.rotary_embedding`` when vLLM imports.
* The PyTorch formula vLLM runs natively (``RotaryEmbedding.forward_static``), eager and
  under ``torch.compile``: out of place, as vLLM runs it (it returns new q and k).

Each loader returns None with a note saying why when a peer is not there: a missing peer
is a line in the report, never a failure.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from errors import Unavailable, short_error

REPO = Path(__file__).resolve().parent.parent
FLASHINFER_DEFAULT = REPO / ".peers" / "libfi_rope.so"


# ================================================================== the PyTorch formula

def rotate_like_vllm(x, cos, sin, is_neox: bool):
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


def torch_rope(positions, query, key, cos_sin_cache, rotary_dim: int, is_neox: bool):
    """vLLM's ``RotaryEmbedding.forward_static`` on ``[T, H, D]`` q and k: returns new q and
    k, whole heads (the rotated part concatenated with the pass-through part, as vLLM)."""
    cos_sin = cos_sin_cache.index_select(0, positions.flatten())
    cos, sin = cos_sin.chunk(2, dim=-1)
    query_out = torch.cat((rotate_like_vllm(query[..., :rotary_dim], cos, sin, is_neox),
                           query[..., rotary_dim:]), dim=-1)
    key_out = torch.cat((rotate_like_vllm(key[..., :rotary_dim], cos, sin, is_neox),
                         key[..., rotary_dim:]), dim=-1)
    return query_out, key_out


class CompiledRope:
    """``torch.compile(torch_rope, dynamic=False)``, one specialization at a time.

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
            self.fn = torch.compile(torch_rope, dynamic=False)
            self.key = key
        return self.fn


def compile_settings() -> None:
    """Let torch.compile raise rather than silently run eagerly, so a failure is noted."""
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = False
    except Exception:
        pass


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

    def bind(self, kind: str, shape, rope_theta: float, cache=None):
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
        elif kind == "posids":
            fn = self.lib.fi_posids_bf16

            def call(pos, q, k, stream):
                return fn(q.data_ptr(), k.data_ptr(), pos.data_ptr(), q.shape[0],
                          s.num_q_heads, s.num_kv_heads, s.rotary_dim, s.head_size,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), interleave,
                          1.0, rope_theta, stream)
        else:
            raise ValueError(f"FlashInfer.bind: kind must be 'cache' or 'posids', not {kind!r}")

        def apply(pos, q, k):
            # the stream is read per call: inside a graph capture it is the capture stream
            rc = call(pos, q, k, torch.cuda.current_stream().cuda_stream)
            if rc:
                raise FlashInferError(f"FlashInfer returned {rc}")

        self._probe(call, s)
        return apply

    @staticmethod
    def _probe(call, s):
        """One call on a one-token scratch problem: FlashInfer refuses (-1) by head size,
        not by token count, so this tells for the whole shape."""
        q = torch.zeros(1, s.num_q_heads, s.head_size, dtype=torch.bfloat16, device="cuda")
        k = torch.zeros(1, s.num_kv_heads, s.head_size, dtype=torch.bfloat16, device="cuda")
        pos = torch.zeros(1, dtype=torch.int64, device="cuda")
        rc = call(pos, q, k, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        if rc == -1:
            raise Unavailable("refused", f"FlashInfer refuses this shape (head size "
                                         f"{s.head_size}, rotary {s.rotary_dim}): returned -1")
        if rc:
            raise FlashInferError(f"FlashInfer returned CUDA error {rc}")


def load_flashinfer(path_arg: str | None, device: torch.device) -> tuple[FlashInfer | None, str]:
    """(FlashInfer or None, a note saying where from or why not)."""
    if device.type != "cuda":
        return None, "FlashInfer: not loaded (no CUDA device: dry run)"
    path = Path(path_arg) if path_arg else FLASHINFER_DEFAULT
    if not path.exists():
        how = "--flashinfer" if path_arg else "default path"
        return None, (f"FlashInfer: {path} not found ({how}); build it with "
                      f"`bash ../shared/peers/flashinfer/build.sh 90 .peers` and carry .peers")
    try:
        return FlashInfer(path), f"FlashInfer: {path}"
    except Exception as e:  # a missing symbol, a wrong architecture...
        return None, f"FlashInfer: {path} did not load ({short_error(e)})"


# ================================================================== Liger, vLLM

def load_liger() -> tuple[Callable | None, str]:
    """(liger_rotary_pos_emb or LigerRopeFunction.apply, a note saying which, or why not)."""
    try:
        import liger_kernel
    except Exception as e:
        return None, (f"not importable ({short_error(e)}); carry its wheel: see "
                      f"benchmarks/README.md")
    version = getattr(liger_kernel, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("liger-kernel")
        except Exception:
            version = "?"
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return liger_rotary_pos_emb, f"liger_kernel {version}: transformers.rope.liger_rotary_pos_emb"
    except Exception as e:
        first = short_error(e)
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction.apply, (f"liger_kernel {version}: ops.rope.LigerRopeFunction "
                                         f"(transformers.rope did not import: {first})")
    except Exception as e:
        return None, f"liger_kernel {version} has no usable RoPE ({first}; {short_error(e)})"


def liger_resolved_impl(device: torch.device) -> str | None:
    """The implementation Liger's dispatcher picks for 'rope' on `device` (0.8: 'nvidia-triton'
    unless a CuTe DSL package is installed), or None when it cannot say."""
    try:
        from liger_kernel.backends import resolve_impl

        return getattr(resolve_impl("rope", device=device), "impl_name", None)
    except Exception:
        return None


def load_vllm_ops():
    """(vllm._custom_ops or None, a note)."""
    try:
        from vllm import _custom_ops as vllm_ops
    except Exception as e:
        return None, f"not importable ({short_error(e)})"
    if not hasattr(vllm_ops, "rotary_embedding"):
        return None, "vllm._custom_ops has no rotary_embedding"
    return vllm_ops, "vllm._custom_ops.rotary_embedding"


# ================================================================== all of them

@dataclass
class Peers:
    """The peers found in this process, and a note for each (where from, or why not)."""
    device: torch.device
    flashinfer: FlashInfer | None = None
    liger_rope: Callable | None = None
    vllm_ops: object | None = None
    notes: dict = field(default_factory=dict)


def load_peers(flashinfer_path: str | None, device: torch.device) -> Peers:
    flashinfer, fi_note = load_flashinfer(flashinfer_path, device)
    liger, liger_note = load_liger()
    vllm_ops, vllm_note = load_vllm_ops()
    return Peers(device, flashinfer, liger, vllm_ops,
                 notes={"flashinfer": fi_note, "liger_kernel": liger_note, "vllm": vllm_note})
