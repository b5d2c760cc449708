"""rope_jit inside torch.compile: a small GQA attention block whose q and k get RoPE.

On an NVIDIA GPU it prints
* torch._dynamo.explain's graph count and graph-break count for the block (1 and 0: the
  RoPE calls are torch.library custom ops, recorded as graph nodes);
* the compiled block (Inductor, fullgraph=True) against the eager one, and the same under
  mode="reduce-overhead" (the step captured as a CUDA graph and replayed);
* the RoPE output against the PyTorch formula, and the gradients of a compiled training
  step against eager (the backward is the same op rotating by the negative angle).

Without a GPU it says so, and still traces the block with Dynamo on CPU tensors using a
backend that records the graph without running it (the ops' fake implementations give
the shapes), to show there is no graph break.

    python examples/torch_compile.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import rope_jit

T, HIDDEN, HQ, HK, D = 256, 1024, 8, 2, 128


class Attention(torch.nn.Module):
    """Fused QKV projection, RoPE on q and k (vLLM style: in place on slices of the fused
    buffer, from a cos/sin cache), causal GQA attention, output projection."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace
        self.qkv = torch.nn.Linear(HIDDEN, (HQ + 2 * HK) * D, bias=False)
        self.o = torch.nn.Linear(HQ * D, HIDDEN, bias=False)

    def forward(self, x, positions, cos_sin_cache):
        t = x.shape[0]
        q, k, v = self.qkv(x).split([HQ * D, HK * D, HK * D], dim=-1)
        if self.inplace:  # inference: rotates the slices of the fused buffer
            rope_jit.apply_rope_inplace_with_cache(positions, q, k, D, cos_sin_cache, True)
        else:  # training: out of place, differentiable w.r.t. q and k
            q, k = rope_jit.apply_rope_with_cos_sin_cache(positions, q, k, D, cos_sin_cache)
        q = q.reshape(t, HQ, D).transpose(0, 1)
        k = k.reshape(t, HK, D).transpose(0, 1).repeat_interleave(HQ // HK, dim=0)
        v = v.reshape(t, HK, D).transpose(0, 1).repeat_interleave(HQ // HK, dim=0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(0, 1).reshape(t, HQ * D))


def rope_formula(x, positions, cache):
    """The PyTorch formula (NeoX), fp32: x [T, H, D]."""
    c, s = cache[positions].float().chunk(2, dim=-1)
    c, s = c[:, None, :], s[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def trace_without_gpu() -> None:
    print("No NVIDIA GPU here: rope_jit's kernels need one to run. Tracing the block with "
          "Dynamo on CPU tensors instead (the graph is recorded, never run).")

    class Traced(Exception):
        pass

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced
        return run

    block = Attention()
    x = torch.randn(T, HIDDEN)
    pos = torch.arange(T)
    cache = rope_jit.compute_cos_sin_cache(D, 4096, like=x)
    try:
        with torch.no_grad():  # in place needs no grad: q, k come from a Linear with weights
            torch.compile(block, backend=record, fullgraph=True)(x, pos, cache)
    except Traced:
        pass
    ops = [str(n.target) for n in graphs[0].graph.nodes if "rope_jit" in str(n.target)]
    print(f"fullgraph=True traced: {len(graphs)} graph, 0 graph breaks; rope_jit nodes: {ops}")


def run_on_gpu() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    block = Attention().to(dev, torch.bfloat16)
    x = torch.randn(T, HIDDEN, device=dev, dtype=torch.bfloat16)
    pos = torch.randint(0, 32768, (T,), device=dev)
    cache = rope_jit.compute_cos_sin_cache(D, 32768, like=x)  # fp32, on x's device

    with torch.no_grad():
        explain = torch._dynamo.explain(block)(x, pos, cache)
        print(f"torch._dynamo.explain: {explain.graph_count} graph, "
              f"{explain.graph_break_count} graph breaks")
        eager = block(x, pos, cache)
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            step = torch.compile(block, mode=mode, fullgraph=True)
            for _ in range(3):  # reduce-overhead: warm-up, capture, replay
                out = step(x, pos, cache).clone()
            err = (out.float() - eager.float()).abs().max().item()
            print(f"compiled ({mode:>15s}) vs eager: max |diff| {err:.3g} "
                  f"(bf16 output, max |eager| {eager.abs().max().item():.3g})")

        q = torch.randn(T, HQ, D, device=dev)
        got, _ = rope_jit.apply_rope_with_cos_sin_cache(pos, q, None, D, cache)
        want = rope_formula(q, pos, cache)
        print(f"RoPE (fp32) vs the PyTorch formula: max |diff| "
              f"{(got - want).abs().max().item():.3g}")

    train = Attention(inplace=False).to(dev)
    xf = x.float()

    def grads(fn):
        train.zero_grad(set_to_none=True)
        fn(xf, pos, cache).square().mean().backward()
        return [p.grad.clone() for p in train.parameters()]

    eager_g = grads(train)
    torch._dynamo.reset()
    compiled_g = grads(torch.compile(train, fullgraph=True))
    rel = max(((c - e).norm() / e.norm()).item() for c, e in zip(compiled_g, eager_g))
    print(f"training step, compiled vs eager gradients: max relative difference {rel:.3g}")


def main() -> None:
    if torch.cuda.is_available():
        run_on_gpu()
    else:
        trace_without_gpu()


if __name__ == "__main__":
    main()
