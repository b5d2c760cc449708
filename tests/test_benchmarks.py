"""The benchmark's pure parts, on the CPU: byte counting (docs/performance.md), the pattern
ceiling's geometry, the correctness check and the peer adapters it guards, the report
rendered from results dicts, the per-GPU folders, the arguments, a dry run end to end, and
a new op family going through the sweep and the report unchanged."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import ceilings  # noqa: E402
import impls  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
from errors import Unavailable  # noqa: E402
from peers import Peers  # noqa: E402
from timing import CpuTimer  # noqa: E402

CPU = torch.device("cpu")
ROPE = impls.FAMILIES["rope"]
SHAPES = impls.ROPE_SHAPES


def impl_named(name: str, peers: Peers | None = None) -> impls.Impl:
    built, _ = ROPE.build_impls(peers or Peers(CPU))
    return next(i for i in built if i.name == name)


# ================================================================== bytes

def test_in_place_bytes_are_the_rotated_part_positions_and_cache_rows():
    s, T = SHAPES["llama3-8b"], 8
    fp32 = impl_named("rope_jit/cache_fp32")
    assert ROPE.bytes_per_call(s, T, fp32) == 2 * T * 40 * 128 * 2 + 8 * T + T * 128 * 4
    fly = impl_named("rope_jit/on_the_fly")
    assert ROPE.bytes_per_call(s, T, fly) == 2 * T * 40 * 128 * 2 + 8 * T


def test_partial_heads_in_place_skip_the_pass_through_part_out_of_place_copy_it():
    s, T = SHAPES["gptj"], 16  # rotary 64 of 128
    in_place = impl_named("rope_jit/cache_bf16")
    out_of_place = impl_named("torch_eager")
    assert in_place.cache_dtype == out_of_place.cache_dtype == "bfloat16"
    assert out_of_place.inplace is False
    rows = T * (32 + 2)
    common = 8 * T + T * 64 * 2
    assert ROPE.bytes_per_call(s, T, in_place) == 2 * rows * 64 * 2 + common
    assert ROPE.bytes_per_call(s, T, out_of_place) == 2 * rows * 128 * 2 + common


def test_copy_and_pattern_ceiling_rows_move_whole_heads_and_the_rotated_part():
    s, T = SHAPES["phi2"], 32  # rotary 32 of 80
    assert ROPE.input_bytes(s, T) == T * 64 * 80 * 2
    p = ROPE.touch_pattern(s, T)
    assert (p.rows, p.row_bytes, p.touched_bytes) == (T * 64, 160, 64)
    assert p.buffer_bytes == ROPE.input_bytes(s, T)
    fly = impl_named("rope_jit/on_the_fly")
    assert p.moved_bytes == ROPE.bytes_per_call(s, T, fly) - 8 * T  # same q/k bytes, no positions


def test_touch_pattern_rejects_what_16_byte_vectors_cannot_cover():
    with pytest.raises(ValueError, match="multiple of the 16-byte vector"):
        ceilings.TouchPattern(rows=4, row_bytes=72, touched_bytes=16)
    with pytest.raises(ValueError, match="touched_bytes"):
        ceilings.TouchPattern(rows=4, row_bytes=32, touched_bytes=48)


def test_cpu_touch_changes_exactly_the_prefix_of_every_row():
    p = ceilings.TouchPattern(rows=3, row_bytes=48, touched_bytes=16)
    buf = torch.zeros(p.buffer_bytes, dtype=torch.uint8)
    ceilings.touch_prefix_torch(buf, p)
    rows = buf.view(3, 48)
    assert bool((rows[:, :16] == 1).all()) and bool((rows[:, 16:] == 0).all())


def test_chain_floor_is_charged_like_a_call_with_an_fp32_cache():
    s, T = SHAPES["llama3-8b"], 16
    c = ROPE.chain_pattern(s, T)
    assert c.touch == ROPE.touch_pattern(s, T) and c.rows_per_token == 40 and c.tokens == T
    assert c.table_row_bytes == 128 * 4
    assert c.moved_bytes == ROPE.bytes_per_call(s, T, impl_named("rope_jit/cache_fp32"))
    assert ROPE.chain_pattern(s, ROPE.decode_max_tokens + 1) is None  # decode rows only
    with pytest.raises(ValueError, match="rows_per_token"):
        ceilings.ChainPattern(ceilings.TouchPattern(6, 32, 16), 4, 16, 10)
    with pytest.raises(ValueError, match="table_row_bytes"):
        ceilings.ChainPattern(ceilings.TouchPattern(6, 32, 16), 3, 24, 10)


def _chain_case(device):
    """3 tokens of 2 rows (48 bytes, 32 touched), a table of 5 rows of 16 bytes."""
    c = ceilings.ChainPattern(ceilings.TouchPattern(rows=6, row_bytes=48, touched_bytes=32),
                              rows_per_token=2, table_row_bytes=16, table_rows=5)
    g = torch.Generator().manual_seed(3)
    buf = torch.randint(0, 256, (c.touch.buffer_bytes,), dtype=torch.uint8, generator=g)
    table = torch.randint(0, 2 ** 20, (5 * 4,), dtype=torch.int32, generator=g)
    pos = torch.tensor([4, 0, 2], dtype=torch.int64)
    return c, buf.to(device), pos.to(device), table.to(device)


def test_cpu_chained_touch_adds_each_tokens_table_row_to_its_rows_prefix():
    c, buf, pos, table = _chain_case("cpu")
    before = buf.clone().view(torch.int32).view(6, 12)
    ceilings.touch_chained_torch(buf, pos, table, c)
    after = buf.view(torch.int32).view(6, 12)
    rows = table.view(5, 4)
    for r in range(6):
        want = rows[pos[r // 2]].repeat(2)  # 32 touched bytes: the 16-byte row twice
        assert torch.equal(after[r, :8], before[r, :8] + want)
        assert torch.equal(after[r, 8:], before[r, 8:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_chained_touch_matches_the_torch_stand_in():
    c, buf, pos, table = _chain_case("cuda")
    want = buf.clone()
    ceilings.touch_chained_torch(want, pos, table, c)
    guard = torch.full((64,), 0xA5, dtype=torch.uint8, device="cuda")
    padded = torch.cat([buf, guard])  # bytes past the pattern's buffer stay untouched
    ceilings.touch_chained(padded, pos, table, c)
    torch.cuda.synchronize()
    assert torch.equal(padded[:buf.numel()], want)
    assert bool((padded[buf.numel():] == 0xA5).all())


@pytest.mark.nvrtc
@pytest.mark.parametrize("source", ["TOUCH_SOURCE", "NARROW_SOURCE", "CHAIN_SOURCE"])
def test_ceiling_kernel_sources_compile_for_sm90(source):
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(getattr(ceilings, source), "ceiling.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["--gpu-architecture=sm_90"])
        assert len(nvrtc.getCUBIN(prog)) > 0
    finally:
        nvrtc.destroyProgram(prog)


# ================================================================== checks and adapters

@pytest.fixture(scope="module")
def contexts():
    return {name: ROPE.make_context(s, CPU, Peers(CPU)) for name, s in SHAPES.items()}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ["torch_eager"])
def test_pytorch_formula_out_of_place_passes_its_check(contexts, shape, name):
    ctx, impl = contexts[shape], impl_named(name)
    case = ROPE.make_check_case(ctx, 24)
    result = ROPE.check(impl, impl.prepare(ctx, 24), ctx, case)
    assert result["ok"], result["problems"]


def test_check_reports_the_wrong_style(contexts):
    ctx = contexts["llama3-8b"]
    impl = impl_named("torch_eager")
    flipped = impls.RopeContext(ctx.shape.__class__(**{**ctx.shape.__dict__, "is_neox": False}),
                                ctx.device, ctx.host_caches, ctx.caches, ctx.peers, ctx.compiled)
    result = ROPE.check(impl, impl.prepare(flipped, 8), ctx, ROPE.make_check_case(ctx, 8))
    assert not result["ok"] and "beyond tolerance" in result["problems"][0]


def test_check_reports_a_changed_pass_through_part_and_changed_inputs(contexts):
    ctx = contexts["gptj"]
    eager = impl_named("torch_eager")
    apply = eager.prepare(ctx, 8)

    def scribbles_on_its_inputs(pos, q, k):
        out = apply(pos, q, k)
        q[..., -1] = 0  # a pass-through dim of the input
        return out

    result = ROPE.check(eager, scribbles_on_its_inputs, ctx, ROPE.make_check_case(ctx, 8))
    assert result["problems"] == ["q: input changed by an out-of-place call"]

    in_place = impls.Impl("in_place_torch", None, "peer", "", cache_dtype="bfloat16",
                          tolerance="bf16_math")

    def in_place_but_sloppy(pos, q, k):
        q_out, k_out = apply(pos, q, k)
        q.copy_(q_out)
        k.copy_(k_out)
        k[..., 100] += 1  # dim 100 is past rotary 64

    result = ROPE.check(in_place, in_place_but_sloppy, ctx, ROPE.make_check_case(ctx, 8))
    assert result["problems"] == ["k: pass-through part (dims 64..127) changed"]


def hf_rotate_half_in_place(q, k, cos, sin):
    """Liger's semantics in torch: [B, H, T, D] views, cos/sin [1, T, R] (halves
    duplicated), the first R dims rotated in place (NeoX), fp32 math."""
    R = cos.shape[-1]
    c, s = cos[:, None].float(), sin[:, None].float()
    for x in (q, k):
        xr = x[..., :R].float()
        rotated = torch.cat((-xr[..., R // 2:], xr[..., :R // 2]), dim=-1)
        x[..., :R] = (xr * c + rotated * s).to(x.dtype)
    return q, k


@pytest.mark.parametrize("shape", ["llama3-8b", "phi2"])
def test_liger_adapter_feeds_its_layout_right(contexts, shape):
    """The [1, H, T, D] views and cos/sin [1, T, R] the adapter builds: checked through
    a torch stand-in of Liger's kernel (the real one needs a GPU)."""
    peers = Peers(CPU, liger_rope=hf_rotate_half_in_place, notes={"liger_kernel": "stand-in"})
    liger = impl_named("liger_kernel", peers)
    ctx = impls.RopeContext(**{**contexts[shape].__dict__, "peers": peers})
    result = ROPE.check(liger, liger.prepare(ctx, 16), ctx, ROPE.make_check_case(ctx, 16))
    assert result["ok"], result["problems"]


