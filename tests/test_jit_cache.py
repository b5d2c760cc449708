"""The on-disk kernel cache of rope_jit.jit (docs/jit.md): compile once, read back,
detect corruption, tolerate an unusable directory, key on everything that changes the
binary, and stay consistent when processes and threads race on one key. ``build`` needs
NVRTC (CuPy), not a GPU; those tests are marked ``nvrtc``.

Every test points ROPE_JIT_CACHE_DIR at its own tmp dir and starts with empty in-memory
tables (jit.clear_memory()).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import site
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import warnings
from pathlib import Path

import pytest

import rope_jit
from rope_jit import jit
from rope_jit.specs import PositionsSpec, RopeSpec

ARCH = "sm_90"
SPEC = RopeSpec(head_size=64, rotary_dim=64, dtype="bfloat16", cache_dtype="float32",
                index_dtype="int64", indptr=False, neox=True, out_of_place=False, vec=8,
                cache_vec=4, head_batch=1)
OTHER = PositionsSpec("int32")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache directory and empty in-memory tables for each test."""
    d = tmp_path / "cache"
    monkeypatch.setenv(jit.ENV_CACHE_DIR, str(d))
    monkeypatch.setattr(jit, "_warned_unwritable", False)
    jit.clear_memory()
    yield d
    jit.clear_memory()


def _entries(d: Path) -> list:
    return sorted(d.glob("*.cubin")) if d.is_dir() else []


def _counts():
    return jit.stats.compiles, jit.stats.disk_hits


def _files(d: Path) -> list:
    """Every name in the cache directory, hidden temp and lock files included."""
    return sorted(os.listdir(d)) if d.is_dir() else []


def _runtime_warnings(rec) -> list:
    return [w for w in rec if issubclass(w.category, RuntimeWarning)]


# ------------------------------------------------------------------ no NVRTC needed

def test_cache_dir_env_and_default(cache_dir, monkeypatch):
    """$ROPE_JIT_CACHE_DIR wins (with ~ expanded); without it, a 'rope_jit' directory in
    the platform's user cache dir."""
    assert jit.cache_dir() == cache_dir
    monkeypatch.setenv(jit.ENV_CACHE_DIR, "~/somewhere/rj")
    assert jit.cache_dir() == Path(os.path.expanduser("~/somewhere/rj"))
    monkeypatch.delenv(jit.ENV_CACHE_DIR)
    assert jit.cache_dir().name == "rope_jit"


def test_pack_unpack_roundtrip():
    """An entry is magic + meta + checksum + cubin; unpack gives both parts back."""
    blob = jit._pack_entry({"spec": "x", "n": 1}, b"\x7fELF-payload")
    meta, cubin = jit.unpack_entry(blob)
    assert meta == {"spec": "x", "n": 1} and cubin == b"\x7fELF-payload"


@pytest.mark.parametrize("blob", [
    b"", b"garbage", b"\x7fELF" + b"\0" * 100, jit._MAGIC, jit._MAGIC + b"\xff\xff\xff\xff",
    jit._MAGIC + b"\x02\x00\x00\x00{}", jit._MAGIC + b"\x02\x00\x00\x00{}" + b"\0" * 40,
    os.urandom(300), jit._MAGIC + os.urandom(300),
], ids=["empty", "text", "bare-elf", "magic-only", "huge-length", "no-digest", "zero-digest",
        "random", "magic-random"])
def test_unpack_entry_garbage_is_none(blob):
    """Anything that is not an intact entry unpacks to None (never raises)."""
    assert jit.unpack_entry(blob) is None


def test_unpack_detects_every_single_byte_flip():
    """Flipping any byte of an entry (magic, length, meta, checksum or payload) is caught."""
    blob = jit._pack_entry({"spec": "rope"}, bytes(range(64)))
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        assert jit.unpack_entry(bytes(bad)) is None, i
    for n in range(len(blob)):  # and every truncation
        assert jit.unpack_entry(blob[:n]) is None, n


