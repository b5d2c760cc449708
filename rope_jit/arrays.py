"""The one place where arrays of any framework become ArrayDescs, and results go back.

Everything past this module (validation, planning, launching) sees only ``ArrayDesc``:
a pointer, a shape, strides in elements, a dtype name and a device ordinal. Each
supported kind of array has a ``Framework`` that describes it, allocates results like
it, names the stream its work is ordered on, and says whether it may be mutated.

Native: torch tensors, CuPy arrays, NumPy arrays (host). Through protocols: any object
with ``__cuda_array_interface__`` (Numba, ...) or ``__dlpack__`` (JAX, ...), read through
CuPy; results come back as the caller's type where that type can be built from a CuPy
array, otherwise as CuPy arrays.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .dtypes import FP8_DTYPES, ITEMSIZE, dtype_name

HOST = -1  # ArrayDesc.device of host memory


@dataclass(frozen=True)
class ArrayDesc:
    """What rope_jit needs to know of an array. Strides are in elements."""

    ptr: int
    shape: tuple
    strides: tuple
    dtype: str
    device: int = 0
    readonly: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(self.dtype, 0)


def contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class Framework:
    """How rope_jit talks to one kind of array."""

    name = "?"
    native = False  # True: has a fast fingerprint() for the warm call path

    def describe(self, obj) -> ArrayDesc:
        raise NotImplementedError

    def fingerprint(self, obj):
        """(hashable summary of everything planning depends on, data pointer)."""
        d = self.describe(obj)
        return (d.shape, d.strides, d.dtype, d.device, d.ptr & 15, d.readonly), d.ptr

    def mutable(self, obj) -> bool:
        return not self.describe(obj).readonly

    def device_of(self, obj, name: str = "array") -> int:
        """The device ordinal (HOST for host memory), from metadata only where possible."""
        return self.describe(obj).device

    def stream(self, device: int) -> int:
        from ._cuda import cupy_stream

        return cupy_stream(device)

    def empty(self, shape, dtype: str, device: int, like):
        from ._cuda import cupy_empty

        return self.from_cupy(cupy_empty(shape, dtype, device), like)

    def from_cupy(self, arr, like):
        return arr

    def from_host(self, host: np.ndarray, like):
        """Copy a host array to the device and framework of `like`."""
        from ._cuda import cupy_from_host

        return self.from_cupy(cupy_from_host(host, self.describe(like).device), like)

    def prepare(self, obj):
        """The object rope_jit reads and writes (a protocol object becomes a CuPy view)."""
        return obj


# ---------------------------------------------------------------- torch

class TorchFramework(Framework):
    name = "torch"
    native = True

    def __init__(self):
        import torch

        self.torch = torch
        self._dtypes = {torch.float16: "float16", torch.bfloat16: "bfloat16",
                        torch.float32: "float32", torch.float64: "float64",
                        torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8"}
        for name in FP8_DTYPES:  # torch >= 2.1
            if hasattr(torch, name):
                self._dtypes[getattr(torch, name)] = name
        self._to_torch = {v: k for k, v in self._dtypes.items()}
        get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._raw_stream = get_stream or (lambda d: torch.cuda.current_stream(d).cuda_stream)

    def describe(self, t) -> ArrayDesc:
        dev = t.device
        if dev.type == "cuda":
            device = dev.index if dev.index is not None else 0
        elif dev.type == "cpu":
            device = HOST
        else:
            raise TypeError(f"torch tensors on device {dev} are not supported; use a CUDA tensor")
        dtype = self._dtypes.get(t.dtype) or str(t.dtype).replace("torch.", "")
        return ArrayDesc(t.data_ptr(), tuple(t.shape), tuple(t.stride()), dtype, device, False)

    def fingerprint(self, t):
        p = t.data_ptr()
        return (t.shape, t.stride(), t.dtype, t.get_device(), p & 15), p

    def mutable(self, t) -> bool:
        return True

    def stream(self, device: int) -> int:
        return self._raw_stream(device)

    def empty(self, shape, dtype, device, like):
        return self.torch.empty(shape, dtype=self._to_torch[dtype], device=like.device)

    def from_host(self, host, like):
        if host.dtype.name == "bfloat16":
            t = self.torch.from_numpy(host.view(np.int16)).view(self.torch.bfloat16)
        else:
            t = self.torch.from_numpy(np.ascontiguousarray(host))
        return t.to(like.device) if like is not None else t


# ---------------------------------------------------------------- CuPy

class CupyFramework(Framework):
    name = "cupy"
    native = True

    def describe(self, a) -> ArrayDesc:
        item = a.dtype.itemsize
        return ArrayDesc(a.data.ptr, tuple(a.shape), tuple(s // item for s in a.strides),
                         dtype_name(a.dtype), a.device.id, False)

    def fingerprint(self, a):
        p = a.data.ptr
        return (a.shape, a.strides, a.dtype, a.device.id, p & 15), p

    def mutable(self, a) -> bool:
        return True


# ---------------------------------------------------------------- NumPy (host)

class NumpyFramework(Framework):
    name = "numpy"

    def describe(self, a) -> ArrayDesc:
        item = a.dtype.itemsize
        return ArrayDesc(a.ctypes.data, tuple(a.shape), tuple(s // item for s in a.strides),
                         dtype_name(a.dtype), HOST, not a.flags.writeable)

    def from_host(self, host, like):
        return host


# ---------------------------------------------------------------- protocols

class CudaArrayInterfaceFramework(Framework):
    """Numba device arrays and anything else exposing __cuda_array_interface__."""

    name = "cuda_array_interface"

    def describe(self, obj) -> ArrayDesc:
        cai = obj.__cuda_array_interface__
        ptr, readonly = cai["data"]
        dt = np.dtype(cai["typestr"])
        shape = tuple(cai["shape"])
        strides = cai.get("strides")
        strides = (contiguous_strides(shape) if strides is None
                   else tuple(s // dt.itemsize for s in strides))
        from ._cuda import pointer_device

        return ArrayDesc(ptr, shape, strides, dtype_name(dt), pointer_device(ptr), bool(readonly))

    def prepare(self, obj):
        from ._cuda import wait_for_producer_stream

        wait_for_producer_stream(obj.__cuda_array_interface__.get("stream"),
                                 self.describe(obj).device)
        return obj

    def from_cupy(self, arr, like):
        mod = sys.modules.get("numba.cuda")
        if mod is not None and type(like).__module__.split(".")[0] in ("numba", "numba_cuda"):
            return mod.as_cuda_array(arr)  # a Numba DeviceNDArray over the CuPy memory
        return arr


class DLPackFramework(Framework):
    """JAX arrays and anything else exposing __dlpack__, read as a CuPy view."""

    name = "dlpack"

    def _view(self, obj):
        from ._cuda import cupy_module

        return cupy_module().from_dlpack(obj)

    def describe(self, obj) -> ArrayDesc:
        return _CUPY.describe(self._view(obj))

    def prepare(self, obj):
        return self._view(obj)

    def mutable(self, obj) -> bool:
        return not _is_jax(obj)

    def device_of(self, obj, name: str = "array") -> int:
        """From ``__dlpack_device__`` (no export: the view is made later, on that device)."""
        dev = getattr(obj, "__dlpack_device__", None)
        if dev is None:
            return self.describe(obj).device
        kind, index = dev()
        if kind in (_DL_CUDA, _DL_CUDA_MANAGED):
            return int(index)
        if kind in (_DL_CPU, _DL_CUDA_HOST):
            return HOST
        raise TypeError(f"{name}: expected a CUDA device array, got DLPack device type "
                        f"{int(kind)} (CUDA is {_DL_CUDA})")

    def from_cupy(self, arr, like):
        if _is_jax(like):
            import jax.numpy as jnp

            return jnp.from_dlpack(arr)
        return arr


# DLPack device types (dlpack.h DLDeviceType)
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def _is_jax(obj) -> bool:
    return type(obj).__module__.split(".")[0] in ("jax", "jaxlib")


_CUPY = CupyFramework()
_NUMPY = NumpyFramework()
_CAI = CudaArrayInterfaceFramework()
_DLPACK = DLPackFramework()
_TORCH: Framework | None = None
_BY_TYPE: dict = {}


def _resolve(obj) -> Framework:
    global _TORCH
    cls = type(obj)
    root = cls.__module__.split(".")[0]
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; never import it
    if torch is not None and isinstance(obj, torch.Tensor):  # subclasses too (Parameter, ...)
        if _TORCH is None:
            _TORCH = TorchFramework()
        return _TORCH
    if root in ("jax", "jaxlib") and any(c.__name__ == "Tracer" for c in cls.__mro__):
        raise TypeError("a JAX tracer (inside jax.jit, vmap or grad): rope_jit launches its "
                        "kernel when called, so call it on concrete jax.Array values, outside "
                        "jit")
    if root == "cupy" and cls.__name__ == "ndarray":
        return _CUPY
    if isinstance(obj, np.ndarray):
        return _NUMPY
    if root in ("jax", "jaxlib"):
        # JAX GPU arrays also expose __cuda_array_interface__; DLPack keeps them JAX on the
        # way back (results as jax.Array) and orders our stream after JAX's writes.
        return _DLPACK
    if hasattr(obj, "__cuda_array_interface__"):
        return _CAI
    if hasattr(obj, "__dlpack__"):
        return _DLPACK
    raise TypeError(f"unsupported array type {cls.__module__}.{cls.__qualname__}")


def framework_of(obj, name: str = "array") -> Framework:
    """The Framework for obj's type (a dictionary look-up once the type has been seen)."""
    fw = _BY_TYPE.get(type(obj))
    if fw is None:
        try:
            fw = _resolve(obj)
        except TypeError as e:
            raise TypeError(
                f"{name}: expected a torch tensor, CuPy array or an object with "
                f"__cuda_array_interface__ or __dlpack__; {e}") from None
        _BY_TYPE[type(obj)] = fw
    return fw


def describe(obj, name: str = "array") -> ArrayDesc:
    """Any supported array (or an ArrayDesc) -> ArrayDesc."""
    if isinstance(obj, ArrayDesc):
        return obj
    return framework_of(obj, name).describe(obj)