def test_liger_is_not_applicable_to_interleaved_style(contexts):
    peers = Peers(CPU, liger_rope=hf_rotate_half_in_place, notes={"liger_kernel": "stand-in"})
    ctx = impls.RopeContext(**{**contexts["gptj"].__dict__, "peers": peers})
    with pytest.raises(Unavailable) as e:
        impl_named("liger_kernel", peers).prepare(ctx, 16)
    assert e.value.status == "n/a"


# ================================================================== per-GPU folders

@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GH200 480GB", "gh200"),
    ("Tesla V100-SXM2-16GB", "v100"),
    ("NVIDIA", "gpu"),
])
def test_gpu_slug(name, slug):
    assert report.gpu_slug(name) == slug


def test_default_out_dir_is_per_gpu_under_benchmarks_results():
    assert report.default_out_dir("NVIDIA H200") == BENCH / "results" / "h200"


# ================================================================== arguments

def test_defaults_quick_and_dry_run_plans():
    full = run.RunPlan(run.parse_args([]))
    assert full.tokens == sorted(run.DEFAULT_TOKENS) and full.replays == run.DEFAULT_REPLAYS
    assert [s.name for s in full.shapes["rope"]] == list(SHAPES)
    assert full.budget_s == run.DEFAULT_BUDGET_S
    quick = run.RunPlan(run.parse_args(["--quick"]))
    assert quick.tokens == list(run.QUICK_TOKENS) and quick.replays == run.QUICK_REPLAYS
    assert quick.host_calls == run.QUICK_HOST_CALLS and quick.budget_s == run.QUICK_BUDGET_S
    dry = run.RunPlan(run.parse_args(["--dry-run", "--tokens", "16,1,16", "--shapes", "phi2"]))
    assert dry.tokens == [1, 16] and [s.name for s in dry.shapes["rope"]] == ["phi2"]


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "llama3-8b,bogus"], "--shapes: unknown ['bogus']"),
    (["--tokens", "1,x"], "--tokens: expected comma-separated integers"),
    (["--tokens", "0"], "--tokens: expected positive integers"),
    (["--families", "nope"], "--families: unknown ['nope']"),
    (["--replays", "0"], "--replays: expected a positive integer"),
    (["--budget-s", "-1"], "--budget-s: expected a positive number"),
])
def test_bad_arguments_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def test_impls_selection_by_name_or_prefix():
    built, _ = ROPE.build_impls(Peers(CPU))
    names = [i.name for i in run.select_impls(built, "rope_jit/cache,torch_compile")]
    assert names == ["rope_jit/cache_fp32", "rope_jit/cache_bf16", "torch_compile"]
    assert run.select_impls(built, None) == built


