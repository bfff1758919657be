"""`ifprune bench MODEL --resident kept`: resident mode against the full-memory engine.

Per model (MODEL, e.g. `default`, and a synthetic float32 model of >= 2 GB), at density d
(DENSITY; resident capacity = kept_count(d), c = capacity / d_ffn):
  memory  fresh processes (one per mode) load, select, apply and generate: MLX's peak memory
          and the growth of the process's peak RSS from before the load, vs the issue's bound
          (W - (1 - c) F) x 1.05 + KV, where W = the weights (+ the predictor's own arrays),
          F = the FFN's row bytes and KV = the KV cache at the end of the generation.
  apply   the resident apply per changed fraction of the kept channels: MB read, reading ms
          and total ms, with the bundle's pages in the OS page cache (warm) and dropped from
          it first (cold: posix_fadvise DONTNEED, Linux); the full engine's apply alongside.
  TTFT    prompts that each select anew (predictor where the model has one): select + apply
          (+ reads) + prefill + first token, the two engines alternately.
  decode  tok/s of both engines on the same selection, in alternating blocks: a paired
          ratio per round (the machine is shared: absolute figures move, ratios much less).

examples/resident_report.py turns the JSON (--json) into docs/RESIDENT.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

DENSITY = 0.5
FRACTIONS = (0.0, 0.1, 0.25, 0.5, 1.0)
SLACK = 1.05  # the bound: (W - (1 - c) F) x 1.05 + KV
SYNTHETIC_WIDTH = 2048
SYNTHETIC_BYTES = 2e9  # the synthetic model has at least this many bytes of weights


def file_bytes(folder: Path) -> tuple[int, int]:
    """(all weight bytes, FFN row bytes) of a bundle's LLM, from its safetensors headers."""
    from ..bundle import safetensors_header, weight_files
    from ..distributed import is_ffn_rows

    total = ffn = 0
    for path in weight_files(Path(folder)):
        for name, info in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            total += size
            ffn += size if is_ffn_rows(name) else 0
    return total, ffn


def probe(folder: str, resident: bool, density: float, prompt_tokens: int, tokens: int) -> dict:
    """In a fresh process: load (resident or not), select at `density`, apply, generate."""
    from .. import load
    from .machine import resident_memory
    from .measure import _own_bytes, bytes_per_token, prompt_text

    rss0 = resident_memory(reset_peak=True)[0]
    mx.reset_peak_memory()
    engine = load(folder, **({"resident": "kept", "max_density": density} if resident else {}))
    peak_load = mx.get_peak_memory()
    text, ids = prompt_text(engine, prompt_tokens, salt=1)
    engine.apply(engine.select(text, density))
    n = sum(1 for _ in engine.stream_responses(text, max_tokens=tokens, tokens=ids))
    predictor = _own_bytes(engine.selectors["predictor"].predictor, engine.model) if engine.has_predictor else 0
    return {"resident": resident, "peak": mx.get_peak_memory(), "peak_load": peak_load,
            "rss_start": rss0, "rss_peak": resident_memory()[1], "held": engine.weight_bytes(),
            "predictor": predictor, "kv": bytes_per_token(engine, engine.mlps[0].k, len(ids) + n)["kv"],
            "tokens": len(ids) + n, "capacity": engine.residency.capacity if resident else engine.d_ffn,
            "d_ffn": engine.d_ffn}


def tokenizer_probe(folder: str) -> dict:
    """In a fresh process: the peak RSS growth of loading the model's tokenizer alone (what the
    engine's RSS holds besides arrays: its vocabulary and the code transformers loads for it)."""
    from mlx_lm.utils import load_tokenizer

    from .. import load  # noqa: F401 (the same imports as probe() before its baseline)
    from .machine import resident_memory

    rss0 = resident_memory(reset_peak=True)[0]
    load_tokenizer(Path(folder))
    return {"rss_growth": resident_memory()[1] - rss0}


