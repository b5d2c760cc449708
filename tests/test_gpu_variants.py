"""Scaling variants on the fly and multimodal RoPE in the kernel, on the GPU (marker: gpu).

* On the fly, linear / Llama 3 / YaRN agree with the cache path fed a cache built in
  float64 from the same parameters (within one unit in the last place of the output
  dtype, plus fp32 arithmetic slack where the rotation cancels; bit-identical for at least
  97% of the elements), at positions up to 2^20, and both are within 1 ulp of the float64
  reference.
* mRoPE (Qwen2-VL sections, Qwen3-VL interleaved) from a cache and on the fly against the
  float64 reference fed the transformers row selection (reference.mrope_select, itself
  checked against transformers on the CPU); text-only positions (three equal rows) give
  exactly the plain RoPE result.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402
from rope_jit.scaling import resolve_rope_scaling  # noqa: E402

from gpu_cases import (  # noqa: E402
    TORCH_DTYPE,
    as_heads,
    assert_rope_close,
    poison_allocator,
    to_numpy64,
)

LONG = 1 << 20

# HuggingFace-style dicts the on-the-fly kernels compute (README "Scaling variants").
FLY_VARIANTS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "llama3-b": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0,
                 "high_freq_factor": 8.0, "original_max_position_embeddings": 4096},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn-deepseek": {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096},
    "yarn-gptoss": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                    "truncate": False, "original_max_position_embeddings": 4096},
    "yarn-attn": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.8,
                  "beta_fast": 16, "beta_slow": 2, "original_max_position_embeddings": 2048},
}


def _rand(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(TORCH_DTYPE[dtype])


def _positions(n, seed, high=LONG):
    """Random positions up to `high`, with the extremes included."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pos = torch.randint(0, high, (n,), generator=g, device="cuda")
    pos[0], pos[-1] = 0, high - 1
    return pos


@pytest.mark.parametrize("variant", list(FLY_VARIANTS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("interleave", [False, True])
def test_on_the_fly_variant_matches_cache_path(variant, dtype, interleave):
    rs = FLY_VARIANTS[variant]
    theta, head, rot, hq, hk, n = 5e5, 128, 128, 4, 2, 96
    if variant == "yarn-deepseek":
        theta, head, rot = 1e4, 64, 64
    q = _rand((n, hq, head), dtype, 1)
    k = _rand((n, hk, head), dtype, 2)
    pos = _positions(n, 3)
    info = resolve_rope_scaling(rs, rot, base=theta, max_position=LONG)

    # The cache path, given the rows a float64 cache built from the same parameters holds at
    # exactly these positions (a 2^20-row cache would only repeat them).
    cos, sin = reference.cos_sin(pos.cpu().numpy(), info.inv_freq)
    rows = np.concatenate([cos, sin], axis=-1) * info.attention_factor
    cache = torch.from_numpy(reference.round_to(rows, "float32")).cuda()
    idx = torch.arange(n, device="cuda")
    q_cache, k_cache = rope_jit.apply_rope_with_cos_sin_cache(idx, q, k, head, cache,
                                                              is_neox=not interleave)

    poison_allocator(q.numel() * 8)
    q_fly, k_fly = rope_jit.apply_rope_pos_ids(q, k, pos, rotary_dim=rot, interleave=interleave,
                                               rope_theta=theta, rope_scaling=rs)
    for fly, via_cache, x in ((q_fly, q_cache, q), (k_fly, k_cache, k)):
        x64 = as_heads(x, head, 1)
        # Within one unit in the last place of the cache path's result, plus the fp32
        # arithmetic slack where x1*c - x2*s cancels (a 1-ulp difference of an fp32 cos is
        # many ulps of a near-zero output): the same bound as against the reference.
        assert_rope_close(fly, x64, as_heads(via_cache, head, 1), dtype, head, rot, 1,
                          f"{variant}: on the fly vs cache path")
        same = (fly == via_cache).float().mean().item()
        assert same > 0.97, f"{variant}: only {same:.3f} of the elements bit-identical"
        ref = reference.apply_rotary(x64, cos * info.attention_factor, sin * info.attention_factor,
                                     not interleave)
        assert_rope_close(fly, x64, ref, dtype, head, rot, 1, f"{variant} on the fly")

    # in place and the indptr + offsets convention give the same bits
    q2, k2 = q.clone(), k.clone()
    rope_jit.apply_rope_pos_ids_inplace(q2, k2, pos, rotary_dim=rot, interleave=interleave,
                                        rope_theta=theta, rope_scaling=rs)
    assert torch.equal(q2, q_fly) and torch.equal(k2, k_fly)


def test_on_the_fly_llama3_dict_equals_flashinfer_llama31_api():
    """rope_scaling={'rope_type': 'llama3', ...} runs the same kernel as
    apply_llama31_rope_pos_ids with the same numbers."""
    q, k = _rand((64, 8, 128), "bfloat16", 5), _rand((64, 2, 128), "bfloat16", 6)
    pos = _positions(64, 7)
    a = rope_jit.apply_rope_pos_ids(q, k, pos, rope_theta=5e5, rope_scaling=FLY_VARIANTS["llama3"])
    b = rope_jit.apply_llama31_rope_pos_ids(q, k, pos)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_on_the_fly_refuses_variants_it_cannot_compute():
    q, k = _rand((4, 2, 64), "bfloat16", 8), _rand((4, 1, 64), "bfloat16", 9)
    pos = torch.arange(4, device="cuda")
    before = q.clone()
    for rs in ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64},
               {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
                "original_max_position_embeddings": 64}):
        with pytest.raises(ValueError, match=rs["rope_type"]):
            rope_jit.apply_rope_pos_ids_inplace(q, k, pos, rope_scaling=rs)
    with pytest.raises(ValueError, match="rope_scale"):
        rope_jit.apply_rope_pos_ids_inplace(q, k, pos, rope_scale=2.0,
                                            rope_scaling=FLY_VARIANTS["yarn"])
    assert torch.equal(q, before)


