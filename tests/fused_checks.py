"""Numeric checks and batch layouts shared by the fused-op tests on the GPU
(test_gpu_fused*.py) and under host emulation (test_fused_emulated.py): NumPy only."""

from __future__ import annotations

import numpy as np

from rope_jit import reference


def pair_magnitude(x: np.ndarray, is_neox: bool) -> np.ndarray:
    """|x1| + |x2| of the pair each rotated element belongs to (the scale of the fp32
    arithmetic error)."""
    half = x.shape[-1] // 2
    if is_neox:
        m = np.abs(x[..., :half]) + np.abs(x[..., half:])
        return np.concatenate([m, m], axis=-1)
    return np.repeat(np.abs(x[..., 0::2]) + np.abs(x[..., 1::2]), 2, axis=-1)


def head_magnitude(x: np.ndarray, rot: int, is_neox: bool) -> np.ndarray:
    """pair_magnitude over the rotated part of each head, |x| past it."""
    return np.concatenate([pair_magnitude(x[..., :rot], is_neox), np.abs(x[..., rot:])], axis=-1)


def assert_fp8_close(got: np.ndarray, ref: np.ndarray, fmt: str, what: str, mag=None):
    """got (decoded) is ref rounded once to nearest on the FP8 grid, saturated: within half
    a step, plus fp32 slack relative to the operands' magnitude."""
    top = reference.FP8_FORMATS[fmt][2]
    want = np.clip(ref, -top, top)
    slack = 2.0 ** -18 * (np.abs(ref) if mag is None else mag)
    tol = 0.5 * reference.fp8_ulp(want, fmt) + slack
    err = np.abs(got - want)
    bad = ~(err <= tol)  # NaN (an unwritten poisoned value) is bad too
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} values not the FP8 rounding of "
                             f"the reference; first: got {got.flat[i]!r}, reference "
                             f"{ref.flat[i]!r}")
    exact = np.mean(got == reference.fp8_round(ref, fmt))
    assert exact > 0.98, f"{what}: only {exact:.3f} of the values are the exact rounding"


def assert_ulp_close(got: np.ndarray, ref: np.ndarray, dtype: str, what: str, mag=None):
    slack = 2.0 ** -21 * (np.abs(ref) if mag is None else mag)
    tol = reference.ulp(ref, dtype) + slack
    bad = ~(np.abs(got - ref) <= tol)
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} values off by more than 1 ulp; "
                             f"first: got {got.flat[i]!r}, reference {ref.flat[i]!r}")


def paged_batch(page_size, seed, *, existing=(5, 0, 21), new=(3, 9, 1), padding=2, spare=3):
    """A batch appending new[b] tokens after existing[b] to request b, pages shuffled, spare
    pages no request owns, and padding tokens (batch index -1) at the end."""
    rng = np.random.default_rng(seed)
    pages = [-(-(e + n) // page_size) for e, n in zip(existing, new)]
    indptr = np.concatenate([[0], np.cumsum(pages)])
    total = int(indptr[-1]) + spare
    indices = rng.permutation(total)[: int(indptr[-1])]
    batch = np.concatenate([np.full(n, b) for b, n in enumerate(new)] + [np.full(padding, -1)])
    ppos = np.concatenate([np.arange(e, e + n) for e, n in zip(existing, new)] + [np.zeros(padding, int)])
    return total, indices, indptr, batch, ppos


def slot_mapping(T, num_slots, seed, *, skipped=(1,), short=0):
    """T - short distinct slots of num_slots, shuffled, those at the indices `skipped` -1
    (padding); the last `short` tokens get none (a mapping shorter than the batch)."""
    rng = np.random.default_rng(seed)
    s = rng.permutation(num_slots)[:T - short].astype(np.int64)
    s[list(skipped)] = -1
    return s


def rows_at(cache: np.ndarray, pages, entries, layout: str = "NHD") -> np.ndarray:
    """[tokens, (heads,) dim] rows of a cache at (page, entry) per token: [pages, entries,
    ...] (NHD, slot-major caches) or [pages, heads, entries, dim] (HND)."""
    return cache[pages, :, entries] if cache.ndim == 4 and layout == "HND" else cache[pages, entries]


def assert_only_rows_written(after: np.ndarray, before: np.ndarray, pages, entries,
                             layout: str, what: str) -> None:
    """Every (page, entry) of the cache not in the list keeps its bytes."""
    a, b = after.view(np.uint8).copy(), before.view(np.uint8)
    if len(pages):
        if a.ndim == 4 and layout == "HND":
            a[pages, :, entries] = b[pages, :, entries]
        else:
            a[pages, entries] = b[pages, entries]
    assert np.array_equal(a, b), f"{what}: entries outside the written ones changed"
