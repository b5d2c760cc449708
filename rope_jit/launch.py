"""The call path: fingerprint the arguments, reuse a cached plan, launch on the caller's stream.

A warm call costs: one fingerprint per array (pointer, shape, strides, dtype, device),
one dict look-up, packing the kernel-argument struct, and one cuLaunchKernel. Everything
that depends only on shapes, strides, dtypes, alignment and devices (validation, planning,
the compiled function) is computed once per distinct fingerprint by ``_prepare``.

The kernel argument is one struct passed by value; its bytes are packed into a per-thread
buffer (cuLaunchKernel copies them before it returns, and the GIL may be released inside
it, so buffers are never shared between threads). Nothing is allocated on the device for
an in-place call, so it can be captured in a CUDA graph once its kernel is loaded.

Torch tensors take that direct path too, unless the call must be visible to torch: while
torch.compile traces it, when q or k requires grad, or for tensor subclasses (fake,
functional tensors) and meta tensors. Those calls go through the torch.library custom ops
of ``rope_jit.torch_ops`` (graph nodes, fake implementations, autograd), whose real
implementations come back here with ``_route=False``. The test that decides costs about
0.2 us of the warm path on the H100 host (README "Frameworks" has the measurements).
"""

from __future__ import annotations

import ctypes
import math
import struct
import threading
from dataclasses import dataclass

from . import jit
from ._cuda import (current_device, cupy_module, device_count, driver_module, external_stream,
                    num_sms)
from .arrays import _BY_TYPE, HOST, Framework, describe, framework_of
from .plan import plan_positions, plan_rope
from .specs import POSITIONS_PARAMS, ROPE_FREQ, ROPE_PARAMS, ROPE_POINTERS, PositionsSpec

_ARG_BYTES = 1024
_tls = threading.local()


def _arg_buffer():
    """(struct buffer, address of the one-element void* array that points at it)."""
    b = getattr(_tls, "buf", None)
    if b is None:
        buf = ctypes.create_string_buffer(_ARG_BYTES)
        argv = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        b = _tls.buf = (buf, ctypes.addressof(argv), argv)
    return b


def launch_kernel(func: int, grid, block, smem: int, stream: int, packer, values) -> None:
    buf, argv, _keep = _arg_buffer()
    packer.pack_into(buf, 0, *values)
    driver_module().launchKernel(func, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                 smem, stream, argv, 0)


# The RoPE struct is pointers + frequency values (change per call) followed by the static
# part (fixed per plan). Each thread keeps, per plan, a buffer whose static bytes are packed
# once; a warm call packs only the first 11 fields.
_DYNAMIC = struct.Struct("<" + "q" * len(ROPE_POINTERS) + "d" * len(ROPE_FREQ))


def _plan_buffer(prep) -> tuple:
    bufs = getattr(_tls, "plans", None)
    if bufs is None:
        bufs = _tls.plans = {}
    b = bufs.get(prep)
    if b is None:
        buf = ctypes.create_string_buffer(ROPE_PARAMS.size)
        ROPE_PARAMS.packer.pack_into(buf, 0, *((0,) * len(ROPE_POINTERS)),
                                     *((0.0,) * len(ROPE_FREQ)), *prep.static)
        argv = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        b = bufs[prep] = (buf, ctypes.addressof(argv), argv)
    return b


@dataclass(frozen=True, eq=False)  # hashed by identity: keys the per-thread arg buffers
class _Prepared:
    func: int              # CUfunction, 0 when there is nothing to launch
    grid: tuple
    block: tuple
    smem: int
    static: tuple
    device: int
    q_out_shape: tuple
    k_out_shape: tuple | None
    dtype: str


_prepared: dict = {}
_single_device = False  # set once a GPU is seen and it is the only one: no device switch check

# Bound by bind_torch() when arrays.py first meets a torch tensor (rope_jit never imports
# torch itself): the torch Framework, torch.Tensor, torch.compiler.is_dynamo_compiling and
# the rope_jit.torch_ops module. Module globals, so the warm path's routing test is a few
# global reads and attribute reads, not a method call.
_torch_fw = None
_Tensor = None
_is_compiling = None
_torch_ops = None


