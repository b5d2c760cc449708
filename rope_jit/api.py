"""Public entry points: vLLM's and FlashInfer's RoPE APIs, same names, arguments, defaults
and return conventions. Each is one call into ``launch.run_rope``.

Arrays may be torch tensors, CuPy arrays, or any object with ``__cuda_array_interface__``
or ``__dlpack__``; out-of-place functions return the caller's array type. In-place
functions return None.
"""

from __future__ import annotations

from .launch import run_positions, run_rope

_LLAMA31_DEFAULTS = dict(rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0,
                         high_freq_factor=4.0, old_context_len=8192)


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

def _on_the_fly(q, rotary_dim, rope_scale, rope_theta, llama=None):
    rot = rotary_dim if rotary_dim is not None else _last_dim(q)
    return (rot, rope_theta, rope_scale, llama)


def _last_dim(q) -> int:
    shape = getattr(q, "shape", None)
    if shape is None:
        from .arrays import describe

        shape = describe(q, "q").shape
    return int(shape[-1])


def _fly(q, k, inplace, rotary_dim, interleave, rope_scale, rope_theta, llama=None, *,
         pos_ids=None, indptr=None, offsets=None):
    return run_rope(q, k, head_size=None, rotary_dim=rotary_dim, is_neox=not interleave,
                    inplace=inplace, positions=pos_ids, indptr=indptr, offsets=offsets,
                    on_the_fly=_on_the_fly(q, rotary_dim, rope_scale, rope_theta, llama))


def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0,
               rope_theta=1e4):
    """FlashInfer's ``apply_rope``: ragged batch (indptr + offsets), cos/sin on the fly.
    q ``[nnz, num_q_heads, head_dim]``, k ``[nnz, num_k_heads, head_dim]``; ``rope_scale``
    divides the frequencies. Returns ``(q_rope, k_rope)``."""
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta,
                indptr=indptr, offsets=offsets)


def apply_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0,
                       rope_theta=1e4) -> None:
    """FlashInfer's ``apply_rope_inplace``."""
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta, indptr=indptr, offsets=offsets)


def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0,
                       rope_theta=1e4):
    """FlashInfer's ``apply_rope_pos_ids``: one position per token, cos/sin on the fly."""
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta, pos_ids=pos_ids)


def apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0,
                               rope_theta=1e4) -> None:
    """FlashInfer's ``apply_rope_pos_ids_inplace``."""
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta, pos_ids=pos_ids)


def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8.0,
                       rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0,
                       old_context_len=8192):
    """FlashInfer's ``apply_llama31_rope``: Llama 3.1 frequency smoothing, on the fly."""
    llama = (low_freq_factor, high_freq_factor, old_context_len)
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta, llama,
                indptr=indptr, offsets=offsets)


def apply_llama31_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False,
                               rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0,
                               high_freq_factor=4.0, old_context_len=8192) -> None:
    """FlashInfer's ``apply_llama31_rope_inplace``."""
    llama = (low_freq_factor, high_freq_factor, old_context_len)
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta, llama,
         indptr=indptr, offsets=offsets)


def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8.0,
                               rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0,
                               old_context_len=8192):
    """FlashInfer's ``apply_llama31_rope_pos_ids``."""
    llama = (low_freq_factor, high_freq_factor, old_context_len)
    return _fly(q, k, False, rotary_dim, interleave, rope_scale, rope_theta, llama, pos_ids=pos_ids)


def apply_llama31_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False,
                                       rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0,
                                       high_freq_factor=4.0, old_context_len=8192) -> None:
    """FlashInfer's ``apply_llama31_rope_pos_ids_inplace``."""
    llama = (low_freq_factor, high_freq_factor, old_context_len)
    _fly(q, k, True, rotary_dim, interleave, rope_scale, rope_theta, llama, pos_ids=pos_ids)


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
