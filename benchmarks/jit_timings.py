"""Timings of the JIT (issue #4; docs/jit.md), against their targets:

* cold compile of one specialization: median over distinct specializations none of
  which is in memory or on disk (render + key + NVRTC + entry write, and NVRTC alone);
  the process's first compile, which also starts NVRTC, is reported apart. CUDA's own
  compute cache (~/.nv/ComputeCache), which NVRTC 13 consults and which turns a repeated
  compile of the same source into a ~20 ms look-up, is disabled (CUDA_CACHE_DISABLE=1):
  a fresh machine or container has it empty. Target: median < 0.3 s.
* load from the disk cache in a fresh process: the first ``jit.get_function`` of a
  process whose CUDA context already exists, until the function pointer is ready (read
  + verify the entry, cuModuleLoadData, cuModuleGetFunction, and before them rendering the
  source and computing its key, whose NVRTC version loads libnvrtc on a process's first
  use). Median over fresh subprocesses, with that breakdown. Target: < 20 ms.
* in-memory look-up on the call path: a warm ``jit.get_function``. Target: < 2 us.

    python benchmarks/jit_timings.py                  # writes benchmarks/results/<gpu>/jit_timings.json
    python benchmarks/jit_timings.py --out /tmp/t.json --compiles 16 --loads 9

Without a GPU only the compile part runs (for sm_90); the GPU parts are reported as
skipped with the reason, and the default output folder is benchmarks/results/cpu/.
Results are kept per GPU like the benchmark's (report.gpu_slug: 'NVIDIA H200' -> h200).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # report.py: the per-GPU results folders

from rope_jit import jit, warm  # noqa: E402
from rope_jit._cuda import device_arch, device_count  # noqa: E402
from report import RESULTS_ROOT, default_out_dir  # noqa: E402

TARGETS = {"compile_median_s": 0.3, "disk_load_median_s": 0.020, "memory_lookup_s": 2e-6}
CPU_ARCH = "sm_90"  # what the compile part targets on a machine without a GPU

# Model shapes whose planner-derived specs give distinct, realistic specializations.
CALLS = [warm.model_call(m, **kw) for m in ("llama3-8b", "phi-2", "gpt-j-6b", "deepseek-v3")
         for kw in ({}, {"cache_dtype": None}, {"dtype": "float16", "inplace": False})]

# One fresh process: create the CUDA context first (not part of the measurement), then
# time the first get_function of a spec whose entry is on disk.
LOAD_CHILD = """
import json, sys, time
import cupy
from rope_jit import jit
from rope_jit.specs import RopeSpec
spec = RopeSpec(**{k: tuple(v) if isinstance(v, list) else v  # JSON has no tuples
                  for k, v in json.loads(sys.argv[1]).items()})
cupy.cuda.Device(0).use()
cupy.empty(1)                      # context creation, excluded
cupy.cuda.Device(0).synchronize()
t0 = time.perf_counter()
ptr = jit.get_function(spec, 0)
t1 = time.perf_counter()
s = jit.stats
print("RESULT", json.dumps(dict(seconds=t1 - t0, ptr=ptr, compiles=s.compiles,
      disk_hits=s.disk_hits, disk_read_seconds=s.disk_read_seconds, load_seconds=s.load_seconds)))
