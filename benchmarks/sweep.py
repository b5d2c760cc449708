"""Development sweep: rope_jit dispatch knobs (rope_jit.plan.Tuning) side by side with
FlashInfer's kernels (from .peers/libfi_rope.so, see ../shared/peers/flashinfer) and a torch
copy of the same bytes, by CUDA-graph replay over rotating buffers.

usage: python benchmarks/sweep.py [json list of Tuning field overrides]
"""
import ctypes, json, os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
import dataclasses
import rope_jit
from rope_jit import launch
from rope_jit.call import cache_call, frequencies_json, on_the_fly_call
from rope_jit.tuning import tuning_for
from timing import time_calls, buffer_sets, copy_bandwidth

configs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [{}]
lib = None
so = os.path.join(os.path.dirname(__file__), "..", ".peers", "libfi_rope.so")
if os.path.exists(so):
    lib = ctypes.CDLL(so)
    P, U, S = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t
    lib.fi_cache_bf16.argtypes = [P, P, P, P, U, U, U, U, U, S, S, S, S, ctypes.c_int, P]
    lib.fi_posids_bf16.argtypes = [P, P, P, U, U, U, U, U, S, S, S, S, ctypes.c_int, ctypes.c_float, ctypes.c_float, P]
bw = copy_bandwidth()
print(f"copy {bw/1e12:.3f} TB/s", flush=True)
shapes = [("llama", 32, 8, 128, 128, True), ("gptj", 32, 2, 128, 64, False),
          ("dsv3", 128, 1, 64, 64, False), ("phi2", 32, 32, 80, 32, True)]
default = tuning_for(torch.cuda.current_device())
out = []
for name, hq, hk, D, R, neox in shapes:
    for T in [int(x) for x in os.environ.get("TOKENS", "1,16,128,1024,8192,32768").split(",")]:
        per = T * (hq + hk) * D * 2
        n = buffer_sets(per)
        qs = [torch.randn(T, hq, D, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        ks = [torch.randn(T, hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        pos = torch.randint(0, 100000, (T,), device="cuda")
        c32 = rope_jit.compute_cos_sin_cache(R, 100000, like=qs[0])
        c16 = rope_jit.compute_cos_sin_cache(R, 100000, dtype="bfloat16", like=qs[0])
        base = T * (hq + hk) * R * 2 * 2 + T * 8
        res = {}
        srcs = [torch.empty(per, dtype=torch.uint8, device="cuda") for _ in range(n)]
        dst = torch.empty(per, dtype=torch.uint8, device="cuda")
        res["copy"] = (time_calls([lambda s=s: dst.copy_(s) for s in srcs]), 2 * per)
        srcs = dst = None  # free them before the next row (the lambdas above have run)
        if lib is not None:
            st = lambda: torch.cuda.current_stream().cuda_stream
            res["fi_c32"] = (time_calls([lambda q=q, k=k: lib.fi_cache_bf16(q.data_ptr(), k.data_ptr(), c32.data_ptr(), pos.data_ptr(), T, hq, hk, R, D, hq*D, D, hk*D, D, int(not neox), st()) for q, k in zip(qs, ks)]), base + T * R * 4)
            if lib.fi_posids_bf16(qs[0].data_ptr(), ks[0].data_ptr(), pos.data_ptr(), T, hq, hk, R, D, hq*D, D, hk*D, D, int(not neox), 1.0, 1e4, st()) == 0:
                res["fi_fly"] = (time_calls([lambda q=q, k=k: lib.fi_posids_bf16(q.data_ptr(), k.data_ptr(), pos.data_ptr(), T, hq, hk, R, D, hq*D, D, hk*D, D, int(not neox), 1.0, 1e4, st()) for q, k in zip(qs, ks)]), base)
        cache = cache_call(D, neox, True)
        fly = on_the_fly_call("positions", R, not neox, True, frequencies_json())
        for ci, cfg in enumerate(configs):
            t = dataclasses.replace(default, **cfg)  # passed in: part of every plan key
            res[f"c32/{ci}"] = (time_calls([lambda q=q, k=k: launch.run_rope(cache, q.view(T, -1), k.view(T, -1), pos, cache=c32, tuning=t) for q, k in zip(qs, ks)]), base + T * R * 4)
            res[f"c16/{ci}"] = (time_calls([lambda q=q, k=k: launch.run_rope(cache, q.view(T, -1), k.view(T, -1), pos, cache=c16, tuning=t) for q, k in zip(qs, ks)]), base + T * R * 2)
            res[f"fly/{ci}"] = (time_calls([lambda q=q, k=k: launch.run_rope(fly, q, k, pos, tuning=t) for q, k in zip(qs, ks)]), base)
        cols = " ".join(f"{k}={t*1e6:7.2f}us/{b/t/bw*100:5.1f}%" for k, (t, b) in res.items())
        print(f"{name:6s} T={T:6d} {cols}", flush=True)
        out.append(dict(shape=name, T=T, res={k: [t, b] for k, (t, b) in res.items()}))
        del qs, ks
json.dump(dict(copy_bw=bw, configs=configs, rows=out), open(os.path.join(os.environ.get("OUT", "."), "sweep.json"), "w"))
