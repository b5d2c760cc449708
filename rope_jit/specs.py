"""Specializations: what is a compile-time constant of a kernel, and the source it renders to.

A spec is a frozen dataclass; equal specs render identical source. The CUDA templates live
in ``kernels/`` (shipped inside the wheel as ``rope_jit/kernels``); rendering puts
``common.cuh``, a generated prelude of constants and the kernel file into one translation
unit that NVRTC compiles with no include path at all.

Kernel arguments travel as one struct passed by value. Its layout is declared once, here
(``ParamStruct``): the same field list renders the C struct and packs the bytes on the
host, so the two can never disagree. Every field is 8 bytes, so there is no padding.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .dtypes import C_TYPE

_HERE = Path(__file__).resolve().parent


def kernel_dir() -> Path:
    """kernels/ inside an installed wheel, or at the root of a source checkout."""
    for d in (_HERE / "kernels", _HERE.parent / "kernels"):
        if (d / "rope.cu").is_file():
            return d
    raise FileNotFoundError("rope_jit's CUDA templates (kernels/*.cu) are missing from the install")


@lru_cache(maxsize=None)
def template(name: str) -> str:
    return (kernel_dir() / name).read_text()


class ParamStruct:
    """A kernel-argument struct of 8-byte fields: 'q' is a long long (also pointers), 'd' a double.

    `pointers`: the names of the fields that change every call, contiguous in the struct (the
    warm path packs them alone, at ``pointer_offset``, in ``pointers`` order); every other
    field is fixed per plan, its values (``static_names`` order) packed once per plan buffer."""

    def __init__(self, c_name: str, fields_: list, pointers: tuple = ()):
        self.c_name = c_name
        self.names = tuple(n for n, _ in fields_)
        self.packer = struct.Struct("<" + "".join(code for _, code in fields_))
        ctype = {"q": "long long", "d": "double"}
        body = "".join(f"  {ctype[code]} {n};\n" for n, code in fields_)
        self.c_decl = f"struct {c_name} {{\n{body}}};\n"
        first = self.names.index(pointers[0]) if pointers else 0
        if self.names[first:first + len(pointers)] != tuple(pointers):
            raise ValueError(f"{c_name}: the pointer fields must be contiguous")
        self.pointers = tuple(pointers)
        self.pointer_offset = 8 * first
        self._lead = first
        self._pointers = len(pointers)
        self.static_names = self.names[:first] + self.names[first + len(pointers):]

    @property
    def size(self) -> int:
        return self.packer.size

    def values(self, pointers, static) -> tuple:
        """All field values in struct order, from the pointers' and the static values."""
        return (*static[:self._lead], *pointers, *static[self._lead:])

    def pack(self, pointers, static) -> bytes:
        return self.packer.pack(*self.values(pointers, static))

    def pack_static_into(self, buf, static) -> None:
        """The plan's fixed fields into buf (pointers zero until the call packs them)."""
        self.packer.pack_into(buf, 0, *self.values((0,) * self._pointers, static))


# Fields in the order the decode kernel needs them. A kernel reads its arguments through the
# constant cache, 64-byte lines that miss at the start of every launch: parameters spread
# over many lines cost a few serial misses on a one-token call's critical path (measured on
# the H200: a touch kernel reading 4 fields 1.27 us packed, 1.36-1.38 us one per line). So
# what the exit test and the position load need comes first (one line on sm_90, where the
# arguments start at c[0x0][0x210]), then the pointers (changing every call, packed alone by
# the warm path), then what the cos/sin row and q/k addressing read, the on-the-fly
# frequency values (rope_jit.scaling.OnTheFly), and last what only 2-D token dims, ragged
# batches, mRoPE and separate outputs read.
ROPE_LEAD = ("num_tokens", "num_q_heads", "num_k_heads", "pos_stride_inner")
ROPE_POINTERS = ("positions", "cache", "q", "k", "cos", "sin", "q_out", "k_out", "offsets")
ROPE_FREQ = ("freq_exponent", "inv_scale", "ramp_a", "ramp_b", "attention_factor")
ROPE_NEAR = ("max_position", "cache_stride", "q_stride_inner", "q_stride_head",
             "k_stride_inner", "k_stride_head", "rot_offset", "cos_stride_inner",
             "sin_stride_inner")
