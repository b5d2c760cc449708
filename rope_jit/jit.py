"""The one place that compiles, caches and loads kernels.

* Compile: NVRTC through CuPy's binding, to a cubin for one named arch (``sm_90``). No GPU
  is needed, so a container build can warm the cache ahead of time (``rope_jit.warm``,
  ``rope-jit warm``).
* Disk cache: one file per binary under ``cache_dir()`` (``$ROPE_JIT_CACHE_DIR``, default the
  platform's user cache dir + ``rope_jit``). The file name is a hash of everything that
  changes the binary: rendered source, NVRTC options, arch, NVRTC and CuPy versions,
  rope_jit version. Each file carries its key and a checksum of its payload; a file that
  fails either is rebuilt (with a warning), never loaded.
* Concurrency: writes are atomic (temp file + rename). Processes racing on one key
  serialize on a per-entry file lock, so one compiles and the others read its entry;
  threads of one process serialize on a per-key lock first. The lock file is removed
  by its holder once the entry is on disk, so a settled cache holds only entries.
* Modes: entries and directories are created as any new file and directory are (0644
  and 0755 under the usual umask), so a cache warmed by one user (root, building an
  image) serves others.
* An unusable directory (read-only, or not creatable) degrades to memory-only with one
  warning per process; entries already there are still read.
* Memory: cubins per binary key, and loaded functions per (device, spec); a warm
  ``get_function`` is one dict look-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
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
# A lock holder that has not written its entry in this long is hung (a dead process
# releases its flock); waiters then compile themselves, the write being atomic anyway.
LOCK_TIMEOUT_S = 120.0
_MAGIC = b"ROPEJIT1"
_KEY_CHARS = 40
_ENTRY_SUFFIX = ".cubin"
_LOCK_SUFFIX = ".lock"
_TEMP_PREFIX = ".tmp-"
_ENTRY_NAME = re.compile(rf"^[0-9a-f]{{{_KEY_CHARS}}}\{_ENTRY_SUFFIX}$")
_LOCK_NAME = re.compile(rf"^[0-9a-f]{{{_KEY_CHARS}}}\{_ENTRY_SUFFIX}\{_LOCK_SUFFIX}$")
_TEMP_NAME = re.compile(rf"^{re.escape(_TEMP_PREFIX)}.*\{_ENTRY_SUFFIX}$")

# Where a build's cubin came from (``build_entry``'s answer).
FROM_MEMORY, FROM_DISK, COMPILED = "memory", "disk", "compiled"


class CompileError(RuntimeError):
    pass


@dataclass
class JitStats:
    """Counters of what this process compiled and loaded (tests, benchmarks, `doctor`).

    Seconds are wall time: compile_seconds of NVRTC compiles, disk_read_seconds of reading
    and verifying the entries that were hits, load_seconds of cuModuleLoadData plus
    cuModuleGetFunction."""

    compiles: int = 0
    disk_hits: int = 0
    module_loads: int = 0
    compile_seconds: float = 0.0
    disk_read_seconds: float = 0.0
    load_seconds: float = 0.0

    def add(self, **deltas) -> None:
        with _stats_lock:  # += on an attribute is not atomic across threads
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


_stats_lock = threading.Lock()
stats = JitStats()
_lock = threading.RLock()      # guards _key_locks and clear_memory
_key_locks: dict = {}          # binary key or (device, spec) -> threading.Lock
_functions: dict = {}          # (device, spec) -> (CUfunction pointer, module, function)
_memory_binaries: dict = {}    # binary key -> cubin, every cubin this process built or read
_warned_unwritable = False


def _key_lock(key) -> threading.Lock:
    lock = _key_locks.get(key)
    if lock is None:
        with _lock:
            lock = _key_locks.setdefault(key, threading.Lock())
    return lock


# ------------------------------------------------------------------ versions and keys

def nvrtc_version() -> str:
    major, minor = nvrtc_module().getVersion()
    return f"{major}.{minor}"


def cupy_version() -> str:
    return cupy_module().__version__


def supported_archs() -> tuple:
    """The archs this NVRTC compiles for, as 'sm_NN' names (NVRTC >= 11.2 reports them)."""
    nvrtc = nvrtc_module()
    return tuple(f"sm_{n}" for n in nvrtc.getSupportedArchs())


def arch_name(arch: str | int) -> str:
    """'sm_90' from '90', 90, 'sm_90' or '9.0'."""
    a = str(arch).lower().replace("sm_", "").replace("compute_", "").replace(".", "")
    if not a.isdigit():
        raise ValueError(f"arch: expected a compute capability such as 'sm_90' or '90', got {arch!r}")
    return f"sm_{a}"


def binary_key(source: str, arch: str, options=None) -> str:
    """Hash of everything that changes the binary. options None: NVRTC_OPTIONS, read at
    call time so a changed option set changes every key."""
    options = NVRTC_OPTIONS if options is None else options
    parts = {"source": source_hash(source), "arch": arch_name(arch), "options": list(options),
             "nvrtc": nvrtc_version(), "cupy": cupy_version(), "rope_jit": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:_KEY_CHARS]


# ------------------------------------------------------------------ compile

def compile_cubin(source: str, arch: str, options=None, name: str = "rope_jit.cu") -> bytes:
    """NVRTC source -> cubin for `arch` (counted in ``stats``). Raises CompileError with
    NVRTC's log."""
    options = NVRTC_OPTIONS if options is None else options
    nvrtc = nvrtc_module()
    t0 = time.perf_counter()
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch_name(arch)}", *options])
        except nvrtc.NVRTCError as e:
            raise CompileError(f"NVRTC failed for {arch_name(arch)}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    stats.add(compiles=1, compile_seconds=time.perf_counter() - t0)
    return cubin


# ------------------------------------------------------------------ entry format

def cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("rope_jit", appauthor=False))


