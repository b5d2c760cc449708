"""Correctness before timing: each implementation against the float64 reference.

Before an implementation is timed on a shape, its output on fresh random inputs (at one
moderate token count, the shape's check row) is compared with ``rope_jit.reference`` (the
project's NumPy float64 oracle) fed the same cos/sin the implementation reads: the
exact values of the rounded cache it is given, or, on the fly, cos and sin of positions x
frequencies in float64 (frequencies of a scaling variant from
``rope_jit.resolve_rope_scaling``). The tolerance suits the implementation's arithmetic
(``TOLERANCES``). Also: the pass-through part of a partially rotated head bit-identical,
every value finite, outputs of the right shape, and an out-of-place implementation's
inputs left as they were. One that fails is reported WRONG and not timed.

Shapes are read by attribute (num_q_heads, num_kv_heads, head_size, rotary_dim, is_neox),
implementations by cache_dtype, tolerance, rope_scaling and inplace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import rope_jit
from rope_jit import reference


def pair_layout(per_pair: np.ndarray, is_neox: bool) -> np.ndarray:
    """Spread per-pair values [..., R/2] over the R elements of those pairs."""
    if is_neox:
        return np.concatenate([per_pair, per_pair], axis=-1)
    return np.repeat(per_pair, 2, axis=-1)


def pair_magnitude(x_rot: np.ndarray, is_neox: bool) -> np.ndarray:
    """|x1| + |x2| of each element's pair: the scale of arithmetic error under cancellation."""
    half = x_rot.shape[-1] // 2
    if is_neox:
        m = np.abs(x_rot[..., :half]) + np.abs(x_rot[..., half:])
    else:
        m = np.abs(x_rot[..., 0::2]) + np.abs(x_rot[..., 1::2])
    return pair_layout(m, is_neox)


# name -> (what it allows, tol(ulp_of_ref, pair_magnitude, |angle|))
TOLERANCES: dict[str, tuple[str, Callable]] = {
    "fp32": ("1 bf16 ulp + 2^-21·(|x1|+|x2|): fp32 math rounded once "
             "(as tests/gpu_cases.assert_rope_close)",
             lambda ulp, mag, ang: ulp + 2.0 ** -21 * mag),
    "fp32_2ulp": ("2 bf16 ulps + 2^-21·(|x1|+|x2|)",
                  lambda ulp, mag, ang: 2 * ulp + 2.0 ** -21 * mag),
    # FlashInfer's on-the-fly path forms the angle p*freq in fp32 from __powf frequencies
    # and takes __sincosf of it: about |angle|*2^-22 rad of error at these positions, tens
    # of bf16 ulps of the output at p ~ 1e5. Allowed with 4x margin so a precision
    # property is not reported as a bug; wrong style, layout or theta still fail (their
    # errors are of the order of |x|, and at the mid and low frequencies the angle term is
    # small).
    "fp32_angle": ("2 bf16 ulps + (2^-21 + 2^-18·(1+|angle|))·(|x1|+|x2|): fp32 angles "
                   "(__powf, __sincosf) lose about |angle|·2^-22 rad",
                   lambda ulp, mag, ang: 2 * ulp + (2.0 ** -21 + 2.0 ** -18 * (1 + ang)) * mag),
    # bf16 arithmetic rounds each product and the sum (unit roundoff 2^-8 each)
    "bf16_math": ("4 bf16 ulps + 2^-7·(|x1|+|x2|): bf16 arithmetic rounds every product",
                  lambda ulp, mag, ang: 4 * ulp + 2.0 ** -7 * mag),
}


def to_float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


@dataclass
class RopeCheckCase:
    """Fresh random inputs for one shape's check: pristine device tensors (each
    implementation gets clones) and float64 host copies; references memoized per cos/sin
    source so every implementation reading the same cache shares one."""
    shape: object
    tokens: int
    rope_theta: float
    pos: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    pos_host: np.ndarray
    q_host: np.ndarray
    k_host: np.ndarray
    refs: dict = field(default_factory=dict)

    def reference(self, cache_dtype: str | None, host_caches: dict, rope_scaling: dict | None):
        """(ref_q, ref_k, |angle| per rotary element [T, 1, R]) for this cos/sin source."""
        key = (cache_dtype, repr(sorted(rope_scaling.items())) if rope_scaling else None)
        if key not in self.refs:
            s = self.shape
            inv_freq = reference.inv_frequencies(s.rotary_dim, self.rope_theta)
            if rope_scaling is not None:
                scaled = rope_jit.resolve_rope_scaling(rope_scaling, s.rotary_dim, base=self.rope_theta)
                inv_freq = np.asarray(scaled.inv_freq, dtype=np.float64)
                cos, sin = reference.cos_sin(self.pos_host, inv_freq)
                cos, sin = cos * scaled.attention_factor, sin * scaled.attention_factor
            elif cache_dtype is None:
                cos, sin = reference.cos_sin(self.pos_host, inv_freq)
            else:  # exactly the rounded values the implementation reads
                cos, sin = reference.cos_sin_from_cache(host_caches[cache_dtype], self.pos_host)
            angle = pair_layout(np.abs(self.pos_host[:, None] * inv_freq), s.is_neox)[:, None, :]
            self.refs[key] = (reference.apply_rotary(self.q_host, cos, sin, s.is_neox),
                              reference.apply_rotary(self.k_host, cos, sin, s.is_neox),
                              angle)
        return self.refs[key]


