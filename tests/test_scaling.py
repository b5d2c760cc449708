"""RoPE scaling variants (rope_jit.scaling, compute_cos_sin_cache(rope_scaling=...)) on the
CPU: every rope_type against transformers' own code, vLLM's cache layouts and formulas by
hand, the documented RopeScaling fields, the on-the-fly parameters, and bad input.

How the transformers comparisons are made, and their tolerances:

* transformers computes inv_freq in float32 (``torch.float``) and the attention factor in
  Python floats. Its code is run twice: as shipped, and once more with ``torch.float``,
  ``torch.float32`` and ``Tensor.float`` pointing at float64 for the duration of the call,
  which runs *its* formulas in float64. Against that float64 run, rope_jit (float64
  NumPy) must agree to a few float64 ulps (rtol 1e-14: only ``pow`` implementations
  differ) - any formula difference, however small, shows there.
* Against the float32 run (what transformers users get), the relative difference of
  inv_freq must stay within the float32 rounding transformers commits:
  ``(4 + ln(base)) * 2**-24`` (the exponent 2i/R rounded to float32 moves base**x by up
  to ln(base) * x * 2**-24; pow and the division add an ulp or two), plus
  ``3 * (factor - 1) * 2**-24`` for the blended variants (llama3, yarn): their float32
  blend weight carries a few ulps of rounding, and the two frequencies it blends differ
  by (factor - 1) relative.
* cos/sin: transformers' forward (float64 run) rounded to the cache dtype must equal the
  rope_jit cache within half an ulp of that dtype (plus the float64 rounding of the
  angle p * inv_freq on both sides).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest

import rope_jit
from rope_jit import reference
from rope_jit.reference import mrope_cos_sin
from rope_jit.scaling import (
    ROPE_TYPES,
    RopeScaling,
    on_the_fly_variant,
    resolve_rope_scaling,
    yarn_correction_range,
    yarn_get_mscale,
)

EPS32 = 2.0 ** -24


# ------------------------------------------------------------------ transformers harness

@pytest.fixture(scope="module")
def hf():
    """transformers' pieces, quiet (its config validation logs warnings we provoke on
    purpose, e.g. yarn factors that disagree with max_position_embeddings)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.phi.configuration_phi import PhiConfig
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    transformers.logging.set_verbosity_error()

    class HF:
        pass

    h = HF()
    h.torch, h.init_functions, h.config_cls, h.rotary_cls = torch, ROPE_INIT_FUNCTIONS, PhiConfig, PhiRotaryEmbedding
    return h


@contextlib.contextmanager
def float64_torch(torch):
    """Run transformers' float32 RoPE code in float64 (see the module docstring)."""
    saved = torch.float, torch.float32, torch.Tensor.float
    torch.float = torch.float32 = torch.float64
    torch.Tensor.float = torch.Tensor.double
    try:
        yield
    finally:
        torch.float, torch.float32, torch.Tensor.float = saved


def hf_config(h, params, head_dim, max_pos):
    # PhiConfig: its default rope init honours partial_rotary_factor (Llama's does not);
    # the dict is copied because transformers fills it in place.
    return h.config_cls(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                        max_position_embeddings=max_pos,
                        rope_parameters={"partial_rotary_factor": 1.0, **params})


def hf_inv_freq(h, params, head_dim, max_pos, seq_len=None, float64=False):
    """(inv_freq float64 ndarray, attention_factor) from transformers' init function."""
    with float64_torch(h.torch) if float64 else contextlib.nullcontext():
        cfg = hf_config(h, params, head_dim, max_pos)
        rope_type = cfg.rope_parameters["rope_type"]
        fn = (h.rotary_cls.compute_default_rope_parameters if rope_type == "default"
              else h.init_functions[rope_type])
        inv, attention = fn(cfg, "cpu", **({} if seq_len is None else {"seq_len": seq_len}))
    return inv.double().numpy(), float(attention)


def hf_cos_sin(h, params, head_dim, max_pos, positions, float64=True):
    """transformers' forward (its PhiRotaryEmbedding): cos, sin [T, R/2] at positions."""
    torch = h.torch
    with float64_torch(torch) if float64 else contextlib.nullcontext():
        module = h.rotary_cls(hf_config(h, params, head_dim, max_pos))
        x = torch.zeros(1, dtype=torch.float64 if float64 else torch.float32)
        cos, sin = module(x, torch.as_tensor(np.asarray(positions), dtype=torch.int64)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half].double().numpy(), sin[0, :, :half].double().numpy()


# ------------------------------------------------------------------ parameter sets

def _factors(n, lo, hi, seed):
    rng = np.random.default_rng(seed)
    return [float(v) for v in np.sort(rng.uniform(lo, hi, n))]


