"""The benchmark's report: results.json, RESULTS.md and bandwidth.png, per GPU.

Everything is rendered from the results dict alone (as run.py writes it to results.json),
knowing nothing of any op family beyond what that dict says (implementations, their roles,
comparisons, targets), so a new family is reported by this code unchanged, and

    python benchmarks/report.py benchmarks/results/h200

re-renders a directory's RESULTS.md and bandwidth.png from its results.json (also one
written before families existed: its rows are family 'rope').

Results are kept per GPU: ``benchmarks/results/<slug>/`` with ``gpu_slug`` of the device
name (``NVIDIA H200`` -> ``h200``, ``NVIDIA H100 80GB HBM3`` -> ``h100``), so one GPU's run
does not overwrite another's. benchmarks/jit_timings.py writes there too.

No torch import here: the report renders anywhere (the plot needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from errors import short_error

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
# measured per row, beside the implementations
REFERENCE_ROWS = ("chain_floor", "pattern_ceiling", "copy")
PLOT_NAME = "bandwidth.png"

# words of a device name that say nothing about its speed class
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}
_MEMORY_WORD = re.compile(r"\d+gb|hbm\d*e?|sxm\d*")


def gpu_slug(device_name: str) -> str:
    """A folder name from a device name: lower case, vendor and memory words dropped,
    the rest joined by '-' ('NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H100 PCIe' ->
    'h100-pcie', 'NVIDIA A100-SXM4-80GB' -> 'a100', 'NVIDIA GeForce RTX 4090' -> 'rtx-4090')."""
    words = [w for w in re.split(r"[^0-9a-z]+", device_name.lower()) if w]
    kept = [w for w in words if w not in _VENDOR_WORDS and not _MEMORY_WORD.fullmatch(w)]
    return "-".join(kept) or "gpu"


def default_out_dir(device_name: str) -> Path:
    return RESULTS_ROOT / gpu_slug(device_name)


# ================================================================== formatting

def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.2f} µs" if us < 10 else f"{us:.1f} µs" if us < 100 else f"{us:.0f} µs"


def fmt_pct(p: float) -> str:
    return f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def row_family(r: dict) -> str:
    return r.get("family", "rope")  # results.json from before families: all rope


def families_of(results: dict) -> dict:
    """family name -> {title, implementations, comparisons, targets, small_tokens,
    decode_max_tokens, bytes_formula}; results.json from before families gives one, 'rope'."""
    if "families" in results:
        return results["families"]
    impls = {n: dict(d, role=d.get("role") or ("rope_jit" if n.startswith("rope_jit") else "peer"),
                     inplace=d.get("inplace", True))
             for n, d in (results.get("implementations") or {}).items()}
    return {"rope": dict(title="RoPE on q and k, bf16, in place", implementations=impls,
                         comparisons=[], targets=[], small_tokens=128, decode_max_tokens=16,
                         bytes_formula=results.get("bytes_formula", ""))}


def shapes_of(results: dict, family: str) -> list[dict]:
    return [s for s in results["shapes"] if s.get("family", "rope") == family]


def rows_of(results: dict, family: str, shape: str | None = None) -> list[dict]:
    return [r for r in results["rows"]
            if row_family(r) == family and (shape is None or r["shape"] == shape)]


def column_order(results: dict, family: str, shape: str) -> list[str]:
    """Implementations in registry order (rope_jit first, then peers), then the pattern
    ceiling and the copy, then anything else present."""
    present = {r["impl"] for r in rows_of(results, family, shape)}
    known = list(families_of(results)[family]["implementations"]) + list(REFERENCE_ROWS)
    return [n for n in known if n in present] + sorted(present - set(known))


def is_inplace(results: dict, family: str, impl: str) -> bool:
    d = families_of(results)[family]["implementations"].get(impl)
    return True if d is None else d.get("inplace", True)


def cell(r: dict | None, small_tokens: int) -> str:
    """time · x copy time (at few tokens) or time · % of copy [· % of pattern ceiling]."""
    if r is None:
        return "—"
    if r["status"] != "ok":
        return r["status"]
    text = fmt_us(r["seconds"])
    if r["tokens"] <= small_tokens and r.get("x_copy") is not None:
        text += f" · {r['x_copy']:.2f}x"
    else:
        text += f" · {fmt_pct(r['percent_of_copy'])}"
        if r.get("percent_of_pattern") is not None:
            text += f" · {fmt_pct(r['percent_of_pattern'])}ᵖ"
    if r.get("timing") not in (None, "cuda-graph"):
        text += " †"
    return text


# ================================================================== sections

def render_header(results: dict) -> list[str]:
    meta = results["meta"]
    out = ["# RoPE benchmark", ""]
    out += [f"{meta.get('device', '?')} · copy bandwidth **{results['copy_bandwidth'] / 1e12:.3f} TB/s** · "
            f"torch {meta.get('torch')} · CUDA {meta.get('cuda')} · CuPy {meta.get('cupy')} · "
            f"Triton {meta.get('triton')} · rope_jit {meta.get('rope_jit')} · git {meta.get('git')} · "
            f"{meta.get('date', '')}"
            + (" · **dry run on the CPU: timings mean nothing**" if meta.get("dry_run") else "")
            + ("" if results.get("complete", True) else " · **incomplete run**"), ""]
    fams = families_of(results)
    small = min(f.get("small_tokens", 128) for f in fams.values())
    pattern = (" and, with ᵖ, of the `pattern_ceiling` column's bandwidth on the same row (a "
               "kernel that only loads and stores back, in place, the bytes an in-place call "
               "must touch: what the access pattern allows)"
               if any(r["impl"] == "pattern_ceiling" for r in results["rows"]) else "")
    out += ["Cells: median time per call (CUDA-graph replay over rotating buffer sets totalling "
            f"several times L2); at ≤ {small} tokens, time / time of the `copy` column (a "
            "device copy of the inputs: the launch floor); above, achieved bandwidth as a "
            f"percent of the copy bandwidth{pattern}. "
            "`WRONG`: failed its correctness check, not timed; `n/a`: outside what its API "
            "does; `refused`: the library declined the shape; `error`: see notes; "
            "`†`: eager-loop timing (CUDA-graph capture failed).", ""]
    for name, fam in fams.items():
        out += [f"Bytes per call ({name}): {fam.get('bytes_formula', '')}; the same count for "
                "every implementation of a mode, so the percentages compare.", ""]
    return out


def render_implementations(results: dict) -> list[str]:
    out = ["## Implementations", ""]
    for name, fam in families_of(results).items():
        for impl, d in fam["implementations"].items():
            where = "in place" if d.get("inplace", True) else "**out of place**, whole heads charged"
            out.append(f"* `{impl}`, {where}: {d.get('about', '')}")
        for impl in REFERENCE_ROWS:
            d = (fam.get("references") or {}).get(impl)
            if d:
                out.append(f"* `{impl}`: {d}")
    return out + [""]


def _fastest_peer(by_impl: dict, peers: list[str]) -> dict | None:
    ok = [by_impl[p] for p in peers if p in by_impl and by_impl[p]["status"] == "ok"]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def comparison_rows(results: dict) -> list[dict]:
    """One record per (family, comparison, shape, tokens): subject and fastest peer rows
    and ratio = subject time / fastest peer time (> 1: slower than a peer)."""
    out = []
    for fname, fam in families_of(results).items():
        for comp in fam.get("comparisons") or []:
            for shape in shapes_of(results, fname):
                rows = rows_of(results, fname, shape["name"])
                for t in sorted({r["tokens"] for r in rows}):
                    by_impl = {r["impl"]: r for r in rows if r["tokens"] == t}
                    subject = by_impl.get(comp["subject"])
                    peer = _fastest_peer(by_impl, comp["peers"])
                    ratio = (subject["seconds"] / peer["seconds"]
                             if subject and subject["status"] == "ok" and peer else None)
                    out.append(dict(family=fname, label=comp.get("label", comp["subject"]),
                                    subject_name=comp["subject"], shape=shape["name"], tokens=t,
                                    subject=subject, peer=peer, ratio=ratio))
    return out


def target_misses(results: dict) -> tuple[int, list[tuple[str, str, list[str]]]]:
    """(measurements checked, [(target, impl, [misses])]). A row of a target's
    implementation in its range that was not measured (error, WRONG) is a miss."""
    checked, misses = 0, []
    for fname, fam in families_of(results).items():
        for tg in fam.get("targets") or []:
            lo, hi = tg.get("min_tokens") or 1, tg.get("max_tokens") or float("inf")
            for impl in tg["impls"]:
                missed = []
                for r in rows_of(results, fname):
                    if r["impl"] != impl or r["shape"] not in tg["shapes"] or not lo <= r["tokens"] <= hi:
                        continue
                    if r["status"] in ("n/a", "refused"):
                        continue
                    checked += 1
                    value = r.get(tg["metric"]) if r["status"] == "ok" else None
                    where = f"{r['shape']} T={r['tokens']}"
                    if value is None:
                        missed.append(f"{where} {r['status']}")
                    elif "at_least" in tg and value < tg["at_least"]:
                        missed.append(f"{where} {value:.1f}")
                    elif "at_most" in tg and value > tg["at_most"]:
                        missed.append(f"{where} {value:.2f}")
                if missed:
                    misses.append((tg["what"], impl, missed))
    return checked, misses


def _reference_text(r: dict | None, small_tokens: int) -> str:
    """A reference row's cell: x copy time at few tokens, else % of copy; — if absent."""
    if r is None or r["status"] != "ok":
        return "—"
    if r["tokens"] <= small_tokens and r.get("x_copy") is not None:
        return f"{r['x_copy']:.2f}x"
    return fmt_pct(r["percent_of_copy"])


