"""The ``rope-jit`` command (rope_jit.cli): doctor, cache list, cache clear, warm. Run
in-process through main(argv) (exit status returned), plus real subprocesses of
``python -m rope_jit``. Expected faults must be one line on stderr with the documented
exit status, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rope_jit import __version__, cli, jit, tuning, warm

from conftest import HAS_GPU

LLAMA_ARGS = ["--heads", "32", "8", "--head-size", "128", "--rotary-dim", "128",
              "--dtype", "bfloat16", "--cache-dtype", "float32", "--style", "neox"]


pytestmark = pytest.mark.usefixtures("cache_dir")  # conftest: a fresh cache per test


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)


def _assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rope-jit"), err
    for f in fragments:
        assert f in lines[0], (f, err)


def _under_a_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory's parent should be")
    return blocker / "cache"


# ------------------------------------------------------------------ doctor

def test_doctor(capsys, cache_dir):
    """Versions, GPUs ('no GPU' said plainly on a machine without one), torch, the cache
    directory, its entries and whether it is writable; 'ok' and exit 0 when NVRTC works
    and the directory is writable."""
    code, out, err = run_cli(capsys, "doctor")
    labels = [line.split("  ")[0] for line in out.splitlines() if line[:1].strip()]
    for label in ("rope_jit", "Python", "NumPy", "CuPy", "NVRTC", "CUDA runtime", "CUDA driver",
                  "GPUs", "torch", "cache dir", "cache entries", "cache writable"):
        assert label in labels, (label, out)
    assert f"rope_jit        {__version__}" in out
    assert f"{cache_dir} (from {jit.ENV_CACHE_DIR})" in out
    assert "cache entries   0, 0 B" in out and "cache writable  yes" in out
    if not HAS_GPU:
        assert "GPUs            no GPU" in out
    else:
        assert ", sm_" in out and " SMs, " in out
    assert out.rstrip().endswith("\nok") and code == 0 and err == ""


@pytest.mark.nvrtc
def test_doctor_counts_entries(capsys, cache_dir):
    jit.build(warm.specs_for_call(warm.model_call("phi-2"), max_tokens=1)[0], "sm_90")
    size = sum(p.stat().st_size for p in cache_dir.iterdir())
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 0
    assert f"cache entries   1, {size / 1024:.1f} KiB" in out


def test_doctor_reports_an_unwritable_directory(capsys, tmp_path, monkeypatch):
    d = _under_a_file(tmp_path)
    monkeypatch.setenv(jit.ENV_CACHE_DIR, str(d))
    code, out, _ = run_cli(capsys, "doctor")
    assert code == cli.EXIT_FAILED
    assert "cache writable  no (NotADirectoryError" in out
    assert out.rstrip().splitlines()[-1].startswith("problems: the cache directory is not writable")


def test_doctor_without_cupy():
    """Without CuPy doctor still runs: it says so, and exits 1 (nothing can compile)."""
    r = _python("""
        import sys
        sys.modules['cupy'] = None
        from rope_jit.cli import main
        sys.exit(main(['doctor']))
    """)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "CuPy            not installed" in r.stdout
    assert "GPUs            unknown (CuPy is not installed)" in r.stdout
    assert "problems: CuPy is missing" in r.stdout


def test_python_m_rope_jit_doctor_subprocess(cache_dir):
    """The real entry point in a fresh process: `python -m rope_jit doctor`."""
    env = dict(os.environ, **{jit.ENV_CACHE_DIR: str(cache_dir)})
    r = subprocess.run([sys.executable, "-m", "rope_jit", "doctor"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"rope_jit        {__version__} (")
    assert str(cache_dir) in r.stdout and r.stdout.rstrip().endswith("ok")


def test_python_m_rope_jit_usage_error_subprocess():
    r = subprocess.run([sys.executable, "-m", "rope_jit", "warm", "--arch", "hopper",
                        "--model", "llama3-8b"], capture_output=True, text=True, timeout=300)
    assert r.returncode == cli.EXIT_USAGE and r.stdout == ""
    _assert_one_line_error(r.stderr, "rope-jit warm: error:", "'hopper'")


def test_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "doctor" in out and "cache" in out and "warm" in out
    code, out, _ = run_cli(capsys, "warm", "--help")
    assert code == 0 and "--arch" in out and "--max-tokens" in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"rope_jit {__version__}"


# ------------------------------------------------------------------ warm

@pytest.mark.nvrtc
def test_warm_list_clear_round_trip(capsys, cache_dir):
    """warm compiles the planner's kernels for the shape (listing them, then a summary),
    cache list shows one line per entry with arch, size, age and the spec in words, cache
    clear removes them and says how many."""
    code, out, err = run_cli(capsys, "warm", "--arch", "sm_90", *LLAMA_ARGS)
    assert code == 0, err
    assert err == ""  # no progress bar: stderr is not a terminal here
    expected = warm.specs_for_call(warm.model_call("llama3-8b"),
                                   sm_counts=sorted(warm.sm_counts_for("sm_90")),  # as the CLI
                                   knobs=tuning.knob_choices(["sm_90"]))  # shipped tables too
    *listed, summary = out.strip().splitlines()
    assert listed == [s.words() for s in expected]
    assert summary.startswith(f"{len(expected)} kernels x 1 arch (sm_90): compiled {len(expected)}, "
                              "already cached 0, in ")
    assert summary.endswith(f"-> {cache_dir}")
    code, out, _ = run_cli(capsys, "cache", "list")
    header, *rows, footer = out.strip().splitlines()
    assert code == 0 and header.split() == ["KEY", "ARCH", "SIZE", "AGE", "KERNEL"]
    assert len(rows) == len(expected)
    for spec in expected:
        (row,) = [r for r in rows if r.endswith(spec.words())]
        key, arch, size, unit, age, age_unit = row.split()[:6]
        assert arch == "sm_90" and unit == "KiB" and age_unit == "s" and len(key) == 12
    assert footer.startswith(f"{len(expected)} entries, ") and footer.endswith(str(cache_dir))
    code, out, _ = run_cli(capsys, "cache", "clear")
    assert code == 0
    assert out.startswith(f"removed {len(expected)} entries (") and "0 stray temp/lock files" in out
    assert list(cache_dir.iterdir()) == []
    code, out, _ = run_cli(capsys, "cache", "list")
    assert out.strip() == f"no entries in {cache_dir}"


@pytest.mark.nvrtc
def test_warm_several_archs_and_modes_then_again(capsys, cache_dir):
    """Every combination of the multi-valued options is warmed, for each arch; warming
    again compiles nothing; --quiet prints the summary line only."""
    argv = ["warm", "--arch", "sm_80", "--arch", "sm_90", "--model", "phi-2", "--tp", "2",
            "--cache-dtype", "float32", "on-the-fly", "--positions", "positions", "indptr",
            "--positions-kernel", "--index-dtype", "int32", "--quiet"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""
    (summary,) = out.strip().splitlines()
    n_kernels = int(summary.split()[0])
    specs = {e.meta["spec"] for e in jit.cache_entries()}
    assert len(jit.cache_entries()) == 2 * n_kernels
    assert {e.meta["arch"] for e in jit.cache_entries()} == {"sm_80", "sm_90"}
    assert "positions_from_offsets int32" in specs
    assert any("on the fly indptr+offsets int32" in s for s in specs)
    assert any("float32 cache positions int32" in s for s in specs)
    assert all("head 80 rotary 32" in s for s in specs if s.startswith("rope"))
    assert f"compiled {2 * n_kernels}, already cached 0" in summary
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and f"compiled 0, already cached {2 * n_kernels}" in out


def _run_in_terminal(argv, env) -> str:
    """Output of `python -m rope_jit ARGV` run on a pseudo-terminal of 40 x 120 (tqdm
    shows no bar on a terminal of zero rows)."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    try:
        controller, terminal = pty.openpty()
    except OSError as e:  # a container without /dev/ptmx
        pytest.skip(f"no pseudo-terminal here: {e}")
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "rope_jit", *argv], env=env,
                            stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    assert proc.wait(timeout=300) == 0, out
    return out.decode(errors="replace")


