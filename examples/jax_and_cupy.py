"""rope_jit with CuPy and JAX arrays: the same entry points, the caller's array type back.

CuPy arrays are read natively (kernel on CuPy's current stream); jax.Array values go
through DLPack without copies and come back as jax.Array, ordered with JAX's own work by
the DLPack stream handshake (no block_until_ready needed). Each result is compared with
the float64 reference (rope_jit.reference) in units in the last place of its dtype.

    python examples/jax_and_cupy.py

Without an NVIDIA GPU it says so and stops: both paths run kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with CuPy

import numpy as np  # noqa: E402

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

T, HQ, HK, D, MAX_POS = 512, 8, 2, 128, 1 << 16


def ulps(got, x64, cos, sin, neox, dtype) -> float:
    """Largest error of `got` against the float64 reference, in ulps of `dtype`."""
    ref = reference.apply_rotary(x64, cos, sin, neox)
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref) / reference.ulp(ref, dtype)))


def gpu_present() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def with_cupy(rng) -> None:
    import cupy as cp

    q = cp.asarray(rng.standard_normal((T, HQ, D)), dtype=cp.float16)
    k = cp.asarray(rng.standard_normal((T, HK, D)), dtype=cp.float16)
    pos = cp.asarray(rng.integers(0, MAX_POS, T))
    cache = rope_jit.compute_cos_sin_cache(D, MAX_POS, like=q)  # CuPy, fp32, q's device

    q_out, k_out = rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, D, cache, is_neox=True)
    cos, sin = reference.cos_sin_from_cache(cache.get(), pos.get())
    print(f"CuPy  apply_rope_with_cos_sin_cache -> {type(q_out).__module__}.{type(q_out).__name__}"
          f" {q_out.dtype}: q {ulps(q_out.get(), q.get().astype(np.float64), cos, sin, True, 'float16'):.2f}"
          f" ulp, k {ulps(k_out.get(), k.get().astype(np.float64), cos, sin, True, 'float16'):.2f} ulp")

    q64 = q.get().astype(np.float64)
    rope_jit.apply_llama31_rope_pos_ids_inplace(q, k, pos, interleave=True)  # in place works
    cos, sin = reference.cos_sin(pos.get(), reference.inv_frequencies(D, 5e5, 8.0, (1.0, 4.0, 8192)))
    print(f"CuPy  apply_llama31_rope_pos_ids_inplace (GPT-J style): q "
          f"{ulps(q.get(), q64, cos, sin, False, 'float16'):.2f} ulp")


def with_jax(rng) -> None:
    try:
        import jax
        import jax.numpy as jnp

        gpu = jax.devices("gpu")[0]
    except Exception as e:  # no JAX, or a CPU-only jaxlib
        print(f"JAX   skipped: {type(e).__name__}: {e}")
        return

    def put(a, dtype):
        return jax.device_put(jnp.asarray(a, dtype), gpu)

    q = put(rng.standard_normal((T, HQ, D)), jnp.bfloat16)
    k = put(rng.standard_normal((T, HK, D)), jnp.bfloat16)
    indptr_np = np.array([0, 100, 101, T], np.int32)
    offsets_np = np.array([0, 40000, 7], np.int32)
    q = jnp.sin(q) * 3.0  # produced by JAX just before: the DLPack handshake orders the read

    q_out, k_out = rope_jit.apply_rope(q, k, put(indptr_np, jnp.int32), put(offsets_np, jnp.int32),
                                       rope_theta=5e5)
    mean = jnp.mean(q_out.astype(jnp.float32))  # consumed by JAX at once, no sync needed
    pos = reference.positions_from_offsets(indptr_np, offsets_np)
    cos, sin = reference.cos_sin(pos, reference.inv_frequencies(D, 5e5))
    q64 = np.asarray(q.astype(jnp.float32), np.float64)
    k64 = np.asarray(k.astype(jnp.float32), np.float64)
    got_q = np.asarray(q_out.astype(jnp.float32))
    got_k = np.asarray(k_out.astype(jnp.float32))
    print(f"JAX   apply_rope (indptr + offsets, on the fly) -> {type(q_out).__name__} "
          f"{q_out.dtype} on {list(q_out.devices())[0]}: q {ulps(got_q, q64, cos, sin, True, 'bfloat16'):.2f}"
          f" ulp, k {ulps(got_k, k64, cos, sin, True, 'bfloat16'):.2f} ulp; mean {float(mean):+.4f}")
    try:
        rope_jit.apply_rope_inplace(q, k, put(indptr_np, jnp.int32), put(offsets_np, jnp.int32))
    except TypeError as e:
        print(f"JAX   apply_rope_inplace refused: {e}")


def main() -> None:
    if not gpu_present():
        print("No NVIDIA GPU here (or no CuPy): rope_jit's CuPy and JAX paths launch CUDA "
              "kernels and need one. Nothing to run.")
        return
    rng = np.random.default_rng(0)
    with_cupy(rng)
    with_jax(rng)


if __name__ == "__main__":
    main()