def test_check_row_is_the_largest_token_count_up_to_1024():
    assert run.check_tokens_for([1, 16, 1024, 8192]) == 1024
    assert run.check_tokens_for([1, 128, 8192]) == 128
    assert run.check_tokens_for([8192, 32768]) == 8192


def test_help_and_no_gpu_refusal_without_a_gpu():
    script = str(BENCH / "run.py")
    h = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "--dry-run" in h.stdout and "--quick" in h.stdout
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the no-GPU refusal cannot be seen here")
    r = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "No CUDA device" in r.stderr


# ================================================================== report

def synthetic_results() -> dict:
    """Llama at 1 and 8192 tokens: rope_jit slower than FlashInfer at 1 token and under
    its 95% target at 8192; torch_compile out of place."""
    rec = run.Recorder(copy_bw=4.0e12)
    s = SHAPES["llama3-8b"]
    built = {i.name: i for i in ROPE.build_impls(Peers(CPU))[0]}
    fi = impls.Impl("flashinfer/cache_fp32", None, "peer", "FlashInfer", cache_dtype="float32",
                    tolerance="fp32_2ulp")
    chosen = [built["rope_jit/cache_fp32"], built["rope_jit/on_the_fly"], fi, built["torch_compile"]]
    times = {1: dict(copy=1.0e-6, pattern_ceiling=1.1e-6, chain=1.4e-6, fp32=1.6e-6, fly=2.0e-6,
                     fi=1.5e-6, tc=5e-6),
             8192: dict(copy=40e-6, pattern_ceiling=42e-6, fp32=50e-6, fly=48e-6, fi=55e-6, tc=70e-6)}
    for T, t in times.items():
        rec.row("rope", s.name, T, "copy", "ok", 2 * ROPE.input_bytes(s, T), seconds=t["copy"],
                copy_seconds=t["copy"], timing="cuda-graph")
        pat = ROPE.touch_pattern(s, T)
        pat_bw = rec.row("rope", s.name, T, "pattern_ceiling", "ok", pat.moved_bytes,
                         seconds=t["pattern_ceiling"], copy_seconds=t["copy"])["bandwidth"]
        chain = ROPE.chain_pattern(s, T)  # decode rows only
        if chain is not None:
            rec.row("rope", s.name, T, "chain_floor", "ok", chain.moved_bytes,
                    seconds=t["chain"], copy_seconds=t["copy"])
        for impl, key in zip(chosen, ("fp32", "fly", "fi", "tc")):
            rec.row("rope", s.name, T, impl.name, "ok", ROPE.bytes_per_call(s, T, impl), seconds=t[key],
                    copy_seconds=t["copy"], pattern_bandwidth=pat_bw if impl.inplace else None,
                    timing="cuda-graph")
    rec.checks.append(dict(family="rope", shape=s.name, impl="rope_jit/cache_fp32", tokens=1024,
                           ok=True, problems=[], max_abs_err=0.01, worst_err_over_tol=0.5,
                           tolerance="fp32 text"))
    return dict(meta=dict(device="NVIDIA H200", torch="2.x", date="today"), copy_bandwidth=4.0e12,
                families={"rope": ROPE.describe(chosen, [s])}, shapes=[ROPE.describe_shape(s)],
                rows=rec.rows, checks=rec.checks, errors=[],
                host_overhead=[dict(family="rope", shape=s.name, impl="rope_jit/cache_fp32", calls=1000,
                                    what="fp32 cache", us_per_call=7.5, us_per_call_loop_only=7.4,
                                    note=None)],
                skipped={"liger_kernel": "not importable"}, notes=[], complete=True)


