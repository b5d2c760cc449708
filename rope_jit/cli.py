"""``rope-jit`` (also ``python -m rope_jit``): look at, warm and clear the kernel cache.

    rope-jit doctor                 versions, GPUs, the cache directory and its state
    rope-jit cache list             one line per cached kernel
    rope-jit cache clear [--stale]  remove cached kernels and stray temp/lock files
    rope-jit warm --arch sm_90 --model llama3-8b ...   compile ahead of time, no GPU needed

Exit status: 0 done (``warm`` of a read-only cache directory that holds every kernel
asked for included); 1 the command could not do its job (NVRTC missing, cache directory
not writable and kernels missing from it, a kernel failed to compile; ``doctor``: a
problem was found); 2 bad usage (unknown arch, dtype or model, contradicting options, a
shape the planner refuses). Expected faults print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy

from . import jit, tuning, warm, warm_fused
from ._version import __version__

PROG = "rope-jit"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """An expected fault: printed as one line, exit status EXIT_FAILED."""


class UsageError(CliError):
    """Bad arguments: exit status EXIT_USAGE. prog: the (sub)command at fault, when the
    parser knows it before main() does."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting, so every
    usage fault is one line and main() decides the exit status."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)", prog=self.prog)


class _HelpFormatter(argparse.HelpFormatter):
    """Ends each option's help with its default, '(default: bfloat16)', unless there is
    none to show (None, False, an empty list) or the help already speaks of it."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if (default is None or default is False or default == [] or default == argparse.SUPPRESS
                or "default" in text):
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


# ------------------------------------------------------------------ formatting helpers

def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MiB"


def _age(seconds: float) -> str:
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{max(0, seconds) / div:.0f} {unit}"
    return f"{seconds / 86400:.0f} d"


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _table(rows) -> str:
    """Rows of (label, value) as aligned lines."""
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


# ------------------------------------------------------------------ environment probes

def _nvrtc_problem() -> str | None:
    """None if NVRTC compiles here, else why not (one line)."""
    try:
        jit.nvrtc_version()
    except Exception as e:  # ImportError (no CuPy), RuntimeError/OSError (no libnvrtc), ...
        return str(e).splitlines()[0]
    return None


def _require_nvrtc() -> None:
    problem = _nvrtc_problem()
    if problem is not None:
        raise CliError(f"NVRTC is not usable, so nothing can be compiled: {problem}")


def _current_versions() -> dict:
    """Versions an entry must match to be loadable here (all three when NVRTC is usable)."""
    versions = {"rope_jit": jit.__version__}  # the version binary_key hashes
    if _nvrtc_problem() is None:
        versions.update(nvrtc=jit.nvrtc_version(), cupy=jit.cupy_version())
    return versions


def _stale_reason(entry: jit.CacheEntry, current: dict) -> str | None:
    """Why this install would never load `entry` as far as its recorded versions tell
    (a different version means a different key), or None."""
    if not entry.intact:
        return "damaged"
    for name, version in current.items():
        if entry.meta.get(name) != version:
            return f"stale: {name} {entry.meta.get(name)}, this install {version}"
    return None


def _gpu_lines() -> list[str]:
    """One line per visible GPU, or one line saying there is none and why."""
    if importlib.util.find_spec("cupy") is None or sys.modules.get("cupy", ()) is None:
        return ["unknown (CuPy is not installed)"]
    try:
        rt = jit.cupy_module().cuda.runtime
        if rt.driverGetVersion() == 0:  # the runtime's own error would blame the driver version
            return ["no GPU (no NVIDIA driver found)"]
        count = rt.getDeviceCount()
    except Exception as e:  # no CuPy, or a driver too old for the runtime
        return [f"no GPU ({str(e).splitlines()[0]})"]
    if count == 0:
        return ["no GPU"]
    lines = []
    for i in range(count):
        p = rt.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        lines.append(f"{i}: {name}, sm_{p['major']}{p['minor']}, {p['multiProcessorCount']} SMs, "
                     f"{p['totalGlobalMem'] / 2**30:.1f} GiB")
    return lines


def _cuda_version(getter_name: str) -> str:
    try:
        v = getattr(jit.cupy_module().cuda.runtime, getter_name)()
    except Exception as e:
        return f"unknown ({str(e).splitlines()[0]})"
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none (no NVIDIA driver found)"


def _torch_line() -> str:
    if importlib.util.find_spec("torch") is None:
        return "not installed (optional)"
    import torch

    cuda = torch.version.cuda or "none"
    gpu = "GPU available" if torch.cuda.is_available() else "no GPU"
    return f"{torch.__version__} (CUDA {cuda}, {gpu})"


# ------------------------------------------------------------------ doctor

def cmd_doctor(args) -> int:
    rows, problems = [], []
    rows.append(("rope_jit", f"{__version__} ({Path(__file__).resolve().parent})"))
    rows.append(("Python", f"{platform.python_version()} ({sys.executable})"))
    rows.append(("NumPy", numpy.__version__))
    rows += _cuda_rows(problems)
    rows += [("GPUs" if i == 0 else "", line) for i, line in enumerate(_gpu_lines())]
    rows.append(("torch", _torch_line()))
    rows += _cache_rows(problems)
    print(_table(rows))
    print("ok" if not problems else "problems: " + "; ".join(problems))
    return EXIT_OK if not problems else EXIT_FAILED


def _cuda_rows(problems: list) -> list:
    try:
        cupy_version = jit.cupy_version()
    except ImportError as e:
        problems.append("CuPy is missing, so nothing can be compiled or run")
        return [("CuPy", f"not installed ({e})")]
    rows = [("CuPy", cupy_version)]
    problem = _nvrtc_problem()
    if problem is None:
        archs = jit.supported_archs()
        rows.append(("NVRTC", f"{jit.nvrtc_version()} (compiles for {archs[0]} .. {archs[-1]})"))
    else:
        problems.append("NVRTC is not usable")
        rows.append(("NVRTC", f"not usable ({problem})"))
    rows.append(("CUDA runtime", _cuda_version("runtimeGetVersion")))
    rows.append(("CUDA driver", _cuda_version("driverGetVersion")))
    return rows


def _cache_rows(problems: list) -> list:
    try:
        directory = jit.cache_dir()
    except ImportError as e:  # platformdirs missing and no ROPE_JIT_CACHE_DIR
        problems.append(f"no cache directory: set {jit.ENV_CACHE_DIR} or install platformdirs")
        return [("cache dir", f"unknown ({e})")]
    source = f"from {jit.ENV_CACHE_DIR}" if _env_cache_dir() else "platform default"
    entries = jit.cache_entries()
    current = _current_versions()
    stale = sum(_stale_reason(e, current) is not None for e in entries)
    summary = f"{len(entries)}, {_size(sum(e.size for e in entries))}"
    if stale:
        summary += f" ({stale} stale or damaged: `{PROG} cache clear --stale` removes them)"
    strays = len(jit.stray_files())
    reason = jit.unwritable_reason()
    if reason is not None:
        problems.append(f"the cache directory is not writable; set {jit.ENV_CACHE_DIR}")
    return [("cache dir", f"{directory} ({source})"),
            ("cache entries", summary + (f"; {strays} stray temp/lock files" if strays else "")),
            ("cache writable", "yes" if reason is None else f"no ({reason})")]


def _env_cache_dir() -> bool:
    return bool(os.environ.get(jit.ENV_CACHE_DIR))


# ------------------------------------------------------------------ cache list / clear

def cmd_cache_list(args) -> int:
    directory = jit.cache_dir()
    entries = jit.cache_entries()
    if not entries:
        print(f"no entries in {directory}")
        return EXIT_OK
    current, now = _current_versions(), time.time()
    rows = []
    for e in entries:
        meta = e.meta or {}
        note = _stale_reason(e, current)
        words = meta.get("spec", "?") if e.intact else "(unreadable: would be rebuilt)"
        rows.append((meta.get("arch", "?"), words, e.key[:12], _size(e.size),
                     _age(now - e.mtime), f"  [{note}]" if note else ""))
    rows.sort(key=lambda r: (r[0], r[1]))
    print(f"{'KEY':<12}  {'ARCH':<6}  {'SIZE':>9}  {'AGE':>6}  KERNEL")
    for arch, words, key, size, age, note in rows:
        print(f"{key:<12}  {arch:<6}  {size:>9}  {age:>6}  {words}{note}")
    print(f"{_count(len(entries), 'entry', 'entries')}, "
          f"{_size(sum(e.size for e in entries))} in {directory}")
    return EXIT_OK


def cmd_cache_clear(args) -> int:
    directory = jit.cache_dir()
    entries = jit.cache_entries()
    if args.stale:
        current = _current_versions()
        entries = [e for e in entries if _stale_reason(e, current) is not None]
    strays = jit.stray_files()
    try:
        for path in [e.path for e in entries] + strays:
            path.unlink(missing_ok=True)  # missing: another process cleared it meanwhile
    except OSError as e:
        raise CliError(f"cannot remove {e.filename}: {e.strerror}") from None
    what = (_count(len(entries), "stale or damaged entry", "stale or damaged entries") if args.stale
            else _count(len(entries), "entry", "entries"))
    print(f"removed {what} ({_size(sum(e.size for e in entries))}) and "
          f"{_count(len(strays), 'stray temp/lock file')} from {directory}")
    return EXIT_OK


# ------------------------------------------------------------------ warm

_CACHE_CHOICES = ("float16", "bfloat16", "float32", "on-the-fly")
_KV_DTYPES = {"float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2", "unquantized": None}
_FLAG_VALUES = {  # option value -> CallShape field value
    "style": {"neox": True, "gptj": False},
    "positions": {"positions": False, "indptr": True},
    "placement": {"in-place": True, "out-of-place": False},
    "layout": {"separate": False, "fused-qkv": True},
}


def _dtype(text: str) -> str:
    """Float dtype names and their usual aliases (bf16, fp16, half, ...)."""
    from .dtypes import FLOAT_DTYPES, dtype_name

    name = dtype_name(text)
    if name not in FLOAT_DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(FLOAT_DTYPES)}, got {text!r}")
    return name


def _arch(text: str) -> str:
    if text == "native":
        return text
    try:
        return jit.arch_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("arch: ")) from None


def _plan_arg(text: str) -> tuple:
    """NAME=VALUE with VALUE a Python literal (1, 0.5, (16, 24, 24), True, 'yarn') or, if
    it is not one, the bare string (so a word needs no quotes: --plan-arg NAME=word)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _add_call_options(p, verb: str) -> None:
    """The model shape and the ways it calls RoPE (warm and tune describe calls alike)."""
    shape = p.add_argument_group("model shape (--model, or --heads and --head-size)")
    shape.add_argument("--model", choices=sorted(warm.MODELS), help="a preset model shape")
    shape.add_argument("--tp", type=_positive_int, default=1,
                       help="tensor-parallel ranks: each GPU holds 1/tp of the heads")
    shape.add_argument("--heads", nargs=2, type=int, metavar=("Q", "KV"),
                       help="query and key heads of the model (KV 0: no key); --tp divides them")
    shape.add_argument("--head-size", type=_positive_int, help="elements per head")
    shape.add_argument("--rotary-dim", type=_positive_int,
                       help="rotated elements per head (default: the whole head)")
    call = p.add_argument_group(f"how the model calls RoPE (several values: each is {verb})")
    call.add_argument("--dtype", nargs="+", type=_dtype, default=["bfloat16"],
                      help="query/key dtype")
    call.add_argument("--cache-dtype", nargs="+", choices=_CACHE_CHOICES, default=["float32"],
                      help="cos/sin cache dtype, or on-the-fly")
    call.add_argument("--style", nargs="+", choices=sorted(_FLAG_VALUES["style"]),
                      help="rotation pairs (default: the model's, else neox)")
    call.add_argument("--index-dtype", nargs="+", choices=("int32", "int64"), default=["int64"],
                      help="positions or indptr/offsets dtype")
    call.add_argument("--positions", nargs="+", choices=sorted(_FLAG_VALUES["positions"]),
                      default=["positions"], help="positions per token, or indptr + offsets")
    call.add_argument("--placement", nargs="+", choices=sorted(_FLAG_VALUES["placement"]),
                      default=["in-place"], help="q and k rotated in place, or new arrays returned")
    call.add_argument("--layout", nargs="+", choices=sorted(_FLAG_VALUES["layout"]),
                      default=["separate"], help="fused-qkv: q and k are slices of one QKV buffer")
    call.add_argument("--scaling", nargs="+", metavar="NAME",
                      help="on-the-fly frequency variants (planner 'scaling'), e.g. linear llama3 "
                           "yarn; needs --cache-dtype on-the-fly (a cache holds its variant's values)")
    call.add_argument("--mrope-section", nargs=3, type=int, metavar=("T", "H", "W"),
                      help="multimodal RoPE sections (positions [3, tokens])")
    call.add_argument("--mrope-interleaved", action="store_true",
                      help="Qwen3-VL's interleaved sections (t, h, w alternating)")
    call.add_argument("--plan-arg", action="append", type=_plan_arg, default=[], metavar="NAME=VALUE",
                      help="a planner keyword argument no option sets (repeatable)")


