"""Run every rope_jit kernel family under NVIDIA compute-sanitizer (issue 12 item 6): the
program scripts/sanitizer_cases.py once unsanitized, then under memcheck, initcheck,
racecheck and synccheck. One summary line per tool; exit status 0 only if the
unsanitized run passed and every tool reported 0 errors with the program passing.

    python scripts/compute_sanitizer.py [--out DIR] [--tools memcheck racecheck ...]

* The unsanitized run first compiles every kernel into a kernel cache directory
  (ROPE_JIT_CACHE_DIR if set, else a fresh temporary one) that the sanitized runs share,
  so they only load cubins: an NVRTC compile inside a sanitized process is slow.
* memcheck and initcheck run with PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is then
  its own cudaMalloc, so an access past a tensor is past an allocation (torch's caching
  allocator would hide it inside a larger block). Leak checking stays off (the CUDA
  contexts of torch and CuPy keep allocations until exit).
* initcheck reports reads of device memory nothing wrote (its unused-memory report, which
  --track-unused-memory turns on, stays off: allocations never fully written are fine).
* Each tool's whole output (the program's and the sanitizer's) goes to DIR/TOOL.log; the
  summary lines also to DIR/summary.txt. compute-sanitizer is taken from --sanitizer,
  $COMPUTE_SANITIZER, PATH, /usr/local/cuda/bin or /usr/local/cuda-*/bin.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "scripts" / "sanitizer_cases.py"
TOOLS = ("memcheck", "initcheck", "racecheck", "synccheck")
# Tools whose findings depend on exact allocation bounds: run without torch's caching allocator.
EXACT_ALLOCATIONS = {"memcheck", "initcheck"}
# Optional flags ("*": every tool), passed only when `compute-sanitizer --help` lists them:
# a generous wait for the Python program to attach; only the program itself instrumented
# (not helpers it may spawn, such as ldconfig). (initcheck's --track-unused-memory is a
# flag that turns the unused-memory report on; it is off by default and stays off.)
OPTIONAL_FLAGS = {"*": [("--launch-timeout", "120"), ("--target-processes", "application-only")]}


@dataclass
class RunResult:
    name: str                      # "unsanitized" or the tool
    returncode: int | None         # None: timed out, or not started (see note)
    seconds: float
    log: Path | None
    errors: int | None = None      # the sanitizer's ERROR SUMMARY; None: none printed
    warnings: int | None = None    # racecheck's warnings (possible hazards), reported only
    passed: int | None = None      # the program's own verdict
    failed: int | None = None
    findings: tuple = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        if self.returncode != 0 or self.failed != 0 or self.passed is None:
            return False
        return self.name == "unsanitized" or self.errors == 0

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        parts = []
        if self.name != "unsanitized":
            parts.append("no ERROR SUMMARY" if self.errors is None else
                         f"{self.errors} error{'s' if self.errors != 1 else ''}")
            if self.warnings:
                parts.append(f"{self.warnings} racecheck warnings")
        parts.append("program: no result line" if self.passed is None else
                     f"program: {self.passed} cases passed, {self.failed} failed")
        if self.returncode is not None:
            parts.append(f"exit {self.returncode}")
        parts.append(f"{self.seconds:.1f} s")
        if self.note:
            parts.append(self.note)
        text = f"{self.name:<12} {verdict}  " + "; ".join(parts)
        if self.log is not None:
            text += f"  [{self.log}]"
        for finding in self.findings:
            text += f"\n             {finding}"
        return text


# ------------------------------------------------------------------ parsing the output

_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACECHECK = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, "
                        r"(\d+) warnings?\)")
_DRIVER = re.compile(r"^sanitizer_cases: (\d+) passed, (\d+) failed", re.MULTILINE)
_PREFIX = "========= "
_NOT_FINDINGS = ("ERROR SUMMARY", "RACECHECK SUMMARY", "COMPUTE-SANITIZER", "LEAK SUMMARY")


def error_count(text: str) -> int | None:
    """The last 'ERROR SUMMARY: N errors' of a compute-sanitizer output (racecheck says
    'RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)' instead), or None."""
    found = _ERROR_SUMMARY.findall(text)
    if found:
        return int(found[-1])
    races = _RACECHECK.findall(text)
    return int(races[-1][1]) if races else None


def racecheck_warnings(text: str) -> int | None:
    found = _RACECHECK.findall(text)
    return int(found[-1][2]) if found else None


def driver_result(text: str) -> tuple:
    """(passed, failed) from sanitizer_cases.py's last line, or (None, None)."""
    found = _DRIVER.findall(text)
    return tuple(int(v) for v in found[-1]) if found else (None, None)


def findings(text: str, limit: int = 5) -> tuple:
    """The first distinct report headlines of a sanitizer output ('Invalid __global__
    read of size 16 bytes', 'Program hit cudaErrorInvalidValue ...'), for the summary."""
    out = []
    for line in text.splitlines():
        if not line.startswith(_PREFIX):
            continue
        body = line[len(_PREFIX):]
        if not body or body[0].isspace() or body.startswith(_NOT_FINDINGS):
            continue
        if body not in out:
            out.append(body)
        if len(out) == limit:
            break
    return tuple(out)


# ------------------------------------------------------------------ running


