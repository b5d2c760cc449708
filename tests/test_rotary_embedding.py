"""get_rope / RotaryEmbedding / MRotaryEmbedding / rope_from_hf_config.

CPU: construction, validation, caches (shape, dtype, values), HuggingFace config parsing
(Llama-3.1, Qwen2, Qwen2.5 + YaRN, DeepSeek-V3, Phi-3 LongRoPE, Qwen2-VL, Phi-2, GPT-J,
Gemma-3-style per-layer parameters) checked against transformers' own rotary embedding
of each model, dynamic NTK's state against transformers' ``dynamic_rope_update``, and
``forward``'s call into the kernel API (recorded, then applied with the float64 reference
and compared with transformers' ``apply_rotary_pos_emb``).

GPU (marker ``gpu``): forward on CUDA tensors against the float64 reference fed the same
cache rows, and against the exact float64 formula, for every variant.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import numpy as np
import pytest

import rope_jit
from rope_jit import reference, rotary_embedding
from rope_jit.rotary_embedding import MRotaryEmbedding, RotaryEmbedding, get_rope, rope_from_hf_config
from rope_jit.reference import mrope_cos_sin


EPS32 = 2.0 ** -24


@pytest.fixture(autouse=True)
def fresh_rope_cache():
    """get_rope shares objects (and dynamic NTK state) between equal calls: each test
    starts from an empty table."""
    rotary_embedding._ROPE_CACHE.clear()
    yield
    rotary_embedding._ROPE_CACHE.clear()


# ------------------------------------------------------------------ HF configs, inline

def _phi3_factors(n, top, seed):
    rng = np.random.default_rng(seed)
    return [round(float(v), 6) for v in np.sort(rng.uniform(1.0, top, n))]


LLAMA31_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
QWEN2_7B = {
    "model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": None,
}
QWEN25_7B_YARN = {  # Qwen2.5's documented long-context setting
    **QWEN2_7B, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}
PHI3_MINI_128K = {
    "model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
    "rope_scaling": {"type": "longrope", "short_factor": _phi3_factors(48, 1.2, 1),
                     "long_factor": _phi3_factors(48, 60.0, 2)},
}
QWEN2_VL_7B = {
    "model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
PHI2 = {
    "model_type": "phi", "hidden_size": 2560, "num_attention_heads": 32, "max_position_embeddings": 2048,
    "partial_rotary_factor": 0.4, "rope_theta": 10000.0,
}
GPTJ_6B = {"model_type": "gptj", "n_embd": 4096, "n_head": 16, "n_positions": 2048, "rotary_dim": 64}
GEMMA3_STYLE = {
    "model_type": "gemma3_text", "hidden_size": 2560, "num_attention_heads": 8, "head_dim": 256,
    "max_position_embeddings": 131072,
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
}

# (config, class, rope_type, head_size, rotary_dim, cache rows, is_neox, attention factor)
PARSED = [
    ("llama3.1-8b", LLAMA31_8B, RotaryEmbedding, "llama3", 128, 128, 131072, True, 1.0),
    ("qwen2-7b", QWEN2_7B, RotaryEmbedding, "default", 128, 128, 32768, True, 1.0),
    ("qwen2.5-7b-yarn", QWEN25_7B_YARN, RotaryEmbedding, "yarn", 128, 128, 131072, True,
     0.1 * math.log(4.0) + 1),
    ("deepseek-v3", DEEPSEEK_V3, RotaryEmbedding, "yarn", 64, 64, 163840, False, 1.0),
    ("phi3-mini-128k", PHI3_MINI_128K, RotaryEmbedding, "longrope", 96, 96, 4096 + 131072, True,
     math.sqrt(1 + math.log(32) / math.log(4096))),
    ("qwen2-vl-7b", QWEN2_VL_7B, MRotaryEmbedding, "default", 128, 128, 4 * 32768, True, 1.0),
    ("phi-2", PHI2, RotaryEmbedding, "default", 80, 32, 2048, True, 1.0),
    ("gpt-j-6b", GPTJ_6B, RotaryEmbedding, "default", 256, 64, 2048, False, 1.0),
]


@pytest.mark.parametrize("name, config, cls, rope_type, head, rot, rows, neox, attention", PARSED,
                         ids=[p[0] for p in PARSED])
def test_rope_from_hf_config_dicts(name, config, cls, rope_type, head, rot, rows, neox, attention):
    """config.json dicts: the variant, dims, rows, style and attention factor each model's
    transformers / vLLM implementation uses; the cache equals compute_cos_sin_cache of
    the same parameters bit for bit."""
    rope = rope_from_hf_config(config)
    assert type(rope) is cls
    assert rope.scaling.rope_type == rope_type
    assert (rope.head_size, rope.rotary_dim) == (head, rot)
    assert rope.is_neox_style is neox
    assert rope.scaling.attention_factor == pytest.approx(attention, rel=1e-15)
    assert rope.dtype == "float32"
    if rows <= 40000:  # the big caches are built by the CPU suite elsewhere; keep this quick
        cache = rope.get_cos_sin_cache()
        assert cache.shape == (rows, rot) and cache.dtype == np.float32
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        if "partial_rotary_factor" in config:
            params["partial_rotary_factor"] = config["partial_rotary_factor"]
        elif "rotary_dim" in config:
            params["partial_rotary_factor"] = config["rotary_dim"] / head
        want = rope_jit.compute_cos_sin_cache(head, rope.max_position_embeddings, rope_scaling=params)
        assert cache.tobytes() == want.tobytes()
    else:
        assert rope.scaling.cache_length == rows


def test_rope_from_hf_config_details():
    """max_position override, dtype, explicit style, MLA head dim, Phi-3's top-level
    original length winning over the dict's, per-layer-type parameters."""
    r = rope_from_hf_config(LLAMA31_8B, dtype="bfloat16", max_position=4096, is_neox_style=False)
    assert (r.max_position_embeddings, r.dtype, r.is_neox_style) == (4096, "bfloat16", False)
    assert r.get_cos_sin_cache().shape == (4096, 128)
    phi3 = {**PHI3_MINI_128K, "rope_scaling": {**PHI3_MINI_128K["rope_scaling"],
                                               "original_max_position_embeddings": 2048}}
    assert rope_from_hf_config(phi3).scaling.original_max_position == 4096  # transformers: top-level wins
    full = rope_from_hf_config(GEMMA3_STYLE, layer_type="full_attention")
    local = rope_from_hf_config(GEMMA3_STYLE, layer_type="sliding_attention")
    assert (full.scaling.rope_type, full.scaling.factor, full.base) == ("linear", 8.0, 1e6)
    assert (local.scaling.rope_type, local.base, local.head_size) == ("default", 10000.0, 256)
    with pytest.raises(ValueError, match=r"layer_type: the config has per-layer-type rope_parameters"):
        rope_from_hf_config(GEMMA3_STYLE)
    with pytest.raises(ValueError, match=r"layer_type: 'global' not in rope_parameters"):
        rope_from_hf_config(GEMMA3_STYLE, layer_type="global")
    with pytest.raises(ValueError, match=r"layer_type: the config's rope_parameters are not per layer type"):
        rope_from_hf_config(LLAMA31_8B, layer_type="full_attention")
    with pytest.raises(ValueError, match=r"config: needs head_dim, or hidden_size and num_attention_heads"):
        rope_from_hf_config({"max_position_embeddings": 8})
    with pytest.raises(ValueError, match=r"max_position: the config has no max_position_embeddings"):
        rope_from_hf_config({"head_dim": 64})
    # transformers 5 layout: everything inside rope_parameters
    t5 = {"hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 131072,
          "rope_parameters": {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}}
    assert rope_from_hf_config(t5).scaling.inv_freq.tobytes() == \
        rope_from_hf_config(LLAMA31_8B).scaling.inv_freq.tobytes()