@pytest.mark.nvrtc
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_progress_bar_on_a_terminal_only(cache_dir):
    """On a terminal warm shows a tqdm bar counting every (kernel, arch); --quiet hides it
    (and a pipe never shows it: see test_warm_list_clear_round_trip)."""
    env = dict(os.environ, **{jit.ENV_CACHE_DIR: str(cache_dir)})
    argv = ["warm", "--arch", "sm_80", "sm_90", "--model", "phi-2", "--max-tokens", "1"]
    shown = _run_in_terminal(argv, env)
    assert "compiling: 100%" in shown and "2/2" in shown, shown
    quiet = _run_in_terminal([*argv[:-2], "--max-tokens", "2", "--quiet"], env)
    assert "compiling" not in quiet and "already cached 2" in quiet, quiet


def test_warm_dry_run_compiles_nothing(capsys, cache_dir):
    """--dry-run lists the kernels and writes nothing (and needs no NVRTC)."""
    c0 = jit.stats.compiles
    code, out, _ = run_cli(capsys, "warm", "--arch", "sm_90", "sm_80", "--model", "deepseek-v3",
                           "--cache-dtype", "on-the-fly", "--dry-run")
    *listed, summary = out.strip().splitlines()
    assert code == 0 and listed and all(s.startswith("rope bfloat16 head 64 rotary 64 gptj on the fly")
                                        for s in listed)
    assert summary == (f"{len(listed)} kernels x 2 archs (sm_90, sm_80): {2 * len(listed)} "
                       "entries; nothing compiled (--dry-run)")
    assert jit.stats.compiles == c0 and not cache_dir.exists()