def _add_warm_parser(sub) -> None:
    p = sub.add_parser(
        "warm", help="compile kernels ahead of time for named archs (no GPU needed)",
        formatter_class=_HelpFormatter,
        description="Compile the kernels a model's RoPE calls will use into the disk cache, "
                    "for named GPU archs, with no GPU present. Multi-valued options warm every "
                    "combination. The planner decides which kernels a call uses at each token "
                    "count; warming runs it over 1..--max-tokens tokens and --sms SM counts.")
    p.add_argument("--arch", nargs="+", action="extend", type=_arch, required=True,
                   help="target archs, e.g. sm_80 sm_90 (or 90, 9.0); 'native': this machine's GPUs")
    _add_call_options(p, "warmed")
    sweep = p.add_argument_group("which kernels")
    sweep.add_argument("--max-tokens", type=_positive_int, default=warm.DEFAULT_MAX_TOKENS,
                       help="largest token count of a call")
    sweep.add_argument("--sms", nargs="+", type=_positive_int,
                       help="SM counts of the target GPUs (default: those of the arch's GPUs)")
    sweep.add_argument("--spec", action="append", default=[], metavar="JSON",
                       help="a RopeSpec named directly by its fields as a JSON object (repeatable)")
    sweep.add_argument("--positions-kernel", action="store_true",
                       help="also the positions_from_offsets kernel for each --index-dtype")
    fused = p.add_argument_group(
        "fused kernels (--fused; the shape, --dtype, --cache-dtype, --style, --index-dtype "
        "and --scaling apply to them too)")
    fused.add_argument("--fused", nargs="+", choices=("all", *warm_fused.FUSED_FUNCTIONS),
                       metavar="FUNCTION",
                       help="also the fused kernels of these functions ('all': every one the "
                            f"model's attention takes): {', '.join(warm_fused.FUSED_FUNCTIONS)}")
    fused.add_argument("--kv-dtype", nargs="+", choices=(*_KV_DTYPES,), default=["float8_e4m3fn"],
                       help="FP8 type of quantized outputs and KV caches, or unquantized (the "
                            "input dtype)")
    fused.add_argument("--page-size", nargs="+", type=_positive_int, default=[16],
                       help="KV-cache page size (FlashInfer) or block size (vLLM)")
    fused.add_argument("--kv-layout", nargs="+", choices=("NHD", "HND"), default=["NHD"],
                       help="FlashInfer's paged KV-cache layout")
    run = p.add_argument_group("running")
    run.add_argument("--jobs", type=_positive_int,
                     help=f"parallel compiles (default: {warm.default_jobs()}, this process's CPUs, "
                          "at most 16)")
    run.add_argument("--dry-run", action="store_true", help="list the kernels, compile nothing")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no kernel list")
    p.set_defaults(func=cmd_warm)


