"""torch.library custom ops behind rope_jit's public entry points: torch.compile and autograd.

Imported (and the ops registered) the first time rope_jit meets a torch tensor; never
imported without torch. Three ops in the ``rope_jit`` namespace mirror ``launch.run_rope``
and ``launch.run_positions`` one to one, so there is one code path, not two:

* ``rope_jit::rope``   out of place: returns ``(q_out, k_out)`` (k_out is an empty tensor
  when there is no key: a custom op cannot return None); differentiable w.r.t. query and
  key, the backward being the same op with ``inverse`` flipped (the rotation by the
  negative angle is the transpose of the rotation, and the out-of-place kernel copies the
  pass-through part of a partial rotary head, so its gradient passes through unchanged).
* ``rope_jit::rope_``  in place: mutates query and key (declared in the schema, so
  functionalization and CUDA graphs see the writes); not differentiable.
* ``rope_jit::positions_from_offsets``: positions of a ragged batch (no gradient).

Op arguments are tensors, numbers, bools, strings and lists only, so a call's Python-level
parameters are resolved before the op: the on-the-fly tuple ``(rotary_dim, theta, scale,
variant)`` becomes ``rope_theta``, ``rope_scale``, ``variant`` (``"none"``, ``"llama3"``,
``"yarn"``) and ``variant_params`` (three floats); a HuggingFace ``rope_scaling`` dict has
already been resolved to those by ``api._on_the_fly``; the mRoPE section becomes an int list.
With a cos/sin cache, ``cos_sin_cache`` is given and the frequency arguments are unused.

Eager calls on plain CUDA tensors without grad never come here (``launch.run_rope`` keeps
its direct path); the ops serve torch.compile (Dynamo records them as graph nodes, their
fake implementations give the output metadata), autograd, tensor subclasses (FakeTensor,
FunctionalTensor) and meta tensors. The real implementations call ``run_rope`` with
``_route=False``; on CPU tensors they raise the same TypeError as every entry point
(``query: expected a CUDA device array ... host memory``).
"""

import torch

from . import launch
from .arrays import ArrayDesc
from .plan import _int, plan_positions, plan_rope

NAMESPACE = "rope_jit"

# Shared by the in-place and out-of-place schemas (after query and key).
_ARGS = ("Tensor? positions, Tensor? indptr, Tensor? offsets, Tensor? cos_sin_cache, "
         "int? head_size, int? rotary_dim, bool is_neox, float rope_theta, float rope_scale, "
         "str variant, float[] variant_params, int[]? mrope_section, bool mrope_interleaved, "
         "bool inverse, bool check_positions")
_N_ARGS = 15  # arguments after query and key (the backward returns None for each)


# ------------------------------------------------------------------ op arguments <-> run_rope

def _run_kwargs(positions, indptr, offsets, cos_sin_cache, head_size, rotary_dim, is_neox,
                rope_theta, rope_scale, variant, variant_params, mrope_section,
                mrope_interleaved, inverse, check_positions) -> dict:
    """The op's arguments as launch.run_rope keywords (the inverse of `rope` below)."""
    if cos_sin_cache is None:
        var = None if variant == "none" else (variant, *variant_params)
        on_the_fly = (rotary_dim, rope_theta, rope_scale, var)
    else:
        on_the_fly = None
    mrope = (tuple(mrope_section), mrope_interleaved) if mrope_section is not None else None
    return dict(head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox, positions=positions,
                indptr=indptr, offsets=offsets, cache=cos_sin_cache, on_the_fly=on_the_fly,
                mrope=mrope, inverse=inverse, check_positions=check_positions)


def _opt_int(v, name):
    return None if v is None else _int(v, name)


