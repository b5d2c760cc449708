"""Building blocks of the GPU tests: fused QKV buffers, poisoned outputs, the float64
reference, and ulp-level comparisons. Imported by the GPU test modules only."""

from __future__ import annotations

import numpy as np
import torch

from rope_jit import reference

TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def fused_qkv(num_tokens, hq, hk, head_size, dtype, *, layout="2d", strided=False,
              batch_shape=None, seed=0):
    """q and k as views of one fused buffer [T, (hq + hk + hk) * D (+ padding)], so token
    strides are not the row length when strided. Returns (buffer, q, k); k is None if hk=0.
    layout '2d': [tokens..., H*D]; '3d': [tokens..., H, D]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pad = 24 if strided else 0
    width = (hq + 2 * hk) * head_size + pad
    buf = torch.randn(num_tokens, width, generator=g, device="cuda", dtype=torch.float32)
    buf = buf.to(TORCH_DTYPE[dtype])
    off = 8 if strided else 0  # q does not start at the row start
    if strided:
        buf = torch.randn(num_tokens, width + off, generator=g, device="cuda").to(TORCH_DTYPE[dtype])
    q = buf[:, off:off + hq * head_size]
    k = buf[:, off + hq * head_size: off + (hq + hk) * head_size] if hk else None

    def shape(x, heads):
        if x is None:
            return None
        tok = batch_shape if batch_shape is not None else (num_tokens,)
        if layout == "3d":
            return x.view(*tok, heads, head_size) if batch_shape is None else \
                x.reshape(*tok, heads, head_size)
        return x.view(*tok, heads * head_size) if batch_shape is None else x.reshape(*tok, heads * head_size)

    return buf, shape(q, hq), shape(k, hk)


def as_heads(x: torch.Tensor, head_size: int, tok_ndim: int) -> np.ndarray:
    a = to_numpy64(x)
    return a.reshape(*a.shape[:tok_ndim], -1, head_size)


def expected(x, head_size, tok_ndim, cos, sin, is_neox):
    return reference.apply_rotary(as_heads(x, head_size, tok_ndim), cos, sin, is_neox)


def assert_rope_close(out: torch.Tensor, x_before: np.ndarray, ref: np.ndarray, dtype: str,
                      head_size: int, rot: int, tok_ndim: int, what: str = "output"):
    """Rotated part within 1 ulp of the output dtype (plus fp32 arithmetic slack scaled by
    the products, which matters only under cancellation); pass-through bit-identical."""
    got = as_heads(out, head_size, tok_ndim)
    assert np.isfinite(got).all(), f"{what}: non-finite values (unwritten poisoned elements?)"
    gr, rr, xr = got[..., :rot], ref[..., :rot], x_before[..., :rot]
    # |x1 c| + |x2 s| <= |x1| + |x2|: the scale of the fp32 arithmetic error
    half = rot // 2
    pair_neox = np.concatenate([np.abs(xr[..., :half]) + np.abs(xr[..., half:])] * 2, axis=-1)
    pair_gptj = np.repeat(np.abs(xr[..., 0::2]) + np.abs(xr[..., 1::2]), 2, axis=-1)
    mag = np.maximum(pair_neox, pair_gptj)
    tol = reference.ulp(rr, dtype) + 2.0 ** -21 * mag
    err = np.abs(gr - rr)
    bad = err > tol
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements off by more than 1 ulp; "
                           f"worst err {err.max():.3g} (tol there {tol.flat[np.argmax(err - tol)]:.3g})")
    assert np.array_equal(got[..., rot:], x_before[..., rot:]), f"{what}: pass-through part changed"


def max_ulp_error(out, ref, dtype, head_size, rot, tok_ndim) -> float:
    got = as_heads(out, head_size, tok_ndim)[..., :rot]
    r = ref[..., :rot]
    return float(np.max(np.abs(got - r) / reference.ulp(r, dtype)))


def poison_allocator(nbytes: int, dtype=torch.float32) -> None:
    """Fill the caching allocator's next blocks with NaN so outputs allocated with
    torch.empty start poisoned: an element the kernel forgets to write stays NaN."""
    blocks = [torch.full((max(1, nbytes // 4),), float("nan"), device="cuda") for _ in range(4)]
    del blocks


class CAIOnly:
    """Exposes only __cuda_array_interface__ (like a Numba device array)."""

    def __init__(self, t):
        self._t = t
        self.__cuda_array_interface__ = t.__cuda_array_interface__


class DLPackOnly:
    """Exposes only __dlpack__ / __dlpack_device__ (any DLPack producer)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, *args, **kw):
        return self._t.__dlpack__(*args, **kw)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def covered(numel: int, views) -> np.ndarray:
    """Mask of the elements of a flat buffer that `views` (views of it) cover."""
    mask = np.zeros(numel, dtype=bool)
    for v in views:
        if v is None or v.numel() == 0:
            continue
        idx = np.array(v.storage_offset())
        for n, s in zip(v.shape, v.stride()):
            idx = idx[..., None] + np.arange(n) * s
        mask[idx.reshape(-1)] = True
    return mask
