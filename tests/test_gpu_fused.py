"""The fused RoPE functions on the GPU against the float64 reference (marker: gpu).

* FP8: each value within half an FP8 step of the reference value times its scale (one
  rounding to nearest even of a value exact up to fp32 arithmetic), saturated at the largest
  finite value; the FP8 conversion itself (hardware and the software path of older GPUs)
  bit for bit against the reference rounding.
* 16-bit results within one unit in the last place; parts that are only copied (nope, v,
  the pass-through of a key head) bit-exact where no quantization applies.
* Caches start as random bytes (guards): entries other than the appended ones stay
  byte-identical; padding tokens (batch_indices -1, slot -1, tokens past slot_mapping) are
  not written; outputs are poisoned (NaN bytes) so an element never written is seen.
* Fresh random inputs per case (seeded), CUDA-graph capture and replay, the caller's
  stream, foreign (CuPy) arrays, and a failing call that writes nothing.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

from fused_checks import (assert_fp8_close, assert_only_rows_written, assert_ulp_close,  # noqa: E402
                          head_magnitude, paged_batch, pair_magnitude, rows_at, slot_mapping)
from gpu_cases import TORCH_DTYPE, to_numpy64  # noqa: E402

FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
INT = {"int32": torch.int32, "int64": torch.int64}
MAX_POS = 4096
POISON = 0x7F  # an FP8 NaN (both formats) and a bf16/fp16 NaN as byte pairs 0x7F7F


def seed_of(case) -> int:
    """A seed that is the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(case).encode()) & 0xFFFF


def cuda_mask(mask: np.ndarray):
    return torch.as_tensor(mask, device="cuda")


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def rnd(shape, dtype, seed, scale=1.0):
    x = torch.randn(*shape, generator=_gen(seed), device="cuda") * scale
    return x.to(TORCH_DTYPE[dtype])


def poisoned(shape, dtype):
    t = torch.empty(*shape, dtype=FP8.get(dtype) or TORCH_DTYPE.get(dtype), device="cuda")
    t.view(torch.uint8).fill_(POISON)
    return t


def guarded(shape, dtype, seed):
    """A cache filled with random bytes: its untouched entries are checked byte for byte."""
    t = torch.empty(*shape, dtype=FP8.get(dtype) or TORCH_DTYPE.get(dtype) or torch.uint8,
                    device="cuda")
    t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, generator=_gen(seed),
                                            device="cuda", dtype=torch.uint8))
    return t


def decode(t, fmt=None) -> np.ndarray:
    """Exact float64 values of a tensor (a uint8 cache read as the FP8 format fmt)."""
    if t.dtype == torch.uint8:
        t = t.view(FP8[fmt])
    return t.float().double().cpu().numpy()


def check_values(got_t, ref, out_dtype, what, mag=None, fmt=None):
    """FP8 or 16-bit output against its float64 reference."""
    fmt = fmt or (out_dtype if out_dtype in FP8 else None)
    if fmt:
        assert_fp8_close(decode(got_t, fmt), ref, fmt, what, mag)
    else:
        assert_ulp_close(decode(got_t), ref, out_dtype, what, mag)


def positions(T, pos_dtype, seed):
    return torch.randint(0, MAX_POS, (T,), generator=_gen(seed), device="cuda").to(INT[pos_dtype])


def cos_sin_for(rot, pos, cache_dtype, like, *, theta=1e4, rope_scale=1.0):
    """(cos_sin_cache or None, float64 cos, sin at pos): from a cache of cache_dtype (the
    reference reads the same rounded values), or on the fly (exact float64)."""
    p = pos.cpu().numpy()
    if cache_dtype is None:
        return (None, *reference.cos_sin(p, reference.inv_frequencies(rot, theta, rope_scale)))
    cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, dtype=cache_dtype, like=like)
    return (cache, *reference.cos_sin_from_cache(to_numpy64(cache), p))


def rotated(x64, cos, sin, is_neox):
    """Reference rotation of [T, (H,) R] float64 rows."""
    return reference.apply_rotary(x64[:, None] if x64.ndim == 2 else x64, cos, sin,
                                  is_neox).reshape(x64.shape)


# ------------------------------------------------------------------ FP8 conversion itself

