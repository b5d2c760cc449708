"""Which dispatch knobs (``plan.Tuning``) a call gets on a device.

In order of preference:
1. a tuned entry: ``rope-jit tune`` (``rope_jit.tune``) measured candidates on this GPU
   and stored the winner per shape class and token bucket in a table beside the compiled
   kernels (``<cache dir>/tuning/``, one JSON file per GPU model, SM count and rope_jit
   version; written atomically; read from a read-only, pre-warmed directory too);
2. a table shipped with rope_jit for this GPU model (``rope_jit/tuned/``: the same format,
   measured by ``rope-jit tune`` on that GPU for the benchmark's model shapes);
3. the built-in knobs of this GPU model (``BUILT_IN``);
4. the defaults (measured on an H100).

Nothing here measures: a call never tunes unless ``ROPE_JIT_AUTOTUNE=1`` asks for it
(``rope_jit.tune.autotune`` then fills missing entries on a plan miss).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import asdict, fields
from pathlib import Path

from . import jit
from ._cuda import device_arch, device_name, num_sms
from ._version import __version__
from .plan import DEFAULT_TUNING, ShapeClass, Tuning

ENV_AUTOTUNE = "ROPE_JIT_AUTOTUNE"
TABLE_FORMAT = 1

# GPU model (as the driver names it) -> knobs measured on it, for every shape class.
BUILT_IN: dict[str, Tuning] = {}


def token_bucket(num_tokens: int) -> int:
    """Token counts share an entry per power of two: 1, 2, 4, ..., the next one up."""
    return 1 << max(0, num_tokens - 1).bit_length()


def device_key(device: int) -> tuple:
    """What a table is valid for: GPU model, arch, SM count (and this rope_jit version)."""
    return device_name(device), f"sm_{device_arch(device)}", num_sms(device)


def _table_stem(key: tuple) -> str:
    name, arch, sms = key
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug}-{arch}-{sms}sm"


def table_path(key: tuple) -> Path:
    return jit.cache_dir() / "tuning" / f"{_table_stem(key)}-rope_jit-{__version__}.json"


SHIPPED_DIR = Path(__file__).resolve().parent / "tuned"


def shipped_path(key: tuple) -> Path:
    return SHIPPED_DIR / f"{_table_stem(key)}.json"


def _entry_key(shape: ShapeClass, bucket: int) -> str:
    return json.dumps([list(shape), bucket])


def tuning_from_dict(d: dict) -> Tuning:
    names = {f.name for f in fields(Tuning)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"tuning: unknown knobs {sorted(unknown)}")
    return Tuning(**d)


class TuningTable:
    """The tuned entries of one device: (shape class, token bucket) -> Tuning, plus the
    measurements behind each (for reports)."""

    def __init__(self, key: tuple, entries: dict | None = None):
        self.key = key
        self.entries: dict = dict(entries or {})   # entry key -> {"tuning", "us", ...}
        self._knobs: dict = {}

    def get(self, shape: ShapeClass, bucket: int) -> Tuning | None:
        k = _entry_key(shape, bucket)
        t = self._knobs.get(k)
        if t is None and k in self.entries:
            t = self._knobs[k] = tuning_from_dict(self.entries[k]["tuning"])
        return t

    def nearest(self, shape: ShapeClass, bucket: int) -> Tuning | None:
        """The entry of this shape class at `bucket`, else at the tuned bucket nearest to it
        (in powers of two; the smaller on a tie): knobs change gradually with the token
        count, so a neighbour's are a better guess than the untuned defaults."""
        t = self.get(shape, bucket)
        if t is not None:
            return t
        prefix = json.dumps([list(shape)])[:-1] + ", "
        tuned = [int(k[len(prefix):-1]) for k in self.entries if k.startswith(prefix)]
        if not tuned:
            return None
        log = bucket.bit_length()
        return self.get(shape, min(tuned, key=lambda b: (abs(b.bit_length() - log), b)))

    def put(self, shape: ShapeClass, bucket: int, tuning: Tuning, **measured) -> None:
        k = _entry_key(shape, bucket)
        self.entries[k] = {"tuning": asdict(tuning), **measured}
        self._knobs[k] = tuning

    def to_json(self) -> str:
        name, arch, sms = self.key
        return json.dumps({"format": TABLE_FORMAT, "rope_jit": __version__, "device": name,
                           "arch": arch, "sms": sms, "entries": self.entries},
                          indent=1, sort_keys=True)

    def save(self) -> Path:
        """Write atomically beside the kernel cache (readers see the old or the new file)."""
        path = table_path(self.key)
        jit.write_atomic(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, key: tuple, path: Path | None = None) -> "TuningTable":
        """The table stored for `key` (at `path`: a shipped table, whose knobs are valid for
        the kernels it ships with, whatever version measured them), or an empty one
        (missing, unreadable or of another format: the next preference applies; a damaged
        file is never trusted)."""
        try:
            data = json.loads((path or table_path(key)).read_text())
            if data.get("format") != TABLE_FORMAT or (path is None
                                                      and data.get("rope_jit") != __version__):
                return cls(key)
            entries = data["entries"]
            for e in entries.values():
                tuning_from_dict(e["tuning"])
            return cls(key, entries)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(key)