# model module, rotary class, configs: transformers' own rotary embedding of each model
HF_MODELS = [
    ("llama3.1-8b", LLAMA31_8B, "llama", "LlamaRotaryEmbedding"),
    ("qwen2-7b", QWEN2_7B, "qwen2", "Qwen2RotaryEmbedding"),
    ("qwen2.5-7b-yarn", QWEN25_7B_YARN, "qwen2", "Qwen2RotaryEmbedding"),
    ("deepseek-v3", DEEPSEEK_V3, "deepseek_v3", "DeepseekV3RotaryEmbedding"),
    ("phi3-mini-128k", PHI3_MINI_128K, "phi3", "Phi3RotaryEmbedding"),
    ("qwen2-vl-7b", QWEN2_VL_7B, "qwen2_vl", "Qwen2VLRotaryEmbedding"),
    ("phi-2", PHI2, "phi", "PhiRotaryEmbedding"),
]


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    tf.logging.set_verbosity_error()
    return tf


def _hf_model_rope(transformers, config, module, cls_name):
    cfg = transformers.AutoConfig.for_model(**config)
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    text = getattr(cfg, "text_config", None) or cfg
    return cfg, getattr(mod, cls_name)(text)


@pytest.mark.parametrize("name, config, module, cls_name", HF_MODELS, ids=[m[0] for m in HF_MODELS])
def test_parsing_matches_transformers_models(transformers, name, config, module, cls_name):
    """The config parsed by rope_from_hf_config, as a dict and as transformers' config
    object, gives the frequencies (float32 rounding: (4 + ln base + 3 (factor-1) for the
    blends) * 2**-24, see test_scaling) and the attention factor of that model's own
    transformers rotary embedding."""
    cfg, hf_rope = _hf_model_rope(transformers, config, module, cls_name)
    for source in (config, cfg):
        rope = rope_from_hf_config(source)
        want = hf_rope.inv_freq.double().numpy()
        got = rope.scaling.inv_freq
        assert got.shape == want.shape
        s = rope.scaling
        k = 4 + math.log(s.base) + (3 * (s.factor - 1) if s.rope_type in ("yarn", "llama3") else 0)
        assert (np.abs(got - want) / got).max() <= k * EPS32
        assert s.attention_factor == pytest.approx(hf_rope.attention_scaling, rel=1e-15)


