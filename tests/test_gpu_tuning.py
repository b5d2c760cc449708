"""Tuning on the GPU (rope_jit.tune): winners are stored and used by later calls, results
stay exact, and two tuning runs pick knobs within 2% of each other's time."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

SHAPE = dict(num_q_heads=32, num_kv_heads=8, head_size=128, dtype="bfloat16")


@pytest.fixture
def fresh_tables(cache_dir):
    from rope_jit import launch, tuning

    tuning.forget_tables()
    launch.clear_caches()
    yield
    tuning.forget_tables()
    launch.clear_caches()


def test_tune_stores_winners_that_later_calls_use(fresh_tables):
    import torch
    from gpu_cases import as_heads, assert_rope_close, to_numpy64

    import rope_jit
    from rope_jit import launch, reference, tune, tuning, warm
    from rope_jit.call import cache_call

    call = warm.CallShape(**SHAPE, cache_dtype="float32")
    table = tune.tune([call], [16, 4096], max_seconds=90)
    tuning.forget_tables()
    stored = tuning.table_for(0)
    assert stored.entries.keys() == table.entries.keys() and len(stored.entries) == 2
    for e in stored.entries.values():
        assert e["us"] <= e["start_us"] * 1.01  # never worse than the knobs it started from

    g = torch.Generator(device="cuda").manual_seed(3)
    T, D = 4096, 128
    q = torch.randn(T, 32 * D, generator=g, device="cuda").bfloat16()
    k = torch.randn(T, 8 * D, generator=g, device="cuda").bfloat16()
    pos = torch.randint(0, 8192, (T,), generator=g, device="cuda")
    cache = rope_jit.compute_cos_sin_cache(D, 8192, like=q)
    plan = launch.plan_of(cache_call(D, True, True), q, k, pos, cache=cache)
    assert plan.tuning == stored.get(plan.shape, tuning.token_bucket(T))
    before = [as_heads(q, D, 1), as_heads(k, D, 1)]
    rope_jit.apply_rope_inplace_with_cache(pos, q, k, D, cache, True)
    c, s = reference.cos_sin_from_cache(to_numpy64(cache), pos.cpu().numpy())
    for got, x0 in zip((q, k), before):
        assert_rope_close(got, x0, reference.apply_rotary(x0, c, s, True), "bfloat16", D, D, 1)


def test_two_runs_agree_within_two_percent(fresh_tables):
    from rope_jit import tune, warm

    call = warm.CallShape(**SHAPE, cache_dtype="float32")
    first = tune.tune_call(call, 8192)
    second = tune.tune_call(call, 8192)
    bench = tune._Bench(call, 8192, 0, seed=1)
    a, b = bench.time_us(first.tuning), bench.time_us(second.tuning)
    assert abs(a - b) <= 0.02 * min(a, b), (first.tuning, a, second.tuning, b)


def test_cli_tune_then_warm_covers_the_tuned_kernels(fresh_tables, capsys):
    """`rope-jit tune` stores its table; `rope-jit warm` then plans with the tuned knobs
    too, so a call that uses them compiles nothing."""
    from rope_jit import cli, jit, tuning

    code = cli.main(["tune", "--model", "llama3-8b", "--tokens", "16", "8192",
                     "--max-seconds", "60", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "tuned 2 of 2" in out, out
    tuning.forget_tables()
    assert len(tuning.stored_tables("sm_90")) == 1
    jit.clear_memory()
    assert cli.main(["warm", "--arch", "native", "--model", "llama3-8b", "--quiet",
                     "--max-tokens", "16384"]) == 0
    capsys.readouterr()
    import torch

    import rope_jit

    before = jit.stats.compiles
    for T in (16, 8192):
        q = torch.randn(T, 32 * 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, 8 * 128, device="cuda", dtype=torch.bfloat16)
        pos = torch.randint(0, 4096, (T,), device="cuda")
        cache = rope_jit.compute_cos_sin_cache(128, 4096, like=q)
        rope_jit.apply_rope_inplace_with_cache(pos, q, k, 128, cache, True)
    torch.cuda.synchronize()
    assert jit.stats.compiles == before, "a tuned launch compiled a kernel warming missed"
