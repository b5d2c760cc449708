"""Host time of the warm call path, step by step (torch inputs, one token, Llama-3-8B heads).

Each line is the wall time per call of 20,000 back-to-back repetitions of one step (or of
the whole call), so the steps can be compared with the total and with what torch itself
costs for a trivial op.

usage: python benchmarks/host_overhead.py [--whole-calls] [--json PATH]
  --whole-calls  only the public calls (runs against any rope_jit version: compare an older
                 checkout with PYTHONPATH=that/checkout in the same session)
"""
import argparse
import json
import time

import torch

import rope_jit

N = 20000


def per_call(fn, n=N):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def whole_calls(q, k, pos, cache) -> list:
    x = torch.empty(1, device="cuda")
    return [
        ("rope_jit.apply_rope_inplace_with_cache (whole call)",
         per_call(lambda: rope_jit.apply_rope_inplace_with_cache(pos, q, k, 128, cache, True))),
        ("rope_jit.apply_rope_pos_ids_inplace (whole call)",
         per_call(lambda: rope_jit.apply_rope_pos_ids_inplace(q, k, pos))),
        ("rope_jit.apply_rope_with_cos_sin_cache (whole call, out of place)",
         per_call(lambda: rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, 128, cache))),
        ("torch: x.add_(1) (reference point)", per_call(lambda: x.add_(1))),
    ]


def steps(q, k, pos, cache) -> list:
    """The warm path's steps (this checkout's internals)."""
    from rope_jit import launch, route
    from rope_jit._cuda import current_device, driver_module
    from rope_jit.arrays import framework_of
    from rope_jit.call import cache_call

    fw = framework_of(q)
    call = cache_call(128, True, True, False)
    rows = [
        ("call.cache_call (memoized RopeCall)", per_call(lambda: cache_call(128, True, True, False))),
        ("route.rope (no api wrapper)", per_call(lambda: route.rope(call, q, k, pos, cache=cache))),
        ("launch.run_rope (no routing)", per_call(
            lambda: launch.run_rope(call, q, k, pos, None, None, cache, fw=fw))),
        ("route._through_torch(q, k)", per_call(lambda: route._through_torch(q, k))),
        ("fw.fingerprint(q)", per_call(lambda: fw.fingerprint(q))),
        ("q.data_ptr()", per_call(lambda: q.data_ptr())),
        ("current_device() (cupy runtime)", per_call(current_device)),
        ("fw.stream(0) (torch raw stream)", per_call(lambda: fw.stream(0))),
    ]
    # launch.run_rope's key: call, then the fingerprints of query, key, positions, indptr,
    # offsets, cache, cos, sin (absent: None), then the tuning (None: this device's)
    sig_parts = (call, fw.fingerprint(q)[0], fw.fingerprint(k)[0], fw.fingerprint(pos)[0],
                 None, None, fw.fingerprint(cache)[0], None, None, None)
    rows.append(("plan look-up (hash of the key + dict get)",
                 per_call(lambda: launch._plans.get(sig_parts))))
    prep = launch._plans.get(sig_parts)
    if prep is None:
        raise RuntimeError("the plan key above no longer matches launch.run_rope's: update it")
    buf, addr, _keep = launch.plan_buffer(prep)
    ptrs = (pos.data_ptr(), cache.data_ptr(), q.data_ptr(), k.data_ptr(), 0, 0, q.data_ptr(),
            k.data_ptr(), 0)  # specs.ROPE_POINTERS: positions, cache, q, k, cos, sin, q_out, ...
    off = launch._POINTER_OFFSET
    rows.append(("pack the pointers",
                 per_call(lambda: launch._POINTERS.pack_into(buf, off, *ptrs))))
    drv = driver_module()
    stream = fw.stream(0)
    g, b = prep.grid, prep.block
    rows.append(("driver.launchKernel alone", per_call(
        lambda: drv.launchKernel(prep.func, g[0], g[1], g[2], b[0], b[1], b[2], 0, stream, addr, 0))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whole-calls", action="store_true")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    cache = rope_jit.compute_cos_sin_cache(128, 4096, like=q)
    rows = whole_calls(q, k, pos, cache)
    if not args.whole_calls:
        rows += steps(q, k, pos, cache)
    print(f"rope_jit from {rope_jit.__file__}")
    for name, us in rows:
        print(f"{us:8.3f} us  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rope_jit": rope_jit.__file__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