# Planner arguments that warm derives from an option (or from the shape options), by the
# option to name when the planner refuses one of them or --plan-arg tries to set one.
_OPTION_OF_PLANNER_ARG = {
    "head_size": "--head-size", "rotary_dim": "--rotary-dim", "is_neox": "--style",
    "positions": "--positions", "indptr": "--positions", "offsets": "--positions",
    "cos_sin_cache": "--cache-dtype", "inplace": "--placement", "num_sms": "--sms",
    "scaling": "--scaling", "mrope_section": "--mrope-section",
    "mrope_interleaved": "--mrope-interleaved",
}


def _free_planner_args() -> list[str]:
    """Names --plan-arg may set: the call fields warming accepts (warm.PLAN_ARGS) that no
    option sets."""
    return sorted(n for n in warm.PLAN_ARGS if n not in _OPTION_OF_PLANNER_ARG)


def _check_plan_args(args) -> None:
    free = _free_planner_args()
    for name, _ in args.plan_arg:
        if name in _OPTION_OF_PLANNER_ARG:
            raise UsageError(f"--plan-arg {name}: the planner argument {name!r} is set by "
                             f"{_OPTION_OF_PLANNER_ARG[name]}, not by --plan-arg")
        if name not in free:
            raise UsageError(f"--plan-arg {name}: unknown planner argument {name!r}; valid "
                             f"names: {', '.join(free) or 'none'}")


