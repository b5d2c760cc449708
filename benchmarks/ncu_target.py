import torch, rope_jit
T, hq, hk, D = 32768, 32, 8, 128
q = torch.randn(T, hq, D, device="cuda", dtype=torch.bfloat16); k = torch.randn(T, hk, D, device="cuda", dtype=torch.bfloat16)
pos = torch.randint(0, 100000, (T,), device="cuda"); c = rope_jit.compute_cos_sin_cache(128, 100000, like=q)
for _ in range(3):
    rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, c, True)
    rope_jit.apply_rope_pos_ids_inplace(q, k, pos)
torch.cuda.synchronize()