# ------------------------------------------------------------------ with NVRTC

@pytest.mark.nvrtc
def test_first_build_compiles_and_writes_one_entry(cache_dir):
    """A cold build compiles once and leaves exactly one intact .cubin entry whose meta
    describes the spec; a second build in the same process is a memory hit."""
    c0, h0 = _counts()
    cubin = jit.build(SPEC, ARCH)
    assert cubin[:4] == b"\x7fELF"
    assert _counts() == (c0 + 1, h0)
    entries = _entries(cache_dir)
    assert len(entries) == 1
    assert entries[0].stem == jit.binary_key(SPEC.render(), ARCH)
    meta, payload = jit.unpack_entry(entries[0].read_bytes())
    assert payload == cubin
    assert meta["arch"] == ARCH and meta["spec"] == SPEC.words() and meta["kernel"] == SPEC.kernel_name
    assert not list(cache_dir.glob(".tmp-*"))  # no temp file left behind
    assert jit.build(SPEC, ARCH) is cubin
    assert _counts() == (c0 + 1, h0)


@pytest.mark.nvrtc
def test_second_build_reads_from_disk(cache_dir):
    """After clear_memory() (a new process, in effect) the entry is read: disk_hits + 1,
    no compile, the same bytes."""
    first = jit.build(SPEC, ARCH)
    jit.clear_memory()
    c0, h0 = _counts()
    again = jit.build(SPEC, ARCH)
    assert again == first
    assert _counts() == (c0, h0 + 1)
    assert len(_entries(cache_dir)) == 1


@pytest.mark.nvrtc
def test_different_specs_and_archs_get_their_own_entries(cache_dir):
    """One entry per (spec, arch)."""
    jit.build(SPEC, "sm_90")
    jit.build(SPEC, "sm_80")
    jit.build(OTHER, "sm_90")
    assert len(_entries(cache_dir)) == 3


def _corrupt_payload(path: Path) -> bytes:
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF  # inside the cubin payload
    path.write_bytes(bytes(blob))
    return bytes(blob)


def _truncate(path: Path) -> bytes:
    blob = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(blob)
    return blob


@pytest.mark.nvrtc
@pytest.mark.parametrize("damage", [_corrupt_payload, _truncate], ids=["flipped-byte", "truncated"])
def test_damaged_entry_is_rebuilt(cache_dir, damage):
    """A corrupt or truncated entry is reported (one RuntimeWarning naming the file, though
    the entry is read twice: before and under the lock), rebuilt and rewritten; the damaged
    bytes are never returned."""
    good = jit.build(SPEC, ARCH)
    (path,) = _entries(cache_dir)
    damaged = damage(path)
    assert jit.unpack_entry(damaged) is None
    jit.clear_memory()
    c0, h0 = _counts()
    with pytest.warns(RuntimeWarning, match="corrupt") as rec:
        cubin = jit.build(SPEC, ARCH)
    (warning,) = _runtime_warnings(rec)
    assert str(path) in str(warning.message)
    assert _counts() == (c0 + 1, h0)           # compiled again, not a disk hit
    assert cubin[:4] == b"\x7fELF"
    assert cubin not in damaged                 # not the damaged bytes
    assert cubin == good                        # NVRTC is deterministic
    meta, payload = jit.unpack_entry(path.read_bytes())  # the file was rewritten intact
    assert payload == cubin
    jit.clear_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # now clean: no warning, a disk hit
        assert jit.build(SPEC, ARCH) == cubin
    assert _counts() == (c0 + 1, h0 + 1)


def _under_a_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory's parent should be")
    return blocker / "cache"


def _read_only_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    if os.access(d, os.W_OK):  # root ignores permissions
        d.chmod(0o700)
        pytest.skip("permissions are not enforced for this user (root)")
    return d / "cache"