def _check_call_options(args) -> None:
    """Options that contradict each other, named before any planning."""
    if args.scaling and "on-the-fly" not in args.cache_dtype:
        raise UsageError(f"--scaling {' '.join(args.scaling)}: needs --cache-dtype on-the-fly "
                         "(a cos/sin cache holds its variant's values: kernels reading one are "
                         "the same for every variant)")
    if args.mrope_section is not None and "indptr" in args.positions:
        raise UsageError("--mrope-section: needs --positions positions (mRoPE takes positions "
                         "[3, tokens]; indptr + offsets give one position per token)")
    if args.mrope_interleaved and args.mrope_section is None:
        raise UsageError("--mrope-interleaved: needs --mrope-section T H W")


def _planner_kwargs(args) -> list[dict]:
    """One dict of extra planner keyword arguments per --scaling value."""
    extra = dict(args.plan_arg)
    if args.mrope_section is not None:
        extra["mrope_section"] = tuple(args.mrope_section)
    if args.mrope_interleaved:
        extra["mrope_interleaved"] = True
    return [{**extra, "scaling": s} for s in args.scaling] if args.scaling else [extra]


def _base_shape(args) -> dict | None:
    """CallShape fields of the model or the explicit shape; None if neither is given."""
    try:
        base = _model_or_explicit_shape(args)
    except ValueError as e:  # heads that do not split over --tp, an unknown model
        raise UsageError(str(e)) from None
    if base is not None:
        _check_rotary_dim(args, base["head_size"], base["rotary_dim"] or base["head_size"])
    return base