def test_report_tables_cells_and_out_of_place_marking():
    md = report.render_markdown(synthetic_results())
    table = md[md.index("## llama3-8b"):md.index("## Decode")]
    assert "`torch_compile` (out of place)" in table and "`rope_jit/cache_fp32` |" in table
    row1 = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    assert "1.60 µs · 1.60x" in row1  # at few tokens: time over the copy's
    row8k = next(line for line in table.splitlines() if line.startswith("| 8192 |"))
    # 50 us for 2*8192*40*128*2 + 8*8192 + 8192*128*4 bytes at 4 TB/s copy = 89% of copy;
    # the pattern ceiling (42 us for the rotated bytes) is at 100%, so 85% of it
    nbytes = ROPE.bytes_per_call(SHAPES["llama3-8b"], 8192, impl_named("rope_jit/cache_fp32"))
    pct = 100 * nbytes / 50e-6 / 4e12
    pattern_pct = 100 * (nbytes / 50e-6) / (2 * 8192 * 40 * 256 / 42e-6)
    assert f"50.0 µs · {pct:.0f}% · {pattern_pct:.0f}%ᵖ" in row8k
    tc_cell = row8k.split(" | ")[4]
    assert tc_cell.startswith("70.0 µs") and "ᵖ" not in tc_cell  # out of place: no pattern figure
    assert "![achieved bandwidth per shape](bandwidth.png)" in md
    assert "`torch_compile`, **out of place**" in md


