"""Which way a call goes: through rope_jit's torch custom ops, or straight to the launcher.

Torch calls that torch must see go through ``rope_jit.torch_ops`` (graph nodes under
torch.compile, autograd, fake tensors): while Dynamo traces, when query or key requires
grad, for tensor subclasses (FakeTensor, FunctionalTensor, Parameter) and for meta tensors.
Every other call (plain CUDA tensors without grad, CuPy, JAX, ...) goes straight to
``launch``. This is the one place that decides; the test costs about 0.2 us of the warm
path (the order below is cheapest first, and a plain eager call pays all of it).

rope_jit never imports torch itself: the ops are registered the first time a torch tensor
arrives.
"""

from __future__ import annotations

from . import launch, launch_fused
from .arrays import _BY_TYPE, framework_of
from .call import RopeCall
from .call_fused import FusedRopeCall, QKNormRopeCall
from .plan_fused import arg_name

# Bound once a torch tensor is seen (module globals: the warm path reads them directly).
_torch_fw = None      # arrays' torch Framework
_Tensor = None        # torch.Tensor
_is_compiling = None  # torch.compiler.is_dynamo_compiling
_torch_ops = None     # rope_jit.torch_ops, or None where this torch cannot register the ops
_fused_ops = None     # rope_jit.torch_ops_fused, likewise


def _bind_torch(fw) -> None:
    global _torch_fw, _Tensor, _is_compiling, _torch_ops, _fused_ops
    import torch

    try:
        from . import torch_ops, torch_ops_fused
    except Exception as e:  # a torch without torch.library.custom_op(schema=) (< 2.4)
        import warnings

        warnings.warn(f"rope_jit: torch.compile and autograd support unavailable with torch "
                      f"{torch.__version__} ({type(e).__name__}: {e}); eager calls work",
                      stacklevel=3)
        torch_ops = torch_ops_fused = None
    # is_dynamo_compiling is `return False`, which Dynamo folds to True while tracing: a
    # third of the cost of is_compiling (measured on the H100 host: 36 vs 85 ns a call).
    _is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
    _Tensor, _torch_ops, _fused_ops = torch.Tensor, torch_ops, torch_ops_fused
    _torch_fw = fw


def _through_torch(query, key) -> bool:
    """Must torch see this call of torch tensors?"""
    try:
        return (type(query) is not _Tensor or query.requires_grad
                or (key is not None and key.requires_grad) or _is_compiling()
                or query.is_meta)
    except AttributeError:  # key is no tensor at all: the direct path names it
        return False


def rope(call: RopeCall, query, key, positions=None, indptr=None, offsets=None, cache=None,
         cos=None, sin=None):
    """Apply RoPE as `call` says (see ``launch.run_rope`` for the return values)."""
    fw = _BY_TYPE.get(type(query)) or framework_of(query, "query")
    if fw is _torch_fw:
        # _through_torch's test, inline: this is every eager torch call's path
        try:
            through = _torch_ops is not None and (
                type(query) is not _Tensor or query.requires_grad
                or (key is not None and key.requires_grad) or _is_compiling() or query.is_meta)
        except AttributeError:  # key is no tensor at all: the direct path names it
            through = False
        if through:
            return _torch_ops.rope(call, query, key, positions, indptr, offsets, cache, cos, sin)
    elif fw.name == "torch":
        _bind_torch(fw)
        return rope(call, query, key, positions, indptr, offsets, cache, cos, sin)
    return launch.run_rope(call, query, key, positions, indptr, offsets, cache, cos, sin, None, fw)


def positions_from_offsets(indptr, offsets, nnz):
    fw = framework_of(indptr, "indptr")
    if fw is not _torch_fw and fw.name == "torch":
        _bind_torch(fw)
    if (fw is _torch_fw and _torch_ops is not None
            and (_is_compiling() or type(indptr) is not _Tensor or indptr.is_meta)):
        return _torch_ops.positions_from_offsets(indptr, offsets, nnz)
    return launch.run_positions(indptr, offsets, nnz)


def rope_fused(call: FusedRopeCall, arrays: tuple):
    """A fused RoPE call (see ``launch_fused.run_fused`` for the arrays and return values)."""
    first = arrays[0]
    fw = _BY_TYPE.get(type(first)) or framework_of(first, arg_name(call, "q_rope"))
    if fw is not _torch_fw and fw.name == "torch":
        _bind_torch(fw)
    if fw is _torch_fw and _fused_ops is not None and _through_torch(first, None):
        return _fused_ops.rope_fused(call, arrays)
    return launch_fused.run_fused(call, arrays, fw=fw)


def qk_norm_rope(call: QKNormRopeCall, arrays: tuple) -> None:
    qkv = arrays[0]
    fw = _BY_TYPE.get(type(qkv)) or framework_of(qkv, "qkv")
    if fw is not _torch_fw and fw.name == "torch":
        _bind_torch(fw)
    if fw is _torch_fw and _fused_ops is not None and _through_torch(qkv, None):
        _fused_ops.qk_norm_rope(call, arrays)
    else:
        launch_fused.run_fused(call, arrays, fw=fw)
