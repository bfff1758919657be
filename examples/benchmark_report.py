"""Write docs/BENCHMARKS.md (and its plot and raw JSON) from a run of ifprune_mlx.bench.

The report states what was run and on what, the targets, the decode / TTFT / re-selection /
memory tables, and checks its own figures: a decode ratio or speed-up above what the bytes
read per token allow is flagged, not quoted. Hand-written notes below the NOTES marker of an
existing report are kept.

    python -m examples.benchmark_report                     # measure (as `ifprune bench`), then write
    python -m examples.benchmark_report --quick --out /tmp/B.md
    python -m examples.benchmark_report --from-json docs/benchmarks.json   # re-write, no measuring
    make bench                                              # the default run, OpenBLAS preloaded on Linux
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ifprune_mlx.bench import cli as bench_cli, run as bench_run
from ifprune_mlx.bench.settings import BOUND_SLACK, settings_for

REPO = Path(__file__).resolve().parents[1]
NOTES = "<!-- Hand-written notes below this line are kept when the benchmark is re-run. -->"
TARGET_SMALL, TARGET_MLX_LM, TARGET_MEMORY = 0.95, 0.97, 1.02
# Real models (issue 18): dense at least as fast as mlx-lm; the speed-up at density 0.5 within
# 10% of what the bytes read per token allow; training-free selection no dearer than the
# dense prefill it replaces.
TARGET_MLX_LM_REAL, TARGET_BOUND_SHARE, TARGET_BOUND_DENSITY, TARGET_SELECT = 1.0, 0.9, 0.5, 1.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _roof_gbs(info: dict) -> float:
    """The read bandwidth the roofline divides by: the best one measured in the run."""
    return max(info["bandwidth"]["stream_gbs"], info["bandwidth"]["gemv_gbs"])


def _same_kernels(row: dict) -> bool:
    return row.get("ratio_rows") is not None


def _flagged(value: float, bound: float | None) -> str:
    """`value` (a ratio), marked when it beats its bytes-per-token bound (BOUND_SLACK)."""
    text = f"{value:.2f}x"
    return f"{text} **(> bound)**" if bound and value > bound * BOUND_SLACK else text


def targets(info: dict) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for the performance targets of the design."""
    out = []
    for r in info["results"]:
        pruned = [d for d in r["decode"] if d["density"] < 1.0]
        if pruned:
            worst = min(pruned, key=lambda d: d["ratio_small"])
            out.append((f"{r['name']}: decode in place >= {TARGET_SMALL}x physically small, every density",
                        worst["ratio_small"] >= TARGET_SMALL,
                        f"worst {worst['ratio_small']:.3f}x at density {worst['density']:.2f}"))
        full = [d for d in r["decode"] if d["density"] == 1.0]
        goal = TARGET_MLX_LM_REAL if r.get("real") else TARGET_MLX_LM
        if full:
            out.append((f"{r['name']}: density 1.0 >= {goal}x mlx-lm",
                        full[0]["ratio_mlx_lm"] >= goal, f"{full[0]['ratio_mlx_lm']:.3f}x"))
        half = [d for d in r["decode"] if d["density"] == TARGET_BOUND_DENSITY and d.get("speedup")]
        if r.get("real") and half:
            share = half[0]["speedup"] / bench_run.bytes_bound(r, half[0])
            out.append((f"{r['name']}: speed-up at density {TARGET_BOUND_DENSITY} >= {TARGET_BOUND_SHARE}x "
                        "the bytes bound", share >= TARGET_BOUND_SHARE,
                        f"{share:.3f}x ({half[0]['speedup']:.2f}x of {bench_run.bytes_bound(r, half[0]):.2f}x)"))
        free = [t for t in r["ttft"] if t.get("selector") == "activations"]
        if r.get("real") and free:
            worst = max(free, key=lambda t: t["select_over_dense"])
            out.append((f"{r['name']}: training-free selection <= {TARGET_SELECT}x the dense prefill",
                        worst["select_over_dense"] <= TARGET_SELECT,
                        f"worst {worst['select_over_dense']:.3f}x ({worst['tokens']} tokens)"))
        if r["memory"]:
            out.append((f"{r['name']}: peak memory <= {TARGET_MEMORY}x weights (+ KV cache)",
                        r["memory"]["ratio"] <= TARGET_MEMORY, f"{r['memory']['ratio']:.3f}x"))
    return out


