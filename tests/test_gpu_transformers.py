"""transformers models patched with rope_jit on the GPU (marker: gpu).

For every family of ``rope_jit.integrations.transformers.FAMILIES``, a small model built
from its config with random weights (tests/transformers_models.py: 2 layers, heads of 32,
no download), eager attention (deterministic, so any difference is RoPE's):

* logits in bf16, compared with the bf16 rounding the model has anyway, measured in the
  same run: the distance of transformers' own bf16 logits to the exact (fp32) ones.
  rope_jit rounds each rotated element once (fp32 arithmetic) where transformers' bf16
  formula ``q * cos + rotate_half(q) * sin`` rounds three times, and the rest of the bf16
  model is the same, so (1) rope_jit's bf16 logits are as close to the exact ones as
  transformers' are, in RMS over all logits: at most 1.2x (a dry run of these tests with
  an exactly rounded RoPE measured 0.97-1.04x); (2) no logit of the two bf16 runs is
  farther apart than 3x transformers' largest bf16 error (measured up to 1.95x: the worst
  logits sit on bf16 rounding boundaries of the output, where the two runs may round to
  neighbours, two half-ulps apart). A wrong rotation, position or layout gives errors of
  the size of the logits themselves, tens of times these bounds;
* logits, loss and every parameter's gradient of a training step in fp32 (the backward
  is rope_jit's transposed rotation): within 1e-4 of each tensor's scale (fp32 rounding
  differences of about 1e-7, carried through two layers);
* greedy generation of 20 tokens with the KV cache in fp32: the same tokens, and the
  same logits at every step (1e-4), so a wrong decode position would show even where the
  argmax does not move.

Each patched run also counts rope_jit's calls, so a model that silently kept transformers'
RoPE fails. Then each replaced function against transformers' own on random inputs,
including those no small text model reaches (Qwen2-VL's vision tower, transformers 4's
mRoPE function).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rope_jit import reference, route  # noqa: E402
from rope_jit.integrations import transformers as integration  # noqa: E402
from rope_jit.integrations.transformers import FAMILIES, apply_rope_jit, revert_rope_jit  # noqa: E402

from transformers_models import MODELS, VOCAB, multimodal_rotary_pos_emb_v4  # noqa: E402

BATCH, SEQ, NEW_TOKENS = 2, 24, 20


@contextlib.contextmanager
def patched(model, monkeypatch):
    """The model's families patched; yields a list that counts rope_jit's calls."""
    calls = []
    rope = route.rope

    def counting(*args, **kwargs):
        calls.append(1)
        return rope(*args, **kwargs)

    monkeypatch.setattr(route, "rope", counting)
    apply_rope_jit(model)
    try:
        yield calls
    finally:
        revert_rope_jit(model)
        monkeypatch.setattr(route, "rope", rope)


def _small(family):
    torch.manual_seed(0)
    model = MODELS[family]()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    return model.to("cuda").eval()


def _ids(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=g, device="cuda")


@torch.no_grad()
def _logits(model, ids):
    return model(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_logits_within_bf16_rounding(family, monkeypatch):
    model = _small(family)
    ids = _ids()
    exact = _logits(model, ids)                      # fp32, unpatched
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    theirs = _logits(model16, ids)
    with patched(model16, monkeypatch) as calls:
        ours = _logits(model16, ids)
    assert len(calls) == 2, f"{family}: rope_jit ran {len(calls)} times, expected once per layer"
    def rms(t):
        return t.pow(2).mean().sqrt().item()

    bf16_rms, ours_rms = rms(theirs - exact), rms(ours - exact)
    bf16_max, apart = (theirs - exact).abs().max().item(), (ours - theirs).abs().max().item()
    assert bf16_rms > 0
    assert ours_rms <= 1.2 * bf16_rms, (family, ours_rms, bf16_rms)
    assert apart <= 3 * bf16_max, (family, apart, bf16_max)


def _train_step(model, ids):
    """Loss and every parameter's gradient of one step (eval mode: no dropout)."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _assert_close_to_scale(got, want, what, rel=1e-4):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale + 1e-30, f"{what}: max error {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_training_step_gradients(family, monkeypatch):
    model = _small(family)
    ids = _ids(1)
    logits, loss, grads = _train_step(model, ids)
    with patched(model, monkeypatch) as calls:
        logits_jit, loss_jit, grads_jit = _train_step(model, ids)
    assert len(calls) == 2
    _assert_close_to_scale(logits_jit, logits, f"{family} logits")
    _assert_close_to_scale(loss_jit, loss, f"{family} loss")
    assert grads_jit.keys() == grads.keys() and grads
    for name, g in grads.items():
        _assert_close_to_scale(grads_jit[name], g, f"{family} grad of {name}")


