"""vLLM's newer rotary_embedding arguments on the GPU: rope_dim_offset (rotate the dims after
an offset), inverse (rotate by the negative angle), 2-D positions, the RotaryEmbedding
object's forward with them, and enable_pdl (programmatic dependent launch) giving
bit-identical results, also captured in a CUDA graph after a GEMM."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

from gpu_cases import as_heads, assert_rope_close, to_numpy64  # noqa: E402

T, HQ, HK, D = 37, 4, 2, 128


def _inputs(seed, dtype=torch.bfloat16, tokens=(T,)):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = int(np.prod(tokens))
    q = torch.randn(n, HQ * D, generator=g, device="cuda").to(dtype).reshape(*tokens, HQ * D)
    k = torch.randn(n, HK * D, generator=g, device="cuda").to(dtype).reshape(*tokens, HK * D)
    pos = torch.randint(0, 4096, tokens, generator=g, device="cuda")
    return q, k, pos


@pytest.mark.parametrize("offset, rot, neox", [(32, 64, True), (64, 64, False), (8, 96, True),
                                               (0, 128, True)])
def test_rope_dim_offset_rotates_only_the_dims_after_it(offset, rot, neox):
    q, k, pos = _inputs(1)
    cache = rope_jit.compute_cos_sin_cache(rot, 4096, like=q)
    before = [as_heads(x, D, 1) for x in (q, k)]
    rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, neox, offset)
    c, s = reference.cos_sin_from_cache(to_numpy64(cache), pos.cpu().numpy())
    for got, x0 in zip((q, k), before):
        g = as_heads(got, D, 1)
        assert np.array_equal(g[..., :offset], x0[..., :offset]), "dims before the offset"
        assert np.array_equal(g[..., offset + rot:], x0[..., offset + rot:]), "dims after"
        part = np.ascontiguousarray(x0[..., offset:offset + rot])
        want = reference.apply_rotary(part, c, s, neox)
        assert_rope_close(torch.from_numpy(g[..., offset:offset + rot].copy()), part, want,
                          "bfloat16", rot, rot, 1)


@pytest.mark.parametrize("tokens", [(T,), (3, 11)])
def test_inverse_undoes_the_rotation(tokens):
    """inverse=True is the rotation by -angle: against the reference with sin negated, and
    forward-then-inverse returns the input within two roundings (fp32 values: tight)."""
    q, k, pos = _inputs(2, torch.float32, tokens)
    cache = rope_jit.compute_cos_sin_cache(D, 4096, like=q)
    q0 = q.clone()
    nt = len(tokens)
    c, s = reference.cos_sin_from_cache(to_numpy64(cache), pos.cpu().numpy())
    rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, True, 0, True)
    want = reference.apply_rotary(as_heads(q0, D, nt), c, -s, True)
    assert_rope_close(q, as_heads(q0, D, nt), want, "float32", D, D, nt)
    rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, True)
    torch.testing.assert_close(q, q0, rtol=1e-6, atol=1e-6)


def test_rotary_embedding_forward_with_offset_and_inverse():
    rope = rope_jit.get_rope(D, 64, 4096, 10000.0, is_neox_style=True)
    q, k, pos = _inputs(3)
    q0, k0 = q.clone(), k.clone()
    rope.forward(pos, q, k, rope_dim_offset=64)
    assert torch.equal(q.view(T, HQ, D)[..., :64], q0.view(T, HQ, D)[..., :64])
    assert not torch.equal(q, q0)
    rope.forward(pos, q, k, rope_dim_offset=64, inverse=True)
    torch.testing.assert_close(q.float(), q0.float(), rtol=0, atol=2 ** -6)
    torch.testing.assert_close(k.float(), k0.float(), rtol=0, atol=2 ** -6)


@pytest.mark.parametrize("mode", ["cache", "fly", "fly_indptr"])
def test_enable_pdl_is_bit_identical_and_captures_in_a_graph(mode):
    """enable_pdl launches through cuLaunchKernelEx with programmatic serialization; the
    kernel waits for the previous one before reading q and k, so a GEMM that writes q right
    before it is seen in full, eagerly and inside a CUDA graph."""
    q, k, pos = _inputs(4)
    w = torch.randn(HQ * D, HQ * D, device="cuda", dtype=torch.bfloat16) / 32
    x = torch.randn(T, HQ * D, device="cuda", dtype=torch.bfloat16)
    cache = rope_jit.compute_cos_sin_cache(D, 4096, like=q)
    indptr = torch.tensor([0, 20, T], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([5, 900], dtype=torch.int32, device="cuda")

    def step(qq, pdl):
        torch.matmul(x, w, out=qq)  # the producer of q, right before RoPE
        if mode == "cache":
            rope_jit.apply_rope_inplace_with_cache(pos, qq, k, D, cache, True, enable_pdl=pdl)
        elif mode == "fly":
            rope_jit.apply_rope_pos_ids_inplace(qq.view(T, HQ, D), k.view(T, HK, D), pos,
                                                enable_pdl=pdl)
        else:
            rope_jit.apply_rope_inplace(qq.view(T, HQ, D), None, indptr, offsets,
                                        enable_pdl=pdl)

    k0 = k.clone()
    plain, pdl = torch.empty_like(q), torch.empty_like(q)
    step(plain, False)
    k.copy_(k0)
    step(pdl, True)
    assert torch.equal(plain, pdl)
    graph_out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        k.copy_(k0)
        step(graph_out, True)  # warm: plan, compile and load outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_out, True)
    for _ in range(3):
        graph_out.zero_()
        k.copy_(k0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(graph_out, plain)