"""


def distinct_specs(n: int) -> list:
    specs = list(dict.fromkeys(s for c in CALLS for s in warm.specs_for_call(c, sm_counts=(132,))))
    if len(specs) < n:
        raise SystemExit(f"--compiles {n}: only {len(specs)} distinct specs available")
    return specs[:n]


def time_cold_compiles(specs, arch: str) -> dict:
    """Build each spec once into an empty cache directory (so each is a genuine compile)."""
    first = specs[0]
    first_s = _timed_build(first, arch)
    builds, nvrtc = [], []
    for spec in specs[1:]:
        before = jit.stats.compile_seconds
        builds.append(_timed_build(spec, arch))
        nvrtc.append(jit.stats.compile_seconds - before)
    return {"arch": arch, "first_in_process_s": first_s, "build_s": builds, "nvrtc_s": nvrtc,
            "median_s": statistics.median(builds), "nvrtc_median_s": statistics.median(nvrtc),
            "specs": [s.words() for s in specs]}


def _timed_build(spec, arch: str) -> float:
    c0 = jit.stats.compiles
    t0 = timeit.default_timer()
    jit.build(spec, arch)
    seconds = timeit.default_timer() - t0
    assert jit.stats.compiles == c0 + 1, "expected a cold compile: is the cache directory fresh?"
    return seconds


def time_disk_loads(specs, n: int) -> dict:
    """Each load in its own fresh process, cycling over specs already in the disk cache."""
    runs = []
    for i in range(n):
        spec = specs[i % len(specs)]
        fields = json.dumps({k: v for k, v in spec.__dict__.items()})
        r = subprocess.run([sys.executable, "-c", LOAD_CHILD, fields], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"load subprocess failed:\n{r.stderr}")
        result = json.loads(r.stdout.split("RESULT", 1)[1])
        assert result["compiles"] == 0 and result["disk_hits"] == 1, result
        # The rest of the call: render the source, and the key, whose NVRTC version costs
        # loading libnvrtc on a process's first use.
        result["render_and_key_s"] = (result["seconds"] - result["disk_read_seconds"]
                                      - result["load_seconds"])
        runs.append(result)
    seconds = [r["seconds"] for r in runs]
    return {"runs": runs, "median_s": statistics.median(seconds), "max_s": max(seconds),
            "disk_read_median_s": statistics.median(r["disk_read_seconds"] for r in runs),
            "module_load_median_s": statistics.median(r["load_seconds"] for r in runs),
            "render_and_key_median_s": statistics.median(r["render_and_key_s"] for r in runs)}


def time_memory_lookup(spec, number: int = 1_000_000, repeat: int = 7) -> dict:
    jit.get_function(spec, 0)  # load once
    timer = timeit.Timer("get_function(spec, 0)",
                         globals={"get_function": jit.get_function, "spec": spec})
    per_call = [t / number for t in timer.repeat(repeat=repeat, number=number)]
    return {"number": number, "per_call_s": per_call, "median_s": statistics.median(per_call),
            "min_s": min(per_call)}


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "nvrtc": jit.nvrtc_version(), "cupy": jit.cupy_version()}
    if device_count():
        props = jit.cupy_module().cuda.runtime.getDeviceProperties(0)
        info.update(gpu=props["name"].decode(), arch=jit.arch_name(device_arch(0)))
    return info


def report(results: dict) -> str:
    rows = [("cold compile, median (build / NVRTC alone)", "compile", "median_s", "compile_median_s",
             lambda c: f"{c['median_s'] * 1e3:.0f} / {c['nvrtc_median_s'] * 1e3:.0f} ms "
                       f"(max {max(c['build_s']) * 1e3:.0f}, first in process "
                       f"{c['first_in_process_s'] * 1e3:.0f})"),
            ("disk load, fresh process, median", "disk_load", "median_s", "disk_load_median_s",
             lambda d: f"{d['median_s'] * 1e3:.1f} ms (key {d['render_and_key_median_s'] * 1e3:.1f}, "
                       f"read {d['disk_read_median_s'] * 1e3:.2f}, "
                       f"cuModuleLoad {d['module_load_median_s'] * 1e3:.2f})"),
            ("in-memory get_function, median", "memory_lookup", "median_s", "memory_lookup_s",
             lambda m: f"{m['median_s'] * 1e9:.0f} ns")]
    lines = [f"{'measurement':<44} {'result':<58} target    ok"]
    for label, part, field, target, fmt in rows:
        r = results[part]
        if "skipped" in r:
            lines.append(f"{label:<44} {'skipped: ' + r['skipped']:<58}")
            continue
        limit = TARGETS[target]
        shown = f"{limit * 1e3:.0f} ms" if limit >= 1e-3 else f"{limit * 1e6:.0f} us"
        lines.append(f"{label:<44} {fmt(r):<58} < {shown:<7} {'yes' if r[field] < limit else 'NO'}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: benchmarks/results/<gpu>/jit_timings.json, "
                        "without a GPU benchmarks/results/cpu/jit_timings.json)")
    p.add_argument("--compiles", type=int, default=12, help="distinct specs compiled cold")
    p.add_argument("--loads", type=int, default=9, help="fresh processes loading from disk")
    args = p.parse_args()
    os.environ["CUDA_CACHE_DISABLE"] = "1"  # read when NVRTC starts, which is later
    # Everything goes to a fresh cache directory: every compile is cold, and the user's
    # cache is neither used nor touched.
    os.environ[jit.ENV_CACHE_DIR] = tempfile.mkdtemp(prefix="rope_jit_timings_")
    jit.clear_memory()
    gpu = device_count() > 0
    arch = jit.arch_name(device_arch(0)) if gpu else CPU_ARCH
    specs = distinct_specs(args.compiles)
    info = machine()
    if args.out is None:
        folder = default_out_dir(info["gpu"]) if "gpu" in info else RESULTS_ROOT / "cpu"
        args.out = folder / "jit_timings.json"
    results = {"machine": info, "targets": TARGETS,
               "compile": time_cold_compiles(specs, arch)}
    no_gpu = {"skipped": "no GPU"}
    results["disk_load"] = time_disk_loads(specs, args.loads) if gpu else no_gpu
    results["memory_lookup"] = time_memory_lookup(specs[0]) if gpu else no_gpu
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{results['machine']}\n{report(results)}\nwrote {args.out}")


if __name__ == "__main__":
    main()
