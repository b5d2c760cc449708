"""RoPE scaling variants: inverse frequencies, attention factor and cache layout of every
HuggingFace ``rope_type`` (and vLLM's ``deepseek_yarn``), in NumPy float64.

:func:`resolve_rope_scaling` turns a HuggingFace-style dict (a
``rope_scaling`` of transformers 4.x or a ``rope_parameters`` of transformers 5.x, or
vLLM's ``rope_scaling`` argument of ``get_rope``) into a frozen :class:`RopeScaling` that
holds everything a cache builder or an on-the-fly kernel needs, with the formulas of
transformers' ``modeling_rope_utils`` (``ROPE_INIT_FUNCTIONS``) computed in float64 instead
of float32, and the cache layouts of vLLM's rotary embedding classes:

============== ============================================= =================================
rope_type      frequencies ``inv_freq[i]``, i < R/2           cache rows (``cache_length``)
============== ============================================= =================================
default        ``base ** (-2i/R)``                            max_position
linear         default / factor                               max(M, ceil(M * factor))
dynamic        default with base' = base * (factor*L/M -      max(max_position, L)
               (factor-1)) ** (R/(R-2)), L = max(seq_len, M)
yarn           interp*(1-mask) + extrap*mask (see ``low``)    max(ceil(orig*factor), max_pos)
deepseek_yarn  yarn, mask * extrapolation_factor              max(ceil(orig*factor), max_pos)
llama3         piecewise smoothing (transformers' bands)      max_position
longrope       default / short_factor[i] or / long_factor[i]  orig + max_position (two tables)
proportional   ``base ** (-2i/head_dim)`` for i < angles,     max_position
               then 0 (identity pairs); all / factor
============== ============================================= =================================

(R the rotary dim, M = max_position, orig = original_max_position_embeddings.) Every cos
and sin is multiplied by ``attention_factor`` (YaRN's mscale, LongRoPE's scaling; 1 for the
others). With ``mrope_section`` (Qwen2-VL / Qwen3-VL multimodal RoPE) the cache has
``4 * max_position`` rows at least, as vLLM's ``MRotaryEmbedding``.

Aliases: ``type`` for ``rope_type`` (older configs), ``"mrope"`` for ``"default"``
(Qwen2-VL's original config), ``"su"`` for ``"longrope"`` (early Phi-3 configs).

Nothing here imports torch, CuPy or transformers.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from functools import lru_cache
from typing import Any, Mapping, NamedTuple

import numpy as np

from .arrays import framework_of
from .dtypes import FLOAT_DTYPES, dtype_name, numpy_dtype, round_to

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "deepseek_yarn", "llama3", "longrope",
              "proportional")
_ALIASES = {"mrope": "default", "su": "longrope"}

# Every key some variant reads (HuggingFace's and vLLM's names). Keys outside this set are
# reported with a warning, so a misspelled parameter does not silently become its
# default (transformers logs the same); keys of another variant are ignored silently,
# since real configs carry them (e.g. "factor" next to rope_type "default").
_KNOWN_KEYS = frozenset({
    "rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
    "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "truncate", "extrapolation_factor", "attn_factor", "low_freq_factor",
    "high_freq_factor", "short_factor", "long_factor", "short_mscale", "long_mscale",
    "mrope_section", "mrope_interleaved", "alpha",
})

_CHUNK_ROWS = 8192  # cache rows computed per float64 block: bounds the temporary memory


@dataclass(frozen=True, eq=False)
class RopeScaling:
    """A resolved RoPE variant. Build it with :func:`resolve_rope_scaling`.

    Common fields:

    * ``rope_type``: canonical name, one of :data:`ROPE_TYPES`.
    * ``rotary_dim``: R, the width of a cache row (cos of R/2 angles, then their sin),
      after ``partial_rotary_factor``. For ``proportional`` it is the whole head: the pairs
      past the rotated angles get frequency 0 (cos 1, sin 0).
    * ``base``: rope_theta (for ``dynamic``, the adjusted base when ``seq_len`` grew past
      ``max_position``; ``original_base`` keeps the configured one).
    * ``inv_freq``: float64 ``[R/2]``, read-only. The angle of position p is
      ``p * inv_freq[i]``. For ``longrope`` it is ``short_inv_freq`` or ``long_inv_freq``
      according to ``seq_len`` (transformers' rule: long when seq_len > original).
    * ``attention_factor``: multiplies every cos and sin.
    * ``cache_length``: rows of the cos/sin cache; None when it depends on a
      ``max_position`` that was not given.
    * ``factor``: the scaling factor (1.0 when the variant has none).
    * ``params``: the normalized parameters, defaults filled in (read-only mapping).

    Variant fields (None where they do not apply):

    * yarn / deepseek_yarn: ``low``, ``high``: the ramp over frequency indices i, after
      ``truncate`` (floor/ceil), the clamp to [0, R-1] and transformers' widening of an
      empty ramp (``high = low + 0.001`` when equal), so that, exactly,
      ``mask[i] = (1 - clip((i - low) / (high - low), 0, 1)) * extrapolation_factor`` and
      ``inv_freq = inv_freq_interp * (1 - mask) + inv_freq_extrap * mask`` with
      ``inv_freq_extrap = base ** (-2i/R)``, ``inv_freq_interp = inv_freq_extrap / factor``.
      ``beta_fast``, ``beta_slow``, ``truncate``, ``extrapolation_factor`` (1 for yarn).
    * llama3: ``low_freq_factor``, ``high_freq_factor``, ``original_max_position``.
    * longrope: ``short_inv_freq``, ``long_inv_freq``, ``original_max_position``. The
      cache holds the short table in rows ``[0, original)`` and the long table in rows
      ``[original, original + max_position)``: a batch whose largest position is below
      ``original_max_position`` reads row p for position p; any other batch reads row
      ``original_max_position + p`` (``row_offset``).
    * dynamic: ``seq_len`` the sequence length the frequencies are for.
    * mrope: ``mrope_section`` (t, h, w frequency counts, summing to R/2),
      ``mrope_interleaved``.
    """

    rope_type: str
    rotary_dim: int
    base: float
    max_position: int | None
    inv_freq: np.ndarray
    attention_factor: float
    cache_length: int | None
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    original_base: float | None = None
    original_max_position: int | None = None
    low: float | None = None
    high: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    truncate: bool | None = None
    extrapolation_factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_inv_freq: np.ndarray | None = None
    long_inv_freq: np.ndarray | None = None
    seq_len: int | None = None
    mrope_section: tuple | None = None
    mrope_interleaved: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- values

    def row_offset(self, seq_len: int) -> int:
        """Cache row of position 0 for a batch of sequence length ``seq_len`` (its largest
        position + 1): ``original_max_position`` for longrope when seq_len exceeds it (the
        long table), else 0."""
        if self.rope_type == "longrope" and seq_len > self.original_max_position:
            return self.original_max_position
        return 0

    def cos_sin(self, positions, long: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """float64 cos and sin (times attention_factor) of ``positions`` (any shape; the
        result has one more dim of R/2). For longrope, ``long`` picks the table (default:
        the one ``inv_freq`` holds)."""
        inv = self.inv_freq
        if long is not None and self.rope_type == "longrope":
            inv = self.long_inv_freq if long else self.short_inv_freq
        angle = np.asarray(positions, dtype=np.float64)[..., None] * inv
        c, s = np.cos(angle), np.sin(angle)
        if self.attention_factor != 1.0:
            c, s = c * self.attention_factor, s * self.attention_factor
        return c, s

    def cos_sin_cache_float64(self) -> np.ndarray:
        """The whole cache in float64, ``[cache_length, rotary_dim]`` (tests and small
        caches; :meth:`cos_sin_cache` builds large ones block by block)."""
        return self._build(np.float64, lambda x: x)

    def cos_sin_cache(self, dtype="float32", like=None):
        """The cos/sin cache ``[cache_length, rotary_dim]`` (vLLM layout: cos of the R/2
        angles, then their sin), computed in float64 and rounded once to ``dtype``
        (float32, bfloat16 or float16; a name, NumPy or torch dtype). A host NumPy array,
        or with ``like=`` an array of like's framework on like's device."""
        name = dtype_name(dtype)
        if name not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype!r}")
        fw = framework_of(like, "like") if like is not None else None
        host = self._build(numpy_dtype(name), lambda x: round_to(x, name))
        return host if fw is None else fw.from_host(host, like)

    def _build(self, out_dtype, rounding) -> np.ndarray:
        if self.cache_length is None:
            raise ValueError("max_position: required to build the cache of rope_type "
                             f"{self.rope_type!r} (its row count depends on it)")
        half = self.rotary_dim // 2
        out = np.empty((self.cache_length, self.rotary_dim), dtype=out_dtype)
        if self.rope_type == "longrope":
            orig = self.original_max_position
            tables = [(0, orig, 0, self.short_inv_freq), (orig, self.cache_length, orig,
                                                          self.long_inv_freq)]
        else:
            tables = [(0, self.cache_length, 0, self.inv_freq)]
        for start, stop, first_position_row, inv in tables:
            for lo in range(start, stop, _CHUNK_ROWS):
                hi = min(lo + _CHUNK_ROWS, stop)
                angle = np.arange(lo - first_position_row, hi - first_position_row,
                                  dtype=np.float64)[:, None] * inv
                c, s = np.cos(angle), np.sin(angle)
                if self.attention_factor != 1.0:  # skipped at 1: the default cache stays bit-identical
                    c *= self.attention_factor
                    s *= self.attention_factor
                out[lo:hi, :half] = rounding(c)
                out[lo:hi, half:] = rounding(s)
        return out


# -------------------------------------------------------------------- parameter reading

def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class _Params:
    """A variant's dict and the context its init function reads: the rotated dim, the base,
    max_position and seq_len; ``names`` maps dict keys to the argument a user gave (the
    FlashInfer-style functions build the dict from ``rope_scale`` or ``old_context_len``)."""

    d: Mapping
    rope_type: str
    dim: int
    theta: float
    max_position: int | None
    seq_len: int | None
    names: Mapping = field(default_factory=dict)

    def where(self, key: str) -> str:
        return self.names.get(key, f"rope_scaling[{key!r}]")

    def number(self, key: str, *, default=None, required=False, positive=True, minimum=None,
               falsy_default=False) -> float | None:
        """d[key] as a finite float. falsy_default: None and 0 mean `default`
        (transformers' ``d.get(key) or default`` idiom, kept so results match it)."""
        v = self.d.get(key)
        if v is None or (falsy_default and _is_number(v) and v == 0):
            if required:
                raise ValueError(f"{self.where(key)}: required for rope_type {self.rope_type!r}")
            return default
        if not _is_number(v) or not math.isfinite(float(v)):
            raise ValueError(f"{self.where(key)}: expected a finite number for rope_type "
                             f"{self.rope_type!r}, got {v!r}")
        v = float(v)
        if positive and v <= 0:
            raise ValueError(f"{self.where(key)}: expected a number > 0, got {v!r}")
        if minimum is not None and v < minimum:
            raise ValueError(f"{self.where(key)}: expected a number >= {minimum}, got {v!r}")
        return v

    def required_factor(self) -> float:
        """``factor``, which transformers' validation requires for this type (a missing key
        is an error; an explicit None falls back to max_position / original, as
        transformers' YaRN computes it for DeepSeek-style configs)."""
        if "factor" not in self.d:
            raise ValueError(f"{self.where('factor')}: required for rope_type {self.rope_type!r}")
        return self.number("factor", required=self.d["factor"] is not None or self.rope_type
                           == "deepseek_yarn")

    def original_max(self) -> int:
        key = "original_max_position_embeddings"
        v = self.d.get(key)
        if v is None:
            raise ValueError(f"{self.where(key)}: required for rope_type {self.rope_type!r}")
        return _integer(v, self.where(key), minimum=1)

    def flag(self, key: str, default: bool) -> bool:
        v = self.d.get(key, default)
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{self.where(key)}: expected a bool, got {v!r}")
        return bool(v)

    def factor_from_max_position(self, factor: float | None) -> float:
        """The factor, else transformers' fallback max_position / original."""
        if factor is not None:
            return factor
        if not self.max_position:
            raise ValueError(f"{self.where('factor')}: required for rope_type "
                             f"{self.rope_type!r} (or give max_position: factor = "
                             "max_position / original)")
        return self.max_position / self.original_max()


def _integer(v, what: str, *, minimum: int) -> int:
    if _is_number(v) and math.isfinite(float(v)) and float(v).is_integer():
        v = int(v)
        if v >= minimum:
            return v
    raise ValueError(f"{what}: expected an integer >= {minimum}, got {v!r}")


def check_base(base, what: str) -> float:
    """rope_theta / base: a finite number > 0 and != 1 (the one check every entry uses)."""
    if not _is_number(base) or not (0 < float(base) < math.inf) or float(base) == 1:
        raise ValueError(f"{what}: expected a finite number > 0 and != 1, got {base!r}")
    return float(base)


def rope_type_of(rope_scaling: Mapping | None) -> str:
    """The canonical rope_type of a dict (``rope_type``, else ``type``, else default).
    Both keys with different values is an error (which one was meant?)."""
    if rope_scaling is None:
        return "default"
    t = rope_scaling.get("rope_type")
    legacy = rope_scaling.get("type")
    if t is None:
        t = "default" if legacy is None else legacy
    elif (legacy is not None and legacy != "mrope"  # Qwen2-VL's marker of mRoPE sections
          and _ALIASES.get(legacy, legacy) != _ALIASES.get(t, t)):
        raise ValueError(f"rope_scaling['type']: {legacy!r} conflicts with "
                         f"rope_scaling['rope_type'] = {t!r}; give one of them")
    if not isinstance(t, str):
        raise ValueError(f"rope_scaling['rope_type']: expected a string, got {t!r}")
    t = _ALIASES.get(t, t)
    if t not in ROPE_TYPES:
        hint = ""
        if t == "axial":
            hint = " ('axial' is the 2-D RoPE of vision encoders, not supported)"
        raise ValueError(f"rope_scaling['rope_type']: unknown RoPE type {t!r}{hint}; expected "
                         f"one of {', '.join(ROPE_TYPES)} (aliases: "
                         f"{', '.join(f'{a} = {b}' for a, b in _ALIASES.items())})")
    return t


def _mrope(p: _Params):
    section = p.d.get("mrope_section")
    interleaved = p.flag("mrope_interleaved", False)
    if section is None:
        if interleaved:
            raise ValueError(f"{p.where('mrope_interleaved')}: needs mrope_section")
        return None, False
    try:
        section = tuple(section)
    except TypeError:
        section = None
    if (section is None or len(section) != 3
            or not all(_is_number(s) and float(s).is_integer() and s >= 0 for s in section)):
        raise ValueError(f"{p.where('mrope_section')}: expected 3 non-negative integers "
                         f"(t, h, w frequency counts), got {p.d.get('mrope_section')!r}")
    section = tuple(int(s) for s in section)
    if sum(section) != p.dim // 2:
        raise ValueError(f"{p.where('mrope_section')}: the sections {list(section)} must sum "
                         f"to rotary_dim/2 = {p.dim // 2}, got {sum(section)}")
    if p.rope_type == "longrope":
        raise ValueError(f"{p.where('mrope_section')}: not supported with rope_type 'longrope' "
                         "(its cache holds two tables)")
    return section, bool(interleaved)


# -------------------------------------------------------------------- the formulas

def _default_inv(dim: int, base: float) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_max_position: int, truncate: bool = True) -> tuple[float, float]:
    """(low, high) frequency indices of YaRN's ramp: the index at which a frequency makes
    beta_fast (low) or beta_slow (high) rotations over the original context, floored /
    ceiled when truncate, clamped to [0, dim - 1] (transformers' and vLLM's bounds)."""
    def correction_dim(rotations):
        return (dim * math.log(original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return float(max(low, 0)), float(min(high, dim - 1))


def llama3_inv_freq(inv: np.ndarray, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: float) -> np.ndarray:
    """Llama 3.1 smoothing of default frequencies (transformers' piecewise bands):
    wavelengths above original/low_freq_factor are divided by factor, below
    original/high_freq_factor kept, and blended in between with
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    if high_freq_factor != low_freq_factor:
        smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    else:  # empty band (vLLM's guard): only wavelen == both edges is "medium"
        smooth = np.zeros_like(inv)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, (1 - smooth) * out / factor + smooth * out, out)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64)
    a.flags.writeable = False
    return a


def _ceil_mul(n: int, factor: float) -> int:
    # torch.arange(n * factor) has ceil(n * factor) elements: vLLM's cache lengths
    return int(math.ceil(n * factor))


# -------------------------------------------------------------------- one function per type

@dataclass
class _Variant:
    """What a rope_type's init function contributes to a RopeScaling."""

    inv: np.ndarray
    cache_length: int | None
    attention: float = 1.0
    factor: float = 1.0
    base: float | None = None           # dynamic NTK: the adjusted base
    fields: dict = field(default_factory=dict)   # RopeScaling's variant fields
    params: dict = field(default_factory=dict)   # normalized parameters, defaults filled in


def _init_default(p: _Params) -> _Variant:
    return _Variant(_default_inv(p.dim, p.theta), p.max_position)


def _init_linear(p: _Params) -> _Variant:
    factor = p.number("factor", required=True)
    length = None if p.max_position is None else max(p.max_position, _ceil_mul(p.max_position, factor))
    return _Variant(_default_inv(p.dim, p.theta) / factor, length, factor=factor)


def _init_dynamic(p: _Params) -> _Variant:
    if p.d.get("factor") is None and p.d.get("alpha") is not None:
        raise ValueError(f"{p.where('alpha')}: dynamic NTK-alpha scaling (vLLM's "
                         "DynamicNTKAlphaRotaryEmbedding) is not supported; give 'factor'")
    factor = p.number("factor", required=True)
    if p.max_position is None or p.max_position < 1:
        raise ValueError("max_position: required (>= 1) for rope_type 'dynamic' (it is the "
                         f"original context length), got {p.max_position!r}")
    if p.dim < 4:
        raise ValueError(f"rotary_dim: dynamic NTK needs a rotary dim >= 4 (exponent "
                         f"R/(R-2)), got {p.dim}")
    length = p.max_position if p.seq_len is None else max(p.seq_len, p.max_position)
    new_base = p.theta * ((factor * length / p.max_position) - (factor - 1)) ** (p.dim / (p.dim - 2))
    return _Variant(_default_inv(p.dim, new_base), length, factor=factor, base=new_base,
                    fields=dict(original_base=p.theta, seq_len=length))


def _init_yarn(p: _Params) -> _Variant:
    """transformers' YaRN, and vLLM's DeepseekScalingRotaryEmbedding (deepseek_yarn: ramp
    always truncated, mask scaled by extrapolation_factor, attention factor
    get(f, mscale) / get(f, mscale_all_dim) * attn_factor)."""
    deepseek = p.rope_type == "deepseek_yarn"
    orig = p.original_max()
    factor = p.factor_from_max_position(p.required_factor())
    # transformers reads beta_fast/beta_slow with `or`: 0 means the default too
    beta_fast = p.number("beta_fast", default=32.0, falsy_default=True)
    beta_slow = p.number("beta_slow", default=1.0, falsy_default=True)
    if beta_fast < beta_slow:
        raise ValueError(f"{p.where('beta_fast')}: must be >= beta_slow, got beta_fast="
                         f"{beta_fast!r}, beta_slow={beta_slow!r}")
    mscale = p.number("mscale", positive=False, minimum=0.0)
    mscale_all_dim = p.number("mscale_all_dim", positive=False, minimum=0.0)
    attn_factor = p.number("attn_factor", default=1.0)
    if deepseek:
        truncate = True
        extrapolation = p.number("extrapolation_factor", default=1.0, positive=False, minimum=0.0)
        attention = (yarn_get_mscale(factor, 1.0 if mscale is None else mscale)
                     / yarn_get_mscale(factor, 0.0 if mscale_all_dim is None else mscale_all_dim)
                     * attn_factor)
    else:
        truncate = p.flag("truncate", True)
        extrapolation = 1.0
        attention = p.number("attention_factor")
        if attention is None:
            if mscale and mscale_all_dim:  # transformers: both present and non-zero
                attention = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
            else:
                attention = yarn_get_mscale(factor)
        attention *= attn_factor  # vLLM's multiplier; 1 unless the dict has it
    low, high = yarn_correction_range(beta_fast, beta_slow, p.dim, p.theta, orig, truncate)
    if low == high:
        high = low + 0.001  # transformers' / vLLM's guard against an empty ramp
    i = np.arange(p.dim // 2, dtype=np.float64)
    extrap = _default_inv(p.dim, p.theta)
    mask = (1.0 - np.clip((i - low) / (high - low), 0.0, 1.0)) * extrapolation
    inv = extrap / factor * (1.0 - mask) + extrap * mask
    length = _ceil_mul(orig, factor)
    if p.max_position is not None:
        length = max(length, p.max_position)
    params = dict(original_max_position_embeddings=orig, beta_fast=beta_fast,
                  beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim,
                  attn_factor=attn_factor, truncate=truncate)
    if deepseek:
        params["extrapolation_factor"] = extrapolation
    return _Variant(inv, length, attention=attention, factor=factor, params=params,
                    fields=dict(original_max_position=orig, low=low, high=high,
                                beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate,
                                extrapolation_factor=extrapolation))


def _init_llama3(p: _Params) -> _Variant:
    factor = p.number("factor", required=True)
    lff = p.number("low_freq_factor", required=True)
    hff = p.number("high_freq_factor", required=True)
    if hff < lff:
        raise ValueError(f"{p.where('high_freq_factor')}: must be >= low_freq_factor, got "
                         f"high_freq_factor={hff!r}, low_freq_factor={lff!r}")
    orig = p.original_max()
    inv = llama3_inv_freq(_default_inv(p.dim, p.theta), factor, lff, hff, orig)
    return _Variant(inv, p.max_position, factor=factor,
                    fields=dict(original_max_position=orig, low_freq_factor=lff,
                                high_freq_factor=hff),
                    params=dict(low_freq_factor=lff, high_freq_factor=hff,
                                original_max_position_embeddings=orig))


def _init_longrope(p: _Params) -> _Variant:
    orig = p.original_max()
    half = p.dim // 2
    tables = {}
    for key in ("short_factor", "long_factor"):
        v = p.d.get(key)
        if v is None:
            raise ValueError(f"{p.where(key)}: required for rope_type 'longrope'")
        try:
            arr = np.array([float(x) if _is_number(x) else math.nan for x in v], dtype=np.float64)
        except TypeError:
            raise ValueError(f"{p.where(key)}: expected a list of {half} numbers, got {v!r}") from None
        if arr.shape != (half,):
            raise ValueError(f"{p.where(key)}: expected {half} numbers (rotary_dim/2), got {len(arr)}")
        if not (np.isfinite(arr).all() and (arr > 0).all()):
            raise ValueError(f"{p.where(key)}: expected finite numbers > 0, got {list(v)!r}")
        tables[key] = arr
    # transformers only warns about a missing factor here and uses max_position / original
    factor = p.factor_from_max_position(p.number("factor"))
    attention = p.number("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    # vLLM's per-table overrides (Phi-3-small configs); each defaults to the factor above
    short_ms = p.number("short_mscale", default=attention)
    long_ms = p.number("long_mscale", default=attention)
    if short_ms != long_ms:
        raise ValueError(f"rope_scaling['short_mscale'] = {short_ms!r} differs from "
                         f"['long_mscale'] = {long_ms!r}: one factor for both tables is "
                         "supported; give attention_factor")
    base_inv = _default_inv(p.dim, p.theta)
    short_inv = base_inv / tables["short_factor"]
    long_inv = base_inv / tables["long_factor"]
    use_long = p.seq_len is not None and p.seq_len > orig
    return _Variant(long_inv if use_long else short_inv,
                    None if p.max_position is None else orig + p.max_position,
                    attention=short_ms, factor=factor,
                    fields=dict(original_max_position=orig, short_inv_freq=_readonly(short_inv),
                                long_inv_freq=_readonly(long_inv), seq_len=p.seq_len),
                    params=dict(original_max_position_embeddings=orig,
                                short_factor=tuple(tables["short_factor"]),
                                long_factor=tuple(tables["long_factor"])))


def _init_proportional(p: _Params) -> _Variant:
    """transformers' proportional RoPE: the whole head rotates; int(prf * head_dim // 2)
    angles use exponents 2i/head_dim, the rest frequency 0."""
    factor = p.number("factor", default=1.0)
    prf = p.d.get("partial_rotary_factor") or 1.0
    angles = int(prf * p.dim // 2)
    inv = np.zeros(p.dim // 2, dtype=np.float64)
    inv[:angles] = 1.0 / p.theta ** (np.arange(0, 2 * angles, 2, dtype=np.float64) / p.dim)
    return _Variant(inv / factor, p.max_position, factor=factor)


# rope_type -> init function, as transformers' ROPE_INIT_FUNCTIONS (deepseek_yarn: vLLM's)
ROPE_INIT_FUNCTIONS = {
    "default": _init_default,
    "linear": _init_linear,
    "dynamic": _init_dynamic,
    "yarn": _init_yarn,
    "deepseek_yarn": _init_yarn,
    "llama3": _init_llama3,
    "longrope": _init_longrope,
    "proportional": _init_proportional,
}
assert set(ROPE_INIT_FUNCTIONS) == set(ROPE_TYPES)


def resolve_rope_scaling(rope_scaling: Mapping | None, rotary_dim: int, base: float | None = None,
                         max_position: int | None = None, *, seq_len: int | None = None,
                         names: Mapping | None = None) -> RopeScaling:
    """Resolve a HuggingFace-style RoPE dict into a :class:`RopeScaling`.

    rope_scaling: None (plain RoPE) or a dict with ``rope_type`` (or ``type``) and the
        variant's parameters, as transformers' ``rope_parameters`` / ``rope_scaling`` or
        vLLM's ``get_rope(rope_scaling=...)``. It may carry ``rope_theta`` and
        ``partial_rotary_factor`` (transformers 5 keeps them there).
    rotary_dim: the dimension ``partial_rotary_factor`` applies to (transformers' head_dim):
        the cache width is ``int(rotary_dim * partial_rotary_factor)``; without a
        partial_rotary_factor in the dict, simply the rotary dim.
    base: rope_theta. None: the dict's ``rope_theta``, else 10000. A value that differs
        from the dict's ``rope_theta`` raises ValueError.
    max_position: transformers' ``max_position_embeddings`` (vLLM's ``max_position``): the
        cache rows of most variants, dynamic NTK's original length, the long table of
        longrope, and the fallback factor ``max_position / original`` of yarn and longrope
        when the dict's factor is None.
    seq_len: the current sequence length (largest position + 1), for the variants that
        depend on it: dynamic (frequencies for max(seq_len, max_position)) and longrope
        (``inv_freq`` is the long table when seq_len > original). None: transformers'
        initial state (dynamic as default frequencies, longrope short).
    names: dict key -> the argument name errors should give (for dicts built from other
        arguments).

    Unknown rope_type, a missing or invalid parameter: ValueError naming it. The variant
    itself is computed by ``ROPE_INIT_FUNCTIONS[rope_type]``.
    """
    if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
        raise ValueError(f"rope_scaling: expected a dict or None, got {type(rope_scaling).__name__}")
    d = dict(rope_scaling or {})
    names = dict(names or {})
    rope_type = rope_type_of(d)
    unknown = sorted(k for k in d if k not in _KNOWN_KEYS)
    if unknown:
        warnings.warn(f"rope_scaling: ignoring unknown keys {unknown} for rope_type {rope_type!r}",
                      stacklevel=2)

    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral) or rotary_dim <= 0:
        raise ValueError(f"rotary_dim: expected a positive even integer, got {rotary_dim!r}")
    rotary_dim = int(rotary_dim)
    if max_position is not None:
        max_position = _integer(max_position, "max_position", minimum=0)
    if seq_len is not None:
        seq_len = _integer(seq_len, "seq_len", minimum=0)

    # rope_theta: the argument and the dict must agree when both are given
    theta_name = names.get("rope_theta", "rope_scaling['rope_theta']")
    if d.get("rope_theta") is not None:
        theta = check_base(d["rope_theta"], theta_name)
        if base is not None and check_base(base, "base") != theta:
            raise ValueError(f"base: {base!r} differs from {theta_name} = {theta!r}; "
                             "give one of them")
    else:
        theta = check_base(10000.0 if base is None else base, "base")

    prf = d.get("partial_rotary_factor", 1.0)
    if prf is None:
        prf = 1.0
    if not _is_number(prf) or not (0.0 < float(prf) <= 1.0):
        raise ValueError(f"rope_scaling['partial_rotary_factor']: expected a number in (0, 1], "
                         f"got {prf!r}")
    prf = float(prf)
    if rope_type == "proportional":
        dim = rotary_dim  # the whole head rotates; the pairs past prf's angles at frequency 0
        if dim % 2:
            raise ValueError(f"rotary_dim: expected a positive even integer, got {rotary_dim!r}")
    else:
        dim = int(rotary_dim * prf)
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary_dim: int(rotary_dim * partial_rotary_factor) = "
                             f"int({rotary_dim} * {prf}) = {dim}: expected a positive even integer")

    p = _Params(d, rope_type, dim, theta, max_position, seq_len, names)
    section, interleaved = _mrope(p)
    v = ROPE_INIT_FUNCTIONS[rope_type](p)

    params = {"rope_type": rope_type, "rope_theta": theta, "partial_rotary_factor": prf,
              **v.params, "factor": v.factor, "attention_factor": v.attention}
    cache_length = v.cache_length
    if section is not None:
        params.update(mrope_section=list(section), mrope_interleaved=interleaved)
        # vLLM's MRotaryEmbedding: Qwen2.5-VL video positions can exceed max_position
        if max_position is not None:
            cache_length = max(cache_length or 0, 4 * max_position)
    return RopeScaling(
        rope_type=rope_type, rotary_dim=dim, base=theta if v.base is None else v.base,
        max_position=max_position, inv_freq=_readonly(v.inv),
        attention_factor=float(v.attention), cache_length=cache_length, factor=float(v.factor),
        partial_rotary_factor=prf, mrope_section=section, mrope_interleaved=interleaved,
        params=MappingProxyType(params), **v.fields)


# -------------------------------------------------------------------- on the fly

class OnTheFly(NamedTuple):
    """What the on-the-fly kernel needs (kernels/rope.cu, fly_cos_sin): the compile-time
    variant and the five RopeParams frequency values."""

    variant: str             # one of specs.SCALINGS: linear, llama3, yarn
    freq_exponent: float     # inv_freq[j] = 2 ** (j * freq_exponent)
    inv_scale: float         # the scaled frequency is inv_freq * inv_scale
    ramp_a: float            # blend weight w = clamp(x * ramp_a + ramp_b, 0, 1)
    ramp_b: float
    attention_factor: float  # multiplies cos and sin


def _fly_linear(s: RopeScaling, exponent: float, names: Mapping) -> OnTheFly:
    return OnTheFly("linear", exponent, 1.0 / s.factor, 0.0, 0.0, 1.0)


def _fly_llama3(s: RopeScaling, exponent: float, names: Mapping) -> OnTheFly:
    """transformers' Llama 3 bands as a clamped blend over x = inv_freq:
    w = clamp((original / wavelen - low) / (high - low)), wavelen = 2 pi / inv_freq."""
    low, high = s.low_freq_factor, s.high_freq_factor
    if not high > low:
        raise ValueError(f"{names.get('high_freq_factor', 'high_freq_factor')}: must exceed "
                         f"low_freq_factor on the fly, got low_freq_factor={low!r}, "
                         f"high_freq_factor={high!r}")
    ramp_a = s.original_max_position / (2 * math.pi * high - 2 * math.pi * low)
    ramp_b = -1.0 / (high / low - 1.0)
    return OnTheFly("llama3", exponent, 1.0 / s.factor, ramp_a, ramp_b, 1.0)


def _fly_yarn(s: RopeScaling, exponent: float, names: Mapping) -> OnTheFly:
    """YaRN's ramp over x = j: the weight of the unscaled frequency is
    1 - clamp((j - low) / (high - low)) (low and high as resolved: ramp already widened)."""
    if s.extrapolation_factor != 1.0:
        raise ValueError(f"rope_scaling['extrapolation_factor']: {s.extrapolation_factor!r} is "
                         "not available on the fly (the kernel's YaRN ramp has none); use a "
                         "cos/sin cache (compute_cos_sin_cache or get_rope)")
    width = s.high - s.low
    return OnTheFly("yarn", exponent, 1.0 / s.factor, -1.0 / width, 1.0 + s.low / width,
                    s.attention_factor)


# rope_type -> its on-the-fly kernel values; the others need a cache
ON_THE_FLY_FUNCTIONS = {
    "default": _fly_linear,
    "linear": _fly_linear,
    "llama3": _fly_llama3,
    "yarn": _fly_yarn,
    "deepseek_yarn": _fly_yarn,
}


@lru_cache(maxsize=256)
def on_the_fly_values(frequencies: str, rotary_dim: int) -> OnTheFly:
    """The kernel values of a call's on-the-fly frequencies (``RopeCall.frequencies``, see
    ``rope_jit.call.frequencies_json``) at the kernel's rotary dim. ValueError naming the
    parameter for invalid values and for variants the kernel cannot compute (dynamic,
    longrope, proportional, deepseek_yarn with an extrapolation_factor, a
    partial_rotary_factor other than 1: use a cache)."""
    spec = json.loads(frequencies)
    rope_scaling, names = spec["rope_scaling"], spec["names"]
    rope_type = rope_type_of(rope_scaling)
    fly = ON_THE_FLY_FUNCTIONS.get(rope_type)
    if fly is None:
        raise ValueError(f"rope_scaling['rope_type']: {rope_type!r} is not available on the fly "
                         f"(on the fly: {', '.join(ON_THE_FLY_FUNCTIONS)}); use a cos/sin "
                         "cache (compute_cos_sin_cache or get_rope)")
    prf = rope_scaling.get("partial_rotary_factor")
    if prf is not None and prf != 1:
        raise ValueError(f"rope_scaling['partial_rotary_factor']: must be 1 on the fly (got "
                         f"{prf!r}); pass rotary_dim= instead")
    s = resolve_rope_scaling({**rope_scaling, "rope_theta": spec["rope_theta"]}, rotary_dim,
                             names={"rope_theta": "rope_theta", **names})
    return fly(s, -2.0 * math.log2(s.base) / rotary_dim, names)


def on_the_fly_variant(rope_scaling: Mapping, rotary_dim: int, rope_theta: float = 1e4) -> OnTheFly:
    """``on_the_fly_values`` of a HuggingFace-style dict (with FlashInfer's rope_theta
    rule: the dict's ``rope_theta`` wins over the default 1e4; another value must agree)."""
    from .call import frequencies_json

    return on_the_fly_values(frequencies_json(rope_theta, rope_scaling=rope_scaling), rotary_dim)
