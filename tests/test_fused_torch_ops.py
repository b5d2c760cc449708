"""The fused functions' torch.library ops without a GPU: registration and declared writes,
torch.compile(fullgraph=True) of every fused entry point to one graph node whose arguments
are the call the eager path makes, validation in the fake implementations (errors while
tracing), and meta tensors. The compiled graphs are recorded, never run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import route  # noqa: E402
from torch_trace import _op_nodes, _trace  # noqa: E402
from rope_jit.call_fused import OP_FIELDS, FusedRopeCall, QKNormRopeCall  # noqa: E402
from rope_jit.plan_fused import MUTATES, FusedRopeArrays, QKNormRopeArrays  # noqa: E402

T, HQ, HK, R, N, D, PS, PAGES = 6, 4, 2, 32, 16, 48, 4, 8
E4M3 = torch.float8_e4m3fn


def _bind():
    import rope_jit.torch_ops_fused  # noqa: F401  (importing it registers the ops)

    return torch.ops.rope_jit


def _x(device="cpu"):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    def i(*values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype, device=device)

    return dict(
        q=r(T, HQ, R), k=r(T, HK, R), qn=r(T, HQ, N), kn=r(T, HK, N), v=r(T, HK, R + N),
        k2=r(T, R), kn2=r(T, 2 * N), pos=torch.arange(T, device=device),
        cache=torch.randn(64, R, generator=g).to(device), cache_d=r(64, D, dtype=torch.float32),
        kcache=torch.zeros(PAGES, PS, HK, R + N, dtype=E4M3, device=device),
        vcache=torch.zeros(PAGES, PS, HK, R + N, dtype=E4M3, device=device),
        batch=i(0, 0, 1, 1, 1, -1), ppos=i(0, 1, 0, 1, 2, 0), kv_indices=i(3, 1, 2, 0),
        kv_indptr=i(0, 2, 4), slots=torch.tensor([5, -1, 7, 8, 20, 3], device=device),
        mla_cache=torch.zeros(PAGES, PS, 2 * N + R, dtype=torch.uint8, device=device),
        scale=torch.ones(1, device=device),
        query=r(T, HQ * D), key=r(T, HK * D), value=r(T, HK * D),
        key_cache=torch.zeros(PAGES, PS, HK, D, dtype=torch.bfloat16, device=device),
        value_cache=torch.zeros(PAGES, PS, HK, D, dtype=torch.bfloat16, device=device),
        k_buffer=torch.zeros(32, HK * D, dtype=torch.bfloat16, device=device),
        v_buffer=torch.zeros(32, HK * D, dtype=torch.bfloat16, device=device),
        qkv=r(T, (HQ + 2 * HK) * D), w=r(D), w32=r(D, dtype=torch.float32))


# Every fused public entry point: name -> (op, call(x) -> result). Tensors the traced
# function receives as inputs: q, k and the caches it writes.
CALLS = {
    "rope_quantize_fp8": ("rope_quantize_", lambda x: rope_jit.rope_quantize_fp8(
        x["q"], x["k"], x["qn"], x["kn"], x["cache"], x["pos"], quant_scale_q=0.5)),
    "mla_rope_quantize_fp8": ("rope_quantize_", lambda x: rope_jit.mla_rope_quantize_fp8(
        x["q"], x["k2"], None, x["kn2"], None, x["pos"], False, torch.float8_e5m2,
        rope_theta=5e5)),
    "rope_quantize_fp8_append_paged_kv_cache": ("rope_append_paged_", lambda x:
        rope_jit.rope_quantize_fp8_append_paged_kv_cache(
            x["q"], x["k"], x["qn"], x["kn"], x["v"], x["cache"], x["pos"],
            (x["kcache"], x["vcache"]), x["kv_indices"], x["kv_indptr"], x["batch"], x["ppos"],
            page_size=PS, kv_layout="NHD", quant_scale_kv=2.0)),
    "concat_and_cache_mla_rope_fused": ("rope_cache_", lambda x:
        rope_jit.concat_and_cache_mla_rope_fused(
            x["pos"], x["q"], x["k2"], x["kn2"], x["cache"], True, x["slots"], x["mla_cache"],
            "fp8", x["scale"])),
    "rope_and_reshape_and_cache_flash": ("rope_cache_", lambda x:
        rope_jit.rope_and_reshape_and_cache_flash(
            x["pos"], x["query"], x["key"], x["value"], D, x["cache"], False,
            x["key_cache"], x["value_cache"], x["slots"])),
    "apply_rope_with_cos_sin_cache_inplace+fused_set_kv_buffer_arg": ("rope_cache_", lambda x:
        rope_jit.apply_rope_with_cos_sin_cache_inplace(
            x["pos"], x["query"], x["key"], D, x["cache_d"], True,
            rope_jit.FusedSetKVBufferArg(x["value"], x["k_buffer"], x["v_buffer"],
                                         cache_loc=x["slots"]))),
    "fused_qk_norm_rope": ("qk_norm_rope_", lambda x: rope_jit.fused_qk_norm_rope(
        x["qkv"], HQ, HK, HK, D, 1e-6, x["w"], x["w"], x["cache"], True, x["pos"])),
    "fused_qk_norm_rope+on_the_fly": ("qk_norm_rope_", lambda x: rope_jit.fused_qk_norm_rope(
        x["qkv"], HQ, HK, HK, D, 1e-5, x["w32"], x["w32"], None, False, x["pos"],
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}


def test_ops_declare_exactly_what_they_write():
    ops = _bind()
    for name, written in (("rope_quantize_", MUTATES["rope_quantize_fp8"]),
                          ("rope_append_paged_", MUTATES["rope_quantize_fp8_append_paged_kv_cache"]),
                          ("rope_cache_", MUTATES["rope_and_reshape_and_cache_flash"]),
                          ("qk_norm_rope_", ("qkv",))):
        schema = getattr(ops, name).default._schema
        got = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert got == set(written), name
    assert set(MUTATES["concat_and_cache_mla_rope_fused"]) < set(MUTATES["rope_and_reshape_and_cache_flash"])


def _recorded(monkeypatch, call, x):
    """The call and arrays the eager path hands to route."""
    seen = []

    def record_rope(c, arrays):
        seen.append((c, arrays))
        return None

    monkeypatch.setattr(route, "rope_fused", record_rope)
    monkeypatch.setattr(route, "qk_norm_rope", record_rope)
    call(x)
    monkeypatch.undo()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name", sorted(CALLS))
def test_entry_point_compiles_to_one_graph_node(name, monkeypatch):
    """Under torch.compile(fullgraph=True): no graph break, one node of the function's op,
    whose call arguments are exactly the call the eager path builds."""
    _bind()
    op, call = CALLS[name]
    x = _x()

    def fn(q, qkv, query):
        out = call(dict(x, q=q, qkv=qkv, query=query))
        return (out[0].float() if out is not None else q) + 1

    gm = _trace(fn, x["q"], x["qkv"], x["query"])
    nodes = _op_nodes(gm)
    assert [str(n.target).replace(".default", "") for n in nodes] == [f"rope_jit.{op}"]
    eager_call, eager_arrays = _recorded(monkeypatch, call, x)
    call_type = QKNormRopeCall if op == "qk_norm_rope_" else FusedRopeCall
    arrays_type = QKNormRopeArrays if op == "qk_norm_rope_" else FusedRopeArrays
    n = len(arrays_type._fields)
    assert call_type(*nodes[0].args[n:]) == eager_call
    for field, got, want in zip(arrays_type._fields, nodes[0].args[:n], eager_arrays):
        if field.endswith("_out"):  # allocated in the graph, before the op
            continue
        assert (got is None) == (want is None), field


def test_all_fused_entry_points_in_one_graph():
    _bind()
    x = _x()

    def fn(q, qkv, query):
        y = dict(x, q=q, qkv=qkv, query=query)
        outs = [call(y) for _, call in CALLS.values()]
        return sum(o[0].float().sum() for o in outs if o is not None)

    gm = _trace(fn, x["q"], x["qkv"], x["query"])
    assert len(_op_nodes(gm)) == len(CALLS)


def test_outputs_are_allocated_in_the_graph_with_flashinfer_shapes():
    """rope_quantize_fp8 without outputs: four new tensors (empty nope parts [nnz, heads,
    0]) in the quantize dtype, then the op writes them."""
    x = {k: v.to("meta") for k, v in _x().items()}
    q_out, k_out, qn_out, kn_out = rope_jit.mla_rope_quantize_fp8(
        x["q"], x["k2"], None, None, x["cache"], x["pos"], quantize_dtype=torch.float8_e5m2)
    assert [tuple(t.shape) for t in (q_out, k_out, qn_out, kn_out)] == [
        (T, HQ, R), (T, R), (T, HQ, 0), (T, 0)]
    assert {t.dtype for t in (q_out, k_out, qn_out, kn_out)} == {torch.float8_e5m2}
    given = torch.empty(T, HK, R, dtype=E4M3, device="meta")
    for backend in ("cuda", "cutile"):  # FlashInfer's two; rope_jit's kernel runs either way
        outs = rope_jit.rope_quantize_fp8(x["q"], x["k"], x["qn"], x["kn"], x["cache"], x["pos"],
                                          k_rope_out=given, backend=backend)
        assert outs[1] is given and outs[0].dtype == E4M3
    q_out, qn_out = rope_jit.rope_quantize_fp8_append_paged_kv_cache(
        x["q"], x["k"], x["qn"], x["kn"], x["v"], x["cache"], x["pos"],
        (x["kcache"].to(torch.bfloat16), x["vcache"].to(torch.bfloat16)), x["kv_indices"],
        x["kv_indptr"], x["batch"], x["ppos"], page_size=PS)
    assert q_out.dtype == qn_out.dtype == torch.bfloat16  # an unquantized (bf16) append


BAD = [
    ("k-width", lambda x: rope_jit.rope_quantize_fp8(x["q"], x["k"][..., :16], x["qn"], x["kn"],
                                                     x["cache"], x["pos"]),
     ValueError, r"k_rope: last dim 16 must equal the rope dim 32 of q_rope"),
    ("page-size", lambda x: rope_jit.rope_quantize_fp8_append_paged_kv_cache(
        x["q"], x["k"], x["qn"], x["kn"], x["v"], x["cache"], x["pos"], (x["kcache"], x["vcache"]),
        x["kv_indices"], x["kv_indptr"], x["batch"], x["ppos"], page_size=8),
     ValueError, r"paged_kv_cache\[0\]: dim 1 \(page_size\) must be 8, got 4"),
    ("mla-kv-cache-dtype", lambda x: rope_jit.concat_and_cache_mla_rope_fused(
        x["pos"], x["q"], x["k2"], x["kn2"], x["cache"], True, x["slots"], x["mla_cache"], "auto",
        x["scale"]),
     TypeError, r"kv_cache: kv_cache_dtype 'auto' stores the input dtype bfloat16, got a uint8 cache"),
    ("qkv-width", lambda x: rope_jit.fused_qk_norm_rope(
        x["qkv"], HQ, HK, HK + 1, D, 1e-6, x["w"], x["w"], x["cache"], True, x["pos"]),
     ValueError, r"qkv: last dim 384 must equal"),
    ("sglang-buffer", lambda x: rope_jit.apply_rope_with_cos_sin_cache_inplace(
        x["pos"], x["query"], x["key"], D, x["cache_d"], True,
        rope_jit.FusedSetKVBufferArg(x["value"], x["k_buffer"][:, :D], x["v_buffer"],
                                     cache_loc=x["slots"])),
     ValueError, r"fused_set_kv_buffer_arg.k_buffer: expected 2 heads of 48 per slot"),
]


@pytest.mark.parametrize("kind", ["trace", "meta"])
@pytest.mark.parametrize("call, exc, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_fake_implementations_validate(call, exc, match, kind):
    """The fake implementations run the planner on the tensors' metadata: a bad call fails
    while tracing (and on meta tensors) with the eager message."""
    _bind()
    if kind == "meta":
        with pytest.raises(exc, match=match):
            call({k: v.to("meta") for k, v in _x().items()})
        return
    x = _x()
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(lambda q: call(dict(x, q=q)), backend="eager", fullgraph=True)(x["q"])
    assert isinstance(info.value, exc) or isinstance(info.value.__cause__, exc) or \
        exc.__name__ in str(info.value)
    assert pytest.importorskip("re").search(match, str(info.value))


def test_eager_cpu_tensors_are_refused_before_anything_is_written():
    x = _x()
    before = x["kcache"].clone()
    with pytest.raises(TypeError, match=r"^q_rope: expected a CUDA device array .*host memory"):
        CALLS["rope_quantize_fp8_append_paged_kv_cache"][1](x)
    assert torch.equal(x["kcache"].view(torch.uint8), before.view(torch.uint8))
    with pytest.raises(TypeError, match=r"^qkv: expected a CUDA device array .*host memory"):
        CALLS["fused_qk_norm_rope"][1](x)


def test_op_fields_follow_the_calls():
    assert [n for n, _ in OP_FIELDS[FusedRopeCall]] == list(FusedRopeCall._fields)
    assert [n for n, _ in OP_FIELDS[QKNormRopeCall]] == list(QKNormRopeCall._fields)


def test_api_argument_errors():
    """Errors of the public functions' own arguments, before any array is looked at."""
    x = _x()
    a = (x["q"], x["k"], x["qn"], x["kn"], x["cache"], x["pos"])
    with pytest.raises(ValueError, match=r"^backend: expected 'cuda' or 'cutile' .*got 'triton'"):
        rope_jit.rope_quantize_fp8(*a, backend="triton")
    with pytest.raises(TypeError, match=r"^enable_pdl: expected a bool, got str"):
        rope_jit.rope_quantize_fp8(*a, enable_pdl="yes")
    with pytest.raises(ValueError, match=r"^cos_sin_cache: pass either a cos/sin cache or on-the-fly"):
        rope_jit.rope_quantize_fp8(*a, rope_theta=5e5)
    with pytest.raises(TypeError, match=r"^paged_kv_cache: expected a tuple of 2 arrays, got Tensor"):
        rope_jit.rope_quantize_fp8_append_paged_kv_cache(
            x["q"], x["k"], None, None, x["v"], x["cache"], x["pos"], x["kcache"], x["kv_indices"],
            x["kv_indptr"], x["batch"], x["ppos"])
    with pytest.raises(ValueError, match=r"^k_scale: expected a finite number > 0, got 0.0"):
        rope_jit.rope_and_reshape_and_cache_flash(x["pos"], x["query"], x["key"], x["value"], D, x["cache"],
                                                  True, x["key_cache"], x["value_cache"], x["slots"], "fp8", 0.0)
    arg = rope_jit.FusedSetKVBufferArg(x["value"], x["k_buffer"], x["v_buffer"], k_scale=x["scale"],
                                       cache_loc=x["slots"])
    with pytest.raises(TypeError, match=r"^fused_set_kv_buffer_arg.k_scale/v_scale: expected numbers or None"):
        rope_jit.apply_rope_with_cos_sin_cache_inplace(x["pos"], x["query"], x["key"], D, x["cache_d"], True, arg)
    with pytest.raises(ValueError, match=r"^check_positions: not available with fused_set_kv_buffer_arg"):
        rope_jit.apply_rope_with_cos_sin_cache_inplace(x["pos"], x["query"], x["key"], D, x["cache_d"], True,
                                                       rope_jit.FusedSetKVBufferArg(x["value"], x["k_buffer"], x["v_buffer"],
                                                                                    cache_loc=x["slots"]),
                                                       check_positions=True)