def fused_batches(lines) -> dict:
    """Fused kernels listed by warm, grouped by everything but their item batch."""
    groups: dict = {}
    for s in lines:
        m = re.search(r" batch (\d+)", s)
        key = s if m is None else s[:m.start()] + s[m.end():]
        groups.setdefault(key, set()).add(int(m.group(1)) if m else 0)
    return groups


def test_warm_fused_dry_run(capsys, cache_dir):
    """--fused all adds each fused function's kernel for the model's attention: for
    Llama-3-8B the FlashInfer, vLLM and SGLang forms and QK-norm; for DeepSeek-V3 the MLA
    forms, with both FP8 types; NHD and HND share one kernel."""
    code, out, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "llama3-8b",
                             "--fused", "all", "--kv-layout", "NHD", "HND", "--dry-run")
    assert code == 0, err
    lines = out.strip().splitlines()
    fused = [s for s in lines if s.startswith(("rope_fused", "qk_norm_rope"))]
    batches = fused_batches(fused)
    # QK-norm: per-thread cos/sin for few tokens, the shared tile for many
    qk_norm = [s for s in fused if s.startswith("qk_norm_rope")]
    assert len(batches) == 6 and len(qk_norm) == 2
    assert sorted("cos/sin in registers" in s for s in qk_norm) == [False, True]
    # the one-item kernel for few tokens and the batches of two for many
    assert any("paged float8_e4m3fn cache page 16" in k for k in batches)
    assert all(v == {1, 2} for k, v in batches.items() if "rope_fused" in k)
    assert any("k_scale on device v_scale on device" in s for s in fused)  # vLLM's cache
    plain = [s for s in lines if s.startswith("rope bfloat16")]
    assert plain and lines[-1].startswith(f"{len(plain) + len(fused)} kernels x 1 arch")
    code, out, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "deepseek-v3",
                             "--fused", "all", "--kv-dtype", "float8_e4m3fn", "float8_e5m2",
                             "--dry-run")
    fused = [s for s in out.splitlines() if s.startswith("rope_fused")]
    assert code == 0 and len(fused_batches(fused)) == 2 * 5
    assert all("heads 128/1 rotary 64" in s for s in fused)
    assert {"float8_e5m2" in s for s in fused} == {True, False}
    code, out, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "llama3-70b", "--tp", "4",
                             "--rotary-dim", "64", "--fused", "rope_quantize_fp8", "--dry-run")
    fused = [s for s in out.splitlines() if s.startswith("rope_fused")]
    assert code == 0 and len(fused_batches(fused)) == 1
    assert all("heads 16/2 rotary 64 nope 64/64" in s for s in fused), fused
    assert not cache_dir.exists()