def make_rope_check_case(shape, tokens: int, device: torch.device, dtype: torch.dtype,
                         max_position: int, rope_theta: float, seed: int) -> RopeCheckCase:
    g = torch.Generator(device=device).manual_seed(seed + tokens)
    q = torch.randn(tokens, shape.num_q_heads, shape.head_size, generator=g, device=device).to(dtype)
    k = torch.randn(tokens, shape.num_kv_heads, shape.head_size, generator=g, device=device).to(dtype)
    pos = torch.randint(0, max_position, (tokens,), generator=g, device=device, dtype=torch.int64)
    return RopeCheckCase(shape, tokens, rope_theta, pos, q, k, pos.cpu().numpy(),
                         to_float64(q), to_float64(k))


def compare(what: str, got: np.ndarray, before: np.ndarray, ref: np.ndarray, angle: np.ndarray,
            shape, tol_fn) -> dict:
    """Rotated part within tolerance, pass-through bit-identical, everything finite."""
    R = shape.rotary_dim
    problems = []
    if got.shape != ref.shape:
        return dict(problems=[f"{what}: shape {got.shape}, expected {ref.shape}"],
                    max_abs_err=float("inf"), worst_err_over_tol=float("inf"))
    if not np.isfinite(got).all():
        problems.append(f"{what}: {int((~np.isfinite(got)).sum())} non-finite values")
        got = np.nan_to_num(got, nan=1e30, posinf=1e30, neginf=-1e30)
    err = np.abs(got[..., :R] - ref[..., :R])
    tol = tol_fn(reference.ulp(ref[..., :R], "bfloat16"), pair_magnitude(before[..., :R], shape.is_neox),
                 np.broadcast_to(angle, err.shape))
    ratio = err / tol
    bad = int((ratio > 1).sum())
    if bad:
        at = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        problems.append(f"{what}: {bad} of {err.size} rotated elements beyond tolerance; worst "
                        f"at (token, head, dim) {tuple(int(i) for i in at)}: got {got[..., :R][at]:.6g}, "
                        f"expected {ref[..., :R][at]:.6g}, tolerance {tol[at]:.3g}")
    if R < shape.head_size and not np.array_equal(got[..., R:], before[..., R:]):
        problems.append(f"{what}: pass-through part (dims {R}..{shape.head_size - 1}) changed")
    return dict(problems=problems, max_abs_err=float(err.max(initial=0.0)),
                worst_err_over_tol=float(ratio.max(initial=0.0)))


def check_rope(impl, apply, device: torch.device, host_caches: dict, case: RopeCheckCase) -> dict:
    """Run ``apply(pos, q, k)`` once on clones of the case's inputs and compare q and k (in
    place) or its returned pair (out of place) with the float64 reference. Returns a
    record: ok, problems, max_abs_err, worst_err_over_tol."""
    q, k, pos = case.q.clone(), case.k.clone(), case.pos.clone()
    out = apply(pos, q, k)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    problems = []
    if impl.inplace:
        got_q, got_k = q, k
    else:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"{impl.name}: an out-of-place implementation must return (q, k), "
                            f"got {type(out).__name__}")
        got_q, got_k = out
        for what, after, before in (("q", q, case.q), ("k", k, case.k)):
            if not torch.equal(after, before):
                problems.append(f"{what}: input changed by an out-of-place call")
    ref_q, ref_k, angle = case.reference(impl.cache_dtype, host_caches, impl.rope_scaling)
    tol_fn = TOLERANCES[impl.tolerance][1]
    parts = [compare("q", to_float64(got_q), case.q_host, ref_q, angle, case.shape, tol_fn),
             compare("k", to_float64(got_k), case.k_host, ref_k, angle, case.shape, tol_fn)]
    problems += [p for part in parts for p in part["problems"]]
    return dict(shape=case.shape.name, impl=impl.name, tokens=case.tokens, ok=not problems,
                tolerance=TOLERANCES[impl.tolerance][0], problems=problems,
                max_abs_err=max(p["max_abs_err"] for p in parts),
                worst_err_over_tol=max(p["worst_err_over_tol"] for p in parts))