# (id, params (rope_theta always given), head_dim, max_position_embeddings, seq_lens)
CASES = [
    ("default", {"rope_type": "default", "rope_theta": 1e4}, 128, 4096, [None]),
    ("default-theta1e6-R96", {"rope_type": "default", "rope_theta": 1e6}, 96, 32768, [None]),
    ("default-partial0.4", {"rope_type": "default", "rope_theta": 1e4,
                            "partial_rotary_factor": 0.4}, 80, 2048, [None]),
    ("default-partial0.5-R40", {"rope_type": "default", "rope_theta": 5e5,
                                "partial_rotary_factor": 0.5}, 80, 2048, [None]),
    ("linear-4", {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}, 128, 4096, [None]),
    ("linear-2.5-partial", {"rope_type": "linear", "factor": 2.5, "rope_theta": 5e5,
                            "partial_rotary_factor": 0.5}, 128, 4096, [None]),
    ("linear-type-key", {"type": "linear", "factor": 8.0, "rope_theta": 1e6}, 64, 2048, [None]),
    ("dynamic-2", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, 128, 2048,
     [None, 1000, 2048, 2049, 5000, 70000]),
    ("dynamic-4-partial", {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 5e5,
                           "partial_rotary_factor": 0.75}, 128, 4096, [None, 9000]),
    ("yarn-qwen2.5", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                      "rope_theta": 1e6}, 128, 131072, [None]),
    ("yarn-deepseek-v3", {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                          "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                          "rope_theta": 1e4}, 64, 163840, [None]),
    ("yarn-gpt-oss", {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0},
     64, 131072, [None]),
    ("yarn-mscale-ratio", {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
                           "mscale": 0.707, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2,
                           "rope_theta": 1e4}, 96, 32768, [None]),
    ("yarn-attention-factor", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
                               "attention_factor": 0.8, "rope_theta": 5e5}, 128, 32768, [None]),
    # the ramp's upper bound lands past the last frequency (35 > 31): transformers clamps
    # it to R - 1, not R/2 - 1, which changes the ramp's slope
    ("yarn-ramp-past-end", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072,
                            "rope_theta": 1e4}, 64, 524288, [None]),
    ("yarn-partial-beta0", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192,
                            "beta_fast": 0, "beta_slow": 0, "partial_rotary_factor": 0.5,
                            "rope_theta": 1e4}, 128, 32768, [None]),
    ("llama3.1", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_theta": 5e5}, 128, 131072, [None]),
    ("llama3.2", {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_theta": 5e5}, 64, 131072, [None]),
    ("llama3-custom-partial", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                               "high_freq_factor": 8.0, "original_max_position_embeddings": 2048,
                               "partial_rotary_factor": 0.75, "rope_theta": 1e4}, 128, 8192, [None]),
    ("longrope-phi3", {"rope_type": "longrope", "short_factor": _factors(48, 1.0, 1.2, 1),
                       "long_factor": _factors(48, 1.0, 50.0, 2), "original_max_position_embeddings": 4096,
                       "rope_theta": 1e4}, 96, 131072, [None, 4096, 4097, 100000]),
    ("longrope-factor-af", {"rope_type": "longrope", "short_factor": _factors(32, 1.0, 2.0, 3),
                            "long_factor": _factors(32, 1.0, 20.0, 4), "original_max_position_embeddings": 2048,
                            "factor": 8.0, "attention_factor": 1.1, "rope_theta": 1e4}, 64, 16384,
     [None, 3000]),
    ("longrope-phi4-partial", {"rope_type": "longrope", "short_factor": _factors(48, 1.0, 3.0, 5),
                               "long_factor": _factors(48, 1.0, 60.0, 6),
                               "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
                               "rope_theta": 250000.0}, 128, 131072, [None, 50000]),
    ("proportional-gemma", {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                            "rope_theta": 1e6}, 256, 8192, [None]),
    ("proportional-factor", {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 8.0,
                             "rope_theta": 1e4}, 128, 8192, [None]),
    ("proportional-full", {"rope_type": "proportional", "partial_rotary_factor": 1.0,
                           "rope_theta": 1e4}, 64, 4096, [None]),
]
CASE_IDS = [c[0] for c in CASES]
P = {c[0]: c[1] for c in CASES}  # parameters by case id


def _type(case) -> str:
    return case[1].get("rope_type", case[1].get("type"))


NOT_DYNAMIC = [c for c in CASES if _type(c) != "dynamic"]
CASE_SEQ = [(c, s) for c in CASES for s in c[4]]
CASE_SEQ_IDS = [f"{c[0]}-seq{s}" for c, s in CASE_SEQ]


def ours(params, head_dim, max_pos, seq_len=None) -> RopeScaling:
    return resolve_rope_scaling(params, head_dim, None, max_pos, seq_len=seq_len)


def float32_rtol(params, s: RopeScaling) -> float:
    blended = s.rope_type in ("llama3", "yarn")
    return (4 + math.log(params["rope_theta"]) + (3 * (s.factor - 1) if blended else 0)) * EPS32


def test_every_transformers_rope_type_is_covered(hf):
    """Every rope_type transformers knows (ROPE_INIT_FUNCTIONS, plus 'default' which each
    model defines) is resolved, and the parameter sets above exercise each of them."""
    theirs = set(hf.init_functions) | {"default"}
    assert theirs <= set(ROPE_TYPES), theirs - set(ROPE_TYPES)
    tested = {_type(c) for c in CASES}
    assert theirs <= tested, theirs - tested


@pytest.mark.parametrize("case, seq_len", CASE_SEQ, ids=CASE_SEQ_IDS)
def test_inv_freq_matches_transformers_in_float64(hf, case, seq_len):
    """transformers' formulas run in float64 and rope_jit agree to rtol 1e-14, zeros
    (proportional's unrotated pairs) exactly; the attention factor is equal."""
    _, params, head_dim, max_pos, _ = case
    want, attention = hf_inv_freq(hf, dict(params), head_dim, max_pos, seq_len, float64=True)
    s = ours(params, head_dim, max_pos, seq_len)
    assert s.inv_freq.shape == want.shape == (s.rotary_dim // 2,)
    assert np.array_equal(s.inv_freq == 0, want == 0)
    np.testing.assert_allclose(s.inv_freq, want, rtol=1e-14, atol=0)
    assert s.attention_factor == pytest.approx(attention, rel=1e-15)


@pytest.mark.parametrize("case, seq_len", CASE_SEQ, ids=CASE_SEQ_IDS)
def test_inv_freq_matches_transformers_float32(hf, case, seq_len):
    """transformers as shipped (float32): within its float32 rounding (module docstring);
    the attention factor (Python floats there too) equal."""
    _, params, head_dim, max_pos, _ = case
    want, attention = hf_inv_freq(hf, dict(params), head_dim, max_pos, seq_len)
    s = ours(params, head_dim, max_pos, seq_len)
    nz = s.inv_freq != 0
    rel = np.abs(want[nz] - s.inv_freq[nz]) / s.inv_freq[nz]
    assert rel.max() <= float32_rtol(params, s), (rel.max() / EPS32, float32_rtol(params, s) / EPS32)
    assert np.array_equal(want[~nz], s.inv_freq[~nz])
    assert s.attention_factor == pytest.approx(attention, rel=1e-15)


def _positions(s: RopeScaling, n_max: int, seed=0):
    """Positions over the whole range, both ends included."""
    rng = np.random.default_rng(seed)
    return np.unique(np.concatenate([[0, 1, n_max - 1], rng.integers(0, n_max, 300)]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cache_matches_transformers_cos_sin(hf, case, dtype):
    """compute_cos_sin_cache(rope_scaling=...) equals transformers' cos and sin (its
    forward, float64 run, times attention_scaling) rounded to the cache dtype: within half
    an ulp. longrope: short rows for a batch below the original length, long rows (offset
    by it) for a batch beyond; dynamic: its state at max_position_embeddings."""
    _, params, head_dim, max_pos, _ = case
    s = ours(params, head_dim, max_pos)
    cache = rope_jit.compute_cos_sin_cache(head_dim, max_pos, dtype=dtype, rope_scaling=params)
    assert cache.shape == (s.cache_length, s.rotary_dim)
    half = s.rotary_dim // 2
    batches = [(_positions(s, max_pos), 0)]
    if s.rope_type == "longrope":
        orig = s.original_max_position
        batches = [(_positions(s, orig), 0),  # largest position < orig: short table
                   (np.concatenate([_positions(s, max_pos, 1), [orig]]), orig)]  # long table
    for pos, row0 in batches:
        hc, hs = hf_cos_sin(hf, dict(params), head_dim, max_pos, pos)
        got = cache[row0 + pos].astype(np.float64)
        for g, want in ((got[:, :half], hc), (got[:, half:], hs)):
            angle_slack = 4 * (pos.max() * s.inv_freq.max()) * 2.0 ** -52 * s.attention_factor
            tol = 0.5 * reference.ulp(want, dtype) + angle_slack
            err = np.abs(g - want)
            assert (err <= tol).all(), (err.max(), tol[np.unravel_index(np.argmax(err - tol), tol.shape)])


@pytest.mark.parametrize("case", NOT_DYNAMIC, ids=[c[0] for c in NOT_DYNAMIC])
def test_cache_close_to_transformers_float32_forward(hf, case):
    """The float32 cache against transformers' cos/sin as users get them (float32
    forward): within the float32 errors transformers commits, positions to 8192: its
    inv_freq rounding and the float32 angle p * inv_freq (both ~ angle * 2**-24 times the
    inv_freq bound), the cos and the product by attention_scaling (2 ulps), and our half
    ulp."""
    _, params, head_dim, max_pos, _ = case
    s = ours(params, head_dim, max_pos)
    cache = rope_jit.compute_cos_sin_cache(head_dim, max_pos, rope_scaling=params).astype(np.float64)
    pos = _positions(s, min(max_pos, 8192, s.original_max_position or max_pos), seed=3)
    hc, hs = hf_cos_sin(hf, dict(params), head_dim, max_pos, pos, float64=False)
    angle = pos[:, None] * s.inv_freq
    k = float32_rtol(params, s) / EPS32
    tol = s.attention_factor * (angle * (k + 1) * EPS32 + 2 * EPS32) + 0.5 * reference.ulp(hc, "float32")
    half = s.rotary_dim // 2
    assert (np.abs(cache[pos, :half] - hc) <= tol).all()
    assert (np.abs(cache[pos, half:] - hs) <= tol).all()


# ------------------------------------------------------------------ documented fields

def test_yarn_fields_reproduce_inv_freq():
    """inv_freq = interp*(1-mask) + extrap*mask, mask = (1 - clip((i-low)/(high-low))) *
    extrapolation_factor, exactly as the RopeScaling docstring says, with low/high the
    floor/ceil of YaRN's correction dims clamped to [0, R-1]."""
    for params, dim in [(dict(P["yarn-qwen2.5"]), 128), (dict(P["yarn-gpt-oss"]), 64)]:
        s = resolve_rope_scaling(params, dim)
        orig, theta = params["original_max_position_embeddings"], params["rope_theta"]
        raw = [dim * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(theta)) for b in (32, 1)]
        if params.get("truncate", True):
            assert (s.low, s.high) == (max(math.floor(raw[0]), 0), min(math.ceil(raw[1]), dim - 1))
        else:
            assert (s.low, s.high) == (max(raw[0], 0), min(raw[1], dim - 1))
        i = np.arange(dim // 2)
        extrap = theta ** (-np.arange(0, dim, 2) / dim)
        mask = (1 - np.clip((i - s.low) / (s.high - s.low), 0, 1)) * s.extrapolation_factor
        np.testing.assert_allclose(s.inv_freq, extrap / s.factor * (1 - mask) + extrap * mask, rtol=1e-15)
        assert 0 < s.low < s.high < dim // 2  # the ramp lies inside: all three regimes present
        assert s.inv_freq[0] == pytest.approx(extrap[0]) and s.inv_freq[-1] == pytest.approx(extrap[-1] / s.factor)


def test_yarn_empty_ramp_is_widened():
    """low == high (beta_fast == beta_slow, not truncated): high = low + 0.001 as
    transformers, so the documented mask formula needs no special case."""
    s = resolve_rope_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                              "beta_fast": 8, "beta_slow": 8, "truncate": False}, 128)
    assert s.high == s.low + 0.001
    assert np.isfinite(s.inv_freq).all()


def test_yarn_correction_range_by_hand():
    """(low, high) for Qwen2.5's parameters, computed here with math: 128 * ln(32768 / (32
    * 2 pi)) / (2 ln 1e6) = 23.6 -> 23, and for beta_slow 1: 39.6 -> 40."""
    low, high = yarn_correction_range(32, 1, 128, 1e6, 32768)
    assert (low, high) == (23.0, 40.0)
    low, high = yarn_correction_range(32, 1, 128, 1e6, 32768, truncate=False)
    assert low == pytest.approx(128 * math.log(32768 / (64 * math.pi)) / (2 * math.log(1e6)))
    assert yarn_get_mscale(1.0) == 1.0 and yarn_get_mscale(0.5, 3.0) == 1.0
    assert yarn_get_mscale(40.0, 0.707) == pytest.approx(0.1 * 0.707 * math.log(40) + 1)


def test_llama3_fields_and_reference_agree():
    """The llama3 fields feed rope_jit.reference's Llama 3.1 frequencies (the kernels'
    oracle) to the same values."""
    s = resolve_rope_scaling(P["llama3.1"], 128)
    assert (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position) == (8.0, 1.0, 4.0, 8192)
    want = reference.inv_frequencies(128, base=5e5, rope_scale=8.0, llama31=(1.0, 4.0, 8192))
    np.testing.assert_allclose(s.inv_freq, want, rtol=1e-15)


def test_llama3_equal_band_factors():
    """low_freq_factor == high_freq_factor: an empty smoothing band (vLLM's guard), every
    frequency either kept or divided, nothing NaN."""
    s = resolve_rope_scaling({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                              "high_freq_factor": 2.0, "original_max_position_embeddings": 8192}, 128)
    plain = 1e4 ** (-np.arange(0, 128, 2) / 128)
    wavelen = 2 * math.pi / plain
    np.testing.assert_allclose(s.inv_freq, np.where(wavelen > 4096, plain / 8, plain), rtol=1e-15)


def test_proportional_layout():
    """proportional: the whole head is the cache width; int(prf * head // 2) angles with
    exponents 2i/head_dim, frequency 0 after them (cos 1, sin 0: identity pairs)."""
    s = resolve_rope_scaling({"rope_type": "proportional", "partial_rotary_factor": 0.25,
                              "rope_theta": 1e6}, 256, max_position=16)
    assert s.rotary_dim == 256 and s.inv_freq.shape == (128,)
    np.testing.assert_allclose(s.inv_freq[:32], 1e6 ** (-np.arange(0, 64, 2) / 256), rtol=1e-15)
    assert (s.inv_freq[32:] == 0).all()
    cache = s.cos_sin_cache()
    assert (cache[:, 32:128] == 1).all() and (cache[:, 128 + 32:] == 0).all()


def test_resolved_values_are_read_only():
    """RopeScaling is frozen and its arrays and params cannot be changed behind it."""
    s = resolve_rope_scaling(P["longrope-phi3"], 96, max_position=8192)
    with pytest.raises(Exception):
        s.factor = 2.0
    for a in (s.inv_freq, s.short_inv_freq, s.long_inv_freq):
        with pytest.raises(ValueError):
            a[0] = 1.0
    with pytest.raises(TypeError):
        s.params["factor"] = 2.0


def test_yarn_factor_fallback_matches_transformers(hf):
    """factor None (DeepSeek-style configs): transformers' init function uses
    max_position_embeddings / original (its config validation insists on the key, so it
    is cleared after validation here; a missing key is refused, as its validation does)."""
    params = {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096,
              "rope_theta": 1e4}
    with float64_torch(hf.torch):
        cfg = hf_config(hf, dict(params), 64, 65536)
        cfg.rope_parameters["factor"] = None
        inv, attention = hf.init_functions["yarn"](cfg, "cpu")
    s = resolve_rope_scaling({**params, "factor": None}, 64, None, 65536)
    assert s.factor == 16.0
    np.testing.assert_allclose(s.inv_freq, inv.double().numpy(), rtol=1e-14)
    assert s.attention_factor == pytest.approx(attention, rel=1e-15)


def test_rope_theta_and_base():
    """rope_theta in the dict, or base; both given must agree; neither: 10000."""
    assert resolve_rope_scaling(None, 8).base == 10000.0
    assert resolve_rope_scaling({"rope_theta": 5e5}, 8).base == 5e5
    assert resolve_rope_scaling({}, 8, 5e5).base == 5e5
    assert resolve_rope_scaling({"rope_theta": 5e5}, 8, 5e5).base == 5e5
    with pytest.raises(ValueError, match=r"base: 10000.0 differs from rope_scaling\['rope_theta'\]"):
        resolve_rope_scaling({"rope_theta": 5e5}, 8, 10000.0)


def test_aliases():
    """'type' for 'rope_type' ('rope_type' wins when both are present, as transformers),
    'mrope' is default, 'su' is longrope."""
    assert resolve_rope_scaling({"type": "linear", "factor": 2.0}, 8).rope_type == "linear"
    assert resolve_rope_scaling({"type": "mrope", "rope_type": "yarn", "factor": 2.0,
                                 "original_max_position_embeddings": 64}, 8).rope_type == "yarn"
    m = resolve_rope_scaling({"type": "mrope", "mrope_section": [1, 1, 2]}, 8)
    assert m.rope_type == "default" and m.mrope_section == (1, 1, 2)
    su = resolve_rope_scaling({"type": "su", "short_factor": [1, 1], "long_factor": [2, 2],
                               "original_max_position_embeddings": 16}, 4, max_position=64)
    assert su.rope_type == "longrope"


# ------------------------------------------------------------------ vLLM layouts by hand

def test_deepseek_yarn_by_hand():
    """vLLM's DeepseekScalingRotaryEmbedding: mscale = (0.1 m ln f + 1) / (0.1 m_all ln f
    + 1) * attn_factor on cos and sin, the ramp mask times extrapolation_factor, the cache
    ceil(original * factor) rows; every value computed here with math."""
    theta, dim, orig, f = 1e4, 64, 1001, 2.5
    params = {"rope_type": "deepseek_yarn", "factor": f, "original_max_position_embeddings": orig,
              "mscale": 1.0, "mscale_all_dim": 0.5, "attn_factor": 1.2, "extrapolation_factor": 0.5,
              "beta_fast": 32, "beta_slow": 1, "rope_theta": theta}
    s = resolve_rope_scaling(params, dim)
    mscale = (0.1 * 1.0 * math.log(f) + 1) / (0.1 * 0.5 * math.log(f) + 1) * 1.2
    assert s.attention_factor == pytest.approx(mscale, rel=1e-15)
    assert s.cache_length == 2503  # ceil(1001 * 2.5): torch.arange of a float
    low = math.floor(dim * math.log(orig / (32 * 2 * math.pi)) / (2 * math.log(theta)))
    high = math.ceil(dim * math.log(orig / (1 * 2 * math.pi)) / (2 * math.log(theta)))
    low, high = max(low, 0), min(high, dim - 1)
    assert (s.low, s.high) == (low, high)
    want = []
    for i in range(dim // 2):
        extrap = 1.0 / theta ** (2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        mask = (1 - ramp) * 0.5
        want.append(extrap / f * (1 - mask) + extrap * mask)
    np.testing.assert_allclose(s.inv_freq, want, rtol=1e-15)
    cache = rope_jit.compute_cos_sin_cache(dim, 16, rope_scaling=params)
    assert cache.shape == (2503, dim)
    for p in (0, 1, 700, 2502):
        row = [math.cos(p * w) * mscale for w in want] + [math.sin(p * w) * mscale for w in want]
        np.testing.assert_array_equal(cache[p], reference.round_to(np.array(row), "float32"))


def test_deepseek_yarn_versus_yarn():
    """With mscale and mscale_all_dim both given (DeepSeek-V2/V3 configs) deepseek_yarn and
    transformers' yarn agree; with only mscale, transformers ignores it and vLLM does not."""
    base = {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
    for ms in ({"mscale": 0.707, "mscale_all_dim": 0.707}, {"mscale": 1.0, "mscale_all_dim": 0.5}):
        a = resolve_rope_scaling({"rope_type": "yarn", **base, **ms}, 64)
        b = resolve_rope_scaling({"rope_type": "deepseek_yarn", **base, **ms}, 64)
        np.testing.assert_array_equal(a.inv_freq, b.inv_freq)
        assert a.attention_factor == pytest.approx(b.attention_factor, rel=1e-15)
    a = resolve_rope_scaling({"rope_type": "yarn", **base, "mscale": 0.5}, 64)
    b = resolve_rope_scaling({"rope_type": "deepseek_yarn", **base, "mscale": 0.5}, 64)
    assert a.attention_factor == pytest.approx(0.1 * math.log(40) + 1)
    assert b.attention_factor == pytest.approx(0.05 * math.log(40) + 1)


def test_longrope_layout_by_hand():
    """vLLM's Phi3LongRoPEScaledRotaryEmbedding layout: rows [0, orig) the short table at
    positions 0.., rows [orig, orig + max_position) the long table at positions 0..; both
    times sqrt(1 + ln(max/orig) / ln(orig)); row_offset(seq_len) says which a batch reads."""
    short, long = [1.0, 1.5, 2.0, 4.0], [1.0, 3.0, 9.0, 27.0]
    orig, max_pos, dim, theta = 64, 512, 8, 1e4
    params = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
              "original_max_position_embeddings": orig}
    s = resolve_rope_scaling(params, dim, theta, max_pos)
    af = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    assert s.attention_factor == pytest.approx(af, rel=1e-15)
    assert s.cache_length == orig + max_pos
    cache = rope_jit.compute_cos_sin_cache(dim, max_pos, rope_scaling=params).astype(np.float64)
    assert cache.shape == (orig + max_pos, dim)

    def row(p, factors):
        inv = [1.0 / (factors[i] * theta ** (2 * i / dim)) for i in range(dim // 2)]
        return reference.round_to(np.array([math.cos(p * w) * af for w in inv]
                                            + [math.sin(p * w) * af for w in inv]), "float32")

    for p in (0, 5, orig - 1):
        np.testing.assert_array_equal(cache[p], row(p, short))
    for p in (0, 5, orig, max_pos - 1):
        np.testing.assert_array_equal(cache[orig + p], row(p, long))
    assert [s.row_offset(n) for n in (0, 1, orig, orig + 1, max_pos)] == [0, 0, 0, orig, orig]
    # inv_freq follows seq_len (transformers: long when seq_len > original)
    np.testing.assert_array_equal(s.inv_freq, s.short_inv_freq)
    np.testing.assert_array_equal(resolve_rope_scaling(params, dim, theta, max_pos, seq_len=orig).inv_freq,
                                  s.short_inv_freq)
    np.testing.assert_array_equal(resolve_rope_scaling(params, dim, theta, max_pos, seq_len=orig + 1).inv_freq,
                                  s.long_inv_freq)


def test_longrope_mscale_overrides():
    """vLLM's short_mscale / long_mscale replace the factor when equal; different ones
    cannot share one attention_factor and are refused."""
    params = {"rope_type": "longrope", "short_factor": [1, 1], "long_factor": [2, 2],
              "original_max_position_embeddings": 16}
    assert resolve_rope_scaling({**params, "short_mscale": 1.3, "long_mscale": 1.3}, 4,
                                max_position=64).attention_factor == 1.3
    with pytest.raises(ValueError, match=r"short_mscale.*differs.*long_mscale"):
        resolve_rope_scaling({**params, "short_mscale": 1.0, "long_mscale": 1.3}, 4, max_position=64)


@pytest.mark.parametrize("params, max_pos, rows", [
    (None, 100, 100),
    ({"rope_type": "linear", "factor": 4.0}, 100, 400),
    ({"rope_type": "linear", "factor": 2.5}, 101, 253),                 # ceil(252.5)
    ({"rope_type": "dynamic", "factor": 4.0}, 100, 100),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 50}, 100, 100),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 50}, 100, 200),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 50}, 300, 300),
    ({"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 50}, 10, 200),
    ({"rope_type": "longrope", "short_factor": [1] * 4, "long_factor": [2] * 4,
      "original_max_position_embeddings": 50}, 100, 150),
    ({"rope_type": "proportional", "partial_rotary_factor": 0.5}, 100, 100),
    ({"rope_type": "default", "mrope_section": [2, 1, 1]}, 100, 400),
    ({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 50,
      "mrope_section": [2, 1, 1]}, 100, 800),
], ids=["none", "linear", "linear-ceil", "dynamic", "llama3", "yarn", "yarn-max", "deepseek",
        "longrope", "proportional", "mrope", "mrope-yarn"])
def test_cache_rows(params, max_pos, rows):
    """Rows per variant, as vLLM's classes size them (module docstring of scaling)."""
    assert resolve_rope_scaling(params, 8, None, max_pos).cache_length == rows
    assert rope_jit.compute_cos_sin_cache(8, max_pos, rope_scaling=params).shape == (rows, 8)


# ------------------------------------------------------------------ compute_cos_sin_cache

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_default_dict_is_the_plain_cache(dtype):
    """rope_scaling={'rope_type': 'default'} (or None) is bit-identical to the plain cache,
    and a dict's rope_theta applies when base is left at its default."""
    plain = rope_jit.compute_cos_sin_cache(64, 300, base=5e5, dtype=dtype)
    for d in ({"rope_type": "default"}, {"type": "default", "factor": 8.0}):
        got = rope_jit.compute_cos_sin_cache(64, 300, base=5e5, dtype=dtype, rope_scaling=d)
        assert got.tobytes() == plain.tobytes()
    got = rope_jit.compute_cos_sin_cache(64, 300, dtype=dtype, rope_scaling={"rope_theta": 5e5})
    assert got.tobytes() == plain.tobytes()
    with pytest.raises(ValueError, match=r"base: 20000.0 differs"):
        rope_jit.compute_cos_sin_cache(64, 300, base=20000.0, rope_scaling={"rope_theta": 5e5})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cache_is_float64_rounded_once(dtype):
    """Every variant's cache is its float64 cache (cos_sin_cache_float64, checked against
    transformers above) rounded once to the dtype, also across the 8192-row blocks it is
    built in."""
    for params, dim, max_pos in [(P["yarn-qwen2.5"], 128, 20000), (P["longrope-phi3"], 96, 9000),
                                 (P["dynamic-4-partial"], 128, 9000)]:
        s = resolve_rope_scaling(params, dim, None, max_pos)
        want = reference.round_to(s.cos_sin_cache_float64(), dtype)
        got = rope_jit.compute_cos_sin_cache(dim, max_pos, dtype=dtype, rope_scaling=params)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def test_cache_like_torch_cpu():
    """like= a torch tensor: same values, the caller's framework."""
    torch = pytest.importorskip("torch")
    params = P["llama3.1"]
    t = rope_jit.compute_cos_sin_cache(128, 64, dtype="bfloat16", rope_scaling=params,
                                       like=torch.zeros(1))
    host = rope_jit.compute_cos_sin_cache(128, 64, dtype="bfloat16", rope_scaling=params)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and tuple(t.shape) == host.shape
    np.testing.assert_array_equal(t.view(torch.int16).numpy(), host.view(np.int16))


def test_partial_rotary_width():
    """partial_rotary_factor in the dict narrows the cache to int(rotary_dim * factor)."""
    c = rope_jit.compute_cos_sin_cache(80, 10, rope_scaling={"partial_rotary_factor": 0.4})
    assert c.shape == (10, 32)
    np.testing.assert_array_equal(c, rope_jit.compute_cos_sin_cache(32, 10))


# ------------------------------------------------------------------ on the fly

def _kernel_frequencies(rot, on_the_fly):
    """The kernel's frequency formulation fed with the launcher's values
    (tests/test_api_cpu.py writes it once)."""
    from test_api_cpu import _kernel_frequencies as kernel_frequencies

    return kernel_frequencies(rot, on_the_fly)


@pytest.mark.parametrize("params, rot", [
    ({"rope_type": "default", "rope_theta": 5e5}, 128),
    ({"rope_type": "linear", "factor": 4.0}, 64),
    (P["llama3.1"], 128), (P["llama3.2"], 64),
    (P["yarn-qwen2.5"], 128), (P["yarn-deepseek-v3"], 64), (P["yarn-gpt-oss"], 64), (P["yarn-mscale-ratio"], 96),
    ({"rope_type": "deepseek_yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
      "mscale": 1.0, "mscale_all_dim": 0.5}, 64),
    ({"rope_type": "deepseek_yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
      "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096}, 20),
    ({"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.8, "beta_fast": 16,
      "beta_slow": 2, "original_max_position_embeddings": 2048}, 128),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 4, "beta_slow": 4,
      "original_max_position_embeddings": 1024}, 64),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 20),
    (P["llama3.1"], 20), ({"rope_type": "linear", "factor": 3.0}, 20), ({"rope_type": "default"}, 20),
], ids=["default", "linear", "llama3.1", "llama3.2", "yarn-qwen", "yarn-dsv3", "yarn-notrunc",
        "yarn-mscale", "deepseek_yarn", "deepseek_yarn-r20", "yarn-attention-factor",
        "yarn-empty-ramp", "yarn-r20", "llama3.1-r20", "linear-r20", "default-r20"])
def test_on_the_fly_variant_reproduces_the_cache_frequencies(params, rot):
    """The on-the-fly parameters, through the launcher and the kernel's formulation, give
    the frequencies and attention factor of the cache variant."""
    fly = on_the_fly_variant(params, rot)
    s = resolve_rope_scaling(params, rot)
    got, attention = _kernel_frequencies(rot, fly)
    np.testing.assert_allclose(got, s.inv_freq, rtol=1e-13)
    assert attention == pytest.approx(s.attention_factor, rel=1e-15)
    assert fly.freq_exponent == -2.0 * math.log2(s.base) / rot


def test_on_the_fly_variant_theta_rules():
    """The dict's rope_theta wins over FlashInfer's default 1e4; another explicit value
    must agree with it; without one in the dict the argument applies."""
    exponent = -2.0 * math.log2(5e5) / 64
    assert on_the_fly_variant({"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}, 64).freq_exponent == exponent
    assert on_the_fly_variant({"rope_type": "linear", "factor": 2.0}, 64, 5e5).freq_exponent == exponent
    with pytest.raises(ValueError, match="differs"):
        on_the_fly_variant({"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}, 64, 2e5)


@pytest.mark.parametrize("params, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, r"'dynamic' is not available on the fly"),
    (P["longrope-phi3"], r"'longrope' is not available on the fly"),
    ({"rope_type": "proportional", "partial_rotary_factor": 0.5}, r"'proportional' is not available on the fly"),
    ({"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 64,
      "extrapolation_factor": 0.5}, r"\['extrapolation_factor'\]: 0.5 is not available on the fly"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, r"partial_rotary_factor"),
    ("linear", r"rope_scaling: expected a dict"),
])
def test_on_the_fly_variant_refuses(params, match):
    with pytest.raises(ValueError, match=match):
        on_the_fly_variant(params, 96 if isinstance(params, dict) and params.get("short_factor") else 64)


# ------------------------------------------------------------------ mRoPE selection

@pytest.mark.parametrize("model, section, interleaved", [
    ("qwen2_vl", [16, 24, 24], False), ("qwen3_vl", [24, 20, 20], True)])
def test_mrope_cos_sin_matches_transformers(hf, model, section, interleaved):
    """mrope_cos_sin of the cache at [3, T] positions equals transformers' Qwen2-VL /
    Qwen3-VL text rotary embedding (float64 run) rounded to float32 within half an ulp."""
    import importlib

    torch = hf.torch
    mod = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    cfg_mod = importlib.import_module(f"transformers.models.{model}.configuration_{model}")
    if model == "qwen2_vl":
        cfg = cfg_mod.Qwen2VLTextConfig(hidden_size=1536, num_attention_heads=12, max_position_embeddings=4096,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": section})
        cls = mod.Qwen2VLRotaryEmbedding
    else:
        cfg = cfg_mod.Qwen3VLTextConfig(hidden_size=1536, num_attention_heads=12, head_dim=128,
                                        max_position_embeddings=4096,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": section,
                                                         "mrope_interleaved": True})
        cls = mod.Qwen3VLTextRotaryEmbedding
    rng = np.random.default_rng(7)
    pos = rng.integers(0, 4000, (3, 50))
    pos[:, :5] = 17  # text tokens: three equal rows
    with float64_torch(torch):
        cos, sin = cls(cfg)(torch.zeros(1, dtype=torch.float64), torch.as_tensor(pos)[:, None, :])
    cos, sin = cos[0, :, :64].double().numpy(), sin[0, :, :64].double().numpy()
    params = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section,
              "mrope_interleaved": interleaved}
    cache = rope_jit.compute_cos_sin_cache(128, 1024, rope_scaling=params)
    assert cache.shape == (4096, 128)
    c, s = mrope_cos_sin(cache, pos, section, interleaved)
    assert c.shape == (50, 64)
    for got, want in ((c, cos), (s, sin)):
        assert (np.abs(got - want) <= 0.5 * reference.ulp(want, "float32") + 1e-12).all()
    plain_c, _ = reference.cos_sin_from_cache(cache, pos[0, :5])
    np.testing.assert_array_equal(c[:5], plain_c)  # text tokens: plain RoPE


def test_mrope_cos_sin_bad_input():
    with pytest.raises(ValueError, match=r"positions: expected shape \[3, num_tokens\]"):
        mrope_cos_sin(np.zeros((4, 8)), np.zeros((2, 5), np.int64), (1, 1, 2))
    with pytest.raises(ValueError, match=r"mrope_section: \[1, 1, 1\] sums to 3, the cache has 4"):
        mrope_cos_sin(np.zeros((4, 8)), np.zeros((3, 5), np.int64), (1, 1, 1))


# ------------------------------------------------------------------ bad input

LINEAR = {"rope_type": "linear", "factor": 2.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
LLAMA = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}
LONG = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 64}


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("params, kwargs, match", [
    ({"rope_type": "ntk", "factor": 2.0}, {}, r"rope_scaling\['rope_type'\]: unknown RoPE type 'ntk'"),
    ({"type": "axial"}, {}, r"unknown RoPE type 'axial'.*vision"),
    ({"rope_type": 3}, {}, r"rope_type'\]: expected a string"),
    ("yarn", {}, r"rope_scaling: expected a dict or None, got str"),
    ({"rope_type": "linear"}, {}, r"rope_scaling\['factor'\]: required for rope_type 'linear'"),
    ({"rope_type": "dynamic"}, dict(max_position=64), r"\['factor'\]: required for rope_type 'dynamic'"),
    ({"rope_type": "dynamic", "alpha": 1000}, dict(max_position=64), r"\['alpha'\]: dynamic NTK-alpha"),
    ({"rope_type": "dynamic", "factor": 2.0}, {}, r"max_position: required \(>= 1\) for rope_type 'dynamic'"),
    (_without(YARN, "original_max_position_embeddings"), {},
     r"\['original_max_position_embeddings'\]: required for rope_type 'yarn'"),
    (_without(YARN, "factor"), dict(max_position=65536), r"\['factor'\]: required for rope_type 'yarn'$"),
    ({**YARN, "factor": None}, {}, r"\['factor'\]: required for rope_type 'yarn' \(or give max_position"),
    ({**YARN, "rope_type": "deepseek_yarn", "factor": None}, dict(max_position=512),
     r"\['factor'\]: required for rope_type 'deepseek_yarn'"),
    (_without(LLAMA, "low_freq_factor"), {}, r"\['low_freq_factor'\]: required for rope_type 'llama3'"),
    (_without(LLAMA, "high_freq_factor"), {}, r"\['high_freq_factor'\]: required"),
    (_without(LLAMA, "original_max_position_embeddings"), {}, r"original_max_position_embeddings'\]: required"),
    (_without(LONG, "short_factor"), dict(max_position=512), r"\['short_factor'\]: required for rope_type 'longrope'"),
    (_without(LONG, "long_factor"), dict(max_position=512), r"\['long_factor'\]: required"),
    (LONG, {}, r"\['factor'\]: required for rope_type 'longrope' \(or give max_position"),
    ({**LINEAR, "factor": 0}, {}, r"\['factor'\]: expected a number > 0, got 0"),
    ({**LINEAR, "factor": -2.0}, {}, r"\['factor'\]: expected a number > 0"),
    ({**LINEAR, "factor": math.nan}, {}, r"\['factor'\]: expected a finite number"),
    ({**LINEAR, "factor": math.inf}, {}, r"\['factor'\]: expected a finite number"),
    ({**LINEAR, "factor": "2"}, {}, r"\['factor'\]: expected a finite number for rope_type 'linear', got '2'"),
    ({**LINEAR, "factor": True}, {}, r"\['factor'\]: expected a finite number"),
    ({**YARN, "beta_fast": 1, "beta_slow": 32}, {}, r"\['beta_fast'\]: must be >= beta_slow"),
    ({**YARN, "beta_slow": -1}, {}, r"\['beta_slow'\]: expected a number > 0"),
    ({**YARN, "attention_factor": 0.0}, {}, r"\['attention_factor'\]: expected a number > 0"),
    ({**YARN, "mscale": -1.0}, {}, r"\['mscale'\]: expected a number >= 0"),
    ({**YARN, "truncate": "no"}, {}, r"\['truncate'\]: expected a bool"),
    ({**YARN, "original_max_position_embeddings": 64.5}, {},
     r"\['original_max_position_embeddings'\]: expected an integer >= 1, got 64.5"),
    ({**YARN, "original_max_position_embeddings": 0}, {}, r"original_max_position_embeddings'\]: expected an integer >= 1"),
    ({**LLAMA, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, {}, r"\['high_freq_factor'\]: must be >= low_freq_factor"),
    ({**LLAMA, "low_freq_factor": 0.0}, {}, r"\['low_freq_factor'\]: expected a number > 0"),
    ({**LONG, "short_factor": [1.0] * 3}, dict(max_position=512), r"\['short_factor'\]: expected 4 numbers \(rotary_dim/2\), got 3"),
    ({**LONG, "long_factor": [1.0, 0.0, 1.0, 1.0]}, dict(max_position=512), r"\['long_factor'\]: expected finite numbers > 0"),
    ({**LONG, "long_factor": [1.0, "x", 1.0, 1.0]}, dict(max_position=512), r"\['long_factor'\]: expected finite numbers > 0"),
    ({**LONG, "long_factor": 2.0}, dict(max_position=512), r"\['long_factor'\]: expected a list of 4 numbers"),
    ({"partial_rotary_factor": 0.0}, {}, r"\['partial_rotary_factor'\]: expected a number in \(0, 1\]"),
    ({"partial_rotary_factor": 1.5}, {}, r"\['partial_rotary_factor'\]"),
    ({"partial_rotary_factor": 0.1}, {}, r"rotary_dim: int\(rotary_dim \* partial_rotary_factor\) = int\(8 \* 0.1\) = 0"),
    ({"rope_theta": 1.0}, {}, r"\['rope_theta'\]: expected a finite number > 0 and != 1"),
    ({"rope_theta": "1e4"}, {}, r"\['rope_theta'\]: expected a finite number"),
    ({}, dict(base=-5.0), r"base: expected a finite number > 0 and != 1"),
    ({}, dict(rotary_dim=0), r"rotary_dim: expected a positive even integer"),
    ({}, dict(rotary_dim=7), r"rotary_dim: int\(rotary_dim \* partial_rotary_factor\) = int\(7 \* 1.0\) = 7"),
    ({}, dict(rotary_dim=8.0), r"rotary_dim: expected a positive even integer"),
    ({"rope_type": "dynamic", "factor": 2.0}, dict(rotary_dim=2, max_position=64), r"rotary_dim: dynamic NTK needs"),
    ({}, dict(max_position=-1), r"max_position: expected an integer >= 0"),
    ({}, dict(seq_len=2.5), r"seq_len: expected an integer >= 0"),
    ({"mrope_section": [1, 1, 1]}, {}, r"\['mrope_section'\]: the sections \[1, 1, 1\] must sum to rotary_dim/2 = 4"),
    ({"mrope_section": [2, 2]}, {}, r"\['mrope_section'\]: expected 3 non-negative integers"),
    ({"mrope_section": [2, -1, 3]}, {}, r"\['mrope_section'\]: expected 3 non-negative integers"),
    ({"mrope_interleaved": True}, {}, r"\['mrope_interleaved'\]: needs mrope_section"),
    ({"mrope_section": [2, 1, 1], "mrope_interleaved": 1}, {}, r"\['mrope_interleaved'\]: expected a bool"),
    ({**LONG, "mrope_section": [2, 1, 1]}, dict(max_position=512), r"not supported with rope_type 'longrope'"),
], ids=lambda v: None)
def test_bad_parameters(params, kwargs, match):
    """ValueError naming the parameter and what was expected."""
    args = dict(rotary_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        resolve_rope_scaling(params, **args)


def test_bad_parameters_through_compute_cos_sin_cache():
    """compute_cos_sin_cache reports the same errors, and builds nothing."""
    with pytest.raises(ValueError, match=r"unknown RoPE type 'ntk'"):
        rope_jit.compute_cos_sin_cache(8, 4, rope_scaling={"rope_type": "ntk"})
    with pytest.raises(ValueError, match=r"\['factor'\]: required for rope_type 'llama3'"):
        rope_jit.compute_cos_sin_cache(8, 4, rope_scaling=_without(LLAMA, "factor"))
    with pytest.raises(TypeError, match=r"^like: "):
        rope_jit.compute_cos_sin_cache(8, 4, rope_scaling=LINEAR, like=object())


def test_unknown_keys_warn_known_ones_do_not():
    """A key no variant reads (a typo) warns, naming it; keys of other variants that real
    configs carry next to their own (factor on default, mrope_section) do not."""
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['beta_fsat'\]"):
        resolve_rope_scaling({**YARN, "beta_fsat": 16}, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_rope_scaling({"rope_type": "default", "factor": 8.0, "type": "mrope",
                              "mrope_section": [2, 1, 1], "original_max_position_embeddings": 4}, 8)


def test_cache_needs_max_position():
    """A variant whose rows depend on max_position cannot build without it."""
    s = resolve_rope_scaling(LINEAR, 8)
    assert s.cache_length is None
    with pytest.raises(ValueError, match=r"max_position: required to build the cache of rope_type 'linear'"):
        s.cos_sin_cache()
    with pytest.raises(TypeError, match=r"dtype: expected float16, bfloat16 or float32"):
        resolve_rope_scaling(None, 8, max_position=4).cos_sin_cache("float64")