def _subject_text(r: dict | None, small_tokens: int) -> str:
    return "—" if r is None else cell(r, small_tokens)


def render_summary(results: dict) -> list[str]:
    """rope_jit against its fastest peer per row, and the targets it misses."""
    comps = comparison_rows(results)
    if not comps:
        return []
    out = ["## Summary", "",
           "Each rope_jit mode against the fastest peer of the same kind on the same row: "
           "ratio = rope_jit time / peer time (**bold**: rope_jit is slower).", ""]
    fams = families_of(results)
    for fname, fam in fams.items():
        fcomps = [c for c in comps if c["family"] == fname]
        if not fcomps:
            continue
        small = fam.get("small_tokens", 128)
        labels = list(dict.fromkeys((c["label"], c["subject_name"]) for c in fcomps))
        header = "| shape | tokens | copy | pattern ceiling | chain floor |"
        for label, subject in labels:
            header += f" `{subject}` | ÷ fastest {label} peer |"
        out += [header, "|---|---:|---:|---:|---:|" + "---|---|" * len(labels)]
        keyed = {(c["shape"], c["tokens"], c["label"]): c for c in fcomps}
        for shape in shapes_of(results, fname):
            rows = rows_of(results, fname, shape["name"])
            for t in sorted({r["tokens"] for r in rows}):
                ref = {r["impl"]: r for r in rows if r["tokens"] == t}
                copy, pat = ref.get("copy"), ref.get("pattern_ceiling")
                chain = ref.get("chain_floor")
                line = (f"| {shape['name']} | {t} | "
                        f"{fmt_us(copy['seconds']) if copy and copy['status'] == 'ok' else '—'} | "
                        f"{_reference_text(pat, small)} | "
                        f"{_reference_text(chain, small)} |")
                for label, _ in labels:
                    c = keyed.get((shape["name"], t, label))
                    if c is None:
                        line += " — | — |"
                        continue
                    ratio = "—"
                    if c["ratio"] is not None:
                        ratio = f"{c['ratio']:.2f} ({c['peer']['impl']})"
                        if c["ratio"] > 1.0:
                            ratio = f"**{ratio}**"
                    line += f" {_subject_text(c['subject'], small)} | {ratio} |"
                out.append(line)
        out.append("")
    out += render_targets(results)
    return out