@pytest.mark.nvrtc
@pytest.mark.parametrize("make_dir", [_under_a_file, _read_only_dir], ids=["non-creatable", "read-only"])
def test_unusable_cache_dir_degrades_to_memory(tmp_path, monkeypatch, make_dir):
    """A cache directory that cannot be created or written: exactly one RuntimeWarning
    naming the directory and the env var, a cubin all the same, and later builds served
    from memory."""
    d = make_dir(tmp_path)
    monkeypatch.setenv(jit.ENV_CACHE_DIR, str(d))
    try:
        c0, h0 = _counts()
        with pytest.warns(RuntimeWarning, match=jit.ENV_CACHE_DIR) as rec:
            cubin = jit.build(SPEC, ARCH)
        (warning,) = _runtime_warnings(rec)
        assert str(d) in str(warning.message)
        assert cubin[:4] == b"\x7fELF"
        assert _counts() == (c0 + 1, h0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # the warning is given once, the hit is in memory
            assert jit.build(SPEC, ARCH) is cubin
            other = jit.build(OTHER, ARCH)      # a new spec compiles without warning again
        assert other[:4] == b"\x7fELF"
        assert _counts() == (c0 + 2, h0)
        assert not d.exists()
    finally:
        if d.parent.is_dir():
            d.parent.chmod(0o700)


@pytest.mark.nvrtc
def test_binary_key():
    """The key is stable for equal inputs and changes with arch, options and source;
    arch spellings of one compute capability give one key."""
    src = SPEC.render()
    k = jit.binary_key(src, "sm_90")
    assert k == jit.binary_key(src, "sm_90") == jit.binary_key(src, "90") == jit.binary_key(src, 90)
    assert len(k) == 40 and int(k, 16) >= 0
    others = {
        jit.binary_key(src, "sm_80"),
        jit.binary_key(src, "sm_90", options=("-std=c++17", "-lineinfo")),
        jit.binary_key(src, "sm_90", options=()),
        jit.binary_key(src + "\n", "sm_90"),
        jit.binary_key(OTHER.render(), "sm_90"),
        jit.binary_key(RopeSpec(**{**SPEC.__dict__, "vec": 4}).render(), "sm_90"),
    }
    assert k not in others and len(others) == 6


@pytest.mark.nvrtc
def test_binary_key_includes_versions(monkeypatch):
    """NVRTC, CuPy and rope_jit versions are part of the key: a stale entry cannot load."""
    src = SPEC.render()
    k = jit.binary_key(src, ARCH)
    monkeypatch.setattr(jit, "nvrtc_version", lambda: "99.9")
    k_nvrtc = jit.binary_key(src, ARCH)
    monkeypatch.undo()
    monkeypatch.setattr(jit, "cupy_version", lambda: "0.0.1")
    k_cupy = jit.binary_key(src, ARCH)
    monkeypatch.undo()
    monkeypatch.setattr(jit, "__version__", "0.0.0-other")
    k_pkg = jit.binary_key(src, ARCH)
    assert len({k, k_nvrtc, k_cupy, k_pkg}) == 4


@pytest.mark.nvrtc
def test_entry_of_another_key_is_not_used(cache_dir):
    """An intact entry is found only under its own key: a file written for another arch
    is never served for this one."""
    jit.build(SPEC, "sm_80")
    jit.clear_memory()
    c0, h0 = _counts()
    cubin = jit.build(SPEC, "sm_90")
    assert _counts() == (c0 + 1, h0)
    meta, _ = jit.unpack_entry((cache_dir / f"{jit.binary_key(SPEC.render(), 'sm_90')}.cubin").read_bytes())
    assert meta["arch"] == "sm_90" and cubin[:4] == b"\x7fELF"


@pytest.mark.nvrtc
def test_entry_under_another_keys_name_is_rebuilt(cache_dir):
    """An intact entry copied under another key's file name (a botched sync or copy) fails
    the key check: one warning, rebuilt, its bytes never served for this key."""
    sm80 = jit.build(SPEC, "sm_80")
    path90 = cache_dir / f"{jit.binary_key(SPEC.render(), 'sm_90')}.cubin"
    (path80,) = _entries(cache_dir)
    path90.write_bytes(path80.read_bytes())
    jit.clear_memory()
    c0, h0 = _counts()
    with pytest.warns(RuntimeWarning, match="another key") as rec:
        sm90 = jit.build(SPEC, "sm_90")
    assert len(_runtime_warnings(rec)) == 1
    assert sm90 != sm80 and _counts() == (c0 + 1, h0)
    meta, payload = jit.unpack_entry(path90.read_bytes())
    assert meta["key"] == path90.stem and meta["arch"] == "sm_90" and payload == sm90


@pytest.mark.nvrtc
def test_disk_hit_never_locks_or_writes(cache_dir, monkeypatch):
    """A pre-warmed cache on a read-only mount works: a hit reads the entry and touches
    nothing (no lock file, no write), so no warning either."""
    jit.build(SPEC, ARCH)
    jit.clear_memory()

    def forbidden(*args, **kwargs):
        raise AssertionError("a disk hit must not lock or write")

    monkeypatch.setattr(jit, "_entry_lock", forbidden)
    monkeypatch.setattr(jit, "write_atomic", forbidden)
    c0, h0 = _counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jit.build(SPEC, ARCH)[:4] == b"\x7fELF"
    assert _counts() == (c0, h0 + 1)


@pytest.mark.nvrtc
def test_leftover_temp_and_lock_files_are_harmless(cache_dir):
    """A writer killed mid-write leaves a temp file, a compiler killed while holding the
    lock leaves a lock file (its flock dies with it): neither blocks a build, neither is
    taken for an entry, and both are listed as stray files."""
    key = jit.binary_key(SPEC.render(), ARCH)
    cache_dir.mkdir(parents=True)
    temp = cache_dir / ".tmp-crashed.cubin"
    temp.write_bytes(b"half an entr")
    lock = cache_dir / f"{key}.cubin.lock"
    lock.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jit.build(SPEC, ARCH)
    assert [e.key for e in jit.cache_entries()] == [key]
    assert jit.stray_files() == [temp]  # the lock file was the build's: removed by it
    assert not lock.exists()


@pytest.mark.nvrtc
@pytest.mark.parametrize("change", ["options", "nvrtc", "cupy", "rope_jit"])
def test_changed_option_or_version_compiles_a_new_entry(cache_dir, monkeypatch, change):
    """A build under other NVRTC options or another NVRTC/CuPy/rope_jit version never
    loads the existing entry: it compiles and writes a second one."""
    jit.build(SPEC, ARCH)
    jit.clear_memory()
    if change == "options":
        monkeypatch.setattr(jit, "NVRTC_OPTIONS", (*jit.NVRTC_OPTIONS, "-lineinfo"))
    elif change == "rope_jit":
        monkeypatch.setattr(jit, "__version__", "0.0.0-other")
    else:
        monkeypatch.setattr(jit, f"{change}_version", lambda: "0.0-other")
    c0, h0 = _counts()
    jit.build(SPEC, ARCH)
    assert _counts() == (c0 + 1, h0)
    assert len(_entries(cache_dir)) == 2


# ------------------------------------------------------------------ races

def _race_worker(cache_dir: str, barrier, results) -> None:
    """One process of the race: everything but the build happens before the barrier (CuPy
    import, NVRTC version for the key) so the builds start together."""
    os.environ[jit.ENV_CACHE_DIR] = cache_dir
    jit.binary_key(SPEC.render(), ARCH)
    barrier.wait(timeout=120)
    cubin = jit.build(SPEC, ARCH)
    results.put((jit.stats.compiles, jit.stats.disk_hits, hashlib.sha256(cubin).hexdigest()))


@pytest.mark.nvrtc
def test_processes_racing_on_one_key(cache_dir):
    """Six processes (spawned: fresh interpreters) build one key at the same moment: all
    succeed with the same binary, exactly one compiles (the others wait on the entry lock
    and read its entry), and the directory holds one intact entry, no temp or lock file."""
    n = 6
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(cache_dir), barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({digest for *_, digest in outcomes}) == 1
    assert sum(c for c, _, _ in outcomes) == 1
    assert sum(h for _, h, _ in outcomes) == n - 1
    (entry,) = _entries(cache_dir)
    assert _files(cache_dir) == [entry.name]
    meta, cubin = jit.unpack_entry(entry.read_bytes())
    assert hashlib.sha256(cubin).hexdigest() == outcomes[0][2]


def _race_threads(n: int, build) -> list:
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def run(i):
        try:
            barrier.wait(timeout=60)
            results[i] = build()
        except BaseException as e:  # re-raised in the test's thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.nvrtc
def test_threads_racing_on_one_key(cache_dir):
    """Eight threads build one key together: one compile, every thread gets the very same
    bytes object, one entry and nothing else on disk."""
    jit.binary_key(SPEC.render(), ARCH)  # load CuPy/NVRTC outside the race
    c0, h0 = _counts()
    results = _race_threads(8, lambda: jit.build(SPEC, ARCH))
    assert all(r is results[0] for r in results) and results[0][:4] == b"\x7fELF"
    assert _counts() == (c0 + 1, h0)
    assert _files(cache_dir) == [f"{jit.binary_key(SPEC.render(), ARCH)}.cubin"]


@pytest.mark.nvrtc
def test_threads_racing_without_a_usable_directory(tmp_path, monkeypatch):
    """Memory-only (the directory cannot be created), threads racing on one key still
    compile once, and the process warns exactly once."""
    monkeypatch.setenv(jit.ENV_CACHE_DIR, str(_under_a_file(tmp_path)))
    jit.binary_key(SPEC.render(), ARCH)
    c0, h0 = _counts()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        results = _race_threads(8, lambda: jit.build(SPEC, ARCH))
    assert all(r is results[0] for r in results)
    assert _counts() == (c0 + 1, h0)
    assert len(_runtime_warnings(rec)) == 1


@pytest.mark.nvrtc
def test_threads_building_different_keys(cache_dir):
    """Threads building different keys at once each get their own intact entry (the
    per-key locks do not mix them up)."""
    specs = [RopeSpec(**{**SPEC.__dict__, "head_size": h, "rotary_dim": h}) for h in (32, 64, 96, 128)]
    jit.binary_key(SPEC.render(), ARCH)
    c0, _ = _counts()
    it = iter(range(len(specs)))
    lock = threading.Lock()

    def build_next():
        with lock:
            spec = specs[next(it)]
        return spec, jit.build(spec, ARCH)

    results = _race_threads(len(specs), build_next)
    assert jit.stats.compiles == c0 + len(specs)
    for spec, cubin in results:
        path = cache_dir / f"{jit.binary_key(spec.render(), ARCH)}.cubin"
        meta, payload = jit.unpack_entry(path.read_bytes())
        assert payload == cubin and meta["spec"] == spec.words()
    assert len(_files(cache_dir)) == len(specs)


# ------------------------------------------------------------------ inspection

@pytest.mark.nvrtc
def test_cache_entries_and_stray_files(cache_dir):
    """cache_entries lists every entry with its meta (None for a damaged one); files that
    rope_jit did not name are ignored, even in a shared directory."""
    jit.build(SPEC, ARCH)
    jit.build(OTHER, ARCH)
    cache_dir.joinpath("README.txt").write_text("not ours")
    cache_dir.joinpath("0" * 40 + ".cubin").write_bytes(b"garbage")
    entries = {e.key: e for e in jit.cache_entries()}
    assert len(entries) == 3
    assert not entries["0" * 40].intact and entries["0" * 40].meta is None
    intact = sorted(e.meta["spec"] for e in entries.values() if e.intact)
    assert intact == sorted([SPEC.words(), OTHER.words()])
    assert all(e.size == e.path.stat().st_size for e in entries.values())
    assert jit.stray_files() == []


def test_unwritable_reason(tmp_path):
    """None for a writable (even not yet existing) directory, which it creates and leaves
    empty; a reason for one that cannot exist."""
    d = tmp_path / "new" / "cache"
    assert jit.unwritable_reason(d) is None
    assert d.is_dir() and _files(d) == []
    reason = jit.unwritable_reason(_under_a_file(tmp_path))
    assert reason and "NotADirectoryError" in reason


# ------------------------------------------------------------------ file modes, other users

@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.nvrtc
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_entry_and_directory_modes_follow_the_umask(tmp_path, monkeypatch, umask):
    """An entry gets an ordinary new file's mode, 0o666 less the umask (0644 under the
    usual 022: readable by every user; mkstemp would give 0600), and each directory the
    cache creates 0o777 less the umask (0755)."""
    d = tmp_path / "shared" / "rope_jit"
    monkeypatch.setenv(jit.ENV_CACHE_DIR, str(d))
    with _umask(umask):
        jit.build(SPEC, ARCH)
    (entry,) = _entries(d)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o666 & ~umask
    for directory in (d, d.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask


def _other_user():
    """The 'nobody' user, or a skip: warming as one user and reading as another needs
    root, to switch users."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("needs root: the cache is warmed as root and read as user 'nobody'")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("needs a user 'nobody' to read the cache as")


def _run_as(user, argv, env) -> subprocess.CompletedProcess:
    def become_user():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return subprocess.run(argv, env=env, preexec_fn=become_user, cwd="/", capture_output=True,
                          text=True, timeout=300)


def _python_for(user, home: Path) -> tuple[str, dict]:
    """An interpreter `user` can run with this environment's packages and this rope_jit,
    and the environment to run it in (HOME `home`: CuPy makes its own cache directory there
    on import); or a skip. This process's interpreter first; a venv made from an
    interpreter under root's private home (pyenv in /root) is out of another user's reach,
    so then the system's interpreter of the same Python version, given this environment's
    site-packages on PYTHONPATH and their NVIDIA wheels' libraries (libnvrtc) on
    LD_LIBRARY_PATH, where CuPy finds them only for this environment's own interpreter."""
    repo = Path(rope_jit.__file__).resolve().parent.parent
    site_dirs = site.getsitepackages()
    nvidia_libs = [str(p) for d in site_dirs for p in sorted(Path(d).glob("nvidia/*/lib"))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), *site_dirs]),
               PYTHONDONTWRITEBYTECODE="1", HOME=str(home),
               LD_LIBRARY_PATH=os.pathsep.join([*nvidia_libs, os.environ.get("LD_LIBRARY_PATH", "")]))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    tried = []
    for python in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin")):
        if python is None:
            continue
        try:
            r = _run_as(user, [python, "-c", "from rope_jit import jit; jit.nvrtc_version()"], env)
        except PermissionError as e:  # the interpreter itself is out of reach
            tried.append(f"{python}: {e.strerror}")
            continue
        if r.returncode == 0:
            return python, env
        tried.append(f"{python}: {(r.stderr.strip().splitlines() or [f'exit {r.returncode}'])[-1]}")
    pytest.skip(f"no Python that user {user.pw_name} can run with these packages "
                f"({'; '.join(tried)})")