def _header(info: dict, plot: Path | None, source: Path | None) -> list[str]:
    m, bw, s = info["machine"], info["bandwidth"], info["settings"]
    synthetic = [r for r in info["results"] if not r.get("real")]
    real = [r for r in info["results"] if r.get("real")]
    main = next((r for r in synthetic if r["detailed"]), synthetic[0] if synthetic else None)
    same = any(_same_kernels(d) for r in info["results"] for d in r["decode"])
    rotation = ("three blocks (in place, mlx-lm layout, same kernels; below density 1.0 also mlx-lm "
                "dense) in an order that rotates (whole turns: each variant opens as many rounds)"
                if same else "two blocks in alternating order")
    lines = [
        "# Benchmarks",
        "",
        "Is the in-place runtime as fast as a model that is really that small? Measured by "
        "ifprune_mlx/bench/, written by examples/benchmark_report.py. Every ratio comes from "
        "one run in which the variants were timed in alternation, so ratios, not absolute "
        "tok/s, are what to compare across machines and loads.",
        "",
        f"- command: `{info['command']}` ({info['seconds'] / 60:.1f} min)",
        *([f"- report: written from {source.name} of that run by `python -m examples.benchmark_report "
           f"--from-json {source}`"] if source else []),
        f"- date: {info['date']}",
        *([f"- load average (1 min): {info['load_start']} at the start, {info.get('load_end')} at "
           f"the end, and per model and decode row below, against {info['machine']['cores']} cores: "
           "absolute tok/s depend on it, paired ratios much less"] if info.get("load_start") is not None else []),
        f"- machine: {m['os']}, {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, MLX device "
        f"{m['device']}",
        f"- software: mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, Python {m['python']}",
        f"- BLAS: {m['blas']}",
        f"- measured in this run (best of {len(info.get('bandwidth_samples', [bw]))} probes, at the "
        f"start and after each model): streaming read (MLX sum) {bw['stream_gbs']:.1f} GB/s, "
        f"matrix-vector {bw['gemv_gbs']:.1f} GB/s, matrix-matrix {bw['gemm_gflops']:.0f} GFLOP/s "
        f"(float32); the roofline uses the larger read bandwidth, {_roof_gbs(info):.1f} GB/s"
        + _reference_blas_note(info),
        f"- decode: blocks of up to {s['decode_tokens']} tokens (fewer for slow models, see "
        f"'rounds'), greedy, `mlx_lm.generate.generate_step` for every variant; each variant "
        f"prefills a {s['decode_prompt']}-token prompt once and continues its own generation "
        f"(own KV cache) block after block; after a warm-up, {s['min_reps']}-{s['reps']} rounds of "
        f"{rotation}; tok/s are medians, ratios are medians over rounds of the ratio of the "
        "round's blocks, so load changes between rounds cancel"
        + ("; below density 1.0 mlx-lm on the dense model runs in every round too, so the "
           "speed-up vs mlx-lm dense is paired as well" if any("dense" in d.get("samples", {})
                                                             for r in info["results"] for d in r["decode"]) else ""),
        *([f"- real models: {', '.join(r['name'] for r in real)}, converted from the GGUF file by "
           "converters.gguf (floats dequantized from the file's blocks; the 4-bit variant re-quantized "
           "by rows from them, group size 32, down_proj included); plain models without a trained "
           "predictor, so their TTFT is the training-free selector's"] if real else []),
        *([f"- synthetic models: random llama weights, {main['layers']} layers, vocab {main['vocab']} with an "
           "untied lm_head, d_ffn = 4 d_model, head_dim 64, 4 query heads per KV head; random "
           "predictor (1-layer qwen2 backbone of width d_model / 4 + head) in the bundle "
           "(bench.measure.synthetic_config, testing.make_bundle)"] if main else []),
        "- references (fidelity.compact_model), holding compact copies of exactly the rows the "
        "engine keeps: *mlx-lm layout* = a plain mlx-lm llama (nn.Linear FFN, "
        "intermediate_size = k; at density 1.0 the dense model as mlx-lm runs it); *same "
        "kernels* = PrunableMLPs of width k in the engine's row layout. Their logits match the "
        "engine's (max |diff| in the tables).",
        f"- checks: a speed-up over the dense model cannot exceed dense bytes / pruned bytes read "
        f"per token, and in place vs a compact copy of the same rows cannot exceed 1; figures "
        f"more than {BOUND_SLACK - 1:.0%} above their bound are marked **(> bound)** and "
        "listed under Checks.",
        "",
    ]
    if plot:
        lines += [f"![decode and re-selection]({plot.name})", ""]
    return lines


