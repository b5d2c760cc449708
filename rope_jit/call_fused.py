"""What a fused call asks for, as one hashable value (``rope_jit.call`` does the same for
plain RoPE): ``FusedRopeCall`` (RoPE + quantization + KV-cache write) and ``QKNormRopeCall``
(QK RMSNorm + RoPE).

The public functions build them with the memoized builders below (validating the scalar
arguments; arrays are validated by ``rope_jit.plan_fused``) and pass them down unchanged:
router, torch custom ops, launcher and planner read the same value. The builders are marked
constant for torch.compile, like ``rope_jit.call``'s.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from .call import check_bool, check_int, memoized_constant
from .dtypes import FP8_DTYPES, FLOAT_DTYPES, dtype_name

# Which public function a FusedRopeCall comes from: it decides the layouts, what is
# written where, and the argument names errors use (rope_jit.plan_fused).
ROPE_QUANTIZE = "rope_quantize_fp8"                            # FlashInfer
APPEND_PAGED = "rope_quantize_fp8_append_paged_kv_cache"       # FlashInfer
MLA_CACHE = "concat_and_cache_mla_rope_fused"                  # vLLM
KV_CACHE = "rope_and_reshape_and_cache_flash"                  # vLLM
KV_BUFFER = "apply_rope_with_cos_sin_cache_inplace"            # SGLang's fused_set_kv_buffer_arg
FUSED_OPS = (ROPE_QUANTIZE, APPEND_PAGED, MLA_CACHE, KV_CACHE, KV_BUFFER)

KV_LAYOUTS = ("NHD", "HND")
# vLLM's kv_cache_dtype strings -> the cache's storage ("auto": the input dtype)
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                   "fp8_e5m2": "float8_e5m2"}
QUANTIZE_DTYPES = FP8_DTYPES + FLOAT_DTYPES  # beyond FlashInfer: unquantized outputs too


class FusedRopeCall(NamedTuple):
    """Everything a fused RoPE call asks for except its arrays.

    op: one of FUSED_OPS.
    is_neox: NeoX pairs (i, i + R/2); False: GPT-J pairs (2i, 2i + 1).
    frequencies: None when cos/sin come from a cache; else the on-the-fly frequencies
        (``rope_jit.call.frequencies_json``).
    head_size: elements per head of the vLLM/SGLang ops' query, key and key cache (None
        for the others: their arrays are [tokens, heads, dim]).
    rotary_dim: rotated elements per head on the fly for the vLLM/SGLang ops (None: the
        head size); the FlashInfer ops rotate the width of q_rope.
    quantize_dtype: FlashInfer's output dtype (a name); None: the dtype of the outputs
        given, else float8_e4m3fn (rope_quantize_fp8) or the cache's dtype (append).
    quant_scale_q: multiplies the q outputs (FlashInfer's quant_scale_q).
    quant_scale_kv: multiplies the k outputs and the k written to a cache (FlashInfer's
        quant_scale_kv; 1 / k_scale for SGLang's and vLLM's host scales).
    quant_scale_v: multiplies the v written to a cache.
    page_size: FlashInfer's page_size (the paged append); 0 for the other ops.
    kv_layout: FlashInfer's kv_layout of a 4-D paged cache, "NHD" or "HND".
    kv_cache_dtype: vLLM's kv_cache_dtype ("auto", "fp8", "fp8_e4m3", "fp8_e5m2").
    pdl: programmatic dependent launch (FlashInfer's enable_pdl; sm_90+): the kernel may be
        scheduled while the previous kernel on the stream finishes, and waits for it before
        its first read (kernels/rope_fused.cu).
    """

    op: str
    is_neox: bool
    frequencies: str | None = None
    head_size: int | None = None
    rotary_dim: int | None = None
    quantize_dtype: str | None = None
    quant_scale_q: float = 1.0
    quant_scale_kv: float = 1.0
    quant_scale_v: float = 1.0
    page_size: int = 0
    kv_layout: str = "NHD"
    kv_cache_dtype: str = "auto"
    pdl: bool = False

    @property
    def from_cache(self) -> bool:
        return self.frequencies is None


class QKNormRopeCall(NamedTuple):
    """Everything a fused_qk_norm_rope call asks for except its arrays (vLLM's argument
    names). frequencies/rotary_dim: on the fly as in FusedRopeCall (rotary_dim None: the
    whole head); from a cache the rotary dim is its width."""

    num_heads_q: int
    num_heads_k: int
    num_heads_v: int
    head_dim: int
    eps: float
    is_neox: bool
    frequencies: str | None = None
    rotary_dim: int | None = None
    token_heads_per_warp: int = -1  # vLLM's forced_token_heads_per_warp; -1: the planner's

    @property
    def from_cache(self) -> bool:
        return self.frequencies is None


# The torch op arguments that carry each call type: its fields, in order, with their
# schema types (rope_jit.torch_ops_fused).
OP_FIELDS = {
    FusedRopeCall: (("op", "str"), ("is_neox", "bool"), ("frequencies", "str?"),
                    ("head_size", "int?"), ("rotary_dim", "int?"), ("quantize_dtype", "str?"),
                    ("quant_scale_q", "float"), ("quant_scale_kv", "float"),
                    ("quant_scale_v", "float"), ("page_size", "int"), ("kv_layout", "str"),
                    ("kv_cache_dtype", "str"), ("pdl", "bool")),
    QKNormRopeCall: (("num_heads_q", "int"), ("num_heads_k", "int"), ("num_heads_v", "int"),
                     ("head_dim", "int"), ("eps", "float"), ("is_neox", "bool"),
                     ("frequencies", "str?"), ("rotary_dim", "int?"),
                     ("token_heads_per_warp", "int")),
}
for _type, _fields in OP_FIELDS.items():
    assert tuple(n for n, _ in _fields) == _type._fields, "OP_FIELDS must follow the call type"


# ------------------------------------------------------------------ argument checks

def check_number(value, name: str, *, minimum: float | None = None) -> float:
    """A finite real number (bool excluded), at least `minimum` when given: TypeError /
    ValueError naming the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x) or (minimum is not None and x < minimum):
        at_least = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name}: expected a finite number{at_least}, got {x!r}")
    return x