def bind_torch(fw) -> None:
    """Called once with the TorchFramework: registers rope_jit's torch.library ops."""
    global _torch_fw, _Tensor, _is_compiling, _torch_ops
    import torch

    try:
        from . import torch_ops
    except Exception as e:  # a torch without torch.library.custom_op(schema=) (< 2.4)
        import warnings

        warnings.warn(f"rope_jit: torch.compile and autograd support unavailable with torch "
                      f"{torch.__version__} ({type(e).__name__}: {e}); eager calls work",
                      stacklevel=2)
        return

    # is_dynamo_compiling is `return False`, which Dynamo folds to True while tracing: a
    # third of the cost of is_compiling (measured on the H100 host: 36 vs 85 ns a call).
    # Non-strict torch.export hands us FakeTensors, which the type test routes anyway.
    _is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
    _Tensor, _torch_ops = torch.Tensor, torch_ops
    _torch_fw = fw


def _freq_values(on_the_fly) -> tuple:
    """Kernel values (freq_exponent, inv_scale, ramp_a, ramp_b, attention_factor) of the
    on-the-fly parameters (see run_rope); kernels/rope.cu fly_cos_sin says how they are used."""
    if on_the_fly is None:
        return (0.0, 1.0, 0.0, 0.0, 1.0)
    rot, theta, scale, variant = on_the_fly
    exponent = -2.0 * math.log2(theta) / rot
    if variant is None:
        return (exponent, 1.0 / scale, 0.0, 0.0, 1.0)
    if variant[0] == "llama3":
        # w = clamp((old_ctx / wavelen - low) / (high - low)), wavelen = 2 pi / inv_freq
        _, low, high, old_ctx = variant
        ramp_a = old_ctx / (2 * math.pi * high - 2 * math.pi * low)
        ramp_b = -1.0 / (high / low - 1.0)
        return (exponent, 1.0 / scale, ramp_a, ramp_b, 1.0)
    # YaRN: weight of the unscaled frequency w = 1 - clamp((j - low) / (high - low)),
    # transformers' linear ramp, which widens an empty ramp (low == high) by 0.001.
    _, low, high, attention_factor = variant
    if high == low:
        high = low + 0.001
    return (exponent, 1.0 / scale, -1.0 / (high - low), 1.0 + low / (high - low),
            attention_factor)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_freq(theta, scale, variant) -> None:
    if not (_finite(theta) and theta > 0) or theta == 1:
        raise ValueError(f"rope_theta: expected a finite number > 0 and != 1, got {theta!r}")
    if not (_finite(scale) and scale > 0):
        raise ValueError(f"rope_scale: expected a finite number > 0, got {scale!r}")
    if variant is None:
        return
    if variant[0] == "llama3":
        _, low, high, old_ctx = variant
        if not (_finite(low) and _finite(high) and low > 0 and high > low):
            raise ValueError(f"high_freq_factor must exceed low_freq_factor > 0, got "
                             f"low_freq_factor={low!r}, high_freq_factor={high!r}")
        if not (_finite(old_ctx) and old_ctx > 0):
            raise ValueError(f"old_context_len: expected a positive number, got {old_ctx!r}")
    elif variant[0] == "yarn":
        _, low, high, attention_factor = variant
        if not (_finite(low) and _finite(high) and high >= low):
            raise ValueError(f"yarn ramp: expected finite low <= high frequency indices, got "
                             f"low={low!r}, high={high!r}")
        if not (_finite(attention_factor) and attention_factor > 0):
            raise ValueError(f"attention_factor: expected a finite number > 0, got "
                             f"{attention_factor!r}")
    else:
        raise ValueError(f"on-the-fly scaling: expected llama3 or yarn, got {variant[0]!r}")


_freq_cache: dict = {}


def _freq(on_the_fly) -> tuple:
    v = _freq_cache.get(on_the_fly)
    if v is None:
        if on_the_fly is not None:
            _check_freq(*on_the_fly[1:])
        v = _freq_cache[on_the_fly] = _freq_values(on_the_fly)
    return v