# ------------------------------------------------------------------ get_rope

VARIANTS = [
    ("default", None),
    ("linear", {"rope_type": "linear", "factor": 2.0}),
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0}),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    ("deepseek_yarn", {"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                       "mscale": 0.707, "mscale_all_dim": 0.5}),
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128}),
    ("longrope", {"rope_type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(32)],
                  "long_factor": [1.0 + 0.5 * i for i in range(32)], "original_max_position_embeddings": 256}),
    ("proportional", {"rope_type": "proportional", "partial_rotary_factor": 0.5}),
    ("mrope", {"rope_type": "default", "mrope_section": [8, 12, 12]}),
    ("mrope-interleaved-yarn", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512,
                                "mrope_section": [12, 10, 10], "mrope_interleaved": True}),
]


@pytest.mark.parametrize("name, params", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_get_rope_every_variant(name, params, dtype):
    """One object per variant: vLLM's attributes, the subclass for mRoPE, the host cache of
    the requested dtype (float32 by default) equal to compute_cos_sin_cache."""
    rope = get_rope(64, 64, 1024, 10000.0, True, params, dtype)
    assert type(rope) is (MRotaryEmbedding if "mrope" in name else RotaryEmbedding)
    assert (rope.head_size, rope.rotary_dim, rope.max_position_embeddings, rope.base) == (64, 64, 1024, 10000.0)
    assert rope.dtype == (dtype or "float32") and rope.is_neox_style is True
    cache = rope.cos_sin_cache  # before any device use: the host cache
    want = rope_jit.compute_cos_sin_cache(64, 1024, dtype=dtype or "float32", rope_scaling=params)
    assert cache.shape == want.shape == (rope.scaling.cache_length, 64)
    assert cache.tobytes() == want.tobytes()
    assert rope.get_cos_sin_cache() is cache  # built once
    if "mrope" in name:
        assert rope.mrope_section == list(params["mrope_section"])
        assert rope.mrope_interleaved is params.get("mrope_interleaved", False)


def test_get_rope_shares_objects():
    """Equal arguments (lists or tuples alike) return the same object; any difference, a
    new one."""
    a = get_rope(64, 64, 1024, 10000.0, True, {"rope_type": "longrope", "short_factor": [1.0] * 32,
                                              "long_factor": [2.0] * 32, "original_max_position_embeddings": 256})
    b = get_rope(64, 64, 1024, 10000.0, True, {"rope_type": "longrope", "short_factor": (1.0,) * 32,
                                              "long_factor": (2.0,) * 32, "original_max_position_embeddings": 256})
    assert a is b
    assert get_rope(64, 64, 1024, 10000.0) is get_rope(64, 64, 1024, 10000.0, True, None, None)
    assert get_rope(64, 64, 1024, 10000.0) is not get_rope(64, 64, 1024, 10000.0, dtype="bfloat16")
    assert get_rope(64, 64, 1024, 10000.0) is not get_rope(64, 64, 1024, 10000.0, False)


def test_get_rope_torch_dtype_and_partial_rotary():
    """torch dtypes name the cache dtype; partial_rotary_factor (argument or dict) narrows
    the rotary dim as vLLM's int(rotary_dim * factor)."""
    torch = pytest.importorskip("torch")
    assert get_rope(64, 64, 16, 1e4, dtype=torch.bfloat16).dtype == "bfloat16"
    r = get_rope(80, 80, 16, 1e4, partial_rotary_factor=0.4)
    assert r.rotary_dim == 32 and r.get_cos_sin_cache().shape == (16, 32)
    r2 = get_rope(80, 80, 16, 1e4, True, {"partial_rotary_factor": 0.4})
    assert r2.get_cos_sin_cache().tobytes() == r.get_cos_sin_cache().tobytes()
    assert get_rope(80, 80, 16, 1e4, True, {"partial_rotary_factor": 0.4}, None, 0.4).rotary_dim == 32
    assert get_rope(128, 128, 16, None, True, {"rope_theta": 5e5}).base == 5e5


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((0, 64, 16, 1e4), {}, ValueError, r"head_size: expected a positive integer"),
    ((64, 128, 16, 1e4), {}, ValueError, r"rotary_dim: 128 rotated dims exceed head_size 64"),
    ((64, 63, 16, 1e4), {}, ValueError, r"rotary_dim"),
    ((64, 64, -1, 1e4), {}, ValueError, r"max_position: expected a non-negative integer"),
    ((64, 64, 16, 1.0), {}, ValueError, r"base: expected a finite number > 0 and != 1"),
    ((64, 64, 16, 1e4), dict(dtype="float64"), TypeError, r"dtype: expected float16, bfloat16 or float32"),
    ((64, 64, 16, 1e4), dict(is_neox_style=1), ValueError, r"is_neox_style: expected a bool"),
    ((64, 64, 16, 1e4), dict(partial_rotary_factor=0.0), ValueError, r"partial_rotary_factor: expected a number in \(0, 1\]"),
    ((64, 64, 16, 1e4), dict(partial_rotary_factor=0.5, rope_scaling={"partial_rotary_factor": 0.25}),
     ValueError, r"partial_rotary_factor: 0.5 differs from rope_scaling\['partial_rotary_factor'\] = 0.25"),
    ((64, 64, 16, 1e4), dict(rope_scaling={"rope_theta": 5e5}), ValueError, r"base: 10000.0 differs"),
    ((64, 64, 16, 1e4), dict(rope_scaling=[("rope_type", "linear")]), ValueError, r"rope_scaling: expected a dict"),
    ((64, 64, 16, 1e4), dict(rope_scaling={"rope_type": "foo"}), ValueError, r"unknown RoPE type 'foo'"),
    ((64, 64, 16, 1e4), dict(rope_scaling={"rope_type": "linear"}), ValueError, r"\['factor'\]: required"),
    ((64, 64, 16, 1e4), dict(rope_scaling={"mrope_section": [16, 8, 4]}), ValueError,
     r"\['mrope_section'\]: the sections \[16, 8, 4\] must sum to rotary_dim/2 = 32"),
])
def test_get_rope_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_rope(*args, **kwargs)


