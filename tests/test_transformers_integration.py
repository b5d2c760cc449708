"""rope_jit.integrations.transformers on a machine with no GPU.

* patch and revert mechanics: the patched functions are rope_jit's, revert restores the
  exact original objects, a model patches the modules of its families and nothing else;
* refusals: unknown families, models with RoPE of an unknown family, unknown signatures,
  unknown RoPE functions in a known module, all before anything is patched;
* every family's small model (tests/transformers_models.py), patched, run forward and
  backward under FakeTensorMode: the attention calls go through rope_jit's op (its fake
  implementation validates each call), and every kernel those calls need compiles with
  NVRTC for sm_90 (the same planner, with the views' real alignments).
"""

from __future__ import annotations

import importlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import rope_jit  # noqa: E402
from rope_jit.integrations import transformers as integration  # noqa: E402
from rope_jit.integrations.transformers import FAMILIES, apply_rope_jit, revert_rope_jit  # noqa: E402

from torch_trace import _op_nodes, _trace  # noqa: E402
from transformers_models import MODELS, VOCAB, multimodal_rotary_pos_emb_v4  # noqa: E402

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi", "phi3", "gpt_neox",
            "deepseek_v3", "qwen2_vl"}


def _module(family):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def _rope_attrs(module) -> dict:
    return {n: getattr(module, n) for n in FAMILIES[integration._MODULE_FAMILY[module.__name__]]
            if hasattr(module, n)}


@pytest.fixture(autouse=True)
def _nothing_left_patched():
    """Each test starts and ends with every family unpatched."""
    originals = {f: _rope_attrs(_module(f)) for f in FAMILIES}
    yield
    for f in FAMILIES:
        revert_rope_jit(f)
        assert _rope_attrs(_module(f)) == originals[f], f"{f} left patched"
        for name, fn in originals[f].items():
            assert getattr(_module(f), name) is fn


def test_families():
    assert REQUIRED <= set(FAMILIES)
    assert set(MODELS) == set(FAMILIES), "every family needs a small model in transformers_models"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patch_and_revert_a_family(family):
    """By name: each RoPE function of the family's module becomes rope_jit's; patching
    again changes nothing; revert puts back the very objects; reverting again is a no-op."""
    module = _module(family)
    before = _rope_attrs(module)
    assert before, f"{module.__name__} defines none of {FAMILIES[family]}"
    names = apply_rope_jit(family)
    assert sorted(names) == sorted(f"{module.__name__}.{n}" for n in before)
    after = _rope_attrs(module)
    for n, fn in after.items():
        assert fn is not before[n] and fn.__module__.startswith("rope_jit"), n
    assert apply_rope_jit(family) == names and _rope_attrs(module) == after
    assert sorted(revert_rope_jit(family)) == sorted(names)
    assert all(getattr(module, n) is fn for n, fn in before.items())
    assert revert_rope_jit(family) == ()


def test_the_replacements_are_the_public_functions():
    """transformers' own signatures map to rope_jit's public functions, no wrapper."""
    apply_rope_jit("llama")
    apply_rope_jit("deepseek_v3")
    assert _module("llama").apply_rotary_pos_emb is rope_jit.apply_rotary_pos_emb
    ds = _module("deepseek_v3")
    assert ds.apply_rotary_pos_emb is rope_jit.apply_rotary_pos_emb
    assert ds.apply_rotary_pos_emb_interleave is rope_jit.apply_rotary_pos_emb_interleave


def test_targets_by_alias_and_module():
    """A sub-config's model_type and the modeling module itself name the family."""
    assert apply_rope_jit("gemma3_text") == apply_rope_jit(_module("gemma3"))
    assert _module("gemma3").apply_rotary_pos_emb is rope_jit.apply_rotary_pos_emb
    assert revert_rope_jit(_module("gemma3")) != ()


def _small(family):
    torch.manual_seed(0)
    return MODELS[family]().eval()


