"""The one place that compiles, caches and loads kernels.

* Compile: NVRTC through CuPy's binding, to a cubin for one named arch (``sm_90``). No GPU
  is needed, so a container build can warm the cache ahead of time (``warm``).
* Disk cache: one file per binary under ``cache_dir()`` (``$ROPE_JIT_CACHE_DIR``, default the
  platform's user cache dir + ``rope_jit``). The file name is a hash of everything that
  changes the binary: rendered source, NVRTC options, arch, NVRTC and CuPy versions,
  rope_jit version. Each file carries a checksum of its payload; a file that fails it is
  rebuilt, never loaded. Writes are atomic (temp file + rename) under a per-entry file
  lock, so processes racing on one key compile it once. An unwritable directory degrades to
  memory-only with one warning.
* Memory: modules are loaded per device and kept in a dict keyed by (device, spec); a
  warm look-up is one dict access.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from ._cuda import cupy_module, device_arch, nvrtc_module
from .specs import source_hash

NVRTC_OPTIONS = ("-std=c++17",)
ENV_CACHE_DIR = "ROPE_JIT_CACHE_DIR"
_MAGIC = b"ROPEJIT1"


class CompileError(RuntimeError):
    pass


@dataclass
class JitStats:
    """Counters for tests and `rope-jit doctor`: what the process compiled and loaded."""

    compiles: int = 0
    disk_hits: int = 0
    module_loads: int = 0
    compile_seconds: float = 0.0


stats = JitStats()
_lock = threading.RLock()
_functions: dict = {}          # (device, spec) -> (CUfunction pointer, module)
_memory_binaries: dict = {}    # binary key -> cubin, when the disk cache is unusable
_warned_unwritable = False


# ------------------------------------------------------------------ versions and keys

def nvrtc_version() -> str:
    major, minor = nvrtc_module().getVersion()
    return f"{major}.{minor}"


def cupy_version() -> str:
    return cupy_module().__version__


def arch_name(arch: str | int) -> str:
    """'sm_90' from '90', 90, 'sm_90' or '9.0'."""
    a = str(arch).lower().replace("sm_", "").replace("compute_", "").replace(".", "")
    if not a.isdigit():
        raise ValueError(f"arch: expected a compute capability such as 'sm_90' or '90', got {arch!r}")
    return f"sm_{a}"


def binary_key(source: str, arch: str, options=NVRTC_OPTIONS) -> str:
    parts = {"source": source_hash(source), "arch": arch_name(arch), "options": list(options),
             "nvrtc": nvrtc_version(), "cupy": cupy_version(), "rope_jit": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


# ------------------------------------------------------------------ compile

def compile_cubin(source: str, arch: str, options=NVRTC_OPTIONS, name: str = "rope_jit.cu") -> bytes:
    """NVRTC source -> cubin for `arch`. Raises CompileError with NVRTC's log."""
    nvrtc = nvrtc_module()
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch_name(arch)}", *options])
        except nvrtc.NVRTCError as e:
            raise CompileError(f"NVRTC failed for {arch_name(arch)}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


# ------------------------------------------------------------------ disk cache

def cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("rope_jit", appauthor=False))


def _entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.cubin"


def _pack_entry(meta: dict, cubin: bytes) -> bytes:
    m = json.dumps(meta, sort_keys=True).encode()
    digest = hashlib.sha256(m + cubin).digest()
    return _MAGIC + struct.pack("<I", len(m)) + m + digest + cubin


def unpack_entry(blob: bytes) -> tuple[dict, bytes] | None:
    """(meta, cubin) of a cache file, or None if it is truncated or corrupt."""
    try:
        if blob[:8] != _MAGIC:
            return None
        (n,) = struct.unpack_from("<I", blob, 8)
        m = blob[12:12 + n]
        digest = blob[12 + n:44 + n]
        cubin = blob[44 + n:]
        if len(digest) != 32 or hashlib.sha256(m + cubin).digest() != digest:
            return None
        return json.loads(m), cubin
    except (struct.error, ValueError):
        return None


def _read_entry(path: Path) -> bytes | None:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    got = unpack_entry(blob)
    if got is None:
        warnings.warn(f"rope_jit: cache entry {path} is corrupt; rebuilding it", RuntimeWarning,
                      stacklevel=3)
        return None
    return got[1]


def _warn_unwritable(err: Exception) -> None:
    global _warned_unwritable
    if not _warned_unwritable:
        _warned_unwritable = True
        warnings.warn(f"rope_jit: kernel cache directory {cache_dir()} is not writable ({err}); "
                      f"compiled kernels are kept in memory only. Set {ENV_CACHE_DIR} to a "
                      "writable directory to keep them across processes.", RuntimeWarning,
                      stacklevel=4)


def _write_entry(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def build(spec, arch: str) -> bytes:
    """The cubin of `spec` for `arch`: from memory, from the disk cache, or compiled (and
    stored). Needs NVRTC, not a GPU."""
    source = spec.render()
    arch = arch_name(arch)
    key = binary_key(source, arch)
    cubin = _memory_binaries.get(key)
    if cubin is not None:
        return cubin
    path = _entry_path(key)
    cubin = _read_entry(path)
    if cubin is not None:
        stats.disk_hits += 1
        _memory_binaries[key] = cubin
        return cubin
    try:
        import filelock

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path) + ".lock", timeout=120)
        with lock:
            cubin = _read_entry(path)  # another process may have finished it meanwhile
            if cubin is not None:
                stats.disk_hits += 1
            else:
                cubin = _compile_counted(spec, source, arch)
                meta = {"spec": spec.words(), "kernel": spec.kernel_name, "arch": arch,
                        "nvrtc": nvrtc_version(), "cupy": cupy_version(),
                        "rope_jit": __version__, "created": time.time()}
                _write_entry(path, _pack_entry(meta, cubin))
    except OSError as e:
        _warn_unwritable(e)
        if cubin is None:
            cubin = _compile_counted(spec, source, arch)
    _memory_binaries[key] = cubin
    return cubin


def _compile_counted(spec, source: str, arch: str) -> bytes:
    t0 = time.perf_counter()
    cubin = compile_cubin(source, arch, name=f"{spec.kernel_name}.cu")
    stats.compiles += 1
    stats.compile_seconds += time.perf_counter() - t0
    return cubin


# ------------------------------------------------------------------ load

def get_function(spec, device: int) -> int:
    """CUfunction pointer of `spec` loaded on `device` (compiled or read from disk once)."""
    entry = _functions.get((device, spec))
    if entry is not None:
        return entry[0]
    with _lock:
        entry = _functions.get((device, spec))
        if entry is None:
            cubin = build(spec, device_arch(device))
            cp = cupy_module()
            with cp.cuda.Device(device):
                module = cp.cuda.function.Module()
                module.load(cubin)
                fn = module.get_function(spec.kernel_name)
            stats.module_loads += 1
            entry = (fn.ptr, module, fn)
            _functions[(device, spec)] = entry
    return entry[0]


def loaded_specs() -> list:
    return list(_functions)


def clear_memory() -> None:
    """Forget loaded modules and binaries (tests use this to force disk loads)."""
    with _lock:
        _functions.clear()
        _memory_binaries.clear()