def test_mrope_needs_a_section():
    with pytest.raises(ValueError, match=r"\['mrope_section'\]: required for MRotaryEmbedding"):
        MRotaryEmbedding(64, 64, 16, 1e4)


# ------------------------------------------------------------------ forward, recorded

class Recorder:
    """Stands in for rope_jit.api's in-place cache functions on the CPU: records each call
    and applies it with the float64 reference (NumPy float64 q/k, rotated in place)."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(rope_jit.api, "apply_rope_inplace_with_cache", self.rope)
        monkeypatch.setattr(rope_jit.api, "apply_mrope_inplace_with_cache", self.mrope)

    @staticmethod
    def _rotate(x, head_size, cos, sin, is_neox):
        if x is None:
            return
        heads = x.reshape(*cos.shape[:-1], -1, head_size)
        x[...] = reference.apply_rotary(heads, cos, sin, is_neox).reshape(x.shape)

    def rope(self, positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0,
             inverse=False, *, check_positions=False, enable_pdl=False):
        assert rope_dim_offset == 0 and not inverse and not enable_pdl  # not used by these tests
        self.calls.append(("rope", positions, cos_sin_cache, is_neox, check_positions))
        cos, sin = reference.cos_sin_from_cache(cos_sin_cache, positions)
        self._rotate(query, head_size, cos, sin, is_neox)
        self._rotate(key, head_size, cos, sin, is_neox)

    def mrope(self, positions, query, key, head_size, cos_sin_cache, is_neox, mrope_section,
              mrope_interleaved=False, *, check_positions=False):
        self.calls.append(("mrope", positions, cos_sin_cache, is_neox, mrope_section, mrope_interleaved))
        cos, sin = mrope_cos_sin(cos_sin_cache, positions, mrope_section, mrope_interleaved)
        self._rotate(query, head_size, cos, sin, is_neox)
        self._rotate(key, head_size, cos, sin, is_neox)


class NoMax(np.ndarray):
    """Positions whose max() fails: forward(seq_len=...) must not read them back."""

    def max(self, *args, **kwargs):
        raise AssertionError("forward read max(positions) although seq_len was given")


def _qk(T, hq, hk, head, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, hq * head)), rng.standard_normal((T, hk, head))


def _hf_apply(transformers, config, module, cls_name, q, k, positions, head):
    """transformers' rotary module (float64 run) and its apply_rotary_pos_emb on q, k."""
    torch = pytest.importorskip("torch")
    from test_scaling import float64_torch  # the float64 harness documented there

    with float64_torch(torch):
        cfg, hf_rope = _hf_model_rope(transformers, config, module, cls_name)
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        T = positions.shape[0]
        qt = torch.as_tensor(q).view(1, T, -1, head).transpose(1, 2)
        kt = torch.as_tensor(k).view(1, T, -1, head).transpose(1, 2)
        cos, sin = hf_rope(qt, torch.as_tensor(positions)[None])
        rot = cos.shape[-1]
        qr, kr = mod.apply_rotary_pos_emb(qt[..., :rot], kt[..., :rot], cos, sin)
        qo = torch.cat([qr, qt[..., rot:]], -1).transpose(1, 2).reshape(q.shape)
        ko = torch.cat([kr, kt[..., rot:]], -1).transpose(1, 2).reshape(k.shape)
    return qo.numpy(), ko.numpy()


