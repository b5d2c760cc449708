"""Per-device dispatch knobs (rope_jit.tuning) on the CPU: the table's file format, where it
lives, atomic saves, read-only and damaged files, the order of preference (tuned entry,
built-in per GPU model, defaults), the planner's lookup by shape class and token bucket,
and the opt-in autotuning switch. Measuring needs a GPU: tests/test_gpu_tuning.py."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from rope_jit import plan, tuning
from rope_jit.plan import DEFAULT_TUNING, ShapeClass, Tuning

KEY = ("NVIDIA H200", "sm_90", 132)
SHAPE = ShapeClass("bfloat16", "float32", 128, 128, 40, True, True)
OTHER = SHAPE._replace(cos_sin="on-the-fly")


@pytest.mark.parametrize("tokens, bucket", [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32),
                                            (8192, 8192), (8193, 16384), (0, 1)])
def test_token_bucket(tokens, bucket):
    assert tuning.token_bucket(tokens) == bucket


def test_table_round_trip(cache_dir):
    t = tuning.TuningTable(KEY)
    fast = dataclasses.replace(DEFAULT_TUNING, head_batch=1, block=512)
    t.put(SHAPE, 8192, fast, us=40.1)
    path = t.save()
    assert path.parent == cache_dir / "tuning" and "nvidia-h200-sm_90-132sm" in path.name
    back = tuning.TuningTable.load(KEY)
    assert back.get(SHAPE, 8192) == fast
    assert back.get(SHAPE, 4096) is None and back.get(OTHER, 8192) is None
    data = json.loads(path.read_text())
    assert data["device"] == "NVIDIA H200" and data["sms"] == 132
    assert list(data["entries"].values())[0]["us"] == 40.1


@pytest.mark.parametrize("damage", ["garbage", "other-version", "other-format", "bad-knob"])
def test_damaged_or_foreign_tables_are_ignored(cache_dir, damage):
    """A table that is not exactly this format and version is never trusted: the built-in
    knobs apply."""
    t = tuning.TuningTable(KEY)
    t.put(SHAPE, 8192, dataclasses.replace(DEFAULT_TUNING, head_batch=1))
    path = t.save()
    data = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text("{not json")
    else:
        if damage == "other-version":
            data["rope_jit"] = "0.0.0"
        elif damage == "other-format":
            data["format"] = 99
        else:
            next(iter(data["entries"].values()))["tuning"]["warp_specialize"] = True
        path.write_text(json.dumps(data))
    assert tuning.TuningTable.load(KEY).get(SHAPE, 8192) is None


def test_few_token_knob_round_trips_and_old_entries_mean_the_rule(cache_dir):
    """few_tokens (kernels/rope.cu FEW_TOKENS) is stored as true/false/null; an entry
    written before the knob existed (no key) reads as None: the planner's regime rule."""
    t = tuning.TuningTable(KEY)
    for bucket, value in ((1, True), (8192, False)):
        t.put(SHAPE, bucket, dataclasses.replace(DEFAULT_TUNING, few_tokens=value))
    path = t.save()
    data = json.loads(path.read_text())
    assert data["entries"][tuning._entry_key(SHAPE, 8192)]["tuning"]["few_tokens"] is False
    del data["entries"][tuning._entry_key(SHAPE, 1)]["tuning"]["few_tokens"]  # an older entry
    path.write_text(json.dumps(data))
    loaded = tuning.TuningTable.load(KEY)
    assert loaded.get(SHAPE, 1).few_tokens is None and loaded.get(SHAPE, 8192).few_tokens is False


def test_read_only_table_is_read(cache_dir):
    t = tuning.TuningTable(KEY)
    t.put(SHAPE, 1, dataclasses.replace(DEFAULT_TUNING, small_block=64))
    path = t.save()
    path.chmod(0o444)
    path.parent.chmod(0o555)
    try:
        assert tuning.TuningTable.load(KEY).get(SHAPE, 1).small_block == 64
    finally:
        path.parent.chmod(0o755)


