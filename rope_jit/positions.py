"""positions_from_offsets on the host: values checked, then computed with NumPy.

Host arrays can be checked element by element at no device cost, so here a ragged batch
must be well formed: indptr starts at 0 and never decreases, offsets are non-negative, and
every position fits the offsets' dtype. (Device arrays are not read back: the kernel gives
-1 to tokens no request owns.)
"""

from __future__ import annotations

import numpy as np


def host_positions(indptr: np.ndarray, offsets: np.ndarray, nnz: int | None = None) -> np.ndarray:
    """Token j of request b sits at offsets[b] + (j - indptr[b]); one entry per token
    0 .. nnz-1 (nnz defaults to indptr[-1]), -1 for tokens past the last request. Same
    dtype as offsets. ValueError naming the argument for a malformed batch."""
    ind = np.asarray(indptr).astype(np.int64)
    off = np.asarray(offsets).astype(np.int64)
    if ind.size and ind[0] != 0:
        raise ValueError(f"indptr: expected indptr[0] == 0, got {int(ind[0])}")
    if (np.diff(ind) < 0).any():
        b = int(np.argmax(np.diff(ind) < 0))
        raise ValueError(f"indptr: expected non-decreasing entries, got indptr[{b}] = "
                         f"{int(ind[b])} > indptr[{b + 1}] = {int(ind[b + 1])}")
    if (off < 0).any():
        b = int(np.argmax(off < 0))
        raise ValueError(f"offsets: expected non-negative offsets, got offsets[{b}] = {int(off[b])}")
    n = int(ind[-1]) if nnz is None else int(nnz)
    lengths = np.diff(ind)
    if lengths.size:
        last = off + np.maximum(lengths - 1, 0)
        limit = np.iinfo(np.asarray(offsets).dtype).max
        if (last > limit).any():
            b = int(np.argmax(last > limit))
            raise ValueError(f"offsets: request {b}'s last position {int(last[b])} overflows "
                             f"{np.asarray(offsets).dtype} (max {limit})")
    out = np.full(n, -1, dtype=np.int64)
    owner = np.searchsorted(ind, np.arange(min(n, int(ind[-1]))), side="right") - 1
    tokens = np.arange(owner.size)
    out[:owner.size] = off[owner] + (tokens - ind[owner])
    return out.astype(np.asarray(offsets).dtype)
