#!/usr/bin/env python
"""Fused-kernel lab: launch shapes of ``kernels/rope_fused.cu`` swept on one GPU, beside
FlashInfer's fused kernels and a cast ceiling, in one process::

    PYTHONPATH=. python3 benchmarks/fused_lab.py [--out FILE.json] [--tokens 1,128,8192]
    PYTHONPATH=. python3 benchmarks/fused_lab.py --configs regs  # register caps instead
    PYTHONPATH=. python3 benchmarks/fused_lab.py --ncu     # one call of each kernel, for ncu

Each configuration sets the planner's knobs (``rope_jit.plan_fused``: ``ITEM_BATCH``,
items a thread loads together; ``THREAD_BATCHES``, batches a thread does at most;
``BLOCK_THREADS``; ``MIN_BLOCKS``, the register cap) for the whole process,
forgets the cached plans, and then runs the shapes of ``benchmarks/fused.py`` through the public functions: each one's
result on fresh inputs is checked against the float64 reference before it is timed
(``fused.py``'s checks), so a launch shape that breaks the kernel is reported WRONG.

Ceilings: ``ceilings.narrow_copy`` of the call's input bytes (read in 16-byte vectors,
written at half width), and ``torch``'s own cast of q and k into the FP8 outputs (``copy_``,
two kernels): what plain elementwise kernels reach for this read/write mix. Percentages are of the device copy bandwidth with fused.py's byte counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import rope_jit  # noqa: E402
from rope_jit import plan_fused  # noqa: E402
from ceilings import narrow_copy  # noqa: E402
from fused import AppendPaged, FlashInfer, QKNormRope, RopeQuantize, _check  # noqa: E402
from timing import buffer_sets, copy_bandwidth, time_calls  # noqa: E402

KNOBS = ("ITEM_BATCH", "THREAD_BATCHES", "BLOCK_THREADS", "FEW_BLOCK_THREADS", "MIN_BLOCKS",
         "QK_COS_SIN_IN_REGS")
DEFAULT = ("default", {k: getattr(plan_fused, k) for k in KNOBS})


def config(cap: int, block_threads: int, batches: int = 1, min_blocks: int = 1):
    """Every call kind at item batches of up to `cap`, up to `batches` of them a thread
    (min_blocks: the register cap, kernels/rope_fused.cu MIN_BLOCKS)."""
    return (f"ib{cap} t{block_threads} x{batches}" + (f" mb{min_blocks}" if min_blocks > 1 else ""),
            dict(DEFAULT[1], ITEM_BATCH=cap, THREAD_BATCHES=batches, BLOCK_THREADS=block_threads,
                 MIN_BLOCKS=min_blocks))


CONFIGS = ([DEFAULT] + [config(cap, th, n) for th in (64, 128, 256) for cap in (1, 2, 4)
                        for n in (1, 4, 8)])
# --configs regs: register caps (64, 40, 32 registers: more threads resident) x batches
REG_CONFIGS = ([DEFAULT] + [config(cap, 128, n, mb) for mb in (2, 3, 4)
                            for cap, n in ((2, 4), (2, 8), (4, 2), (1, 8))])
# --configs blocks: few tokens (a thread does one item there): only the block's threads
# matter, and with them how many SMs the grid reaches (Llama's paged append at 16 tokens
# makes 96 blocks of 128 threads on a 132-SM GPU; plan_fused.FEW_BLOCK_THREADS came from
# this sweep, off here so each block size is its own)
BLOCK_CONFIGS = [DEFAULT] + [(name, dict(knobs, FEW_BLOCK_THREADS=0)) for name, knobs in
                             (config(1, th, 1) for th in (32, 64, 128, 256))]
# fused_qk_norm_rope (--qk): cos/sin and weights per thread, or the shared tile
QK_CONFIGS = [DEFAULT, ("qk tile", dict(DEFAULT[1], QK_COS_SIN_IN_REGS=False))]


def use(cfg) -> None:
    for knob, value in cfg[1].items():
        setattr(plan_fused, knob, value)
    rope_jit.clear_caches()


def narrow_ceiling(x):
    """ceilings.narrow_copy of the call's input bytes (buffers made on the first call)."""
    if "_narrow" not in x:
        n = sum(t.numel() * 2 for t in (x.get(f) for f in ("q", "k", "qn", "kn", "v"))
                if t is not None)
        x["_narrow"] = (torch.empty(n, dtype=torch.uint8, device="cuda").random_(),
                        torch.empty(n // 2, dtype=torch.uint8, device="cuda"))
    narrow_copy(*x["_narrow"])


def rope_quantize_pdl(x):
    """RopeQuantize.rope_jit with enable_pdl: back to back in the graph, each launch may
    overlap the previous kernel's tail."""
    q_out, k_out, qn_out, kn_out = x["outs"]
    rope_jit.rope_quantize_fp8(x["q"], x["k"], x["qn"], x["kn"], x["cache"], x["pos"],
                               q_rope_out=q_out, k_rope_out=k_out, q_nope_out=qn_out,
                               k_nope_out=kn_out, enable_pdl=True)


def cast_ceiling(x):
    q_out, k_out = x["outs"][:2]
    q_out.copy_(x["q"])
    k_out.copy_(x["k"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", default="1,16,128,1024,8192,32768")
    ap.add_argument("--flashinfer", default=str(HERE.parent / ".peers" / "libfi_rope.so"))
    ap.add_argument("--ncu", action="store_true", help="one call of each kernel at 8192 tokens")
    ap.add_argument("--qk", action="store_true", help="fused_qk_norm_rope (Qwen3-8B) instead")
    ap.add_argument("--configs", choices=("batch", "regs", "blocks"), default="batch",
                    help="batch: item batches x batches a thread x block threads; "
                         "regs: register caps x batches; blocks: block threads, few tokens")
    args = ap.parse_args(argv)
    fi = FlashInfer(args.flashinfer) if Path(args.flashinfer).exists() else None
    cases = [RopeQuantize("llama3-8b", 32, 8, 128, 0, 0, fi),
             AppendPaged("llama3-8b", 32, 8, 128, 0, fi),
             RopeQuantize("dsv3-mla-absorbed", 128, 0, 64, 512, 512, fi)]
    configs = {"batch": CONFIGS, "regs": REG_CONFIGS, "blocks": BLOCK_CONFIGS}[args.configs]
    if args.qk:
        cases, configs = [QKNormRope("qwen3-8b", 32, 8, 128)], QK_CONFIGS
    if args.ncu:
        for case in cases:
            x = case.make(8192)
            for name, fn in case.impls().items():
                if name != "unfused":
                    fn(x)
            torch.cuda.synchronize()
        x = cases[0].make(8192)  # the plain kernel on the same q/k, in place, for reference
        rope_jit.apply_rope_with_cos_sin_cache_inplace(x["pos"], x["q"].view(8192, -1),
                                                       x["k"].view(8192, -1), 128, x["cache"])
        torch.cuda.synchronize()
        return 0
    tokens = [int(t) for t in args.tokens.split(",")]
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for case in cases:
        peers = {k: v for k, v in case.impls().items() if k == "flashinfer"}
        if not isinstance(case, QKNormRope):
            peers["narrow_ceiling"] = narrow_ceiling
        if isinstance(case, RopeQuantize) and case.nq == 0:
            peers["cast_ceiling"] = cast_ceiling
        wrong = set()
        for cfg in configs:
            use(cfg)
            if not _check(case, cfg[0], case.rope_jit):
                wrong.add(cfg[0])
        for T in tokens:
            if case.shape.startswith("dsv3") and T > 8192:
                continue
            nbytes = case.bytes(case.make(T))
            sets = [case.make(T) for _ in range(buffer_sets(nbytes))]
            line = {}
            for name, fn in peers.items():
                line[name] = time_calls([lambda x=x, fn=fn: fn(x) for x in sets])
            if isinstance(case, RopeQuantize) and T <= 128:
                line["default pdl"] = time_calls([lambda x=x: rope_quantize_pdl(x) for x in sets])
            for cfg in configs:
                if T < 128 and cfg is not DEFAULT and (configs is CONFIGS or configs is REG_CONFIGS):
                    continue  # a thread does one item there, whatever the batch knobs say
                    # (at 128 tokens DeepSeek-V3 absorbed MLA's threads do several)
                if cfg[0] in wrong:
                    line[cfg[0]] = "WRONG"
                    continue
                use(cfg)
                line[cfg[0]] = time_calls([lambda x=x: case.rope_jit(x) for x in sets])
            use(DEFAULT)
            del sets
            names = dict(configs)
            best = min((v, k) for k, v in line.items() if isinstance(v, float) and k in names)
            row = dict(op=case.op, shape=case.shape, tokens=T, bytes=nbytes, times=line,
                       best=best[1])
            rows.append(row)
            pct = {k: (f"{v * 1e6:.2f}us" if T <= 128 else f"{nbytes / v / bw * 100:.1f}%")
                   if isinstance(v, float) else v for k, v in line.items()}
            print(f"{case.op[:28]:28s} {case.shape:18s} T={T:6d} best={best[1]!r}: {pct}",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(),
                                                  copy_bandwidth=bw, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
