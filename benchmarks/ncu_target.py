"""Target process for Nsight Compute: a few in-place calls of rope_jit (fp32 cache, on the
fly) and, when .peers/libfi_rope.so exists, FlashInfer's cache kernel, on Llama-3-8B
shapes, for the token counts given on the command line (default 32768).

usage: ncu --section SpeedOfLight --section LaunchStats --section Occupancy \\
           python benchmarks/ncu_target.py 1 1024
"""
import ctypes
import os
import sys

import torch

import rope_jit

hq, hk, D = 32, 8, 128
so = os.path.join(os.path.dirname(__file__), "..", ".peers", "libfi_rope.so")
fi = ctypes.CDLL(so) if os.path.exists(so) else None
if fi is not None:
    P, U, S = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t
    fi.fi_cache_bf16.argtypes = [P, P, P, P, U, U, U, U, U, S, S, S, S, ctypes.c_int, P]
for T in [int(a) for a in sys.argv[1:]] or [32768]:
    q = torch.randn(T, hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hk, D, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 100000, (T,), device="cuda")
    c = rope_jit.compute_cos_sin_cache(128, 100000, like=q)
    for _ in range(2):
        rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, c, True)
        rope_jit.apply_rope_pos_ids_inplace(q, k, pos)
        if fi is not None:
            fi.fi_cache_bf16(q.data_ptr(), k.data_ptr(), c.data_ptr(), pos.data_ptr(), T, hq, hk,
                             D, D, hq * D, D, hk * D, D, 0,
                             torch.cuda.current_stream().cuda_stream)
torch.cuda.synchronize()
