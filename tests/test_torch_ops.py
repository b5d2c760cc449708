"""torch.library ops behind the entry points, on a machine with no GPU (docs/api.md).

Nothing here runs a kernel: torch.compile traces with a backend that records the graph
and never runs it, FakeTensorMode / meta tensors / make_fx(tracing_mode="fake") exercise
the fake implementations and the autograd formula, and the real implementations are only
reached with CPU tensors, which they refuse like every entry point. The GPU side (the
same graphs run, opcheck, CUDA graphs, gradients against the PyTorch formula) is
tests/test_gpu_frameworks.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import rope_jit  # noqa: E402
from rope_jit import route  # noqa: E402
from torch_trace import _op_nodes, _trace, _Traced  # noqa: E402
from rope_jit.call import OP_FIELDS, frequencies_json, from_op_args  # noqa: E402

T, HQ, HK, D = 6, 4, 2, 64
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 5e5}


# Node arguments: query, key, positions, indptr, offsets, cos_sin_cache, cos, sin, then the
# call.
CALL_ARGS = 8
INVERSE = CALL_ARGS + [n for n, _ in OP_FIELDS].index("inverse")


def _bind():
    import rope_jit.torch_ops  # noqa: F401  (importing it registers the ops)

    return torch.ops.rope_jit


def _node_call(node, inplace=False):
    """The RopeCall an op node carries."""
    return from_op_args(inplace, node.args[CALL_ARGS:])


def _inputs(device="cpu", requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, HQ, D, generator=g, dtype=dtype).to(device)
    k = torch.randn(T, HK, D, generator=g, dtype=dtype).to(device)
    if requires_grad:
        q.requires_grad_()
        k.requires_grad_()
    return dict(
        q=q, k=k, pos=torch.arange(T).to(device),
        pos3=torch.stack([torch.arange(T)] * 3).to(device),
        cache=torch.randn(4 * T, D, generator=g).to(device),
        cache_half=torch.randn(4 * T, D // 2, generator=g).to(device),
        indptr=torch.tensor([0, 2, T], dtype=torch.int32).to(device),
        offsets=torch.tensor([3, 9], dtype=torch.int32).to(device),
        # per-token cos/sin: transformers' [batch, seq, rotary_dim], flash-attn's rows
        cos=torch.randn(1, T, D, generator=g).to(device),
        sin=torch.randn(1, T, D, generator=g).to(device),
        cos_half=torch.randn(3 * T, D // 2, generator=g).to(device),
        sin_half=torch.randn(3 * T, D // 2, generator=g).to(device))


# Every public RoPE entry point: (name, op, call(inputs) -> result).
def _q2(x):
    return x["q"].reshape(T, HQ * D)


def _k2(x):
    return x["k"].reshape(T, HK * D)


def _bhsd(t):
    """[T, H, D] seen as transformers' attention layout [1, H, T, D] (a view)."""
    return t.transpose(0, 1).unsqueeze(0)


def _flash_inplace(x):
    x4 = x["q"].unsqueeze(0)
    out = rope_jit.apply_rotary_emb(x4, x["cos_half"], x["sin_half"], inplace=True,
                                    seqlen_offsets=2)
    assert out is x4  # flash-attn returns x itself; None here, as every in-place entry point