def render_targets(results: dict) -> list[str]:
    checked, misses = target_misses(results)
    slower = [c for c in comparison_rows(results) if c["ratio"] is not None and c["ratio"] > 1.0]
    if not checked and not comparison_rows(results):
        return []
    out = [f"Targets: {checked} measurements checked, "
           f"{sum(len(m) for _, _, m in misses)} missed; rope_jit slower than a peer on "
           f"{len(slower)} row(s)."]
    for what, impl, missed in misses:
        out.append(f"* {what}: `{impl}` misses at {', '.join(missed)}")
    grouped: dict = {}
    for c in slower:
        grouped.setdefault((c["subject_name"], c["label"]), []).append(
            f"{c['shape']} T={c['tokens']} {c['ratio']:.2f}x {c['peer']['impl']}")
    for (subject, label), where in grouped.items():
        out.append(f"* `{subject}` slower than the fastest {label} peer at {', '.join(where)}")
    return out + [""]


def render_shape_tables(results: dict) -> list[str]:
    out = []
    fams = families_of(results)
    for fname, fam in fams.items():
        small = fam.get("small_tokens", 128)
        for shape in shapes_of(results, fname):
            cols = column_order(results, fname, shape["name"])
            if not cols:
                continue
            title = shape["name"] if len(fams) == 1 else f"{fname} · {shape['name']}"
            out += [f"## {title}: {shape['description']}", ""]
            heads = [f"`{c}`" + ("" if is_inplace(results, fname, c) else " (out of place)") for c in cols]
            out += ["| tokens | " + " | ".join(heads) + " |",
                    "|---:|" + "---|" * len(cols)]
            rows = rows_of(results, fname, shape["name"])
            by_key = {(r["tokens"], r["impl"]): r for r in rows}
            for t in sorted({r["tokens"] for r in rows}):
                out.append(f"| {t} | " + " | ".join(cell(by_key.get((t, c)), small) for c in cols) + " |")
            out.append("")
    return out