def test_report_summary_flags_a_slower_rope_jit_and_missed_targets():
    results = synthetic_results()
    md = report.render_markdown(results)
    summary = md[md.index("## Summary"):md.index("![")]
    assert "**1.07 (flashinfer/cache_fp32)**" in summary  # 1.6 us vs FlashInfer's 1.5 us
    assert "| 0.91 (flashinfer/cache_fp32) |" in summary   # 50 us vs 55 us
    assert "≤ 1.3x the copy time at 1 to 16 tokens, with a cache: `rope_jit/cache_fp32` misses at llama3-8b T=1 1.60" in summary
    assert "`rope_jit/on_the_fly` misses at llama3-8b T=8192" in summary  # 48 us: under 95% of copy
    assert "`rope_jit/cache_fp32` slower than the fastest cache peer at llama3-8b T=1 1.07x" in summary
    assert report.summary_text(results).startswith("## Summary")


def test_report_decode_table_bolds_the_fastest():
    md = report.render_markdown(synthetic_results())
    decode = md[md.index("## Decode"):md.index("## Host time")]
    row = next(line for line in decode.splitlines() if line.startswith("| llama3-8b | 1 |"))
    assert "| 1.00 µs | 1.40x | 1.60x | 2.00x | **1.50x** | 5.00x |" in row  # chain floor 2nd


def test_report_summary_shows_the_chain_floor_beside_the_pattern_ceiling():
    summary = report.render_summary(synthetic_results())
    assert "| copy | pattern ceiling | chain floor |" in summary[4]
    one = next(line for line in summary if line.startswith("| llama3-8b | 1 |"))
    big = next(line for line in summary if line.startswith("| llama3-8b | 8192 |"))
    assert "| 1.00 µs | 1.10x | 1.40x |" in one  # few tokens: x copy time, as the cells
    pattern_pct = 100 * ROPE.touch_pattern(SHAPES["llama3-8b"], 8192).moved_bytes / 42e-6 / 4.0e12
    assert f"| 40.0 µs | {report.fmt_pct(pattern_pct)} | — |" in big  # no chain floor there