def _reference_blas_note(info: dict) -> str:
    ref = info.get("bandwidth_reference_blas")
    if not ref:
        return ""
    return (f"; without OpenBLAS (the wheel's reference BLAS, measured in a child process of "
            f"this run): matrix-vector {ref['gemv_gbs']:.1f} GB/s, matrix-matrix "
            f"{ref['gemm_gflops']:.0f} GFLOP/s")


def _checks(info: dict) -> list[str]:
    found = bench_run.bound_violations(info)
    lines = ["## Checks", ""]
    if not found:
        return lines + ["Every decode ratio and speed-up is within its bytes-per-token bound.", ""]
    lines += [_table(["model", "density", "figure", "measured", "bound"],
                     [[v["model"], f"{v['density']:.2f}", v["figure"], f"{v['value']:.2f}",
                       f"{v['bound']:.2f}"] for v in found]), ""]
    if not any(_same_kernels(d) for r in info["results"] for d in r["decode"]):
        lines += ["This run predates the same-kernels reference: its ratios against mlx-lm's "
                  "layout include the difference between the two layouts' kernels.", ""]
    return lines


def _scaling(res: list[dict]) -> list[str]:
    res = [r for r in res if not r.get("real")]
    if len(res) < 2:
        return []
    rows = []
    for r in res:
        pruned = [d for d in r["decode"] if d["density"] < 1.0]
        full = [d for d in r["decode"] if d["density"] == 1.0]
        low = min(r["decode"], key=lambda d: d["density"])
        ttft = ", ".join(f"{t['ratio_dense']:.2f} ({t['tokens']} tok, {t.get('selector', 'predictor')})"
                         for t in r["ttft"])
        speedup = (_flagged(low["speedup"], bench_run.bytes_bound(r, low)) + f" at {low['density']:.2f}"
                   if low["speedup"] else "")
        rows.append([r["name"], f"{r['weight_bytes'] / 1e6:.0f}",
                     f"{min(d['ratio_small'] for d in pruned):.3f}" if pruned else "",
                     f"{full[0]['ratio_mlx_lm']:.3f}" if full else "", speedup, ttft,
                     _ms(r["reselect"][-1]["seconds"]) if r["reselect"] else "",
                     f"{r['memory']['ratio']:.3f}" if r["memory"] else ""])
    return ["## Scaling", "",
            _table(["model", "weights MB", "worst in place / small", "dense in place / mlx-lm",
                    "decode speed-up vs mlx-lm dense", "TTFT pruned / dense",
                    "re-select 100% ms", "peak memory / weights"], rows), ""]


def _decode(info: dict, r: dict) -> list[str]:
    same = any(_same_kernels(d) for d in r["decode"])
    lines = ["### Decode (tokens/s)", "",
             "Small: the mlx-lm-layout reference (at density 1.0, mlx-lm on the dense model). "
             "Speed-up vs mlx-lm dense: paired with mlx-lm on the dense model timed in the same "
             "rounds; speed-up vs dense, same kernels: in place vs the density-1.0 rows' median "
             "(not paired). Both are checked against the bytes bound. Roofline: MB read per "
             "token / the run's best read bandwidth. Load: the 1-minute load average after the "
             "row's rounds.", ""]
    header = ["density", "kept k", "in place", "small", "in place / small"]
    header += ["same kernels", "in place / same kernels"] if same else []
    header += ["speed-up vs mlx-lm dense"] + (["speed-up vs dense, same kernels"] if same else [])
    header += ["bytes bound", "MB read / token", "in place GB/s", "roofline tok/s",
               "in place / roofline", "rounds x tokens", "load", "max logit diff"]
    rows = []
    for d in r["decode"]:
        bound = bench_run.bytes_bound(r, d)
        roof = _roof_gbs(info) * 1e9 / d["bytes_per_token"]
        row = [f"{d['density']:.2f}", d["k"], f"{d['inplace_tps']:.1f}", f"{d['small_tps']:.1f}",
               f"**{d['ratio_small']:.3f}**" + (" **(> bound)**" if d["ratio_small"] > BOUND_SLACK else "")]
        if same:
            row += [f"{d['rows_tps']:.1f}", f"**{d['ratio_rows']:.3f}**"
                    + (" **(> bound)**" if d["ratio_rows"] > BOUND_SLACK else "")]
        row += [_flagged(d["speedup"], bound) if d["speedup"] else ""]
        if same:
            row += [_flagged(d["speedup_rows"], bound) if d["speedup_rows"] else ""]
        row += [f"{bound:.2f}x" if bound else "", f"{d['bytes_per_token'] / 1e6:.1f}",
                f"{d['bytes_per_token'] * d['inplace_tps'] / 1e9:.1f}", f"{roof:.1f}",
                f"{d['inplace_tps'] / roof:.0%}", f"{d['reps']} x {d['block_tokens']}",
                d.get("load", ""), f"{d['max_logit_diff']:.1e}"]
        rows.append(row)
    return lines + [_table(header, rows), ""]


