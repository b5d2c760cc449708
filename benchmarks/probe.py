"""Quick performance probe (development aid): a few shapes, rope_jit vs FlashInfer vs copy."""
import ctypes, os, sys, time
import torch
import rope_jit

def bench(fn, reps=200, warm=20):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    s = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    e = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        s[i].record(); fn(); e[i].record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) for a, b in zip(s, e))
    return t[len(t)//2] * 1e-3

lib = None
p = os.path.join(os.path.dirname(__file__), "..", ".peers", "libfi_rope.so")
if os.path.exists(p):
    lib = ctypes.CDLL(p)
    P, U, S = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t
    lib.fi_cache_bf16.argtypes = [P, P, P, P, U, U, U, U, U, S, S, S, S, ctypes.c_int, P]
    lib.fi_posids_bf16.argtypes = [P, P, P, U, U, U, U, U, S, S, S, S, ctypes.c_int, ctypes.c_float, ctypes.c_float, P]

big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); big2 = torch.empty_like(big)
tc = bench(lambda: big2.copy_(big), reps=30)
copy_bw = 2 * big.numel() / tc
print(f"copy bandwidth {copy_bw/1e12:.3f} TB/s")
del big, big2
shapes = [("llama3-8b", 32, 8, 128, 128, True), ("gptj", 32, 2, 128, 64, False),
          ("dsv3", 128, 1, 64, 64, False), ("phi2", 32, 32, 80, 32, True)]
for name, hq, hk, D, R, neox in shapes:
    for T in (1, 16, 128, 1024, 8192, 32768):
        nbuf = max(2, int(4e8 // (T * (hq + hk) * D * 2)) + 1)
        qs = [torch.randn(T, hq, D, device="cuda", dtype=torch.bfloat16) for _ in range(min(nbuf, 8))]
        ks = [torch.randn(T, hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(len(qs))]
        pos = torch.randint(0, 100000, (T,), device="cuda")
        c32 = rope_jit.compute_cos_sin_cache(R, 100000, like=qs[0])
        c16 = rope_jit.compute_cos_sin_cache(R, 100000, dtype="bfloat16", like=qs[0])
        nbytes = T * (hq + hk) * R * 2 * 2 + T * 8
        it = [0]
        def nxt():
            it[0] = (it[0] + 1) % len(qs); return qs[it[0]], ks[it[0]]
        res = {}
        def f32():
            q, k = nxt(); rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, c32, neox)
        def f16():
            q, k = nxt(); rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, c16, neox)
        def fly():
            q, k = nxt(); rope_jit.apply_rope_pos_ids_inplace(q, k, pos, rotary_dim=R, interleave=not neox)
        res["jit_c32"] = bench(f32); res["jit_c16"] = bench(f16); res["jit_fly"] = bench(fly)
        if lib is not None:
            st = torch.cuda.current_stream().cuda_stream
            def fi32():
                q, k = nxt()
                lib.fi_cache_bf16(q.data_ptr(), k.data_ptr(), c32.data_ptr(), pos.data_ptr(), T, hq, hk, R, D, hq*D, D, hk*D, D, int(not neox), st)
            def fifly():
                q, k = nxt()
                return lib.fi_posids_bf16(q.data_ptr(), k.data_ptr(), pos.data_ptr(), T, hq, hk, R, D, hq*D, D, hk*D, D, int(not neox), 1.0, 1e4, st)
            res["fi_c32"] = bench(fi32)
            if fifly() == 0: res["fi_fly"] = bench(fifly)
        cb = T * (hq + hk) * D * 2
        src = torch.empty(cb, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
        res["copy"] = bench(lambda: dst.copy_(src))
        line = f"{name:10s} T={T:6d} " + " ".join(
            f"{k}={v*1e6:8.2f}us({nbytes/v/copy_bw*100:5.1f}%)" for k, v in res.items())
        print(line, flush=True)
# host overhead
q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16); k = torch.randn(1, 8, 128, device="cuda", dtype=torch.bfloat16)
pos = torch.zeros(1, dtype=torch.int64, device="cuda"); c = rope_jit.compute_cos_sin_cache(128, 4096, like=q)
for _ in range(100): rope_jit.apply_rope_inplace_with_cache(pos, q, k, 128, c, True)
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(10000): rope_jit.apply_rope_inplace_with_cache(pos, q, k, 128, c, True)
t1 = time.perf_counter(); torch.cuda.synchronize()
print(f"host time per call {(t1-t0)/10000*1e6:.2f} us")
