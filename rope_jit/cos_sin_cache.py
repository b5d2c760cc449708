"""cos/sin cache builders (vLLM layout: row p = cos of the R/2 angles at p, then their sin)."""

from __future__ import annotations

import numpy as np

from . import reference
from .arrays import FLOAT_DTYPES, dtype_name, framework_of


def compute_cos_sin_cache(rotary_dim: int, max_position: int, base: float = 10000.0,
                          dtype="float32", like=None):
    """The default RoPE cache, computed in float64 and rounded once to `dtype`.

    Returns a host NumPy array ``[max_position, rotary_dim]``, or, with ``like=`` an array of
    any supported framework, an array of that framework on that array's device.
    `dtype` may be a name ('float32', 'bfloat16', 'float16') or a torch/NumPy dtype.
    """
    name = dtype_name(dtype)
    if name not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype!r}")
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even integer, got {rotary_dim!r}")
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 0:
        raise ValueError(f"max_position: expected a non-negative integer, got {max_position!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise TypeError(f"base: expected a number, got {type(base).__name__}")
    if not (0 < base < float("inf")) or base == 1:
        raise ValueError(f"base: expected a finite number > 0 and != 1, got {base!r}")
    host = reference.round_to(reference.cos_sin_cache(rotary_dim, max_position, base=base), name)
    if like is None:
        return host
    return framework_of(like, "like").from_host(host, like)
