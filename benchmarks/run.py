#!/usr/bin/env python
"""Side-by-side RoPE benchmark: rope_jit against FlashInfer, Liger-Kernel, vLLM, the PyTorch
formula (eager and torch.compile), a device copy, the pattern ceiling and the chain floor;
one GPU, one process, one run.

    python benchmarks/run.py --quick     # smoke run: 2 token counts, fewer replays
    python benchmarks/run.py             # the full sweep
    python benchmarks/run.py --help      # options (--tokens, --shapes, --impls, --out...)
    python benchmarks/run.py --dry-run   # no GPU: the whole pipeline on the CPU

The modules (see benchmarks/README.md):

* impls.py: op families (``rope`` today), their shapes and implementations, the bytes a
  call is charged, the comparisons and targets; peers.py: how each peer is loaded
  (FlashInfer's .so through ctypes, Liger's wheel, vLLM, the PyTorch formula);
* checks.py: every implementation against the float64 reference before it is timed;
* timing.py: CUDA-graph replay over rotating buffer sets, the copy; ceilings.py: the
  pattern-ceiling and chain-floor kernels;
* report.py: results.json, RESULTS.md and bandwidth.png, kept per GPU;
* this file: the arguments and the sweep.

For each op family, shape and token count T (the shape's check row first: the largest
T <= 1024 asked for), one row: a device copy of one input set, the pattern-ceiling kernel
and, at decode rows, the chain floor (the same with a position -> cache-row load per
token), then each implementation, checked on the check row (one that fails is WRONG and
never timed) and timed by CUDA-graph replay (median over replays; an implementation
allowed to, when capture fails, by events around eager calls, marked †). Then host time
per warm call: back-to-back calls at one token, ``time.perf_counter`` around the loop.

Every failure, refusal or missing package becomes a status and a note, never a crash.
Outputs (``--out``, default ``benchmarks/results/<gpu>/``, see report.gpu_slug):
``results.json`` (everything; rewritten after each shape so a crash keeps what was
measured), ``RESULTS.md`` and ``bandwidth.png``; stdout ends with the summary table.
``--budget-s`` bounds the sweep's wall time: rows not started by then are noted, not
measured, and the files are written.

FlashInfer: ``bash ../shared/peers/flashinfer/build.sh 90 .peers`` builds
``.peers/libfi_rope.so``. Liger-Kernel: its wheel carried in ``.whl`` and installed with
``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` on the GPU machine, then
``PYTHONPATH=/tmp/site``. Both are git-ignored folders to name in the device call's carry.

``--dry-run`` runs the same pipeline on the CPU (the PyTorch formula, its check, the
pattern and chained touches as torch ops, the report; GPU-only implementations report
errors) to test this script without a GPU, writing to a temporary folder unless ``--out`` is given. Its
timings mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # this checkout's rope_jit, installed or not
sys.path.insert(0, str(HERE))  # the benchmark's modules

import numpy as np  # noqa: E402
import torch  # noqa: E402

import rope_jit  # noqa: E402
import report  # noqa: E402
from ceilings import chain_calls, pattern_calls  # noqa: E402
from errors import FatalCuda, Unavailable, short_error  # noqa: E402
from impls import FAMILIES, Impl, OpFamily  # noqa: E402
from peers import Peers, compile_settings, load_peers  # noqa: E402
from timing import (CpuTimer, GpuTimer, buffer_sets, copy_bandwidth, cpu_copy_bandwidth,  # noqa: E402
                    ensure_cuda_usable, free_memory, host_time_per_call, time_copy,
                    time_with_fallback)

DEFAULT_TOKENS = (1, 4, 16, 128, 1024, 8192, 32768)
QUICK_TOKENS = (16, 8192)  # the check row (16) and one bandwidth-bound row: under a minute
DRY_RUN_TOKENS = (1, 16, 128)
CHECK_TOKENS_MAX = 1024          # correctness is checked once per shape, at T <= this
DEFAULT_REPLAYS, QUICK_REPLAYS = 30, 10
DEFAULT_HOST_CALLS, QUICK_HOST_CALLS, DRY_RUN_HOST_CALLS = 10_000, 2_000, 200
# Wall-time bounds of the sweep: the device allows 10-minute commands, and a full run is
# expected in a few (108 s on an H100 before Liger and the pattern ceiling joined).
DEFAULT_BUDGET_S, QUICK_BUDGET_S = 420.0, 150.0


# ================================================================== records

class Recorder:
    """Rows, checks, errors; the derived figures of each row."""

    def __init__(self, copy_bw: float):
        self.copy_bw = copy_bw
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.errors: list[dict] = []

    def row(self, family: str, shape: str, tokens: int, impl: str, status: str, nbytes: int,
            seconds: float | None = None, copy_seconds: float | None = None,
            pattern_bandwidth: float | None = None, timing: str | None = None,
            note: str | None = None) -> dict:
        """pattern_bandwidth: the row's pattern ceiling, for in-place implementations only."""
        r = dict(family=family, shape=shape, tokens=tokens, impl=impl, status=status,
                 seconds=seconds, bytes=nbytes, bandwidth=None, percent_of_copy=None,
                 percent_of_pattern=None, x_copy=None, timing=timing, note=note)
        if seconds:
            r["bandwidth"] = nbytes / seconds
            r["percent_of_copy"] = 100.0 * r["bandwidth"] / self.copy_bw
            if pattern_bandwidth:
                r["percent_of_pattern"] = 100.0 * r["bandwidth"] / pattern_bandwidth
            if copy_seconds:
                r["x_copy"] = seconds / copy_seconds
        self.rows.append(r)
        return r

    def error(self, where: str, e: BaseException) -> None:
        self.errors.append(dict(where=where, error=short_error(e),
                                traceback="".join(traceback.format_exception(type(e), e, e.__traceback__))))