def _generate(model, ids):
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits).float()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_with_kv_cache(family, monkeypatch):
    model = _small(family)
    model.generation_config.eos_token_id = None  # always 20 new tokens
    ids = _ids(2)
    with torch.no_grad():
        tokens, logits = _generate(model, ids)
        with patched(model, monkeypatch) as calls:
            tokens_jit, logits_jit = _generate(model, ids)
    assert tokens.shape == (BATCH, SEQ + NEW_TOKENS)
    assert len(calls) == 2 * NEW_TOKENS  # prefill + 19 decode steps, 2 layers each
    assert torch.equal(tokens_jit, tokens), family
    _assert_close_to_scale(logits_jit, logits, f"{family} generation logits")


# ------------------------------------------------------------------ each function

def _module(family):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def _cos_sin(batch, seq, rot, dtype, seed):
    """transformers' cos/sin: cat((freqs, freqs), -1) of positions times frequencies."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pos = torch.randint(0, 4096, (batch, seq), generator=g, device="cuda").double()
    inv = torch.from_numpy(reference.inv_frequencies(rot)).cuda()
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _bhsd(batch, heads, seq, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(batch, seq, heads, d, generator=g, device="cuda").to(dtype).transpose(1, 2)


@pytest.mark.parametrize("family, name, rot", [
    ("llama", "apply_rotary_pos_emb", 64), ("phi3", "apply_rotary_pos_emb", 48),
    ("gpt_neox", "apply_rotary_pos_emb", 16), ("deepseek_v3", "apply_rotary_pos_emb_interleave", 64),
])
def test_function_matches_transformers_in_fp32(family, name, rot):
    """In fp32 both compute the same products; they differ by fp32 rounding (fma vs
    separate roundings) only: 1e-6 of the inputs' scale. Outputs have q's and k's shapes."""
    original = getattr(_module(family), name)
    ours = integration.REPLACEMENTS[name][tuple(inspect.signature(original).parameters)]
    q, k = _bhsd(2, 4, 11, 64, torch.float32, 0), _bhsd(2, 1, 11, 64, torch.float32, 1)
    cos, sin = _cos_sin(2, 11, rot, torch.float32, 2)
    want = original(q, k, cos, sin)
    got = ours(q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * w.abs().max().item())


def test_qwen2_vl_vision_function():
    """Qwen2-VL's vision tower: q [tokens, heads, head_dim] bf16, cos [tokens, head_dim]
    fp32; transformers computes in fp32 and rounds once, as rope_jit: equal, or one bf16
    ulp apart where the fp32 values straddle a rounding boundary (plus fp32 rounding
    under cancellation, 1e-6 of the inputs' scale)."""
    original = _module("qwen2_vl").apply_rotary_pos_emb_vision
    g = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(57, 3, 4, 32, generator=g, device="cuda").to(torch.bfloat16)
    q, k = qkv[:, 0], qkv[:, 1]
    cos, sin = (t[0] for t in _cos_sin(1, 57, 32, torch.float32, 4))
    want = original(q, k, cos, sin)
    got = integration._rotary_pos_emb_vision(q, k, cos, sin)
    slack = 1e-6 * qkv.abs().max().item()
    for g_, w in zip(got, want):
        assert g_.shape == w.shape and g_.dtype == torch.bfloat16
        w64 = w.double().cpu().numpy()
        err = np.abs(g_.double().cpu().numpy() - w64)
        assert (err <= reference.ulp(w64, "bfloat16") + slack).all(), err.max()


def test_transformers_4_multimodal_function():
    """transformers 4's apply_multimodal_rotary_pos_emb (cos/sin [3, B, S, D], one row per
    t/h/w position, sections [4, 6, 6]): the adapter gives its result, in fp32."""
    q, k = _bhsd(2, 4, 9, 32, torch.float32, 5), _bhsd(2, 2, 9, 32, torch.float32, 6)
    rows = [_cos_sin(2, 9, 32, torch.float32, 7 + r) for r in range(3)]
    cos = torch.stack([c for c, _ in rows])
    sin = torch.stack([s for _, s in rows])
    want = multimodal_rotary_pos_emb_v4(q, k, cos, sin, [4, 6, 6])
    got = integration._multimodal_rotary_pos_emb(q, k, cos, sin, [4, 6, 6])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * w.abs().max().item())
