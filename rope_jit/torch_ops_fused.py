"""torch.library custom ops of the fused functions: under torch.compile each call is one
graph node (no graph break, ``fullgraph=True`` works), and its fake implementation runs
the same validation on the tensors' metadata, so a bad call fails while tracing.

Imported by ``rope_jit.route`` with ``rope_jit.torch_ops``, the first time rope_jit meets a
torch tensor. Four ops in the ``rope_jit`` namespace, each declaring exactly the arrays it
writes (``plan_fused.MUTATES``), so functionalization and CUDA graphs see every write:

* ``rope_jit::rope_quantize_``: FlashInfer's rope_quantize_fp8 / mla_rope_quantize_fp8,
  writes the four outputs;
* ``rope_jit::rope_append_paged_``: FlashInfer's rope_quantize_fp8_append_paged_kv_cache,
  writes the q outputs and both paged caches;
* ``rope_jit::rope_cache_``: vLLM's concat_and_cache_mla_rope_fused and
  rope_and_reshape_and_cache_flash, SGLang's fused KV-buffer write: q and k in place and
  the K (and V) cache;
* ``rope_jit::qk_norm_rope_``: fused_qk_norm_rope, qkv in place.

The arrays are op arguments, in the order of the fields of ``plan_fused.FusedRopeArrays``
/ ``QKNormRopeArrays``; the call (``FusedRopeCall`` / ``QKNormRopeCall``) follows as one
argument per field. None of them is differentiable (they write in place or quantize). The
outputs a FlashInfer function allocates are allocated here, before the op, as FlashInfer's
Python does.
"""

import torch

from . import launch_fused
from .call_fused import (APPEND_PAGED, KV_CACHE, OP_FIELDS, ROPE_QUANTIZE, FusedRopeCall,
                         QKNormRopeCall)
from .plan_fused import (MUTATES, RETURNS, FusedRopeArrays, QKNormRopeArrays, arg_name,
                         output_shapes, plan_qk_norm_rope, plan_rope_fused)
from .torch_ops import NAMESPACE, SYMBOLIC, fake_descs, tensor_arg

# op name -> the FusedRopeCall ops it serves
_ROPE_OPS = {"rope_quantize_": ROPE_QUANTIZE, "rope_append_paged_": APPEND_PAGED,
             "rope_cache_": KV_CACHE}  # (MLA_CACHE writes a subset: no cache1)


def _schema(arrays_type, written: tuple, call_type) -> str:
    """The first array is required, the others optional; written ones are marked (x!)."""
    args, aliases = [], iter("abcdefgh")
    for i, field in enumerate(arrays_type._fields):
        alias = f"({next(aliases)}!)" if field in written else ""
        args.append(f"Tensor{alias}{'' if i == 0 else '?'} {field}")
    args += [f"{t} {n}" for n, t in OP_FIELDS[call_type]]
    return f"({', '.join(args)}) -> ()"


def _register(op_name: str, arrays_type, written: tuple, call_type, planner):
    n = len(arrays_type._fields)

    def impl(*args):
        launch_fused.run_fused(call_type(*args[n:]), args[:n])

    impl.__name__ = op_name
    op = torch.library.custom_op(f"{NAMESPACE}::{op_name}", impl, mutates_args=written,
                                 schema=_schema(arrays_type, written, call_type))

    @op.register_fake
    def _fake(*args):
        descs = fake_descs(*args[:n])
        if descs is not SYMBOLIC:
            planner(call_type(*args[n:]), arrays_type(*descs))

    return op


for _name, _op in _ROPE_OPS.items():
    _register(_name, FusedRopeArrays, MUTATES[_op], FusedRopeCall, plan_rope_fused)
_register("qk_norm_rope_", QKNormRopeArrays, ("qkv",), QKNormRopeCall, plan_qk_norm_rope)

_OP_OF = {ROPE_QUANTIZE: "rope_quantize_", APPEND_PAGED: "rope_append_paged_"}  # else rope_cache_


def _quantize_dtype(call: FusedRopeCall, a: FusedRopeArrays):
    """FlashInfer's rule (as plan_fused): quantize_dtype, else the first output given, else
    float8_e4m3fn; the paged append without outputs: its cache's dtype."""
    if call.quantize_dtype is not None:
        return getattr(torch, call.quantize_dtype)
    for field in RETURNS[call.op]:
        out = getattr(a, field)
        if out is not None:
            return out.dtype
    if call.op == APPEND_PAGED and a.cache0 is not None:
        return a.cache0.dtype
    return torch.float8_e4m3fn


def rope_fused(call: FusedRopeCall, arrays: tuple):
    """route.rope_fused for torch calls torch must see: the same call, through the ops."""
    a = FusedRopeArrays(*(tensor_arg(x, arg_name(call, f))
                          for x, f in zip(arrays, FusedRopeArrays._fields)))
    returns = RETURNS.get(call.op)
    if returns:
        dtype = _quantize_dtype(call, a)
        shapes = output_shapes(call.op, a.q_rope.shape, a.k_rope.shape,
                               None if a.q_nope is None else a.q_nope.shape,
                               None if a.k_nope is None else a.k_nope.shape)
        a = a._replace(**{f: a.q_rope.new_empty(shapes[f], dtype=dtype)
                          for f in returns if getattr(a, f) is None})
    # call[:]: a plain tuple slice, which Dynamo unpacks (it cannot iterate a NamedTuple
    # directly in every torch version)
    getattr(torch.ops.rope_jit, _OP_OF.get(call.op, "rope_cache_"))(*a, *call[:])
    return tuple(getattr(a, f) for f in returns) if returns else None


def qk_norm_rope(call: QKNormRopeCall, arrays: tuple) -> None:
    args = [tensor_arg(x, f) for x, f in zip(arrays, QKNormRopeArrays._fields)]
    torch.ops.rope_jit.qk_norm_rope_(*args, *call[:])
