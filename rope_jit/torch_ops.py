"""torch.library custom ops behind rope_jit's public entry points: torch.compile and autograd.

Imported (and the ops registered) by ``rope_jit.route`` the first time rope_jit meets a
torch tensor; never imported without torch. Three ops in the ``rope_jit`` namespace:

* ``rope_jit::rope``   out of place: returns ``(q_out, k_out)`` (k_out is an empty tensor
  when there is no key: a custom op cannot return None); differentiable w.r.t. query and
  key, the backward being the same op with the call transposed (``RopeCall.transpose``:
  ``inverse`` flipped, as the rotation by the negative angle is the transpose of the
  rotation; a call that writes pairs in the other order reads them back in that order).
  The out-of-place kernel copies the pass-through part of a partial rotary head, so its
  gradient passes through unchanged. Positions, caches and per-token cos/sin get no
  gradient.
* ``rope_jit::rope_``  in place: mutates query and key (declared in the schema, so
  functionalization and CUDA graphs see the writes); not differentiable.
* ``rope_jit::positions_from_offsets``: positions of a ragged batch (no gradient).

The arrays are op arguments; the rest of the call (a ``RopeCall``) travels as the op
arguments ``rope_jit.call.OP_FIELDS`` declares (``to_op_args`` / ``from_op_args``), so the
schema, the packing and the unpacking cannot disagree.

The real implementations call ``launch.run_rope``; on CPU tensors they raise the same
TypeError as every entry point (``query: expected a CUDA device array ... host memory``).
"""

import torch

from . import launch
from .arrays import ArrayDesc, framework_of
from .call import OP_FIELDS, OP_SCHEMA_ARGS, RopeCall, check_int, from_op_args, to_op_args
from .plan import RopeArrays, plan_positions, plan_rope

NAMESPACE = "rope_jit"
_ARRAYS = ("Tensor? positions, Tensor? indptr, Tensor? offsets, Tensor? cos_sin_cache, "
           "Tensor? cos, Tensor? sin")
_NO_GRADS = (None,) * (6 + len(OP_FIELDS))  # positions, indptr, offsets, cache, cos, sin, the call