def _assert_rotation_close(got, want, x, af):
    """float32 cache against transformers' float64 cos/sin: |x1| + |x2| times half a
    float32 ulp of the cache values (af <= 2), plus float64 slack."""
    tol = 4 * np.abs(x).max() * af * EPS32 + 1e-12
    assert np.abs(got - want).max() <= tol, (np.abs(got - want).max(), tol)


@pytest.mark.parametrize("name, config, module, cls_name", [
    HF_MODELS[0], HF_MODELS[2], HF_MODELS[6]], ids=["llama3.1", "qwen2.5-yarn", "phi-2"])
def test_forward_matches_transformers(monkeypatch, transformers, name, config, module, cls_name):
    """forward = one apply_rope_inplace_with_cache call (the object's cache, its style);
    applied with the float64 reference it reproduces transformers' apply_rotary_pos_emb
    (float64 run), pass-through dims included; returns (query, key), both modified in place."""
    rec = Recorder(monkeypatch)
    rope = rope_from_hf_config(config, max_position=8192)
    head = rope.head_size
    q, k = _qk(40, 4, 2, head)
    q0, k0 = q.copy(), k.copy()
    pos = np.random.default_rng(1).integers(0, 8192, 40)
    want_q, want_k = _hf_apply(transformers, config, module, cls_name, q0, k0, pos, head)
    out = rope.forward(pos, q, k)
    assert out[0] is q and out[1] is k
    assert [c[0] for c in rec.calls] == ["rope"] and rec.calls[0][1] is pos
    assert rec.calls[0][2] is rope.cos_sin_cache and rec.calls[0][3] is True
    _assert_rotation_close(q, want_q, q0, rope.scaling.attention_factor)
    _assert_rotation_close(k, want_k, k0, rope.scaling.attention_factor)
    assert np.array_equal(q.reshape(40, 4, head)[..., rope.rotary_dim:],
                          q0.reshape(40, 4, head)[..., rope.rotary_dim:])


@pytest.mark.parametrize("largest", [100, 4095, 4096, 50000])
def test_forward_longrope_tables(monkeypatch, transformers, largest):
    """Phi-3 LongRoPE: a batch whose largest position is below 4096 reads the short table,
    any other the long one (rows 4096 + p of the same cache, a view, no copy); both equal
    transformers' Phi-3 (which switches on max(position_ids) + 1 > 4096). seq_len= gives
    the same without reading positions back."""
    rec = Recorder(monkeypatch)
    rope = rope_from_hf_config(PHI3_MINI_128K, max_position=65536)
    q, k = _qk(30, 2, 1, 96, seed=largest)
    pos = np.random.default_rng(largest).integers(0, largest, 30)
    pos[-1] = largest
    q0, k0 = q.copy(), k.copy()
    want_q, want_k = _hf_apply(transformers, {**PHI3_MINI_128K, "max_position_embeddings": 65536}, "phi3",
                               "Phi3RotaryEmbedding", q0, k0, pos, 96)
    rope.forward(pos, q, k)
    whole = rope.get_cos_sin_cache(q)
    view = rec.calls[-1][2]
    assert np.shares_memory(view, whole)
    long = largest + 1 > 4096
    assert view.shape[0] == (65536 if long else 4096)
    assert view.__array_interface__["data"][0] == whole[4096 if long else 0:].__array_interface__["data"][0]
    _assert_rotation_close(q, want_q, q0, rope.scaling.attention_factor)
    _assert_rotation_close(k, want_k, k0, rope.scaling.attention_factor)
    q2, k2 = q0.copy(), k0.copy()
    rope.forward(pos.view(NoMax), q2, k2, seq_len=largest + 1)
    assert np.array_equal(q2, q) and np.array_equal(k2, k)