def test_model_instance_patches_its_family_module_only():
    """A model patches its families' modules (so every model of the family in the process,
    as documented) and no other family."""
    llama = _small("llama")
    mistral = _module("mistral").apply_rotary_pos_emb
    assert apply_rope_jit(llama) == ("transformers.models.llama.modeling_llama.apply_rotary_pos_emb",)
    assert _module("llama").apply_rotary_pos_emb is rope_jit.apply_rotary_pos_emb
    assert _module("mistral").apply_rotary_pos_emb is mistral
    assert revert_rope_jit(llama) == ("transformers.models.llama.modeling_llama.apply_rotary_pos_emb",)


def test_a_model_of_several_families():
    """Every known family found among a model's submodules is patched (a wrapper module of
    the user's own around two models, say)."""
    both = torch.nn.ModuleDict({"a": _small("qwen3"), "b": _small("gpt_neox")})
    names = apply_rope_jit(both)
    assert {n.rsplit(".", 2)[0] for n in names} == {"transformers.models.qwen3",
                                                    "transformers.models.gpt_neox"}


def test_patched_attention_calls_rope_jit():
    """The attention layers look the function up at each call: a patched model on the CPU
    reaches rope_jit (its TypeError for host memory), an unpatched one runs."""
    model = _small("llama")
    ids = torch.randint(0, VOCAB, (1, 5))
    model(ids)
    apply_rope_jit(model)
    with pytest.raises(TypeError, match=r"^query: expected a CUDA device array .*host memory"):
        model(ids)
    revert_rope_jit(model)
    model(ids)


# ------------------------------------------------------------------ refusals

def test_unknown_family_name_refused():
    with pytest.raises(ValueError, match=r"^model_or_family: rope_jit does not know the "
                                         r"transformers family 'cohere'; it patches deepseek_v3, gemma"):
        apply_rope_jit("cohere")
    with pytest.raises(ValueError, match=r"is not the modeling module of a family rope_jit knows"):
        apply_rope_jit(importlib.import_module("transformers.models.cohere.modeling_cohere"))
    with pytest.raises(TypeError, match=r"^model_or_family: expected a torch.nn.Module, a family "
                                        r"name or a modeling module, got int"):
        apply_rope_jit(3)


def _cohere():
    cfg = transformers.CohereConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)
    return transformers.CohereForCausalLM(cfg)


def test_model_of_an_unknown_family_refused_and_nothing_patched():
    """Cohere's apply_rotary_pos_emb has Llama's signature but GPT-J pairs: a model using it
    is refused (naming its module and function), and a known family next to it stays
    unpatched (all or nothing)."""
    llama_rope = _module("llama").apply_rotary_pos_emb
    with pytest.raises(ValueError, match=r"^model_or_family: CohereForCausalLM uses RoPE that "
                                         r"rope_jit does not know \(transformers.models.cohere."
                                         r"modeling_cohere defines apply_rotary_pos_emb\)"):
        apply_rope_jit(_cohere())
    mixed = torch.nn.ModuleList([_small("llama"), _cohere()])
    with pytest.raises(ValueError, match=r"uses RoPE that rope_jit does not know"):
        apply_rope_jit(mixed)
    assert _module("llama").apply_rotary_pos_emb is llama_rope