CALLS = {
    "apply_rope_inplace_with_cache": ("rope_", lambda x: rope_jit.apply_rope_inplace_with_cache(
        x["pos"], _q2(x), _k2(x), D, x["cache"], True)),
    "apply_rope_with_cos_sin_cache": ("rope", lambda x: rope_jit.apply_rope_with_cos_sin_cache(
        x["pos"], _q2(x), _k2(x), D, x["cache_half"], False)),
    "apply_rope_with_cos_sin_cache_inplace": ("rope_", lambda x:
                                              rope_jit.apply_rope_with_cos_sin_cache_inplace(
                                                  x["pos"], x["q"], None, D, x["cache"])),
    "apply_rope": ("rope", lambda x: rope_jit.apply_rope(
        x["q"], x["k"], x["indptr"], x["offsets"], rotary_dim=32, interleave=True)),
    "apply_rope_inplace": ("rope_", lambda x: rope_jit.apply_rope_inplace(
        x["q"], x["k"], x["indptr"], x["offsets"], rope_scale=2.0, rope_theta=5e5)),
    "apply_rope_pos_ids": ("rope", lambda x: rope_jit.apply_rope_pos_ids(x["q"], None, x["pos"])),
    "apply_rope_pos_ids_inplace": ("rope_", lambda x: rope_jit.apply_rope_pos_ids_inplace(
        x["q"], x["k"], x["pos"], rope_scaling=YARN)),
    "apply_llama31_rope": ("rope", lambda x: rope_jit.apply_llama31_rope(
        x["q"], x["k"], x["indptr"], x["offsets"])),
    "apply_llama31_rope_inplace": ("rope_", lambda x: rope_jit.apply_llama31_rope_inplace(
        x["q"], x["k"], x["indptr"], x["offsets"], rotary_dim=48, old_context_len=4096)),
    "apply_llama31_rope_pos_ids": ("rope", lambda x: rope_jit.apply_llama31_rope_pos_ids(
        x["q"], x["k"], x["pos"], interleave=True, high_freq_factor=2.0)),
    "apply_llama31_rope_pos_ids_inplace": ("rope_", lambda x:
                                           rope_jit.apply_llama31_rope_pos_ids_inplace(
                                               x["q"], x["k"], x["pos"])),
    "apply_rope_pos_ids+llama3_dict": ("rope", lambda x: rope_jit.apply_rope_pos_ids(
        x["q"], x["k"], x["pos"], rope_scaling=LLAMA3)),
    "apply_mrope_inplace_with_cache": ("rope_", lambda x: rope_jit.apply_mrope_inplace_with_cache(
        x["pos3"], _q2(x), _k2(x), D, x["cache"], True, [16, 8, 8])),
    "apply_mrope_with_cos_sin_cache": ("rope", lambda x: rope_jit.apply_mrope_with_cos_sin_cache(
        x["pos3"], _q2(x), _k2(x), D, x["cache"], False, (8, 12, 12), True)),
    "apply_mrope_pos_ids": ("rope", lambda x: rope_jit.apply_mrope_pos_ids(
        x["q"], x["k"], x["pos3"], [16, 8, 8], rope_scaling=YARN)),
    "apply_mrope_pos_ids_inplace": ("rope_", lambda x: rope_jit.apply_mrope_pos_ids_inplace(
        x["q"], None, x["pos3"], [4, 6, 6], rotary_dim=32, mrope_interleaved=True)),
    "positions_from_offsets": ("positions_from_offsets", lambda x: rope_jit.positions_from_offsets(
        x["indptr"], x["offsets"], T)),
    "apply_rotary_pos_emb": ("rope", lambda x: rope_jit.apply_rotary_pos_emb(
        _bhsd(x["q"]), _bhsd(x["k"]), x["cos"], x["sin"])),
    "apply_rotary_pos_emb_inplace": ("rope_", lambda x: rope_jit.apply_rotary_pos_emb_inplace(
        x["q"].unsqueeze(0), x["k"].unsqueeze(0), x["cos"][..., :32], x["sin"][..., :32],
        unsqueeze_dim=2)),
    "apply_rotary_pos_emb_interleave": ("rope", lambda x: rope_jit.apply_rotary_pos_emb_interleave(
        _bhsd(x["q"]), _bhsd(x["k"]), x["cos"], x["sin"])),
    "apply_rotary_emb": ("rope", lambda x: rope_jit.apply_rotary_emb(
        x["q"].unsqueeze(0), x["cos_half"], x["sin_half"], interleaved=True, seqlen_offsets=2)),
    "apply_rotary_emb+inplace": ("rope_", _flash_inplace),
}


def test_every_rope_entry_point_is_in_the_table():
    """A new public entry point must join CALLS (and so every test below)."""
    names = {n for n in rope_jit.__all__ if n.startswith("apply_") or n == "positions_from_offsets"}
    assert names <= {n.split("+")[0] for n in CALLS}, names - set(CALLS)


# ------------------------------------------------------------------ registration

def test_ops_are_registered_with_their_mutations():
    ops = _bind()
    rope, rope_, pos = ops.rope.default, ops.rope_.default, ops.positions_from_offsets.default
    writes = lambda op: [a.name for a in op._schema.arguments  # noqa: E731
                         if a.alias_info is not None and a.alias_info.is_write]
    assert writes(rope_) == ["query", "key"], "in place: query and key declared as mutated"
    assert writes(rope) == [] and writes(pos) == []
    assert len(rope_._schema.returns) == 0
    assert [str(r.type) for r in rope._schema.returns] == ["Tensor", "Tensor"]
    # op arguments are tensors, numbers, bools, strings and lists only
    allowed = {"Tensor", "Optional[Tensor]", "Optional[int]", "int", "bool", "Optional[bool]",
               "float", "str", "Optional[str]", "List[float]", "Optional[List[int]]",
               "Optional[SymInt]"}
    for op in (rope, rope_, pos):
        assert {str(a.type) for a in op._schema.arguments} <= allowed, op._schema