def test_fp8_conversion_is_the_reference_rounding_in_hardware_and_software():
    """from_float<fp8> (cvt.rn.satfinite on sm_89+), from_float2 (two at once) and the
    software rounding of older GPUs give the bits of reference.fp8_round, for every bf16
    value (subnormals, infinities, NaN), random floats and the exact midpoints (ties)."""
    cp = pytest.importorskip("cupy")
    from rope_jit.specs import template

    src = template("common.cuh") + r"""
    extern "C" __global__ void convert(const float* x, unsigned char* out, int n) {
      const int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i >= n) return;
      out[0 * n + i] = from_float<fp8_e4m3_t>(x[i]).bits;
      out[1 * n + i] = fp8_from_float_sw<3, 7, 0x7e>(x[i]);
      out[2 * n + i] = from_float<fp8_e5m2_t>(x[i]).bits;
      out[3 * n + i] = fp8_from_float_sw<2, 15, 0x7b>(x[i]);
      const int j = i ^ 1;  // the pair (i even, i + 1)
      if (j < n) {
        fp8_e4m3_t a4, b4; fp8_e5m2_t a5, b5;
        from_float2<fp8_e4m3_t>(x[i & ~1], x[i | 1], a4, b4);
        from_float2<fp8_e5m2_t>(x[i & ~1], x[i | 1], a5, b5);
        out[4 * n + i] = (i & 1) ? b4.bits : a4.bits;
        out[5 * n + i] = (i & 1) ? b5.bits : a5.bits;
      }
    }"""
    kernel = cp.RawModule(code=src, options=("-std=c++17",)).get_function("convert")
    rng = np.random.default_rng(0)
    bf16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint32) << 16
    mids = []
    for fmt in reference.FP8_FORMATS:
        grid = np.unique(np.arange(256, dtype=np.uint8).view(getattr(ml_dtypes, fmt)).astype(np.float64))
        grid = grid[np.isfinite(grid)]
        mids.append((grid[:-1] + grid[1:]) / 2)
    x = np.concatenate([bf16.view(np.float32),
                        (rng.normal(size=100_000) * 2.0 ** rng.integers(-20, 18, 100_000)).astype(np.float32),
                        *(m.astype(np.float32) for m in mids)]).astype(np.float32)
    n = x.size + (x.size & 1)
    x = np.resize(x, n)
    out = cp.zeros(6 * n, dtype=cp.uint8)
    kernel(((n + 255) // 256,), (256,), (cp.asarray(x), out, np.int32(n)))
    got = out.get().reshape(6, n)
    nan = np.isnan(x)
    for row, fmt in ((0, "float8_e4m3fn"), (2, "float8_e5m2")):
        want = reference.fp8_round(x.astype(np.float64), fmt).astype(np.float32).astype(
            getattr(ml_dtypes, fmt)).view(np.uint8)
        for r, how in ((row, "hardware"), (row + 1, "software"), (4 + row // 2, "pairs")):
            decoded = got[r].view(getattr(ml_dtypes, fmt)).astype(np.float64)
            assert np.isnan(decoded[nan]).all(), f"{fmt} {how}: NaN not kept"
            bad = (got[r] != want) & ~nan
            assert not bad.any(), (f"{fmt} {how}: {bad.sum()} values rounded differently, e.g. "
                                   f"{x[bad][:4]} -> {got[r][bad][:4]} (want {want[bad][:4]})")


# ------------------------------------------------------------------ rope_quantize_fp8

RQ_CASES = [
    # attention, heads q/k, rope, q nope, k nope, dtype, fmt, neox, cos/sin, pos, tokens, outputs
    ("gqa", 8, 2, 64, 64, 64, "bfloat16", "float8_e4m3fn", True, "float32", "int64", 77, "slices"),
    ("gqa", 8, 2, 128, 0, 0, "float16", "float8_e5m2", False, "bfloat16", "int32", 1, "new"),
    ("mla", 16, 1, 64, 128, 512, "bfloat16", "float8_e4m3fn", False, "float32", "int64", 300, "slices"),
    ("mla", 16, 1, 64, 512, 512, "float16", "float8_e4m3fn", True, "float16", "int32", 5, "new"),
    ("mha", 6, 6, 32, 96, 96, "bfloat16", "float8_e5m2", True, None, "int64", 129, "given"),
    ("gqa", 4, 1, 64, 32, 32, "bfloat16", "bfloat16", True, "float32", "int64", 40, "given"),
]


@pytest.mark.parametrize("case", RQ_CASES, ids=[f"{c[0]}-{c[6]}-{c[7]}-{'neox' if c[8] else 'gptj'}-"
                                                f"{c[9] or 'fly'}-T{c[11]}-{c[12]}" for c in RQ_CASES])
def test_rope_quantize_fp8(case):
    attn, hq, hk, rot, nq, nk, dtype, fmt, neox, cache_dtype, pos_dtype, T, outs = case
    seed = seed_of(case)
    mla = attn == "mla"
    q_in = rnd((T, hq, rot + nq), dtype, seed)
    k_in = rnd((T, rot + nk) if mla else (T, hk, rot + nk), dtype, seed + 1)
    k_in.view(-1)[::97] *= 300  # a few values past FP8's range: saturation
    q_rope, q_nope = q_in[..., :rot], (q_in[..., rot:] if nq else None)
    k_rope, k_nope = k_in[..., :rot], (k_in[..., rot:] if nk else None)
    pos = positions(T, pos_dtype, seed + 2)
    cache, cos, sin = cos_sin_for(rot, pos, cache_dtype, q_in, theta=5e5)
    sq, skv = 0.5, 2.0
    kw = dict(quant_scale_q=sq, quant_scale_kv=skv, quantize_dtype=None if outs == "given" else FP8.get(fmt, fmt))
    if cache is None:
        kw["rope_theta"] = 5e5
    qd = FP8.get(fmt) or TORCH_DTYPE[fmt]
    if outs == "slices":  # FlashInfer's own test: views of one output per tensor
        q_out, k_out = poisoned(q_in.shape, fmt), poisoned(k_in.shape, fmt)
        given = dict(q_rope_out=q_out[..., :rot], k_rope_out=k_out[..., :rot],
                     q_nope_out=q_out[..., rot:] if nq else None, k_nope_out=k_out[..., rot:] if nk else None)
    elif outs == "given":
        given = dict(q_rope_out=poisoned(q_rope.shape, fmt), k_rope_out=poisoned(k_rope.shape, fmt),
                     q_nope_out=poisoned(q_nope.shape, fmt) if nq else None,
                     k_nope_out=poisoned(k_nope.shape, fmt) if nk else None)
    else:
        given = {}
    fn = rope_jit.mla_rope_quantize_fp8 if mla else rope_jit.rope_quantize_fp8
    before = [t.clone() for t in (q_in, k_in)]
    res = fn(q_rope, k_rope, q_nope, k_nope, cache, pos, neox, **kw, **given)
    torch.cuda.synchronize()
    assert isinstance(res, tuple) and len(res) == 4
    for name, t, src in zip(("q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out"), res,
                            (q_rope, k_rope, q_nope, k_nope)):
        if name in given and given[name] is not None:
            assert t is given[name], name
        want_shape = tuple(src.shape) if src is not None else ((T, hq, 0) if name == "q_nope_out"
                                                               else (T, 0) if mla else (T, hk, 0))
        assert tuple(t.shape) == want_shape and t.dtype == qd, name
    assert all(torch.equal(a, b) for a, b in zip(before, (q_in, k_in))), "inputs changed"
    q64, k64 = to_numpy64(q_rope), to_numpy64(k_rope)
    ref = reference.rope_quantize(q64, k64, to_numpy64(q_nope) if nq else None,
                                  to_numpy64(k_nope) if nk else None, cos, sin, neox, sq, skv)
    check_values(res[0], ref[0], fmt, "q_rope_out", sq * pair_magnitude(q64, neox))
    check_values(res[1], ref[1], fmt, "k_rope_out", skv * pair_magnitude(k64, neox))
    if nq:
        check_values(res[2], ref[2], fmt, "q_nope_out")
    if nk:
        check_values(res[3], ref[3], fmt, "k_nope_out")


def test_rope_quantize_zero_tokens_and_cupy_arrays():
    cp = pytest.importorskip("cupy")
    q, k = rnd((0, 4, 64), "bfloat16", 1), rnd((0, 64), "bfloat16", 2)
    outs = rope_jit.rope_quantize_fp8(q, k, None, None, None, torch.zeros(0, dtype=torch.int64, device="cuda"))
    assert [tuple(o.shape) for o in outs] == [(0, 4, 64), (0, 64), (0, 4, 0), (0, 0)]
    qc = cp.asarray(rnd((9, 4, 64), "float16", 3))
    kc = cp.asarray(rnd((9, 64), "float16", 4))
    pos = cp.arange(9, dtype=cp.int32)
    outs = rope_jit.rope_quantize_fp8(qc, kc, None, None, None, pos, False)
    assert all(isinstance(o, cp.ndarray) for o in outs)
    assert outs[0].dtype == cp.uint8  # CuPy has no float8 dtype: the FP8 bits
    cos, sin = reference.cos_sin(np.arange(9), reference.inv_frequencies(64))
    import ml_dtypes

    got = cp.asnumpy(outs[0]).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    ref = reference.rope_quantize(cp.asnumpy(qc), cp.asnumpy(kc), None, None, cos, sin, False)[0]
    assert_fp8_close(got, ref, "float8_e4m3fn", "cupy q_rope_out",
                     pair_magnitude(cp.asnumpy(qc).astype(np.float64), False))


# ------------------------------------------------------------------ paged append (FlashInfer)

PAGED_CASES = [
    # attention, layout, page size, dtype, cache dtype, neox, heads q/k, rope, nope, tables, cos/sin
    ("gqa", "NHD", 16, "bfloat16", "float8_e4m3fn", True, 8, 2, 64, 64, "int32", "float32"),
    ("gqa", "HND", 5, "float16", "float8_e5m2", False, 4, 4, 128, 0, "int64", "bfloat16"),
    ("gqa", "NHD", 1, "bfloat16", "bfloat16", False, 8, 2, 64, 32, "int32", None),
    ("gqa", "HND", 32, "bfloat16", "bfloat16", True, 4, 1, 128, 0, "int64", "float32"),
    ("mla", "NHD", 16, "bfloat16", "float8_e4m3fn", False, 16, 1, 64, 512, "int32", "float32"),
    ("mla", "NHD", 3, "float16", "float16", True, 8, 1, 64, 128, "int64", None),
]


def host_bytes(t) -> np.ndarray:
    return t.contiguous().view(torch.uint8).cpu().numpy()


def cache_rows(cache, pages, entries, layout="NHD"):
    """The cache's rows at (page, entry) per token, as a tensor of its dtype."""
    return rows_at(cache, torch.as_tensor(pages, device="cuda"), torch.as_tensor(entries, device="cuda"),
                   layout)


def only_rows_written(after, before, pages, entries, layout, what):
    assert_only_rows_written(host_bytes(after), host_bytes(before), pages, entries, layout, what)


@pytest.mark.parametrize("case", PAGED_CASES, ids=[f"{c[0]}-{c[1]}-ps{c[2]}-{c[4]}-{'neox' if c[5] else 'gptj'}-{c[10]}-{c[11] or 'fly'}"
                                                   for c in PAGED_CASES])
def test_rope_quantize_fp8_append_paged_kv_cache(case):
    attn, layout, ps, dtype, cdt, neox, hq, hk, rot, nope, tables, cos_dtype = case
    seed = seed_of(case)
    mla = attn == "mla"
    total, indices, indptr, batch, ppos = paged_batch(ps, seed)
    T = batch.size
    t = lambda a: torch.as_tensor(a, dtype=INT[tables], device="cuda")  # noqa: E731
    q = rnd((T, hq, rot + nope), dtype, seed)
    k = rnd((T, rot + nope) if mla else (T, hk, rot + nope), dtype, seed + 1)
    v = None if mla else rnd((T, hk, rot + nope), dtype, seed + 2)
    q_rope, q_nope = q[..., :rot], (q[..., rot:] if nope else None)
    k_rope, k_nope = k[..., :rot], (k[..., rot:] if nope else None)
    pos = positions(T, "int64", seed + 3)  # RoPE positions: independent of the cache positions
    cache, cos, sin = cos_sin_for(rot, pos, cos_dtype, q)
    if mla:
        caches = (guarded((total, ps, nope), cdt, seed + 4), guarded((total, ps, rot), cdt, seed + 5))
    else:
        shape = (total, ps, hk, rot + nope) if layout == "NHD" else (total, hk, ps, rot + nope)
        caches = (guarded(shape, cdt, seed + 4), guarded(shape, cdt, seed + 5))
    before = [c.clone() for c in caches]
    q_rope_out = poisoned(q_rope.shape, cdt)
    sq, skv = (1.0, 1.0) if cdt not in FP8 else (2.0, 0.25)
    res = rope_jit.rope_quantize_fp8_append_paged_kv_cache(
        q_rope, k_rope, q_nope, k_nope, v, cache, pos, caches, t(indices), t(indptr), t(batch),
        t(ppos), neox, quant_scale_q=sq, quant_scale_kv=skv, page_size=ps, kv_layout=layout,
        q_rope_out=q_rope_out)
    torch.cuda.synchronize()
    assert res[0] is q_rope_out and res[1].dtype == q_rope_out.dtype
    real = batch >= 0
    on = cuda_mask(real)
    q64, k64 = to_numpy64(q_rope), to_numpy64(k_rope)
    ref = reference.rope_quantize(q64, k64, to_numpy64(q_nope) if nope else None,
                                  to_numpy64(k_nope) if nope else None, cos, sin, neox, sq, skv)
    check_values(res[0][on], ref[0][real], cdt, "q_rope_out", sq * pair_magnitude(q64, neox)[real])
    assert (res[0][~on].contiguous().view(torch.uint8) == POISON).all(), "padding tokens' q written"
    if nope:
        check_values(res[1][on], ref[2][real], cdt, "q_nope_out")
    pages, entries = reference.paged_locations(batch, ppos, indptr, indices, ps)
    pages, entries = pages[real], entries[real]
    for c, b, name in zip(caches, before, ("paged_kv_cache[0]", "paged_kv_cache[1]")):
        only_rows_written(c, b, pages, entries, layout, name)
    kmag = skv * pair_magnitude(k64, neox)[real]
    if mla:
        ckv, kpe = (cache_rows(c, pages, entries, layout) for c in caches)
        check_values(kpe, ref[1][real], cdt, "kpe_cache", kmag)
        if nope:
            check_values(ckv, ref[3][real], cdt, "ckv_cache")
        return
    krows, vrows = (cache_rows(c, pages, entries, layout) for c in caches)
    check_values(krows[..., :rot], ref[1][real], cdt, "k_cache rope part", kmag)
    if cdt in FP8:
        check_values(vrows, to_numpy64(v)[real] * skv, cdt, "v_cache")
        if nope:
            check_values(krows[..., rot:], ref[3][real], cdt, "k_cache nope part")
    else:  # unquantized: copied parts bit-exact
        assert torch.equal(vrows, v[on]), "v_cache not exact"
        if nope:
            assert torch.equal(krows[..., rot:], k_nope[on]), "k_cache nope part not exact"


# ------------------------------------------------------------------ slot-mapped writes (vLLM, SGLang)

MLA_CASES = [("bfloat16", "fp8", True, 64, 37, 0), ("float16", "auto", False, 16, 200, 3),
             ("bfloat16", "fp8_e5m2", False, 1, 5, 1), ("bfloat16", "auto", True, 32, 1, 0)]


@pytest.mark.parametrize("dtype, kv_dtype, neox, block_size, T, short", MLA_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'neox' if c[2] else 'gptj'}-bs{c[3]}-T{c[4]}" for c in MLA_CASES])
def test_concat_and_cache_mla_rope_fused(dtype, kv_dtype, neox, block_size, T, short):
    seed = T * 7 + block_size
    hq, rot, lora, nb = 16, 64, 512, 24
    q_pe = rnd((T, hq, rot), dtype, seed)
    k_pe = rnd((T, rot), dtype, seed + 1)
    kv_c = rnd((T, lora), dtype, seed + 2)
    pos = positions(T, "int64", seed + 3)
    cache, cos, sin = cos_sin_for(rot, pos, dtype, q_pe)  # vLLM: the cache in the model dtype
    fmt = {"fp8": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}.get(kv_dtype)
    kv_cache = guarded((nb, block_size, lora + rot), "uint8" if fmt else dtype, seed + 4)
    before = kv_cache.clone()
    scale = torch.tensor([0.5], device="cuda")
    slots = slot_mapping(T, nb * block_size, seed, skipped=(0,) if T > 1 else (), short=short)
    q64, k64 = to_numpy64(q_pe), to_numpy64(k_pe)
    rope_jit.concat_and_cache_mla_rope_fused(pos, q_pe, k_pe, kv_c, cache, neox,
                                             torch.as_tensor(slots, device="cuda"), kv_cache,
                                             kv_dtype, scale)
    torch.cuda.synchronize()
    check_values(q_pe, rotated(q64, cos, sin, neox), dtype, "q_pe", pair_magnitude(q64, neox))
    k_ref = rotated(k64, cos, sin, neox)
    check_values(k_pe, k_ref, dtype, "k_pe", pair_magnitude(k64, neox))
    blocks, entries = reference.slot_locations(slots, block_size, T)
    cached = blocks >= 0
    blocks, entries = blocks[cached], entries[cached]
    only_rows_written(kv_cache, before, blocks, entries, "NHD", "kv_cache")
    rows = cache_rows(kv_cache, blocks, entries)
    keep = torch.as_tensor(cached, device="cuda")
    if fmt:
        check_values(rows[:, :lora], to_numpy64(kv_c)[cached] / 0.5, None, "kv_cache latent", fmt=fmt)
        check_values(rows[:, lora:], k_ref[cached] / 0.5, None, "kv_cache rope",
                     pair_magnitude(k64, neox)[cached] / 0.5, fmt=fmt)
    else:  # "auto": the latent copied bit for bit, the key as rotated in place
        assert torch.equal(rows[:, :lora], kv_c[keep]) and torch.equal(rows[:, lora:], k_pe[keep])


KV_CASES = [
    # dtype, kv_cache_dtype, layout, head, rotary, neox, scales, T
    ("bfloat16", "auto", "split", 128, 128, True, None, 50),
    ("float16", "auto", "plain", 128, 64, False, None, 7),
    ("bfloat16", "fp8", "split", 64, 64, False, "tensor", 130),
    ("bfloat16", "fp8_e5m2", "plain", 96, 32, True, "number", 1),
]


@pytest.mark.parametrize("dtype, kv_dtype, layout, head, rot, neox, scales, T", KV_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-h{c[3]}r{c[4]}-{c[6]}-T{c[7]}" for c in KV_CASES])
def test_rope_and_reshape_and_cache_flash(dtype, kv_dtype, layout, head, rot, neox, scales, T):
    seed = head * 3 + T
    hq, hk, nb, bs = 8, 2, 12, 16
    qkv = rnd((T, (hq + 2 * hk) * head + 8), dtype, seed)  # padded rows: strided tokens
    query, key = qkv[:, :hq * head], qkv[:, hq * head:(hq + hk) * head]
    value = qkv[:, (hq + hk) * head:(hq + 2 * hk) * head].view(T, hk, head)
    pos = positions(T, "int32", seed + 1)
    cache, cos, sin = cos_sin_for(rot, pos, "float32", qkv)
    fmt = {"fp8": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}.get(kv_dtype)
    store = "uint8" if fmt else dtype
    if layout == "split":  # FlashAttention's one buffer, split into strided views
        kv = guarded((nb, hk, bs, 2 * head), store, seed + 2)
        key_cache, value_cache = kv.transpose(1, 2).split(head, dim=-1)
    else:
        key_cache, value_cache = guarded((nb, bs, hk, head), store, seed + 2), guarded((nb, bs, hk, head), store, seed + 3)
    befores = [c.clone() for c in (key_cache, value_cache)]
    qkv_before = qkv.clone()
    ks, vs = (0.5, 2.0)
    k_scale, v_scale = ((torch.tensor([ks], device="cuda"), torch.tensor([vs], device="cuda"))
                        if scales == "tensor" else (ks, vs) if scales == "number" else (None, None))
    slots = slot_mapping(T, nb * bs, seed, skipped=(0,) if T > 1 else ())
    q64, k64 = (to_numpy64(x).reshape(T, -1, head) for x in (query, key))
    rope_jit.rope_and_reshape_and_cache_flash(pos, query, key, value, head, cache, neox, key_cache,
                                              value_cache, torch.as_tensor(slots, device="cuda"),
                                              kv_dtype, k_scale, v_scale)
    torch.cuda.synchronize()
    q_ref = reference.apply_rotary(q64, cos, sin, neox)
    k_ref = reference.apply_rotary(k64, cos, sin, neox)
    check_values(query.view(T, hq, head)[..., :rot], q_ref[..., :rot], dtype, "query",
                 pair_magnitude(q64[..., :rot], neox))
    check_values(key.view(T, hk, head)[..., :rot], k_ref[..., :rot], dtype, "key",
                 pair_magnitude(k64[..., :rot], neox))
    assert torch.equal(query.view(T, hq, head)[..., rot:], qkv_before[:, :hq * head].view(T, hq, head)[..., rot:])
    assert torch.equal(qkv[:, (hq + hk) * head:], qkv_before[:, (hq + hk) * head:]), "value or padding changed"
    blocks, entries = reference.slot_locations(slots, bs, T)
    cached = blocks >= 0
    blocks, entries = blocks[cached], entries[cached]
    keep = torch.as_tensor(cached, device="cuda")
    for c, b, name in zip((key_cache, value_cache), befores, ("key_cache", "value_cache")):
        only_rows_written(c, b, blocks, entries, "NHD", name)
    krows, vrows = cache_rows(key_cache, blocks, entries), cache_rows(value_cache, blocks, entries)
    if fmt:
        check_values(krows, k_ref[cached] / ks, None, "key_cache",
                     head_magnitude(k64, rot, neox)[cached] / ks, fmt=fmt)
        check_values(vrows, to_numpy64(value)[cached] / vs, None, "value_cache", fmt=fmt)
    else:
        assert torch.equal(krows, key.view(T, hk, head)[keep]), "key_cache is not the rotated key"
        assert torch.equal(vrows, value[keep]), "value_cache not exact"


@pytest.mark.parametrize("buffer", ["bfloat16", "float8_e4m3fn"])
def test_sglang_fused_set_kv_buffer(buffer):
    T, hq, hk, head, slots_n = 33, 8, 2, 128, 100
    q, k, v = rnd((T, hq * head), "bfloat16", 1), rnd((T, hk * head), "bfloat16", 2), rnd((T, hk * head), "bfloat16", 3)
    pos = positions(T, "int64", 4)
    cache, cos, sin = cos_sin_for(head, pos, "float32", q)
    k_buf, v_buf = guarded((slots_n, hk * head), buffer, 5), guarded((slots_n, hk, head), buffer, 6)
    befores = [b.clone() for b in (k_buf, v_buf)]
    loc = slot_mapping(T, slots_n, 7, skipped=(3,))
    q64, k64 = to_numpy64(q).reshape(T, hq, head), to_numpy64(k).reshape(T, hk, head)
    scale = None if buffer == "bfloat16" else 0.5
    arg = rope_jit.FusedSetKVBufferArg(value=v, k_buffer=k_buf, v_buffer=v_buf, k_scale=scale,
                                       v_scale=scale, cache_loc=torch.as_tensor(loc, device="cuda"))
    rope_jit.apply_rope_with_cos_sin_cache_inplace(pos, q, k, head, cache, True, arg)
    torch.cuda.synchronize()
    k_ref = reference.apply_rotary(k64, cos, sin, True)
    check_values(q.view(T, hq, head), reference.apply_rotary(q64, cos, sin, True), "bfloat16",
                 "query", pair_magnitude(q64, True))
    check_values(k.view(T, hk, head), k_ref, "bfloat16", "key", pair_magnitude(k64, True))
    written = loc >= 0
    rows = torch.as_tensor(loc[written], device="cuda")
    keep = torch.as_tensor(written, device="cuda")
    for b, before, name in zip((k_buf, v_buf), befores, ("k_buffer", "v_buffer")):
        only_rows_written(b[:, None], before[:, None], loc[written], np.zeros(written.sum(), int),
                          "NHD", name)
    if buffer == "bfloat16":
        assert torch.equal(k_buf[rows], k[keep]) and torch.equal(v_buf[rows].view(-1, hk * head), v[keep])
    else:
        check_values(k_buf[rows].view(-1, hk, head), k_ref[written] / 0.5, buffer, "k_buffer",
                     pair_magnitude(k64, True)[written] / 0.5)
        check_values(v_buf[rows], to_numpy64(v)[written].reshape(-1, hk, head) / 0.5, buffer, "v_buffer")


# ------------------------------------------------------------------ graphs, streams, failures

def _graph_inputs(seed):
    T, hq, hk, rot, nope = 64, 8, 2, 64, 64
    total, indices, indptr, batch, ppos = paged_batch(16, seed, existing=(3, 40, 0), new=(20, 20, 22))
    x = dict(q=rnd((T, hq, rot + nope), "bfloat16", seed), k=rnd((T, hk, rot + nope), "bfloat16", seed + 1),
             v=rnd((T, hk, rot + nope), "bfloat16", seed + 2), pos=positions(T, "int64", seed + 3))
    tables = [torch.as_tensor(a, dtype=torch.int32, device="cuda") for a in (indices, indptr, batch[:T], ppos[:T])]
    return x, total, tables


def test_cuda_graph_capture_and_replay():
    """In-place and given-output calls allocate nothing: captured in a CUDA graph, a replay
    on new inputs gives what eager calls give on them, bit for bit."""
    x, total, (indices, indptr, batch, ppos) = _graph_inputs(11)
    rot = 64
    cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, like=x["q"])
    outs = [poisoned((64, 8, rot), "float8_e4m3fn"), poisoned((64, 8, 64), "float8_e4m3fn")]
    kc = torch.zeros(total, 16, 2, 128, dtype=torch.float8_e4m3fn, device="cuda")
    vc = torch.zeros_like(kc)
    qkv = rnd((64, 12 * 128), "bfloat16", 12)
    w = rnd((128,), "bfloat16", 13)

    def step():
        rope_jit.rope_quantize_fp8_append_paged_kv_cache(
            x["q"][..., :rot], x["k"][..., :rot], x["q"][..., rot:], x["k"][..., rot:], x["v"], cache,
            x["pos"], (kc, vc), indices, indptr, batch, ppos, q_rope_out=outs[0], q_nope_out=outs[1],
            quantize_dtype=torch.float8_e4m3fn)
        rope_jit.fused_qk_norm_rope(qkv, 8, 2, 2, 128, 1e-6, w, w, None, False, x["pos"])

    step()  # compile and load outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    fresh, _, _ = _graph_inputs(99)
    for name in x:
        x[name].copy_(fresh[name])
    qkv_new = rnd((64, 12 * 128), "bfloat16", 14)
    qkv.copy_(qkv_new)
    graph.replay()
    torch.cuda.synchronize()
    got = [t.clone() for t in (*outs, kc, vc, qkv)]
    qkv.copy_(qkv_new)
    step()
    torch.cuda.synchronize()
    want = [*outs, kc, vc, qkv]
    for g, e in zip(got, want):
        assert torch.equal(g.view(torch.uint8), e.view(torch.uint8))


@pytest.mark.parametrize("op", ["rope_quantize", "append_paged", "kv_buffer"])
def test_enable_pdl_waits_for_the_producer_and_captures(op):
    """enable_pdl launches through cuLaunchKernelEx with programmatic serialization and the
    kernel waits for the previous one before its first read: a GEMM that writes q and k
    right before the call is seen in full, eagerly and in a CUDA graph, bit for bit as
    without PDL."""
    x, total, (indices, indptr, batch, ppos) = _graph_inputs(21)
    T, hq, hk, rot = 64, 8, 2, 64
    cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, like=x["q"])
    a = rnd((T, 256), "bfloat16", 22)
    w = rnd((256, (hq + hk) * rot), "bfloat16", 23) / 16
    qk = torch.empty(T, (hq + hk) * rot, dtype=torch.bfloat16, device="cuda")
    q, k = qk[:, :hq * rot].view(T, hq, rot), qk[:, hq * rot:].view(T, hk, rot)
    kc = torch.zeros(total, 16, hk, rot, dtype=torch.float8_e4m3fn, device="cuda")
    vc = torch.zeros_like(kc)
    v = x["v"][..., :rot].contiguous()
    slots = torch.randperm(total * 16, device="cuda")[:T]
    q_out, k_out = (torch.empty(t.shape, dtype=torch.float8_e4m3fn, device="cuda") for t in (q, k))

    def step(pdl):
        torch.matmul(a, w, out=qk)  # the producer of q and k, right before the call
        if op == "rope_quantize":
            rope_jit.rope_quantize_fp8(q, k, None, None, cache, x["pos"], q_rope_out=q_out,
                                       k_rope_out=k_out, enable_pdl=pdl)
        elif op == "append_paged":
            rope_jit.rope_quantize_fp8_append_paged_kv_cache(
                q, k, None, None, v, cache, x["pos"], (kc, vc), indices, indptr, batch, ppos,
                q_rope_out=q_out, enable_pdl=pdl)
        else:
            arg = rope_jit.FusedSetKVBufferArg(v.view(T, -1), kc.view(-1, hk * rot),
                                               vc.view(-1, hk * rot), 2.0, 2.0, slots)
            rope_jit.apply_rope_with_cos_sin_cache_inplace(
                x["pos"], q.view(T, -1), k.view(T, -1), rot, cache, True, arg, enable_pdl=pdl)

    def poison():
        for t in (q_out, k_out, kc, vc):
            t.view(torch.uint8).fill_(0x7F)

    def results():
        return [t.clone().view(torch.uint8) for t in (q_out, k_out, kc, vc, qk)]

    poison()
    step(False)
    want = results()
    poison()
    step(True)
    for g, e in zip(results(), want):
        assert torch.equal(g, e)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step(True)
    for _ in range(2):
        poison()
        graph.replay()
        torch.cuda.synchronize()
        for g, e in zip(results(), want):
            assert torch.equal(g, e)


def test_runs_on_the_callers_stream():
    """Inputs written on a side stream after a long sleep: the call, issued on that stream
    with no synchronization, must see them (it would race on another stream)."""
    T, hq, rot = 256, 16, 64
    q, k = torch.zeros(T, hq, rot, dtype=torch.bfloat16, device="cuda"), torch.zeros(T, rot, dtype=torch.bfloat16, device="cuda")
    new_q, new_k = rnd((T, hq, rot), "bfloat16", 21), rnd((T, rot), "bfloat16", 22)
    pos = positions(T, "int64", 23)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        q.copy_(new_q)
        k.copy_(new_k)
        outs = rope_jit.mla_rope_quantize_fp8(q, k, None, None, None, pos)
    side.synchronize()
    cos, sin = reference.cos_sin(pos.cpu().numpy(), reference.inv_frequencies(rot))
    q64 = to_numpy64(new_q)
    ref = reference.rope_quantize(q64, to_numpy64(new_k), None, None, cos, sin, True)
    check_values(outs[0], ref[0], "float8_e4m3fn", "q_rope_out", pair_magnitude(q64, True))


def test_a_failing_call_writes_nothing():
    x, total, (indices, indptr, batch, ppos) = _graph_inputs(31)
    kc = guarded((total, 16, 2, 128), "float8_e4m3fn", 32)
    vc, q_out = guarded((total, 16, 2, 128), "float8_e4m3fn", 33), poisoned((64, 8, 64), "float8_e4m3fn")
    before = [t.clone() for t in (kc, vc, q_out)]
    with pytest.raises(TypeError, match=r"^pos_ids: expected dtype int32 or int64, got float32"):
        rope_jit.rope_quantize_fp8_append_paged_kv_cache(
            x["q"][..., :64], x["k"][..., :64], x["q"][..., 64:], x["k"][..., 64:], x["v"], None,
            x["pos"].float(), (kc, vc), indices, indptr, batch, ppos, q_rope_out=q_out)
    with pytest.raises(ValueError, match=r"^paged_kv_cache\[0\]: dim 1 \(page_size\) must be 8"):
        rope_jit.rope_quantize_fp8_append_paged_kv_cache(
            x["q"][..., :64], x["k"][..., :64], x["q"][..., 64:], x["k"][..., 64:], x["v"], None,
            x["pos"], (kc, vc), indices, indptr, batch, ppos, q_rope_out=q_out, page_size=8)
    torch.cuda.synchronize()
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip((kc, vc, q_out), before))


def test_many_tokens_several_items_per_thread():
    """Llama-3-8B GQA shapes at 4096 tokens (a thread does several items) into an FP8 NHD
    cache: every value checked."""
    T, hq, hk, D, ps = 4096, 32, 8, 128, 16
    q, k, v = rnd((T, hq, D), "bfloat16", 41), rnd((T, hk, D), "bfloat16", 42), rnd((T, hk, D), "bfloat16", 43)
    pos = torch.arange(T, device="cuda")
    cache, cos, sin = cos_sin_for(D, pos, "float32", q)
    pages = T // ps
    kc = torch.zeros(pages, ps, hk, D, dtype=torch.float8_e4m3fn, device="cuda")
    vc = torch.zeros_like(kc)
    i32 = dict(dtype=torch.int32, device="cuda")
    q_out, _ = rope_jit.rope_quantize_fp8_append_paged_kv_cache(
        q, k, None, None, v, cache, pos, (kc, vc), torch.arange(pages, **i32),
        torch.tensor([0, pages], **i32), torch.zeros(T, **i32), torch.arange(T, **i32))
    torch.cuda.synchronize()
    q64, k64 = to_numpy64(q), to_numpy64(k)
    ref = reference.rope_quantize(q64, k64, None, None, cos, sin, True)
    check_values(q_out, ref[0], "float8_e4m3fn", "q_rope_out", pair_magnitude(q64, True))
    check_values(kc.view(T, hk, D), ref[1], "float8_e4m3fn", "k_cache", pair_magnitude(k64, True))
    check_values(vc.view(T, hk, D), to_numpy64(v), "float8_e4m3fn", "v_cache")


def test_compiled_with_aot_eager_matches_eager():
    """torch.compile (fullgraph, aot_eager: functionalization of the declared writes) gives
    the eager results for an in-place cache write and an allocating FlashInfer call."""
    T, hq, hk, D = 16, 4, 2, 64
    args = lambda s: (rnd((T, hq * D), "bfloat16", s), rnd((T, hk * D), "bfloat16", s + 1),  # noqa: E731
                      rnd((T, hk * D), "bfloat16", s + 2))
    pos = positions(T, "int64", 50)
    cache = rope_jit.compute_cos_sin_cache(D, MAX_POS, like=pos)
    slots = torch.arange(T, device="cuda") * 2

    def fn(q, k, v, kc, vc):
        rope_jit.rope_and_reshape_and_cache_flash(pos, q, k, v, D, cache, True, kc, vc, slots)
        outs = rope_jit.rope_quantize_fp8(q.view(T, hq, D), k.view(T, hk, D), None, None, cache, pos)
        return outs[0].float().sum()

    results = []
    for run in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        q, k, v = args(60)
        kc = torch.zeros(4, 16, hk, D, dtype=torch.bfloat16, device="cuda")
        vc = torch.zeros_like(kc)
        s = run(q, k, v, kc, vc)
        torch.cuda.synchronize()
        results.append((q, k, kc, vc, s))
    for a, b in zip(*results):
        assert torch.equal(a, b)