def _device_tuning(monkeypatch, name="NVIDIA H200", built_in=None, entries=(), shipped_dir=None):
    """A DeviceTuning of a pretend GPU; no shipped table unless `shipped_dir` holds one."""
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped_dir or tuning.SHIPPED_DIR / "none")
    monkeypatch.setattr(tuning, "device_name", lambda d: name)
    monkeypatch.setattr(tuning, "device_arch", lambda d: "90")
    monkeypatch.setattr(tuning, "num_sms", lambda d: 132)
    monkeypatch.setattr(tuning, "BUILT_IN", dict(built_in or {}))
    tuning.forget_tables()
    table = tuning.table_for(0)
    for shape, bucket, t in entries:
        table.put(shape, bucket, t)
    return tuning.DeviceTuning(0)


def test_order_of_preference(cache_dir, monkeypatch):
    """Tuned entry for the shape class and bucket, else the GPU model's built-in knobs,
    else the defaults."""
    tuned = dataclasses.replace(DEFAULT_TUNING, head_batch=1)
    built = dataclasses.replace(DEFAULT_TUNING, fill_waves=8.0)
    lookup = _device_tuning(monkeypatch, built_in={"NVIDIA H200": built},
                            entries=[(SHAPE, 8192, tuned)])
    assert lookup(SHAPE, 8000) is tuned          # same bucket
    assert lookup(SHAPE, 9000) == tuned          # another bucket: the nearest tuned one
    assert lookup(OTHER, 8192) == built          # another shape class: built-in
    other_gpu = _device_tuning(monkeypatch, name="NVIDIA H100 80GB HBM3",
                               built_in={"NVIDIA H200": built})
    assert other_gpu(OTHER, 9000) is DEFAULT_TUNING
    tuning.forget_tables()


def test_planner_asks_the_lookup_with_the_shape_class():
    from test_plan import desc, plan_call
    from rope_jit.call import cache_call
    from rope_jit.plan import RopeArrays

    seen = []
    picked = dataclasses.replace(DEFAULT_TUNING, head_batch=4, min_blocks=2)

    def lookup(shape, tokens):
        seen.append((shape, tokens))
        return picked

    a = RopeArrays(desc((4096, 32 * 128)), desc((4096, 8 * 128)), desc((4096,), "int64"),
                   cos_sin_cache=desc((8192, 128), "float32"))
    p = plan_call(cache_call(128, True, True), a, tuning=lookup)
    assert seen == [(SHAPE, 4096)]
    assert p.shape == SHAPE and p.tuning is picked and p.num_tokens == 4096
    assert p.spec.head_batch == 4 and p.spec.min_blocks == 2


def test_tuning_is_part_of_the_plan_not_a_global():
    """Two different knob values give two different plans for the same call; nothing
    module-level changes."""
    from test_plan import desc, plan_call
    from rope_jit.call import cache_call
    from rope_jit.plan import RopeArrays

    a = RopeArrays(desc((65536, 32 * 128)), desc((65536, 8 * 128)), desc((65536,), "int64"),
                   cos_sin_cache=desc((8192, 128), "float32"))
    c = cache_call(128, True, True)
    one = plan_call(c, a, tuning=Tuning(head_batch=1))
    four = plan_call(c, a, tuning=Tuning(head_batch=4))
    assert one.spec.head_batch == 1 and four.spec.head_batch == 4
    assert plan.DEFAULT_TUNING == Tuning()


def test_autotuning_is_opt_in(monkeypatch):
    """No measuring unless ROPE_JIT_AUTOTUNE says so (importing rope_jit registers the
    measurer; the switch is read at each plan miss)."""
    import rope_jit  # noqa: F401  (registers rope_jit.tune.autotune)

    monkeypatch.delenv(tuning.ENV_AUTOTUNE, raising=False)
    assert tuning.autotuner() is None
    monkeypatch.setenv(tuning.ENV_AUTOTUNE, "0")
    assert tuning.autotuner() is None
    monkeypatch.setenv(tuning.ENV_AUTOTUNE, "1")
    from rope_jit.tune import autotune

    assert tuning.autotuner() is autotune