# ------------------------------------------------------------------ mRoPE

SECTIONS = [((16, 24, 24), False), ((24, 20, 20), True), ((8, 12, 12), False), ((4, 6, 6), True)]
MAX_POS = 4096


def _mrope_positions(n, seed, *, text_only=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if text_only:
        return torch.randint(0, MAX_POS, (n,), generator=g, device="cuda").expand(3, n).contiguous()
    return torch.randint(0, MAX_POS, (3, n), generator=g, device="cuda")


def _mrope_reference(x, head, cos3, sin3, section, interleaved, is_neox):
    cos = reference.mrope_select(cos3, section, interleaved)
    sin = reference.mrope_select(sin3, section, interleaved)
    return reference.apply_rotary(as_heads(x, head, 1), cos, sin, is_neox)


@pytest.mark.parametrize("section, interleaved", SECTIONS)
@pytest.mark.parametrize("dtype, cache_dtype", [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                                ("float16", "float16"), ("float32", "float32")])
@pytest.mark.parametrize("is_neox", [True, False])
def test_mrope_from_cache(section, interleaved, dtype, cache_dtype, is_neox):
    rot = 2 * sum(section)
    head = rot if rot >= 128 else rot + 16   # partial rotation for the small sections
    n, hq, hk = 45, 4, 2
    buf = _rand((n, (hq + hk + 1) * head + 8), dtype, 11)  # fused, padded: strided views
    q = buf[:, :hq * head].view(n, hq, head)
    k = buf[:, hq * head:(hq + hk) * head]
    pos = _mrope_positions(n, 12)
    cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, dtype=cache_dtype, like=q)
    cos3, sin3 = reference.cos_sin_from_cache(to_numpy64(cache), pos.cpu().numpy())
    ref_q = _mrope_reference(q, head, cos3, sin3, section, interleaved, is_neox)
    ref_k = _mrope_reference(k, head, cos3, sin3, section, interleaved, is_neox)
    q64, k64 = as_heads(q, head, 1), as_heads(k, head, 1)
    before = buf.clone()

    poison_allocator(q.numel() * 8)
    qo, ko = rope_jit.apply_mrope_with_cos_sin_cache(pos, q, k, head, cache, is_neox, section,
                                                     interleaved)
    assert torch.equal(buf, before)  # out of place leaves the inputs alone
    assert_rope_close(qo, q64, ref_q, dtype, head, rot, 1, "q out of place")
    assert_rope_close(ko, k64, ref_k, dtype, head, rot, 1, "k out of place")

    rope_jit.apply_mrope_inplace_with_cache(pos, q, k, head, cache, is_neox, section, interleaved)
    assert torch.equal(q, qo) and torch.equal(k.reshape(ko.shape), ko)
    pad = buf[:, (hq + hk) * head:]
    assert torch.equal(pad, before[:, (hq + hk) * head:])  # bytes outside the views


