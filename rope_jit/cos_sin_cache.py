"""cos/sin cache builders (vLLM layout: row p = cos of the R/2 angles at p, then their sin)."""

from __future__ import annotations

from .arrays import framework_of
from .dtypes import FLOAT_DTYPES, dtype_name
from .scaling import check_base, resolve_rope_scaling

_DEFAULT_BASE = 10000.0


def compute_cos_sin_cache(rotary_dim: int, max_position: int, base: float = _DEFAULT_BASE,
                          dtype="float32", rope_scaling=None, like=None):
    """The RoPE cache of any variant, computed in float64 and rounded once to `dtype`.

    Returns a host NumPy array ``[rows, width]``, or, with ``like=`` an array of any
    supported framework, an array of that framework on that array's device.
    `dtype` may be a name ('float32', 'bfloat16', 'float16') or a torch/NumPy dtype.

    Without ``rope_scaling``: plain RoPE, ``[max_position, rotary_dim]``.

    ``rope_scaling``: a HuggingFace-style dict (``rope_type`` default, linear, dynamic, yarn,
    deepseek_yarn, llama3, longrope, proportional, with its parameters; see
    ``rope_jit.scaling``). Every cos and sin is multiplied by the variant's attention
    factor. Rows and width follow vLLM's classes: ``width = int(rotary_dim *
    partial_rotary_factor)`` (the whole ``rotary_dim`` for proportional); rows
    ``max_position`` for default/llama3/proportional/dynamic (dynamic: transformers'
    frequencies at its original length; ``rope_jit.get_rope`` follows longer sequences),
    ``ceil(max_position * factor)`` for linear, ``max(ceil(original * factor),
    max_position)`` for yarn and deepseek_yarn, ``original + max_position`` for longrope
    (short table in rows ``[0, original)``, long table after it: a batch whose largest
    position is ``>= original`` reads row ``original + p``), at least ``4 * max_position``
    with an ``mrope_section``. A ``rope_theta`` in the dict replaces the default ``base``;
    an explicit ``base`` that disagrees with it raises ValueError.
    """
    name = dtype_name(dtype)
    if name not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype!r}")
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even integer, got {rotary_dim!r}")
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 0:
        raise ValueError(f"max_position: expected a non-negative integer, got {max_position!r}")
    check_base(base, "base")
    if like is not None:
        framework_of(like, "like")  # an unsupported `like` fails before any work
    explicit = base
    if rope_scaling is not None and getattr(rope_scaling, "get", None) is not None \
            and rope_scaling.get("rope_theta") is not None and base == _DEFAULT_BASE:
        explicit = None  # the default: the dict's rope_theta applies
    scaling = resolve_rope_scaling(rope_scaling, rotary_dim, explicit, max_position)
    return scaling.cos_sin_cache(name, like=like)