def _rotary_option(args) -> str:
    """The option that set the rotary dim: --rotary-dim, else the head size (the whole
    head) of --head-size or of the --model preset."""
    if args.rotary_dim:
        return "--rotary-dim"
    return f"--model {args.model}" if args.model else "--head-size"


def _check_rotary_dim(args, head_size: int, rotary_dim: int) -> None:
    """The planner's rules on the rotary dim, in terms of the options that set it."""
    if rotary_dim % 2:  # RoPE rotates pairs
        if args.rotary_dim:
            raise UsageError(f"--rotary-dim {rotary_dim}: expected an even number (RoPE rotates "
                             "pairs)")
        raise UsageError(f"--head-size {head_size}: the rotary dim (the whole head unless "
                         "--rotary-dim says otherwise) must be even, as RoPE rotates pairs; give "
                         "an even --head-size or an even --rotary-dim")
    if rotary_dim > head_size:
        head = f"--head-size {head_size}" if args.head_size else \
            f"the head size {head_size} of --model {args.model}"
        raise UsageError(f"--rotary-dim {rotary_dim}: exceeds {head}")


def _planner_refusal(args, call: warm.CallShape, error: Exception) -> UsageError:
    """The planner's error for `call`, its leading argument name ('rotary_dim: ...')
    replaced by the option that set it, and the call in words."""
    name, sep, rest = str(error).partition(": ")
    if sep and name.endswith("(rotary_dim)"):  # a cache's width: the rotary dim
        name = "rotary_dim"
    option = _rotary_option(args) if name == "rotary_dim" else _OPTION_OF_PLANNER_ARG.get(name)
    message = f"{option}: {rest}" if sep and option else str(error)
    return UsageError(f"{message} (warming {call.words()})")


