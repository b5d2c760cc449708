"""rope_jit quickstart: compile the kernels two model shapes use, then apply every entry
point and print its error against the float64 reference.

Runs anywhere: without a GPU it NVRTC-compiles the kernels for sm_90 (as an image build
warming the cache would), checks the reference, and says that applying the kernels needs
an NVIDIA GPU.
"""

from __future__ import annotations


import numpy as np

import rope_jit
from rope_jit import reference, warm


def check_reference() -> None:
    # One NeoX pair by hand: x = (1, 0 | 0, 1) rotated by angle p * inv_freq.
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    inv = reference.inv_frequencies(4)
    c, s = reference.cos_sin([7], inv)
    out = reference.apply_rotary(x, c, s, is_neox=True)[0, 0]
    a0, a1 = 7 * inv[0], 7 * inv[1]
    by_hand = [1 * np.cos(a0) - 3 * np.sin(a0), 2 * np.cos(a1) - 4 * np.sin(a1),
               3 * np.cos(a0) + 1 * np.sin(a0), 4 * np.cos(a1) + 2 * np.sin(a1)]
    assert np.allclose(out, by_hand, rtol=0, atol=1e-15)
    pos = rope_jit.positions_from_offsets(np.array([0, 1, 5, 10]), np.array([4, 6, 3]))
    print(f"reference: NeoX by hand ok; positions_from_offsets([0,1,5,10], [4,6,3]) = {pos.tolist()}")


def compile_kernels(arch: str) -> None:
    """Ahead-of-time warming, as `rope-jit warm` does: the kernels Llama-3-8B's calls use up
    to 512 tokens, with an fp32 cache and on the fly, and Phi-2's with a bf16 cache."""
    calls = [warm.model_call("llama3-8b"),
             warm.model_call("llama3-8b", cache_dtype=None, indptr=True, index_dtype="int32"),
             warm.model_call("phi-2", dtype="float16", cache_dtype="bfloat16")]
    specs = [spec for call in calls for spec in warm.specs_for_call(call, max_tokens=512)]
    for item in sorted(warm.warm(specs, [arch]).items, key=lambda i: i.spec.words()):
        print(f"NVRTC {item.arch}: {item.spec.words():<95s} {item.origin:>8s} "
              f"{item.seconds * 1e3:6.1f} ms")


def run_on_gpu() -> None:
    import torch

    from rope_jit import jit

    torch.manual_seed(0)
    T, Hq, Hk, D = 300, 8, 2, 128
    q = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, Hk, D, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 2 ** 20, (T,), device="cuda")
    indptr = torch.tensor([0, 100, 120, 300], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([5, 70000, 2 ** 19], dtype=torch.int32, device="cuda")
    q64 = q.double().cpu().numpy()
    k64 = k.double().cpu().numpy()

    def err(out, ref, dtype="bfloat16"):
        o = out.double().cpu().numpy().reshape(ref.shape)
        return float(np.max(np.abs(o - ref) / reference.ulp(ref, dtype)))

    def report(name, outs, cos, sin, neox=True):
        eq = err(outs[0], reference.apply_rotary(q64, cos, sin, neox))
        ek = err(outs[1], reference.apply_rotary(k64, cos, sin, neox))
        print(f"  {name:<42s} max error q {eq:.2f} ulp, k {ek:.2f} ulp (bf16)")

    print(f"GPU: {torch.cuda.get_device_name()}; tokens {T}, heads {Hq}/{Hk}, head size {D}")
    for cache_dtype in ("float32", "bfloat16"):
        cache = rope_jit.compute_cos_sin_cache(D, 2 ** 20, dtype=cache_dtype, like=q)
        c, s = reference.cos_sin_from_cache(cache.double().cpu().numpy(), pos.cpu().numpy())
        report(f"apply_rope_with_cos_sin_cache ({cache_dtype} cache)",
               rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, D, cache), c, s)
        qi, ki = q.clone(), k.clone()
        rope_jit.apply_rope_inplace_with_cache(pos, qi, ki, D, cache, True)
        report(f"apply_rope_inplace_with_cache ({cache_dtype} cache)", (qi, ki), c, s)
    inv = reference.inv_frequencies(D)
    c, s = reference.cos_sin(pos.cpu().numpy(), inv)
    report("apply_rope_pos_ids (on the fly)", rope_jit.apply_rope_pos_ids(q, k, pos), c, s)
    ragged = reference.positions_from_offsets(indptr.cpu().numpy(), offsets.cpu().numpy())
    c, s = reference.cos_sin(ragged, inv)
    report("apply_rope (indptr + offsets)", rope_jit.apply_rope(q, k, indptr, offsets), c, s)
    c, s = reference.cos_sin(ragged, reference.inv_frequencies(D, 5e5, 8.0, (1.0, 4.0, 8192)))
    report("apply_llama31_rope", rope_jit.apply_llama31_rope(q, k, indptr, offsets), c, s)
    c, s = reference.cos_sin(pos.cpu().numpy(), reference.inv_frequencies(D))
    report("apply_rope_pos_ids (GPT-J, interleave=True)",
           rope_jit.apply_rope_pos_ids(q, k, pos, interleave=True), c, s, neox=False)
    print(f"  compiled {jit.stats.compiles} specializations "
          f"({jit.stats.compile_seconds:.2f} s), {jit.stats.disk_hits} loaded from {jit.cache_dir()}")


def main() -> None:
    print(f"rope_jit {rope_jit.__version__}")
    check_reference()
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    compile_kernels("sm_{}{}".format(*torch.cuda.get_device_capability()) if gpu else "sm_90")
    if gpu:
        run_on_gpu()
    else:
        print("No NVIDIA GPU here: the kernels were rendered and compiled, but applying them "
              "needs an NVIDIA GPU.")


if __name__ == "__main__":
    main()