ROPE_FAR = (
    "inner_tokens", "batch_size", "q_stride_outer", "k_stride_outer",
    "qo_stride_outer", "qo_stride_inner", "qo_stride_head",
    "ko_stride_outer", "ko_stride_inner", "ko_stride_head",
    "pos_stride_outer", "pos_stride_row", "cos_stride_outer", "sin_stride_outer",
)
ROPE_PARAMS = ParamStruct(
    "RopeParams",
    [(n, "q") for n in ROPE_LEAD + ROPE_POINTERS + ROPE_NEAR] + [(n, "d") for n in ROPE_FREQ]
    + [(n, "q") for n in ROPE_FAR], pointers=ROPE_POINTERS)

POSITIONS_PARAMS = ParamStruct(
    "PositionsParams",
    [("indptr", "q"), ("offsets", "q"), ("out", "q"), ("num_tokens", "q"), ("batch_size", "q")])

def c_bool(b: bool) -> str:
    return "true" if b else "false"


# On-the-fly frequency variants (kernels/rope.cu, fly_cos_sin). "linear" covers plain RoPE
# (scale 1) and FlashInfer's rope_scale; a cache already holds whatever variant built it.
SCALINGS = ("linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    """Everything that is a compile-time constant of one RoPE kernel."""

    head_size: int
    rotary_dim: int
    dtype: str                 # q/k storage: float16 | bfloat16 | float32
    cache_dtype: str | None    # cos/sin cache (or per-token cos/sin) storage; None: on the fly
    index_dtype: str           # positions, or indptr + offsets: int32 | int64 (unused per token)
    indptr: bool               # positions come from indptr + offsets
    neox: bool                 # NeoX pairs (i, i+R/2); False: GPT-J pairs (2i, 2i+1)
    out_of_place: bool         # writes whole heads to separate outputs
    vec: int                   # q/k elements per vector access
    cache_vec: int             # cache elements per vector access
    head_batch: int            # heads whose loads are issued together
    prefetch: bool = True      # next head batch's loads in flight during the current one
    scaling: str = "linear"    # on-the-fly frequency variant, one of SCALINGS
    mrope_section: tuple | None = None  # (t, h, w) frequency counts: multimodal RoPE
    mrope_interleaved: bool = False     # Qwen3-VL's interleaved sections
    inverse: bool = False      # rotate by the negative angle (the backward of RoPE)
    min_blocks: int = 1        # __launch_bounds__(512, min_blocks): the register cap
    index_bits: int = 64       # offset arithmetic width: 32 when the planner proved it fits
    staging: int = 0           # q/k bytes in flight: 0 registers, 1 cp.async, 2 bulk copies
    stage_tokens: int = 1      # staged paths: tokens per tile
    stages: int = 1            # staged paths: pipeline depth
    pdl: bool = False          # programmatic dependent launch: prologue before griddepcontrol.wait
    token_cos_sin: bool = False  # cos/sin arrays per token (transformers, flash-attn), no positions
    out_neox: bool | None = None  # pair order of the outputs; None: as the input's (neox)
    few_tokens: bool = False   # the few-token code path: position first, paired rounding
    tokens_2d: bool = True     # token dims [batch, seq] (a division per token); False: [tokens]

    kernel_name = "rope_kernel"
    params = ROPE_PARAMS

    def words(self) -> str:
        """The spec in words, for logs and `rope-jit cache list`."""
        cs = (f"{self.cache_dtype} cos/sin per token" if self.token_cos_sin
              else f"{self.cache_dtype} cache" if self.cache_dtype
              else "on the fly" + ("" if self.scaling == "linear" else f" {self.scaling}"))
        if self.mrope_section:
            cs += (f" mrope {'interleaved ' if self.mrope_interleaved else ''}"
                   f"{'/'.join(map(str, self.mrope_section))}")
        pos = ("no positions" if self.token_cos_sin
               else f"indptr+offsets {self.index_dtype}" if self.indptr
               else f"positions {self.index_dtype}")
        order = ("" if self.out_neox in (None, self.neox)
                 else f" -> {'neox' if self.out_neox else 'gptj'} order")
        return (f"rope {self.dtype} head {self.head_size} rotary {self.rotary_dim} "
                f"{'neox' if self.neox else 'gptj'}{order} {cs} {pos} "
                f"{'out-of-place' if self.out_of_place else 'in-place'} "
                f"vec {self.vec}/{self.cache_vec} heads/batch {self.head_batch}"
                f"{' prefetch' if self.prefetch else ''}{' inverse' if self.inverse else ''}"
                f"{f' min-blocks {self.min_blocks}' if self.min_blocks != 1 else ''}"
                f"{' index32' if self.index_bits == 32 else ''}"
                f"{f' staged {self.staging}x{self.stage_tokens}x{self.stages}' if self.staging else ''}"
                f"{' pdl' if self.pdl else ''}{' few-token' if self.few_tokens else ''}"
                f"{'' if self.tokens_2d else ' 1d-tokens'}")

    def prelude(self) -> str:
        cache_t = C_TYPE[self.cache_dtype] if self.cache_dtype else "float"
        lines = [
            f"// rope_jit specialization: {self.words()}",
            f"typedef {C_TYPE[self.dtype]} scalar_t;",
            f"typedef {cache_t} cache_t;",
            f"typedef {C_TYPE[self.index_dtype]} index_t;",
            f"constexpr int HEAD_SIZE = {self.head_size};",
            f"constexpr int ROT_DIM = {self.rotary_dim};",
            f"constexpr int VEC = {self.vec};",
            f"constexpr int CACHE_VEC = {self.cache_vec};",
            f"constexpr int HEAD_BATCH = {self.head_batch};",
            f"constexpr bool PREFETCH = {c_bool(self.prefetch)};",
            f"constexpr bool NEOX = {c_bool(self.neox)};",
            f"constexpr bool OUT_NEOX = "
            f"{c_bool(self.neox if self.out_neox is None else self.out_neox)};",
            f"constexpr bool OUT_OF_PLACE = {c_bool(self.out_of_place)};",
            f"constexpr bool INDPTR = {c_bool(self.indptr)};",
            f"constexpr bool COS_SIN_FROM_CACHE = "
            f"{c_bool(self.cache_dtype is not None and not self.token_cos_sin)};",
            f"constexpr bool COS_SIN_PER_TOKEN = {c_bool(self.token_cos_sin)};",
            f"constexpr int SCALING = SCALING_{self.scaling.upper()};",
            f"constexpr bool MROPE = {c_bool(self.mrope_section is not None)};",
            f"constexpr bool MROPE_INTERLEAVED = {c_bool(self.mrope_interleaved)};",
            f"constexpr bool INVERSE = {c_bool(self.inverse)};",
            f"constexpr int MIN_BLOCKS = {self.min_blocks};",
        ]
        t, h, w = self.mrope_section or (0, 0, 0)
        lines.append(f"constexpr int MROPE_T = {t}, MROPE_H = {h}, MROPE_W = {w};")
        lines += [f"constexpr int INDEX_BITS = {self.index_bits};",
                  f"constexpr int STAGING = {self.staging};",
                  f"constexpr int STAGE_TOKENS = {self.stage_tokens};",
                  f"constexpr int STAGES = {self.stages};",
                  f"constexpr bool PDL = {c_bool(self.pdl)};",
                  f"constexpr bool FEW_TOKENS = {c_bool(self.few_tokens)};",
                  f"constexpr bool TOKENS_2D = {c_bool(self.tokens_2d)};"]
        return "\n".join(lines) + "\n" + self.params.c_decl

    def render(self) -> str:
        return render_source(self.prelude(), "rope.cu")


@dataclass(frozen=True)
class PositionsSpec:
    """positions_from_offsets on the device."""

    index_dtype: str

    kernel_name = "positions_kernel"
    params = POSITIONS_PARAMS

    def words(self) -> str:
        return f"positions_from_offsets {self.index_dtype}"

    def render(self) -> str:
        prelude = (f"// rope_jit specialization: {self.words()}\n"
                   f"typedef {C_TYPE[self.index_dtype]} index_t;\n" + self.params.c_decl)
        return render_source(prelude, "positions.cu")


def render_source(prelude: str, *kernel_files: str) -> str:
    """One translation unit: common.cuh, the spec's prelude, then its template files."""
    return "\n".join([template("common.cuh"), prelude, *map(template, kernel_files)])


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()