def tensor_arg(x, name):
    """A torch tensor for an op argument. Arrays of other frameworks mixed into a torch call
    are wrapped without a copy (DLPack, __cuda_array_interface__); NumPy arrays become CPU
    tensors, which the real implementation refuses like every host array."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    fw = framework_of(x, name)  # TypeError naming the argument for a non-array
    try:
        if fw.name == "numpy":
            return torch.from_numpy(x)
        if hasattr(x, "__dlpack__"):
            return torch.from_dlpack(x)
        return torch.as_tensor(x, device="cuda")
    except (TypeError, RuntimeError, ValueError) as e:
        raise TypeError(f"{name}: cannot be passed to torch as a tensor ({e})") from None


def rope(call: RopeCall, query, key, positions, indptr, offsets, cache, cos=None, sin=None):
    """route.rope for torch calls torch must see: the same call, through the ops."""
    args = (tensor_arg(positions, "positions"), tensor_arg(indptr, "indptr"),
            tensor_arg(offsets, "offsets"), tensor_arg(cache, "cos_sin_cache"),
            tensor_arg(cos, "cos"), tensor_arg(sin, "sin"), *to_op_args(call))
    if call.inplace:
        if torch.is_grad_enabled() and (query.requires_grad
                                        or (key is not None and key.requires_grad)):
            name = "query" if query.requires_grad else "key"
            raise RuntimeError(
                f"{name}: requires grad, and the in-place RoPE functions overwrite their inputs, "
                "so they have no backward. Use the out-of-place function "
                "(apply_rope_with_cos_sin_cache, apply_rope, apply_rotary_pos_emb, ...), which "
                "returns rotated tensors and is differentiable w.r.t. query and key, or call "
                "under torch.no_grad()")
        torch.ops.rope_jit.rope_(query, key, *args)
        return None
    q_out, k_out = torch.ops.rope_jit.rope(query, key, *args)
    return q_out, (k_out if key is not None else None)


def positions_from_offsets(indptr, offsets, nnz):
    return torch.ops.rope_jit.positions_from_offsets(
        indptr, tensor_arg(offsets, "offsets"), None if nnz is None else check_int(nnz, "nnz"))


# ------------------------------------------------------------------ trace-time validation

def _fake_desc(t):
    """ArrayDesc of a fake/meta tensor for validation, or None when a size or stride is
    symbolic (checking it would add guards; the real implementation validates anyway).
    Pointer 0 (alignment is a run-time matter); device: the CUDA index, 0 for any other
    device, so a trace on CPU tensors checks shapes without tripping on host memory."""
    shape, strides = tuple(t.shape), tuple(t.stride())
    if not all(type(v) is int for v in shape + strides):
        return None
    dev = t.device
    index = (dev.index or 0) if dev.type == "cuda" else 0
    return ArrayDesc(0, shape, strides, str(t.dtype).replace("torch.", ""), index)


SYMBOLIC = object()


def fake_descs(*tensors):
    out = []
    for t in tensors:
        d = None if t is None else _fake_desc(t)
        if t is not None and d is None:
            return SYMBOLIC
        out.append(d)
    return out


def _check_fake(inplace, query, key, positions, indptr, offsets, cos_sin_cache, cos, sin,
                call_args) -> None:
    """At trace time, the errors the real call would raise (named arguments, before the
    graph runs). Skipped for symbolic shapes."""
    descs = fake_descs(query, key, positions, indptr, offsets, cos_sin_cache, cos, sin)
    if descs is not SYMBOLIC:
        plan_rope(from_op_args(inplace, call_args), RopeArrays(*descs))


# ------------------------------------------------------------------ rope_jit::rope (out of place)

@torch.library.custom_op(f"{NAMESPACE}::rope", mutates_args=(),
                         schema=f"(Tensor query, Tensor? key, {_ARRAYS}, {OP_SCHEMA_ARGS}) "
                                "-> (Tensor, Tensor)")
def _rope_op(query, key, positions, indptr, offsets, cos_sin_cache, cos, sin, *call_args):
    q_out, k_out = launch.run_rope(from_op_args(False, call_args), query, key, positions,
                                   indptr, offsets, cos_sin_cache, cos, sin)
    return q_out, (k_out if key is not None else query.new_empty(0))


@_rope_op.register_fake
def _rope_fake(query, key, positions, indptr, offsets, cos_sin_cache, cos, sin, *call_args):
    _check_fake(False, query, key, positions, indptr, offsets, cos_sin_cache, cos, sin,
                call_args)
    # the real outputs are new contiguous tensors of the inputs' shapes and dtype
    return query.new_empty(query.shape), (key.new_empty(key.shape) if key is not None
                                          else query.new_empty(0))


def _setup_context(ctx, inputs, output):
    query, key, positions, indptr, offsets, cos_sin_cache, cos, sin, *call_args = inputs
    ctx.has_key = key is not None
    ctx.call = from_op_args(False, call_args)
    ctx.save_for_backward(positions, indptr, offsets, cos_sin_cache, cos, sin)


def _grad_input(g):
    # The kernels need a contiguous last dim; a gradient may arrive expanded (stride 0).
    return g if g.stride(-1) == 1 else g.contiguous()


def _backward(ctx, grad_q, grad_k):
    """d(rope(x, a))/dx applied to g is rope(g, -a): the same op (the same specialization
    family, out of place) with the call transposed (RopeCall.transpose: `inverse` flipped,
    pair orders swapped; the positions were checked by the forward). Differentiable
    itself, so double backward works. Positions, the cache and cos/sin get no gradient."""
    positions, indptr, offsets, cos_sin_cache, cos, sin = ctx.saved_tensors
    call = ctx.call.transpose()
    gk = _grad_input(grad_k) if ctx.has_key else None
    dq, dk = torch.ops.rope_jit.rope(_grad_input(grad_q), gk, positions, indptr, offsets,
                                     cos_sin_cache, cos, sin, *to_op_args(call))
    return (dq, dk if ctx.has_key else None) + _NO_GRADS


_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ rope_jit::rope_ (in place)

@torch.library.custom_op(f"{NAMESPACE}::rope_", mutates_args=("query", "key"),
                         schema=f"(Tensor(a!) query, Tensor(b!)? key, {_ARRAYS}, "
                                f"{OP_SCHEMA_ARGS}) -> ()")
def _rope_inplace_op(query, key, positions, indptr, offsets, cos_sin_cache, cos, sin,
                     *call_args):
    launch.run_rope(from_op_args(True, call_args), query, key, positions, indptr, offsets,
                    cos_sin_cache, cos, sin)


@_rope_inplace_op.register_fake
def _rope_inplace_fake(query, key, positions, indptr, offsets, cos_sin_cache, cos, sin,
                       *call_args):
    _check_fake(True, query, key, positions, indptr, offsets, cos_sin_cache, cos, sin, call_args)


# ------------------------------------------------------------------ positions_from_offsets

@torch.library.custom_op(f"{NAMESPACE}::positions_from_offsets", mutates_args=(),
                         schema="(Tensor indptr, Tensor offsets, SymInt? nnz) -> Tensor")
def _positions_op(indptr, offsets, nnz):
    return launch.run_positions(indptr, offsets, nnz)


@_positions_op.register_fake
def _positions_fake(indptr, offsets, nnz):
    descs = fake_descs(indptr, offsets)
    if descs is not SYMBOLIC:
        plan_positions(*descs, 0 if nnz is None or not isinstance(nnz, int) else nnz)
    if nnz is None:
        # indptr[-1] tokens: known only when the graph runs (an unbacked size)
        nnz = torch.library.get_ctx().new_dynamic_size()
    return indptr.new_empty((nnz,))
