"""Ahead-of-time warming, end to end on a GPU (marker: gpu): `rope-jit warm` for this
GPU's arch in a process that sees no GPU at all, then a fresh process calling the public
entry points loads every kernel from the disk cache and compiles none, and its results
are bit-identical to those of kernels compiled on the spot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

from rope_jit import jit  # noqa: E402
from rope_jit._cuda import device_arch, num_sms  # noqa: E402

TOKEN_COUNTS = (1, 5, 300, 4096)  # decode, tiny, mid, prefill: both sides of the dispatch switches
HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 128

# One process's calls: every entry point family the warm command below covers, at each
# token count. Prints jit.stats and a digest of every output.
CALLER = textwrap.dedent(f"""
    import hashlib, json, torch, rope_jit
    from rope_jit import jit
    torch.manual_seed(0)
    digest = hashlib.sha256()

    def record(*tensors):
        for t in tensors:
            digest.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())

    cache = rope_jit.compute_cos_sin_cache({HEAD_SIZE}, 8192, like=torch.empty(1, device="cuda"))
    for n in {TOKEN_COUNTS}:
        q = torch.randn(n, {HEADS}, {HEAD_SIZE}, device="cuda").bfloat16()
        k = torch.randn(n, {KV_HEADS}, {HEAD_SIZE}, device="cuda").bfloat16()
        pos = torch.randint(0, 8192, (n,), device="cuda")
        indptr = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        offsets = torch.tensor([7], dtype=torch.int32, device="cuda")
        q2, k2 = q.reshape(n, -1).clone(), k.reshape(n, -1).clone()
        rope_jit.apply_rope_inplace_with_cache(pos, q2, k2, {HEAD_SIZE}, cache, True)
        record(q2, k2)
        record(*rope_jit.apply_rope_with_cos_sin_cache(pos, q, k, {HEAD_SIZE}, cache, True))
        record(*rope_jit.apply_rope(q, k, indptr, offsets))
        q3, k3 = q.clone(), k.clone()
        rope_jit.apply_rope_pos_ids_inplace(q3, k3, pos)
        record(q3, k3)
        record(rope_jit.positions_from_offsets(indptr, offsets, nnz=n))
    torch.cuda.synchronize()
    print("RESULT", json.dumps(dict(compiles=jit.stats.compiles, disk_hits=jit.stats.disk_hits,
                                    module_loads=jit.stats.module_loads,
                                    digest=digest.hexdigest())))
""")


def _run(argv, cache_dir, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **{jit.ENV_CACHE_DIR: str(cache_dir)}, **env)
    r = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _call_in_fresh_process(cache_dir) -> dict:
    r = _run([sys.executable, "-c", CALLER], cache_dir)
    return json.loads(r.stdout.split("RESULT", 1)[1])


def test_warmed_cache_loads_in_a_fresh_process_without_compiling(tmp_path):
    device = torch.cuda.current_device()
    arch = jit.arch_name(device_arch(device))
    warmed = tmp_path / "warmed"
    # CUDA_VISIBLE_DEVICES="" hides every GPU: warming must not need one.
    _run([sys.executable, "-m", "rope_jit", "warm", "--arch", arch, "--sms", str(num_sms(device)),
          "--heads", str(HEADS), str(KV_HEADS), "--head-size", str(HEAD_SIZE),
          "--dtype", "bfloat16", "--cache-dtype", "float32", "on-the-fly",
          "--positions", "positions", "indptr", "--index-dtype", "int64", "int32",
          "--placement", "in-place", "out-of-place", "--positions-kernel",
          "--max-tokens", str(max(TOKEN_COUNTS)), "--quiet"],
         warmed, CUDA_VISIBLE_DEVICES="")
    loaded = _call_in_fresh_process(warmed)
    assert loaded["compiles"] == 0, loaded
    assert loaded["disk_hits"] > 0 and loaded["disk_hits"] == loaded["module_loads"], loaded
    compiled = _call_in_fresh_process(tmp_path / "empty")
    assert compiled["compiles"] == loaded["disk_hits"]  # the same kernels, compiled on the spot
    assert compiled["digest"] == loaded["digest"]