class Deadline:
    """The sweep's wall-time budget; `missed` lists the rows it cut."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.perf_counter() + seconds
        self.missed: list[str] = []

    def expired(self) -> bool:
        return time.perf_counter() > self.end


# ================================================================== one row

def measure_references(family: OpFamily, ctx, tokens: int, sets: int, timer,
                       rec: Recorder) -> tuple[float | None, float | None]:
    """The copy, pattern-ceiling and chain-floor rows: (copy seconds, pattern bandwidth),
    None where not measured."""
    s, device, fam = ctx.shape, ctx.device, family.name
    per_set = family.input_bytes(s, tokens)
    copy = _reference_row(rec, fam, s.name, tokens, "copy", 2 * per_set,
                          lambda: time_copy(per_set, sets, timer, device), device, None,
                          is_copy=True)
    copy_seconds = copy["seconds"] if copy["status"] == "ok" else None
    pattern_bw = None
    pattern, chain = family.touch_pattern(s, tokens), family.chain_pattern(s, tokens)
    if pattern is not None:
        r = _reference_row(rec, fam, s.name, tokens, "pattern_ceiling", pattern.moved_bytes,
                           lambda: timer.graph(pattern_calls(pattern, sets, device)), device,
                           copy_seconds)
        pattern_bw = r["bandwidth"] if r["status"] == "ok" else None
    if chain is not None:
        _reference_row(rec, fam, s.name, tokens, "chain_floor", chain.moved_bytes,
                       lambda: timer.graph(chain_calls(chain, sets, device)), device,
                       copy_seconds)
    return copy_seconds, pattern_bw


def _reference_row(rec: Recorder, fam: str, shape: str, tokens: int, name: str, nbytes: int,
                   measure, device, copy_seconds: float | None, *, is_copy: bool = False) -> dict:
    """Time one reference row (the copy; ceilings.py's pattern ceiling and chain floor):
    measure() -> seconds by graph replay, charged nbytes (is_copy: the copy row itself,
    whose x copy is 1)."""
    try:
        seconds = measure()
        r = rec.row(fam, shape, tokens, name, "ok", nbytes, seconds=seconds,
                    copy_seconds=seconds if is_copy else copy_seconds,
                    timing="cuda-graph")
    except FatalCuda:
        raise
    except Exception as e:
        rec.error(f"{shape} T={tokens} {name}", e)
        ensure_cuda_usable(device)
        r = rec.row(fam, shape, tokens, name, "error", nbytes, note=short_error(e))
    free_memory(device)
    return r


def measure_impl(family: OpFamily, impl: Impl, ctx, tokens: int, inputs: list[tuple], case,
                 verdicts: dict, copy_seconds, pattern_bw, timer, rec: Recorder) -> dict:
    """Check (on the shape's check row) then time one implementation on one row."""
    s = ctx.shape
    nbytes = family.bytes_per_call(s, tokens, impl)

    def row(status, **kw):
        return rec.row(family.name, s.name, tokens, impl.name, status, nbytes,
                       copy_seconds=copy_seconds,
                       pattern_bandwidth=pattern_bw if impl.inplace else None, **kw)

    verdict = verdicts.get(impl.name)
    if verdict is not None and verdict[0] != "ok":
        return row(verdict[0], note=verdict[1])
    if verdict is None and case is None:  # its check never ran: never time it unchecked
        return row("error", note="not checked (its check row failed)")
    try:
        apply = impl.prepare(ctx, tokens)
        if case is not None:
            result = dict(family.check(impl, apply, ctx, case), family=family.name)
            rec.checks.append(result)
            if not result["ok"]:
                verdicts[impl.name] = ("WRONG", "; ".join(result["problems"]))
                return row("WRONG", note=verdicts[impl.name][1])
            verdicts[impl.name] = ("ok", None)
        calls = [(lambda args=args: apply(*args)) for args in inputs]
        seconds, method, note = time_with_fallback(calls, timer, ctx.device, impl.eager_fallback)
        return row("ok", seconds=seconds, timing=method, note=note)
    except Unavailable as u:
        verdicts[impl.name] = (u.status, u.reason)
        return row(u.status, note=u.reason)
    except FatalCuda:
        raise
    except Exception as e:
        rec.error(f"{s.name} T={tokens} {impl.name}", e)
        ensure_cuda_usable(ctx.device)
        unchecked = case is not None and impl.name not in verdicts
        stage = "prepare/check" if unchecked else "prepare/time"
        if unchecked:
            # an implementation that cannot even be checked on this shape (a compile
            # failure, an exception) is skipped for the shape's other rows
            verdicts[impl.name] = ("error", f"{stage}: {short_error(e)}")
        return row("error", note=f"{stage}: {short_error(e)}")


def measure_row(family: OpFamily, ctx, tokens: int, impls: list[Impl], is_check_row: bool,
                verdicts: dict, timer, rec: Recorder) -> None:
    s, device = ctx.shape, ctx.device
    sets = buffer_sets(family.input_bytes(s, tokens), min_total=timer.min_buffer_total)
    copy_seconds, pattern_bw = measure_references(family, ctx, tokens, sets, timer, rec)
    try:
        inputs = family.make_inputs(ctx, tokens, sets)
        case = family.make_check_case(ctx, tokens) if is_check_row else None
    except FatalCuda:
        raise
    except Exception as e:  # out of memory, most likely
        rec.error(f"{s.name} T={tokens} inputs", e)
        ensure_cuda_usable(device)
        for impl in impls:
            if is_check_row:
                verdicts.setdefault(impl.name, ("error", f"check row: {short_error(e)}"))
            rec.row(family.name, s.name, tokens, impl.name, "error",
                    family.bytes_per_call(s, tokens, impl), note=f"inputs: {short_error(e)}")
        return
    for impl in impls:
        measure_impl(family, impl, ctx, tokens, inputs, case, verdicts, copy_seconds, pattern_bw,
                     timer, rec)
    del inputs, case
    free_memory(device)


def progress_line(rec: Recorder, family: str, shape: str, tokens: int) -> str:
    cells = []
    for r in rec.rows:
        if r["family"] == family and r["shape"] == shape and r["tokens"] == tokens:
            if r["status"] == "ok":
                text = f"{r['impl']} {report.fmt_us(r['seconds'])} {report.fmt_pct(r['percent_of_copy'])}"
                if r["percent_of_pattern"] is not None:
                    text += f"/{report.fmt_pct(r['percent_of_pattern'])}p"
                cells.append(text)
            else:
                cells.append(f"{r['impl']} {r['status']}")
    return f"{shape:10s} T={tokens:6d} | " + " | ".join(cells)


def check_tokens_for(tokens: list[int]) -> int:
    """The moderate T every implementation is checked at: the largest <= 1024 asked for."""
    small = [t for t in tokens if t <= CHECK_TOKENS_MAX]
    return max(small) if small else min(tokens)


def sweep_shape(family: OpFamily, shape, tokens: list[int], impls: list[Impl], device, peers: Peers,
                timer, rec: Recorder, deadline: Deadline, notes: list) -> None:
    ctx = family.make_context(shape, device, peers)
    check_tokens = check_tokens_for(tokens)
    verdicts: dict = {}  # impl name -> (status, note), settled by the check row
    # the check row first, so every implementation is checked before it is timed
    order = [check_tokens] + [t for t in tokens if t != check_tokens]
    for i, t in enumerate(order):
        if deadline.expired():
            deadline.missed += [f"{shape.name} T={t}" for t in order[i:]]
            notes.append(f"{shape.name}: T={','.join(map(str, order[i:]))} not measured: the "
                         f"time budget (--budget-s {deadline.seconds:.0f}) ran out")
            print(f"  time budget spent: {shape.name} T={order[i:]} skipped", flush=True)
            break
        t0 = time.perf_counter()
        measure_row(family, ctx, t, impls, t == check_tokens, verdicts, timer, rec)
        print(f"{progress_line(rec, family.name, shape.name, t)}  [{time.perf_counter() - t0:.1f} s]",
              flush=True)
    for c in rec.checks:
        if c["family"] == family.name and c["shape"] == shape.name and not c["ok"]:
            print(f"  WRONG {c['impl']}: {'; '.join(c['problems'])}", flush=True)


# ================================================================== host overhead

def measure_host_overhead(family: OpFamily, impls: list[Impl], device, peers: Peers, calls: int,
                          rec: Recorder) -> list[dict]:
    shape = family.shapes[family.host_overhead_shape]
    ctx = family.make_context(shape, device, peers)
    args = family.make_inputs(ctx, 1, 1)[0]
    by_name = {i.name: i for i in impls}
    out = []
    for name, what in family.host_overhead_impls.items():
        impl = by_name.get(name)
        if impl is None:
            continue
        entry = dict(family=family.name, shape=shape.name, impl=name, calls=calls, what=what,
                     us_per_call=None, us_per_call_loop_only=None, note=None)
        try:
            apply = impl.prepare(ctx, 1)
            entry["us_per_call"], entry["us_per_call_loop_only"] = host_time_per_call(
                lambda: apply(*args), calls, device)
        except FatalCuda:
            raise
        except Exception as e:
            rec.error(f"host overhead {name}", e)
            ensure_cuda_usable(device)
            entry["note"] = short_error(e)
        print(f"host time {name:24s} "
              + (f"{entry['us_per_call']:.2f} us/call" if entry["us_per_call"] else str(entry["note"])),
              flush=True)
        out.append(entry)
    return out


# ================================================================== arguments

def parse_list(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def select_impls(impls: list[Impl], selection: str | None) -> list[Impl]:
    """--impls: names or prefixes ('rope_jit' picks all of rope_jit's modes)."""
    if not selection:
        return impls
    wanted = parse_list(selection)
    return [i for i in impls if any(i.name.startswith(w) for w in wanted)]


def parse_args(argv=None) -> argparse.Namespace:
    all_shapes = list(dict.fromkeys(n for f in FAMILIES.values() for n in f.shapes))
    p = argparse.ArgumentParser(
        description="Benchmark rope_jit's RoPE kernels side by side with FlashInfer, Liger-Kernel, "
                    "vLLM (when importable), the PyTorch formula (eager and torch.compile, out of "
                    "place), a device copy and the pattern ceiling. Writes results.json, RESULTS.md "
                    "and bandwidth.png, and ends stdout with a summary table.")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results/<gpu>/, e.g. .../h200; "
                        "--dry-run: a new temporary folder)")
    p.add_argument("--flashinfer", default=None,
                   help="path to libfi_rope.so (default: .peers/libfi_rope.so in the repo, if it exists)")
    p.add_argument("--tokens", default=None,
                   help=f"comma-separated token counts (default {','.join(map(str, DEFAULT_TOKENS))}; "
                        f"--quick: {','.join(map(str, QUICK_TOKENS))})")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma-separated op families, of {', '.join(FAMILIES)}")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated, of {', '.join(all_shapes)} (default: all)")
    p.add_argument("--impls", default=None,
                   help="only these implementations (names or prefixes, e.g. rope_jit,torch_eager); "
                        "the copy and the pattern ceiling are always measured")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: tokens {','.join(map(str, QUICK_TOKENS))}, {QUICK_REPLAYS} replays, "
                        f"{QUICK_HOST_CALLS:,} host-time calls, budget {QUICK_BUDGET_S:.0f} s")
    p.add_argument("--replays", type=int, default=None,
                   help=f"graph replays per measurement (default {DEFAULT_REPLAYS}, --quick {QUICK_REPLAYS})")
    p.add_argument("--host-calls", type=int, default=None,
                   help=f"calls in the host-time loop (default {DEFAULT_HOST_CALLS:,})")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"wall-time budget of the sweep: rows not started by then are skipped and "
                        f"noted (default {DEFAULT_BUDGET_S:.0f}, --quick {QUICK_BUDGET_S:.0f})")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: run the pipeline on the CPU to test this script (timings mean nothing)")
    args = p.parse_args(argv)

    families = parse_list(args.families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        p.error(f"--families: unknown {unknown or families}; known: {list(FAMILIES)}")
    known_shapes = [n for f in families for n in FAMILIES[f].shapes]
    if args.shapes is not None:
        shapes = parse_list(args.shapes)
        unknown = [s for s in shapes if s not in known_shapes]
        if unknown or not shapes:
            p.error(f"--shapes: unknown {unknown or shapes}; known: {sorted(set(known_shapes))}")
    if args.tokens is not None:
        try:
            tokens = parse_list(args.tokens, int)
        except ValueError:
            p.error("--tokens: expected comma-separated integers")
        if not tokens or min(tokens) < 1:
            p.error("--tokens: expected positive integers")
    for name in ("replays", "host_calls"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s: expected a positive number of seconds")
    return args


class RunPlan:
    """What the arguments ask for, with the defaults of --quick and --dry-run applied."""

    def __init__(self, args: argparse.Namespace):
        dry, quick = args.dry_run, args.quick
        default_tokens = DRY_RUN_TOKENS if dry else QUICK_TOKENS if quick else DEFAULT_TOKENS
        self.tokens = sorted(set(parse_list(args.tokens, int))) if args.tokens else list(default_tokens)
        self.families = [FAMILIES[f] for f in parse_list(args.families)]
        wanted = set(parse_list(args.shapes)) if args.shapes else None
        self.shapes = {f.name: [s for n, s in f.shapes.items() if wanted is None or n in wanted]
                       for f in self.families}
        self.replays = args.replays or (QUICK_REPLAYS if quick or dry else DEFAULT_REPLAYS)
        self.host_calls = args.host_calls or (DRY_RUN_HOST_CALLS if dry else
                                              QUICK_HOST_CALLS if quick else DEFAULT_HOST_CALLS)
        self.budget_s = args.budget_s or (QUICK_BUDGET_S if quick or dry else DEFAULT_BUDGET_S)


# ================================================================== main

def environment(device: torch.device, dry_run: bool) -> dict:
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), dry_run=dry_run,
                python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                numpy=np.__version__, rope_jit=getattr(rope_jit, "__version__", "?"),
                host=platform.node())
    for mod in ("cupy", "triton"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception as e:
            meta[mod] = f"not importable ({type(e).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    l2_bytes=getattr(props, "L2_cache_size", None))
    else:
        meta["device"] = f"CPU ({platform.processor() or platform.machine()})"
    meta["gpu_slug"] = report.gpu_slug(meta["device"])
    meta["git"] = git_revision()
    return meta


def git_revision() -> str | None:
    """$ROPE_JIT_GIT_REVISION when set (a device copy of a working tree carries an older
    .git: the caller names the commit it copied), else HEAD's short hash, '+changes' when
    the tracked files differ from it, or None outside a checkout."""
    if os.environ.get("ROPE_JIT_GIT_REVISION"):
        return os.environ["ROPE_JIT_GIT_REVISION"]
    try:
        def git(*a):
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        head = git("rev-parse", "--short", "HEAD")
        if not head:
            return None
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except Exception:
        return None


def output_dir(args: argparse.Namespace, device_name: str) -> Path:
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.mkdtemp(prefix="rope_jit_bench_dry_run_"))
    else:
        out = report.default_out_dir(device_name)
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = RunPlan(args)
    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("No CUDA device visible to torch. This benchmark needs a GPU "
              "(use --dry-run to test the script on the CPU).", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    meta = environment(device, args.dry_run)
    out_dir = output_dir(args, meta["device"])
    print(f"device: {meta['device']} · torch {meta['torch']} · cupy {meta['cupy']} · "
          f"triton {meta['triton']} · rope_jit {meta['rope_jit']} · out {out_dir}", flush=True)
    if args.dry_run:
        copy_bw, timer = cpu_copy_bandwidth(), CpuTimer(plan.replays)
    else:
        copy_bw, timer = copy_bandwidth(), GpuTimer(plan.replays)
    print(f"copy bandwidth: {copy_bw / 1e12:.3f} TB/s (read + write)", flush=True)

    peers = load_peers(args.flashinfer, device)
    meta["peers"] = peers.notes
    for name, note in peers.notes.items():
        print(f"{name}: {note}", flush=True)
    compile_settings()

    rec = Recorder(copy_bw)
    results = dict(meta=meta, args=vars(args), copy_bandwidth=copy_bw, tokens=plan.tokens,
                   replays=plan.replays, budget_s=plan.budget_s, families={}, shapes=[],
                   rows=rec.rows, checks=rec.checks, errors=rec.errors, host_overhead=[],
                   skipped={}, notes=[], complete=False)
    family_impls = {}
    for family in plan.families:
        impls, skipped = family.build_impls(peers)
        impls = select_impls(impls, args.impls)
        family_impls[family.name] = impls
        shapes = plan.shapes[family.name]
        results["families"][family.name] = family.describe(impls, shapes)
        results["shapes"] += [family.describe_shape(s) for s in shapes]
        results["skipped"].update(skipped)
        for name, why in skipped.items():
            print(f"{family.name}: skipping {name}: {why}", flush=True)
        print(f"{family.name}: implementations: " + ", ".join(i.name for i in impls), flush=True)

    deadline = Deadline(plan.budget_s)
    try:
        for family in plan.families:
            for shape in plan.shapes[family.name]:
                t0 = time.perf_counter()
                print(f"--- {family.name} · {shape.name}: {shape.describe()}", flush=True)
                try:
                    sweep_shape(family, shape, plan.tokens, family_impls[family.name], device, peers,
                                timer, rec, deadline, results["notes"])
                except FatalCuda:
                    raise
                except Exception as e:  # anything not caught per row: note it, go on
                    rec.error(f"shape {shape.name}", e)
                    results["notes"].append(f"{shape.name}: sweep stopped early: {short_error(e)}")
                    ensure_cuda_usable(device)
                print(f"--- {shape.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
                report.write_json(results, out_dir)  # partial results survive a later crash
        print("--- host time per warm call", flush=True)
        for family in plan.families:
            try:
                results["host_overhead"] += measure_host_overhead(
                    family, family_impls[family.name], device, peers, plan.host_calls, rec)
            except FatalCuda:
                raise
            except Exception as e:
                rec.error(f"host overhead {family.name}", e)
                results["notes"].append(f"host time ({family.name}) not measured: {short_error(e)}")
        results["complete"] = not deadline.missed
    except FatalCuda as e:
        results["notes"].append(f"the CUDA context failed ({e}); the run stopped there")
        print(f"CUDA context failed: {e}; writing what was measured", flush=True)
    except KeyboardInterrupt:
        results["notes"].append("interrupted; partial results")
    results["elapsed_s"] = time.perf_counter() - started
    report.write_reports(results, out_dir)
    print()
    print(report.summary_text(results))
    written = [out_dir / n for n in ("results.json", "RESULTS.md", report.PLOT_NAME) if (out_dir / n).exists()]
    print(f"wrote {', '.join(map(str, written))} in {results['elapsed_s']:.0f} s"
          + ("" if results["complete"] else " (INCOMPLETE: see the notes)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
