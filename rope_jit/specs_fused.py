"""Specializations of the fused kernels: RoPE with quantization and the KV-cache write
(``kernels/rope_fused.cu``), and QK RMSNorm + RoPE (``kernels/qk_norm_rope.cu``).

As ``rope_jit.specs``: a frozen dataclass holds every compile-time constant, renders the
prelude of constants, and declares its kernel-argument struct once (``ParamStruct``).
Both kernels share ``kernels/rope_chunk.cuh`` (chunk layout, cos/sin, rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

from .dtypes import C_TYPE
from .specs import ROPE_FREQ, ParamStruct, c_bool, render_source

# ------------------------------------------------------------------ RoPE + quantize + KV write

# Fields in the order a decode call reads them, for the reason given above specs.ROPE_LEAD
# (on sm_90 struct bytes 0-47 share the arguments' first constant-cache line, then 64 bytes
# a line). kernels/rope_fused.cu tests the token (split_items, num_tokens), loads its
# position and its slot or request (dest_index), then issues its item loads (q/k/v rows),
# the cos/sin row, the rest of the cache row, the stores. So the lead and pos_ids fill the
# first line; the pointers every call reads, then vLLM's / SGLang's, the second; the rest
# are grouped by what each function reads: a vLLM / SGLang call touches 5 lines, vLLM's MLA
# 6, rope_quantize_fp8 7, the paged append 9 (tests/test_fused_plan.py checks these).
FUSED_ROPE_LEAD = ("num_tokens", "split_items", "pos_stride", "num_slots", "slot_stride")
# Kernel pointers, one per array a fused call may pass (rope_jit.plan_fused.FusedRopeArrays
# has the same fields, in the public functions' order; the warm path packs them in this
# one): packed per call, the rest of the struct per plan.
FUSED_ROPE_POINTERS = (
    "pos_ids", "cos_sin_cache", "q_rope", "k_rope", "v", "slot_mapping", "cache0", "cache1",
    "k_nope", "q_nope", "batch_indices", "positions", "kv_indptr", "kv_indices",
    "q_rope_out", "q_nope_out", "k_rope_out", "k_nope_out", "k_scale", "v_scale",
)
# Multipliers of what is stored: q outputs, k outputs (arrays), k and v into the caches.
FUSED_ROPE_MULS = ("q_mul", "k_mul", "kc_mul", "vc_mul")
FUSED_ROPE_REST = (
    # every call: the cos/sin row, the (token, head) strides of q, k and v (read even
    # without v), the q and k multipliers
    "max_position", "cache_stride", "qr_st", "qr_sh", "kr_st", "kr_sh", "v_st", "v_sh",
    "q_mul", "k_mul",
    # cache destinations: cache pages, then (page, entry, head) strides and an element offset
    # in the row, with the multiplier of what goes there
    "num_pages", "kc_mul", "krc_page", "krc_entry", "krc_head", "krc_off",
    "vc_mul", "vc_page", "vc_entry", "vc_head",
    "knc_page", "knc_entry", "knc_head", "knc_off",
    # the nope inputs (kn_off: the k nope part's offset in its row)
    "kn_st", "kn_sh", "kn_off", "qn_st", "qn_sh",
    # FlashInfer's outputs
    "qro_st", "qro_sh", "qno_st", "qno_sh", "kro_st", "kro_sh", "kno_st", "kno_sh",
    # the paged cache's tables: strides and bounds (requests, kv_indices entries), one line
    # that the paged append's first index loads read, so that its page walk finds it cached
    "batch_stride", "positions_stride", "batch_size", "kv_indptr_stride", "num_indices",
    "kv_indices_stride",
) + ROPE_FREQ  # only on-the-fly calls read the frequencies
_FUSED_ROPE_DOUBLES = frozenset(ROPE_FREQ + FUSED_ROPE_MULS)
FUSED_ROPE_PARAMS = ParamStruct(
    "FusedRopeParams",
    [(n, "d" if n in _FUSED_ROPE_DOUBLES else "q")
     for n in FUSED_ROPE_LEAD + FUSED_ROPE_POINTERS + FUSED_ROPE_REST],
    pointers=FUSED_ROPE_POINTERS)

CACHE_MODES = ("none", "slots", "paged")
K_ROPE_OUTS = ("none", "array", "inplace")


@dataclass(frozen=True)
class FusedRopeSpec:
    """Every compile-time constant of one fused RoPE kernel (kernels/rope_fused.cu)."""

    dtype: str                  # q/k/v inputs
    q_out_dtype: str            # q_rope_out / q_nope_out (in place: dtype)
    k_out_dtype: str            # k_rope_out / k_nope_out arrays (in place: dtype)
    kv_cache_dtype: str         # cache storage (no cache: dtype)
    cache_dtype: str | None     # cos/sin cache; None: on the fly
    scaling: str                # on-the-fly variant (specs.SCALINGS)
    index_dtypes: tuple         # pos_ids, slot_mapping/batch_indices, positions, kv_indices, kv_indptr
    num_q_heads: int
    num_k_heads: int
    rotary_dim: int
    q_nope_dim: int
    k_nope_dim: int
    v_dim: int
    neox: bool
    vec: int                    # input elements per vector access
    item_batch: int             # items whose loads a thread issues together
    cos_sin_in_regs: bool       # each thread's cos/sin in registers (one chunk per thread)
    cache_vec: int              # cos/sin cache elements per load (COS_SIN_IN_REGS)
    q_inplace: bool             # rotated q goes back into q_rope
    k_rope_out: str             # K_ROPE_OUTS: rotated k into an array, in place, or nowhere
    q_nope_out: bool
    k_nope_out: bool
    k_nope_in_k_rope: bool      # the k nope part is read from k_rope's rows (vLLM's key)
    k_rope_cache: int           # which cache pointer (0, 1) gets the rotated k; -1 none
    k_nope_cache: int
    v_cache: int
    cache_mode: str             # CACHE_MODES
    page_size: int              # entries per page (slots: block size); 1 without a cache
    k_scale_on_device: bool     # the k cache multiplier is 1 / *k_scale, read by the kernel
    v_scale_on_device: bool
    pdl: bool = False           # programmatic dependent launch: griddepcontrol.wait first
    min_blocks: int = 1         # register cap, as kernels/rope.cu's: 1 -> 128, 2 -> 64, 3 -> 40

    kernel_name = "rope_fused_kernel"
    params = FUSED_ROPE_PARAMS

    def words(self) -> str:
        cs = f"{self.cache_dtype} cache" if self.cache_dtype else f"on the fly {self.scaling}"
        dests = [f"q->{'in place' if self.q_inplace else self.q_out_dtype}"]
        if self.k_rope_out != "none":
            dests.append(f"k->{'in place' if self.k_rope_out == 'inplace' else self.k_out_dtype}")
        if self.cache_mode != "none":
            dests.append(f"{self.cache_mode} {self.kv_cache_dtype} cache page {self.page_size}"
                         f" (k rope {self.k_rope_cache}, k nope {self.k_nope_cache},"
                         f" v {self.v_cache})")
        return (f"rope_fused {self.dtype} heads {self.num_q_heads}/{self.num_k_heads} rotary "
                f"{self.rotary_dim} nope {self.q_nope_dim}/{self.k_nope_dim} v {self.v_dim} "
                f"{'neox' if self.neox else 'gptj'} {cs} ids {'/'.join(self.index_dtypes)} "
                f"{', '.join(dests)} vec {self.vec} batch {self.item_batch}"
                f"{f' cos/sin in registers (x{self.cache_vec})' if self.cos_sin_in_regs else ''}"
                f"{' k_scale on device' if self.k_scale_on_device else ''}"
                f"{' v_scale on device' if self.v_scale_on_device else ''}"
                f"{' pdl' if self.pdl else ''}"
                f"{f' min blocks {self.min_blocks}' if self.min_blocks != 1 else ''}")

    def prelude(self) -> str:
        pos, slot, ppos, kvidx, kvptr = self.index_dtypes
        lines = [
            f"// rope_jit specialization: {self.words()}",
            f"typedef {C_TYPE[self.dtype]} in_t;",
            f"typedef {C_TYPE[self.q_out_dtype]} qout_t;",
            f"typedef {C_TYPE[self.k_out_dtype]} kout_t;",
            f"typedef {C_TYPE[self.kv_cache_dtype]} kvc_t;",
            f"typedef {C_TYPE[self.cache_dtype or 'float32']} cache_t;",
            f"typedef {C_TYPE[pos]} pos_t;",
            f"typedef {C_TYPE[slot]} slot_t;",
            f"typedef {C_TYPE[ppos]} ppos_t;",
            f"typedef {C_TYPE[kvidx]} kvidx_t;",
            f"typedef {C_TYPE[kvptr]} kvptr_t;",
            f"constexpr int NUM_Q_HEADS = {self.num_q_heads}, NUM_K_HEADS = {self.num_k_heads};",
            f"constexpr int ROT_DIM = {self.rotary_dim}, Q_NOPE_DIM = {self.q_nope_dim}, "
            f"K_NOPE_DIM = {self.k_nope_dim}, V_DIM = {self.v_dim};",
            f"constexpr int VEC = {self.vec}, ITEM_BATCH = {self.item_batch};",
            f"constexpr bool NEOX = {c_bool(self.neox)};",
            f"constexpr bool COS_SIN_FROM_CACHE = {c_bool(self.cache_dtype is not None)};",
            f"constexpr bool COS_SIN_IN_REGS = {c_bool(self.cos_sin_in_regs)};",
            f"constexpr int CACHE_VEC = {self.cache_vec};",
            f"constexpr int SCALING = SCALING_{self.scaling.upper()};",
            f"constexpr bool Q_INPLACE = {c_bool(self.q_inplace)};",
            f"constexpr int K_ROPE_OUT = {K_ROPE_OUTS.index(self.k_rope_out)};",
            f"constexpr bool Q_NOPE_OUT = {c_bool(self.q_nope_out)};",
            f"constexpr bool K_NOPE_OUT = {c_bool(self.k_nope_out)};",
            f"constexpr bool K_NOPE_IN_K_ROPE = {c_bool(self.k_nope_in_k_rope)};",
            f"constexpr int K_ROPE_CACHE = {self.k_rope_cache}, K_NOPE_CACHE = {self.k_nope_cache}, "
            f"V_CACHE = {self.v_cache};",
            f"constexpr int CACHE_MODE = {CACHE_MODES.index(self.cache_mode)};",
            f"constexpr long long PAGE_SIZE = {self.page_size};",
            f"constexpr bool K_SCALE_ON_DEVICE = {c_bool(self.k_scale_on_device)};",
            f"constexpr bool V_SCALE_ON_DEVICE = {c_bool(self.v_scale_on_device)};",
            f"constexpr bool PDL = {c_bool(self.pdl)};",
            f"constexpr int MIN_BLOCKS = {self.min_blocks};",
        ]
        return "\n".join(lines) + "\n" + self.params.c_decl

    def render(self) -> str:
        return render_source(self.prelude(), "rope_chunk.cuh", "rope_fused.cu")


# ------------------------------------------------------------------ QK RMSNorm + RoPE

# In the order a decode call reads it (as FUSED_ROPE_PARAMS; kernels/qk_norm_rope.cu: the
# token test and the row, then the position, the cos/sin row, eps and the weights): a call
# with a cos/sin cache reads the first two 64-byte lines only.
QK_NORM_ROPE_LEAD = ("num_tokens", "token_stride", "pos_stride")
# (rope_jit.plan_fused.QKNormRopeArrays has the same fields, in the public function's order)
QK_NORM_ROPE_POINTERS = ("qkv", "position_ids", "cos_sin_cache", "q_weight", "k_weight")
QK_NORM_ROPE_NEAR = ("max_position", "cache_stride", "q_weight_stride", "k_weight_stride")
QK_NORM_ROPE_PARAMS = ParamStruct(
    "QKNormRopeParams",
    [(n, "q") for n in QK_NORM_ROPE_LEAD + QK_NORM_ROPE_POINTERS + QK_NORM_ROPE_NEAR]
    + [(n, "d") for n in ("eps",) + ROPE_FREQ], pointers=QK_NORM_ROPE_POINTERS)


@dataclass(frozen=True)
class QKNormRopeSpec:
    """Every compile-time constant of one QK RMSNorm + RoPE kernel (kernels/qk_norm_rope.cu)."""

    dtype: str                  # qkv storage: float16 | bfloat16
    weight_dtype: str           # q_weight / k_weight
    cache_dtype: str | None     # cos/sin cache; None: on the fly
    scaling: str
    index_dtype: str            # position_ids
    head_dim: int
    rotary_dim: int
    num_q_heads: int
    num_k_heads: int
    neox: bool
    vec: int
    lanes: int                  # threads per head (a power of two, at most 32)
    cos_sin_in_regs: bool = False  # cos/sin and weights per thread, no shared memory

    kernel_name = "qk_norm_rope_kernel"
    params = QK_NORM_ROPE_PARAMS

    def words(self) -> str:
        cs = f"{self.cache_dtype} cache" if self.cache_dtype else f"on the fly {self.scaling}"
        return (f"qk_norm_rope {self.dtype} weights {self.weight_dtype} head {self.head_dim} "
                f"rotary {self.rotary_dim} heads {self.num_q_heads}/{self.num_k_heads} "
                f"{'neox' if self.neox else 'gptj'} {cs} positions {self.index_dtype} "
                f"vec {self.vec} lanes {self.lanes}"
                f"{' cos/sin in registers' if self.cos_sin_in_regs else ''}")

    def prelude(self) -> str:
        lines = [
            f"// rope_jit specialization: {self.words()}",
            f"typedef {C_TYPE[self.dtype]} scalar_t;",
            f"typedef {C_TYPE[self.weight_dtype]} weight_t;",
            f"typedef {C_TYPE[self.cache_dtype or 'float32']} cache_t;",
            f"typedef {C_TYPE[self.index_dtype]} index_t;",
            f"constexpr int HEAD_DIM = {self.head_dim}, ROT_DIM = {self.rotary_dim};",
            f"constexpr int NUM_Q_HEADS = {self.num_q_heads}, NUM_K_HEADS = {self.num_k_heads};",
            f"constexpr int VEC = {self.vec}, LANES = {self.lanes};",
            f"constexpr bool COS_SIN_IN_REGS = {c_bool(self.cos_sin_in_regs)};",
            f"constexpr bool NEOX = {c_bool(self.neox)};",
            f"constexpr bool COS_SIN_FROM_CACHE = {c_bool(self.cache_dtype is not None)};",
            f"constexpr int SCALING = SCALING_{self.scaling.upper()};",
        ]
        return "\n".join(lines) + "\n" + self.params.c_decl

    def render(self) -> str:
        return render_source(self.prelude(), "rope_chunk.cuh", "qk_norm_rope.cu")
