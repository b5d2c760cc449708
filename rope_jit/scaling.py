"""RoPE scaling variants: inverse frequencies, attention factor and cache layout of every
HuggingFace ``rope_type`` (and vLLM's ``deepseek_yarn``), in NumPy float64.

One function, :func:`resolve_rope_scaling`, turns a HuggingFace-style dict (a
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

import math
import numbers
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from . import reference
from .arrays import FLOAT_DTYPES, dtype_name, framework_of, numpy_dtype

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
        c, s = reference.cos_sin(positions, inv)
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
        host = self._build(numpy_dtype(name), lambda x: reference.round_to(x, name))
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


def _where(key: str) -> str:
    return f"rope_scaling[{key!r}]"


def _number(d: Mapping, key: str, rope_type: str, *, default=None, required=False,
            positive=True, minimum=None, falsy_default=False) -> float | None:
    """d[key] as a finite float. falsy_default: None and 0 mean `default` (transformers'
    ``d.get(key) or default`` idiom, kept so results match it)."""
    v = d.get(key)
    if v is None or (falsy_default and _is_number(v) and v == 0):
        if required:
            raise ValueError(f"{_where(key)}: required for rope_type {rope_type!r}")
        return default
    if not _is_number(v) or not math.isfinite(float(v)):
        raise ValueError(f"{_where(key)}: expected a finite number for rope_type "
                         f"{rope_type!r}, got {v!r}")
    v = float(v)
    if positive and v <= 0:
        raise ValueError(f"{_where(key)}: expected a number > 0, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{_where(key)}: expected a number >= {minimum}, got {v!r}")
    return v


def _integer(v, what: str, *, minimum: int) -> int:
    if _is_number(v) and float(v).is_integer() and math.isfinite(float(v)):
        v = int(v)
        if v >= minimum:
            return v
    raise ValueError(f"{what}: expected an integer >= {minimum}, got {v!r}")


def _original_max(d: Mapping, rope_type: str) -> int:
    v = d.get("original_max_position_embeddings")
    if v is None:
        raise ValueError(f"{_where('original_max_position_embeddings')}: required for "
                         f"rope_type {rope_type!r}")
    return _integer(v, _where("original_max_position_embeddings"), minimum=1)


def _check_base(base, what: str) -> float:
    if not _is_number(base):
        raise ValueError(f"{what}: expected a finite number > 0 and != 1, got {base!r}")
    base = float(base)
    if not (0 < base < math.inf) or base == 1:
        raise ValueError(f"{what}: expected a finite number > 0 and != 1, got {base!r}")
    return base


def rope_type_of(rope_scaling: Mapping | None) -> str:
    """The canonical rope_type of a dict (``rope_type``, else ``type``, else default)."""
    if rope_scaling is None:
        return "default"
    t = rope_scaling.get("rope_type")
    if t is None:
        t = rope_scaling.get("type", "default")
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


def _mrope(d: Mapping, half: int, rope_type: str):
    section = d.get("mrope_section")
    interleaved = d.get("mrope_interleaved", False)
    if not isinstance(interleaved, (bool, np.bool_)):
        raise ValueError(f"{_where('mrope_interleaved')}: expected a bool, got {interleaved!r}")
    if section is None:
        if interleaved:
            raise ValueError(f"{_where('mrope_interleaved')}: needs mrope_section")
        return None, False
    try:
        section = tuple(section)
    except TypeError:
        section = None
    if (section is None or len(section) != 3
            or not all(_is_number(s) and float(s).is_integer() and s >= 0 for s in section)):
        raise ValueError(f"{_where('mrope_section')}: expected 3 non-negative integers "
                         f"(t, h, w frequency counts), got {d.get('mrope_section')!r}")
    section = tuple(int(s) for s in section)
    if sum(section) != half:
        raise ValueError(f"{_where('mrope_section')}: the sections {list(section)} must sum to "
                         f"rotary_dim/2 = {half}, got {sum(section)}")
    if rope_type == "longrope":
        raise ValueError(f"{_where('mrope_section')}: not supported with rope_type 'longrope' "
                         "(its cache holds two tables)")
    return section, bool(interleaved)


# -------------------------------------------------------------------- the formulas

def _default_inv(dim: int, base: float) -> np.ndarray:
    # Same expression as reference.inv_frequencies: the default cache stays bit-identical.
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


def _yarn_inv(dim, base, factor, low, high, extrapolation_factor):
    i = np.arange(dim // 2, dtype=np.float64)
    extrap = _default_inv(dim, base)
    interp = extrap / factor
    mask = (1.0 - np.clip((i - low) / (high - low), 0.0, 1.0)) * extrapolation_factor
    return interp * (1.0 - mask) + extrap * mask


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


def resolve_rope_scaling(rope_scaling: Mapping | None, rotary_dim: int, base: float | None = None,
                         max_position: int | None = None, *, seq_len: int | None = None,
                         ) -> RopeScaling:
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
        when the dict has no ``factor``.
    seq_len: the current sequence length (largest position + 1), for the variants that
        depend on it: dynamic (frequencies for max(seq_len, max_position)) and longrope
        (``inv_freq`` is the long table when seq_len > original). None: transformers'
        initial state (dynamic as default frequencies, longrope short).

    Unknown rope_type, a missing or invalid parameter: ValueError naming it.
    """
    if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
        raise ValueError(f"rope_scaling: expected a dict or None, got {type(rope_scaling).__name__}")
    d = dict(rope_scaling or {})
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
    if d.get("rope_theta") is not None:
        theta = _check_base(d["rope_theta"], _where("rope_theta"))
        if base is not None and _check_base(base, "base") != theta:
            raise ValueError(f"base: {base!r} differs from {_where('rope_theta')} = {theta!r}; "
                             "give one of them")
    else:
        theta = _check_base(10000.0 if base is None else base, "base")

    prf = d.get("partial_rotary_factor", 1.0)
    if prf is None:
        prf = 1.0
    if not _is_number(prf) or not (0.0 < float(prf) <= 1.0):
        raise ValueError(f"{_where('partial_rotary_factor')}: expected a number in (0, 1], got {prf!r}")
    prf = float(prf)

    if rope_type == "proportional":
        # transformers' _compute_proportional_rope_parameters: the whole head rotates;
        # int(prf * head_dim // 2) angles use exponents 2i/head_dim, the rest frequency 0.
        dim = rotary_dim
        if dim % 2:
            raise ValueError(f"rotary_dim: expected a positive even integer, got {rotary_dim!r}")
    else:
        dim = int(rotary_dim * prf)
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary_dim: int(rotary_dim * partial_rotary_factor) = "
                             f"int({rotary_dim} * {prf}) = {dim}: expected a positive even integer")
    half = dim // 2
    section, interleaved = _mrope(d, half, rope_type)

    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta,
                              "partial_rotary_factor": prf}
    fields: dict[str, Any] = {}
    out_base = theta  # RopeScaling.base: dynamic NTK replaces it
    attention = 1.0
    factor = 1.0
    cache_length = max_position

    if rope_type == "default":
        inv = _default_inv(dim, theta)

    elif rope_type == "linear":
        factor = _number(d, "factor", rope_type, required=True)
        inv = _default_inv(dim, theta) / factor
        cache_length = None if max_position is None else max(max_position, _ceil_mul(max_position, factor))

    elif rope_type == "dynamic":
        if d.get("factor") is None and d.get("alpha") is not None:
            raise ValueError(f"{_where('alpha')}: dynamic NTK-alpha scaling (vLLM's "
                             "DynamicNTKAlphaRotaryEmbedding) is not supported; give 'factor'")
        factor = _number(d, "factor", rope_type, required=True)
        if max_position is None or max_position < 1:
            raise ValueError("max_position: required (>= 1) for rope_type 'dynamic' (it is the "
                             f"original context length), got {max_position!r}")
        if dim < 4:
            raise ValueError(f"rotary_dim: dynamic NTK needs a rotary dim >= 4 (exponent "
                             f"R/(R-2)), got {dim}")
        length = max_position if seq_len is None else max(seq_len, max_position)
        new_base = theta * ((factor * length / max_position) - (factor - 1)) ** (dim / (dim - 2))
        inv = _default_inv(dim, new_base)
        fields.update(original_base=theta, seq_len=length)
        out_base = new_base
        cache_length = length

    elif rope_type in ("yarn", "deepseek_yarn"):
        orig = _original_max(d, rope_type)
        factor = _number(d, "factor", rope_type)
        if factor is None:
            if rope_type == "deepseek_yarn" or not max_position:
                raise ValueError(f"{_where('factor')}: required for rope_type {rope_type!r}"
                                 + ("" if rope_type == "deepseek_yarn" else
                                    " (or give max_position: factor = max_position / original)"))
            factor = max_position / orig  # transformers' fallback (DeepSeek-style configs)
        # transformers reads beta_fast/beta_slow with `or`: 0 means the default too
        beta_fast = _number(d, "beta_fast", rope_type, default=32.0, falsy_default=True)
        beta_slow = _number(d, "beta_slow", rope_type, default=1.0, falsy_default=True)
        if beta_fast < beta_slow:
            raise ValueError(f"{_where('beta_fast')}: must be >= beta_slow, got beta_fast="
                             f"{beta_fast!r}, beta_slow={beta_slow!r}")
        mscale = _number(d, "mscale", rope_type, positive=False, minimum=0.0)
        mscale_all_dim = _number(d, "mscale_all_dim", rope_type, positive=False, minimum=0.0)
        attn_factor = _number(d, "attn_factor", rope_type, default=1.0)
        if rope_type == "yarn":
            truncate = d.get("truncate", True)
            if not isinstance(truncate, (bool, np.bool_)):
                raise ValueError(f"{_where('truncate')}: expected a bool, got {truncate!r}")
            truncate = bool(truncate)
            extrapolation = 1.0
            given = _number(d, "attention_factor", rope_type)
            if given is not None:
                attention = given
            elif mscale and mscale_all_dim:  # transformers: both present and non-zero
                attention = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
            else:
                attention = yarn_get_mscale(factor)
            attention *= attn_factor  # vLLM's multiplier; 1 unless the dict has it
        else:
            # vLLM's DeepseekScalingRotaryEmbedding: ramp always truncated, mask scaled by
            # extrapolation_factor, mscale = get(f, mscale) / get(f, mscale_all_dim) * attn_factor
            truncate = True
            extrapolation = _number(d, "extrapolation_factor", rope_type, default=1.0,
                                    positive=False, minimum=0.0)
            attention = (yarn_get_mscale(factor, 1.0 if mscale is None else mscale)
                         / yarn_get_mscale(factor, 0.0 if mscale_all_dim is None else mscale_all_dim)
                         * attn_factor)
        low, high = yarn_correction_range(beta_fast, beta_slow, dim, theta, orig, truncate)
        if low == high:
            high = low + 0.001  # transformers' / vLLM's guard against an empty ramp
        inv = _yarn_inv(dim, theta, factor, low, high, extrapolation)
        fields.update(original_max_position=orig, low=low, high=high, beta_fast=beta_fast,
                      beta_slow=beta_slow, truncate=truncate, extrapolation_factor=extrapolation)
        params.update(original_max_position_embeddings=orig, beta_fast=beta_fast,
                      beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim,
                      attn_factor=attn_factor, truncate=truncate)
        if rope_type == "deepseek_yarn":
            params["extrapolation_factor"] = extrapolation
        cache_length = _ceil_mul(orig, factor)
        if max_position is not None:
            cache_length = max(cache_length, max_position)

    elif rope_type == "llama3":
        factor = _number(d, "factor", rope_type, required=True)
        lff = _number(d, "low_freq_factor", rope_type, required=True)
        hff = _number(d, "high_freq_factor", rope_type, required=True)
        if hff < lff:
            raise ValueError(f"{_where('high_freq_factor')}: must be >= low_freq_factor, got "
                             f"high_freq_factor={hff!r}, low_freq_factor={lff!r}")
        orig = _original_max(d, rope_type)
        inv = llama3_inv_freq(_default_inv(dim, theta), factor, lff, hff, orig)
        fields.update(original_max_position=orig, low_freq_factor=lff, high_freq_factor=hff)
        params.update(low_freq_factor=lff, high_freq_factor=hff,
                      original_max_position_embeddings=orig)

    elif rope_type == "longrope":
        orig = _original_max(d, rope_type)
        tables = {}
        for key in ("short_factor", "long_factor"):
            v = d.get(key)
            if v is None:
                raise ValueError(f"{_where(key)}: required for rope_type 'longrope'")
            try:
                arr = np.array([float(x) if _is_number(x) else math.nan for x in v], dtype=np.float64)
            except TypeError:
                raise ValueError(f"{_where(key)}: expected a list of {half} numbers, got {v!r}") from None
            if arr.shape != (half,):
                raise ValueError(f"{_where(key)}: expected {half} numbers (rotary_dim/2), got {len(arr)}")
            if not (np.isfinite(arr).all() and (arr > 0).all()):
                raise ValueError(f"{_where(key)}: expected finite numbers > 0, got {list(v)!r}")
            tables[key] = arr
        factor = _number(d, "factor", rope_type)
        if factor is None:
            if max_position is None:
                raise ValueError(f"{_where('factor')}: required for rope_type 'longrope' (or "
                                 "give max_position: factor = max_position / original)")
            factor = max_position / orig  # transformers (and vLLM's) Phi-3 rule
        given = _number(d, "attention_factor", rope_type)
        if given is not None:
            attention = given
        elif factor <= 1.0:
            attention = 1.0
        else:
            attention = math.sqrt(1 + math.log(factor) / math.log(orig))
        # vLLM's per-table overrides (Phi-3-small configs); each defaults to the factor above
        short_ms = _number(d, "short_mscale", rope_type, default=attention)
        long_ms = _number(d, "long_mscale", rope_type, default=attention)
        if short_ms != long_ms:
            raise ValueError(f"rope_scaling['short_mscale'] = {short_ms!r} differs from "
                             f"['long_mscale'] = {long_ms!r}: one factor for both tables is "
                             "supported; give attention_factor")
        attention = short_ms
        base_inv = _default_inv(dim, theta)
        short_inv = base_inv / tables["short_factor"]
        long_inv = base_inv / tables["long_factor"]
        use_long = seq_len is not None and seq_len > orig
        inv = long_inv if use_long else short_inv
        fields.update(original_max_position=orig, short_inv_freq=_readonly(short_inv),
                      long_inv_freq=_readonly(long_inv), seq_len=seq_len)
        params.update(original_max_position_embeddings=orig,
                      short_factor=tuple(tables["short_factor"]),
                      long_factor=tuple(tables["long_factor"]))
        cache_length = None if max_position is None else orig + max_position

    elif rope_type == "proportional":
        factor = _number(d, "factor", rope_type, default=1.0)
        angles = int(prf * dim // 2)
        inv = np.zeros(half, dtype=np.float64)
        inv[:angles] = 1.0 / theta ** (np.arange(0, 2 * angles, 2, dtype=np.float64) / dim)
        inv = inv / factor

    else:  # pragma: no cover - rope_type_of rejects everything else
        raise AssertionError(rope_type)

    params["factor"] = factor
    params["attention_factor"] = attention
    if section is not None:
        params.update(mrope_section=list(section), mrope_interleaved=interleaved)
        # vLLM's MRotaryEmbedding: Qwen2.5-VL video positions can exceed max_position
        if max_position is not None:
            cache_length = max(cache_length or 0, 4 * max_position)
    return RopeScaling(
        rope_type=rope_type, rotary_dim=dim,
        base=out_base,
        max_position=max_position, inv_freq=_readonly(inv), attention_factor=float(attention),
        cache_length=cache_length, factor=float(factor), partial_rotary_factor=prf,
        mrope_section=section, mrope_interleaved=interleaved,
        params=MappingProxyType(params), **fields)


# -------------------------------------------------------------------- on the fly

def on_the_fly_variant(rope_scaling: Mapping, rotary_dim: int, rope_theta: float = 1e4):
    """``(rope_theta, rope_scale, variant)`` for the on-the-fly kernels (rope_jit.launch):
    variant None (plain / linear: frequencies divided by rope_scale),
    ``("llama3", low_freq_factor, high_freq_factor, original_max_position)`` or
    ``("yarn", low, high, attention_factor)`` with rope_scale the factor.

    rotary_dim is the kernel's rotary dim, so the dict must not carry a
    partial_rotary_factor other than 1 (pass rotary_dim= instead). rope_theta: the dict's
    ``rope_theta`` wins over FlashInfer's default 1e4; any other value must agree with it.
    Variants that are not cheap in the kernel (dynamic, longrope, proportional) or that
    the kernel does not model (deepseek_yarn with extrapolation_factor != 1, mrope caches)
    raise ValueError: use a cache (``compute_cos_sin_cache`` / ``get_rope``)."""
    if not isinstance(rope_scaling, Mapping):
        raise ValueError(f"rope_scaling: expected a dict, got {type(rope_scaling).__name__}")
    rope_type = rope_type_of(rope_scaling)
    if rope_type not in ("default", "linear", "llama3", "yarn", "deepseek_yarn"):
        raise ValueError(f"rope_scaling['rope_type']: {rope_type!r} is not available on the fly "
                         "(on the fly: default, linear, llama3, yarn); use a cos/sin cache "
                         "(compute_cos_sin_cache or get_rope)")
    prf = rope_scaling.get("partial_rotary_factor")
    if prf is not None and prf != 1:
        raise ValueError(f"{_where('partial_rotary_factor')}: must be 1 on the fly (got {prf!r}); "
                         "pass rotary_dim= instead")
    base = rope_theta
    if rope_scaling.get("rope_theta") is not None and rope_theta == 1e4:
        base = None  # FlashInfer's default: the dict's value applies
    s = resolve_rope_scaling(rope_scaling, rotary_dim, base)
    if s.rope_type in ("default", "linear"):
        return (s.base, s.factor, None)
    if s.rope_type == "llama3":
        return (s.base, s.factor, ("llama3", s.low_freq_factor, s.high_freq_factor,
                                   s.original_max_position))
    if s.extrapolation_factor == 1.0:  # yarn, or deepseek_yarn without its extra knob
        return (s.base, s.factor, ("yarn", s.low, s.high, s.attention_factor))
    raise ValueError(f"rope_scaling['extrapolation_factor']: {s.extrapolation_factor!r} is not "
                     "available on the fly (the kernel's YaRN ramp has none); use a cos/sin cache "
                     "(compute_cos_sin_cache or get_rope)")


# -------------------------------------------------------------------- mRoPE

def mrope_cos_sin(cache, positions, mrope_section, mrope_interleaved: bool = False):
    """float64 (cos, sin) ``[num_tokens, R/2]`` of multimodal positions ``[3, num_tokens]``
    read from a cache (any dtype, values taken exactly): frequency j reads the cache row of
    ``positions[reference.mrope_rows(...)[j], t]`` (t, h, w sections in chunks, or
    interleaved). The reference the mRoPE kernels are tested against."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[0] != 3:
        raise ValueError(f"positions: expected shape [3, num_tokens], got {list(positions.shape)}")
    half = np.asarray(cache).shape[-1] // 2
    if sum(int(n) for n in mrope_section) != half:
        raise ValueError(f"mrope_section: {list(mrope_section)} sums to "
                         f"{sum(int(n) for n in mrope_section)}, the cache has {half} frequencies")
    c3, s3 = reference.cos_sin_from_cache(cache, positions)  # [3, T, R/2]
    return (reference.mrope_select(c3, mrope_section, mrope_interleaved),
            reference.mrope_select(s3, mrope_section, mrope_interleaved))