def _model_or_explicit_shape(args) -> dict | None:
    if args.model and (args.heads or args.head_size):
        raise UsageError("give --model or --heads/--head-size, not both")
    if args.model:
        overrides = {"rotary_dim": args.rotary_dim} if args.rotary_dim else {}
        call = warm.model_call(args.model, tp=args.tp, **overrides)
        return {"num_q_heads": call.num_q_heads, "num_kv_heads": call.num_kv_heads,
                "head_size": call.head_size, "rotary_dim": call.rotary_dim, "is_neox": call.is_neox}
    if args.heads is None and args.head_size is None:
        return None
    if args.heads is None or args.head_size is None:
        raise UsageError("an explicit shape needs both --heads Q KV and --head-size")
    if args.heads[0] < 1 or args.heads[1] < 0:
        raise UsageError(f"--heads: expected Q >= 1 query heads and KV >= 0 key heads, "
                         f"got {args.heads[0]} {args.heads[1]}")
    nq, nk = warm.heads_per_rank(*args.heads, args.tp)
    return {"num_q_heads": nq, "num_kv_heads": nk, "head_size": args.head_size,
            "rotary_dim": args.rotary_dim, "is_neox": True}


def _call_shapes(args) -> list[warm.CallShape]:
    base = _base_shape(args)
    if base is None:
        return []
    default_neox = base.pop("is_neox")
    styles = [_FLAG_VALUES["style"][s] for s in args.style] if args.style else [default_neox]
    combos = itertools.product(
        args.dtype, args.cache_dtype, styles, args.index_dtype, args.positions, args.placement,
        args.layout, _planner_kwargs(args))
    return [warm.CallShape(**base, dtype=dt, cache_dtype=None if cd == "on-the-fly" else cd,
                           is_neox=neox, index_dtype=ix, indptr=_FLAG_VALUES["positions"][pos],
                           inplace=_FLAG_VALUES["placement"][pl],
                           fused_qkv=_FLAG_VALUES["layout"][lay], plan_kwargs=kw)
            for dt, cd, neox, ix, pos, pl, lay, kw in combos]


def _fused_shapes(args) -> list:
    """The FusedCallShapes of every --fused function and option combination. Combinations
    a function does not take are left out ('all' leaves out whole functions); a function
    named explicitly that takes none of them is a usage error naming why."""
    if not args.fused:
        return []
    base = _base_shape(args)
    if base is None:
        raise UsageError("--fused: needs the model shape (--model, or --heads and --head-size)")
    named = [f for f in args.fused if f != "all"]
    functions = list(warm_fused.FUSED_FUNCTIONS) if "all" in args.fused else named
    styles = [_FLAG_VALUES["style"][s] for s in args.style] if args.style else [base["is_neox"]]
    combos = list(itertools.product(args.dtype, args.cache_dtype, args.scaling or ["linear"],
                                    styles, args.index_dtype, args.kv_dtype, args.page_size,
                                    args.kv_layout))
    rotary = {"rotary_dim": args.rotary_dim} if args.rotary_dim else {}
    fixed = {k: base[k] for k in ("num_q_heads", "num_kv_heads", "head_size", "rotary_dim")}

    def shapes_of(function: str, fields: dict) -> list:
        if args.model:  # a preset: MLA dims and both q_nope widths come with it
            return warm_fused.fused_model_calls(args.model, function, tp=args.tp, **rotary, **fields)
        return [warm_fused.FusedCallShape(function, **fixed, **fields)]

    shapes = []
    for function in dict.fromkeys(functions):
        taken, reasons = [], []
        for dt, cd, sc, neox, ix, kv, ps, lay in combos:
            fields = dict(dtype=dt, cache_dtype=None if cd == "on-the-fly" else cd, scaling=sc,
                          is_neox=neox, index_dtype=ix, kv_dtype=_KV_DTYPES[kv], page_size=ps,
                          kv_layout=lay)
            for shape in shapes_of(function, fields):
                reason = warm_fused.inapplicable(shape)
                if reason:
                    reasons.append(reason)
                else:
                    taken.append(shape)
        if not taken and function in named:
            raise UsageError(f"--fused {function}: {reasons[0]}")
        shapes += taken
    return list(dict.fromkeys(shapes))


