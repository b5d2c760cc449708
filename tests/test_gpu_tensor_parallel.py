"""Tensor parallelism over two GPUs (torch.distributed, NCCL, one process per GPU): each
rank's shard of Llama-3-70B-like heads, rotated by rope_jit inside a CUDA graph (cache in
place, on the fly out of place, fused FP8 quantize), gathers to exactly the single-GPU
result, and the ranks compile nothing for the plain ops after `rope-jit warm --tp 2`
(examples/tensor_parallel.py). Needs two GPUs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tensor_parallel.py"


def test_tensor_parallel_shards_equal_the_single_gpu_call(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    env = {**os.environ, "ROPE_JIT_CACHE_DIR": str(tmp_path / "cache"),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    run = subprocess.run([sys.executable, str(EXAMPLE), "--world", "2", "--tokens", "512"],
                         capture_output=True, text=True, env=env, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "tensor parallel: OK" in out, out
    assert len(re.findall(r"== single GPU: True", out)) == 6, out
    assert re.search(r"per rank \(after rope-jit warm --tp 2\): \[0, 0\]", out), out
