"""Programmatic dependent launch (enable_pdl) measured where it matters: a CUDA graph in
which a GEMM (the QKV projection) precedes each RoPE call, as in a decode step, beside the
same graph without PDL; and RoPE alone, back to back, beside a device copy of q and k.

Per step: the graph holds STEPS x [x @ W -> qkv, RoPE on q and k (slices of qkv)], replayed
REPLAYS times; the median replay time / STEPS is the step time. The GEMM alone (same graph
without RoPE) is measured too, so "RoPE's share" = step - GEMM.

usage: python benchmarks/pdl.py [--out DIR] [--tokens 1,4,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import rope_jit

STEPS = 20
REPLAYS = 15
HQ, HK, D, HIDDEN = 32, 8, 128, 4096  # Llama-3-8B


def graph_time_us(fn) -> float:
    """Median time of one fn() call, from replays of a graph holding STEPS calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(STEPS):
            fn()
    g.replay()
    times = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / STEPS)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", default="1,4,16,64")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    cache = rope_jit.compute_cos_sin_cache(D, 32768, like=torch.empty(1, device="cuda"))
    w = torch.randn(HIDDEN, (HQ + 2 * HK) * D, device="cuda", dtype=torch.bfloat16) / 64
    for T in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(T, HIDDEN, device="cuda", dtype=torch.bfloat16)
        qkv = torch.empty(T, (HQ + 2 * HK) * D, device="cuda", dtype=torch.bfloat16)
        q, k = qkv[:, :HQ * D], qkv[:, HQ * D:(HQ + HK) * D]
        pos = torch.randint(0, 32768, (T,), device="cuda")

        def gemm():
            torch.matmul(x, w, out=qkv)

        def rope_only(pdl, fly):
            def run():
                if fly:
                    rope_jit.apply_rope_pos_ids_inplace(q.view(T, HQ, D), k.view(T, HK, D), pos,
                                                        enable_pdl=pdl)
                else:
                    rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, True,
                                                           enable_pdl=pdl)
            return run

        def step(pdl, fly):
            rope = rope_only(pdl, fly)

            def run():
                gemm()
                rope()
            return run

        src = torch.randn(T, (HQ + HK) * D, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        r = dict(tokens=T, gemm=graph_time_us(gemm), copy=graph_time_us(lambda: dst.copy_(src)))
        for fly in (False, True):
            mode = "fly" if fly else "cache"
            for pdl in (False, True):
                tag = f"{mode}{'_pdl' if pdl else ''}"
                r[f"gemm+{tag}"] = graph_time_us(step(pdl, fly))
                r[f"rope_{tag}"] = graph_time_us(rope_only(pdl, fly))
        rows.append(r)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pdl.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "steps": STEPS, "rows": rows}, f,
                  indent=1)
    print(f"{torch.cuda.get_device_name()}: Llama-3-8B QKV GEMM + RoPE per step (us), "
          f"graph of {STEPS} steps, median of {REPLAYS} replays")
    print(f"{'T':>4} {'gemm':>7} | {'+cache':>7} {'+c pdl':>7} {'rope share':>10} {'pdl share':>9} | "
          f"{'+fly':>7} {'+f pdl':>7} | {'copy':>6} {'rope c':>7} {'c pdl':>7} {'rope f':>7} {'f pdl':>7}")
    for r in rows:
        g = r["gemm"]
        print(f"{r['tokens']:>4} {g:7.2f} | {r['gemm+cache']:7.2f} {r['gemm+cache_pdl']:7.2f} "
              f"{r['gemm+cache'] - g:10.2f} {r['gemm+cache_pdl'] - g:9.2f} | "
              f"{r['gemm+fly']:7.2f} {r['gemm+fly_pdl']:7.2f} | {r['copy']:6.2f} "
              f"{r['rope_cache']:7.2f} {r['rope_cache_pdl']:7.2f} {r['rope_fly']:7.2f} "
              f"{r['rope_fly_pdl']:7.2f}")


if __name__ == "__main__":
    main()