def render_decode(results: dict) -> list[str]:
    """Rows of few tokens: every implementation's time over the copy's (the latency floor),
    the fastest in bold."""
    out = []
    for fname, fam in families_of(results).items():
        limit = fam.get("decode_max_tokens", 16)
        rows = [r for r in rows_of(results, fname) if r["tokens"] <= limit]
        if not rows:
            continue
        impls = [n for n in fam["implementations"] if any(r["impl"] == n for r in rows)]
        out += [f"## Decode (≤ {limit} tokens): time / copy time", "",
                "The copy column is the time of a device copy of the inputs (the latency floor); "
                "every other cell is time over it. The chain floor: the in-place touch with a "
                "position -> cache-row load per token: what that latency chain costs a bare "
                "kernel. Bold: the fastest implementation on the row.", "",
                "| shape | tokens | copy | chain floor | " + " | ".join(f"`{n}`" for n in impls) + " |",
                "|---|---:|---:|---:|" + "---:|" * len(impls)]
        for shape in shapes_of(results, fname):
            srows = [r for r in rows if r["shape"] == shape["name"]]
            for t in sorted({r["tokens"] for r in srows}):
                by_impl = {r["impl"]: r for r in srows if r["tokens"] == t}
                copy = by_impl.get("copy")
                ok = {n: by_impl[n] for n in impls
                      if n in by_impl and by_impl[n]["status"] == "ok" and by_impl[n].get("x_copy")}
                best = min(ok, key=lambda n: ok[n]["seconds"]) if ok else None
                cells = []
                for n in impls:
                    r = by_impl.get(n)
                    if r is None:
                        cells.append("—")
                    elif n not in ok:
                        cells.append(r["status"] if r["status"] != "ok" else fmt_us(r["seconds"]))
                    else:
                        text = f"{ok[n]['x_copy']:.2f}x"
                        cells.append(f"**{text}**" if n == best else text)
                copy_text = fmt_us(copy["seconds"]) if copy and copy["status"] == "ok" else "—"
                chain_text = _reference_text(by_impl.get("chain_floor"), limit)
                out.append(f"| {shape['name']} | {t} | {copy_text} | {chain_text} | "
                           + " | ".join(cells) + " |")
        out.append("")
    return out


