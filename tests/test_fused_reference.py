"""The float64 references of the fused ops (rope_jit.reference): FP8 rounding against
ml_dtypes and by its definition, the paged and slot addressing on worked examples, QK
RMSNorm + RoPE against a per-head loop. CPU only."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from rope_jit import reference

FP8 = ("float8_e4m3fn", "float8_e5m2")


def _grid(dtype):
    """Every finite value of the FP8 format, ascending (float64)."""
    bits = np.arange(256, dtype=np.uint8).view(getattr(ml_dtypes, dtype)).astype(np.float64)
    return np.unique(bits[np.isfinite(bits)])


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_round_matches_ml_dtypes_inside_the_range(dtype):
    """Random float32 values over every binade (and the subnormals) round as ml_dtypes
    rounds them (round to nearest even, within the finite range)."""
    rng = np.random.default_rng(0)
    top = reference.FP8_FORMATS[dtype][2]
    x = (rng.uniform(-1, 1, 200_000) * 2.0 ** rng.integers(-22, 17, 200_000)).astype(np.float32)
    x = x[np.abs(x) <= top].astype(np.float64)
    want = x.astype(np.float32).astype(getattr(ml_dtypes, dtype)).astype(np.float64)
    np.testing.assert_array_equal(reference.fp8_round(x, dtype), want)


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_round_ties_go_to_even(dtype):
    """The midpoint of two neighbours rounds to the one with an even last bit."""
    grid = _grid(dtype)
    pos = grid[grid >= 0]
    mid = (pos[:-1] + pos[1:]) / 2
    got = reference.fp8_round(mid, dtype)
    codes = {v: i for i, v in enumerate(np.arange(128, dtype=np.uint8).view(
        getattr(ml_dtypes, dtype)).astype(np.float64))}
    assert all(codes[g] % 2 == 0 for g in got)
    assert np.all((got == pos[:-1]) | (got == pos[1:]))


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_round_saturates_and_keeps_signs(dtype):
    top = reference.FP8_FORMATS[dtype][2]
    got = reference.fp8_round([top * 1.01, -top * 4, np.inf, -np.inf, 1e30, -0.0, np.nan], dtype)
    assert list(got[:5]) == [top, -top, top, -top, top]
    assert got[5] == 0 and np.signbit(got[5]) and np.isnan(got[6])


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_ulp_is_the_grid_spacing(dtype):
    grid = _grid(dtype)
    pos = grid[grid >= 0]
    np.testing.assert_array_equal(reference.fp8_ulp(pos[:-1], dtype), np.diff(pos))
    assert reference.fp8_ulp(1e9, dtype) == reference.fp8_ulp(pos[-1], dtype)


def test_rope_quantize_scales_each_part():
    rng = np.random.default_rng(1)
    T, H, R, N = 5, 3, 8, 6
    q, k = rng.normal(size=(T, H, R)), rng.normal(size=(T, R))  # MLA: a 2-D key
    qn, kn = rng.normal(size=(T, H, N)), rng.normal(size=(T, N))
    pos = rng.integers(0, 100, T)
    cos, sin = reference.cos_sin(pos, reference.inv_frequencies(R))
    qr, kr, qno, kno = reference.rope_quantize(q, k, qn, kn, cos, sin, True, 2.0, 0.5)
    np.testing.assert_allclose(qr, reference.apply_rotary(q, cos, sin, True) * 2.0)
    np.testing.assert_allclose(kr, reference.apply_rotary(k[:, None], cos, sin, True)[:, 0] * 0.5)
    np.testing.assert_array_equal(qno, qn * 2.0)
    np.testing.assert_array_equal(kno, kn * 0.5)
    assert reference.rope_quantize(q, k, None, None, cos, sin, False)[2:] == (None, None)


def test_paged_locations_worked_example():
    """Two requests on pages [7, 2] and [5]; page size 4; a padding token (-1)."""
    pages, entries = reference.paged_locations(
        batch_indices=[0, 0, 1, -1, 0], positions=[0, 5, 3, 0, 7], kv_indptr=[0, 2, 3],
        kv_indices=[7, 2, 5], page_size=4)
    assert pages.tolist() == [7, 2, 5, -1, 2]
    assert entries.tolist() == [0, 1, 3, -1, 3]


def test_slot_locations_skip_negative_and_missing_slots():
    blocks, entries = reference.slot_locations([5, -1, 16, 3], block_size=4, num_tokens=6)
    assert blocks.tolist() == [1, -1, 4, 0, -1, -1]
    assert entries.tolist() == [1, -1, 0, 3, -1, -1]


def test_qk_norm_rope_against_a_per_head_loop():
    rng = np.random.default_rng(2)
    T, hq, hk, hv, D, R, eps = 4, 3, 2, 2, 16, 8, 1e-5
    qkv = rng.normal(size=(T, (hq + hk + hv) * D))
    qw, kw = rng.normal(size=D), rng.normal(size=D)
    pos = rng.integers(0, 50, T)
    cos, sin = reference.cos_sin(pos, reference.inv_frequencies(R))
    for neox in (True, False):
        got = reference.qk_norm_rope(qkv, hq, hk, D, eps, qw, kw, cos, sin, neox)
        for t in range(T):
            for h in range(hq + hk + hv):
                x = qkv[t, h * D:(h + 1) * D]
                if h >= hq + hk:
                    np.testing.assert_array_equal(got[t, h * D:(h + 1) * D], x)
                    continue
                y = x / np.sqrt(np.sum(x * x) / D + eps) * (qw if h < hq else kw)
                c, s = cos[t], sin[t]
                if neox:
                    a, b = y[:R // 2].copy(), y[R // 2:R].copy()
                    y[:R // 2], y[R // 2:R] = a * c - b * s, b * c + a * s
                else:
                    a, b = y[0:R:2].copy(), y[1:R:2].copy()
                    y[0:R:2], y[1:R:2] = a * c - b * s, b * c + a * s
                np.testing.assert_allclose(got[t, h * D:(h + 1) * D], y, rtol=1e-13, atol=1e-13)
