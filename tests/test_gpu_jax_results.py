"""JAX in, JAX out (marker: gpu; skipped without jax): docs/api.md, README "Frameworks",
issue 12 item 2.

Every out-of-place entry point, called with ``jax.Array`` inputs however they were made
(``jnp.asarray`` of host data, ``jax.device_put``, the output of a jitted JAX
computation), with ``k`` a slice ``q[:, :1]``, a separate array, or None, returns
``jax.Array`` results on the inputs' device, within one ulp of the float64 reference
(tests/gpu_cases.py ``assert_rope_close``), inputs unchanged; on the first GPU and, where
JAX sees two, on the second. positions_from_offsets returns a ``jax.Array`` too. The
in-place entry points refuse JAX arrays (immutable) with a TypeError naming the query.
"""

from __future__ import annotations

import os
import re

# JAX otherwise preallocates 75% of the GPU at its first use and starves torch and CuPy in
# the same process. Set before anything initialises a JAX backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import HAS_GPU  # noqa: E402

pytestmark = pytest.mark.gpu
if not HAS_GPU:  # a GPU module: skip as one before jax (not an extra) is looked for
    pytest.skip("needs an NVIDIA GPU (run the GPU suite on a GPU machine)", allow_module_level=True)

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import rope_jit  # noqa: E402
from rope_jit import reference  # noqa: E402

from gpu_cases import assert_rope_close  # noqa: E402

T, HQ, HK, D = 29, 3, 2, 64
MAX_POS = 2048
SECTION, SECTION_INTERLEAVED = (16, 8, 8), (8, 12, 12)   # each sums to D / 2
LLAMA31 = (1.0, 4.0, 8192)


def jax_gpu(index: int):
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    if len(gpus) <= index:
        pytest.skip(f"needs {index + 1} GPUs visible to JAX, it sees {len(gpus)}")
    return gpus[index]


def host_inputs(seed: int, dtype: str) -> dict:
    """Fresh random host arrays of one call (positions int32: JAX's default integer)."""
    rng = np.random.default_rng(seed)
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return dict(q=rng.standard_normal((T, HQ, D)).astype(dt),
                k=rng.standard_normal((T, HK, D)).astype(dt),
                pos=rng.integers(0, MAX_POS, T).astype(np.int32),
                pos3=rng.integers(0, MAX_POS, (3, T)).astype(np.int32),
                cache=rope_jit.compute_cos_sin_cache(D, MAX_POS, dtype="float32"),
                indptr=np.array([0, 11, 11, T], np.int32),
                offsets=rng.integers(0, MAX_POS - T, 3).astype(np.int32))


@jax.jit
def _computed_float(a):
    return a * 2 - 1   # new values, computed by XLA on the array's device


@jax.jit
def _computed_index(a):
    return jnp.maximum(a, 0)   # the same (non-negative) values, computed by XLA


def produce(kind: str, host: dict, device) -> dict:
    """host arrays as jax.Arrays on `device`, made the way `kind` says, plus "k_slice",
    the slice q[:, :1] taken in JAX."""
    if kind == "asarray":
        # jnp.asarray makes uncommitted arrays on the default device; JAX runs work on them
        # (the slice too) on the default device of the moment
        with jax.default_device(device):
            out = {n: jnp.asarray(v) for n, v in host.items()}
            out["k_slice"] = out["q"][:, :1]
    else:
        if kind == "device_put":
            out = {n: jax.device_put(v, device) for n, v in host.items()}
        else:
            out = {n: (_computed_index if np.issubdtype(v.dtype, np.integer) else
                       _computed_float)(jax.device_put(v, device)) for n, v in host.items()}
        out["k_slice"] = out["q"][:, :1]
    for n, a in out.items():
        assert isinstance(a, jax.Array) and a.devices() == {device}, (n, a.devices())
    return out


def _positions(x):
    return reference.positions_from_offsets(x["indptr"], x["offsets"]).astype(np.int64)