def test_dynamic_ntk_follows_transformers(monkeypatch, transformers):
    """Dynamic NTK through a sequence of batches, against transformers' LlamaRotaryEmbedding
    with dynamic_rope_update (float32 as shipped): grow past max_position (new base), stay
    while between, grow again, return to the original below max_position. After each
    batch: the same frequencies (float32 rounding bound), our cache rows (of the length
    the frequencies are for) within float32 error of transformers' cos, and the original
    cache reused (not rebuilt) on return."""
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "max_position_embeddings": 2048,
              "rope_theta": 10000.0, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    hf_rope = LlamaRotaryEmbedding(transformers.AutoConfig.for_model(**config))
    rec = Recorder(monkeypatch)
    rope = rope_from_hf_config(config)
    original_cache = rope.get_cos_sin_cache()
    x = torch.zeros(1)
    hf_lengths = []
    for n in [100, 2048, 3000, 2500, 5000, 2048, 1000, 2049, 4000]:
        pos = np.arange(n)
        cos, _ = hf_rope(x, torch.as_tensor(pos)[None])
        q, k = _qk(n, 1, 1, 64, seed=n)
        rope.forward(pos, q, k)
        s = rope.scaling
        hf_lengths.append(int(hf_rope.max_seq_len_cached))
        assert s.cache_length == hf_lengths[-1]
        want = hf_rope.inv_freq.double().numpy()
        assert (np.abs(s.inv_freq - want) / s.inv_freq).max() <= (6 + math.log(s.base)) * EPS32, n
        cache = rec.calls[-1][2]
        assert cache.shape == (hf_lengths[-1], 64)
        angle = pos[:, None] * s.inv_freq
        tol = angle * (7 + math.log(s.base)) * EPS32 + 3 * EPS32
        assert (np.abs(cache[pos, :32] - cos[0, :, :32].double().numpy()) <= tol).all(), n
        if n < 2048:
            assert rope.get_cos_sin_cache() is original_cache
    # the lengths the frequencies were for, as transformers kept them
    assert hf_lengths == [2048, 2048, 3000, 3000, 5000, 5000, 2048, 2049, 4000]


def test_forward_seq_len_avoids_reading_positions(monkeypatch):
    """dynamic with seq_len= never calls positions.max(); without it, it does (the host
    sync the docstring warns of)."""
    Recorder(monkeypatch)
    rope = get_rope(64, 64, 256, 1e4, True, {"rope_type": "dynamic", "factor": 2.0})
    q, k = _qk(8, 1, 1, 64)
    pos = np.arange(8).view(NoMax)
    rope.forward(pos, q, k, seq_len=600)
    assert rope.scaling.seq_len == 600
    with pytest.raises(AssertionError, match="read max"):
        rope.forward(pos, q, k)
    with pytest.raises(ValueError, match=r"seq_len: expected a non-negative integer"):
        rope.forward(np.arange(8), q, k, seq_len=-1)


def test_forward_offsets_key_none_and_check_positions(monkeypatch):
    """offsets are added to positions (vLLM's batched LoRA offsets); key=None passes
    through; check_positions reaches the kernel API."""
    rec = Recorder(monkeypatch)
    rope = get_rope(64, 32, 512, 1e4, False)
    q, _ = _qk(5, 3, 1, 64)
    q0 = q.copy()
    pos, off = np.arange(5), np.full(5, 100)
    assert rope(pos, q, None, off, check_positions=True)[1] is None
    kind, got_pos, cache, neox, check = rec.calls[-1]
    assert kind == "rope" and got_pos.tolist() == list(range(100, 105)) and neox is False and check is True
    q1 = q0.copy()
    rope(pos + 100, q1)
    assert np.array_equal(q1, q)