def _entry_path(key: str) -> Path:
    return cache_dir() / f"{key}{_ENTRY_SUFFIX}"


def _pack_entry(meta: dict, cubin: bytes) -> bytes:
    """magic | meta length (u32 LE) | meta JSON | sha256(meta + cubin) | cubin."""
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
        meta = json.loads(m)
        return (meta, cubin) if isinstance(meta, dict) else None
    except (struct.error, ValueError):
        return None


def _entry_meta(spec, arch: str, key: str) -> dict:
    return {"key": key, "spec": spec.words(), "kernel": spec.kernel_name, "arch": arch,
            "nvrtc": nvrtc_version(), "cupy": cupy_version(), "rope_jit": __version__,
            "created": time.time()}


# ------------------------------------------------------------------ disk reads and writes

class _EntryReader:
    """Reads one entry, counting hits and warning about a damaged file once per build
    (the entry is read before and again under the lock)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.warned = path, key, False

    def read(self) -> bytes | None:
        t0 = time.perf_counter()
        try:
            blob = self.path.read_bytes()
        except OSError:  # missing, or unreadable: either way there is nothing to load
            return None
        got = unpack_entry(blob)
        if got is None or got[0].get("key") != self.key:
            self._warn_damaged(got is not None)
            return None
        stats.add(disk_hits=1, disk_read_seconds=time.perf_counter() - t0)
        return got[1]

    def _warn_damaged(self, misplaced: bool) -> None:
        if self.warned:
            return
        self.warned = True
        what = ("holds another key's binary" if misplaced
                else "is corrupt or truncated (checksum mismatch)")
        warnings.warn(f"rope_jit: cache entry {self.path} {what}; rebuilding it",
                      RuntimeWarning, stacklevel=6)


def _warn_unwritable(err: Exception) -> None:
    global _warned_unwritable
    if not _warned_unwritable:
        _warned_unwritable = True
        warnings.warn(f"rope_jit: kernel cache directory {cache_dir()} is not writable ({err}); "
                      f"compiled kernels are kept in memory only. Set {ENV_CACHE_DIR} to a "
                      "writable directory to keep them across processes.", RuntimeWarning,
                      stacklevel=6)


def _create_temp_file(directory: Path) -> tuple[int, Path]:
    """A new temp file of a unique name in `directory`, open for writing. Its mode is an
    ordinary new file's, 0o666 less the umask (0644 under the usual 022), where mkstemp
    would give 0600: the entry renamed from it must be readable by other users (a cache
    warmed by root in an image build, read by the user who runs the image)."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    for _ in range(tempfile.TMP_MAX):
        path = directory / f"{_TEMP_PREFIX}{secrets.token_hex(8)}{_ENTRY_SUFFIX}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:  # another writer's temp file: draw another name
            continue
    raise FileExistsError(f"no unused temp file name in {directory}")


def write_atomic(path: Path, blob: bytes) -> None:
    """Atomic: readers see the old state or the whole new file, never a partial one (cache
    entries, and rope_jit.tuning's tables beside them). Directories get mkdir's mode
    (0o777 less the umask: 0755 usually) and the file an ordinary new file's (0644
    usually): other users can read the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_file(path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _entry_lock(path: Path):
    """Hold the cross-process lock of one entry. The holder unlinks the lock file before
    releasing it: every waiter then finds the entry already written (filelock re-opens
    a lock whose file was unlinked), and the directory keeps no lock files. A holder
    past LOCK_TIMEOUT_S is ignored. OSError: the directory is unusable."""
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = str(path) + _LOCK_SUFFIX
    lock = filelock.FileLock(lock_path, timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
        held = True
    except filelock.Timeout:
        held = False
    try:
        yield
    finally:
        if held:
            with contextlib.suppress(OSError):  # Windows cannot unlink an open file; filelock does
                os.unlink(lock_path)
            lock.release()


# ------------------------------------------------------------------ build

def build(spec, arch: str) -> bytes:
    """The cubin of `spec` for `arch`: from memory, from the disk cache, or compiled (and
    stored). Needs NVRTC, not a GPU."""
    return build_entry(spec, arch)[0]


def build_entry(spec, arch: str, *, use_memory: bool = True) -> tuple[bytes, str]:
    """(cubin, where it came from: FROM_MEMORY, FROM_DISK or COMPILED). Thread-safe: threads
    asking for one key wait for the first, which compiles or reads it once. use_memory
    False (cache warming): skip this process's memory, so the entry is on disk after."""
    source = spec.render()
    arch = arch_name(arch)
    key = binary_key(source, arch)
    cubin = _memory_binaries.get(key) if use_memory else None
    if cubin is not None:
        return cubin, FROM_MEMORY
    with _key_lock(key):
        cubin = _memory_binaries.get(key) if use_memory else None
        if cubin is not None:
            return cubin, FROM_MEMORY
        cubin, origin = _from_disk_or_compile(spec, source, arch, key)
        _memory_binaries[key] = cubin
    return cubin, origin