def _mrope_cos_sin(cos3, sin3, section, interleaved):
    return (reference.mrope_select(cos3, section, interleaved),
            reference.mrope_select(sin3, section, interleaved))


# name: (call(arrays, k), rotary dim, NeoX style, cos/sin from the host values)
OUT_OF_PLACE = {
    "apply_rope": (
        lambda a, k: rope_jit.apply_rope(a["q"], k, a["indptr"], a["offsets"], interleave=True),
        D, False, lambda x: reference.cos_sin(_positions(x), reference.inv_frequencies(D))),
    "apply_rope_pos_ids": (
        lambda a, k: rope_jit.apply_rope_pos_ids(a["q"], k, a["pos"], rotary_dim=32),
        32, True, lambda x: reference.cos_sin(x["pos"], reference.inv_frequencies(32))),
    "apply_llama31_rope": (
        lambda a, k: rope_jit.apply_llama31_rope(a["q"], k, a["indptr"], a["offsets"]),
        D, True, lambda x: reference.cos_sin(_positions(x), reference.inv_frequencies(
            D, 5e5, 8.0, LLAMA31))),
    "apply_llama31_rope_pos_ids": (
        lambda a, k: rope_jit.apply_llama31_rope_pos_ids(a["q"], k, a["pos"], interleave=True),
        D, False, lambda x: reference.cos_sin(x["pos"], reference.inv_frequencies(
            D, 5e5, 8.0, LLAMA31))),
    "apply_rope_with_cos_sin_cache": (
        lambda a, k: rope_jit.apply_rope_with_cos_sin_cache(a["pos"], a["q"], k, D, a["cache"],
                                                            is_neox=False),
        D, False, lambda x: reference.cos_sin_from_cache(x["cache"], x["pos"])),
    "apply_mrope_with_cos_sin_cache": (
        lambda a, k: rope_jit.apply_mrope_with_cos_sin_cache(a["pos3"], a["q"], k, D, a["cache"],
                                                             True, SECTION),
        D, True, lambda x: _mrope_cos_sin(*reference.cos_sin_from_cache(x["cache"], x["pos3"]),
                                          SECTION, False)),
    "apply_mrope_pos_ids": (
        lambda a, k: rope_jit.apply_mrope_pos_ids(a["q"], k, a["pos3"], SECTION_INTERLEAVED,
                                                  mrope_interleaved=True),
        D, True, lambda x: _mrope_cos_sin(*reference.cos_sin(x["pos3"],
                                                             reference.inv_frequencies(D)),
                                          SECTION_INTERLEAVED, True)),
}

# one dtype per entry point, every dtype covered: few distinct kernels to compile
DTYPE_OF = {n: ("bfloat16", "float16", "float32")[i % 3] for i, n in enumerate(sorted(OUT_OF_PLACE))}


def _float64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _same_values(a, b: np.ndarray) -> bool:
    """Bit-identical, bfloat16 included."""
    a = np.asarray(a)
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("device_index", [0, 1], ids=["gpu0", "gpu1"])
@pytest.mark.parametrize("producer", ["asarray", "device_put", "jit"])
@pytest.mark.parametrize("key", ["slice", "separate", "none"])
@pytest.mark.parametrize("name", sorted(OUT_OF_PLACE))
def test_out_of_place_returns_jax_arrays(name, key, producer, device_index):
    device = jax_gpu(device_index)
    call, rot, neox, cos_sin = OUT_OF_PLACE[name]
    dtype = DTYPE_OF[name]
    arrays = produce(producer, host_inputs(hash((name, key, producer)) & 0xFFFF, dtype), device)
    k = {"slice": arrays["k_slice"], "separate": arrays["k"], "none": None}[key]
    values = {n: np.asarray(a) for n, a in arrays.items()}   # what JAX holds, read back
    k_values = np.asarray(k) if k is not None else None

    q_out, k_out = call(arrays, k)

    for out, x, what in ((q_out, arrays["q"], "q"), (k_out, k, "k")):
        if x is None:
            assert out is None, f"{what}: expected None for k=None, got {type(out)}"
            continue
        assert isinstance(out, jax.Array), f"{what}: expected a jax.Array, got {type(out)}"
        assert out.devices() == {device}, f"{what}: on {out.devices()}, inputs on {device}"
        assert out.shape == x.shape and out.dtype == x.dtype
    cos, sin = cos_sin(values)
    for out, x64, what in ((q_out, _float64(values["q"]), "q"),
                           (k_out, _float64(k_values) if k is not None else None, "k")):
        if out is None:
            continue
        ref = reference.apply_rotary(x64, cos, sin, neox)
        got = torch.from_numpy(_float64(out))   # read through JAX: it can consume the result
        assert_rope_close(got, x64, ref, dtype, D, rot, 1, f"{name} {what}")
    for n, a in arrays.items():
        assert _same_values(a, values[n]), f"{n} changed"


