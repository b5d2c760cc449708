"""Development sweep of the dispatch knobs (rope_jit.plan.TUNING) over the benchmark shapes."""
import itertools, json, os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
import rope_jit
from rope_jit import plan, launch
from timing import time_calls, buffer_sets, copy_bandwidth

bw = copy_bandwidth()
print(f"copy {bw/1e12:.3f} TB/s", flush=True)
shapes = [("llama", 32, 8, 128, 128, True), ("gptj", 32, 2, 128, 64, False),
          ("dsv3", 128, 1, 64, 64, False), ("phi2", 32, 32, 80, 32, True)]
configs = [dict(), dict(head_batch=2), dict(head_batch=8), dict(fill_waves=2.0, fill_waves_fly=1.0),
           dict(fill_waves=4.0, fill_waves_fly=2.0), dict(fill_waves=0.5, fill_waves_fly=0.25),
           dict(head_batch=2, fill_waves=4.0, fill_waves_fly=4.0), dict(head_batch=1, fill_waves=8, fill_waves_fly=8),
           dict(block=128), dict(block=512)]
default = dict(plan.TUNING)
out = []
for name, hq, hk, D, R, neox in shapes:
    for T in (1024, 8192, 32768):
        per = T * (hq + hk) * D * 2
        n = buffer_sets(per)
        qs = [torch.randn(T, hq, D, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        ks = [torch.randn(T, hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        pos = torch.randint(0, 100000, (T,), device="cuda")
        c32 = rope_jit.compute_cos_sin_cache(R, 100000, like=qs[0])
        nbytes = T * (hq + hk) * R * 2 * 2 + T * 8 + T * R * 4
        for ci, cfg in enumerate(configs):
            plan.TUNING.clear(); plan.TUNING.update(default); plan.TUNING.update(cfg)
            launch._prepared.clear()
            for mode in ("c32", "fly"):
                if mode == "c32":
                    calls = [lambda q=q, k=k: rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, c32, neox) for q, k in zip(qs, ks)]
                else:
                    calls = [lambda q=q, k=k: rope_jit.apply_rope_pos_ids_inplace(q, k, pos, rotary_dim=R, interleave=not neox) for q, k in zip(qs, ks)]
                t = time_calls(calls, replays=10)
                out.append(dict(shape=name, T=T, cfg=cfg, mode=mode, us=t*1e6, pct=nbytes/t/bw*100))
                print(f"{name:6s} T={T:6d} {mode} cfg{ci} {str(cfg):60s} {t*1e6:8.2f} us {nbytes/t/bw*100:6.1f}%", flush=True)
        del qs, ks
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "sweep.json"), "w"))
