"""Which dispatch knobs (``plan.Tuning``) a device gets.

Built-in rules per GPU, measured (benchmarks/NOTES.md): a GPU not listed gets the defaults
that were measured on an H100.
"""

from __future__ import annotations

from functools import lru_cache

from ._cuda import device_name
from .plan import DEFAULT_TUNING, Tuning

# GPU name (as the driver reports it) -> the knobs measured on it.
BUILT_IN: dict[str, Tuning] = {}


@lru_cache(maxsize=None)
def tuning_for(device: int) -> Tuning:
    """The knobs for `device` (looked up once per device)."""
    return BUILT_IN.get(device_name(device), DEFAULT_TUNING)