def _direct_specs(args) -> list:
    from .specs import PositionsSpec, RopeSpec

    specs = []
    for text in args.spec:
        try:
            fields = json.loads(text)
            if not isinstance(fields, dict):
                raise TypeError("expected a JSON object of RopeSpec fields")
            if isinstance(fields.get("mrope_section"), list):  # JSON has no tuples
                fields["mrope_section"] = tuple(fields["mrope_section"])
            specs.append(RopeSpec(**fields))
        except (ValueError, TypeError) as e:
            raise UsageError(f"--spec {text}: {e}") from None
    if args.positions_kernel:
        specs += [PositionsSpec(ix) for ix in args.index_dtype]
    return specs


def _specs_to_warm(args, archs: list[str]) -> list:
    _check_plan_args(args)
    _check_call_options(args)
    calls = _call_shapes(args)
    fused = _fused_shapes(args)
    specs = _direct_specs(args)
    if not calls and not specs:
        raise UsageError("nothing to warm: give --model, --heads and --head-size, --spec or "
                         "--positions-kernel")
    sm_counts = args.sms or sorted({n for a in archs for n in warm.sm_counts_for(a)})
    knobs = tuning.knob_choices(archs)
    for call in calls:
        try:
            specs += warm.specs_for_call(call, max_tokens=args.max_tokens, sm_counts=sm_counts,
                                         knobs=knobs)
        except (ValueError, TypeError) as e:  # the planner refuses this call: say which
            raise _planner_refusal(args, call, e) from None
    for shape in fused:
        try:
            specs += warm_fused.specs_for_fused_call(shape, max_tokens=args.max_tokens,
                                                     sm_counts=sm_counts)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--fused {shape.function}: {e} (warming {shape.words()})") from None
    return list(dict.fromkeys(specs))


def _native_archs() -> list[str]:
    from ._cuda import device_arch, device_count

    n = device_count()
    if n == 0:
        raise UsageError("--arch native: no GPU is visible here; name the archs (e.g. sm_90)")
    return [jit.arch_name(device_arch(i)) for i in range(n)]