def test_mrope_forward_calls(monkeypatch):
    """MRotaryEmbedding: [3, T] positions -> apply_mrope_inplace_with_cache(positions,
    query, key, head_size, cache, is_neox, mrope_section, mrope_interleaved); [T] -> plain
    RoPE; text tokens (equal rows) rotate exactly as plain RoPE; bad shapes are refused
    before any call."""
    rec = Recorder(monkeypatch)
    rope = rope_from_hf_config({**QWEN2_VL_7B, "rope_scaling": {"rope_type": "default",
                                                               "mrope_section": [16, 24, 24],
                                                               "mrope_interleaved": True}})
    q, k = _qk(6, 2, 1, 128)
    q0, k0 = q.copy(), k.copy()
    pos3 = np.array([[5, 5, 7, 9, 1, 0], [5, 5, 3, 4, 2, 0], [5, 5, 8, 1, 3, 0]])
    rope.forward(pos3, q, k)
    kind, got_pos, cache, neox, section, interleaved = rec.calls[-1]
    assert (kind, neox, section, interleaved) == ("mrope", True, [16, 24, 24], True)
    assert got_pos is pos3 and cache is rope.cos_sin_cache and cache.shape == (4 * 32768, 128)
    q1, k1 = q0.copy(), k0.copy()
    rope.forward(pos3[0], q1, k1)
    assert rec.calls[-1][0] == "rope"
    text = [0, 1, 5]  # tokens whose three rows agree
    assert np.array_equal(q1[text], q[text]) and np.array_equal(k1[text], k[text])
    assert not np.allclose(q1[2], q[2])  # and the others differ: the sections matter
    n = len(rec.calls)
    for bad in (pos3[:2], np.zeros((3, 5), np.int64), np.zeros((3, 6, 1), np.int64)):
        with pytest.raises(ValueError, match=r"positions: expected \[num_tokens\] or \[3, num_tokens\]"):
            rope.forward(bad, q, k)
    assert len(rec.calls) == n


def test_cos_sin_cache_property_follows_devices(monkeypatch):
    """cos_sin_cache: the host cache before use, then the one built for the last query's
    framework and device (one per device, reused)."""
    torch = pytest.importorskip("torch")
    Recorder(monkeypatch)
    rope = get_rope(64, 64, 32, 1e4, True, None, "bfloat16")
    assert isinstance(rope.cos_sin_cache, np.ndarray)
    q = torch.zeros(2, 64, dtype=torch.bfloat16)
    t = rope.get_cos_sin_cache(q)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and rope.cos_sin_cache is t
    assert rope.get_cos_sin_cache(q) is t


# ------------------------------------------------------------------ GPU

def _gpu_reference_close(out, x_before, ref, dtype, head, rot, cache_abs_max):
    """Within 1 ulp of the output dtype plus fp32 arithmetic slack scaled by the products
    (|x1| + |x2| times the largest cos/sin magnitude, the attention factor); pass-through
    bit-identical."""
    from gpu_cases import as_heads

    got = as_heads(out, head, 1)
    gr, rr, xr = got[..., :rot], ref[..., :rot], x_before[..., :rot]
    half = rot // 2
    neox = np.concatenate([np.abs(xr[..., :half]) + np.abs(xr[..., half:])] * 2, axis=-1)
    gptj = np.repeat(np.abs(xr[..., 0::2]) + np.abs(xr[..., 1::2]), 2, axis=-1)
    tol = reference.ulp(rr, dtype) + 2.0 ** -21 * np.maximum(neox, gptj) * cache_abs_max
    err = np.abs(gr - rr)
    assert (err <= tol).all(), f"worst error {err.max():.3g} (tolerance there {tol.flat[np.argmax(err - tol)]:.3g})"
    assert np.array_equal(got[..., rot:], x_before[..., rot:])