def _prepare(fw: Framework, query, key, positions, indptr, offsets, cache, head_size,
             rotary_dim, is_neox, inplace, scaling, mrope, inverse) -> _Prepared:
    qd = fw.describe(query)
    kd = describe(key, "key") if key is not None else None
    pd = describe(positions, "positions") if positions is not None else None
    ind = describe(indptr, "indptr") if indptr is not None else None
    od = describe(offsets, "offsets") if offsets is not None else None
    cd = describe(cache, "cos_sin_cache") if cache is not None else None
    sms = num_sms(qd.device) if qd.device >= 0 else 132
    plan = plan_rope(qd, kd, head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox,
                     positions=pd, indptr=ind, offsets=od, cos_sin_cache=cd, inplace=inplace,
                     scaling=scaling, mrope_section=mrope[0] if mrope else None,
                     mrope_interleaved=bool(mrope and mrope[1]), inverse=inverse, num_sms=sms)
    if plan.spec is None:
        return _Prepared(0, (), (), 0, plan.static, plan.device, plan.q_out_shape,
                         plan.k_out_shape, qd.dtype)
    func = jit.get_function(plan.spec, plan.device)
    return _Prepared(func, plan.launch.grid, plan.launch.block, plan.launch.smem, plan.static,
                     plan.device,
                     plan.q_out_shape, plan.k_out_shape, qd.dtype)


_NONE = (None, 0)  # fingerprint and pointer of an absent argument


def _fp(obj, name: str):
    """fingerprint of an optional argument of any framework."""
    if obj is None:
        return _NONE
    return framework_of(obj, name).fingerprint(obj)


def run_rope(query, key, *, head_size, rotary_dim, is_neox, inplace, positions=None,
             indptr=None, offsets=None, cache=None, on_the_fly=None, mrope=None,
             inverse=False, check_positions=False, _route=True):
    """Apply RoPE. In place: returns None. Out of place: returns (q_out, k_out) of the
    caller's array type (k_out None when key is None).

    on_the_fly: None with a cache, else (rotary_dim, rope_theta, rope_scale, variant) where
    rope_scale divides the frequencies and variant is None (linear scaling),
    ("llama3", low_freq_factor, high_freq_factor, old_context_len) or
    ("yarn", low, high, attention_factor) with YaRN's ramp bounds as frequency indices.
    mrope: None, or ((t, h, w) section, interleaved) with positions [3, num_tokens].
    inverse: rotate by the negative angle (the backward pass: the transpose of the rotation).
    _route: False only from the torch custom ops' implementations (no second routing).
    """
    fw = _BY_TYPE.get(type(query)) or framework_of(query, "query")  # inline hit: ~40 ns less
    # Torch calls that torch must see go through the custom ops: under torch.compile (the
    # op becomes a graph node), when q or k requires grad (autograd; torch_ops decides
    # whether grad mode is on), for tensor subclasses (FakeTensor, FunctionalTensor,
    # Parameter). Ordered cheapest first; a plain eager call pays all four tests.
    try:  # free unless raised (Python >= 3.11)
        route = fw is _torch_fw and (type(query) is not _Tensor or query.requires_grad
                                     or (key is not None and key.requires_grad)
                                     or _is_compiling()) and _route
    except AttributeError:  # key is no tensor at all: the direct path names it
        route = False
    if route:
        return _torch_ops.rope(query, key, head_size=head_size, rotary_dim=rotary_dim,
                               is_neox=is_neox, inplace=inplace, positions=positions,
                               indptr=indptr, offsets=offsets, cache=cache,
                               on_the_fly=on_the_fly, mrope=mrope, inverse=inverse,
                               check_positions=check_positions)
    if not fw.native:
        return _run_foreign(fw, query, key, head_size=head_size, rotary_dim=rotary_dim,
                            is_neox=is_neox, inplace=inplace, positions=positions, indptr=indptr,
                            offsets=offsets, cache=cache, on_the_fly=on_the_fly, mrope=mrope,
                            inverse=inverse, check_positions=check_positions)
    # _freq validates rope_theta/rope_scale (on a miss) before anything is compiled
    freq = _freq_cache.get(on_the_fly) or _freq(on_the_fly)
    fp, qt = fw.fingerprint, type(query)
    fq, q_ptr = fp(query)
    # Absent arguments are tested inline and arguments of query's type go straight to its
    # framework: each _fp / framework_of call avoided saves ~50 ns of the warm path.
    fk, k_ptr = _NONE if key is None else fp(key) if type(key) is qt else _fp(key, "key")
    fpos, pos_ptr = (_NONE if positions is None else fp(positions) if type(positions) is qt
                     else _fp(positions, "positions"))
    find, ind_ptr = (_NONE if indptr is None else fp(indptr) if type(indptr) is qt
                     else _fp(indptr, "indptr"))
    foff, off_ptr = (_NONE if offsets is None else fp(offsets) if type(offsets) is qt
                     else _fp(offsets, "offsets"))
    fc, c_ptr = (_NONE if cache is None else fp(cache) if type(cache) is qt
                 else _fp(cache, "cos_sin_cache"))
    scaling = "linear" if on_the_fly is None or on_the_fly[3] is None else on_the_fly[3][0]
    sig = (fq, fk, fpos, find, foff, fc, head_size, rotary_dim, is_neox, inplace, scaling, mrope,
           inverse)
    prep = _prepared.get(sig)
    if prep is None:
        if fw is _torch_fw and _route and query.is_meta:
            # meta tensors: the op's meta kernel gives the output shapes (checked here, on
            # a plan miss, so the warm path pays nothing for it)
            return _torch_ops.rope(query, key, head_size=head_size, rotary_dim=rotary_dim,
                                   is_neox=is_neox, inplace=inplace, positions=positions,
                                   indptr=indptr, offsets=offsets, cache=cache,
                                   on_the_fly=on_the_fly, mrope=mrope, inverse=inverse,
                                   check_positions=check_positions)
        prep = _prepare(fw, query, key, positions, indptr, offsets, cache, head_size,
                        rotary_dim, is_neox, inplace, scaling, mrope, inverse)
        _prepared[sig] = prep
        global _single_device
        _single_device = device_count() == 1
    if check_positions and cache is not None and prep.func:
        _check_positions_in_cache(positions, cache)
    if inplace:
        qo_ptr, ko_ptr, outs = q_ptr, k_ptr, None
    else:
        q_out = fw.empty(prep.q_out_shape, prep.dtype, prep.device, query)
        k_out = fw.empty(prep.k_out_shape, prep.dtype, prep.device, key) if key is not None else None
        qo_ptr = fw.fingerprint(q_out)[1]
        ko_ptr = fw.fingerprint(k_out)[1] if k_out is not None else 0
        outs = (q_out, k_out)
    if prep.func:
        buf, argv, _keep = _plan_buffer(prep)
        _DYNAMIC.pack_into(buf, 0, q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr or ind_ptr, off_ptr, c_ptr,
                           *freq)
        dev = prep.device
        if _single_device or dev == current_device():
            _launch_prepared(prep, fw.stream(dev), argv)
        else:
            with cupy_module().cuda.Device(dev):
                _launch_prepared(prep, fw.stream(dev), argv)
    return outs


