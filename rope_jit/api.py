"""Public entry points: vLLM's and FlashInfer's RoPE APIs, same names, arguments, defaults
and return conventions. Each is one call into ``launch.run_rope``.

Arrays may be torch tensors, CuPy arrays, or any object with ``__cuda_array_interface__``
or ``__dlpack__``; out-of-place functions return the caller's array type. In-place
functions return None.
"""

from __future__ import annotations

from .launch import run_positions, run_rope

# ------------------------------------------------------------------ from a cos/sin cache

def apply_rope_inplace_with_cache(positions, query, key, head_size, cos_sin_cache, is_neox,
                                  *, check_positions=False) -> None:
    """vLLM's ``rotary_embedding`` op: rotate query and key (may be None) in place.

    positions: int32/int64 ``[num_tokens]`` or ``[batch, seq]``; query/key
    ``[tokens..., num_heads * head_size]`` or ``[tokens..., num_heads, head_size]``;
    cos_sin_cache ``[max_position, rotary_dim]`` (fp16, bf16 or fp32, any query dtype).
    Positions outside the cache leave their token unrotated and are never read past the
    cache; ``check_positions=True`` raises ValueError for them instead (one host sync).
    """
    run_rope(query, key, head_size=head_size, rotary_dim=None, is_neox=is_neox, inplace=True,
             positions=positions, cache=cos_sin_cache, check_positions=check_positions)


def apply_rope_with_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox=True,
                                  *, check_positions=False):
    """FlashInfer's ``apply_rope_with_cos_sin_cache``: returns ``(query_out, key_out)``."""
    return run_rope(query, key, head_size=head_size, rotary_dim=None, is_neox=is_neox,
                    inplace=False, positions=positions, cache=cos_sin_cache,
                    check_positions=check_positions)


def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache,
                                          is_neox=True, *, check_positions=False) -> None:
    """FlashInfer's ``apply_rope_with_cos_sin_cache_inplace``: returns None."""
    run_rope(query, key, head_size=head_size, rotary_dim=None, is_neox=is_neox, inplace=True,
             positions=positions, cache=cos_sin_cache, check_positions=check_positions)


# ------------------------------------------------------------------ on the fly

def _last_dim(q) -> int:
    shape = getattr(q, "shape", None)
    if shape is None:
        from .arrays import describe

        shape = describe(q, "q").shape
    return int(shape[-1])


_variants: dict = {}


def _constant_for_dynamo(fn):
    """What ``torch.compiler.assume_constant_result`` does (it sets this one attribute),
    without importing torch: under torch.compile, Dynamo calls `fn` at trace time on its
    constant arguments and bakes the result into the graph instead of tracing into it
    (resolving a rope_scaling dict runs NumPy, and the memo below hashes a tuple, neither
    of which Dynamo traces without a graph break in every torch version). Valid because
    `fn`'s result depends on its arguments only."""
    fn._dynamo_marked_constant = True
    return fn


def _on_the_fly(q, rotary_dim, rope_scale, rope_theta, variant=None, rope_scaling=None):
    """run_rope's on_the_fly tuple; `rope_scaling` (a HuggingFace-style dict) is resolved
    once per distinct dict contents and rotary dim."""
    rot = rotary_dim if rotary_dim is not None else _last_dim(q)
    if rope_scaling is None:
        return (rot, rope_theta, rope_scale, variant)
    if rope_scale != 1.0:
        raise ValueError(f"rope_scale: must be 1.0 when rope_scaling is given (its factor "
                         f"scales the frequencies), got {rope_scale!r}")
    theta, scale, variant = _resolve_fly(rope_scaling, rot, rope_theta)
    return (rot, theta, scale, variant)


@_constant_for_dynamo
def _resolve_fly(rope_scaling, rot: int, rope_theta) -> tuple:
    """scaling.on_the_fly_variant, memoized by the dict's contents (when hashable)."""
    try:
        key = (tuple(sorted(rope_scaling.items())), rot, rope_theta)
        hash(key)
    except (AttributeError, TypeError):
        key = None
    got = _variants.get(key) if key is not None else None
    if got is None:
        from .scaling import on_the_fly_variant

        got = on_the_fly_variant(rope_scaling, rot, rope_theta)
        if key is not None:
            _variants[key] = got
    return got


def _fly(q, k, inplace, rotary_dim, interleave, rope_scale, rope_theta, variant=None, *,
         rope_scaling=None, pos_ids=None, indptr=None, offsets=None, mrope=None):
    return run_rope(q, k, head_size=None, rotary_dim=rotary_dim, is_neox=not interleave,
                    inplace=inplace, positions=pos_ids, indptr=indptr, offsets=offsets,
                    on_the_fly=_on_the_fly(q, rotary_dim, rope_scale, rope_theta, variant,
                                           rope_scaling),
                    mrope=mrope)


def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0,
               rope_theta=1e4, *, rope_scaling=None):
    """FlashInfer's ``apply_rope``: ragged batch (indptr + offsets), cos/sin on the fly.
    q ``[nnz, num_q_heads, head_dim]``, k ``[nnz, num_k_heads, head_dim]``; ``rope_scale``
    divides the frequencies. Returns ``(q_rope, k_rope)``.

    ``rope_scaling``: a HuggingFace-style dict (``rope_type`` default, linear, llama3 or
    yarn) computed on the fly instead of ``rope_scale``; see README "Scaling variants"."""
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta,
                rope_scaling=rope_scaling, indptr=indptr, offsets=offsets)


def apply_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0,
                       rope_theta=1e4, *, rope_scaling=None) -> None:
    """FlashInfer's ``apply_rope_inplace``."""
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta, rope_scaling=rope_scaling,
         indptr=indptr, offsets=offsets)