GPU_VARIANTS = [v for v in VARIANTS if "mrope" not in v[0]] + [
    ("llama3.1-real", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_theta": 5e5}),
    ("deepseek-v3-real", {"rope_type": "deepseek_yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                          "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name, params", GPU_VARIANTS, ids=[v[0] for v in GPU_VARIANTS])
@pytest.mark.parametrize("dtype, cache_dtype, neox, head, rot_factor", [
    ("bfloat16", None, True, 128, 1.0), ("float16", "bfloat16", False, 64, 1.0),
    ("float32", "float32", True, 80, 0.5), ("bfloat16", "float16", True, 256, 0.25),
])
def test_forward_gpu(name, params, dtype, cache_dtype, neox, head, rot_factor):
    """forward on CUDA tensors (fresh random q/k as views of a fused QKV buffer) against
    the float64 reference fed the rows of the object's cache the variant's rule picks,
    then against the exact float64 formula within the cache dtype's rounding. Batches
    below and beyond max_position / original length where the variant cares."""
    torch = pytest.importorskip("torch")
    from gpu_cases import as_heads, fused_qkv, to_numpy64

    max_pos = 2048
    params = dict(params or {})
    if rot_factor != 1.0 and name != "proportional":
        params["partial_rotary_factor"] = rot_factor
    if "short_factor" in params:  # sized for the rotary dim
        half = int(head * rot_factor) // 2
        params["short_factor"] = [1.0 + 0.01 * i for i in range(half)]
        params["long_factor"] = [1.0 + 0.5 * i for i in range(half)]
    rope = get_rope(head, head, max_pos, None, neox, params, cache_dtype)
    s0 = rope.scaling
    rot = rope.rotary_dim
    largest_list = [300, max_pos - 1]
    if s0.rope_type in ("dynamic", "yarn", "deepseek_yarn", "linear"):
        largest_list.append(min(s0.cache_length or 0, 3 * max_pos) - 1 if s0.rope_type != "dynamic" else 5000)
    for seed, largest in enumerate(largest_list):
        T = 97
        buf, q, k = fused_qkv(T, 4, 2, head, dtype, layout="2d", strided=bool(seed % 2), seed=seed)
        g = torch.Generator(device="cuda").manual_seed(seed + 10)
        pos = torch.randint(0, largest, (T,), generator=g, device="cuda")
        pos[0] = largest
        q0, k0 = as_heads(q, head, 1), as_heads(k, head, 1)
        out = rope.forward(pos, q, k)
        assert out[0] is q and out[1] is k
        torch.cuda.synchronize()
        s = rope.scaling
        p = pos.cpu().numpy()
        cache = to_numpy64(rope.get_cos_sin_cache(q))
        row0 = s.row_offset(largest + 1)
        cos, sin = reference.cos_sin_from_cache(cache, row0 + p)
        amax = float(np.abs(cache).max())
        for x_out, x0 in ((q, q0), (k, k0)):
            _gpu_reference_close(x_out, x0, reference.apply_rotary(x0, cos, sin, neox), dtype, head, rot, amax)
        # the exact formula: cos/sin in float64 at the positions (long table beyond the original)
        c64, s64 = s.cos_sin(p, long=row0 > 0)
        cdt = rope.dtype
        assert (np.abs(cos - c64) <= 0.5 * reference.ulp(c64, cdt) + 1e-12).all()
        assert (np.abs(sin - s64) <= 0.5 * reference.ulp(s64, cdt) + 1e-12).all()
        if s.rope_type == "dynamic" and largest + 1 > max_pos:
            assert s.seq_len == largest + 1 and s.base > rope.base  # grown


@pytest.mark.gpu
@pytest.mark.parametrize("section, interleaved", [([16, 24, 24], False), ([24, 20, 20], True), ([8, 12, 12], False)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_mrope_forward_gpu(section, interleaved, dtype):
    """MRotaryEmbedding on CUDA: [3, T] positions against mrope_cos_sin of the object's
    cache; 1-D positions plain; text tokens (equal rows) equal to plain RoPE bit for bit."""
    torch = pytest.importorskip("torch")
    from gpu_cases import as_heads, fused_qkv, to_numpy64

    head = 2 * sum(section)
    rope = get_rope(head, head, 4096, 1e6, True, {"rope_type": "default", "mrope_section": section,
                                                  "mrope_interleaved": interleaved})
    T = 150
    buf, q, k = fused_qkv(T, 4, 2, head, dtype, seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    pos = torch.randint(0, 4 * 4096, (3, T), generator=g, device="cuda")
    pos[:, :20] = pos[0, :20]  # text tokens
    q0, k0 = as_heads(q, head, 1), as_heads(k, head, 1)
    plain_q, plain_k = q.clone(), k.clone()
    rope.forward(pos, q, k)
    rope.forward(pos[0].contiguous(), plain_q, plain_k)
    torch.cuda.synchronize()
    cache = to_numpy64(rope.get_cos_sin_cache(q))
    cos, sin = mrope_cos_sin(cache, pos.cpu().numpy(), section, interleaved)
    amax = float(np.abs(cache).max())
    for x_out, x0 in ((q, q0), (k, k0)):
        _gpu_reference_close(x_out, x0, reference.apply_rotary(x0, cos, sin, True), dtype, head, head, amax)
    assert torch.equal(q[:20], plain_q[:20]) and torch.equal(k[:20], plain_k[:20])


@pytest.mark.gpu
def test_dynamic_gpu_cache_follows_state():
    """Dynamic NTK on CUDA: the device cache is rebuilt for each new maximum and the
    original one reused on return; seq_len= gives the bits reading positions gives."""
    torch = pytest.importorskip("torch")
    rope = get_rope(64, 64, 512, 1e4, True, {"rope_type": "dynamic", "factor": 4.0})
    q = torch.randn(16, 2, 64, device="cuda")
    original = rope.get_cos_sin_cache(q)
    for n, expect_original in [(100, True), (900, False), (700, False), (1500, False), (300, True)]:
        pos = torch.arange(n - 16, n, device="cuda")
        a, b = q.clone(), q.clone()
        rope.forward(pos, a, None)
        rope.forward(pos, b, None, seq_len=n)
        assert torch.equal(a, b)
        assert (rope.get_cos_sin_cache(q) is original) == expect_original