_cu_launch = None  # cupy_backends' cuLaunchKernel, looked up once


def _launch_prepared(prep, stream: int, argv: int) -> None:
    global _cu_launch
    if _cu_launch is None:
        _cu_launch = driver_module().launchKernel
    g, b = prep.grid, prep.block
    _cu_launch(prep.func, g[0], g[1], g[2], b[0], b[1], b[2], prep.smem, stream, argv, 0)


def _run_foreign(fw: Framework, query, key, *, inplace, **kw):
    """Arrays that arrive through __cuda_array_interface__ or __dlpack__: read them as CuPy
    views, run on CuPy's current stream of their device, and hand results back in the
    caller's type.

    Ordering with the producer and the consumer, without a host synchronization:
    * __dlpack__: CuPy's from_dlpack passes its current stream to the producer's
      ``__dlpack__(stream=...)``; JAX (and torch, CuPy) then make that stream wait for the
      array's pending writes. Results go back through ``jax.numpy.from_dlpack``, which
      passes JAX's stream for external ready events to CuPy's ``__dlpack__``, and CuPy makes
      it wait for our kernel. Both happen on the arrays' device (the views are taken inside
      ``cupy.cuda.Device(device)``), so the stream that waits is the one we launch on.
    * __cuda_array_interface__ v3 with a ``stream``: our stream waits on an event recorded
      on the producer's stream (``_cuda.wait_for_producer_stream``).
    """
    if inplace:
        for obj, name in ((query, "query"), (key, "key")):
            if obj is not None and not framework_of(obj, name).mutable(obj):
                raise TypeError(f"{name}: {type(obj).__module__}.{type(obj).__name__} arrays are "
                                "immutable; use the out-of-place function, which returns new arrays")
    names = {"cache": "cos_sin_cache"}
    arrays = [("query", query), ("key", key)] + [(n, kw.pop(n)) for n in
                                                 ("positions", "indptr", "offsets", "cache")]
    # Devices first, from metadata alone (no view is made yet): every array on one device,
    # checked before anything touches the GPU.
    device = None
    for n, obj in arrays:
        if obj is None:
            continue
        name = names.get(n, n)
        d = framework_of(obj, name).device_of(obj, name)
        if d == HOST:
            raise TypeError(f"{name}: expected a CUDA device array, got an array in host memory "
                            f"({type(obj).__module__}.{type(obj).__name__})")
        if device is None:
            device = d
        elif d != device:
            raise ValueError(f"{name} is on cuda:{d} but query is on cuda:{device}; all arrays "
                             "of one call must be on the same device")

    def view(obj, name):
        if obj is None:
            return None
        f = framework_of(obj, name)
        obj = f.prepare(obj)
        if framework_of(obj).native:
            return obj
        return _cupy_view(f.describe(obj))

    with cupy_module().cuda.Device(device):
        views = {n: view(obj, names.get(n, n)) for n, obj in arrays}
        q, k = views.pop("query"), views.pop("key")
        outs = run_rope(q, k, inplace=inplace, **views, **kw)
        if outs is None:
            return None
        return (fw.from_cupy(outs[0], query),
                fw.from_cupy(outs[1], key) if key is not None else None)