def _from_disk_or_compile(spec, source: str, arch: str, key: str) -> tuple[bytes, str]:
    path = _entry_path(key)
    reader = _EntryReader(path, key)
    cubin = reader.read()  # no lock: entries are only ever replaced whole (rename)
    if cubin is not None:
        return cubin, FROM_DISK
    try:
        with _entry_lock(path):
            cubin = reader.read()  # another process may have written it while we waited
            if cubin is not None:
                return cubin, FROM_DISK
            cubin = compile_cubin(source, arch, name=f"{spec.kernel_name}.cu")
            write_atomic(path, _pack_entry(_entry_meta(spec, arch, key), cubin))
            return cubin, COMPILED
    except OSError as e:
        _warn_unwritable(e)
        if cubin is None:  # the directory failed before the compile
            cubin = compile_cubin(source, arch, name=f"{spec.kernel_name}.cu")
        return cubin, COMPILED


# ------------------------------------------------------------------ load

def get_function(spec, device: int) -> int:
    """CUfunction pointer of `spec` loaded on `device` (compiled or read from disk once)."""
    entry = _functions.get((device, spec))
    if entry is not None:
        return entry[0]
    return _load_function(spec, device)


def _load_function(spec, device: int) -> int:
    key = (device, spec)
    with _key_lock(key):
        entry = _functions.get(key)
        if entry is None:
            entry = _load_module(spec, device, build(spec, device_arch(device)))
            _functions[key] = entry
    return entry[0]


def _load_module(spec, device: int, cubin: bytes) -> tuple:
    t0 = time.perf_counter()
    cp = cupy_module()
    with cp.cuda.Device(device):
        module = cp.cuda.function.Module()
        module.load(cubin)
        fn = module.get_function(spec.kernel_name)
    stats.add(module_loads=1, load_seconds=time.perf_counter() - t0)
    return fn.ptr, module, fn


def clear_memory() -> None:
    """Forget loaded modules and binaries (tests use this to force disk loads)."""
    with _lock:
        _functions.clear()
        _memory_binaries.clear()


# ------------------------------------------------------------------ inspecting the cache

@dataclass(frozen=True)
class CacheEntry:
    """One file of the disk cache as found on disk. meta None: the file is damaged (it
    would be rebuilt, never loaded)."""

    path: Path
    size: int
    mtime: float
    meta: dict | None

    @property
    def key(self) -> str:
        return self.path.name[:_KEY_CHARS]

    @property
    def intact(self) -> bool:
        return self.meta is not None and self.meta.get("key") == self.key


def cache_entries(directory: Path | None = None) -> list[CacheEntry]:
    """Every entry file of the cache directory, each read and verified."""
    directory = cache_dir() if directory is None else directory
    entries = []
    for path in _matching_files(directory, _ENTRY_NAME):
        try:
            blob, st = path.read_bytes(), path.stat()
        except OSError:  # removed meanwhile by `cache clear` in another process
            continue
        got = unpack_entry(blob)
        entries.append(CacheEntry(path, st.st_size, st.st_mtime, got[0] if got else None))
    return entries


def stray_files(directory: Path | None = None) -> list[Path]:
    """Temp files of interrupted writes and lock files of interrupted compiles."""
    directory = cache_dir() if directory is None else directory
    return _matching_files(directory, _TEMP_NAME) + _matching_files(directory, _LOCK_NAME)


def _matching_files(directory: Path, pattern: re.Pattern) -> list[Path]:
    """Files of `directory` whose names match `pattern`; none if it does not exist. Only
    names rope_jit writes match, so a cache dir pointed at a shared folder is safe."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(directory / n for n in names if pattern.match(n))


def unwritable_reason(directory: Path | None = None) -> str | None:
    """None if the cache directory can be created and written, else why not. Probes by
    creating (and removing) a temp file, which is what a cache write does."""
    directory = cache_dir() if directory is None else directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TEMP_PREFIX, suffix=_ENTRY_SUFFIX)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None