def _child(function: str, *args) -> dict:
    """function(*args) of this module in a fresh interpreter (same environment), its JSON result."""
    code = (f"import json, sys; from ifprune_mlx.bench.resident import {function}; "
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(folder: Path, density: float, prompt_tokens: int, tokens: int) -> list[dict]:
    """probe() in a fresh interpreter per mode (full, then resident), with the bound worked out,
    and the tokenizer's own RSS (tokenizer_probe)."""
    weights, ffn = file_bytes(folder)
    tokenizer = _child("tokenizer_probe", str(folder))["rss_growth"]
    rows = []
    for resident in (False, True):
        row = _child("probe", str(folder), resident, density, prompt_tokens, tokens)
        c = row["capacity"] / row["d_ffn"]
        row.update(weights=weights, ffn=ffn, fraction_held=c, tokenizer_rss=tokenizer,
                   bound=(weights + row["predictor"] - (1 - c) * ffn) * SLACK + row["kv"],
                   rss_growth=row["rss_peak"] - row["rss_start"])
        rows.append(row)
    return rows


def drop_page_cache(paths) -> bool:
    """Ask the OS to drop the files' pages from its cache (False where it cannot)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def apply_costs(full, res, density: float, fractions, reps: int) -> list[dict]:
    """Resident apply cost per changed fraction (warm and cold page cache) and the full
    engine's apply of the same change."""
    from ..selectors import Selection
    from .measure import changed_selection, prompt_text

    rng = np.random.default_rng(0)
    base = res.select(prompt_text(res, 32, salt=7)[0], density)
    rows = []
    for fraction in fractions:
        target = Selection.from_indices(changed_selection(base, fraction, res.d_ffn, rng), res.d_ffn, res.n_layers)
        full_s = []
        for _ in range(reps):
            full.apply(base)
            start = time.perf_counter()
            full.apply(target)
            full_s.append(time.perf_counter() - start)
        for cold in (False, True):
            stats = []
            for _ in range(reps):
                res.apply(base)
                if cold and not drop_page_cache(res.residency.source.stamps):
                    break
                stats.append(res.apply(target))
            if stats:
                rows.append({"fraction": fraction, "cold": cold, "k": base.kept_counts[0],
                             "rows_read": stats[0].rows_read, "mb_read": stats[0].bytes_read / 1e6,
                             "read_ms": statistics.median(s.read_seconds for s in stats) * 1e3,
                             "apply_ms": statistics.median(s.seconds for s in stats) * 1e3,
                             "full_apply_ms": statistics.median(full_s) * 1e3})
    full.apply("auto")
    res.apply("auto")
    return rows


def ttft(full, res, density: float, prompts: int, prompt_tokens: int) -> dict:
    """Seconds to the first token of prompts that each select anew, the engines alternately."""
    from .measure import prompt_text

    times: dict[str, list[float]] = {"full": [], "resident": []}
    read = []
    for i in range(prompts):
        text, _ = prompt_text(res, prompt_tokens, salt=100 + i)
        pair = [("full", full), ("resident", res)]
        for name, engine in (pair if i % 2 == 0 else pair[::-1]):
            start = time.perf_counter()
            next(engine.stream_responses(text, max_tokens=1, density=density))
            times[name].append(time.perf_counter() - start)
            if name == "resident":
                read.append(engine.last_apply.bytes_read / 1e6)
    ratios = [r / f for r, f in zip(times["resident"], times["full"])]
    return {"prompt_tokens": prompt_tokens, "prompts": prompts,
            "full_ms": statistics.median(times["full"]) * 1e3,
            "resident_ms": statistics.median(times["resident"]) * 1e3,
            "ratio": statistics.median(ratios), "mb_read": statistics.median(read)}


def decode(full, res, density: float, rounds: int, tokens: int, budget: float) -> dict:
    """Decode tok/s of both engines on one selection, alternating blocks; paired ratios."""
    from .machine import load_average
    from .measure import _Stream, prompt_text

    text, ids = prompt_text(res, 32, salt=3)
    selection = res.select(text, density)
    full.apply(selection)
    res.apply(selection)
    streams = {"full": _Stream(full.model, ids), "resident": _Stream(res.model, ids)}
    tps: dict[str, list[float]] = {"full": [], "resident": []}
    start = time.perf_counter()
    for r in range(rounds):
        for name in (["full", "resident"] if r % 2 == 0 else ["resident", "full"]):
            tps[name].append(streams[name].block(tokens))
        if r >= 3 and time.perf_counter() - start > budget:
            break
    ratios = sorted(a / b for a, b in zip(tps["resident"], tps["full"]))
    full.apply("auto")
    res.apply("auto")
    return {"full_tps": statistics.median(tps["full"]), "resident_tps": statistics.median(tps["resident"]),
            "ratio": statistics.median(ratios), "ratio_low": ratios[len(ratios) // 4],
            "ratio_high": ratios[(3 * len(ratios)) // 4], "rounds": len(ratios), "tokens": tokens,
            "load": load_average()}


def bench_model(folder: Path, name: str, density: float, quick: bool, log: Callable[[str], None]) -> dict:
    """Every measurement on one bundle."""
    from .. import load
    from .machine import load_average

    out = {"name": name, "density": density, "load": [load_average()]}
    out["memory"] = memory(folder, density, 8 if quick else 64, 4 if quick else 32)
    bound = out["memory"][1]["bound"]
    for row in out["memory"]:
        log(f"  {'resident' if row['resident'] else 'full    '}: MLX peak {row['peak'] / 1e6:.0f} MB, RSS growth "
            f"{row['rss_growth'] / 1e6:.0f} MB; resident bound {bound / 1e6:.0f} MB (weights {row['weights'] / 1e6:.0f} MB)")
    full = load(folder, cache_size=0)
    res = load(folder, cache_size=0, resident="kept", max_density=density)
    out.update(capacity=res.residency.capacity, d_ffn=res.d_ffn, layers=res.n_layers,
               predictor=res.has_predictor, quant=str(res.config.get("quantization") or "float"))
    out["apply"] = apply_costs(full, res, density, (0.0, 1.0) if quick else FRACTIONS, 1 if quick else 3)
    for row in out["apply"]:
        log(f"  apply {row['fraction']:.0%} changed ({'cold' if row['cold'] else 'warm'}): read "
            f"{row['mb_read']:.1f} MB in {row['read_ms']:.1f} ms, apply {row['apply_ms']:.1f} ms "
            f"(full engine {row['full_apply_ms']:.1f} ms)")
    out["ttft"] = ttft(full, res, density, 2 if quick else 6, 8 if quick else 64)
    log(f"  TTFT: full {out['ttft']['full_ms']:.0f} ms, resident {out['ttft']['resident_ms']:.0f} ms "
        f"({out['ttft']['mb_read']:.1f} MB read)")
    big = out["memory"][0]["weights"] > 1e9  # a few tokens per block: decode reads all its weights per token
    out["decode"] = decode(full, res, density, 2 if quick else 16, 4 if quick or big else 16, 5 if quick else 120)
    d = out["decode"]
    log(f"  decode: full {d['full_tps']:.1f} tok/s, resident {d['resident_tps']:.1f} tok/s, paired ratio "
        f"{d['ratio']:.3f} (quartiles {d['ratio_low']:.3f}-{d['ratio_high']:.3f}, {d['rounds']} rounds)")
    out["load"].append(load_average())
    return out


def synthetic(folder: Path, quick: bool) -> Path:
    """A random float32 bundle of >= SYNTHETIC_BYTES of weights (tiny when quick)."""
    from .measure import synthetic_bundle, synthetic_config
    from .settings import Settings

    if quick:
        return synthetic_bundle(folder, 256, replace(Settings.quick_run(), layers=2))
    layers = 1
    while True:
        config = synthetic_config(SYNTHETIC_WIDTH, layers)
        d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
        kv = config["num_key_value_heads"] * 64
        size = 4 * (layers * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * v * d)
        if size >= SYNTHETIC_BYTES:
            break
        layers += 1
    return synthetic_bundle(folder, SYNTHETIC_WIDTH, replace(Settings(), layers=layers))


def run(model: str | None, quick: bool, log: Callable[[str], None], command: str = "") -> dict:
    """Resident mode vs the full-memory engine on MODEL (if given) and a synthetic >= 2 GB model."""
    from .machine import load_average, machine
    from .run import real_models

    info = {"machine": machine(), "command": command, "density": DENSITY,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": load_average(), "results": []}
    with tempfile.TemporaryDirectory(prefix="ifprune-resident-") as tmp:
        folders = real_models(Path(model), [None], ["float32"], Path(tmp), log) if model else []
        folders.append(("synthetic", None))
        for name, folder in folders:
            if folder is None:
                log("building the synthetic model")
                folder = synthetic(Path(tmp) / "synthetic", quick)
                name = f"synthetic d{SYNTHETIC_WIDTH if not quick else 256} float32"
            log(f"{name}: resident mode at density {DENSITY}")
            info["results"].append(bench_model(folder, name, DENSITY, quick, log))
    info["load_end"] = load_average()
    return info


def summary(info: dict) -> list[str]:
    """The figures as printed lines."""
    lines = []
    for r in info["results"]:
        full, res = r["memory"]
        lines.append(f"{r['name']}: density {r['density']}, {r['capacity']} of {r['d_ffn']} FFN rows per layer held")
        for row in (full, res):
            lines.append(f"  {'resident' if row['resident'] else 'full':<8} MLX peak {row['peak'] / 1e6:8.0f} MB  "
                         f"RSS growth {row['rss_growth'] / 1e6:8.0f} MB  bound {res['bound'] / 1e6:8.0f} MB")
        d = r["decode"]
        lines.append(f"  decode resident/full {d['ratio']:.3f} ({d['resident_tps']:.1f} / {d['full_tps']:.1f} tok/s)")
    return lines


def _mb(x: float) -> str:
    return f"{x / 1e6:,.0f}"


def report(info: dict) -> str:
    """docs/RESIDENT.md from a run's JSON."""
    m = info["machine"]
    out = ["# Resident mode: measured", "",
           f"Generated by `{info['command']}` then `python examples/resident_report.py` on {info['date']}: "
           f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB, {m['device']}, MLX {m['mlx']}, BLAS: {m['blas']}. "
           f"The machine was shared with other jobs (1-minute load average {info['load_start']} at the start, "
           f"{info['load_end']} at the end, {m['cores']} cores): absolute times move with it; the decode "
           "comparison is paired (the two engines alternate block by block) for that reason.", "",
           "Density d = " + str(info["density"]) + " (capacity = the kept count at d). The bound is the issue's: "
           "(W - (1 - c) F) x 1.05 + KV, W = the weights (+ the predictor's own arrays), F = the FFN's row "
           "bytes, c = capacity / d_ffn, KV = the KV cache at the end of the generation. *MLX peak* is "
           "mx.get_peak_memory() (every MLX array; load, select, apply and a generation included); *RSS growth* "
           "is the process's peak resident set size minus its size before the load (after the imports), which "
           "also counts the tokenizer, Python objects and the allocator's slack.", "",
           "Regenerate: `ifprune bench default --resident kept --json docs/resident.json` (with the OpenBLAS "
           "preload `ifprune` sets up), then `python examples/resident_report.py docs/resident.json docs/RESIDENT.md`.", ""]
    out += ["Summary:", ""] + [_summary_line(r) for r in info["results"]] + [""]
    for r in info["results"]:
        out += _model_section(r)
    return "\n".join(out) + "\n"


def _summary_line(r: dict) -> str:
    full, res = r["memory"]
    d = r["decode"]
    return (f"- {r['name']}: MLX peak {_mb(res['peak'])} MB resident vs {_mb(full['peak'])} MB full memory "
            f"(bound {_mb(res['bound'])} MB: {'within' if res['peak'] <= res['bound'] else 'above'}); process RSS "
            f"growth {_mb(res['rss_growth'])} MB vs {_mb(full['rss_growth'])} MB ({'within' if res['rss_growth'] <= res['bound'] else 'above'} "
            f"the bound, which leaves out the tokenizer's {_mb(res.get('tokenizer_rss', 0))} MB); decode resident/full "
            f"median {d['ratio']:.2f} over {d['rounds']} paired rounds (quartiles {d['ratio_low']:.2f}-{d['ratio_high']:.2f}).")


def _model_section(r: dict) -> list[str]:
    full, res = r["memory"]
    out = [f"## {r['name']}", "",
           f"{r['layers']} layers, d_ffn {r['d_ffn']}, {r['quant']}, weights {_mb(full['weights'])} MB of which "
           f"FFN rows {_mb(full['ffn'])} MB; predictor: {'trained' if r['predictor'] else 'none'}; resident "
           f"capacity {r['capacity']} rows per layer. Load average {r['load'][0]} -> {r['load'][1]}.", "",
           "| engine | weights held (MB) | MLX peak (MB) | RSS growth (MB) | RSS growth - tokenizer (MB) "
           "| bound (MB) | MLX peak within bound | RSS growth within bound |",
           "|---|---:|---:|---:|---:|---:|---|---|"]
    tokenizer = res.get("tokenizer_rss", 0)
    for row in (full, res):
        out.append(f"| {'resident kept' if row['resident'] else 'full memory'} | {_mb(row['held'])} | "
                   f"{_mb(row['peak'])} | {_mb(row['rss_growth'])} | {_mb(row['rss_growth'] - tokenizer)} | "
                   f"{_mb(res['bound'])} | {'yes' if row['peak'] <= res['bound'] else 'no'} | "
                   f"{'yes' if row['rss_growth'] <= res['bound'] else 'no'} |")
    out += ["", f"The tokenizer alone grows a fresh process's peak RSS by {_mb(tokenizer)} MB (its vocabulary "
            "and the code transformers loads for it; measured in its own process); the bound counts weights "
            "and the KV cache only."]
    out += ["", "Apply cost per changed fraction of the kept channels (median of the repetitions; cold: the "
            "bundle's pages dropped from the OS cache first). A resident apply is the reads, the canonical "
            "reorder (the full engine's kind of in-place swaps) and the writes of the rows read; MB read counts "
            "the gaps of under 32 KB read through between wanted rows:", "",
            "| changed | page cache | rows read | MB read | read ms | resident apply ms | full-engine apply ms |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for a in r["apply"]:
        out.append(f"| {a['fraction']:.0%} | {'cold' if a['cold'] else 'warm'} | {a['rows_read']} | "
                   f"{a['mb_read']:.1f} | {a['read_ms']:.1f} | {a['apply_ms']:.1f} | {a['full_apply_ms']:.1f} |")
    t, d = r["ttft"], r["decode"]
    out += ["", f"Time to first token ({t['prompts']} prompts of {t['prompt_tokens']} tokens, each a new selection; "
            f"select + apply + prefill + first token; median): full {t['full_ms']:.0f} ms, resident "
            f"{t['resident_ms']:.0f} ms (median paired ratio {t['ratio']:.2f}; {t['mb_read']:.1f} MB read per prompt).",
            "", f"Decode ({d['rounds']} paired rounds of {d['tokens']} tokens, same selection, load {d['load']}): full "
            f"{d['full_tps']:.1f} tok/s, resident {d['resident_tps']:.1f} tok/s; resident/full per round: median "
            f"{d['ratio']:.3f}, quartiles {d['ratio_low']:.3f}-{d['ratio_high']:.3f}. Both run the same kernels "
            "on the same rows (the same bytes per token): the spread of the per-round ratios is the shared "
            "machine's, not a difference between the engines.", ""]
    return out


def bench_resident(model: str | None, resident: str, quick: bool, json_path: Path | None) -> None:
    """`ifprune bench [MODEL] --resident kept [--quick] [--json PATH]`: run(), print, write JSON."""
    import typer

    from ..console import fail
    from ..resident import MODES
    from .cli import command_line

    if resident not in MODES:
        fail(f"--resident takes {', '.join(MODES)}, got {resident!r}")
    args = ([model] if model else []) + ["--resident", resident] + (["--quick"] if quick else [])
    args += [f"--json {json_path}"] if json_path else []
    info = run(model, quick, log=lambda msg: typer.echo(msg, err=True), command=command_line("ifprune bench", args))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(info, indent=1, default=str))
    for line in summary(info):
        typer.echo(line)