def _cupy_view(d):
    """A CuPy ndarray over the memory an ArrayDesc describes (no copy)."""
    from .arrays import numpy_dtype

    cp = cupy_module()
    dt = numpy_dtype(d.dtype)
    extent = 1 + sum((n - 1) * s for n, s in zip(d.shape, d.strides)) if d.size else 0
    mem = cp.cuda.UnownedMemory(d.ptr, extent * dt.itemsize, None, d.device)
    return cp.ndarray(d.shape, dt, cp.cuda.MemoryPointer(mem, 0),
                      tuple(s * dt.itemsize for s in d.strides))


def _check_positions_in_cache(positions, cache) -> None:
    """Checked mode: raise before launch if any position is outside [0, max_position).
    Costs a device reduction and one host synchronization."""
    d = describe(positions, "positions")
    max_pos = describe(cache, "cos_sin_cache").shape[0]
    if d.size == 0:
        return
    fw = framework_of(positions)
    cp = cupy_module()
    view = positions if fw.name == "cupy" else _cupy_view(d)
    with cp.cuda.Device(d.device), external_stream(fw.stream(d.device)):
        lo, hi = int(view.min()), int(view.max())
    if lo < 0 or hi >= max_pos:
        raise ValueError(f"positions: values must lie in [0, {max_pos}) (cos_sin_cache has "
                         f"{max_pos} rows), got min {lo}, max {hi}")


# ------------------------------------------------------------------ positions_from_offsets

def run_positions(indptr, offsets, nnz, _route=True):
    fw = framework_of(indptr, "indptr")
    if fw is _torch_fw and _route and (_is_compiling() or type(indptr) is not _Tensor
                                       or indptr.is_meta):
        return _torch_ops.positions_from_offsets(indptr, offsets, nnz)
    ind, off = fw.describe(indptr), describe(offsets, "offsets")
    plan_positions(ind, off, 0 if nnz is None else int(nnz))
    if ind.device == HOST:  # host memory of any framework: computed on the host
        import numpy as np

        from .reference import positions_from_offsets as host_positions

        out = host_positions(np.asarray(indptr), np.asarray(offsets), nnz)
        return out if fw.name == "numpy" else fw.from_host(out, None)
    if nnz is None:
        nnz = _last_entry(indptr, ind)
    index_dtype, batch = plan_positions(ind, off, int(nnz))
    out = fw.empty((int(nnz),), index_dtype, ind.device, indptr)
    if nnz == 0:
        return out
    spec = PositionsSpec(index_dtype)
    func = jit.get_function(spec, ind.device)
    out_ptr = describe(out).ptr
    ind_ptr = ind.ptr if fw.native else _cupy_view(ind).data.ptr
    off_ptr = off.ptr
    block = 256
    grid = (-(-int(nnz) // block), 1, 1)
    with cupy_module().cuda.Device(ind.device):
        launch_kernel(func, grid, (block, 1, 1), 0, fw.stream(ind.device), POSITIONS_PARAMS.packer,
                      (ind_ptr, off_ptr, out_ptr, int(nnz), batch))
    return out


def _last_entry(indptr, d) -> int:
    """indptr[-1] read back to the host (one small copy and a sync; pass nnz to avoid it)."""
    if d.shape[0] < 1:
        return 0
    cp = cupy_module()
    fw = framework_of(indptr)
    view = _cupy_view(d)
    with cp.cuda.Device(d.device), external_stream(fw.stream(d.device)):
        return int(view[-1].get())