def _model(info: dict, r: dict) -> list[str]:
    s = info["settings"]
    kind = "Real model" if r.get("real") else "Synthetic"
    load = f"; load average {r['load'][0]} -> {r['load'][-1]}" if r.get("load") else ""
    lines = [f"## {kind}: {r['name']}: d_model {r['d_model']}, d_ffn {r['d_ffn']}, {r['layers']} layers, "
             f"{r['quant']}, weights {r['weight_bytes'] / 1e6:.0f} MB{load}", ""]
    lines += _decode(info, r)
    if r["ttft"]:
        lines += _ttft(r)
    if r["reselect"]:
        k = r["reselect"][0]["k"]
        lines += [f"### Re-selection: engine.apply() vs channels changed (k = {k} of {r['d_ffn']}, "
                  f"all {r['layers']} layers)", ""]
        lines += [_table(["changed", "rows swapped", "apply ms", "compact copies ms (no in-place)"],
                         [[f"{x['fraction']:.0%}", x["swaps"], _ms(x["seconds"]),
                           _ms(x["compact_copy_seconds"])] for x in r["reselect"]]), ""]
    if r["memory"]:
        mem = r["memory"]
        base = mem["weights"] + mem["predictor"]
        density = mem.get("density", r["ttft"][0]["density"] if r["ttft"] else "")
        lines += ["### Memory (fresh process: load + select + apply + generate)", ""]
        lines += [_table(["LLM + predictor weights MB", "KV cache MB", "peak after load",
                          "peak after select + apply", "peak after generate",
                          "(peak - KV) / weights", "RSS growth MB", "(RSS growth - KV) / weights"],
                         [[f"{mem['weights'] / 1e6:.1f} + {mem['predictor'] / 1e6:.1f}",
                           f"{mem['kv'] / 1e6:.2f}",
                           f"{mem['peak_load'] / 1e6:.1f} ({mem['peak_load'] / base:.3f}x)",
                           f"{mem['peak_apply'] / 1e6:.1f} ({mem['peak_apply'] / base:.3f}x)",
                           f"{mem['peak'] / 1e6:.1f}", f"**{mem['ratio']:.3f}**",
                           f"{(mem['rss'] - mem['rss_start']) / 1e6:.1f}", f"{mem['rss_ratio']:.3f}"]]),
                  "", f"Prompt {mem['tokens'] - s['memory_tokens']} tokens + {s['memory_tokens']} "
                  f"generated, density {density}; peaks from `mx.get_peak_memory()`, RSS from the "
                  "process's high-water mark (VmHWM) minus its RSS before loading.", ""]
    return lines


def _ttft(r: dict) -> list[str]:
    """The time-to-first-token table: one row per prompt length and selector."""
    rows = []
    for t in r["ttft"]:
        selector = t.get("selector", "predictor")
        select = t.get("select", t.get("predictor"))
        rows.append([t["tokens"], "trained predictor" if selector == "predictor" else "training-free",
                     _ms(select), _ms(t["apply"]), int(t["swaps"]), _ms(t["prefill"]), _ms(t["total"]),
                     _ms(t["dense"]), f"{t['ratio_dense']:.3f}", f"{select / t['dense']:.3f}", t.get("load", "")])
    return [f"### Time to first token (ms), density {r['ttft'][0]['density']}", "",
            "Trained predictor: predictor + apply + prefill of the prompt, pruned. Training-free: "
            "the dense scoring pass over the prompt (it fills the KV cache, as the engine generates) "
            "+ apply + the prompt's last token, pruned. Dense: mlx-lm's prefill + first token on the "
            "dense model.", "",
            _table(["prompt tokens", "selector", "select", "apply (row swaps)", "rows swapped",
                    "prefill (pruned)", "TTFT pruned", "TTFT dense (mlx-lm)", "pruned / dense",
                    "select / dense", "load"], rows), ""]