def test_report_host_time_checks_and_notes():
    md = report.render_markdown(synthetic_results())
    assert "| `rope_jit/cache_fp32` | 7.50 | 7.40 | fp32 cache |" in md
    assert "| `rope_jit/cache_fp32` | ok 0.50 (T=1024) |" in md
    assert "* `liger_kernel` skipped: not importable" in md


def test_results_written_before_families_still_render():
    """benchmarks/results/h100/results.json predates families, the pattern ceiling and
    out-of-place torch: its rows are rope, its torch rows in place."""
    results = json.loads((BENCH / "results" / "h100" / "results.json").read_text())
    md = report.render_markdown(results)
    assert "NVIDIA H100 80GB HBM3" in md
    for shape in SHAPES:
        assert f"## {shape}:" in md
    assert "| 8192 | 61.4 µs · 93%" in md   # rope_jit/cache_fp32 at Llama 8192, as it was
    assert "(out of place)" not in md


def test_write_reports_writes_the_plot_or_says_why_not(tmp_path):
    results = synthetic_results()
    md = report.write_reports(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["rows"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "bandwidth.png").exists() and "bandwidth.png not written" in md
        assert "![" not in md
    else:
        assert (tmp_path / "bandwidth.png").stat().st_size > 10_000 and "](bandwidth.png)" in md


# ================================================================== the sweep on the CPU

def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "dry"
    r = subprocess.run([sys.executable, str(BENCH / "run.py"), "--dry-run", "--shapes", "phi2",
                        "--tokens", "1,16", "--impls", "torch_eager,rope_jit/cache_fp32",
                        "--host-calls", "20", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "## Summary" in r.stdout and f"wrote {out / 'results.json'}" in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["meta"]["dry_run"]
    status = {(row["impl"], row["tokens"]): row["status"] for row in results["rows"]}
    for t in (1, 16):
        assert status[("copy", t)] == status[("pattern_ceiling", t)] == status[("torch_eager", t)] == "ok"
        assert status[("rope_jit/cache_fp32", t)] == "error"  # needs a GPU
    [check] = [c for c in results["checks"] if c["impl"] == "torch_eager"]
    assert check["ok"] and check["tokens"] == 16
    assert (out / "RESULTS.md").read_text().startswith("# RoPE benchmark")


@dataclass(frozen=True)
class VecShape:
    name: str
    width: int

    def describe(self) -> str:
        return f"rows of {self.width} floats"


class ScaleFamily(impls.OpFamily):
    """A toy op family (x *= 2 in place): what a new family has to provide, nothing more."""
    name = "scale"
    title = "x *= 2"
    shapes = {"w64": VecShape("w64", 64)}
    host_overhead_shape = "w64"
    host_overhead_impls = {"torch_mul": "in place"}

    def build_impls(self, peers):
        def prepare(ctx, tokens):
            return lambda x: x.mul_(2)

        def wrong(ctx, tokens):
            return lambda x: x.mul_(3)
        return [impls.Impl("torch_mul", prepare, "rope_jit", "x.mul_(2)"),
                impls.Impl("wrong_mul", wrong, "peer", "x.mul_(3)")], {}

    def make_context(self, shape, device, peers):
        return type("Ctx", (), dict(shape=shape, device=device))()

    def input_bytes(self, shape, tokens):
        return tokens * shape.width * 4

    def touch_pattern(self, shape, tokens):
        return ceilings.TouchPattern(tokens, shape.width * 4, shape.width * 4)

    def bytes_per_call(self, shape, tokens, impl):
        return 2 * self.input_bytes(shape, tokens)

    def make_inputs(self, ctx, tokens, sets):
        return [(torch.ones(tokens, ctx.shape.width),) for _ in range(sets)]

    def make_check_case(self, ctx, tokens):
        return torch.arange(tokens * ctx.shape.width, dtype=torch.float32).view(tokens, -1)

    def check(self, impl, apply, ctx, case):
        x = case.clone()
        apply(x)
        ok = torch.equal(x, 2 * case)
        return dict(shape=ctx.shape.name, impl=impl.name, tokens=case.shape[0], ok=ok,
                    problems=[] if ok else ["not doubled"], tolerance="exact",
                    max_abs_err=float((x - 2 * case).abs().max()),
                    worst_err_over_tol=0.0 if ok else float("inf"))

    def comparisons(self):
        return [dict(label="any", subject="torch_mul", peers=["wrong_mul"])]

    def targets(self, shapes):
        return [dict(what="≤ 100x the copy", impls=["torch_mul"], shapes=[s.name for s in shapes],
                     min_tokens=1, max_tokens=None, metric="x_copy", at_most=100.0)]

    def bytes_formula(self):
        return "2·T·W·4"


def test_a_new_family_goes_through_the_sweep_and_report_unchanged():
    family = ScaleFamily()
    shape = family.shapes["w64"]
    rec = run.Recorder(copy_bw=1e10)
    built, _ = family.build_impls(Peers(CPU))
    run.sweep_shape(family, shape, [4, 32], built, CPU, Peers(CPU), CpuTimer(3), rec,
                    run.Deadline(60), [])
    status = {(r["impl"], r["tokens"]): r["status"] for r in rec.rows}
    assert status == {("copy", 32): "ok", ("pattern_ceiling", 32): "ok", ("torch_mul", 32): "ok",
                      ("wrong_mul", 32): "WRONG", ("copy", 4): "ok", ("pattern_ceiling", 4): "ok",
                      ("torch_mul", 4): "ok", ("wrong_mul", 4): "WRONG"}
    results = dict(meta=dict(device="CPU"), copy_bandwidth=1e10,
                   families={family.name: family.describe(built, [shape])},
                   shapes=[family.describe_shape(shape)], rows=rec.rows, checks=rec.checks,
                   errors=rec.errors, host_overhead=[], skipped={}, notes=[])
    md = report.render_markdown(results)
    assert "## w64: rows of 32 floats" not in md and "## w64: rows of 64 floats" in md
    assert "| `torch_mul` | ok 0.00 (T=32) |" in md and "**WRONG**" in md
    assert "`wrong_mul` on w64, T=4,32: **WRONG**: not doubled" in md


def test_time_budget_cuts_rows_and_says_so():
    family = ScaleFamily()
    rec, notes = run.Recorder(copy_bw=1e10), []
    deadline = run.Deadline(1e-9)
    run.sweep_shape(family, family.shapes["w64"], [4, 32], family.build_impls(None)[0], CPU,
                    Peers(CPU), CpuTimer(3), rec, deadline, notes)
    assert rec.rows == [] and deadline.missed == ["w64 T=32", "w64 T=4"]
    assert "not measured: the time budget" in notes[0]


def test_git_revision_names_the_commit_a_device_copy_came_from(monkeypatch):
    monkeypatch.setenv("ROPE_JIT_GIT_REVISION", "abc1234")
    assert run.git_revision() == "abc1234"
    monkeypatch.delenv("ROPE_JIT_GIT_REVISION")
    rev = run.git_revision()
    assert rev is None or rev.split("+")[0].isalnum()  # this checkout's HEAD (or no git)


def test_gathered_cos_sin_duplicates_halves_once_per_positions_tensor():
    """Liger's and rope_jit/cos_sin's inputs: cache rows at the positions, each half
    repeated (HF's cat((freqs, freqs))), built on the first call with a positions tensor."""
    cache = torch.randn(10, 8)
    pos = torch.tensor([3, 1])
    cos_sin = impls._gathered_cos_sin(cache, lead=(1,))
    cos, sin = cos_sin(pos)
    assert cos.shape == sin.shape == (1, 2, 8)
    assert torch.equal(cos[0], torch.cat((cache[pos, :4], cache[pos, :4]), -1))
    assert torch.equal(sin[0], torch.cat((cache[pos, 4:], cache[pos, 4:]), -1))
    assert cos_sin(pos)[0] is cos  # the same positions: no new gather
    assert impls._gathered_cos_sin(cache)(pos)[0].shape == (2, 8)
