"""The math of docs/math.md in NumPy float64: the oracle every test compares against.

Written for clarity, not speed, and independently of the kernels' formulation (the
Llama 3.1 frequencies, for instance, follow transformers' piecewise definition while the
kernel uses an equivalent clamped blend).
"""

from __future__ import annotations

import math

import numpy as np


def inv_frequencies(rotary_dim: int, base: float = 10000.0, rope_scale: float = 1.0,
                    llama31: tuple | None = None) -> np.ndarray:
    """inv_freq[i] = base ** (-2i / rotary_dim), i < rotary_dim/2, float64.

    llama31=None: divided by rope_scale (linear scaling, FlashInfer's rope_scale).
    llama31=(low_freq_factor, high_freq_factor, old_context_len): Llama 3.1 smoothing with
    factor rope_scale, as transformers' `_compute_llama3_parameters`.
    """
    inv = 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if llama31 is None:
        return inv / rope_scale
    low, high, old_ctx = llama31
    factor = rope_scale
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out)


def cos_sin(positions, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of positions x inv_freq: shape positions.shape + (rotary_dim/2,)."""
    angle = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    return np.cos(angle), np.sin(angle)


def cos_sin_cache(rotary_dim: int, max_position: int, inv_freq: np.ndarray | None = None,
                  base: float = 10000.0) -> np.ndarray:
    """vLLM layout [max_position, rotary_dim]: cos of the R/2 angles, then their sin (float64)."""
    if inv_freq is None:
        inv_freq = inv_frequencies(rotary_dim, base)
    c, s = cos_sin(np.arange(max_position), inv_freq)
    return np.concatenate([c, s], axis=-1)


def cos_sin_from_cache(cache, positions) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a cache (any dtype; values taken exactly) at positions."""
    cache = np.asarray(cache).astype(np.float64)
    half = cache.shape[-1] // 2
    rows = cache[np.asarray(positions)]
    return rows[..., :half], rows[..., half:]


def mrope_rows(mrope_section, interleaved: bool = False) -> np.ndarray:
    """The position row (0 temporal, 1 height, 2 width) each of the sum(mrope_section)
    frequencies takes its angle from. Qwen2-VL: consecutive sections; Qwen3-VL
    (interleaved): frequency j % 3 == 1 is height and j % 3 == 2 width while j is under 3x
    that section, everything else temporal (transformers' recomposition_frequencies)."""
    t, h, w = (int(n) for n in mrope_section)
    if not interleaved:
        return np.repeat(np.arange(3), [t, h, w])
    rows = np.zeros(t + h + w, dtype=np.int64)
    rows[1:3 * h:3] = 1
    rows[2:3 * w:3] = 2
    return rows


def mrope_select(per_row: np.ndarray, mrope_section, interleaved: bool = False) -> np.ndarray:
    """[3, token dims..., R/2] values computed at each position row -> [token dims..., R/2]
    taking frequency j from row mrope_rows(...)[j]."""
    rows = mrope_rows(mrope_section, interleaved)
    per_row = np.asarray(per_row)
    return np.take_along_axis(per_row, np.broadcast_to(rows, per_row.shape[1:])[None], 0)[0]


def apply_rotary(x, cos: np.ndarray, sin: np.ndarray, is_neox: bool) -> np.ndarray:
    """Rotate x [token dims..., heads, head_size] by cos/sin [token dims..., rotary_dim/2].

    Elements past rotary_dim pass through. Returns float64.
    """
    x = np.asarray(x).astype(np.float64)
    half = cos.shape[-1]
    rot = 2 * half
    c, s = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    out = x.copy()
    if is_neox:
        x1, x2 = x[..., :half], x[..., half:rot]
        out[..., :half] = x1 * c - x2 * s
        out[..., half:rot] = x2 * c + x1 * s
    else:
        x1, x2 = x[..., 0:rot:2], x[..., 1:rot:2]
        out[..., 0:rot:2] = x1 * c - x2 * s
        out[..., 1:rot:2] = x2 * c + x1 * s
    return out


def neox_order(x, rotary_dim: int) -> np.ndarray:
    """x with the GPT-J pairs of its rotated part, (x[2i], x[2i+1]), moved to NeoX
    positions (i, i + R/2): DeepSeek's interleaved RoPE writes its outputs so. Elements
    past rotary_dim stay."""
    x = np.asarray(x)
    out = x.copy()
    half = rotary_dim // 2
    out[..., :half] = x[..., 0:rotary_dim:2]
    out[..., half:rotary_dim] = x[..., 1:rotary_dim:2]
    return out


def gptj_order(x, rotary_dim: int) -> np.ndarray:
    """The inverse of neox_order: NeoX pairs (x[i], x[i + R/2]) moved to (2i, 2i+1)."""
    x = np.asarray(x)
    out = x.copy()
    half = rotary_dim // 2
    out[..., 0:rotary_dim:2] = x[..., :half]
    out[..., 1:rotary_dim:2] = x[..., half:rotary_dim]
    return out


def positions_from_offsets(indptr, offsets, nnz=None) -> np.ndarray:
    """Token j of request b sits at offsets[b] + (j - indptr[b]) (docs/conventions.md).

    One entry per token 0 .. nnz-1 (nnz defaults to indptr[-1]); tokens no request owns
    get -1. Same dtype as offsets.
    """
    indptr = np.asarray(indptr).astype(np.int64)
    offsets = np.asarray(offsets)
    n = int(indptr[-1]) if nnz is None else int(nnz)
    out = np.full(n, -1, dtype=np.int64)
    for b in range(len(offsets)):
        lo, hi = int(indptr[b]), min(int(indptr[b + 1]), n)
        if hi > lo:
            out[lo:hi] = int(offsets[b]) + np.arange(hi - lo)
    return out.astype(offsets.dtype)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values once, to nearest even, to float16, bfloat16 or float32.

    NumPy rounds float64 -> float16/float32 directly; bfloat16 is rounded here on the
    mantissa (8 significant bits) so it is not rounded twice through float32.
    """
    x = np.asarray(x, dtype=np.float64)
    if dtype == "bfloat16":
        import ml_dtypes

        m, e = np.frexp(x)                  # x = m * 2**e, 0.5 <= |m| < 1
        y = np.ldexp(np.round(m * 256.0) / 256.0, e)  # exact in bf16's 8 bits
        sub = np.abs(x) < 2.0 ** -126         # subnormals: a fixed grid of 2**-133
        y = np.where(sub, np.round(x * 2.0 ** 133) * 2.0 ** -133, y)
        return y.astype(np.float32).astype(ml_dtypes.bfloat16)
    return x.astype(np.dtype(dtype))


def ulp(y: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of the `dtype` grid at |y| (float64), subnormals included."""
    mant, min_exp = {"float16": (10, -14), "bfloat16": (7, -126), "float32": (23, -126)}[dtype]
    a = np.abs(np.asarray(y, dtype=np.float64))
    e = np.where(a > 0, np.frexp(a)[1] - 1, min_exp)   # exact floor(log2(a))
    e = np.maximum(e, min_exp)
    return np.ldexp(1.0, (e - mant).astype(np.int64))


def mrope_cos_sin(cache, positions, mrope_section, mrope_interleaved: bool = False):
    """float64 (cos, sin) ``[num_tokens, R/2]`` of multimodal positions ``[3, num_tokens]``
    read from a cache (any dtype, values taken exactly): frequency j reads the cache row of
    ``positions[mrope_rows(...)[j], t]`` (t, h, w sections in chunks, or interleaved). The
    reference the mRoPE kernels are tested against."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[0] != 3:
        raise ValueError(f"positions: expected shape [3, num_tokens], got {list(positions.shape)}")
    half = np.asarray(cache).shape[-1] // 2
    if sum(int(n) for n in mrope_section) != half:
        raise ValueError(f"mrope_section: {list(mrope_section)} sums to "
                         f"{sum(int(n) for n in mrope_section)}, the cache has {half} frequencies")
    c3, s3 = cos_sin_from_cache(cache, positions)  # [3, T, R/2]
    return (mrope_select(c3, mrope_section, mrope_interleaved),
            mrope_select(s3, mrope_section, mrope_interleaved))


# ------------------------------------------------------------------ fused ops (float64)

# OCP FP8 formats: mantissa bits, exponent bias, largest finite value.
FP8_FORMATS = {"float8_e4m3fn": (3, 7, 448.0), "float8_e5m2": (2, 15, 57344.0)}


def _fp8_exponent(a: np.ndarray, dtype: str) -> np.ndarray:
    """The binade of |a| on the FP8 grid: floor(log2 |a|), at least the smallest normal's."""
    m, bias, _ = FP8_FORMATS[dtype]
    return np.maximum(np.where(a > 0, np.frexp(a)[1] - 1, 1 - bias), 1 - bias)


def fp8_round(x, dtype: str) -> np.ndarray:
    """float64 values rounded once, to nearest even, to the FP8 grid of `dtype`, saturated
    to the largest finite value (what PTX cvt.rn.satfinite does; NaN stays NaN). Returns
    the rounded values as float64."""
    m, _, top = FP8_FORMATS[dtype]
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    with np.errstate(invalid="ignore", over="ignore"):
        quantum = np.ldexp(1.0, (_fp8_exponent(np.where(np.isfinite(a), a, top), dtype) - m))
        r = np.minimum(np.rint(a / quantum) * quantum, top)
    return np.where(np.isnan(x), np.nan, np.copysign(r, x))


def fp8_ulp(y, dtype: str) -> np.ndarray:
    """Spacing of the FP8 grid at |y| (the largest finite value's for |y| past it)."""
    m, _, top = FP8_FORMATS[dtype]
    a = np.minimum(np.abs(np.asarray(y, dtype=np.float64)), top)
    return np.ldexp(1.0, (_fp8_exponent(a, dtype) - m))


def rope_quantize(q_rope, k_rope, q_nope, k_nope, cos, sin, is_neox: bool, quant_scale_q=1.0,
                  quant_scale_kv=1.0) -> tuple:
    """FlashInfer's rope_quantize_fp8 before the FP8 rounding: (q_rope, k_rope, q_nope,
    k_nope) rotated (the rope parts) and scaled, float64. q_* ``[tokens, heads, dim]``;
    k_* ``[tokens, heads, dim]`` or MLA's ``[tokens, dim]``; cos/sin ``[tokens, R/2]``;
    a nope part may be None (then None is returned for it)."""
    def rotate(x):
        x = np.asarray(x).astype(np.float64)
        return apply_rotary(x[:, None, :] if x.ndim == 2 else x, cos, sin, is_neox).reshape(x.shape)

    def scaled(x, s):
        return None if x is None else np.asarray(x).astype(np.float64) * s

    return (rotate(q_rope) * quant_scale_q, rotate(k_rope) * quant_scale_kv,
            scaled(q_nope, quant_scale_q), scaled(k_nope, quant_scale_kv))


def paged_locations(batch_indices, positions, kv_indptr, kv_indices, page_size: int) -> tuple:
    """FlashInfer's paged-append addressing: (page, entry) of each token, -1 for both where
    the token is not written (batch index < 0: CUDA-graph padding). Token i of request
    b = batch_indices[i] at position p = positions[i] goes to page kv_indices[kv_indptr[b]
    + p // page_size], entry p % page_size."""
    b = np.asarray(batch_indices).astype(np.int64)
    p = np.asarray(positions).astype(np.int64)
    indptr = np.asarray(kv_indptr).astype(np.int64)
    indices = np.asarray(kv_indices).astype(np.int64)
    pages = np.full(b.shape, -1, dtype=np.int64)
    entries = np.full(b.shape, -1, dtype=np.int64)
    for i in range(b.shape[0]):
        if b[i] >= 0:
            pages[i] = indices[indptr[b[i]] + p[i] // page_size]
            entries[i] = p[i] % page_size
    return pages, entries


def slot_locations(slot_mapping, block_size: int, num_tokens: int) -> tuple:
    """vLLM's slot_mapping addressing: (block, entry) of each of num_tokens tokens, -1 for
    both where it is not cached (a negative slot, or a token past the mapping)."""
    slots = np.full(num_tokens, -1, dtype=np.int64)
    given = np.asarray(slot_mapping).astype(np.int64)[:num_tokens]
    slots[:given.shape[0]] = given
    cached = slots >= 0
    return (np.where(cached, slots // block_size, -1), np.where(cached, slots % block_size, -1))


def qk_norm_rope(qkv, num_heads_q: int, num_heads_k: int, head_dim: int, eps: float, q_weight,
                 k_weight, cos, sin, is_neox: bool) -> np.ndarray:
    """vLLM's fused_qk_norm_rope in float64: every q head x becomes
    x / sqrt(mean(x^2) + eps) * q_weight (k heads: k_weight), then its first 2 * R/2
    elements are rotated by cos/sin ``[tokens, R/2]``; v heads unchanged. qkv
    ``[tokens, (hq + hk + hv) * head_dim]``; returns the same shape, float64."""
    x = np.asarray(qkv).astype(np.float64)
    heads = x.reshape(x.shape[0], -1, head_dim).copy()
    hq, hk = num_heads_q, num_heads_k

    def norm(h, w):
        rms = np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)
        return h / rms * np.asarray(w).astype(np.float64)

    heads[:, :hq] = apply_rotary(norm(heads[:, :hq], q_weight), cos, sin, is_neox)
    heads[:, hq:hq + hk] = apply_rotary(norm(heads[:, hq:hq + hk], k_weight), cos, sin, is_neox)
    return heads.reshape(x.shape)