def test_first_call_under_compile_in_a_fresh_process():
    """rope_jit imported before torch, and its very first torch call inside torch.compile:
    the ops are registered while Dynamo traces, and the graph is whole."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import rope_jit
        assert 'torch' not in sys.modules
        import torch
        graphs = []
        class Traced(Exception): pass
        def backend(gm, example_inputs):
            graphs.append(gm)
            def run(*args): raise Traced
            return run
        def f(q, k, pos):
            return rope_jit.apply_rope_pos_ids(q, k, pos)[0] * 2
        try:
            torch.compile(f, backend=backend, fullgraph=True)(
                torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.arange(3))
        except Traced:
            pass
        print(len(graphs), sorted(str(n.target).replace('.default', '')
                                  for n in graphs[0].graph.nodes if 'rope_jit' in str(n.target)))
    """ % str(__import__("pathlib").Path(rope_jit.__file__).parent.parent))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "1 ['rope_jit.rope']", r.stdout


# ------------------------------------------------------------------ torch.compile, traced only

def _name(node) -> str:
    """'rope_jit.rope' for a node of the op (Dynamo records the packet, AOT the overload)."""
    return str(node.target).replace(".default", "")


def _recorded_call(monkeypatch, call, x):
    """The RopeCall and arrays the eager path hands to route.rope for this call."""
    seen = []

    def record(rope_call, query, key, positions=None, indptr=None, offsets=None, cache=None,
               cos=None, sin=None):
        seen.append((rope_call, (positions, indptr, offsets, cache, cos, sin)))
        return None if rope_call.inplace else (query, key)

    monkeypatch.setattr(route, "rope", record)
    call(x)
    monkeypatch.undo()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name", sorted(CALLS))
def test_entry_point_compiles_to_one_graph_with_the_op(name, monkeypatch):
    """Each entry point under torch.compile(fullgraph=True): no graph break, one node of its
    op, and the op's arguments mean exactly what the eager path passes to run_rope (the
    RopeCall: frequencies, rotary dim, mRoPE section, head size, style, inverse)."""
    _bind()
    op, call = CALLS[name]
    x = _inputs()

    def fn(q, k, pos):
        out = call(dict(x, q=q, k=k, pos=pos))
        if out is None:
            return q + 1
        if isinstance(out, tuple):
            return out[0] + 1
        return out + 1

    gm = _trace(fn, x["q"], x["k"], x["pos"])
    nodes = _op_nodes(gm)
    assert [_name(n) for n in nodes] == [f"rope_jit.{op}"]
    if op == "positions_from_offsets":
        assert nodes[0].args[2] == T
        return
    eager_call, eager_arrays = _recorded_call(monkeypatch, call, x)
    assert eager_call.inplace is (op == "rope_")
    assert _node_call(nodes[0], eager_call.inplace) == eager_call
    for got, want in zip(nodes[0].args[2:CALL_ARGS], eager_arrays):
        assert (got is None) == (want is None)


def test_rope_scaling_dict_is_resolved_at_trace_time():
    """A HuggingFace dict is resolved once, while tracing (its NumPy is never traced): the
    graph holds the numbers, identical to the eager resolution."""
    x = _inputs()
    gm = _trace(lambda q, pos: rope_jit.apply_rope_pos_ids(q, None, pos, rope_scaling=YARN)[0],
                x["q"], x["pos"])
    (node,) = _op_nodes(gm)
    assert _node_call(node).frequencies == frequencies_json(rope_scaling=YARN)


def test_all_entry_points_in_one_graph():
    """One function calling every entry point compiles to one graph with one node each."""
    _bind()
    x = _inputs()

    def fn(q, k, pos):
        y = dict(x, q=q.clone(), k=k.clone(), pos=pos)
        total = q.sum()
        for _, call in CALLS.values():
            out = call(y)
            if isinstance(out, tuple):
                total = total + out[0].sum()
            elif out is not None:
                total = total + out.sum()
        return total

    nodes = _op_nodes(_trace(fn, x["q"], x["k"], x["pos"]))
    assert sorted(_name(n) for n in nodes) == sorted(f"rope_jit.{op}" for op, _ in CALLS.values())