INPLACE = {
    "apply_rope_inplace_with_cache": lambda a: rope_jit.apply_rope_inplace_with_cache(
        a["pos"], a["q"], a["k"], D, a["cache"], True),
    "apply_rope_with_cos_sin_cache_inplace": lambda a: (
        rope_jit.apply_rope_with_cos_sin_cache_inplace(a["pos"], a["q"], a["k"], D, a["cache"])),
    "apply_rope_inplace": lambda a: rope_jit.apply_rope_inplace(a["q"], a["k"], a["indptr"],
                                                                a["offsets"]),
    "apply_rope_pos_ids_inplace": lambda a: rope_jit.apply_rope_pos_ids_inplace(
        a["q"], a["k"], a["pos"]),
    "apply_llama31_rope_inplace": lambda a: rope_jit.apply_llama31_rope_inplace(
        a["q"], a["k"], a["indptr"], a["offsets"]),
    "apply_llama31_rope_pos_ids_inplace": lambda a: rope_jit.apply_llama31_rope_pos_ids_inplace(
        a["q"], None, a["pos"]),
    "apply_mrope_inplace_with_cache": lambda a: rope_jit.apply_mrope_inplace_with_cache(
        a["pos3"], a["q"], a["k"], D, a["cache"], True, SECTION),
    "apply_mrope_pos_ids_inplace": lambda a: rope_jit.apply_mrope_pos_ids_inplace(
        a["q"], a["k"], a["pos3"], SECTION),
}


@pytest.mark.parametrize("name", sorted(INPLACE))
def test_in_place_refuses_jax_arrays(name):
    device = jax_gpu(0)
    arrays = produce("device_put", host_inputs(hash(name) & 0xFFFF, "bfloat16"), device)
    values = {n: np.asarray(a) for n, a in arrays.items()}
    with pytest.raises(TypeError) as info:
        INPLACE[name](arrays)
    message = str(info.value)
    assert re.search(r"(?<![A-Za-z0-9_])(q|query)(?![A-Za-z0-9_])", message), message
    assert "immutable" in message, message
    for n, a in arrays.items():
        assert _same_values(a, values[n]), f"{n} changed"


@pytest.mark.parametrize("device_index", [0, 1], ids=["gpu0", "gpu1"])
@pytest.mark.parametrize("nnz", [None, T + 3])
def test_positions_from_offsets_returns_jax_arrays(nnz, device_index):
    device = jax_gpu(device_index)
    host = host_inputs(7, "float32")
    arrays = produce("device_put", host, device)
    got = rope_jit.positions_from_offsets(arrays["indptr"], arrays["offsets"], nnz)
    assert isinstance(got, jax.Array), f"expected a jax.Array, got {type(got)}"
    assert got.devices() == {device} and got.dtype == jnp.int32
    want = reference.positions_from_offsets(host["indptr"], host["offsets"], nnz)
    np.testing.assert_array_equal(np.asarray(got), want)
