"""Property-based tests (hypothesis) of every RoPE entry point on the GPU (marker: gpu).

The calls are drawn by tests/test_properties_cpu.py's strategies (random shapes, strides,
offsets, dtypes, cache dtypes or on the fly, styles, rotary dims, position conventions,
in place and out of place; README of that module). Here each one runs on the GPU:

* every accepted call matches the float64 reference (rope_jit.reference) within the
  tolerance of tests/gpu_cases.py ``assert_rope_close`` (one ulp of the output dtype plus
  fp32 slack; pass-through bit-identical), with positions outside a cache leaving their
  token unrotated; out of place: results of the inputs' shape and dtype, contiguous, on
  their device, fully written over NaN-poisoned memory, and every input bit-identical;
  in place: no byte of the fused buffer outside q and k changes; indptr + offsets give
  bit-identical results to the positions positions_from_offsets computes on the device;
* every invalid mutation of a valid call raises its TypeError/ValueError naming the
  argument before anything runs: all inputs bit-identical afterwards;
* positions_from_offsets on device arrays equals the reference.

Shrinking is off (each step would compile kernels); a failure prints the drawn case and a
@reproduce_failure blob. The number of cases run is printed in pytest's terminal summary.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("hypothesis")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

from gpu_cases import as_heads, assert_rope_close, covered, poison_allocator, to_numpy64  # noqa: E402
from test_properties_cpu import (  # noqa: E402, F401 (report_case_counts: autouse fixture)
    COUNTS,
    MUTATIONS,
    build,
    check_rejected,
    mutated_case,
    mutation_params,
    property_settings,
    ragged_batches,
    report_case_counts,
    rope_cases,
    tensors_of,
)

# indptr + offsets entry point -> its one-position-per-token twin
POS_IDS_TWIN = {"apply_rope": "apply_rope_pos_ids", "apply_rope_inplace": "apply_rope_pos_ids",
                "apply_llama31_rope": "apply_llama31_rope_pos_ids",
                "apply_llama31_rope_inplace": "apply_llama31_rope_pos_ids"}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so NaN, -0.0 and every payload compare exactly."""
    if not t.dtype.is_floating_point:
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def reference_cos_sin(b) -> tuple:
    """cos, sin [token_shape..., rotary_dim/2] in float64: the cache's own rows (identity
    for positions outside it), or the frequencies of the on-the-fly parameters."""
    case, pos = b.case, b.token_positions
    half = case.rotary_dim // 2
    if case.cache_dtype is not None:
        cache64 = to_numpy64(b.cache)
        inside = (pos >= 0) & (pos < case.max_position)
        rows = cache64[np.where(inside, pos, 0)]
        return (np.where(inside[..., None], rows[..., :half], 1.0),
                np.where(inside[..., None], rows[..., half:], 0.0))
    inv = reference.inv_frequencies(case.rotary_dim, case.rope_theta, case.rope_scale,
                                    case.llama31)
    return reference.cos_sin(pos, inv)


def pos_ids_twin(b):
    """For an indptr + offsets case: the positions computed on the device (checked against
    the reference) and the out-of-place results of the pos_ids twin on those positions."""
    positions = rope_jit.positions_from_offsets(b.indptr, b.offsets, b.case.num_tokens)
    assert positions.device == b.query.device and positions.dtype == b.indptr.dtype
    np.testing.assert_array_equal(positions.cpu().numpy(), b.token_positions)
    kwargs = {n: v for n, v in b.kwargs.items() if n not in ("indptr", "offsets")}
    return getattr(rope_jit, POS_IDS_TWIN[b.case.entry])(pos_ids=positions, **kwargs)


@property_settings(100, shrink=False)
@given(case=rope_cases())
def test_accepted_calls_match_the_reference(case):
    COUNTS.add("GPU: valid calls checked against the float64 reference")
    b = build(case, "cuda")
    D, rot, tok_ndim = case.head_size, case.rotary_dim, len(case.token_shape)
    others = {n: t.clone() for n, t in tensors_of(b.kwargs).items()
              if n not in ("query", "key", "q", "k")}
    buffer_before = b.buffer.clone()
    has_tokens = case.num_tokens > 0
    if has_tokens:
        cos, sin = reference_cos_sin(b)
        inputs = [(x, as_heads(x, D, tok_ndim)) for x in (b.query, b.key) if x is not None]
        refs = [reference.apply_rotary(x64, cos, sin, case.is_neox) for _, x64 in inputs]
    twin = pos_ids_twin(b) if case.spec.indptr and has_tokens else None

    if case.spec.inplace:
        assert b.call() is None
        outs = (b.query, b.key)
    else:
        poison_allocator(sum(x.numel() * x.element_size() for x in (b.query, b.key)
                             if x is not None))
        outs = b.call()
        assert isinstance(outs, tuple) and len(outs) == 2
        assert (outs[1] is None) == (b.key is None)
        for out, x in zip(outs, (b.query, b.key)):
            if x is not None:
                assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
                assert out.is_contiguous()
    torch.cuda.synchronize()

    if case.spec.inplace:
        outside = ~covered(b.buffer.numel(), [b.query, b.key])
        changed = ~(bits(b.buffer) == bits(buffer_before)).cpu().numpy()
        assert not (changed & outside).any(), "bytes outside the q and k views changed"
    else:
        assert same_bits(b.buffer, buffer_before), "out of place changed query or key"
    for n, t in others.items():
        assert same_bits(b.kwargs[n], t), f"{n} changed"
    if not has_tokens:
        return
    for out, (x, x64), ref, what in zip(outs, inputs, refs, ("query", "key")):
        assert_rope_close(out, x64, ref, case.dtype, D, rot, tok_ndim, what)
    if twin is not None:
        for out, t, what in zip(outs, twin, ("query", "key")):
            if out is not None:
                assert same_bits(out.reshape(t.shape), t), (
                    f"{what}: indptr + offsets and positions_from_offsets + pos_ids differ")


@pytest.mark.parametrize("mutation_name", mutation_params())
@property_settings(6, shrink=False)
@given(data=st.data())
def test_invalid_calls_raise_before_touching_anything(mutation_name, data):
    COUNTS.add("GPU: invalid calls rejected with inputs untouched")
    mutation = MUTATIONS[mutation_name]
    b = build(mutated_case(data, mutation), "cuda")
    changes = mutation.mutate(b, data.draw)
    kwargs = {**b.kwargs, **changes}
    before = {n: t.clone() for n, t in tensors_of(kwargs).items()}
    buffer_before = b.buffer.clone()
    check_rejected(b, mutation, changes)
    torch.cuda.synchronize()
    assert same_bits(b.buffer, buffer_before), "the fused q/k buffer changed"
    for n, t in tensors_of(kwargs).items():
        assert same_bits(t, before[n]), f"{n} changed"


@property_settings(30, shrink=False)
@given(batch=ragged_batches())
def test_positions_from_offsets_on_the_device(batch):
    COUNTS.add("GPU: positions_from_offsets ragged batches")
    indptr, offsets, nnz, dtype = batch
    ind, off = torch.from_numpy(indptr).cuda(), torch.from_numpy(offsets).cuda()
    got = rope_jit.positions_from_offsets(ind, off, nnz)
    assert got.device == ind.device and str(got.dtype) == f"torch.{dtype}"
    np.testing.assert_array_equal(got.cpu().numpy(),
                                  reference.positions_from_offsets(indptr, offsets, nnz))
    assert torch.equal(ind.cpu(), torch.from_numpy(indptr))
    assert torch.equal(off.cpu(), torch.from_numpy(offsets))