def write_markdown(info: dict, out: Path, plot: Path | None = None, source: Path | None = None) -> Path:
    """The report of `info` (bench.run.run's result; read from the JSON file `source`, if given) at
    `out`, keeping the notes below NOTES."""
    res = info["results"]
    lines = _header(info, plot, source)
    lines += ["## Targets", ""]
    lines += [_table(["target", "met", "measured"],
                     [[t, "yes" if ok else "**no**", v] for t, ok, v in targets(info)]), ""]
    lines += _checks(info)
    lines += _scaling(res)
    for r in sorted(res, key=lambda r: (not r.get("real"), not r["detailed"])):
        lines += _model(info, r)
    out = Path(out)
    kept = out.read_text().split(NOTES, 1)[1] if out.is_file() and NOTES in out.read_text() else "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + NOTES + kept)
    return out


def plot(info: dict, path: Path) -> Path | None:
    """Decode tok/s, decode ratios and re-selection cost as one PNG (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("note: no plot (matplotlib is not installed)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = info["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    main = next((r for r in res if r["detailed"]), res[0])
    dens = [d["density"] for d in main["decode"]]
    ax.plot(dens, [d["inplace_tps"] for d in main["decode"]], "o-", label="in place (ifprune)")
    ax.plot(dens, [d["small_tps"] for d in main["decode"]], "s--",
            label="physically small (mlx-lm); at 1.0 mlx-lm dense")
    if all(_same_kernels(d) for d in main["decode"]):
        ax.plot(dens, [d["rows_tps"] for d in main["decode"]], "^:", label="physically small, same kernels")
    ax.set(xlabel="density (fraction of FFN channels kept)", ylabel="decode tokens/s",
           title=f"decode, {main['name']}")
    ax.legend(loc="lower left", fontsize=8)
    ax = axes[1]
    for r in res:
        ax.plot([d["density"] for d in r["decode"]], [d["ratio_small"] for d in r["decode"]], "o-",
                label=r["name"])
    ax.axhline(TARGET_SMALL, color="gray", ls="--", lw=1)
    ax.set(xlabel="density", ylabel="in place / physically small",
           title=f"decode ratio (target >= {TARGET_SMALL})")
    ax.legend(fontsize=8)
    ax = axes[2]
    for r in res:
        if r["reselect"]:
            ax.plot([x["fraction"] * 100 for x in r["reselect"]],
                    [x["seconds"] * 1e3 for x in r["reselect"]], "o-", label=r["name"])
    ax.set(xlabel="% of kept channels that change", ylabel="engine.apply() ms",
           title="re-selection cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="a real model as `ifprune bench MODEL` takes it (a .gguf is "
                    "measured in each --dtype and --bits); default: synthetic models only")
    ap.add_argument("--synthetic", help=f"d_model of the synthetic models (default: {bench_cli.DEFAULT_WIDTHS} "
                    "without MODEL, none with it)")
    ap.add_argument("--bits", default="0,4", help="quantizations: 0 (float), 4, 8")
    ap.add_argument("--dtype", default="float32", help="float dtypes, comma-separated: float32, float16, bfloat16")
    ap.add_argument("--decode-seconds", type=float, help="seconds of timed decode per density and model (default 20)")
    ap.add_argument("--detail", type=int, default=1024, help="the width whose TTFT is measured at every prompt length")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run: tiny models, few tokens")
    ap.add_argument("--from-json", type=Path, help="write the report of an earlier run's JSON instead of measuring")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md", help="the report to write")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "benchmarks.png", help="the plot to write")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks.json", help="the raw figures to write")
    args = ap.parse_args(argv)
    if args.from_json:
        info = json.loads(args.from_json.read_text())
    else:
        synthetic = args.synthetic if args.synthetic is not None else "" if args.model else bench_cli.DEFAULT_WIDTHS
        try:
            widths, bits, dtypes = bench_cli.parse_models(synthetic, args.bits, args.dtype)
        except ValueError as e:
            ap.error(str(e))
        command = bench_cli.command_line("python -m examples.benchmark_report", list(argv if argv is not None else sys.argv[1:]))
        info = bench_run.run(models=[args.model] if args.model else [], widths=widths, bits=bits, dtypes=dtypes,
                         settings=settings_for(args.quick, args.decode_seconds),
                         detail=args.detail, command=command, log=lambda msg: print(msg, file=sys.stderr))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=1, default=str))
    png = plot(info, args.plot)
    write_markdown(info, args.out, png, args.from_json)
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
