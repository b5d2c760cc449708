"""The call path: fingerprint the arguments, reuse a cached plan, launch on the caller's stream.

A warm call costs: one fingerprint per array (pointer, shape, strides, dtype, device),
one dict look-up, packing the kernel-argument struct, and one cuLaunchKernel. Everything
that depends only on shapes, strides, dtypes, alignment and devices (validation, planning,
the compiled function) is computed once per distinct fingerprint by ``_prepare``.

The kernel argument is one struct passed by value; its bytes are packed into a per-thread
buffer (cuLaunchKernel copies them before it returns, and the GIL may be released inside
it, so buffers are never shared between threads). Nothing is allocated on the device for
an in-place call, so it can be captured in a CUDA graph once its kernel is loaded.
"""

from __future__ import annotations

import ctypes
import math
import struct
import threading
from dataclasses import dataclass

from . import jit
from ._cuda import current_device, cupy_module, device_count, driver_module, num_sms
from .arrays import HOST, Framework, describe, framework_of
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


def _fp(obj, name: str):
    """fingerprint of an optional argument of any framework."""
    if obj is None:
        return None, 0
    return framework_of(obj, name).fingerprint(obj)


def run_rope(query, key, *, head_size, rotary_dim, is_neox, inplace, positions=None,
             indptr=None, offsets=None, cache=None, on_the_fly=None, mrope=None,
             inverse=False, check_positions=False):
    """Apply RoPE. In place: returns None. Out of place: returns (q_out, k_out) of the
    caller's array type (k_out None when key is None).

    on_the_fly: None with a cache, else (rotary_dim, rope_theta, rope_scale, variant) where
    rope_scale divides the frequencies and variant is None (linear scaling),
    ("llama3", low_freq_factor, high_freq_factor, old_context_len) or
    ("yarn", low, high, attention_factor) with YaRN's ramp bounds as frequency indices.
    mrope: None, or ((t, h, w) section, interleaved) with positions [3, num_tokens].
    inverse: rotate by the negative angle (the backward pass: the transpose of the rotation).
    """
    fw = framework_of(query, "query")
    if not fw.native:
        return _run_foreign(fw, query, key, head_size=head_size, rotary_dim=rotary_dim,
                            is_neox=is_neox, inplace=inplace, positions=positions, indptr=indptr,
                            offsets=offsets, cache=cache, on_the_fly=on_the_fly, mrope=mrope,
                            inverse=inverse, check_positions=check_positions)
    freq = _freq(on_the_fly)  # validates rope_theta/rope_scale before anything is compiled
    fq, q_ptr = fw.fingerprint(query)
    fk, k_ptr = _fp(key, "key")
    fpos, pos_ptr = _fp(positions, "positions")
    find, ind_ptr = _fp(indptr, "indptr")
    foff, off_ptr = _fp(offsets, "offsets")
    fc, c_ptr = _fp(cache, "cos_sin_cache")
    scaling = "linear" if on_the_fly is None or on_the_fly[3] is None else on_the_fly[3][0]
    sig = (fq, fk, fpos, find, foff, fc, head_size, rotary_dim, is_neox, inplace, scaling, mrope,
           inverse)
    prep = _prepared.get(sig)
    if prep is None:
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
    views, run on CuPy's current stream, and hand results back in the caller's type."""
    if inplace:
        for obj, name in ((query, "query"), (key, "key")):
            if obj is not None and not framework_of(obj, name).mutable(obj):
                raise TypeError(f"{name}: {type(obj).__module__}.{type(obj).__name__} arrays are "
                                "immutable; use the out-of-place function, which returns new arrays")

    def view(obj, name):
        if obj is None:
            return None
        f = framework_of(obj, name)
        obj = f.prepare(obj)
        if framework_of(obj).native:
            return obj
        d = f.describe(obj)
        if d.device == HOST:
            raise TypeError(f"{name}: expected a CUDA device array, got an array in host memory "
                            f"({type(obj).__module__}.{type(obj).__name__})")
        return _cupy_view(d)

    q = view(query, "query")
    k = view(key, "key")
    args = {n: view(kw.pop(n), "cos_sin_cache" if n == "cache" else n)
            for n in ("positions", "indptr", "offsets", "cache")}
    outs = run_rope(q, k, inplace=inplace, **args, **kw)
    if outs is None:
        return None
    return fw.from_cupy(outs[0], query), (fw.from_cupy(outs[1], key) if key is not None else None)


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
    with cp.cuda.Device(d.device), cp.cuda.ExternalStream(fw.stream(d.device)):
        lo, hi = int(view.min()), int(view.max())
    if lo < 0 or hi >= max_pos:
        raise ValueError(f"positions: values must lie in [0, {max_pos}) (cos_sin_cache has "
                         f"{max_pos} rows), got min {lo}, max {hi}")


# ------------------------------------------------------------------ positions_from_offsets

def run_positions(indptr, offsets, nnz):
    fw = framework_of(indptr, "indptr")
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
    with cp.cuda.Device(d.device), cp.cuda.ExternalStream(fw.stream(d.device)):
        return int(view[-1].get())
