"""Host time of the warm call path, step by step (torch inputs, one token, Llama-3-8B heads).

Each line is the wall time per call of 20,000 back-to-back repetitions of one step (or of
the whole call), so the steps can be compared with the total and with what torch itself
costs for a trivial op.
"""
import time

import torch

import rope_jit
from rope_jit import launch
from rope_jit._cuda import current_device, driver_module
from rope_jit.arrays import framework_of
from rope_jit.specs import ROPE_PARAMS

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


q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 128, device="cuda", dtype=torch.bfloat16)
pos = torch.zeros(1, dtype=torch.int64, device="cuda")
cache = rope_jit.compute_cos_sin_cache(128, 4096, like=q)
fw = framework_of(q)
rows = []
rows.append(("rope_jit.apply_rope_inplace_with_cache (whole call)",
             per_call(lambda: rope_jit.apply_rope_inplace_with_cache(pos, q, k, 128, cache, True))))
rows.append(("rope_jit.apply_rope_pos_ids_inplace (whole call)",
             per_call(lambda: rope_jit.apply_rope_pos_ids_inplace(q, k, pos))))
rows.append(("launch.run_rope (no api wrapper)", per_call(lambda: launch.run_rope(
    q, k, head_size=128, rotary_dim=None, is_neox=True, inplace=True, positions=pos, cache=cache))))
rows.append(("framework_of(q)", per_call(lambda: framework_of(q))))
rows.append(("fw.fingerprint(q)", per_call(lambda: fw.fingerprint(q))))
rows.append(("4 fingerprints + sig + dict get", per_call(lambda: launch._prepared.get(
    (fw.fingerprint(q)[0], fw.fingerprint(k)[0], fw.fingerprint(pos)[0], None, None,
     fw.fingerprint(cache)[0], 128, None, True, True, "linear", None, False)))))
rows.append(("q.data_ptr()", per_call(lambda: q.data_ptr())))
rows.append(("q.shape", per_call(lambda: q.shape)))
rows.append(("q.stride()", per_call(lambda: q.stride())))
rows.append(("q.get_device()", per_call(lambda: q.get_device())))
rows.append(("q.dtype", per_call(lambda: q.dtype)))
rows.append(("current_device() (cupy runtime)", per_call(current_device)))
rows.append(("torch.cuda.current_device()", per_call(torch.cuda.current_device)))
rows.append(("fw.stream(0) (torch raw stream)", per_call(lambda: fw.stream(0))))
rows.append(("torch.cuda.current_stream().cuda_stream",
             per_call(lambda: torch.cuda.current_stream().cuda_stream)))
prep = next(iter(launch._prepared.values()))
values = (q.data_ptr(), k.data_ptr(), q.data_ptr(), k.data_ptr(), pos.data_ptr(), 0,
          cache.data_ptr()) + launch._freq(None) + prep.static
buf, argv, _ = launch._arg_buffer()
rows.append(("struct pack_into", per_call(lambda: ROPE_PARAMS.packer.pack_into(buf, 0, *values))))
drv = driver_module()
stream = fw.stream(0)
g, b = prep.grid, prep.block
rows.append(("driver.launchKernel alone", per_call(
    lambda: drv.launchKernel(prep.func, g[0], g[1], g[2], b[0], b[1], b[2], 0, stream, argv, 0))))
rows.append(("launch.launch_kernel", per_call(
    lambda: launch.launch_kernel(prep.func, g, b, 0, stream, ROPE_PARAMS.packer, values))))
x = torch.empty(1, device="cuda")
rows.append(("torch: x.add_(1) (reference point)", per_call(lambda: x.add_(1))))
for name, us in rows:
    print(f"{us:8.3f} us  {name}")
