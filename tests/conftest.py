import atexit
import os
import shutil
import tempfile

import pytest

# Every test session compiles into its own cache directory unless told otherwise, so a
# stale entry of the developer's cache can never make a test pass (removed at exit).
if "ROPE_JIT_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="rope_jit_test_cache_")
    os.environ["ROPE_JIT_CACHE_DIR"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _has_nvrtc() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


HAS_GPU = _has_gpu()
HAS_NVRTC = _has_nvrtc()

if os.environ.get("ROPE_JIT_REQUIRE_NVRTC") and not HAS_NVRTC:
    raise RuntimeError("ROPE_JIT_REQUIRE_NVRTC is set but CuPy/NVRTC cannot be used: the NVRTC "
                       "compile tests would be skipped")


# CI sets ROPE_JIT_REQUIRE_TEST_EXTRAS: every package the CPU suite imports comes with the
# README's install (extras cuda12 and test), so an import that fails there is a broken
# install, reported as a failure instead of passing as skipped tests.
REQUIRE_TEST_EXTRAS = bool(os.environ.get("ROPE_JIT_REQUIRE_TEST_EXTRAS"))
_IMPORT_SKIP = "could not import"  # pytest.importorskip's reason


def _fail_an_import_skip(report) -> None:
    if REQUIRE_TEST_EXTRAS and report.skipped and _IMPORT_SKIP in str(report.longrepr):
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_an_import_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):  # importorskip at a module's top
    outcome = yield
    _fail_an_import_skip(outcome.get_result())


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (run the GPU suite on a GPU machine)")
    skip_nvrtc = pytest.mark.skip(reason="needs CuPy with NVRTC (pip install -e '.[cuda12]')")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "nvrtc" in item.keywords and not HAS_NVRTC:
            item.add_marker(skip_nvrtc)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, empty kernel cache directory (ROPE_JIT_CACHE_DIR) and no modules or
    binaries in memory, for tests of the cache, the CLI and warming."""
    from rope_jit import jit

    d = tmp_path / "cache"
    monkeypatch.setenv(jit.ENV_CACHE_DIR, str(d))
    jit.clear_memory()
    yield d
    jit.clear_memory()


def pytest_terminal_summary(terminalreporter):
    """How many kernels this session compiled with NVRTC (and loaded from the disk cache),
    so CI logs show that the compile tests really compiled."""
    import sys

    jit = sys.modules.get("rope_jit.jit")
    if jit is None:
        return
    s = jit.stats
    terminalreporter.write_line(
        f"rope_jit: {s.compiles} kernels compiled with NVRTC ({s.compile_seconds:.1f} s), "
        f"{s.disk_hits} loaded from the disk cache, {s.module_loads} modules loaded")