def _optional_rotary_dim(rotary_dim):
    return None if rotary_dim is None else check_int(rotary_dim, "rotary_dim")


# ------------------------------------------------------------------ builders

@memoized_constant
def fused_rope_call(op: str, is_neox, frequencies=None, head_size=None, rotary_dim=None,
                    quantize_dtype=None, quant_scale_q=1.0, quant_scale_kv=1.0, quant_scale_v=1.0,
                    page_size=0, kv_layout="NHD", kv_cache_dtype="auto",
                    pdl=False) -> FusedRopeCall:
    """A FusedRopeCall from a public function's scalar arguments, checked. Scales are
    multipliers here (the vLLM/SGLang functions pass 1 / their scale)."""
    if op not in FUSED_OPS:
        raise ValueError(f"op: expected one of {FUSED_OPS}, got {op!r}")
    qdt = None
    if quantize_dtype is not None:
        qdt = dtype_name(quantize_dtype)
        if qdt not in QUANTIZE_DTYPES:
            raise TypeError(f"quantize_dtype: expected float8_e4m3fn or float8_e5m2 (or, beyond "
                            f"FlashInfer, {', '.join(FLOAT_DTYPES)}), got {quantize_dtype!r}")
    page_size = check_int(page_size, "page_size")
    if op == APPEND_PAGED and page_size <= 0:
        raise ValueError(f"page_size: expected a positive integer, got {page_size}")
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                         f"got {kv_cache_dtype!r}")
    if head_size is not None:
        head_size = check_int(head_size, "head_size")
        if head_size <= 0:
            raise ValueError(f"head_size: expected a positive integer, got {head_size}")
    return FusedRopeCall(op, check_bool(is_neox, "is_neox"), frequencies, head_size,
                         _optional_rotary_dim(rotary_dim), qdt,
                         check_number(quant_scale_q, "quant_scale_q"),
                         check_number(quant_scale_kv, "quant_scale_kv"),
                         check_number(quant_scale_v, "quant_scale_v"), page_size, kv_layout,
                         kv_cache_dtype, check_bool(pdl, "enable_pdl"))


@memoized_constant
def qk_norm_rope_call(num_heads_q, num_heads_k, num_heads_v, head_dim, eps, is_neox,
                      frequencies=None, rotary_dim=None,
                      forced_token_heads_per_warp=-1) -> QKNormRopeCall:
    """forced_token_heads_per_warp (vLLM's): <= 0 lets the planner choose; N > 0 makes each
    warp take N (token, head) rows, 32 / N threads a row: a power of two up to 32."""
    per_warp = check_int(forced_token_heads_per_warp, "forced_token_heads_per_warp")
    if per_warp <= 0:
        per_warp = -1
    elif per_warp > 32 or per_warp & (per_warp - 1):
        raise ValueError(f"forced_token_heads_per_warp: expected -1 (the planner's choice) or a "
                         f"power of two up to 32, got {per_warp}")
    counts = []
    for value, name in ((num_heads_q, "num_heads_q"), (num_heads_k, "num_heads_k"),
                        (num_heads_v, "num_heads_v"), (head_dim, "head_dim")):
        n = check_int(value, name)
        if n < 0 or (n == 0 and name == "head_dim"):
            raise ValueError(f"{name}: expected a {'positive' if name == 'head_dim' else 'non-negative'} "
                             f"integer, got {n}")
        counts.append(n)
    return QKNormRopeCall(*counts, check_number(eps, "eps", minimum=0.0), check_bool(is_neox, "is_neox"),
                          frequencies, _optional_rotary_dim(rotary_dim), per_warp)


def clear_fused_call_caches() -> None:
    for builder in (fused_rope_call, qk_norm_rope_call):
        builder.cache_clear()
