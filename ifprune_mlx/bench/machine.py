"""Probes of the machine the benchmark runs on: BLAS, memory bandwidth, load, resident memory."""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .settings import Settings


def blas_name() -> str:
    """Which BLAS MLX's CPU backend runs with in this process."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        library = next(p for p in os.environ["LD_PRELOAD"].split(":") if "openblas" in p)
        return f"OpenBLAS (preloaded: {Path(library).parent.name}/{Path(library).name})"
    return "reference BLAS bundled with the mlx[cpu] wheel (no OpenBLAS preloaded)"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    import mlx_lm

    return {"os": f"{platform.system()} {platform.release()}", "cpu": cpu,
            "cores": os.cpu_count(), "ram_gb": round(ram, 1), "device": str(mx.default_device()),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "python": platform.python_version(),
            "blas": blas_name()}


def best_seconds(fn: Callable[[], None], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth(mb: int = 256, reps: int = 5, d: int = 2048) -> dict:
    """Memory bandwidth MLX reaches here: a streaming sum and a matrix-vector product, each
    over `mb` MB (more than the caches), and the matrix-matrix speed prefill depends on.

    The sum runs on one thread; the matrix-vector product ([1, d] @ [rows, d].T, float32) is
    what decode does, through the BLAS in use; the matrix-matrix product is
    [256, d] @ [4d, d].T.
    """
    a = mx.random.uniform(shape=(mb * 2**20 // 4,))
    w = mx.random.normal((mb * 2**20 // (4 * d), d))
    x = mx.random.normal((1, d))
    mx.eval(a, w, x)
    t_sum = best_seconds(lambda: mx.eval(a.sum()), reps)
    t_mv = best_seconds(lambda: mx.eval(x @ w.T), reps * 2)
    del a
    m, w4 = mx.random.normal((256, d)), w[: 4 * d]
    mx.eval(m, w4)
    t_mm = best_seconds(lambda: mx.eval(m @ w4.T), 2)
    out = {"stream_gbs": mb * 2**20 / t_sum / 1e9, "gemv_gbs": w.nbytes / t_mv / 1e9,
           "gemm_gflops": 2 * 256 * d * 4 * d / t_mm / 1e9}
    del w, x, m, w4
    gc.collect()
    mx.clear_cache()
    return out


def bandwidth_without_openblas(s: Settings) -> Optional[dict]:
    """bandwidth() in a fresh process without the preloaded OpenBLAS (None if none is)."""
    if "openblas" not in os.environ.get("LD_PRELOAD", ""):
        return None
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    mb, _, d = s.bandwidth_probe
    args = f"{max(16, mb // 4)}, 2, {d}"
    code = f"import json; from ifprune_mlx.bench.machine import bandwidth; print(json.dumps(bandwidth({args})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS does not say): the benchmark
    shares the machine, and absolute figures depend on it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def resident_memory(reset_peak: bool = False) -> tuple[int, int]:
    """(current, peak) resident set size of this process, bytes. reset_peak: on Linux, first
    reset the peak to the current size (/proc/self/clear_refs), so it measures from now
    (elsewhere the peak is the process's since it started)."""
    if reset_peak and Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if ":" in line)
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):  # macOS: ru_maxrss is in bytes there
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def free_buffers() -> None:
    """Give freed buffers back before the next measurement."""
    gc.collect()
    mx.clear_cache()