def render_host_overhead(results: dict) -> list[str]:
    entries = results.get("host_overhead") or []
    if not entries:
        return []
    calls = entries[0]["calls"]
    shape = entries[0].get("shape", "llama3-8b")
    out = [f"## Host time per warm call ({shape}, 1 token, {calls:,} calls back to back)", "",
           "| implementation | µs per call (loop + final sync) | µs per call (loop only) | what |",
           "|---|---:|---:|---|"]
    for e in entries:
        if e["us_per_call"] is None:
            out.append(f"| `{e['impl']}` | error | error | {e['note']} |")
        else:
            out.append(f"| `{e['impl']}` | {e['us_per_call']:.2f} | {e['us_per_call_loop_only']:.2f} | {e['what']} |")
    return out + [""]


def render_checks(results: dict) -> list[str]:
    checks = results.get("checks") or []
    if not checks:
        return []
    out = ["## Correctness checks", "",
           "Worst |error| / tolerance over q and k (≤ 1 passes) against the float64 reference "
           "fed the same rounded cache, at the token count given; tolerances:", ""]
    for fname, fam in families_of(results).items():
        for impl, d in fam["implementations"].items():
            text = d.get("tolerance_text")
            if text is None:  # results.json from before tolerances were spelled out per impl
                text = next((c["tolerance"] for c in checks if c["impl"] == impl), None)
            if text:
                out.append(f"* `{impl}`: {text}")
        shapes = [s["name"] for s in shapes_of(results, fname)]
        fchecks = [c for c in checks if c.get("family", "rope") == fname]
        impls = [n for n in fam["implementations"] if any(c["impl"] == n for c in fchecks)]
        by_key = {(c["impl"], c["shape"]): c for c in fchecks}
        out += ["", "| implementation | " + " | ".join(shapes) + " |", "|---|" + "---:|" * len(shapes)]
        for name in impls:
            cells = []
            for sh in shapes:
                c = by_key.get((name, sh))
                cells.append("—" if c is None else
                             f"{'ok' if c['ok'] else '**WRONG**'} {c['worst_err_over_tol']:.2f} (T={c['tokens']})")
            out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return out + [""]


def render_notes(results: dict) -> list[str]:
    notes = list(results.get("notes") or [])
    for name, why in (results.get("skipped") or {}).items():
        notes.append(f"`{name}` skipped: {why}")
    # one note per (shape, implementation, status, text), with the token counts it covers
    grouped: dict = {}
    for r in results["rows"]:
        if r["status"] != "ok" or r.get("note"):
            grouped.setdefault((r["shape"], r["impl"], r["status"], r.get("note")), []).append(r["tokens"])
    for (shape, impl, status, note), tokens in grouped.items():
        status = "**WRONG**" if status == "WRONG" else "eager-loop timing (†)" if status == "ok" else status
        notes.append(f"`{impl}` on {shape}, T={','.join(map(str, sorted(tokens)))}: {status}: {note}")
    errors = results.get("errors") or []
    if errors:  # each is already a row or host-overhead note; the tracebacks are in the JSON
        notes.append(f"{len(errors)} exception(s) caught; tracebacks in results.json (`errors`)")
    if not notes:
        return []
    return ["## Notes", ""] + [f"* {n}" for n in notes] + [""]


def render_markdown(results: dict, plot_name: str | None = PLOT_NAME) -> str:
    out = render_header(results)
    out += render_summary(results)
    if plot_name:
        out += [f"![achieved bandwidth per shape]({plot_name})", ""]
    out += render_shape_tables(results)
    out += render_decode(results)
    out += render_host_overhead(results)
    out += render_implementations(results)
    out += render_checks(results)
    out += render_notes(results)
    return "\n".join(out) + "\n"


def summary_text(results: dict) -> str:
    """What stdout ends with: the summary table and the targets (or, with no comparisons,
    the shape tables)."""
    lines = render_summary(results) or render_shape_tables(results)
    lines += render_host_overhead(results)
    return "\n".join(lines)


# ================================================================== plot

