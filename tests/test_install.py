"""CI's guard on the README's install (tests/conftest.py): with ROPE_JIT_REQUIRE_TEST_EXTRAS
set, a test skipped because an import failed is a failure, since the extras `cuda12` and
`test` install every package the CPU suite imports. Without it such a test skips."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("required", [False, True], ids=["unset", "set"])
def test_an_import_skip_fails_under_the_ci_guard(tmp_path, required):
    """A test importing a package that is not installed skips, or fails naming the import
    when the variable is set; another skip and a test needing nothing are left alone."""
    (tmp_path / "test_guarded.py").write_text(textwrap.dedent("""
        import pytest

        def test_needs_a_missing_package():
            pytest.importorskip("rope_jit_no_such_package")

        def test_plain_skip():
            pytest.skip("a skip that is not about an import")

        def test_needs_nothing():
            pass
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    env.pop("ROPE_JIT_REQUIRE_TEST_EXTRAS", None)
    if required:
        env["ROPE_JIT_REQUIRE_TEST_EXTRAS"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-rfs", "-p", "conftest", "-p",
                        "no:cacheprovider", "test_guarded.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    summary = r.stdout.strip().splitlines()[-1]
    if required:
        assert r.returncode == 1, r.stdout + r.stderr
        assert "1 failed, 1 passed, 1 skipped" in summary, r.stdout
        assert "FAILED test_guarded.py::test_needs_a_missing_package" in r.stdout
        assert "could not import 'rope_jit_no_such_package'" in r.stdout
    else:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 passed, 2 skipped" in summary, r.stdout
