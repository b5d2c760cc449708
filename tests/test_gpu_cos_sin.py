"""The per-token cos/sin mode on the GPU against the float64 reference (marker: gpu).

q and k are strided views of one fused QKV buffer (padded rows), in transformers' layouts:
``[B, H, S, D]`` (the attention's ``view(...).transpose(1, 2)``), ``[B, S, H, D]`` and
``[S, H, D]``; cos/sin per batch, broadcast over the batch, per sequence only, or as strided
slices of wider rows, in fp16/bf16/fp32 independently of q. The second half of a
transformers-style cos/sin (which repeats the first) is filled with NaN: the kernel must
not read it. Outputs out of place are poisoned first; in place, the rest of the buffer
must stay untouched. Then gradients (the transposed call) and flash-attn's layout.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import reference, route  # noqa: E402
from rope_jit.call import COS_SIN, token_cos_sin_call  # noqa: E402

from gpu_cases import TORCH_DTYPE, assert_rope_close, poison_allocator, to_numpy64  # noqa: E402

UNSQUEEZE = {"bhsd": 1, "bshd": 2, "shd": -2}  # heads dim, as transformers' unsqueeze_dim


def qkv(layout, dtype, batch, seq, hq, hk, head_size, *, pad=8, seed=0, requires_grad=False):
    """(buffer, q, k): q and k are views of the rows of one [tokens..., (hq + 2 hk) * D + pad]
    buffer (v and padding after them), in `layout`. k is None when hk == 0."""
    tok = (seq,) if layout == "shd" else (batch, seq)
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = (hq + 2 * max(hk, 1)) * head_size + pad
    buf = torch.randn(*tok, width, generator=g, device="cuda").to(TORCH_DTYPE[dtype])
    if requires_grad:
        buf.requires_grad_()
    q = buf[..., :hq * head_size].unflatten(-1, (hq, head_size))
    k = buf[..., hq * head_size:(hq + hk) * head_size].unflatten(-1, (hk, head_size)) if hk else None
    if layout == "bhsd":
        q, k = q.transpose(1, 2), (k.transpose(1, 2) if k is not None else None)
    return buf, q, k


def heads_last(x, layout):
    """[tokens..., heads, head_size] (the reference's layout), a view."""
    if x is None:
        return None
    return x.transpose(1, 2) if layout == "bhsd" else x


def make_cos_sin(shape, rot, dtype, *, half=False, row_pad=0, seed=1):
    """cos, sin of random angles, ``shape + (rot,)`` with halves (the second half NaN: never
    read), or ``shape + (rot / 2,)`` when `half`; as slices of rows `row_pad` longer (so
    their token strides are not their widths)."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-60.0, 60.0, (*shape, rot // 2))
    width = rot // 2 if half else rot
    out = []
    for f in (np.cos, np.sin):
        rows = np.full((*shape, width + row_pad), np.nan)
        rows[..., :rot // 2] = f(angles)
        t = torch.from_numpy(rows).to("cuda", TORCH_DTYPE[dtype])
        out.append(t[..., :width])
    return out


def reference_cos_sin(cos, sin, rot, tok):
    """float64 cos/sin of the first rot/2 entries (the stored values), broadcast to the
    token dims."""
    c, s = (np.broadcast_to(to_numpy64(t[..., :rot // 2]), (*tok, rot // 2)) for t in (cos, sin))
    return c, s


def expected(x64, c, s, rot, is_neox, out_neox):
    """The float64 result in the output's pair order, and the input seen in that order (for
    the tolerance's magnitudes and the pass-through comparison)."""
    y = reference.apply_rotary(x64, c, s, is_neox)
    if out_neox is None or out_neox == is_neox:
        return y, x64
    order = reference.neox_order if out_neox else reference.gptj_order
    return order(y, rot), order(x64, rot)


CASES = [
    # id, q dtype, cos dtype, layout, cos token shape, rot, neox, out_neox, in place, key,
    # row padding of the fused buffer (2: token strides of 4-byte steps, narrow vectors)
    ("bf16-fp32cos-bhsd-broadcast", "bfloat16", "float32", "bhsd", "1s", 64, True, None, False, True, 8),
    ("bf16-bf16cos-bhsd-batch-partial-inplace", "bfloat16", "bfloat16", "bhsd", "bs", 32, True, None, True, True, 8),
    ("fp16-fp32cos-bshd-batch-gptj", "float16", "float32", "bshd", "bs", 64, False, None, False, True, 8),
    ("fp16-fp16cos-bshd-broadcast-partial-gptj-inplace", "float16", "float16", "bshd", "1s", 48, False, None, True, True, 8),
    ("fp32-bf16cos-shd-seq", "float32", "bfloat16", "shd", "s", 64, True, None, False, True, 8),
    ("fp32-fp32cos-bhsd-seq-noKey-inplace", "float32", "float32", "bhsd", "s", 64, True, None, True, False, 8),
    ("fp32-fp32cos-bhsd-gptj-to-neox-partial", "float32", "float32", "bhsd", "bs", 48, False, True, False, True, 8),
    ("bf16-fp32cos-bhsd-gptj-to-neox", "bfloat16", "float32", "bhsd", "1s", 64, False, True, False, True, 8),
    ("bf16-bf16cos-bshd-neox-to-gptj", "bfloat16", "bfloat16", "bshd", "bs", 64, True, False, False, True, 8),
    ("fp16-fp32cos-bhsd-odd-rows", "float16", "float32", "bhsd", "bs", 64, True, None, False, True, 2),
    ("bf16-fp16cos-bhsd-odd-rows-gptj-to-neox", "bfloat16", "float16", "bhsd", "bs", 64, False, True, False, True, 2),
]


def _cos_shape(kind, batch, seq):
    return {"1s": (1, seq), "bs": (batch, seq), "s": (seq,)}[kind]


@pytest.mark.parametrize("dtype, cos_dtype, layout, cos_kind, rot, is_neox, out_neox, inplace, with_key, pad",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_against_reference(dtype, cos_dtype, layout, cos_kind, rot, is_neox, out_neox, inplace,
                           with_key, pad):
    batch, seq, hq, hk, d = 3, 37, 4, 2, 64
    buf, q, k = qkv(layout, dtype, batch, seq, hq, hk if with_key else 0, d, pad=pad)
    tok = tuple(heads_last(q, layout).shape[:-2])
    cos, sin = make_cos_sin(_cos_shape(cos_kind, batch, seq), rot, cos_dtype, row_pad=6)
    c64, s64 = reference_cos_sin(cos, sin, rot, tok)
    before = buf.clone()
    refs = [expected(to_numpy64(heads_last(x, layout)), c64, s64, rot, is_neox, out_neox)
            if x is not None else None for x in (q, k)]
    call = token_cos_sin_call(COS_SIN, is_neox, inplace, UNSQUEEZE[layout], out_neox)
    if not inplace:
        poison_allocator(2 * q.numel() * q.element_size())
    res = route.rope(call, q, k, cos=cos, sin=sin)
    torch.cuda.synchronize()
    if inplace:
        assert res is None
        outs = (q, k)
        rows = (hq + (hk if with_key else 0)) * d
        assert torch.equal(buf[..., rows:], before[..., rows:]), "bytes past q and k changed"
    else:
        outs = res
        assert torch.equal(buf, before), "out of place changed its inputs"
        for out, x in zip(outs, (q, k)):
            if x is None:
                assert out is None
                continue
            assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    for out, x, r in zip(outs, (q, k), refs):
        if x is None:
            continue
        ref, x_in_order = r
        assert_rope_close(heads_last(out, layout), x_in_order, ref, dtype, d, rot, len(tok))


def test_many_tokens_batched_heads():
    """Enough tokens for the dispatch that batches heads per thread (the default knobs,
    whatever this GPU's tuned table says): bf16, [B, H, S, D] views, per-batch fp32 cos,
    out of place and in place."""
    from rope_jit import launch
    from rope_jit.plan import DEFAULT_TUNING

    batch, seq, hq, hk, d = 2, 1600, 8, 4, 128
    for inplace in (False, True):
        buf, q, k = qkv("bhsd", "bfloat16", batch, seq, hq, hk, d, seed=3)
        cos, sin = make_cos_sin((batch, seq), d, "float32", seed=4)
        call = token_cos_sin_call(COS_SIN, True, inplace, 1)
        plan = launch.plan_of(call, q, k, cos=cos, sin=sin, tuning=DEFAULT_TUNING)
        assert plan.spec.head_batch > 1, "expected the batched-heads dispatch"
        c64, s64 = reference_cos_sin(cos, sin, d, (batch, seq))
        xs = [to_numpy64(heads_last(x, "bhsd")) for x in (q, k)]
        refs = [reference.apply_rotary(x64, c64, s64, True) for x64 in xs]
        res = launch.run_rope(call, q, k, cos=cos, sin=sin, tuning=DEFAULT_TUNING)
        outs = (q, k) if inplace else res
        for out, x64, ref in zip(outs, xs, refs):
            assert_rope_close(heads_last(out, "bhsd"), x64, ref, "bfloat16", d, d, 2)


GRAD_CASES = [
    # id, dtype, layout, rot, neox, out_neox
    ("bf16-bhsd-partial", "bfloat16", "bhsd", 32, True, None),
    ("fp16-bshd-gptj", "float16", "bshd", 64, False, None),
    ("fp32-bhsd-gptj-to-neox", "float32", "bhsd", 64, False, True),
    ("bf16-bhsd-gptj-to-neox-partial", "bfloat16", "bhsd", 48, False, True),
]


@pytest.mark.parametrize("dtype, layout, rot, is_neox, out_neox", [c[1:] for c in GRAD_CASES],
                         ids=[c[0] for c in GRAD_CASES])
def test_gradients_are_the_transposed_rotation(dtype, layout, rot, is_neox, out_neox):
    """autograd through the op: dq = R(a)^T g (the inverse rotation, reading the pairs in
    the order the forward wrote them, writing them where it read them), within 1 ulp of the
    float64 reference; pass-through gradients unchanged; v gets none."""
    batch, seq, hq, hk, d = 2, 19, 4, 1, 64
    buf, q, k = qkv(layout, dtype, batch, seq, hq, hk, d, requires_grad=True, seed=5)
    tok = tuple(heads_last(q, layout).shape[:-2])
    cos, sin = make_cos_sin((1, seq), rot, "float32", seed=6)
    call = token_cos_sin_call(COS_SIN, is_neox, False, UNSQUEEZE[layout], out_neox)
    qo, ko = route.rope(call, q, k, cos=cos, sin=sin)
    g = torch.Generator(device="cuda").manual_seed(7)
    gq = torch.randn(qo.shape, generator=g, device="cuda").to(qo.dtype)
    gk = torch.randn(ko.shape, generator=g, device="cuda").to(ko.dtype)
    torch.autograd.backward([qo, ko], [gq, gk])
    c64, s64 = reference_cos_sin(cos, sin, rot, tok)
    grad = buf.grad
    dq = grad[..., :hq * d].unflatten(-1, (hq, d))
    dk = grad[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
    if layout == "bhsd":
        dq, dk = dq.transpose(1, 2), dk.transpose(1, 2)
    for got, g_out in ((dq, gq), (dk, gk)):
        g64 = to_numpy64(heads_last(g_out, layout))
        if out_neox is not None and out_neox != is_neox:  # back to the input's order
            g64 = (reference.gptj_order if out_neox else reference.neox_order)(g64, rot)
        ref = reference.apply_rotary(g64, c64, -s64, is_neox)
        assert_rope_close(heads_last(got, layout), g64, ref, dtype, d, rot, len(tok),
                          what="gradient")
    assert not grad[..., (hq + hk) * d:].any(), "v and padding got a gradient"


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_flash_attn_layout(interleaved, inplace):
    """apply_rotary_emb: x [B, S, H, D] bf16, cos/sin [seqlen_ro, R/2] fp32 rows from
    seqlen_offsets on, partial rotary; returns the result (x itself in place)."""
    batch, seq, h, d, rot, offset = 2, 33, 4, 64, 48, 5
    buf, x, _ = qkv("bshd", "bfloat16", batch, seq, h, 0, d, seed=8)
    cos, sin = make_cos_sin((seq + 20,), rot, "float32", half=True, seed=9)
    c64, s64 = reference_cos_sin(cos[offset:offset + seq], sin[offset:offset + seq], rot,
                                 (batch, seq))
    x64 = to_numpy64(x)
    ref = reference.apply_rotary(x64, c64, s64, not interleaved)
    out = rope_jit.apply_rotary_emb(x, cos, sin, interleaved=interleaved, inplace=inplace,
                                    seqlen_offsets=offset)
    assert (out is x) == inplace
    assert_rope_close(out, x64, ref, "bfloat16", d, rot, 2)


def test_flash_attn_gradient():
    batch, seq, h, d, rot = 2, 9, 2, 32, 32
    buf, x, _ = qkv("bshd", "float32", batch, seq, h, 0, d, requires_grad=True, seed=10)
    cos, sin = make_cos_sin((seq,), rot, "float32", half=True, seed=11)
    out = rope_jit.apply_rotary_emb(x, cos, sin, interleaved=True)
    g = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(12))
    out.backward(g)
    c64, s64 = reference_cos_sin(cos, sin, rot, (batch, seq))
    g64 = to_numpy64(g)
    dx = buf.grad[..., :h * d].unflatten(-1, (h, d))
    assert_rope_close(dx, g64, reference.apply_rotary(g64, c64, -s64, False), "float32", d, rot, 2,
                      what="gradient")