@pytest.mark.parametrize("section, interleaved", SECTIONS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_mrope_on_the_fly(section, interleaved, dtype):
    rot = 2 * sum(section)
    head, n = rot, 300  # several blocks of the cos/sin tile
    q, k = _rand((n, 6, head), dtype, 21), _rand((n, 2, head), dtype, 22)
    pos = _mrope_positions(n, 23)
    theta = 1e6
    inv = reference.inv_frequencies(rot, theta)
    cos3, sin3 = reference.cos_sin(pos.cpu().numpy(), inv)
    poison_allocator(q.numel() * 8)
    qo, ko = rope_jit.apply_mrope_pos_ids(q, k, pos, section, rope_theta=theta,
                                          mrope_interleaved=interleaved)
    for out, x in ((qo, q), (ko, k)):
        ref = _mrope_reference(x, head, cos3, sin3, section, interleaved, True)
        assert_rope_close(out, as_heads(x, head, 1), ref, dtype, head, rot, 1, "mrope on the fly")
    q2, k2 = q.clone(), k.clone()
    rope_jit.apply_mrope_pos_ids_inplace(q2, k2, pos, section, rope_theta=theta,
                                         mrope_interleaved=interleaved)
    assert torch.equal(q2, qo) and torch.equal(k2, ko)


@pytest.mark.parametrize("section, interleaved", SECTIONS[:2])
def test_mrope_text_only_positions_equal_plain_rope(section, interleaved):
    """Three equal position rows: exactly the plain RoPE result, from a cache and on the fly."""
    rot = 2 * sum(section)
    q, k = _rand((70, 8, rot), "bfloat16", 31), _rand((70, 2, rot), "bfloat16", 32)
    pos3 = _mrope_positions(70, 33, text_only=True)
    cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, like=q)
    a = rope_jit.apply_mrope_with_cos_sin_cache(pos3, q, k, rot, cache, True, section, interleaved)
    b = rope_jit.apply_rope_with_cos_sin_cache(pos3[0], q, k, rot, cache, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a = rope_jit.apply_mrope_pos_ids(q, k, pos3, section, mrope_interleaved=interleaved)
    b = rope_jit.apply_rope_pos_ids(q, k, pos3[0])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mrope_positions_outside_cache_give_identity_for_their_frequencies():
    """A position row past the cache leaves the frequencies that use it unrotated and is
    never read; checked mode raises before writing."""
    section, rot = (16, 24, 24), 128
    q, k = _rand((8, 2, rot), "float32", 41), _rand((8, 1, rot), "float32", 42)
    pos = _mrope_positions(8, 43)
    pos[2, 3] = MAX_POS + 5   # token 3's width row is out of range
    cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, like=q)
    qo, _ = rope_jit.apply_mrope_with_cos_sin_cache(pos, q, k, rot, cache, True, section)
    w = slice(40, 64)   # width frequencies: NeoX elements j and j + 64
    assert torch.equal(qo[3, :, w], q[3, :, w]) and torch.equal(qo[3, :, 64 + 40:], q[3, :, 64 + 40:])
    assert not torch.equal(qo[3, :, :40], q[3, :, :40])
    before = q.clone()
    with pytest.raises(ValueError, match=r"positions: values must lie in \[0, 4096\)"):
        rope_jit.apply_mrope_inplace_with_cache(pos, q, k, rot, cache, True, section,
                                                check_positions=True)
    assert torch.equal(q, before)


def test_mrope_cuda_graph_replay():
    section, rot = (24, 20, 20), 128
    q, k = _rand((16, 4, rot), "bfloat16", 51), _rand((16, 2, rot), "bfloat16", 52)
    pos = _mrope_positions(16, 53)
    cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, like=q)
    rope_jit.apply_mrope_inplace_with_cache(pos, q, k, rot, cache, True, section, True)  # compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        rope_jit.apply_mrope_inplace_with_cache(pos, q, k, rot, cache, True, section, True)
    new_q, new_k, new_pos = _rand((16, 4, rot), "bfloat16", 54), _rand((16, 2, rot), "bfloat16", 55), \
        _mrope_positions(16, 56)
    want = rope_jit.apply_mrope_with_cos_sin_cache(new_pos, new_q, new_k, rot, cache, True,
                                                   section, True)
    q.copy_(new_q), k.copy_(new_k), pos.copy_(new_pos)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])