@pytest.mark.parametrize("argv, fragments", [
    (["--model", "llama3-8b", "--fused", "concat_and_cache_mla_rope_fused"],
     ["--fused concat_and_cache_mla_rope_fused", "needs an MLA model"]),
    (["--model", "deepseek-v3", "--fused", "fused_qk_norm_rope"], ["per-head keys"]),
    (["--model", "llama3-8b", "--fused", "apply_rope_with_cos_sin_cache_inplace",
      "--cache-dtype", "on-the-fly"], ["takes a cos/sin cache"]),
    (["--fused", "rope_quantize_fp8", "--positions-kernel"], ["--fused: needs the model shape"]),
    (["--model", "llama3-8b", "--fused", "rope_quantize_fp8", "--kv-dtype", "int8"],
     ["--kv-dtype", "invalid choice"]),
    (["--model", "phi-2", "--fused", "rope_quantize_fp8", "--page-size", "0"], ["--page-size"]),
])
def test_warm_fused_usage_errors(capsys, argv, fragments):
    code, _, err = run_cli(capsys, "warm", "--arch", "sm_90", *argv, "--dry-run")
    assert code == cli.EXIT_USAGE
    _assert_one_line_error(err, *fragments)


@pytest.mark.nvrtc
def test_warm_named_spec(capsys, cache_dir):
    """--spec names a RopeSpec directly by its fields."""
    spec = warm.specs_for_call(warm.model_call("llama3-8b"), max_tokens=1)[0]
    fields = json.dumps(dataclasses.asdict(spec))  # mrope_section, if any: a list in JSON
    code, out, err = run_cli(capsys, "warm", "--arch", "sm_90", "--spec", fields, "--quiet")
    assert code == 0, err
    (entry,) = jit.cache_entries()
    assert entry.meta["spec"] == spec.words()