def _make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)


@contextlib.contextmanager
def _read_only_cache_warmed_by_root(monkeypatch, arch: str):
    """A cache directory in a shared place (as /opt in an image), warmed with SPEC for
    `arch` by this root process under the usual umask, then made read-only; yields it and
    a function running a command as user nobody against it."""
    user = _other_user()
    shared = Path(tempfile.mkdtemp(prefix="rope_jit_shared_"))
    try:
        shared.chmod(0o755)  # mkdtemp's 0700 would hide everything below it
        home = shared / "home"
        home.mkdir(mode=0o700)
        os.chown(home, user.pw_uid, user.pw_gid)
        python, env = _python_for(user, home)
        cache = shared / "opt" / "rope_jit"
        monkeypatch.setenv(jit.ENV_CACHE_DIR, str(cache))
        with _umask(0o022):
            jit.build(SPEC, arch)
        (entry,) = _entries(cache)
        assert stat.S_IMODE(entry.stat().st_mode) == 0o644
        assert stat.S_IMODE(cache.stat().st_mode) == stat.S_IMODE(cache.parent.stat().st_mode) == 0o755
        _make_read_only(cache)
        env[jit.ENV_CACHE_DIR] = str(cache)

        def run(*args: str) -> subprocess.CompletedProcess:
            return _run_as(user, [python, *args], env)

        yield cache, run
    finally:
        for path in [shared, *shared.rglob("*")]:
            path.chmod(stat.S_IMODE(path.stat().st_mode) | 0o200)
        shutil.rmtree(shared)