def test_model_without_a_known_family_refused():
    with pytest.raises(ValueError, match=r"^model_or_family: Sequential uses no transformers "
                                         r"family rope_jit knows"):
        apply_rope_jit(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_unknown_signature_refused(monkeypatch):
    """A known function whose parameters changed (a newer transformers): refused, naming
    them; nothing patched."""
    module = _module("qwen2")
    monkeypatch.setattr(module, "apply_rotary_pos_emb", lambda q, k, cos, sin, unsqueeze_dim=1,
                        interleaved=False: (q, k))
    with pytest.raises(ValueError, match=r"apply_rotary_pos_emb\('q', 'k', 'cos', 'sin', "
                                         r"'unsqueeze_dim', 'interleaved'\) has a signature "
                                         r"rope_jit does not know"):
        apply_rope_jit("qwen2")
    assert module.apply_rotary_pos_emb.__module__ == __name__


def test_unknown_rope_function_in_a_known_module_refused(monkeypatch):
    module = _module("llama")

    def apply_rotary_pos_emb_yarn(q, k, cos, sin):
        return q, k

    monkeypatch.setattr(module, "apply_rotary_pos_emb_yarn", apply_rotary_pos_emb_yarn,
                        raising=False)
    original = module.apply_rotary_pos_emb
    with pytest.raises(ValueError, match=r"modeling_llama defines apply_rotary_pos_emb_yarn, "
                                         r"which rope_jit does not replace"):
        apply_rope_jit(_small("llama"))
    assert module.apply_rotary_pos_emb is original


def test_revert_leaves_a_later_replacement_alone():
    """A function someone replaced after rope_jit is left as it is (a warning), and
    rope_jit keeps the original: once the other replacement is undone, revert restores it."""
    module = _module("phi")
    original = module.apply_rotary_pos_emb
    (name,) = apply_rope_jit("phi")
    ours = module.apply_rotary_pos_emb

    def someone_elses(q, k, cos, sin, unsqueeze_dim=1):
        return q, k

    module.apply_rotary_pos_emb = someone_elses
    with pytest.warns(UserWarning, match=r"modeling_phi.apply_rotary_pos_emb was replaced after "
                                         r"rope_jit patched it; left as it is"):
        assert revert_rope_jit("phi") == ()
    assert module.apply_rotary_pos_emb is someone_elses
    module.apply_rotary_pos_emb = ours  # the other patch undone
    assert revert_rope_jit("phi") == (name,)
    assert module.apply_rotary_pos_emb is original


# ------------------------------------------------------------------ transformers 4 signatures

def test_transformers_4_signatures_get_adapters(monkeypatch):
    """transformers 4's apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim) and
    Qwen2-VL's apply_multimodal_rotary_pos_emb get replacements of their signatures."""
    def old_rotary(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return q, k

    monkeypatch.setattr(_module("mistral"), "apply_rotary_pos_emb", old_rotary)
    monkeypatch.setattr(_module("qwen2_vl"), "apply_multimodal_rotary_pos_emb",
                        multimodal_rotary_pos_emb_v4, raising=False)
    apply_rope_jit("mistral")
    apply_rope_jit("qwen2_vl")
    assert (_module("mistral").apply_rotary_pos_emb
            is integration._rotary_pos_emb_with_position_ids)
    assert (_module("qwen2_vl").apply_multimodal_rotary_pos_emb
            is integration._multimodal_rotary_pos_emb)
    revert_rope_jit("mistral")
    revert_rope_jit("qwen2_vl")
    assert _module("mistral").apply_rotary_pos_emb is old_rotary
    assert _module("qwen2_vl").apply_multimodal_rotary_pos_emb is multimodal_rotary_pos_emb_v4


def test_multimodal_adapter_selects_sections_as_transformers_4():
    """The mRoPE adapter hands rope_jit the cos/sin rows transformers 4 selects: checked on
    CPU with the kernel replaced by transformers' own formula (the GPU test runs the
    kernel)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 32, generator=g), torch.randn(2, 2, 5, 32, generator=g)
    cos, sin = torch.randn(3, 2, 5, 32, generator=g), torch.randn(3, 2, 5, 32, generator=g)
    seen = {}

    def formula(q, k, cos, sin, unsqueeze_dim=1):
        seen["cos"] = cos
        rot = lambda x: torch.cat((-x[..., 16:], x[..., :16]), -1)  # noqa: E731
        c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * c + rot(q) * s, k * c + rot(k) * s

    original = integration.apply_rotary_pos_emb
    integration.apply_rotary_pos_emb = formula
    try:
        got = integration._multimodal_rotary_pos_emb(q, k, cos, sin, [4, 6, 6])
    finally:
        integration.apply_rotary_pos_emb = original
    want = multimodal_rotary_pos_emb_v4(q, k, cos, sin, [4, 6, 6])
    assert seen["cos"].shape == (2, 5, 32)
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)


# ------------------------------------------------------------------ every family, traced

def _record_op_calls(monkeypatch) -> list:
    """Spy on the fake implementation of rope_jit's ops: (inplace, tensors..., op args)."""
    from rope_jit import torch_ops

    calls = []
    check = torch_ops._check_fake

    def spy(*args):
        calls.append(args)
        return check(*args)

    monkeypatch.setattr(torch_ops, "_check_fake", spy)
    return calls


def _fake_run(model, dtype, seq, backward):
    from torch._subclasses.fake_tensor import FakeTensorMode

    model.to(dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        ids = torch.randint(0, VOCAB, (2, seq))
        out = model(ids, labels=ids if backward else None)
        if backward:
            out.loss.backward()
        return tuple(out.logits.shape)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_traces_through_rope_jit(family, monkeypatch):
    """The patched model, forward and backward with fake tensors: every attention layer's
    RoPE is one rope_jit op (validated by its fake implementation), the backward the same
    op transposed; the logits have the unpatched model's shape."""
    model = _small(family)
    calls = _record_op_calls(monkeypatch)
    apply_rope_jit(model)
    assert _fake_run(model, torch.float32, 9, backward=True) == (2, 9, VOCAB)
    forward = [c for c in calls if c[-1][7] is False]  # the op args' `inverse`
    backward = [c for c in calls if c[-1][7] is True]
    assert len(forward) == len(backward) == 2  # one per layer
    fields = [n for n, _ in rope_jit.call.OP_FIELDS]
    for f, b in zip(forward, reversed(backward)):
        fc = dict(zip(fields, f[-1]))
        bc = dict(zip(fields, b[-1]))
        assert fc["convention"] == "cos_sin" and fc["heads_dim"] == 1 and not f[0]
        assert (bc["is_neox"], bc["out_neox"]) == ((fc["out_neox"], fc["is_neox"])
                                                   if fc["out_neox"] is not None
                                                   else (fc["is_neox"], None))
    if family == "deepseek_v3":  # config.rope_interleave: GPT-J pairs out in NeoX order
        assert {(dict(zip(fields, c[-1]))["is_neox"], dict(zip(fields, c[-1]))["out_neox"])
                for c in forward} == {(False, True)}


def _desc_of(t):
    """The ArrayDesc the GPU run would see: a 512-byte aligned base (torch's allocator) plus
    the view's storage offset, so vector widths are the real ones."""
    from rope_jit.arrays import ArrayDesc

    if t is None:
        return None
    dtype = str(t.dtype).replace("torch.", "")
    return ArrayDesc((1 << 40) + t.storage_offset() * t.element_size(), tuple(t.shape),
                     tuple(t.stride()), dtype, 0)


@pytest.mark.nvrtc
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_kernels_compile_for_sm_90(family, monkeypatch):
    """Every kernel the GPU tests of this family launch (bf16 prefill, fp32 prefill and its
    backward, fp32 decode of one token), planned as on an H200 (132 SMs) and compiled with
    NVRTC for sm_90."""
    from rope_jit import jit
    from rope_jit.call import from_op_args
    from rope_jit.plan import RopeArrays, plan_rope

    model = _small(family)
    calls = _record_op_calls(monkeypatch)
    apply_rope_jit(model)
    _fake_run(model, torch.float32, 24, backward=True)
    _fake_run(model, torch.float32, 1, backward=False)
    _fake_run(model, torch.bfloat16, 24, backward=False)
    specs = set()
    for inplace, *arrays, op_args in calls:
        plan = plan_rope(from_op_args(inplace, op_args),
                         RopeArrays(*(_desc_of(t) for t in arrays)), num_sms=132)
        specs.add(plan.spec)
    assert {s.dtype for s in specs} == {"float32", "bfloat16"} and any(s.inverse for s in specs)
    for spec in specs:
        assert jit.build(spec, "sm_90")[:4] == b"\x7fELF", spec.words()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_model_compiles_to_one_graph(family):
    """torch.compile(fullgraph=True) of a patched model: no graph break, one rope_jit op
    per layer (traced with a backend that records the graph and never runs it)."""
    model = _small(family)
    apply_rope_jit(model)
    gm = _trace(lambda ids: model(ids, use_cache=False), torch.randint(3, VOCAB, (2, 9)))
    ops = [str(n.target) for n in _op_nodes(gm)]
    assert ops == ["rope_jit.rope"] * 2