def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0,
                       rope_theta=1e4, *, rope_scaling=None):
    """FlashInfer's ``apply_rope_pos_ids``: one position per token, cos/sin on the fly."""
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta,
                rope_scaling=rope_scaling, pos_ids=pos_ids)


def apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0,
                               rope_theta=1e4, *, rope_scaling=None) -> None:
    """FlashInfer's ``apply_rope_pos_ids_inplace``."""
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta, rope_scaling=rope_scaling,
         pos_ids=pos_ids)


def _llama(low_freq_factor, high_freq_factor, old_context_len) -> tuple:
    return ("llama3", low_freq_factor, high_freq_factor, old_context_len)


def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8.0,
                       rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0,
                       old_context_len=8192):
    """FlashInfer's ``apply_llama31_rope``: Llama 3.1 frequency smoothing, on the fly."""
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta,
                _llama(low_freq_factor, high_freq_factor, old_context_len),
                indptr=indptr, offsets=offsets)


def apply_llama31_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False,
                               rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0,
                               high_freq_factor=4.0, old_context_len=8192) -> None:
    """FlashInfer's ``apply_llama31_rope_inplace``."""
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta,
         _llama(low_freq_factor, high_freq_factor, old_context_len),
         indptr=indptr, offsets=offsets)


def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8.0,
                               rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0,
                               old_context_len=8192):
    """FlashInfer's ``apply_llama31_rope_pos_ids``."""
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta,
                _llama(low_freq_factor, high_freq_factor, old_context_len), pos_ids=pos_ids)


def apply_llama31_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False,
                                       rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0,
                                       high_freq_factor=4.0, old_context_len=8192) -> None:
    """FlashInfer's ``apply_llama31_rope_pos_ids_inplace``."""
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta,
         _llama(low_freq_factor, high_freq_factor, old_context_len), pos_ids=pos_ids)


# ------------------------------------------------------------------ multimodal RoPE

def _mrope(mrope_section, mrope_interleaved) -> tuple:
    try:
        section = tuple(mrope_section)
    except TypeError:
        raise TypeError(f"mrope_section: expected 3 integers (t, h, w), got {mrope_section!r}") from None
    return (section, bool(mrope_interleaved))


def apply_mrope_inplace_with_cache(positions, query, key, head_size, cos_sin_cache, is_neox,
                                   mrope_section, mrope_interleaved=False, *,
                                   check_positions=False) -> None:
    """Multimodal RoPE (Qwen2-VL, Qwen3-VL) from a cos/sin cache, in place.

    positions ``[3, num_tokens]``: temporal, height and width positions. Frequency j of the
    rotary_dim/2 takes its angle from row 0 for the first ``mrope_section[0]`` frequencies,
    row 1 for the next ``mrope_section[1]`` and row 2 for the rest (Qwen2-VL); with
    ``mrope_interleaved=True`` (Qwen3-VL) frequencies alternate t, h, w while each section
    lasts. The section is part of the compiled specialization: no per-token cos/sin is
    materialized. Text tokens (three equal rows) get exactly the plain RoPE result.
    """
    run_rope(query, key, head_size=head_size, rotary_dim=None, is_neox=is_neox, inplace=True,
             positions=positions, cache=cos_sin_cache, mrope=_mrope(mrope_section, mrope_interleaved),
             check_positions=check_positions)


def apply_mrope_with_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox,
                                   mrope_section, mrope_interleaved=False, *,
                                   check_positions=False):
    """Out-of-place ``apply_mrope_inplace_with_cache``: returns ``(query_out, key_out)``."""
    return run_rope(query, key, head_size=head_size, rotary_dim=None, is_neox=is_neox,
                    inplace=False, positions=positions, cache=cos_sin_cache,
                    mrope=_mrope(mrope_section, mrope_interleaved),
                    check_positions=check_positions)


def apply_mrope_pos_ids(q, k, pos_ids, mrope_section, rotary_dim=None, interleave=False,
                        rope_scale=1.0, rope_theta=1e4, *, mrope_interleaved=False,
                        rope_scaling=None):
    """Multimodal RoPE with cos/sin on the fly: pos_ids ``[3, nnz]``, q/k
    ``[nnz, heads, head_dim]``; sections as ``apply_mrope_inplace_with_cache``. Returns
    ``(q_rope, k_rope)``."""
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta,
                rope_scaling=rope_scaling, pos_ids=pos_ids,
                mrope=_mrope(mrope_section, mrope_interleaved))


def apply_mrope_pos_ids_inplace(q, k, pos_ids, mrope_section, rotary_dim=None, interleave=False,
                                rope_scale=1.0, rope_theta=1e4, *, mrope_interleaved=False,
                                rope_scaling=None) -> None:
    """In-place ``apply_mrope_pos_ids``."""
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta, rope_scaling=rope_scaling,
         pos_ids=pos_ids, mrope=_mrope(mrope_section, mrope_interleaved))


# ------------------------------------------------------------------ positions

def positions_from_offsets(indptr, offsets, nnz=None):
    """Positions of a ragged batch: token j of request b gets offsets[b] + (j - indptr[b]).

    Returns ``nnz`` positions (default ``indptr[-1]``), one per token 0 .. nnz-1; a token no
    request owns gets -1. NumPy in, NumPy out (host arrays of any framework are computed on
    the host). Device arrays stay on the device: one kernel, no host round trip when
    ``nnz`` is given; without it, indptr[-1] is read back first. The result has the dtype
    of ``offsets``.
    """
    return run_positions(indptr, offsets, nnz)