def test_shipped_table_sits_between_the_user_table_and_the_built_in(cache_dir, monkeypatch, tmp_path):
    """A table shipped in rope_jit/tuned/ (any rope_jit version that measured it) answers
    where this machine's own table has no entry; warming covers it."""
    shipped = dataclasses.replace(DEFAULT_TUNING, block=512)
    mine = dataclasses.replace(DEFAULT_TUNING, head_batch=1)
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path)
    table = tuning.TuningTable(KEY)
    table.put(SHAPE, 8192, shipped)
    table.put(SHAPE, 1024, shipped)
    data = json.loads(table.to_json())
    data["rope_jit"] = "0.0.1"  # measured by an older version: still valid (ships with the code)
    tuning.shipped_path(KEY).write_text(json.dumps(data))
    lookup = _device_tuning(monkeypatch, entries=[(SHAPE, 8192, mine)], shipped_dir=tmp_path)
    assert lookup(SHAPE, 8192) == mine          # this machine's table first
    assert lookup(SHAPE, 1000) == shipped       # then the shipped one's entry
    assert lookup(SHAPE, 16384) == mine         # then this machine's nearest bucket
    assert lookup(OTHER, 4) is DEFAULT_TUNING   # then built-in / defaults
    choices = tuning.knob_choices(["sm_90"])
    assert any(callable(c) and c(SHAPE, 1024) == shipped for c in choices)
    tuning.forget_tables()


def test_untuned_buckets_take_the_nearest_tuned_one(cache_dir, monkeypatch):
    """A bucket the table lacks gets the knobs of the nearest tuned bucket of its shape
    class (powers of two; the smaller on a tie); another shape class gets none."""
    a, b = (dataclasses.replace(DEFAULT_TUNING, block=n) for n in (128, 512))
    t = tuning.TuningTable(KEY)
    t.put(SHAPE, 16, a)
    t.put(SHAPE, 1024, b)
    assert t.nearest(SHAPE, 16) == a and t.nearest(SHAPE, 32) == a and t.nearest(SHAPE, 128) == a
    assert t.nearest(SHAPE, 256) == b and t.nearest(SHAPE, 65536) == b and t.nearest(SHAPE, 1) == a
    assert t.nearest(OTHER, 16) is None
    lookup = _device_tuning(monkeypatch, entries=[(SHAPE, 16, a), (SHAPE, 1024, b)])
    assert lookup(SHAPE, 100) == a and lookup(SHAPE, 5000) == b
    tuning.forget_tables()


def test_tune_call_measures_each_kernel_once_so_no_op_knobs_cannot_win(monkeypatch):
    """Coordinate descent with a bench whose kernel depends on head_batch alone: every
    other knob plans the same kernel and launch, so it is never timed (timing noise cannot
    pick it), and the winner differs from the start in head_batch only."""
    from types import SimpleNamespace

    from rope_jit import tune

    start = DEFAULT_TUNING
    timed = []

    class FakeBench:
        def __init__(self, call, num_tokens, device):
            pass

        def plan(self, t):
            t = start if not isinstance(t, Tuning) else t
            return SimpleNamespace(tuning=t, shape=SHAPE, spec=("kernel", t.head_batch),
                                   launch=None)

        def time_us(self, t):
            timed.append(t)
            # head_batch 4 is fastest; any other knob would "win" by 5% if it were timed
            base = {1: 10.0, 2: 9.0, 4: 8.0}[t.head_batch]
            return base * (0.95 if t != dataclasses.replace(start, head_batch=t.head_batch) else 1.0)

    monkeypatch.setattr(tune, "_Bench", FakeBench)
    monkeypatch.setattr(tune, "DeviceTuning", lambda device: None)
    m = tune.tune_call(SimpleNamespace(cache_dtype="float32"), 8192)
    assert m.tuning == dataclasses.replace(start, head_batch=4)
    assert m.us == 8.0 and m.start_us == 9.0
    assert sorted(t.head_batch for t in timed) == [1, 2, 4] and m.candidates == 3
