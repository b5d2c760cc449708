"""Tensor-parallel RoPE as inference engines run it: torch.distributed with NCCL, one process
per GPU, Llama-3-70B-like heads (64 q / 8 kv, head 128) split over the ranks.

Each rank builds the same whole q, k, positions and cache (same seed), takes its shard of
the heads, and applies rope_jit to it inside a CUDA graph: with an fp32 cache in place, on
the fly out of place, and fused with FP8 quantization (`rope_quantize_fp8`). The shards are
gathered, and rank 0 checks that the gathered result is bit-identical to the single-GPU call
on the whole tensors. Kernels come from one disk cache shared by the ranks
(`ROPE_JIT_CACHE_DIR`), warmed first with `rope-jit warm --tp N`: each rank counts the
kernels it had to compile for the plain ops (0 expected).

usage: python examples/tensor_parallel.py [--world N] [--tokens T]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HQ, HK, D = 64, 8, 128
# NVLink multicast stays off (the device machines' NCCL setup); every process inherits it.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def whole_inputs(tokens: int, device):
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(tokens, HQ, D, generator=g).bfloat16().to(device)
    k = torch.randn(tokens, HK, D, generator=g).bfloat16().to(device)
    pos = torch.randint(0, 32768, (tokens,), generator=g).to(device)
    return q, k, pos


def plain_ops(rope_jit, q, k, pos, cache) -> list:
    """RoPE as an engine calls it on (a shard of) q and k: an fp32 cache in place, and on
    the fly out of place."""
    qc, kc = q.clone(), k.clone()
    rope_jit.apply_rope_with_cos_sin_cache_inplace(pos, qc, kc, D, cache)
    qf, kf = rope_jit.apply_rope_pos_ids(q, k, pos, rope_theta=5e5)
    return [qc, kc, qf, kf]


def fused_op(rope_jit, q, k, pos, cache) -> list:
    """RoPE fused with FP8 quantization (FlashInfer's rope_quantize_fp8)."""
    q8, k8, _, _ = rope_jit.rope_quantize_fp8(q, k, None, None, cache, pos,
                                              quantize_dtype=torch.float8_e4m3fn)
    return [q8.view(torch.uint8), k8.view(torch.uint8)]


def apply_all(rope_jit, q, k, pos, cache) -> list:
    return plain_ops(rope_jit, q, k, pos, cache) + fused_op(rope_jit, q, k, pos, cache)


def worker(rank: int, world: int, tokens: int, port: int, cache_dir: str) -> None:
    os.environ.update(NCCL_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      ROPE_JIT_CACHE_DIR=cache_dir)
    import rope_jit
    from rope_jit import jit

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    q, k, pos = whole_inputs(tokens, dev)
    hq, hk = HQ // world, HK // world  # the heads split evenly (main() checks it)
    q_shard = q[:, rank * hq:(rank + 1) * hq].contiguous()
    k_shard = k[:, rank * hk:(rank + 1) * hk].contiguous()
    cache = rope_jit.compute_cos_sin_cache(D, 32768, like=q)

    # the first calls plan and load (from the warmed disk cache) or compile: counted
    compiles = jit.stats.compiles
    plain_ops(rope_jit, q_shard, k_shard, pos, cache)
    plain_compiles = jit.stats.compiles - compiles
    fused_op(rope_jit, q_shard, k_shard, pos, cache)
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        apply_all(rope_jit, q_shard, k_shard, pos, cache)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        outs = apply_all(rope_jit, q_shard, k_shard, pos, cache)
    graph.replay()
    torch.cuda.synchronize()

    gathered = []
    for o in outs:
        parts = [torch.empty_like(o) for _ in range(world)]
        dist.all_gather(parts, o)
        gathered.append(parts)
    counts = torch.tensor([plain_compiles], device=dev)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    if rank == 0:
        whole = apply_all(rope_jit, q, k, pos, cache)
        names = ["cache in place q", "cache in place k", "on the fly q", "on the fly k",
                 "rope_quantize_fp8 q", "rope_quantize_fp8 k"]
        ok = True
        for name, parts, want in zip(names, gathered, whole):
            same = torch.equal(torch.cat(parts, dim=1), want)  # shards along the heads
            ok &= same
            print(f"{name:22s} gathered from {world} ranks == single GPU: {same}")
        print(f"kernels compiled at run time per rank (after rope-jit warm --tp {world}): "
              f"{[int(c) for c in all_counts]} (the fused op's kernels are compiled: warm does "
              "not cover them yet)")
        print("tensor parallel: OK" if ok else "tensor parallel: MISMATCH")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=torch.cuda.device_count())
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    if args.world < 2 or torch.cuda.device_count() < args.world:
        sys.exit(f"needs {max(args.world, 2)} GPUs, this machine has "
                 f"{torch.cuda.device_count()}")
    if HQ % args.world or HK % args.world:
        sys.exit(f"--world {args.world}: {HQ} q and {HK} kv heads must split evenly")
    os.environ.update(NCCL_ENV)
    cache_dir = os.environ.get("ROPE_JIT_CACHE_DIR") or tempfile.mkdtemp(prefix="rope_jit_tp_")
    # warm the plain ops' kernels of one rank's shard into the shared cache, as an image
    # build would
    subprocess.run([sys.executable, "-m", "rope_jit", "warm", "--arch", "native", "--model",
                    "llama3-70b", "--tp", str(args.world), "--cache-dtype", "float32",
                    "on-the-fly", "--placement", "in-place", "out-of-place", "--max-tokens",
                    str(args.tokens), "--quiet"],
                   check=True, env={**os.environ, "ROPE_JIT_CACHE_DIR": cache_dir})
    port = 29500 + os.getpid() % 1000
    mp.spawn(worker, args=(args.world, args.tokens, port, cache_dir), nprocs=args.world)


if __name__ == "__main__":
    main()