_tables: dict = {}
_shipped: dict = {}
_lock = threading.Lock()


def table_for(device: int) -> TuningTable:
    """This device's table, loaded once per process."""
    t = _tables.get(device)
    if t is None:
        with _lock:
            t = _tables.get(device)
            if t is None:
                t = _tables[device] = TuningTable.load(device_key(device))
    return t


def shipped_table(key: tuple) -> TuningTable:
    """The table rope_jit ships for this GPU model, arch and SM count (may be empty)."""
    t = _shipped.get(key)
    if t is None:
        t = _shipped[key] = TuningTable.load(key, shipped_path(key))
    return t


def forget_tables() -> None:
    """Drop the loaded tables (the next plan reads them again from disk)."""
    with _lock:
        _tables.clear()
        _shipped.clear()


_autotuner = None  # rope_jit.tune.autotune, registered by that module (it sits above launch)


def set_autotuner(fn) -> None:
    global _autotuner
    _autotuner = fn


def autotuner():
    """The measuring fallback for missing entries, when ROPE_JIT_AUTOTUNE=1 opts in."""
    if os.environ.get(ENV_AUTOTUNE, "") in ("", "0"):
        return None
    if _autotuner is None:
        raise RuntimeError(f"{ENV_AUTOTUNE}=1 but rope_jit.tune is not imported (import "
                           "rope_jit, which imports it)")
    return _autotuner


def stored_tables(arch: str | None = None) -> list:
    """Every readable table in the cache directory (of one arch when given): what warming
    must cover besides the built-in knobs."""
    tables = []
    for path in sorted((jit.cache_dir() / "tuning").glob("*.json")):
        try:
            data = json.loads(path.read_text())
            key = (data["device"], data["arch"], int(data["sms"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if arch is None or key[1] == arch:
            table = TuningTable.load(key)
            if table.entries:
                tables.append(table)
    return tables


def knob_choices(archs=None) -> list:
    """The knobs (Tuning values, or ShapeClass/token lookups for tuned tables) calls on GPUs
    of `archs` may be planned with: the defaults, every built-in set, every stored table.
    Warming plans with each, so a pre-warmed cache holds what any of them picks."""
    choices = [DEFAULT_TUNING, *dict.fromkeys(BUILT_IN.values())]
    shipped = []
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            shipped.append(shipped_table((data["device"], data["arch"], int(data["sms"]))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for arch in archs or [None]:
        for table in stored_tables(arch) + [t for t in shipped if arch in (None, t.key[1])]:
            choices.append(_TableLookup(table, BUILT_IN.get(table.key[0], DEFAULT_TUNING)))
    return choices


class _TableLookup:
    """A stored table's knobs for a shape class and token count, else `fallback`."""

    def __init__(self, table: TuningTable, fallback: Tuning):
        self.table, self.fallback = table, fallback

    def __call__(self, shape: ShapeClass, num_tokens: int) -> Tuning:
        return self.table.nearest(shape, token_bucket(num_tokens)) or self.fallback


class DeviceTuning:
    """The knob lookup the planner calls once it knows the call's shape class: this
    machine's tuned entry (measured on the spot first with ROPE_JIT_AUTOTUNE=1), else the
    shipped table's entry, else the nearest tuned bucket of this machine's table, then of
    the shipped one, else this GPU model's built-in knobs, else the defaults."""

    def __init__(self, device: int, autotune=None):
        self.device = device
        self.table = table_for(device)
        self.shipped = shipped_table(device_key(device))
        self.built_in = BUILT_IN.get(device_name(device), DEFAULT_TUNING)
        self.autotune = autotune  # fn(device, shape, bucket) -> Tuning | None, or None

    def __call__(self, shape: ShapeClass, num_tokens: int) -> Tuning:
        bucket = token_bucket(num_tokens)
        t = self.table.get(shape, bucket)
        if t is None and self.autotune is not None:
            t = self.autotune(self.device, shape, bucket)
        return (t or self.shipped.get(shape, bucket) or self.table.nearest(shape, bucket)
                or self.shipped.nearest(shape, bucket) or self.built_in)