def _tensor(x, name):
    """A torch tensor for an op argument. Arrays of other frameworks mixed into a torch call
    are wrapped without a copy (DLPack, __cuda_array_interface__); NumPy arrays become CPU
    tensors, which the real implementation refuses like every host array."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    from .arrays import framework_of

    fw = framework_of(x, name)  # TypeError naming the argument for a non-array
    try:
        if fw.name == "numpy":
            return torch.from_numpy(x)
        if hasattr(x, "__dlpack__"):
            return torch.from_dlpack(x)
        return torch.as_tensor(x, device="cuda")
    except (TypeError, RuntimeError, ValueError) as e:
        raise TypeError(f"{name}: cannot be passed to torch as a tensor ({e})") from None


def rope(query, key, *, head_size, rotary_dim, is_neox, inplace, positions, indptr, offsets,
         cache, on_the_fly, mrope, inverse, check_positions):
    """launch.run_rope for torch calls torch must see: the same arguments, through the ops."""
    if on_the_fly is None:
        theta, scale, variant, params = 10000.0, 1.0, "none", []
    else:
        rotary_dim, theta, scale, var = on_the_fly
        # the direct path's ValueErrors (rope_theta, rope_scale, Llama 3 / YaRN numbers),
        # before float() could turn a bad value into a valid-looking one
        launch._check_freq(theta, scale, var)
        variant, params = ("none", []) if var is None else (var[0], [float(v) for v in var[1:]])
    sec = None if mrope is None else [_int(v, "mrope_section") for v in mrope[0]]
    args = (_tensor(positions, "positions"), _tensor(indptr, "indptr"),
            _tensor(offsets, "offsets"), _tensor(cache, "cos_sin_cache"),
            _opt_int(head_size, "head_size"), _opt_int(rotary_dim, "rotary_dim"), bool(is_neox),
            float(theta), float(scale), variant, params, sec, bool(mrope and mrope[1]),
            bool(inverse), bool(check_positions))
    if inplace:
        if torch.is_grad_enabled() and (query.requires_grad
                                        or (key is not None and key.requires_grad)):
            name = "query" if query.requires_grad else "key"
            raise RuntimeError(
                f"{name}: requires grad, and the in-place RoPE functions overwrite their inputs, "
                "so they have no backward. Use the out-of-place function "
                "(apply_rope_with_cos_sin_cache, apply_rope, apply_rope_pos_ids, ...), which "
                "returns rotated tensors and is differentiable w.r.t. query and key, or call "
                "under torch.no_grad()")
        torch.ops.rope_jit.rope_(query, key, *args)
        return None
    q_out, k_out = torch.ops.rope_jit.rope(query, key, *args)
    return q_out, (k_out if key is not None else None)


def positions_from_offsets(indptr, offsets, nnz):
    return torch.ops.rope_jit.positions_from_offsets(indptr, _tensor(offsets, "offsets"),
                                                     _opt_int(nnz, "nnz"))


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


_SYMBOLIC = object()


def _descs(*tensors):
    out = []
    for t in tensors:
        d = None if t is None else _fake_desc(t)
        if t is not None and d is None:
            return _SYMBOLIC
        out.append(d)
    return out


def _check_fake(inplace, query, key, positions, indptr, offsets, cos_sin_cache, head_size,
                rotary_dim, is_neox, rope_theta, rope_scale, variant, variant_params,
                mrope_section, mrope_interleaved, inverse, check_positions) -> None:
    """At trace time, the errors the real call would raise (named arguments, before the
    graph runs). Skipped for symbolic shapes."""
    descs = _descs(query, key, positions, indptr, offsets, cos_sin_cache)
    if descs is _SYMBOLIC:
        return
    qd, kd, pd, ind, od, cd = descs
    if cos_sin_cache is None:
        launch._check_freq(rope_theta, rope_scale,
                           None if variant == "none" else (variant, *variant_params))
    plan_rope(qd, kd, head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox,
              positions=pd, indptr=ind, offsets=od, cos_sin_cache=cd, inplace=inplace,
              scaling="linear" if variant == "none" or cos_sin_cache is not None else variant,
              mrope_section=mrope_section, mrope_interleaved=mrope_interleaved,
              inverse=inverse)


# ------------------------------------------------------------------ rope_jit::rope (out of place)

@torch.library.custom_op(f"{NAMESPACE}::rope", mutates_args=(),
                         schema=f"(Tensor query, Tensor? key, {_ARGS}) -> (Tensor, Tensor)")
def _rope_op(query, key, *args):
    q_out, k_out = launch.run_rope(query, key, inplace=False, _route=False, **_run_kwargs(*args))
    return q_out, (k_out if key is not None else query.new_empty(0))


@_rope_op.register_fake
def _rope_fake(query, key, *args):
    _check_fake(False, query, key, *args)
    # the real outputs are new contiguous tensors of the inputs' shapes and dtype
    return query.new_empty(query.shape), (key.new_empty(key.shape) if key is not None
                                          else query.new_empty(0))


def _setup_context(ctx, inputs, output):
    query, key, positions, indptr, offsets, cos_sin_cache, *static = inputs
    ctx.has_key = key is not None
    ctx.static = static
    ctx.save_for_backward(positions, indptr, offsets, cos_sin_cache)


def _grad_input(g):
    # The kernels need a contiguous last dim; a gradient may arrive expanded (stride 0).
    return g if g.stride(-1) == 1 else g.contiguous()


def _backward(ctx, grad_q, grad_k):
    """d(rope(x, a))/dx applied to g is rope(g, -a): the same op (the same specialization
    family, out of place) with `inverse` flipped. Differentiable itself, so double
    backward works. Positions and the cache get no gradient."""
    positions, indptr, offsets, cos_sin_cache = ctx.saved_tensors
    static = list(ctx.static)
    static[-2] = not static[-2]   # inverse
    static[-1] = False            # check_positions: the forward checked them
    gk = _grad_input(grad_k) if ctx.has_key else None
    dq, dk = torch.ops.rope_jit.rope(_grad_input(grad_q), gk, positions, indptr, offsets,
                                     cos_sin_cache, *static)
    return (dq, dk if ctx.has_key else None) + (None,) * _N_ARGS


_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ rope_jit::rope_ (in place)

@torch.library.custom_op(f"{NAMESPACE}::rope_", mutates_args=("query", "key"),
                         schema=f"(Tensor(a!) query, Tensor(b!)? key, {_ARGS}) -> ()")
def _rope_inplace_op(query, key, *args):
    launch.run_rope(query, key, inplace=True, _route=False, **_run_kwargs(*args))


@_rope_inplace_op.register_fake
def _rope_inplace_fake(query, key, *args):
    _check_fake(True, query, key, *args)


# ------------------------------------------------------------------ positions_from_offsets

@torch.library.custom_op(f"{NAMESPACE}::positions_from_offsets", mutates_args=(),
                         schema="(Tensor indptr, Tensor offsets, SymInt? nnz) -> Tensor")
def _positions_op(indptr, offsets, nnz):
    return launch.run_positions(indptr, offsets, nnz, _route=False)


@_positions_op.register_fake
def _positions_fake(indptr, offsets, nnz):
    descs = _descs(indptr, offsets)
    if descs is not _SYMBOLIC:
        plan_positions(*descs, 0 if nnz is None or not isinstance(nnz, int) else nnz)
    if nnz is None:
        # indptr[-1] tokens: known only when the graph runs (an unbacked size)
        nnz = torch.library.get_ctx().new_dynamic_size()
    return indptr.new_empty((nnz,))