def plot_bandwidth(results: dict, path: Path) -> None:
    """Achieved bandwidth (TB/s) vs tokens, one subplot per shape, one line per
    implementation, the reference rows (copy, pattern ceiling, chain floor) in grey, the
    measured copy bandwidth as a dashed black line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = families_of(results)
    panels = [(fname, s) for fname in fams for s in shapes_of(results, fname)]
    ncols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.4 * nrows), squeeze=False)
    ceiling = results["copy_bandwidth"] / 1e12
    names = list(dict.fromkeys(n for fname, _ in panels for n in column_order(results, fname, _["name"])))
    palette = [plt.cm.tab10(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + [plt.cm.Dark2(i) for i in range(8)]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(x for x in names if x not in REFERENCE_ROWS)}
    reference_style = {"copy": dict(ls=":", color="0.45"), "pattern_ceiling": dict(ls="-.", color="0.25"),
                       "chain_floor": dict(ls="--", color="0.6")}
    handles = {}
    for ax, (fname, shape) in zip(axes.flat, panels):
        top, ticks = ceiling, set()
        rows = rows_of(results, fname, shape["name"])
        for name in column_order(results, fname, shape["name"]):
            pts = sorted((r["tokens"], r["bandwidth"] / 1e12) for r in rows
                         if r["impl"] == name and r["status"] == "ok" and r.get("bandwidth"))
            if not pts:
                continue
            style = reference_style.get(name) or dict(color=colors[name])
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5,
                              label=name, **style)
            handles.setdefault(name, line)
            top = max(top, max(p[1] for p in pts))
            ticks.update(p[0] for p in pts)
        handles["copy bandwidth"] = ax.axhline(ceiling, ls="--", color="k", lw=1, label="copy bandwidth")
        ax.set_xscale("log")
        if ticks:
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_ylim(0, top * 1.12)
        title = shape["name"] if len(fams) == 1 else f"{fname} · {shape['name']}"
        ax.set_title(f"{title}: {shape['description']}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("achieved bandwidth (TB/s, docs/performance.md bytes)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    legend_cols = min(len(handles), 5 if ncols > 1 else 3)  # as many as the width holds
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=legend_cols, fontsize=8, frameon=False)
    fig.suptitle(f"RoPE, bf16: {results['meta'].get('device', '')}", fontsize=11)
    legend_rows = -(-len(handles) // legend_cols)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * legend_rows, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ================================================================== files

def _json_default(o):
    item = getattr(o, "item", None)  # NumPy scalars
    return item() if callable(item) else str(o)


def write_json(results: dict, out_dir: Path) -> None:
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_json_default))
    tmp.replace(out_dir / "results.json")


def render_files(results: dict, out_dir: Path) -> tuple[str, str | None]:
    """bandwidth.png, then RESULTS.md (linking the plot when it was drawn): (Markdown,
    why the plot was not drawn or None)."""
    plot_error = None
    try:
        plot_bandwidth(results, out_dir / PLOT_NAME)
    except Exception as e:  # matplotlib missing, most likely: the numbers still count
        plot_error = f"{PLOT_NAME} not written: {short_error(e)}"
    md = render_markdown(results, plot_name=None if plot_error else PLOT_NAME)
    (out_dir / "RESULTS.md").write_text(md)
    return md, plot_error


def write_reports(results: dict, out_dir: Path) -> str:
    """results.json first (a failure later must not lose the numbers), then the plot and
    RESULTS.md; returns the Markdown."""
    write_json(results, out_dir)
    md, plot_error = render_files(results, out_dir)
    if plot_error:
        print(plot_error, flush=True)
        results.setdefault("notes", []).append(plot_error)
        write_json(results, out_dir)
        md, _ = render_files(results, out_dir)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Re-render RESULTS.md and bandwidth.png of a results "
                                            "directory from its results.json.")
    p.add_argument("dir", type=Path, help="a directory holding results.json (e.g. benchmarks/results/h100)")
    args = p.parse_args(argv)
    src = args.dir / "results.json"
    if not src.exists():
        p.error(f"{src} does not exist")
    _, plot_error = render_files(json.loads(src.read_text()), args.dir)
    if plot_error:
        print(plot_error, file=sys.stderr)
    print(f"wrote {args.dir / 'RESULTS.md'}" + ("" if plot_error else f" and {args.dir / PLOT_NAME}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