@pytest.mark.parametrize("argv, status, fragments", [
    (["warm", "--arch", "hopper", "--model", "llama3-8b"], 2, ["argument --arch", "'hopper'"]),
    (["warm", "--arch", "sm_90", "--model", "llama3-8b", "--dtype", "fp8"], 2, ["--dtype", "'fp8'"]),
    (["warm", "--arch", "sm_90", "--model", "llama3-9b"], 2, ["--model", "llama3-9b"]),
    (["warm", "--arch", "sm_90", "--cache-dtype", "int8", "--model", "phi-2"], 2, ["--cache-dtype"]),
    (["warm", "--arch", "sm_90", "--model", "llama3-8b", "--tp", "3"], 2, ["32 q heads", "3 ranks"]),
    (["warm", "--arch", "sm_90", "--heads", "8", "2"], 2, ["--head-size"]),
    (["warm", "--arch", "sm_90", "--heads", "0", "2", "--head-size", "64"], 2, ["Q >= 1"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--heads", "8", "2"], 2, ["not both"]),
    (["warm", "--arch", "sm_90", "--heads", "8", "2", "--head-size", "64", "--rotary-dim", "128"],
     2, ["--rotary-dim 128: exceeds --head-size 64"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--rotary-dim", "96"],
     2, ["--rotary-dim 96: exceeds the head size 80 of --model phi-2"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--plan-arg", "no_such_knob=1"], 2,
     ["--plan-arg no_such_knob: unknown planner argument 'no_such_knob'", "valid names: "]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--plan-arg", "head_size=64"], 2,
     ["--plan-arg head_size", "set by --head-size"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--plan-arg", "scaling=yarn"], 2,
     ["--plan-arg scaling", "set by --scaling"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--scaling", "yarn"], 2,
     ["--scaling yarn: needs --cache-dtype on-the-fly"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--scaling", "linear", "yarn",
      "--cache-dtype", "float32", "bfloat16"], 2, ["--scaling linear yarn: needs --cache-dtype on-the-fly"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--cache-dtype", "on-the-fly",
      "--scaling", "ntk"], 2, ["--scaling: expected one of", "'ntk'", "(warming 32/32 heads"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--mrope-section", "4", "4", "4"], 2,
     ["--mrope-section: expected", "rotary_dim/2 = 16", "(warming 32/32 heads"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--mrope-section", "4", "4", "8",
      "--positions", "indptr"], 2, ["--mrope-section: needs --positions positions"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--mrope-interleaved"], 2,
     ["--mrope-interleaved: needs --mrope-section"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--plan-arg", "=1"], 2, ["NAME=VALUE"]),
    (["warm", "--arch", "sm_90", "--spec", '{"head_size": 64}'], 2, ["--spec", "missing"]),
    (["warm", "--arch", "sm_90", "--spec", "not json"], 2, ["--spec"]),
    (["warm", "--arch", "sm_90"], 2, ["nothing to warm"]),
    (["warm", "--model", "phi-2"], 2, ["--arch"]),
    (["warm", "--arch", "sm_90", "--model", "phi-2", "--max-tokens", "0"], 2, ["--max-tokens"]),
    (["cache"], 2, ["ACTION"]),
    (["frobnicate"], 2, ["invalid choice"]),
])
def test_usage_errors_are_one_line(capsys, argv, status, fragments):
    code, out, err = run_cli(capsys, *argv)
    assert code == status
    _assert_one_line_error(err, *fragments)


@pytest.mark.parametrize("argv, fragments", [
    (["--heads", "8", "2", "--head-size", "127"], ["--head-size 127: the rotary dim", "even"]),
    (["--heads", "8", "2", "--head-size", "127", "--cache-dtype", "on-the-fly"],
     ["--head-size 127: the rotary dim", "even"]),
    (["--heads", "8", "2", "--head-size", "128", "--rotary-dim", "63"],
     ["--rotary-dim 63: expected an even number"]),
    (["--model", "phi-2", "--rotary-dim", "33"], ["--rotary-dim 33: expected an even number"]),
    # past the planner's limit of 512 threads per head row: its refusal, with the option named
    (["--heads", "8", "2", "--head-size", "2050"], ["--head-size: 2050 needs 1025 threads",
                                                    "(warming 8/2 heads x 2050"]),
])
def test_shape_errors_name_the_option_not_the_planner_argument(capsys, argv, fragments):
    """A rotary dim the planner refuses is reported against the option that set it (the
    head size when --rotary-dim is absent), never as the planner's 'cos_sin_cache width
    (rotary_dim)' or 'rotary_dim' argument."""
    code, _, err = run_cli(capsys, "warm", "--arch", "sm_90", *argv, "--dry-run")
    assert code == cli.EXIT_USAGE
    _assert_one_line_error(err, *fragments)
    assert "cos_sin_cache" not in err and "rotary_dim" not in err, err


def test_plan_arg_names_are_the_planners_free_arguments(capsys):
    """An unknown --plan-arg lists the valid names, never Python's 'unexpected keyword
    argument': each listed name is a call field warming accepts (warm.PLAN_ARGS) that no
    option sets, and each is accepted."""
    code, _, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "phi-2",
                           "--plan-arg", "foo=1", "--dry-run")
    assert code == cli.EXIT_USAGE and "unexpected keyword" not in err
    _assert_one_line_error(err, "--plan-arg foo: unknown planner argument 'foo'; valid names: ")
    listed = err.strip().split("valid names: ")[1].split(", ")
    assert "inverse" in listed  # the backward pass's kernels, warmed with inverse=True
    for name in listed:
        assert name in warm.PLAN_ARGS and name not in cli._OPTION_OF_PLANNER_ARG, name
    code, out, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "phi-2",
                             "--plan-arg", "inverse=True", "--dry-run")
    assert code == 0, err
    assert all(" inverse" in line for line in out.strip().splitlines()[:-1]), out


def test_scaling_with_a_cache_and_on_the_fly(capsys):
    """--scaling with both a cache and on the fly is no usage error: each variant is
    warmed on the fly, and the cache's kernels once (the same for every variant)."""
    code, out, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "phi-2",
                             "--cache-dtype", "float32", "on-the-fly", "--scaling", "linear", "yarn",
                             "--max-tokens", "4096", "--dry-run")
    assert code == 0, err
    sms, knobs = sorted(warm.sm_counts_for("sm_90")), tuning.knob_choices(["sm_90"])  # as the CLI
    phi = warm.model_call("phi-2")
    expected = warm.specs_for_call(phi, max_tokens=4096, sm_counts=sms, knobs=knobs)
    for scaling in ("linear", "yarn"):
        fly = dataclasses.replace(phi, cache_dtype=None, plan_kwargs={"scaling": scaling})
        expected += warm.specs_for_call(fly, max_tokens=4096, sm_counts=sms, knobs=knobs)
    assert out.strip().splitlines()[:-1] == [s.words() for s in dict.fromkeys(expected)]
    assert any(" on the fly yarn " in line for line in out.splitlines())


def _warm_parser() -> argparse.ArgumentParser:
    (subparsers,) = [a for a in cli.build_parser()._actions
                     if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices["warm"]


def test_warm_help_shows_every_default(capsys):
    """`warm --help` gives the default of every option that has one (--positions,
    --placement, --layout among them), each in its own option's help."""
    code, out, _ = run_cli(capsys, "warm", "--help")
    assert code == 0
    body = " ".join(out.split("\noptions:\n", 1)[1].split())  # the options' help, unwrapped
    options = [a for a in _warm_parser()._actions if a.option_strings]
    starts = {}
    for action in options:
        name = action.option_strings[-1]
        match = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", body)
        assert match, name
        starts[name] = match.start()
    ordered = sorted(starts.items(), key=lambda item: item[1])
    segment = {name: body[start:(ordered[i + 1][1] if i + 1 < len(ordered) else len(body))]
               for i, (name, start) in enumerate(ordered)}
    with_default = [a for a in options if a.default not in (None, False, [], argparse.SUPPRESS)]
    assert {a.option_strings[-1] for a in with_default} >= {"--positions", "--placement", "--layout",
                                                            "--dtype", "--cache-dtype", "--tp"}
    for action in with_default:
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
        assert f"(default: {shown})" in segment[action.option_strings[-1]], (action.option_strings, segment)


@pytest.mark.nvrtc
def test_warm_unsupported_arch(capsys):
    """An arch NVRTC cannot compile for: usage error listing what it supports."""
    code, _, err = run_cli(capsys, "warm", "--arch", "sm_12", "--model", "phi-2")
    assert code == cli.EXIT_USAGE
    _assert_one_line_error(err, "cannot compile for sm_12", "sm_90")


@pytest.mark.nvrtc
def test_warm_unwritable_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(jit.ENV_CACHE_DIR, str(_under_a_file(tmp_path)))
    c0 = jit.stats.compiles
    code, _, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "phi-2", "--quiet")
    assert code == cli.EXIT_FAILED and jit.stats.compiles == c0
    _assert_one_line_error(err, "not writable", jit.ENV_CACHE_DIR)


def _make_read_only(directory: Path, monkeypatch) -> None:
    """chmod a-w `directory` and its files. Root writes there all the same: then rope_jit
    is shown the directory as unwritable and any write fails, as they would for another
    user (tests/test_jit_cache.py runs that case for real, as user nobody)."""
    for path in [directory, *directory.iterdir()]:
        path.chmod(path.stat().st_mode & ~0o222)
    if os.access(directory, os.W_OK):
        def refused(*args, **kwargs):
            raise PermissionError(13, "Permission denied (read-only for this test)")

        monkeypatch.setattr(jit, "unwritable_reason", lambda directory=None: "PermissionError: read-only")
        monkeypatch.setattr(jit, "write_atomic", refused)
        monkeypatch.setattr(jit, "_entry_lock", refused)


@pytest.mark.nvrtc
def test_warm_of_a_read_only_directory(capsys, cache_dir, monkeypatch):
    """All cached there: nothing to write, exit 0, every entry verified. Something missing:
    exit 1, one line saying the directory is not writable and how many kernels are missing."""
    argv = ["warm", "--arch", "sm_90", "--model", "phi-2", "--max-tokens", "1", "--quiet"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    n = int(out.split("compiled ")[1].split(",")[0])
    _make_read_only(cache_dir, monkeypatch)
    try:
        jit.clear_memory()
        hits = jit.stats.disk_hits
        code, out, err = run_cli(capsys, *argv)
        assert code == 0 and err == "", err
        assert f"compiled 0, already cached {n}," in out and jit.stats.disk_hits == hits + n
        code, out, err = run_cli(capsys, *argv, "--positions-kernel")
        assert code == cli.EXIT_FAILED and out == ""
        _assert_one_line_error(err, f"cache directory {cache_dir} is not writable",
                               f"1 of {n + 1} kernels are not cached there", jit.ENV_CACHE_DIR)
    finally:
        cache_dir.chmod(0o755)


def test_warm_without_nvrtc(capsys, monkeypatch):
    """NVRTC missing (here: its loader raising as it does without CuPy): exit 1, one line
    naming the install extra."""
    def missing():
        raise ImportError("rope_jit needs CuPy for this: install `pip install rope_jit[cuda12]`\nmore")

    monkeypatch.setattr(jit, "nvrtc_module", missing)
    code, _, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "phi-2")
    assert code == cli.EXIT_FAILED
    _assert_one_line_error(err, "NVRTC is not usable", "rope_jit[cuda12]")


def test_warm_without_cupy_subprocess():
    r = _python("""
        import sys
        sys.modules['cupy'] = None
        from rope_jit.cli import main
        sys.exit(main(['warm', '--arch', 'sm_90', '--model', 'phi-2']))
    """)
    assert r.returncode == cli.EXIT_FAILED
    _assert_one_line_error(r.stderr, "NVRTC is not usable", "cupy")


@pytest.mark.nvrtc
def test_warm_compile_error(capsys, monkeypatch):
    """A kernel that fails to compile: exit 1 with NVRTC's message, no traceback."""
    def failing(*args, **kwargs):
        raise jit.CompileError("NVRTC failed for sm_90: injected failure")

    monkeypatch.setattr(jit, "compile_cubin", failing)
    code, _, err = run_cli(capsys, "warm", "--arch", "sm_90", "--model", "phi-2", "--quiet")
    assert code == cli.EXIT_FAILED
    _assert_one_line_error(err, "injected failure")


@pytest.mark.skipif(HAS_GPU, reason="checks the message of a machine without a GPU")
def test_warm_native_without_gpu(capsys):
    code, _, err = run_cli(capsys, "warm", "--arch", "native", "--model", "phi-2")
    assert code == cli.EXIT_USAGE
    _assert_one_line_error(err, "no GPU is visible")


# ------------------------------------------------------------------ cache list / clear

@pytest.mark.nvrtc
def test_cache_list_marks_stale_and_damaged_and_clear_stale(capsys, cache_dir, monkeypatch):
    """Entries of another rope_jit version and damaged files are marked in the list;
    clear --stale removes exactly those; files that are not rope_jit's stay."""
    phi = warm.specs_for_call(warm.model_call("phi-2"), max_tokens=1)[0]
    jit.build(phi, "sm_90")
    monkeypatch.setattr(jit, "__version__", "9.9.9")  # as if the package were upgraded
    jit.build(phi, "sm_90")                            # a current entry under the new key
    damaged = cache_dir / ("f" * 40 + ".cubin")
    damaged.write_bytes(b"not an entry")
    keep = cache_dir / "notes.txt"
    keep.write_text("the user's")
    code, out, _ = run_cli(capsys, "cache", "list")
    rows = out.strip().splitlines()[1:-1]
    assert code == 0 and len(rows) == 3
    assert sum("[stale: rope_jit 0.1.0, this install 9.9.9]" in r for r in rows) == 1
    assert sum(r.startswith("ffffffffffff") and "[damaged]" in r for r in rows) == 1
    assert sum(r.endswith(phi.words()) for r in rows) == 1  # the current one, unmarked
    code, out, _ = run_cli(capsys, "cache", "clear", "--stale")
    assert code == 0 and out.startswith("removed 2 stale or damaged entries")
    (left,) = jit.cache_entries()
    assert left.meta["rope_jit"] == "9.9.9" and keep.exists()


@pytest.mark.nvrtc
def test_cache_clear_removes_stray_files_only_ours(capsys, cache_dir):
    jit.build(warm.specs_for_call(warm.model_call("phi-2"), max_tokens=1)[0], "sm_90")
    (cache_dir / ".tmp-abc123.cubin").write_bytes(b"partial")
    (cache_dir / ("a" * 40 + ".cubin.lock")).write_bytes(b"")
    (cache_dir / "notes.txt").write_text("the user's")
    (cache_dir / "abc.cubin").write_bytes(b"not a key name")
    code, out, _ = run_cli(capsys, "cache", "clear")
    assert code == 0
    assert out.startswith("removed 1 entry (") and "and 2 stray temp/lock files" in out
    assert sorted(p.name for p in cache_dir.iterdir()) == ["abc.cubin", "notes.txt"]


def test_cache_clear_and_list_of_a_missing_directory(capsys, cache_dir):
    code, out, _ = run_cli(capsys, "cache", "list")
    assert code == 0 and out.strip() == f"no entries in {cache_dir}"
    code, out, _ = run_cli(capsys, "cache", "clear")
    assert code == 0 and out.strip() == (f"removed 0 entries (0 B) and 0 stray temp/lock files "
                                         f"from {cache_dir}")
    assert not cache_dir.exists()


def test_tune_needs_a_gpu_and_names_bad_options(capsys):
    """tune measures on a GPU: without one it says so (exit 1); shape errors are usage
    errors named by option, before anything is measured."""
    code, _, err = run_cli(capsys, "tune", "--model", "llama3-8b", "--head-size", "64")
    assert code == cli.EXIT_USAGE and "--model or --heads/--head-size" in err
    code, _, err = run_cli(capsys, "tune", "--heads", "8", "2", "--head-size", "127")
    assert code == cli.EXIT_USAGE and err.startswith("rope-jit tune: error: --head-size 127")
    if not HAS_GPU:
        code, _, err = run_cli(capsys, "tune", "--model", "llama3-8b", "--tokens", "16")
        assert code == cli.EXIT_FAILED and "tuning measures on a GPU" in err
