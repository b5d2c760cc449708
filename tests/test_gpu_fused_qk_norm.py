"""fused_qk_norm_rope on the GPU against the float64 reference (marker: gpu): every q and k
head normalized (fp32, weights of any float dtype) and rotated, within one unit in the last
place of the qkv dtype; v heads and the bytes around the qkv rows untouched; head sizes
from 2 to 512, partial rotation, both styles, cos/sin from a cache of each dtype or on the
fly."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

from gpu_cases import TORCH_DTYPE, to_numpy64  # noqa: E402

MAX_POS = 4096

CASES = [
    # head, rotary, dtype, weight dtype, neox, cos/sin, positions, tokens, heads q/k/v
    (128, 128, "bfloat16", "bfloat16", True, "float32", "int64", 300, (16, 4, 4)),
    (64, 64, "float16", "float32", False, "bfloat16", "int32", 1, (8, 2, 2)),
    (256, 64, "bfloat16", "bfloat16", True, None, "int64", 33, (4, 2, 2)),
    (80, 80, "bfloat16", "float16", False, "float16", "int64", 70, (6, 1, 1)),
    (512, 512, "float16", "float16", True, None, "int32", 17, (4, 4, 0)),
    (96, 32, "float16", "bfloat16", False, "float32", "int64", 129, (3, 3, 3)),
    (66, 66, "bfloat16", "float32", True, "float32", "int64", 9, (5, 2, 1)),
    (2, 2, "bfloat16", "bfloat16", False, "float32", "int32", 40, (2, 1, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"h{c[0]}r{c[1]}-{c[2]}-w{c[3]}-{'neox' if c[4] else 'gptj'}-"
                                             f"{c[5] or 'fly'}-T{c[7]}" for c in CASES])
def test_fused_qk_norm_rope(case):
    check_fused_qk_norm_rope(case)


@pytest.mark.parametrize("per_warp", [1, 2, 8, 32])
def test_forced_token_heads_per_warp(per_warp):
    """vLLM's 12th argument: N (token, head) rows a warp, 32 / N threads a row (here 32 to 1
    for 128-wide heads, 300 tokens), the same result as the planner's choice."""
    check_fused_qk_norm_rope(CASES[0], per_warp)


def check_fused_qk_norm_rope(case, per_warp=-1):
    head, rot, dtype, wdt, neox, cache_dtype, pos_dtype, T, (hq, hk, hv) = case
    seed = zlib.crc32(repr(case).encode()) & 0xFFFF
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = (hq + hk + hv) * head
    # qkv as rows of a wider buffer (vLLM's is contiguous; any token stride works): the
    # bytes around each row are checked untouched
    buf = (torch.randn(T, width + 16, generator=g, device="cuda") * 3).to(TORCH_DTYPE[dtype])
    qkv = buf[:, 8:8 + width]
    q_w = (1 + 0.2 * torch.randn(head, generator=g, device="cuda")).to(TORCH_DTYPE[wdt])
    k_w = (1 + 0.2 * torch.randn(head, generator=g, device="cuda")).to(TORCH_DTYPE[wdt])
    pos = torch.randint(0, MAX_POS, (T,), generator=g, device="cuda").to(
        torch.int32 if pos_dtype == "int32" else torch.int64)
    if cache_dtype is None:
        cache = None
        cos, sin = reference.cos_sin(pos.cpu().numpy(), reference.inv_frequencies(rot, 1e6))
        kw = dict(rope_theta=1e6, rotary_dim=rot)
    else:
        cache = rope_jit.compute_cos_sin_cache(rot, MAX_POS, dtype=cache_dtype, like=qkv)
        cos, sin = reference.cos_sin_from_cache(to_numpy64(cache), pos.cpu().numpy())
        kw = {}
    before = buf.clone()
    x64 = to_numpy64(qkv)
    eps = 1e-6
    assert rope_jit.fused_qk_norm_rope(qkv, hq, hk, hv, head, eps, q_w, k_w, cache, neox, pos,
                                       per_warp, **kw) is None
    torch.cuda.synchronize()
    ref = reference.qk_norm_rope(x64, hq, hk, head, eps, to_numpy64(q_w), to_numpy64(k_w), cos,
                                 sin, neox).reshape(T, -1, head)
    got = to_numpy64(qkv).reshape(T, -1, head)
    n = hq + hk
    # fp32 slack: the normalized operands of each rotated pair (|y1| + |y2|), and |y| past them
    y = np.abs(ref[:, :n])
    mag = y.copy()
    half = rot // 2
    if neox:
        pair = np.abs(ref[:, :n, :half]) + np.abs(ref[:, :n, half:rot])
        mag[..., :rot] = np.concatenate([pair, pair], axis=-1)
    else:
        mag[..., :rot] = np.repeat(np.abs(ref[:, :n, 0:rot:2]) + np.abs(ref[:, :n, 1:rot:2]), 2, axis=-1)
    tol = reference.ulp(ref[:, :n], dtype) + 2.0 ** -19 * mag
    err = np.abs(got[:, :n] - ref[:, :n])
    bad = ~(err <= tol)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} q/k values off by more than 1 ulp; worst "
                           f"err {np.nanmax(err):.3g}")
    assert np.array_equal(got[:, n:], x64.reshape(T, -1, head)[:, n:]), "v heads changed"
    assert torch.equal(buf[:, :8], before[:, :8]) and torch.equal(buf[:, 8 + width:], before[:, 8 + width:])
