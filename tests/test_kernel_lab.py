"""benchmarks/kernel_lab.py renders kernels/rope.cu with a prelude of its own (it does not
import rope_jit): this keeps that prelude in step with the kernel's constants, so the lab
still compiles when the kernel gains one (it broke once: a constant moved into
common.cuh). One variant of each staging path, compiled with NVRTC for sm_90."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_lab.py"


@pytest.fixture(scope="module")
def lab():
    spec = importlib.util.spec_from_file_location("kernel_lab_for_compile_tests", LAB)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.nvrtc
@pytest.mark.parametrize("knobs", [dict(), dict(index_bits=32, staging=1, stages=2),
                                   dict(index_bits=32, staging=2, stages=2)],
                         ids=["registers", "cp.async", "bulk copies"])
def test_lab_variants_compile(lab, tmp_path, knobs):
    spec = lab.KSpec(head_size=128, rotary_dim=128, dtype="bfloat16", cache_dtype="float32",
                     index_dtype="int64", indptr=False, neox=True, out_of_place=False, vec=8,
                     cache_vec=4, head_batch=1, **knobs)
    key, error = lab._nvrtc_compile(("k", spec.source(), str(tmp_path / "k.cubin")))
    assert error is None, error
    assert (tmp_path / "k.cubin").stat().st_size > 0