def test_positions_from_offsets_without_nnz_has_a_data_dependent_size():
    """nnz=None under compile: the token count is indptr[-1], an unbacked size, and the
    positions feed the next op without a graph break."""
    x = _inputs()

    def fn(indptr, offsets, q):
        pos = rope_jit.positions_from_offsets(indptr, offsets)
        return rope_jit.apply_rope_pos_ids(q, None, pos)[0]

    nodes = _op_nodes(_trace(fn, x["indptr"], x["offsets"], x["q"]))
    assert [_name(n) for n in nodes] == ["rope_jit.positions_from_offsets", "rope_jit.rope"]
    size = nodes[0].meta["example_value"].shape[0]
    assert isinstance(size, torch.SymInt) and str(size).startswith("u")


def test_aot_autograd_forward_and_backward_graphs():
    """Through AOTAutograd (fake tensors, functionalization, the autograd formula): the
    in-place op is functionalized, and the backward graph is the same op with
    inverse=True and otherwise the forward's arguments."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition

    graphs = {}

    def compiler(name):
        def compile_fn(gm, example_inputs):
            graphs[name] = gm

            def run(*a):
                raise _Traced
            return run
        return compile_fn

    def partition(joint, inputs, **kw):
        fw, bw = default_partition(joint, inputs, **kw)
        graphs["bw"] = bw
        return fw, bw

    backend = aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw_compiled"),
                           partition_fn=partition)
    x = _inputs(requires_grad=True)

    def fn(q, k, pos, cache):
        qo, ko = rope_jit.apply_rope_with_cos_sin_cache(pos, _q2(dict(q=q)), _k2(dict(k=k)), D,
                                                        cache, False)
        q2 = q.detach().clone()
        rope_jit.apply_rope_inplace_with_cache(pos, q2, None, D, cache, True)
        return (qo * 3).sum() + ko.sum() + q2.sum()

    torch._dynamo.reset()
    with pytest.raises(_Traced):
        torch.compile(fn, backend=backend, fullgraph=True)(x["q"], x["k"], x["pos"], x["cache"])
    fw_ops = [str(n.target) for n in graphs["fw"].graph.nodes if n.op == "call_function"]
    assert "rope_jit.rope.default" in fw_ops
    assert any("auto_functionalized" in t for t in fw_ops), fw_ops  # rope_ as a functional node
    fwd = [n for n in _op_nodes(graphs["fw"]) if _name(n) == "rope_jit.rope"]
    bwd = _op_nodes(graphs["bw"])
    assert len(fwd) == 1 and [_name(n) for n in bwd] == ["rope_jit.rope"]
    assert fwd[0].args[INVERSE] is False and bwd[0].args[INVERSE] is True
    # head size, style, frequencies: the same family
    assert _node_call(fwd[0])._replace(inverse=True) == _node_call(bwd[0])


# ------------------------------------------------------------------ fake and meta tensors

def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("kind", ["fake", "meta"])
def test_output_metadata_on_fake_and_meta_tensors(name, kind):
    """FakeTensorMode and meta tensors: out-of-place results are new contiguous tensors of
    the inputs' shapes, dtype and device (None for an absent key); in place returns None.
    bf16 inputs, so a result of the wrong dtype shows."""
    op, call = CALLS[name]
    if kind == "fake":
        with _fake_mode():
            x = _inputs(dtype=torch.bfloat16)
            out = call(x)
    else:
        x = {n: t.to("meta") for n, t in _inputs(dtype=torch.bfloat16).items()}
        out = call(x)
    if op == "rope_":
        assert out is None
        return
    if op == "positions_from_offsets":
        assert out.shape == (T,) and out.dtype == torch.int32 and out.device == x["indptr"].device
        return
    if name == "apply_rotary_emb":  # flash-attn's: one array in, one out
        out = (out, None)
    assert isinstance(out, tuple) and len(out) == 2
    for res in out:
        if res is None:
            continue
        assert res.dtype == torch.bfloat16 and res.is_contiguous()
        assert res.device == x["q"].device
    # [T, H*D], [T, H, D], transformers' [1, H, T, D], flash-attn's [1, T, H, D]
    q_shapes = {tuple(_q2(x).shape), tuple(x["q"].shape), tuple(_bhsd(x["q"]).shape),
                (1, *x["q"].shape)}
    assert tuple(out[0].shape) in q_shapes
    if out[1] is not None:
        assert tuple(out[1].shape) in {tuple(_k2(x).shape), tuple(x["k"].shape),
                                       tuple(_bhsd(x["k"]).shape)}


def test_key_none_gives_none_not_the_placeholder():
    with _fake_mode():
        x = _inputs()
        q_out, k_out = rope_jit.apply_rope_pos_ids(x["q"], None, x["pos"])
    assert k_out is None and q_out.shape == x["q"].shape


@pytest.mark.parametrize("bad, match", [
    (dict(head_size=48), r"^query: last dim 256 is not a multiple of head_size 48"),
    (dict(pos=slice(0, T - 1)), r"^query: token dims \[6\] do not match"),
    (dict(cache_width=63), r"cos_sin_cache width \(rotary_dim\): expected a positive even"),
    (dict(pos_dtype=torch.float32), r"^positions: expected dtype int32 or int64"),
])
def test_fake_tensors_validate_at_trace_time(bad, match):
    """The fake implementation runs the planner on the tensors' metadata, so a bad call fails
    while tracing with the same named error as at run time."""
    with _fake_mode():
        x = _inputs()
        pos = x["pos"][bad["pos"]] if "pos" in bad else x["pos"]
        if "pos_dtype" in bad:
            pos = pos.to(bad["pos_dtype"])
        cache = x["cache"][:, :bad.get("cache_width", D)]
        with pytest.raises((TypeError, ValueError), match=match):
            rope_jit.apply_rope_with_cos_sin_cache(pos, _q2(x), _k2(x), bad.get("head_size", D),
                                                   cache)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="with a real GPU, fake tensors check the device ordinal; the "
                           "two-device GPU tests cover this there")
@pytest.mark.parametrize("moved", ["key", "positions", "cos_sin_cache"])
def test_fake_cuda_tensors_on_two_devices_are_refused(moved):
    """Fake CUDA tensors need no GPU: arrays on cuda:0 and cuda:1 in one call raise the
    planner's ValueError naming the argument on the other device."""
    with _fake_mode():
        q = torch.empty(T, HQ * D, device="cuda:0")
        k = torch.empty(T, HK * D, device="cuda:1" if moved == "key" else "cuda:0")
        pos = torch.zeros(T, dtype=torch.int64,
                          device="cuda:1" if moved == "positions" else "cuda:0")
        cache = torch.empty(32, D, device="cuda:1" if moved == "cos_sin_cache" else "cuda:0")
        with pytest.raises(ValueError, match=rf"^{moved} is on cuda:1 but query is on cuda:0"):
            rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, True)


