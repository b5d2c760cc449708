"""CuPy, imported on first use, and the few device queries rope_jit needs.

Importing rope_jit never imports CuPy: the reference, validation, planning and cache
builders work without it. The first call that needs the GPU or NVRTC lands here, and
if CuPy is missing the error says which extra to install.
"""

from __future__ import annotations

import functools

import numpy as np

_INSTALL_HINT = (
    "rope_jit needs CuPy for this: install the extra matching your CUDA, "
    "`pip install rope_jit[cuda12]` (cupy-cuda12x) or `pip install rope_jit[cuda13]` "
    "(cupy-cuda13x)")

_cupy = None


def cupy_module():
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as e:
            raise ImportError(f"{_INSTALL_HINT} ({e})") from None
        _cupy = cupy
    return _cupy


def nvrtc_module():
    cupy_module()
    from cupy_backends.cuda.libs import nvrtc

    return nvrtc


def driver_module():
    cupy_module()
    from cupy_backends.cuda.api import driver

    return driver


def launch_packed(func: int, grid, block, smem: int, stream: int, packer, values) -> None:
    """One launch of a kernel whose argument struct is packed on the spot (cold paths: the
    RoPE warm path keeps packed structs per plan)."""
    import ctypes

    buf = ctypes.create_string_buffer(packer.size)
    packer.pack_into(buf, 0, *values)
    argv = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
    driver_module().launchKernel(func, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                 smem, stream, ctypes.addressof(argv), 0)


class PdlLaunch:
    """cuLaunchKernelEx of one kernel with the programmatic-stream-serialization attribute
    (programmatic dependent launch): the kernel may begin while the previous kernel on the
    stream finishes, and waits for it inside (griddepcontrol.wait). CuPy exposes no
    cuLaunchKernelEx, so the driver entry point is called through ctypes; the config
    struct is built once per plan and only its stream changes per call."""

    _fn = None
    _PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID

    def __init__(self, func: int, grid, block, smem: int):
        import ctypes

        cls = type(self)
        if cls._fn is None:
            cls._define_structs()
        self.func = func
        self.attr = cls._Attribute()
        self.attr.id = cls._PROGRAMMATIC_STREAM_SERIALIZATION
        self.attr.value.i = 1
        self.config = cls._Config(grid[0], grid[1], grid[2], block[0], block[1], block[2], smem,
                                  None, ctypes.pointer(self.attr), 1)
        self.config_ref = ctypes.byref(self.config)

    @classmethod
    def _define_structs(cls) -> None:
        import ctypes

        class Value(ctypes.Union):  # CUlaunchAttributeValue: 64 bytes
            _fields_ = [("pad", ctypes.c_char * 64), ("i", ctypes.c_int)]

        class Attribute(ctypes.Structure):  # CUlaunchAttribute
            _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", Value)]

        class Config(ctypes.Structure):  # CUlaunchConfig
            _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                        ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                        ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                        ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                        ("attrs", ctypes.POINTER(Attribute)), ("numAttrs", ctypes.c_uint)]

        assert ctypes.sizeof(Attribute) == 72 and ctypes.sizeof(Config) == 56
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        cls._Attribute, cls._Config, cls._fn = Attribute, Config, fn

    def __call__(self, stream: int, argv_address: int) -> None:
        self.config.hStream = stream
        rc = self._fn(self.config_ref, self.func, argv_address, None)
        if rc:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {rc}")


def current_device() -> int:
    return cupy_module().cuda.runtime.getDevice()


def device_count() -> int:
    try:
        return cupy_module().cuda.runtime.getDeviceCount()
    except Exception:
        return 0


@functools.lru_cache(maxsize=None)
def device_arch(device: int) -> str:
    """'90' for an H100."""
    return cupy_module().cuda.Device(device).compute_capability


@functools.lru_cache(maxsize=None)
def device_name(device: int) -> str:
    """'NVIDIA H200' (the driver's name of the GPU)."""
    name = cupy_module().cuda.runtime.getDeviceProperties(device)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


@functools.lru_cache(maxsize=None)
def num_sms(device: int) -> int:
    return cupy_module().cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]


def cupy_stream(device: int) -> int:
    cp = cupy_module()
    with cp.cuda.Device(device):
        return cp.cuda.get_current_stream().ptr


def pointer_device(ptr: int) -> int:
    if ptr == 0:
        return current_device()
    attrs = cupy_module().cuda.runtime.pointerGetAttributes(ptr)
    if attrs.type not in (2, 3):  # cudaMemoryTypeDevice, cudaMemoryTypeManaged
        return -1
    return attrs.device


class _StreamHandle:
    """A raw cudaStream_t seen through the CUDA stream protocol (``__cuda_stream__``)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)  # (protocol version, handle)


def external_stream(ptr: int):
    """A CuPy Stream over a stream rope_jit does not own (torch's, a producer's).

    CuPy 14 deprecated ``cupy.cuda.ExternalStream(ptr)`` (a DeprecationWarning on every
    call) in favour of ``Stream.from_external(obj)``, which takes any object with
    ``__cuda_stream__``; older CuPy has only ExternalStream. The stream is not owned:
    the caller's framework keeps it alive."""
    cp = cupy_module()
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(ptr))
    return cp.cuda.ExternalStream(ptr)


def wait_for_producer_stream(stream, device: int) -> None:
    """__cuda_array_interface__ v3: order our stream after the producer's, on the device."""
    if stream is None or device < 0:
        return
    cp = cupy_module()
    with cp.cuda.Device(device):
        ours = cp.cuda.get_current_stream()
        if stream == 1:  # CAI's legacy default stream: CuPy's null stream, handle 0
            stream = 0
        # 2 (per-thread default stream) is the runtime's cudaStreamPerThread handle as is
        if stream == ours.ptr:
            return
        event = cp.cuda.Event(disable_timing=True)
        event.record(external_stream(stream))
        ours.wait_event(event)


def cupy_empty(shape, dtype: str, device: int):
    from .dtypes import numpy_dtype

    cp = cupy_module()
    # CuPy has no float8 dtype: FP8 results are uint8 arrays of the FP8 bits (view them
    # with ml_dtypes' float8 types on the host)
    np_dtype = "uint8" if dtype.startswith("float8") else numpy_dtype(dtype)
    with cp.cuda.Device(device):
        return cp.empty(shape, dtype=np_dtype)


def cupy_from_host(host: np.ndarray, device: int):
    cp = cupy_module()
    with cp.cuda.Device(max(device, 0)):
        return cp.asarray(host)