def cmd_warm(args) -> int:
    archs = list(dict.fromkeys(a for arch in args.arch
                               for a in (_native_archs() if arch == "native" else [arch])))
    specs = _specs_to_warm(args, archs)
    if args.dry_run:
        for spec in specs:
            print(spec.words())
        print(f"{_count(len(specs), 'kernel')} x {_count(len(archs), 'arch')} ({', '.join(archs)}): "
              f"{_count(len(specs) * len(archs), 'entry', 'entries')}; "
              "nothing compiled (--dry-run)")
        return EXIT_OK
    _require_nvrtc()
    try:
        archs = warm.check_archs(archs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.quiet:
        for spec in specs:
            print(spec.words())
    report = _run_warm(specs, archs, args)
    print(f"{_count(len(specs), 'kernel')} x {_count(len(archs), 'arch')} ({', '.join(archs)}): compiled "
          f"{report.compiled}, already cached {report.already_cached}, in {report.seconds:.1f} s "
          f"-> {jit.cache_dir()}")
    return EXIT_OK


def _run_warm(specs, archs, args) -> warm.WarmReport:
    bar = _progress_bar(len(specs) * len(archs), args.quiet)
    try:
        return warm.warm(specs, archs, jobs=args.jobs, on_done=lambda item: bar.update(1))
    except warm.WarmError as e:
        raise CliError(str(e)) from None
    finally:
        bar.close()


def _progress_bar(total: int, quiet: bool):
    """tqdm on stderr; off with --quiet and when stderr is not a terminal (disable=None)."""
    from tqdm import tqdm  # here, not at the top: only warm shows a bar

    return tqdm(total=total, unit="kernel", desc="compiling", file=sys.stderr,
                disable=True if quiet else None)


# ------------------------------------------------------------------ tune

_TUNE_TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _add_tune_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="measure launch knobs on this GPU and keep the fastest (needs a GPU)",
        formatter_class=_HelpFormatter,
        description="Time candidate launch knobs (heads per batch, waves, block shape, "
                    "prefetch, register cap, the few-token code path, the access width at "
                    "decode) for each call shape at each token bucket on this GPU, and store "
                    "the fastest beside the compiled kernels. Later calls of that shape class "
                    "and bucket use them; warming covers them. Nothing is measured during "
                    "calls unless ROPE_JIT_AUTOTUNE=1.")
    _add_call_options(p, "tuned")
    p.add_argument("--tokens", nargs="+", type=_positive_int, default=list(_TUNE_TOKENS),
                   help="token counts to tune (each stands for its power-of-two bucket)")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="no new measurement starts after this long; what was measured is kept")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from . import tune

    _check_plan_args(args)
    _check_call_options(args)
    calls = _call_shapes(args)
    if not calls:
        raise UsageError("nothing to tune: give --model, or --heads and --head-size")
    for call in calls:  # refused calls named before anything is measured
        try:
            warm.plan_call(call, 1, 132)
        except (ValueError, TypeError) as e:
            raise _planner_refusal(args, call, e) from None
    from ._cuda import device_count

    if device_count() <= args.device:
        raise CliError(f"--device {args.device}: no such GPU here ({device_count()} visible); "
                       "tuning measures on a GPU")
    buckets = sorted({tuning.token_bucket(t) for t in args.tokens})
    from tqdm import tqdm

    bar = tqdm(total=len(calls) * len(buckets), unit="shape", desc="tuning", file=sys.stderr,
               disable=True if args.quiet else None)
    rows = []

    def done(m):
        bar.update(1)
        rows.append(m)

    try:
        table = tune.tune(calls, buckets, device=args.device, max_seconds=args.max_seconds,
                          on_done=done)
    finally:
        bar.close()
    if not args.quiet:
        print(f"{'shape':<44} {'tokens':>6} {'before us':>10} {'tuned us':>9}  knobs")
        for m in rows:
            shape = (f"{m.shape.num_heads} heads x {m.shape.head_size} rotary "
                     f"{m.shape.rotary_dim} {m.shape.dtype} {m.shape.cos_sin}")
            print(f"{shape:<44} {m.bucket:>6} {m.start_us:>10.2f} {m.us:>9.2f}  "
                  f"{tune.changed_knobs(m.tuning) or 'defaults'}")
    print(f"tuned {len(rows)} of {len(calls) * len(buckets)} (shape, bucket) pairs -> "
          f"{tuning.table_path(table.key)}")
    return EXIT_OK


# ------------------------------------------------------------------ main

def build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Inspect, warm and clear rope_jit's kernel cache "
                                            f"(directory: ${jit.ENV_CACHE_DIR}, else the user "
                                            "cache dir).")
    parser.add_argument("--version", action="version", version=f"rope_jit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("doctor", help="versions, GPUs and the state of the cache").set_defaults(func=cmd_doctor)
    cache = sub.add_parser("cache", help="list or clear the kernel cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    cache_sub.add_parser("list", help="one line per cached kernel").set_defaults(func=cmd_cache_list)
    clear = cache_sub.add_parser("clear", help="remove cached kernels and stray temp/lock files")
    clear.add_argument("--stale", action="store_true",
                       help="only entries this install would never load (other versions, damaged)")
    clear.set_defaults(func=cmd_cache_clear)
    _add_warm_parser(sub)
    _add_tune_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    command = PROG
    try:
        args = parser.parse_args(argv)
        command = f"{PROG} {args.command}"
        return args.func(args)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    except UsageError as e:
        print(f"{e.prog or command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, jit.CompileError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except ImportError as e:  # a broken install (a dependency missing): say which, briefly
        print(f"{command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
