"""Dtype facts, in one place at the bottom of the package: names, item sizes, the C types
the kernels use, NumPy dtypes, and rounding float64 values once to a storage dtype.

Every other module names dtypes by the strings below ("bfloat16", "int64", ...), whatever
framework an array came from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
INDEX_DTYPES = ("int32", "int64")
# FP8 storage (OCP formats, as torch.float8_e4m3fn / float8_e5m2 and ml_dtypes name them):
# outputs of the fused quantizing ops only, rounded to nearest even and saturated to the
# largest finite value (kernels/common.cuh).
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
            "float8_e4m3fn": 1, "float8_e5m2": 1}

# Storage types of the CUDA templates (kernels/common.cuh: 16-bit and 8-bit floats are
# plain words).
C_TYPE = {"float16": "f16_t", "bfloat16": "bf16_t", "float32": "float",
          "float8_e4m3fn": "fp8_e4m3_t", "float8_e5m2": "fp8_e5m2_t",
          "int32": "int", "int64": "long long"}

_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
            "fp32": "float32", "int": "int32", "long": "int64", "float8_e4m3": "float8_e4m3fn"}


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16, np.float16, ml_dtypes.bfloat16, 'float16', ..."""
    if isinstance(dtype, str):
        name = dtype
    else:
        name = str(dtype)
        if name.startswith("torch."):
            name = name[len("torch."):]
        else:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                pass
    return _ALIASES.get(name, name)


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16" or name in FP8_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


_BF16_DROPPED = 52 - 7  # float64 fraction bits that bfloat16 (7 fraction bits) does not keep


def round_to(x, dtype: str) -> np.ndarray:
    """float64 values rounded once, to nearest even, to float16, bfloat16 or float32.

    NumPy converts float64 to float16/float32 with one rounding. For bfloat16 (ml_dtypes
    converts through float32, which would round twice) the float64 fraction is rounded to
    7 bits on its bit pattern; the result is then exact in float32 and in bfloat16.
    bfloat16 subnormals (below 2**-126) lie on a fixed grid of 2**-133.
    """
    x = np.asarray(x, dtype=np.float64)
    if dtype != "bfloat16":
        return x.astype(numpy_dtype(dtype))
    bits = x.view(np.int64)
    keep_lsb = (bits >> _BF16_DROPPED) & 1
    rounded = (bits + ((1 << (_BF16_DROPPED - 1)) - 1) + keep_lsb) & ~((1 << _BF16_DROPPED) - 1)
    y = rounded.view(np.float64)
    y = np.where(np.isnan(x), x, y)  # a NaN's payload must not carry into a neighbour
    tiny = np.abs(x) < 2.0 ** -126
    y = np.where(tiny, np.round(x * 2.0 ** 133) * 2.0 ** -133, y)
    with np.errstate(over="ignore"):  # past bfloat16's range: inf, as a rounding should give
        return y.astype(np.float32).astype(numpy_dtype("bfloat16"))