def test_fake_on_the_fly_parameters_validated():
    with _fake_mode():
        x = _inputs()
        with pytest.raises(ValueError, match="rope_theta"):
            rope_jit.apply_rope_pos_ids(x["q"], x["k"], x["pos"], rope_theta=1.0)


# ------------------------------------------------------------------ autograd, traced

@pytest.mark.parametrize("with_key", [True, False])
def test_gradients_flow_to_q_and_k_only(with_key):
    """FakeTensorMode, requires_grad q/k: backward runs the autograd formula (the op with
    inverse=True, fake) and gives q and k gradients of their shapes; positions and the
    cache get none."""
    with _fake_mode():
        x = _inputs(requires_grad=True)
        cache = x["cache"].requires_grad_()
        k = _k2(x) if with_key else None
        qo, ko = rope_jit.apply_rope_with_cos_sin_cache(x["pos"], _q2(x), k, D, cache)
        assert qo.requires_grad and (ko is None) == (not with_key)
        loss = qo.sum() + (ko.sum() if with_key else 0)
        loss.backward()
        assert x["q"].grad.shape == x["q"].shape
        assert (x["k"].grad is not None) == with_key
        assert cache.grad is None


def test_backward_is_the_inverse_op_with_the_same_arguments():
    """make_fx of a training step: two rope ops, the backward one with inverse=True and
    every other argument the forward's; double backward records the forward again."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(q, k, pos):
        qo, ko = rope_jit.apply_rope_pos_ids(q, k, pos, rotary_dim=32, interleave=True)
        return torch.autograd.grad((qo * 3).sum() + ko.sum(), (q, k))

    x = _inputs(requires_grad=True)
    gm = make_fx(step, tracing_mode="fake")(x["q"], x["k"], x["pos"])
    nodes = _op_nodes(gm)
    assert [n.args[INVERSE] for n in nodes] == [False, True]
    assert nodes[0].args[2:INVERSE] == nodes[1].args[2:INVERSE]

    def double(q, k, pos):
        qo, ko = rope_jit.apply_rope_pos_ids(q, k, pos)
        gq, gk = torch.autograd.grad(qo.pow(2).sum() + ko.sum(), (q, k), create_graph=True)
        return torch.autograd.grad(gq.sum() + gk.sum(), (q, k))

    nodes = _op_nodes(make_fx(double, tracing_mode="fake")(x["q"], x["k"], x["pos"]))
    assert any(n.args[INVERSE] is True for n in nodes) and len(nodes) >= 3


# ------------------------------------------------------------------ routing and errors

class _Sentinel(Exception):
    pass


class _NoOps:
    def __getattr__(self, name):
        def refuse(*a, **kw):
            raise _Sentinel(name)
        return refuse


@pytest.mark.parametrize("case, routed", [
    ("plain", False), ("q_requires_grad", True), ("k_requires_grad", True),
    ("no_grad_with_requires_grad", True), ("fake", True), ("parameter", True)])
def test_routing(case, routed, monkeypatch):
    """Which calls reach the ops: plain eager tensors never do (their warm path stays
    direct); tensors requiring grad, subclasses (fake, Parameter) do."""
    _bind()
    rope_jit.apply_rope_pos_ids(*(torch.empty(T, 1, D, device="meta"),) * 2,
                                torch.arange(T, device="meta"))  # binds torch in route
    monkeypatch.setattr(route, "_torch_ops", _NoOps())
    x = _inputs()
    q, k = x["q"], x["k"]
    if case == "q_requires_grad":
        q.requires_grad_()
    elif case == "k_requires_grad":
        k.requires_grad_()
    elif case == "no_grad_with_requires_grad":
        q.requires_grad_()
    elif case == "parameter":
        q = torch.nn.Parameter(q, requires_grad=False)
    ctx = torch.no_grad() if case == "no_grad_with_requires_grad" else _nullcontext()
    if case == "fake":
        ctx = _fake_mode()
    with ctx:
        if case == "fake":
            q, k, pos = torch.empty(T, HQ, D), torch.empty(T, HK, D), torch.arange(T)
        else:
            pos = x["pos"]
        with pytest.raises(_Sentinel if routed else TypeError):
            rope_jit.apply_rope_pos_ids(q, k, pos)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("name", sorted(n for n, (op, _) in CALLS.items() if op == "rope_"))
@pytest.mark.parametrize("who", ["query", "key"])
def test_inplace_refuses_tensors_requiring_grad(name, who):
    """In place under grad mode with q or k requiring grad: RuntimeError naming it, before
    anything runs (inputs untouched); under no_grad the call goes ahead (and reaches the
    real implementation, which refuses CPU tensors)."""
    _, call = CALLS[name]
    x = _inputs()
    x["q" if who == "query" else "k"].requires_grad_()
    takes_key = name not in ("apply_rope_with_cos_sin_cache_inplace",
                             "apply_mrope_pos_ids_inplace", "apply_rotary_emb+inplace")
    before = {n: t.detach().clone() for n, t in x.items()}
    expected = who if (who == "query" or takes_key) else None
    if expected is None:  # this call passes no key: k requiring grad does not matter
        with pytest.raises(TypeError, match="host memory"):
            call(x)
        return
    with pytest.raises(RuntimeError, match=rf"^{expected}: requires grad.*out-of-place"):
        call(x)
    for n, t in x.items():
        assert torch.equal(t.detach(), before[n]), n
    with torch.no_grad(), pytest.raises(TypeError, match="host memory"):
        call(x)


def test_out_of_place_with_grad_on_cpu_is_refused_by_the_real_implementation():
    """The ops' real implementations run only on CUDA tensors: a CPU tensor requiring grad
    gets the same TypeError as every host array."""
    x = _inputs(requires_grad=True)
    with pytest.raises(TypeError, match=r"^query: expected a CUDA device array .*host memory"):
        rope_jit.apply_rope_pos_ids(x["q"], x["k"], x["pos"])


def test_positions_op_passes_opcheck_on_cpu():
    """positions_from_offsets computes host arrays on the host, so its op runs here too:
    opcheck (schema, fake vs real, autograd registration, AOT dispatch) on real data."""
    ops = _bind()
    indptr = torch.tensor([0, 1, 5, 10])
    offsets = torch.tensor([4, 6, 3])
    for nnz in (10, 12):
        torch.library.opcheck(ops.positions_from_offsets.default, (indptr, offsets, nnz))
    got = ops.positions_from_offsets(indptr, offsets, 12)
    assert got.tolist() == [4, 6, 7, 8, 9, 3, 4, 5, 6, 7, -1, -1]