# Run by user nobody: read SPEC's entry (argv: spec fields as JSON, arch) or, given a
# device too, load it there; any compile is an error, and so is any warning (a damaged or
# unreadable entry, an unwritable directory: both warn). Prints origin and counters.
_READER = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("error")
    from rope_jit import jit
    from rope_jit.specs import RopeSpec

    def compile_forbidden(*args, **kwargs):
        raise AssertionError("compiled: the cached entry was not used")

    jit.compile_cubin = compile_forbidden
    spec = RopeSpec(**json.loads(sys.argv[1]))
    if len(sys.argv) > 3:
        jit.get_function(spec, int(sys.argv[3]))
        origin = "loaded"
    else:
        origin = jit.build_entry(spec, sys.argv[2])[1]
    print(origin, jit.stats.compiles, jit.stats.disk_hits, jit.stats.module_loads)
""")


@pytest.mark.nvrtc
def test_prewarmed_read_only_cache_serves_another_user(monkeypatch):
    """A cache warmed by root and made read-only serves user nobody: `cache list` shows
    its entry intact, a build reads and verifies the entry with no compile and no warning,
    `warm` of what is cached exits 0, and `warm` of something missing exits 1 saying that
    the directory is not writable and how many kernels are missing."""
    spec_json = json.dumps(dataclasses.asdict(SPEC))
    with _read_only_cache_warmed_by_root(monkeypatch, ARCH) as (cache, run):
        (entry,) = _entries(cache)
        r = run("-m", "rope_jit", "cache", "list")
        assert r.returncode == 0, r.stderr
        assert f"{entry.stem[:12]}  {ARCH}" in r.stdout and r.stdout.count(SPEC.words()) == 1
        assert "[" not in r.stdout.split(SPEC.words())[1].splitlines()[0]  # no damaged/stale mark
        assert "1 entry, " in r.stdout

        r = run("-c", _READER, spec_json, ARCH)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [jit.FROM_DISK, "0", "1", "0"]

        r = run("-m", "rope_jit", "warm", "--arch", ARCH, "--spec", spec_json, "--quiet")
        assert r.returncode == 0, r.stderr
        assert "compiled 0, already cached 1" in r.stdout
        r = run("-m", "rope_jit", "warm", "--arch", ARCH, "--spec", spec_json, "--positions-kernel",
                "--index-dtype", "int32", "--quiet")
        assert r.returncode == 1 and r.stdout == ""
        assert "not writable" in r.stderr and "1 of 2 kernels are not cached" in r.stderr, r.stderr
        assert _files(cache) == [entry.name]  # nothing written


@pytest.mark.gpu
def test_prewarmed_read_only_cache_loads_on_the_gpu_as_another_user(monkeypatch):
    """On a GPU: user nobody loads the kernel root warmed for this GPU's arch into a
    module, reading it from the read-only cache, with no compile."""
    from rope_jit._cuda import device_arch

    arch = jit.arch_name(device_arch(0))
    with _read_only_cache_warmed_by_root(monkeypatch, arch) as (_, run):
        r = run("-c", _READER, json.dumps(dataclasses.asdict(SPEC)), arch, "0")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["loaded", "0", "1", "1"]