def find_sanitizer(explicit: str | None) -> str | None:
    for candidate in (explicit, os.environ.get("COMPUTE_SANITIZER"),
                      shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
                      *sorted(glob.glob("/usr/local/cuda-*/bin/compute-sanitizer"), reverse=True)):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)   # the runs start in the repository root
    return None


@functools.lru_cache(maxsize=None)
def help_text(sanitizer: str) -> str:
    try:
        done = subprocess.run([sanitizer, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


def supported_flags(sanitizer: str, tool: str) -> list:
    """OPTIONAL_FLAGS of `tool` that this compute-sanitizer's --help mentions."""
    text = help_text(sanitizer)
    wanted = OPTIONAL_FLAGS["*"] + OPTIONAL_FLAGS.get(tool, [])
    return [arg for flag, value in wanted if flag in text for arg in (flag, value)]


def sanitizer_command(sanitizer: str, tool: str, program: list) -> list:
    return [sanitizer, "--tool", tool, "--error-exitcode", "1",
            *supported_flags(sanitizer, tool), *program]


def tool_environment(base: dict, tool: str | None, cache_dir: str) -> dict:
    env = dict(base)
    env["ROPE_JIT_CACHE_DIR"] = cache_dir
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p)
    if tool in EXACT_ALLOCATIONS:
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    else:
        env.pop("PYTORCH_NO_CUDA_MEMORY_CACHING", None)
    return env


def run_logged(name: str, command: list, env: dict, log: Path, timeout: float) -> RunResult:
    """Run `command`, its stdout and stderr into `log`, and read the verdicts back."""
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=ROOT, start_new_session=True)
        except OSError as e:
            return RunResult(name, None, 0.0, log, note=f"could not start: {e}")
        note = ""
        try:
            returncode = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)   # the sanitizer and the program it started
            proc.wait()
            returncode, note = None, f"killed after {timeout:.0f} s"
    text = log.read_text(errors="replace")
    passed, failed = driver_result(text)
    return RunResult(name, returncode, time.perf_counter() - start, log,
                     errors=None if name == "unsanitized" else error_count(text),
                     warnings=racecheck_warnings(text), passed=passed, failed=failed,
                     findings=findings(text) if name != "unsanitized" else (), note=note)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the logs and summary.txt (default: a new "
                             "temporary directory, printed)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS),
                        help="sanitizer tools to run, in this order (default: all four)")
    parser.add_argument("--case", action="append", metavar="NAME",
                        help="run only this sanitizer_cases.py case (repeatable)")
    parser.add_argument("--sanitizer", help="path of compute-sanitizer")
    parser.add_argument("--cache-dir", help="kernel cache directory shared by the runs "
                        "(default: $ROPE_JIT_CACHE_DIR, else a new temporary directory)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one run may take (default 300)")
    parser.add_argument("--deadline", type=float, default=540.0,
                        help="seconds for everything: a tool not started by then is "
                             "reported as not run (default 540)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="rope_jit_sanitizer_"))
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.txt"
    summary.write_text("")

    def report(line: str) -> None:
        print(line, flush=True)
        with open(summary, "a") as f:
            f.write(line + "\n")

    sanitizer = find_sanitizer(args.sanitizer)
    if sanitizer is None:
        report("compute-sanitizer not found (--sanitizer, $COMPUTE_SANITIZER, PATH, "
               "/usr/local/cuda/bin, /usr/local/cuda-*/bin)")
        return 2
    try:
        version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        version = []
    cache_dir = args.cache_dir or os.environ.get("ROPE_JIT_CACHE_DIR")
    own_cache = cache_dir is None
    if own_cache:
        cache_dir = tempfile.mkdtemp(prefix="rope_jit_sanitizer_cache_")
    try:
        return run_all(args, out, report, sanitizer, version, cache_dir, start)
    finally:
        if own_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)


def run_all(args, out: Path, report, sanitizer: str, version: list, cache_dir: str,
            start: float) -> int:
    report(f"compute-sanitizer: {sanitizer} ({version[-1] if version else 'version unknown'}); "
           f"kernel cache: {cache_dir}; logs: {out}")
    program = [sys.executable, str(DRIVER)] + [a for c in args.case or [] for a in ("--case", c)]

    def remaining() -> float:
        return args.deadline - (time.perf_counter() - start)

    results = [run_logged("unsanitized", program, tool_environment(os.environ, None, cache_dir),
                          out / "unsanitized.log", min(args.timeout, remaining()))]
    report(results[0].line())
    if results[0].returncode == 2 or results[0].passed is None:
        report("the program did not run its cases unsanitized; no sanitizer run started")
        return 1
    for tool in args.tools:
        if remaining() < 10:
            report(f"{tool:<12} FAIL  not run: the {args.deadline:.0f} s deadline has passed")
            results.append(RunResult(tool, None, 0.0, None, note="not run"))
            continue
        command = sanitizer_command(sanitizer, tool, program)
        result = run_logged(tool, command, tool_environment(os.environ, tool, cache_dir),
                            out / f"{tool}.log", min(args.timeout, remaining()))
        results.append(result)
        report(result.line())
    ok = all(r.ok for r in results)
    report(f"compute-sanitizer over rope_jit: {'PASS' if ok else 'FAIL'} "
           f"({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
