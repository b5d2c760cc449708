"""The call path of the fused ops, with the warm-path design of ``rope_jit.launch``: one
fingerprint per array, one look-up in a bounded plan cache keyed by the call and the
fingerprints, the pointers packed into this thread's argument buffer of the plan (its
static part packed once), one cuLaunchKernel on the caller's current stream. Validation,
planning, the frequency values and the compiled function are computed once per key by
``_prepare``. Outputs a FlashInfer function allocates (missing ``*_out`` arrays) are the
only allocations; in-place calls allocate nothing, so they can be captured in a CUDA graph
once their kernel is loaded.

This module never decides whether torch must see a call (``rope_jit.route`` does).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, NamedTuple

from . import jit
from ._cuda import num_sms
from .arrays import _BY_TYPE, Framework, describe, framework_of
from .call_fused import FusedRopeCall, QKNormRopeCall
from .launch import (ABSENT, PLAN_CACHE_SIZE, BoundedCache, PreparedLaunch, check_pdl_device,
                     fingerprint_of, foreign_views, launch_plan, note_devices, pdl_launcher,
                     plan_buffer)
from .plan_fused import (MUTATES, RETURNS, FusedRopeArrays, QKNormRopeArrays, arg_name,
                         plan_qk_norm_rope, plan_rope_fused)
from .specs import ParamStruct
from .specs_fused import FUSED_ROPE_PARAMS, QK_NORM_ROPE_PARAMS


class _Kind(NamedTuple):
    """What differs between the call types: the planner's arrays (their fields are the
    kernel's pointers, in the public functions' order), the planner, the kernel-argument
    struct, its pointers' packer and `order`: (array index, field) of each pointer in the
    struct's order (which is the order a decode call reads them, not the arrays')."""

    arrays: type
    plan: Callable
    params: ParamStruct
    pointers: struct.Struct
    order: tuple


def _kind(arrays: type, plan: Callable, params: ParamStruct) -> _Kind:
    fields = arrays._fields
    order = tuple((fields.index(n), n) for n in params.pointers)
    assert len(order) == len(fields), f"{arrays.__name__} must have the kernel's pointers"
    return _Kind(arrays, plan, params, struct.Struct("<" + "q" * len(order)), order)


_KINDS = {
    FusedRopeCall: _kind(FusedRopeArrays, plan_rope_fused, FUSED_ROPE_PARAMS),
    QKNormRopeCall: _kind(QKNormRopeArrays, plan_qk_norm_rope, QK_NORM_ROPE_PARAMS),
}


@dataclass(frozen=True, eq=False)
class _Prepared(PreparedLaunch):
    allocate: tuple     # (array index, pointer index, shape, dtype) of each output to allocate
    returns: tuple      # array indices of the outputs the call returns
    pdl: object = None  # a _cuda.PdlLaunch when the call asked for enable_pdl


_plans = BoundedCache(PLAN_CACHE_SIZE)


def _prepare(kind: _Kind, call, arrays: tuple) -> _Prepared:
    fields = kind.arrays._fields
    descs = kind.arrays(*(None if obj is None else describe(obj, arg_name(call, f))
                          for obj, f in zip(arrays, fields)))
    device = descs[0].device
    plan = kind.plan(call, descs, num_sms=num_sms(device) if device >= 0 else 132)
    pdl = getattr(call, "pdl", False)
    check_pdl_device(pdl, plan.device)
    func = jit.get_function(plan.spec, plan.device) if plan.spec is not None else 0
    index = {f: i for i, f in enumerate(fields)}
    slot = {f: j for j, f in enumerate(kind.params.pointers)}
    launch = plan.launch
    return _Prepared(func, launch.grid if launch else (), launch.block if launch else (),
                     launch.smem if launch else 0, plan.static, plan.device,
                     tuple((index[f], slot[f], shape, dtype) for f, shape, dtype in plan.outputs),
                     tuple(index[f] for f in RETURNS.get(getattr(call, "op", None), ())),
                     pdl_launcher(pdl, func, launch))


def run_fused(call: FusedRopeCall | QKNormRopeCall, arrays: tuple, *, fw: Framework | None = None):
    """Run a fused call on arrays of any supported framework, given in the order of the
    fields of plan_fused.FusedRopeArrays or QKNormRopeArrays (None where absent). Returns
    the outputs of a FlashInfer function (given ones as they were, missing ones new, of the
    caller's array type), else None.

    fw: the first array's Framework when the caller already knows it.
    """
    first = arrays[0]
    if fw is None:
        fw = _BY_TYPE.get(type(first)) or framework_of(first, arg_name(call, "q_rope"))
    if not fw.native:
        return _run_foreign(fw, call, arrays)
    kind = _KINDS[type(call)]
    fp, first_type = fw.fingerprint, type(first)
    sig, ptrs = [call], []  # in the struct's pointer order
    for i, field in kind.order:
        obj = arrays[i]
        f, ptr = (ABSENT if obj is None else fp(obj) if type(obj) is first_type
                  else fingerprint_of(obj, arg_name(call, field)))
        sig.append(f)
        ptrs.append(ptr)
    sig = tuple(sig)
    prep = _plans.get(sig) or _plans.miss(sig)
    if prep is None:
        prep = _prepare(kind, call, arrays)
        _plans.put(sig, prep)
        note_devices()
    if prep.allocate:
        arrays = list(arrays)
        for i, j, shape, dtype in prep.allocate:
            out = arrays[i] = fw.empty(shape, dtype, prep.device, first)
            ptrs[j] = fw.fingerprint(out)[1]
    if prep.func:
        buf, argv, _keep = plan_buffer(prep, kind.params)
        kind.pointers.pack_into(buf, kind.params.pointer_offset, *ptrs)
        launch_plan(prep, fw, argv)
    return tuple(arrays[i] for i in prep.returns) if prep.returns else None


def _run_foreign(fw: Framework, call, arrays: tuple):
    """Arrays through __cuda_array_interface__ or __dlpack__ (launch.foreign_views): the
    arrays a call writes must be mutable; outputs it allocates come back in the caller's
    type, outputs given come back as given."""
    fields = _KINDS[type(call)].arrays._fields
    names = [arg_name(call, f) for f in fields]
    written = MUTATES.get(getattr(call, "op", None), ("qkv",))
    with foreign_views(list(zip(names, arrays)), tuple(arg_name(call, f) for f in written),
                       "this function writes it in place") as views:
        outs = run_fused(call, tuple(views))
        if outs is None:
            return None
        returned = [fields.index(f) for f in RETURNS[call.op]]
        return tuple(arrays[i] if arrays[i] is not None else fw.from_cupy(out, arrays[0])
                     for i, out in zip(returned, outs))


def clear_fused_plans() -> None:
    """Forget every fused plan (compiled kernels stay loaded)."""
    _plans.clear()
