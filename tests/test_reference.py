"""The float64 oracle (rope_jit.reference) and the host cache builder, checked against
values computed by hand in this file (docs/math.md, docs/conventions.md and the default cache of docs/variants.md).

Everything here runs on the CPU: no CuPy, no GPU.
"""

from __future__ import annotations

import math
import struct

import ml_dtypes
import numpy as np
import pytest

import rope_jit
from rope_jit import reference

BF16 = np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------ the rotation itself

def _head(values):
    return np.asarray(values, dtype=np.float64)


X = np.stack([
    # token 0: two heads of size 6
    np.stack([_head([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), _head([-0.5, 0.25, 1.5, -2.0, 7.0, -8.0])]),
    # token 1
    np.stack([_head([0.1, -0.2, 0.3, 0.4, 9.0, 10.0]), _head([2.0, 1.0, -1.0, 0.5, 11.0, 12.0])]),
])  # [tokens=2, heads=2, head=6]; rotary dim 4, so elements 4 and 5 pass through
POSITIONS = [3, 7]
R = 4
INV = [1.0, 10000.0 ** (-2 / 4)]  # base ** (-2i / R), i = 0, 1  -> [1, 0.01]


def test_default_inv_frequencies_small():
    """inv_freq[i] = base ** (-2i/R) for i < R/2; rope_scale divides them."""
    np.testing.assert_allclose(reference.inv_frequencies(4), INV, rtol=1e-15)
    np.testing.assert_allclose(reference.inv_frequencies(8), [1.0, 0.1, 0.01, 0.001], rtol=1e-15)
    got = reference.inv_frequencies(6, base=500000.0, rope_scale=4.0)
    want = [500000.0 ** (-2 * i / 6) / 4.0 for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert reference.inv_frequencies(128).shape == (64,)
    assert reference.inv_frequencies(128).dtype == np.float64


def test_cos_sin_and_cache_layout():
    """cos_sin gives cos/sin of p * inv_freq; a cache row p is [cos(a_0..), sin(a_0..)]."""
    c, s = reference.cos_sin(np.array(POSITIONS), np.array(INV))
    assert c.shape == s.shape == (2, 2)
    for t, p in enumerate(POSITIONS):
        for i, f in enumerate(INV):
            assert c[t, i] == pytest.approx(math.cos(p * f), rel=1e-15, abs=1e-15)
            assert s[t, i] == pytest.approx(math.sin(p * f), rel=1e-15, abs=1e-15)
    cache = reference.cos_sin_cache(4, 9)
    assert cache.shape == (9, 4)
    np.testing.assert_allclose(cache[7], [math.cos(7), math.cos(0.07), math.sin(7), math.sin(0.07)],
                               rtol=1e-15, atol=1e-15)
    cc, ss = reference.cos_sin_from_cache(cache, np.array(POSITIONS))
    np.testing.assert_array_equal(cc, cache[POSITIONS, :2])
    np.testing.assert_array_equal(ss, cache[POSITIONS, 2:])


def _hand_cos_sin():
    cos = np.array([[math.cos(p * f) for f in INV] for p in POSITIONS])
    sin = np.array([[math.sin(p * f) for f in INV] for p in POSITIONS])
    return cos, sin


def test_neox_by_hand():
    """NeoX: pairs (x[i], x[i + R/2]) -> (x1 c - x2 s, x2 c + x1 s); x[R:] unchanged."""
    cos, sin = _hand_cos_sin()
    got = reference.apply_rotary(X, cos, sin, is_neox=True)
    assert got.shape == X.shape and got.dtype == np.float64
    for t, p in enumerate(POSITIONS):
        c0, s0 = math.cos(p * INV[0]), math.sin(p * INV[0])
        c1, s1 = math.cos(p * INV[1]), math.sin(p * INV[1])
        for h in range(2):
            x0, x1, x2, x3, x4, x5 = X[t, h]
            want = [x0 * c0 - x2 * s0,   # pair (0, 2), frequency 0
                    x1 * c1 - x3 * s1,   # pair (1, 3), frequency 1
                    x2 * c0 + x0 * s0,
                    x3 * c1 + x1 * s1,
                    x4, x5]
            np.testing.assert_allclose(got[t, h], want, rtol=1e-14, atol=1e-14)
            assert got[t, h, 4] == x4 and got[t, h, 5] == x5  # pass-through, exactly


def test_gptj_by_hand():
    """GPT-J: pairs (x[2i], x[2i+1]) -> (x1 c - x2 s, x2 c + x1 s); x[R:] unchanged."""
    cos, sin = _hand_cos_sin()
    got = reference.apply_rotary(X, cos, sin, is_neox=False)
    for t, p in enumerate(POSITIONS):
        c0, s0 = math.cos(p * INV[0]), math.sin(p * INV[0])
        c1, s1 = math.cos(p * INV[1]), math.sin(p * INV[1])
        for h in range(2):
            x0, x1, x2, x3, x4, x5 = X[t, h]
            want = [x0 * c0 - x1 * s0,   # pair (0, 1), frequency 0
                    x1 * c0 + x0 * s0,
                    x2 * c1 - x3 * s1,   # pair (2, 3), frequency 1
                    x3 * c1 + x2 * s1,
                    x4, x5]
            np.testing.assert_allclose(got[t, h], want, rtol=1e-14, atol=1e-14)


def test_styles_differ_and_position_zero_is_identity():
    """The two pairings give different results (the test data can tell them apart), and
    position 0 is the identity for both."""
    cos, sin = _hand_cos_sin()
    neox = reference.apply_rotary(X, cos, sin, True)
    gptj = reference.apply_rotary(X, cos, sin, False)
    assert not np.allclose(neox[..., :R], gptj[..., :R])
    c0, s0 = reference.cos_sin(np.zeros(2, dtype=np.int64), np.array(INV))
    for style in (True, False):
        np.testing.assert_array_equal(reference.apply_rotary(X, c0, s0, style), X)


@pytest.mark.parametrize("is_neox", [True, False])
def test_partial_rotation_passes_tail_through(is_neox):
    """Elements R .. head_size-1 come out bit-identical, whatever the token dims ([B, S])
    and the input dtype; the rotated part preserves each pair's norm."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 96)).astype(np.float32)  # [B, S, heads, head]
    rot = 32
    pos = rng.integers(0, 1000, size=(2, 3))
    cos, sin = reference.cos_sin(pos, reference.inv_frequencies(rot))
    assert cos.shape == (2, 3, rot // 2)
    out = reference.apply_rotary(x, cos, sin, is_neox)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out[..., rot:], x[..., rot:].astype(np.float64))
    x64 = x.astype(np.float64)
    if is_neox:
        n_in = x64[..., :rot // 2] ** 2 + x64[..., rot // 2:rot] ** 2
        n_out = out[..., :rot // 2] ** 2 + out[..., rot // 2:rot] ** 2
    else:
        n_in = x64[..., 0:rot:2] ** 2 + x64[..., 1:rot:2] ** 2
        n_out = out[..., 0:rot:2] ** 2 + out[..., 1:rot:2] ** 2
    np.testing.assert_allclose(n_out, n_in, rtol=1e-12)
    assert not np.allclose(out[..., :rot], x64[..., :rot])


# ------------------------------------------------------------------ Llama 3.1

def _llama31_direct(rotary_dim, theta, factor, low, high, old_ctx):
    """transformers' _compute_llama3_parameters, written out as its piecewise definition."""
    out, bands = [], {"high": 0, "low": 0, "medium": 0}
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    for i in range(rotary_dim // 2):
        freq = 1.0 / theta ** (2 * i / rotary_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:          # high frequency: unchanged
            out.append(freq)
            bands["high"] += 1
        elif wavelen > low_wavelen:         # low frequency: divided by factor
            out.append(freq / factor)
            bands["low"] += 1
        else:                               # medium: smooth blend of the two
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
            bands["medium"] += 1
    return np.array(out), bands


def test_pair_orders_by_hand_and_with_rotation():
    """neox_order moves GPT-J pairs to NeoX positions (the tail stays), gptj_order undoes
    it, and rotating GPT-J pairs then reordering equals reordering then rotating NeoX pairs
    (DeepSeek's interleaved RoPE is that)."""
    x = np.arange(10.0)
    assert reference.neox_order(x, 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 9]
    assert reference.gptj_order(reference.neox_order(x, 8), 8).tolist() == x.tolist()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 12))
    c, s = reference.cos_sin(rng.integers(0, 99, 3), reference.inv_frequencies(8))
    via_gptj = reference.neox_order(reference.apply_rotary(x, c, s, is_neox=False), 8)
    via_neox = reference.apply_rotary(reference.neox_order(x, 8), c, s, is_neox=True)
    np.testing.assert_allclose(via_gptj, via_neox, rtol=0, atol=1e-15)


def test_llama31_inv_frequencies_all_bands():
    """Llama 3.1 smoothing (factor 8, low 1, high 4, old context 8192, theta 5e5, R=128)
    against the piecewise definition; each of the three bands holds some frequencies."""
    want, bands = _llama31_direct(128, 5e5, 8.0, 1.0, 4.0, 8192)
    assert min(bands.values()) >= 3, bands  # the case really exercises all three bands
    got = reference.inv_frequencies(128, base=5e5, rope_scale=8.0, llama31=(1.0, 4.0, 8192))
    assert got.shape == (64,)
    np.testing.assert_allclose(got, want, rtol=1e-14)
    plain = reference.inv_frequencies(128, base=5e5)
    assert np.array_equal(got[:bands["high"]], plain[:bands["high"]])
    np.testing.assert_allclose(got[-bands["low"]:], plain[-bands["low"]:] / 8.0, rtol=1e-15)


def test_llama31_other_parameters():
    """The same comparison with a different factor, band edges and rotary dim."""
    want, bands = _llama31_direct(64, 1e4, 4.0, 2.0, 8.0, 2048)
    assert min(bands.values()) >= 1, bands
    got = reference.inv_frequencies(64, base=1e4, rope_scale=4.0, llama31=(2.0, 8.0, 2048))
    np.testing.assert_allclose(got, want, rtol=1e-14)


# ------------------------------------------------------------------ positions from offsets

SEED_INDPTR = [0, 1, 5, 10]
SEED_OFFSETS = [4, 6, 3]
SEED_POSITIONS = [4, 6, 7, 8, 9, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("fn", [reference.positions_from_offsets, rope_jit.positions_from_offsets],
                         ids=["reference", "public"])
def test_positions_from_offsets_seed_example(fn, dtype):
    """The worked example of docs/conventions.md, NumPy in, NumPy out, dtype of offsets."""
    got = fn(np.array(SEED_INDPTR, dtype=dtype), np.array(SEED_OFFSETS, dtype=dtype))
    assert isinstance(got, np.ndarray)
    assert got.dtype == dtype
    assert got.tolist() == SEED_POSITIONS


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("fn", [reference.positions_from_offsets, rope_jit.positions_from_offsets],
                         ids=["reference", "public"])
def test_positions_from_offsets_empty_requests(fn, dtype):
    """Requests with no tokens (equal neighbouring indptr entries) contribute nothing,
    also at the start and at the end of the batch; an empty batch gives no positions."""
    indptr = np.array([0, 0, 3, 3, 5, 5], dtype=dtype)
    offsets = np.array([7, 2, 9, 4, 100], dtype=dtype)
    got = fn(indptr, offsets)
    assert got.dtype == dtype and got.tolist() == [2, 3, 4, 4, 5]
    none = fn(np.array([0], dtype=dtype), np.array([], dtype=dtype))
    assert isinstance(none, np.ndarray) and none.dtype == dtype and none.shape == (0,)
    all_empty = fn(np.array([0, 0, 0], dtype=dtype), np.array([5, 6], dtype=dtype))
    assert all_empty.shape == (0,)


def test_positions_from_offsets_int64_range():
    """int64 offsets beyond 2**31 stay exact."""
    big = 2 ** 40
    got = rope_jit.positions_from_offsets(np.array([0, 2, 3], np.int64),
                                          np.array([big, 5], np.int64))
    assert got.tolist() == [big, big + 1, 5]


@pytest.mark.parametrize("indptr, offsets, exc, match", [
    (np.array([0, 1, 5], np.int32), np.array([4, 6], np.int64), TypeError,
     r"offsets: dtype int64 differs from indptr dtype int32"),
    (np.array([0.0, 1.0]), np.array([4.0]), TypeError, r"indptr: expected dtype int32 or int64"),
    (np.array([0, 1], np.int64), np.array([4.0]), TypeError, r"offsets: expected dtype int32 or int64"),
    (np.array([0, 1, 5], np.int64), np.array([4, 6, 3], np.int64), ValueError,
     r"offsets: expected 2 entries \(one less than indptr\), got 3"),
    (np.array([], np.int64), np.array([], np.int64), ValueError, r"indptr: expected at least one entry"),
    pytest.param(np.array([[0, 1]], np.int64), np.array([4], np.int64), ValueError,
                 r"indptr: expected a 1-D array", id="2d-indptr"),
], ids=["dtype-mismatch", "float-indptr", "float-offsets", "length", "empty-indptr", "2d-indptr"])
def test_public_positions_from_offsets_errors(indptr, offsets, exc, match):
    """Bad host inputs raise TypeError/ValueError naming the argument."""
    with pytest.raises(exc, match=match):
        rope_jit.positions_from_offsets(indptr, offsets)


# ------------------------------------------------------------------ round_to and ulp

def _bits_to_f64(bits):
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _bf16_direct(x: float) -> float:
    """Round a float64 in bfloat16's normal range once, to nearest even, on its bits."""
    (bits,) = struct.unpack("<Q", struct.pack("<d", x))
    drop = 52 - 7  # float64 keeps 52 fraction bits, bfloat16 7
    half = 1 << (drop - 1)
    keep_odd = (bits >> drop) & 1
    bits = ((bits + half - 1 + keep_odd) >> drop) << drop
    return _bits_to_f64(bits)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_to_matches_numpy(dtype):
    """float16/float32: exactly NumPy's (correctly rounded, ties to even) conversion."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(4096) * np.exp2(rng.integers(-20, 15, 4096))
    got = reference.round_to(x, dtype)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, x.astype(dtype))


def test_round_to_float16_ties_to_even():
    """Exact ties round to the even neighbour (checked on known values)."""
    assert float(reference.round_to(1 + 2 ** -11, "float16")) == 1.0
    assert float(reference.round_to(1 + 3 * 2 ** -11, "float16")) == 1 + 2 ** -9
    assert float(reference.round_to(1 + 2 ** -11 + 2 ** -30, "float16")) == 1 + 2 ** -10


def test_round_to_bfloat16_rounds_once():
    """x = 1 + 2^-8 + 2^-30 lies just above the midpoint of bf16 neighbours 1 and
    1 + 2^-7. Direct rounding gives 1 + 2^-7; rounding through float32 first lands exactly
    on the midpoint and then ties to even, 1.0. round_to must give the direct result."""
    x = 1 + 2 ** -8 + 2 ** -30
    assert float(np.float32(x).astype(BF16)) == 1.0  # the double rounding this guards against
    got = reference.round_to(np.array([x, -x]), "bfloat16")
    assert got.dtype == BF16
    assert got.astype(np.float64).tolist() == [1 + 2 ** -7, -(1 + 2 ** -7)]
    # genuine ties go to even
    assert float(reference.round_to(1 + 2 ** -8, "bfloat16")) == 1.0
    assert float(reference.round_to(1 + 3 * 2 ** -8, "bfloat16")) == 1 + 2 ** -6


def test_round_to_bfloat16_against_bit_rounding():
    """Random normal-range values against round-to-nearest-even done on float64 bits."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(4096) * np.exp2(rng.integers(-100, 100, 4096))
    # add values that sit next to bf16 midpoints, where double rounding bites
    mids = (np.arange(1, 256, dtype=np.float64) + 0.5) / 128.0 + 1.0
    x = np.concatenate([x, mids + 2 ** -32, mids - 2 ** -32, mids])
    got = reference.round_to(x, "bfloat16").astype(np.float64)
    want = np.array([_bf16_direct(float(v)) for v in x])
    np.testing.assert_array_equal(got, want)


def test_round_to_bfloat16_subnormal_rounds_once():
    """2.5 * 2^-133 + 2^-150 is above the midpoint of bf16 subnormals 2*2^-133 and
    3*2^-133, so it rounds to 3 * 2^-133."""
    x = 2.5 * 2.0 ** -133 + 2.0 ** -150
    assert float(reference.round_to(x, "bfloat16")) == 3 * 2.0 ** -133


def _next_up(v: np.ndarray, dtype) -> np.ndarray:
    uint = {2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]
    return (v.view(uint) + 1).view(dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_ulp_is_the_grid_spacing(dtype):
    """ulp(v) = next representable value above v minus v, for positive finite values of
    the dtype (all of them for 16-bit types, subnormals included), and ulp(-v) = ulp(v)."""
    npdt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    if npdt.itemsize == 2:
        top = 0x7BFF if dtype == "float16" else 0x7F7F  # largest finite
        bits = np.arange(1, top, dtype=np.uint16)
    else:
        rng = np.random.default_rng(4)
        bits = np.concatenate([rng.integers(1, 0x7F7FFFFF, 20000, dtype=np.uint32),
                               np.arange(1, 300, dtype=np.uint32)])
    v = bits.view(npdt)
    spacing = _next_up(v, npdt).astype(np.float64) - v.astype(np.float64)
    got = reference.ulp(v.astype(np.float64), dtype)
    np.testing.assert_array_equal(got, spacing)
    np.testing.assert_array_equal(reference.ulp(-v.astype(np.float64), dtype), spacing)


def test_ulp_known_values():
    """A few values by hand: 1.0, 0.75, the largest float16, subnormals."""
    assert reference.ulp(1.0, "float16") == 2.0 ** -10
    assert reference.ulp(0.75, "float16") == 2.0 ** -11
    assert reference.ulp(65504.0, "float16") == 32.0
    assert reference.ulp(2.0 ** -20, "float16") == 2.0 ** -24
    assert reference.ulp(1.0, "bfloat16") == 2.0 ** -7
    assert reference.ulp(3.0, "bfloat16") == 2.0 ** -6
    assert reference.ulp(1.0, "float32") == 2.0 ** -23
    assert reference.ulp(1e-40, "float32") == 2.0 ** -149
    assert reference.ulp(np.array([1.0, -4.0]), "float32").tolist() == [2.0 ** -23, 2.0 ** -21]


@pytest.mark.parametrize("dtype, want", [("float16", 2.0 ** -24), ("bfloat16", 2.0 ** -133),
                                         ("float32", 2.0 ** -149)])
def test_ulp_at_zero(dtype, want):
    """The grid spacing at 0 is the smallest subnormal."""
    assert reference.ulp(0.0, dtype) == want


def test_ulp_just_below_a_power_of_two():
    """16 - 2^-49 (a float64 in [8, 16)) has float16 spacing 2^-7, not 2^-6."""
    assert reference.ulp(np.nextafter(16.0, 0.0), "float16") == 2.0 ** -7


# ------------------------------------------------------------------ compute_cos_sin_cache

DTYPE_SPELLINGS = [
    ("float32", np.float32), ("bfloat16", BF16), ("float16", np.float16),
    (np.float32, np.float32), (np.dtype("float16"), np.float16), (ml_dtypes.bfloat16, BF16),
]


@pytest.mark.parametrize("dtype, want", DTYPE_SPELLINGS, ids=lambda v: str(v))
def test_compute_cos_sin_cache_shape_dtype(dtype, want):
    """[max_position, rotary_dim] host NumPy array of the requested dtype (names and NumPy
    dtypes); row 0 is cos = 1, sin = 0 exactly."""
    c = rope_jit.compute_cos_sin_cache(64, 33, dtype=dtype)
    assert isinstance(c, np.ndarray)
    assert c.shape == (33, 64)
    assert c.dtype == np.dtype(want)
    assert np.all(c[0, :32].astype(np.float64) == 1.0)
    assert np.all(c[0, 32:].astype(np.float64) == 0.0)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_compute_cos_sin_cache_torch_dtypes(name):
    """torch dtypes are accepted too and give the same array."""
    torch = pytest.importorskip("torch")
    a = rope_jit.compute_cos_sin_cache(16, 5, dtype=getattr(torch, name))
    b = rope_jit.compute_cos_sin_cache(16, 5, dtype=name)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_compute_cos_sin_cache_rows(dtype, base):
    """Row p is round_to(cos(p * inv_freq_i)) then round_to(sin(p * inv_freq_i)), with
    inv_freq_i = base ** (-2i/R) computed here with math."""
    rot, max_pos = 24, 5000
    c = rope_jit.compute_cos_sin_cache(rot, max_pos, base=base, dtype=dtype)
    for p in (1, 2, 1234, 4999):
        angles = [p * (1.0 / base ** (2 * i / rot)) for i in range(rot // 2)]
        want = reference.round_to(np.array([math.cos(a) for a in angles]
                                           + [math.sin(a) for a in angles]), dtype)
        assert c[p].view(np.uint8).tobytes() == want.view(np.uint8).tobytes(), p


def test_compute_cos_sin_cache_empty():
    """max_position 0 is an empty cache of the right width."""
    assert rope_jit.compute_cos_sin_cache(8, 0).shape == (0, 8)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dtype="float64"), TypeError, r"dtype: expected float16, bfloat16 or float32"),
    (dict(dtype="int32"), TypeError, r"dtype: expected"),
    (dict(dtype=np.float64), TypeError, r"dtype: expected"),
    (dict(rotary_dim=7), ValueError, r"rotary_dim: expected a positive even integer"),
    (dict(rotary_dim=0), ValueError, r"rotary_dim"),
    (dict(rotary_dim=-4), ValueError, r"rotary_dim"),
    (dict(rotary_dim=64.0), ValueError, r"rotary_dim"),
    (dict(rotary_dim=True), ValueError, r"rotary_dim"),
    (dict(max_position=-1), ValueError, r"max_position: expected a non-negative integer"),
    (dict(max_position=10.5), ValueError, r"max_position"),
    (dict(base=0.0), ValueError, r"base: expected a finite number > 0 and != 1"),
    (dict(base=-10000.0), ValueError, r"base"),
    (dict(base=1.0), ValueError, r"base"),
    (dict(base=float("nan")), ValueError, r"base"),
    pytest.param(dict(base="10000"), (TypeError, ValueError), r"base"),
])
def test_compute_cos_sin_cache_bad_arguments(kwargs, exc, match):
    """Bad arguments raise TypeError/ValueError naming the argument."""
    args = dict(rotary_dim=64, max_position=16)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        rope_jit.compute_cos_sin_cache(**args)


def test_compute_cos_sin_cache_torch_dtype_float64_rejected():
    """A torch float64 dtype is refused like the name."""
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"dtype: expected"):
        rope_jit.compute_cos_sin_cache(8, 4, dtype=torch.float64)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_compute_cos_sin_cache_like_cpu_torch(name):
    """like= a CPU torch tensor: a torch tensor of that dtype on the CPU, same values."""
    torch = pytest.importorskip("torch")
    like = torch.zeros(3, dtype=torch.float64)
    t = rope_jit.compute_cos_sin_cache(32, 9, dtype=name, like=like)
    assert isinstance(t, torch.Tensor)
    assert t.dtype == getattr(torch, name)
    assert t.device.type == "cpu"
    assert tuple(t.shape) == (9, 32)
    host = rope_jit.compute_cos_sin_cache(32, 9, dtype=name)
    as_int = {2: torch.int16, 4: torch.int32}[t.element_size()]
    np.testing.assert_array_equal(t.view(as_int).numpy(),
                                  host.view({2: np.int16, 4: np.int32}[host.itemsize]))


def test_compute_cos_sin_cache_like_unsupported():
    """like= something that is no array raises TypeError naming `like`."""
    with pytest.raises(TypeError, match=r"^like: "):
        rope_jit.compute_cos_sin_cache(8, 4, like=object())


def test_compute_cos_sin_cache_like_numpy():
    """like= a NumPy array returns a NumPy array (the caller's array type, on the host)."""
    got = rope_jit.compute_cos_sin_cache(8, 4, dtype="float16", like=np.zeros(2))
    assert isinstance(got, np.ndarray) and got.dtype == np.float16


# ------------------------------------------------------------------ mRoPE row selection

@pytest.mark.parametrize("section, interleaved", [
    ((16, 24, 24), False), ((24, 20, 20), True), ((8, 4, 4), False), ((4, 6, 6), True),
    ((2, 3, 5), True), ((10, 0, 0), False),
])
def test_mrope_rows_match_transformers(section, interleaved):
    """reference.mrope_select picks, per frequency, the row transformers' Qwen2-VL /
    Qwen3-VL rotary embedding picks (its recomposition_frequencies, called on a tensor whose
    value encodes (row, frequency))."""
    torch = pytest.importorskip("torch")
    if interleaved:
        mod = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
        cls = mod.Qwen3VLTextRotaryEmbedding
    else:
        mod = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
        cls = mod.Qwen2VLRotaryEmbedding
    half = sum(section)
    tagged = (torch.arange(3)[:, None, None, None] * 1000 + torch.arange(half)).expand(3, 2, 5, half)
    tagged = tagged.to(torch.float64).clone()
    import types

    theirs = cls.recomposition_frequencies(types.SimpleNamespace(mrope_section=list(section)),
                                           tagged.clone())
    theirs = theirs[..., :half].numpy()  # they repeat the R/2 values for the NeoX halves
    ours = reference.mrope_select(tagged.numpy(), section, interleaved)
    np.testing.assert_array_equal(ours, theirs)
    assert set(np.unique(ours // 1000)) <= {0, 1, 2}


def test_mrope_rows_layouts():
    np.testing.assert_array_equal(reference.mrope_rows((2, 1, 1)), [0, 0, 1, 2])
    np.testing.assert_array_equal(reference.mrope_rows((2, 3, 2), True), [0, 1, 2, 0, 1, 2, 0])
